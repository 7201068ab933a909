"""Bad data and configuration through the real command lines: one line, exit code 2, nothing written.

Every case runs ``florist run`` (in process, through ``florist.cli.main``) on a tiny saved model
and a tiny data set in the paper's layout with exactly one thing wrong. The run must stop before
it creates anything: stderr holds exactly one ``florist: error:`` line (no traceback) naming what
is wrong and where, the exit code is 2, and ``output_dir`` does not exist afterwards. The paper's
``python main.py`` is checked the same way in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import HANG_GUARD

from florist.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE_FLAGS = [
    "--num_clients", "3", "--num_communication_rounds", "1", "--local_batch_size", "2",
    "--local_micro_batch_size", "2", "--local_max_steps", "1", "--cutoff_len", "64", "--lora_r", "2",
    "--lora_alpha", "4", "--evaluate", "False", "--precision", "fp32", "--device", "cpu",
]  # fmt: skip


def client_file(data: Path, k: int) -> Path:
    return data / "3" / f"local_training_{k}.json"


def drop_field(data: Path) -> None:
    records = json.loads(client_file(data, 0).read_text())
    del records[3]["response"]
    client_file(data, 0).write_text(json.dumps(records))


def drop_test_field(data: Path) -> None:
    path = data / "3" / "global_test.json"
    records = json.loads(path.read_text())
    del records[2]["response"]
    path.write_text(json.dumps(records))


def broken_jsonl(data: Path) -> None:
    records = json.loads(client_file(data, 2).read_text())
    lines = [json.dumps(r) for r in records]
    lines[1] = lines[1][:-5]  # the second line is cut short
    client_file(data, 2).write_text("\n".join(lines) + "\n")


# case -> (how the good data set is broken, extra flags, texts the error must contain)
# "{file k}" in a text stands for client k's file path, "{data}" for the data directory.
CASES: dict[str, tuple[Callable[[Path], None], list[str], list[str]]] = {
    "malformed JSON": (
        lambda d: client_file(d, 1).write_text(
            '[{"instruction": "a", "context": "", "response": "b"},\n {"instr'
        ),
        [],
        ["{file 1}", "malformed JSON at line 2"],
    ),
    "malformed JSONL": (broken_jsonl, [], ["{file 2}", "line 2 (record 1): malformed JSON line"]),
    "missing field": (drop_field, [], ["{file 0}", "record 3: missing field 'response'"]),
    # once "record: missing field 'response'", naming neither the file nor the record
    "missing field in global_test.json": (
        drop_test_field,
        ["--evaluate", "True"],
        ["{data}/3/global_test.json: record 2: missing field 'response'"],
    ),
    "deeply nested client file": (  # once a RecursionError traceback
        lambda d: client_file(d, 1).write_text("[" * 100_000),
        [],
        ["{file 1}", "JSON nested too deeply"],
    ),
    "deeply nested JSON line": (
        lambda d: client_file(d, 1).write_text(
            '{"instruction": "a", "response": "b"}\n' + '{"a": ' * 100_000 + "\n"
        ),
        [],
        ["{file 1}", "line 2 (record 1): JSON nested too deeply"],
    ),
    "empty client file": (lambda d: client_file(d, 1).write_text(""), [], ["{file 1}", "the file is empty"]),
    "client file with no records": (
        lambda d: client_file(d, 2).write_text("[]"),
        [],
        ["{file 2}", "no records"],
    ),
    "num_clients has no split": (
        lambda d: None,
        ["--num_clients", "4"],
        ["{data}/4", "has splits for 3 clients"],
    ),
    "client file missing": (
        lambda d: client_file(d, 1).unlink(),
        [],
        ["{data}/3", "missing local_training_1.json for num_clients=3"],
    ),
    "more client files than clients": (
        lambda d: client_file(d, 3).write_text(client_file(d, 0).read_text()),
        [],
        ["{data}/3", "local_training_3.json beyond the first 3"],
    ),
    "tau above 1": (
        lambda d: None,
        ["--threshold", "1.5"],
        ["command line: --threshold must be a finite number in (0, 1], got 1.5"],
    ),
    "tau zero": (
        lambda d: None,
        ["--threshold", "0"],
        ["--threshold must be a finite number in (0, 1], got 0"],
    ),
    "negative tau": (
        lambda d: None,
        ["--threshold", "-0.2"],
        ["--threshold must be a finite number in (0, 1], got -0.2"],
    ),
    "rank zero": (
        lambda d: None,
        ["--lora_r", "0"],
        ["command line: --lora_r must be an integer >= 1, got 0"],
    ),
    "negative rank": (lambda d: None, ["--lora_r", "-4"], ["--lora_r must be an integer >= 1, got -4"]),
    "a heterogeneous rank zero": (
        lambda d: None,
        ["--heter", "True", "--local_ranks", "4,0,2"],
        ["--local_ranks must be a comma-separated list of integers >= 1, got 4,0,2"],
    ),
    "target module absent": (lambda d: None, ["--lora_target_modules", "nope_proj"], ["nope_proj"]),
    # a typo in one of several targets must not silently adapt only the others
    "one target module absent": (lambda d: None, ["--lora_target_modules", "q_proj,v_prj"], ["v_prj"]),
    "unknown method": (lambda d: None, ["--method", "fedavg"], ["--method must be one of", "got fedavg"]),
}


def single_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("florist: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case, model_dir, federated_data, tmp_path, capsys
) -> None:
    breaker, flags, texts = CASES[case]
    data = federated_data(3)
    breaker(data)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(
        [
            "run",
            "--global_model",
            str(model_dir),
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            *BASE_FLAGS,
            *flags,
        ]
    )
    line = single_error_line(capsys.readouterr().err)
    assert code == 2
    for text in texts:
        text = text.replace("{data}", str(data))
        for k in range(4):
            text = text.replace(f"{{file {k}}}", str(client_file(data, k)))
        assert text in line, (text, line)
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_unknown_setting_in_a_yaml_config(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("num_clients: 3\nlora_rank: 8\n")  # the field is lora_r
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--output_dir", str(out)]) == 2
    line = single_error_line(capsys.readouterr().err)
    assert str(config) in line and "unknown setting(s) lora_rank" in line
    assert not out.exists()


def test_paper_main_py_with_a_bad_threshold(tmp_path: Path, federated_data) -> None:
    data, out = federated_data(3), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "main.py", "--data_path", str(data), "--output_dir", str(out), "--num_clients", "3",
         "--florist", "True", "--threshold", "1.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip()
        == "florist: error: main.py: --threshold must be a finite number in (0, 1], got 1.5"
    )
    assert proc.stdout == "" and not out.exists()
