"""Issue 22, group 1: every setting, from every source, is checked for its type and range in one
place (florist.settings), and a bad one is one line naming the source, the setting and the value.

Sources: ``florist run`` flags, a YAML ``--config``, the paper's ``main.py`` (python-fire, which
parses None, lists, dicts and bools), Flower's run config, and the flags of ``florist data``,
``aggregate``, ``eval``, ``sweep`` and ``flower app``. Nothing here trains: every case is refused
before any work, and ``run_federated`` is replaced by a trap to prove it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import fire
import pytest
import yaml
from conftest import HANG_GUARD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import florist.federation
from florist.cli import main
from florist.config import RUN_RANGES, ConfigError, RunConfig, run_settings
from florist.flower.app_config import run_config_from_flower, run_config_values
from florist.settings import COMMAND_LINE, MAIN_PY, Setting, file_source, show

REPO = Path(__file__).resolve().parents[1]
FIFTY_THOUSAND_DIGITS = "7" * 50_000


def paper_module():
    from test_main_py import paper

    return paper


def refused(argv: list[str], *, trap: bool = True) -> str:
    """Run ``florist ARGV`` in process; assert exit 2 and exactly one stderr line, which is returned.
    With ``trap``, a run that gets as far as starting fails the test."""
    err = io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        mock.patch.object(florist.federation, "run_federated", _trap) if trap else contextlib.nullcontext(),
    ):
        code = main([str(a) for a in argv])
    return _one_line(code, err.getvalue())


def refused_by_main_py(flags: list[str]) -> str:
    """Run ``python main.py FLAGS`` in process (through fire, as the real command line parses them)."""
    err, out = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
        mock.patch.object(florist.federation, "run_federated", _trap),
        pytest.raises(SystemExit) as stop,
    ):
        fire.Fire(paper_module().main, command=flags)
    assert out.getvalue() == ""
    return _one_line(stop.value.code, err.getvalue())


def _one_line(code: object, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("florist: error: "), err
    return err.strip()


def _trap(cfg: RunConfig) -> None:
    raise AssertionError(f"a bad setting reached the run: {cfg}")


# --- the examples -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("num_clients: '2'\n", "num_clients must be an integer >= 1, got '2'"),
        ("num_communication_rounds: [3]\n", "num_communication_rounds must be an integer >= 1, got [3]"),
        ("threshold: abc\n", "threshold must be a finite number in (0, 1], got 'abc'"),
        ("dp_clip_norm: true\n", "dp_clip_norm must be a finite number >= 0, got True"),
        ("threshold: .nan\n", "threshold must be a finite number in (0, 1], got nan"),
        (
            "local_ranks: [8, '4']\n",
            "local_ranks must be a comma-separated list of integers >= 1, got [8, '4']",
        ),
        ("seed: -1\n", "seed must be an integer >= 0, got -1"),
        (f"seed: {FIFTY_THOUSAND_DIGITS}\n", "cannot read YAML config"),  # PyYAML's int() refuses it
        ("1: 2\nlora_rank: 3\n", "unknown setting(s) 1, lora_rank"),
    ],
)
def test_yaml_config_names_the_file_the_setting_and_the_value(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    line = refused(["run", "--config", config, "--output_dir", tmp_path / "out"])
    assert line.startswith(f"florist: error: {config}: ") and message in line, line
    assert len(line) < 300 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--threshold=None"], "main.py: --threshold must be a finite number in (0, 1], got None"),
        (["--dp_clip_norm=True"], "main.py: --dp_clip_norm must be a finite number >= 0, got True"),
        (["--num_clients=2.5"], "main.py: --num_clients must be an integer >= 1, got 2.5"),
        (["--lora_r={'a': 1}"], "main.py: --lora_r must be an integer >= 1, got {'a': 1}"),
        (["--local_ranks=[8,True]"], "main.py: --local_ranks must be a comma-separated list of integers"),
        (["--heter=maybe"], "main.py: --heter must be True or False, got 'maybe'"),
        (["--florist=2"], "main.py: --florist must be True or False, got 2"),
        (["--seed=-1"], "main.py: --seed must be an integer >= 0, got -1"),
        (["--dp_delta=inf"], "main.py: --dp_delta must be a finite number in (0, 1), got 'inf'"),
        (
            ["--resume_from_checkpoint=[1]"],
            "main.py: --resume_from_checkpoint must be True or a path, got [1]",
        ),
    ],
)
def test_main_py_names_the_flag_and_the_value(tmp_path: Path, flags: list[str], message: str) -> None:
    line = refused_by_main_py([*flags, f"--output_dir={tmp_path / 'out'}"])
    assert line == f"florist: error: {message}" or message in line, line
    assert not (tmp_path / "out").exists()


def test_main_py_still_takes_what_fire_makes_of_good_flags() -> None:
    """fire turns text into Python values; the words and numbers the paper's README uses still work."""
    cfg = paper_module().build_config(
        heter="true", florist=1, num_clients=3, output_dir=2024, local_ranks="[8,4,2]", dp_delta="1e-5"
    )
    assert (cfg.heter, cfg.method, cfg.num_clients, cfg.output_dir) == (True, "florist", 3, "2024")
    assert (cfg.local_ranks, cfg.dp_delta) == ([8, 4, 2], 1e-5)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num_clients", "x"], "command line: --num_clients must be an integer >= 1, got x"),
        (["--lora_dropout", "1"], "command line: --lora_dropout must be a finite number in [0, 1), got 1"),
        (["--local_learning_rate", "nan"], "--local_learning_rate must be a finite number >= 0, got nan"),
        (["--resume", "perhaps"], "command line: --resume must be True or False, got perhaps"),
        (["--device", "gpu"], "command line: --device must be auto, cpu, cuda or cuda:N, got gpu"),
        (["--wire_dtype", "__class__"], "--wire_dtype must be one of float32, bfloat16, float16, float64"),
        (["--cutoff_len", "1_000"], "--cutoff_len must be an integer >= 1, got 1_000"),
        (["--seed", FIFTY_THOUSAND_DIGITS], "command line: --seed must be an integer >= 0, got 7777"),
        (
            ["--dp_clip_norm", "1", "--dp_noise_multiplier", "1e-320"],
            "--dp_noise_multiplier 1e-320 is too small",
        ),
    ],
)
def test_run_flags_name_the_flag_and_the_value(tmp_path: Path, flags: list[str], message: str) -> None:
    line = refused(["run", "--output_dir", tmp_path / "out", *flags])
    assert message in line and len(line) < 300, line
    assert not (tmp_path / "out").exists()


def test_a_flag_and_the_file_are_each_named_as_the_source_of_their_own_value(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("num_clients: 3\nlora_r: 4\n")
    line = refused(["run", "--config", config, "--lora_r", "0", "--output_dir", tmp_path / "out"])
    assert line == "florist: error: command line: --lora_r must be an integer >= 1, got 0"
    config.write_text("num_clients: 0\n")
    line = refused(["run", "--config", config, "--lora_r", "4", "--output_dir", tmp_path / "out"])
    assert line == f"florist: error: {config}: num_clients must be an integer >= 1, got 0"


def test_flower_run_config_names_the_key() -> None:
    assert run_config_from_flower(run_config_values(RunConfig()))[0] == RunConfig()
    cases = {
        "num-clients": ("2", "run config: num-clients must be an integer >= 1, got '2'"),
        "threshold": (float("inf"), "run config: threshold must be a finite number in (0, 1], got inf"),
        "heter": (1, "run config: heter must be True or False, got 1"),
        "round-timeout": (-1.0, "run config: round-timeout must be a finite number > 0, got -1.0"),
        "local-ranks": ("8,x", "run config: local-ranks must be a comma-separated list of integers >= 1"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError) as e:
            run_config_from_flower({key: value})
        assert str(e.value).startswith(message), str(e.value)


# --- the other commands' flags ------------------------------------------------------------------

OTHER_COMMANDS = [
    (["data", "split", "x.jsonl", "--num-clients", "2", "--out", "{out}", "--seed=-1"], "--seed must be an integer >= 0, got -1"),
    (["data", "split", "x.jsonl", "--num-clients", "0", "--out", "{out}"], "--num-clients must be an integer >= 1, got 0"),
    (["data", "split", "x.jsonl", "--num-clients", "2", "--out", "{out}", "--alpha", "inf"], "--alpha must be a finite number > 0, got inf"),
    (["data", "split", "x.jsonl", "--num-clients", "2", "--out", "{out}", "--alpha", "nan"], "--alpha must be a finite number > 0, got nan"),
    (["data", "split", "x.jsonl", "--num-clients", "2", "--out", "{out}", "--mode", "random"], "--mode must be one of iid, dirichlet, shards, got random"),
    (["data", "split", "x.jsonl", "--num-clients", "2", "--out", "{out}", "--test-per-label", "ten"], "--test-per-label must be an integer >= 0, got ten"),
    (["data", "info", "{out}", "--num-clients", "2.0"], "--num-clients must be an integer >= 1, got 2.0"),
    (["aggregate", "--out", "{out}", "a", "--max-bytes", "1e9"], "--max-bytes must be an integer >= 1, got 1e9"),
    (["aggregate", "--out", "{out}", "a", "--threshold", "nan"], "--threshold must be a finite number in (0, 1], got nan"),
    (["aggregate", "--out", "{out}", "a", "--method", "fedit", "--regularization", "-1"], "--regularization must be a finite number >= 0, got -1"),
    (["aggregate", "--out", "{out}", "a", "--method", "fedavg"], "--method must be one of fedit, zeropad"),
    (["aggregate", "--out", "{out}", "a", "--wire-dtype", "int8"], "--wire-dtype must be one of float32, bfloat16, float16, got int8"),
    (["eval", "m", "--out", "{out}", "--kshot", "-1"], "--kshot must be an integer >= 0, got -1"),
    (["eval", "m", "--out", "{out}", "--batch_size", "0"], "--batch_size must be an integer >= 1, got 0"),
    (["eval", "m", "--out", "{out}", "--eval_samples", "many"], "--eval_samples must be an integer >= 1, got many"),
    (["eval", "m", "--out", "{out}", "--dtype", "float16"], "--dtype must be float32 or bfloat16, got float16"),
    (["eval", "m", "--out", "{out}", "--scorer", "exact"], "--scorer must be one of loglik, generate, both, got exact"),
    (["sweep", "--output_dir", "{out}", "--e-tolerance", "nan"], "--e-tolerance must be a finite number >= 0, got nan"),
    (["sweep", "--output_dir", "{out}", "--select-by", "accuracy"], "--select-by must be one of auto, mmlu, heldout, loss"),
    (["sweep", "--output_dir", "{out}", "--heter", "maybe"], "--heter must be one of both, true, false, got maybe"),
    (["sweep", "--output_dir", "{out}", "--num_clients", "0"], "--num_clients must be an integer >= 1, got 0"),
    (["flower", "app", "{out}", "--round-timeout", "inf"], "--round-timeout must be a finite number > 0, got inf"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", OTHER_COMMANDS)
def test_other_commands_name_the_flag_and_the_value(tmp_path: Path, argv: list[str], message: str) -> None:
    out = tmp_path / "out"
    line = refused([a.replace("{out}", str(out)) for a in argv])
    assert line.startswith("florist: error: command line: ") and message in line, line
    assert not out.exists()


def test_fifty_thousand_digit_num_examples_names_the_flag(tmp_path: Path) -> None:
    line = refused(["aggregate", "--out", tmp_path / "out", "a", "--num-examples", FIFTY_THOUSAND_DIGITS])
    assert "a: --num-examples value '7777" in line and "(50002 characters) must be from 1 to 2**53" in line
    assert len(line) < 200


def test_argparse_own_errors_are_one_line_too() -> None:
    for argv, message in [
        (["data", "split", "x.jsonl"], "the following arguments are required: --num-clients, --out"),
        (["aggregate", "a"], "the following arguments are required: --out"),
        (["eval"], "the following arguments are required: TARGET"),
    ]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            main(argv)
        line = _one_line(stop.value.code, err.getvalue())
        assert (
            message in line
            and f"(see florist {' '.join(argv[: 2 if argv[0] == 'data' else 1])} --help)" in line
        )


# --- the specs themselves -------------------------------------------------------------------


def test_every_run_setting_is_typed_from_the_dataclass_and_every_range_names_a_field() -> None:
    specs = run_settings()
    assert set(RUN_RANGES) <= set(specs)
    assert specs["num_clients"] == Setting(int, low=1)
    assert specs["local_max_steps"] == Setting(int, optional=True, low=1)
    assert specs["local_ranks"] == Setting(list, item=int, low=1)
    assert specs["lora_target_modules"] == Setting(list, item=str)
    assert specs["client_init"].optional and specs["client_init"].choices == ("shared", "per_client")
    assert RunConfig().validate() == RunConfig()  # the defaults are all valid


def test_hostile_values_are_shown_short() -> None:
    nested: list = []
    nested.append(nested)
    assert show(10**50_000) == "<an integer of over 4,000 digits>"
    assert show(nested) == "[[[[...]]]]"
    assert len(show(["x" * 10_000] * 10_000)) < 100
    with pytest.raises(ConfigError) as e:
        run_settings()["seed"].parse(10**50_000, name="seed", source=file_source("c.yaml"))
    assert str(e.value) == "c.yaml: seed must be an integer >= 0, got <an integer of over 4,000 digits>"


def test_a_number_is_never_a_bool_and_a_bool_never_a_number() -> None:
    for name in ("threshold", "num_clients"):
        for source in (COMMAND_LINE, MAIN_PY, file_source("f.yaml")):
            with pytest.raises(ConfigError):
                run_settings()[name].parse(True, name=name, source=source)
    with pytest.raises(ConfigError):
        run_settings()["heter"].parse(1, name="heter", source=file_source("f.yaml"))


# --- property: any wrong type, through YAML and through main.py --------------------------------


def _finite_number_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


_DICTS = st.dictionaries(st.text(max_size=3), st.integers(-3, 3), min_size=1, max_size=2)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))
_WORDS = ("true", "false", "yes", "no", "y", "n", "on", "off", "1", "0")


def wrong_values(setting: Setting) -> st.SearchStrategy:
    """Values that are not of ``setting``'s type, as YAML and fire can deliver them. Left out:
    what a source may legitimately turn into the type (ints for strings and 0/1 for bools in
    fire, which reads the text "1" as an int; number-spelling strings for floats)."""
    options = [_DICTS, st.booleans() if setting.kind is not bool else st.integers(2, 10**6)]
    if not setting.optional:
        options.append(st.none())
    if setting.kind is int:
        options += [st.text(max_size=8), _FLOATS, st.lists(st.integers(1, 9), min_size=1, max_size=3)]
    elif setting.kind is float:
        not_a_number = st.text(max_size=8).filter(lambda s: not _finite_number_text(s))
        options += [
            not_a_number,
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.lists(st.floats(0, 1), min_size=1, max_size=2),
        ]
    elif setting.kind is bool:
        options += [st.text(max_size=8).filter(lambda s: s.strip().lower() not in _WORDS), _FLOATS]
    elif setting.kind is str:
        options += [_FLOATS, st.lists(st.text(max_size=3), min_size=1, max_size=2)]
        if setting.choices:
            options.append(st.text(max_size=8).filter(lambda s: s not in setting.choices))
    elif setting.kind is list:
        item_wrong = st.booleans() | _FLOATS | _DICTS
        if setting.item is int:
            item_wrong |= st.text(max_size=4).filter(lambda s: not s.strip().lstrip("+-").isdigit())
            options.append(st.text(min_size=1, max_size=8).filter(lambda s: any(c.isalpha() for c in s)))
        options += [_FLOATS, st.just([]), st.lists(item_wrong, min_size=1, max_size=3)]
    return st.one_of(options)


FIELDS = sorted(run_settings())
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(data=st.data())
def test_any_wrong_type_in_a_yaml_config_is_one_line_naming_the_field(
    tmp_path: Path, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(FIELDS), label="field")
    value = data.draw(wrong_values(run_settings()[name]), label="value")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({name: value}))
    line = refused(["run", "--config", config, "--output_dir", tmp_path / "out"])
    assert line.startswith(f"florist: error: {config}: {name} must be "), line
    assert not (tmp_path / "out").exists()


@PROPERTY
@given(data=st.data())
def test_any_wrong_type_through_main_py_is_one_line_naming_the_flag(
    tmp_path: Path, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from([f for f in FIELDS if f not in ("method", "resume")]), label="field")
    value = data.draw(wrong_values(run_settings()[name]), label="value")
    if name == "client_init" and value in ("", "None", "auto"):  # the paper's spellings of "the default"
        return
    line = refused_by_main_py(
        [f"--{name}={value!r}", f"--output_dir={tmp_path / 'out'}"][: 1 if name == "output_dir" else 2]
    )
    assert line.startswith(f"florist: error: main.py: --{name} must be "), line
    assert not (tmp_path / "out").exists()


# --- the real entry points, once each ---------------------------------------------------------------


def test_the_real_entry_points_refuse_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    config = tmp_path / "run.yaml"
    config.write_text("num_clients: '2'\n")
    commands = [
        (
            [sys.executable, "-m", "florist.cli", "run", "--config", str(config)],
            f"{config}: num_clients must be",
        ),
        ([sys.executable, "main.py", "--threshold=None"], "main.py: --threshold must be a finite number"),
    ]
    for argv, message in commands:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
