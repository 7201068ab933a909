"""Issue 22, groups 2, 4 and 6: what florist writes is strict and finite, and no path can trip it.

* Group 2: every JSON florist writes parses with a strict parser (no NaN, Infinity); a figure
  that is not finite is written as null with a note saying why (an infinite epsilon), and a
  noise multiplier so small that epsilon overflows is refused up front, naming the flag.
* Group 4: no tensor holding NaN or Inf is ever written, whichever directory it goes to: the
  checks sit in the writers (PEFT adapters, checkpoints, any safetensors file), and
  ``florist aggregate --method fedex`` refuses a ``base_update`` that overflows float32.
* Group 6: a symlink loop given as an input or output path is one line, exit 2, never
  pathlib's ``RuntimeError: Symlink loop`` traceback.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_aggregate import Q1, _edit_tensors, _key, make_client
from test_settings import refused

from florist.adapters import write_peft_adapter
from florist.aggregation.base import LoraFactors
from florist.checkpoint import CheckpointError, CheckpointState, load_checkpoint, save_checkpoint
from florist.cli import main
from florist.config import RunConfig
from florist.errors import run_cli
from florist.io import NonFiniteTensor, atomic_save_safetensors, atomic_write_json


def _refuse(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


def strict_loads(text: str) -> object:
    """json.loads that refuses NaN, Infinity and -Infinity, as strict parsers (and RFC 8259) do."""
    return json.loads(text, parse_constant=_refuse)


# --- group 2: strict JSON ----------------------------------------------------------------------


def test_non_finite_figures_are_written_as_named_nulls(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    atomic_write_json(
        path,
        {
            "loss": math.nan,
            "gain": -math.inf,
            "curve": [1.0, math.inf, 2.0, math.nan],
            "rows": [{"perplexity": np.float64("inf"), "n": np.int64(3)}],
            "singular_values": torch.tensor([1.0, float("nan")]),
            "epsilon": math.inf,
            "epsilon_note": "the writer's own reason",
            "where": tmp_path,
        },
    )
    got = strict_loads(path.read_text())
    assert got["loss"] is None and got["loss_note"] == "NaN: not a finite number, written as null"
    assert got["gain"] is None and got["gain_note"].startswith("-Infinity")
    assert got["curve"] == [1.0, None, 2.0, None] and got["curve_note"].startswith(
        "entries 1, 3 were not finite"
    )
    assert got["rows"] == [{"perplexity": None, "perplexity_note": got["rows"][0]["perplexity_note"], "n": 3}]
    assert got["singular_values"] == [1.0, None] and "entries 1" in got["singular_values_note"]
    assert got["epsilon"] is None and got["epsilon_note"] == "the writer's own reason"
    assert got["where"] == str(tmp_path)


def _dp_cfg(z: float, rounds: int = 1) -> RunConfig:
    return RunConfig(
        method="fedit",
        dp_clip_norm=1.0,
        dp_noise_multiplier=z,
        num_clients=2,
        num_communication_rounds=rounds,
    )


def test_an_infinite_epsilon_is_a_null_with_its_reason() -> None:
    from florist import privacy

    rounds = [{"clients": ["0", "1"]}, {"clients": ["0"]}]
    report = privacy.privacy_report(_dp_cfg(1e-320), rounds)  # not validated: as if it got past
    assert report["epsilon"] is None and report["epsilon_per_round"] == [None, None]
    assert "no privacy guarantee" in report["epsilon_note"] and "1e-320" in report["epsilon_note"]
    entry = privacy.round_privacy(_dp_cfg(1e-320), rounds)
    assert entry["epsilon"] is None and entry["epsilon_note"] == report["epsilon_note"]
    finite = privacy.privacy_report(_dp_cfg(1.0), rounds)
    assert math.isfinite(finite["epsilon"]) and "epsilon_note" not in finite
    strict_loads(json.dumps(report, allow_nan=False))


def test_noise_so_small_that_epsilon_overflows_is_refused_naming_the_flag() -> None:
    with pytest.raises(
        ValueError, match=r"--dp_noise_multiplier 1e-200 is too small: epsilon would be infinite after 3"
    ):
        _dp_cfg(1e-200, rounds=3).validate()
    _dp_cfg(1e-100, rounds=3).validate()  # tiny, but its epsilon is finite: allowed, and reported


def _write_dolly(path: Path, n: int = 48) -> Path:
    lines = [
        json.dumps({"instruction": f"Name item {i}.", "context": "", "response": f"Item {i} is {i % 7}.",
                    "category": ("open_qa", "brainstorming", "classification")[i % 3]})
        for i in range(n)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


TINY = ["--num_communication_rounds", "1", "--local_batch_size", "2", "--local_micro_batch_size", "2",
        "--local_max_steps", "1", "--cutoff_len", "256", "--lora_r", "2", "--lora_alpha", "4",
        "--precision", "fp32", "--device", "cpu", "--eval_samples", "2"]  # fmt: skip


def test_every_json_a_split_run_eval_and_sweep_writes_is_strict(
    model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FLORIST_PROGRESS", "0")
    data = tmp_path / "data"
    source = _write_dolly(tmp_path / "dolly.jsonl")
    commands = [
        ["data", "split", source, "--num-clients", "2", "--out", data, "--mode", "iid", "--test-per-label", "1"],
        ["run", "--global_model", model_dir, "--data_path", data, "--num_clients", "2", "--method", "fedit",
         "--output_dir", tmp_path / "run", "--dp_clip_norm", "1", "--dp_noise_multiplier", "1", *TINY],
        ["eval", tmp_path / "run", "--out", tmp_path / "eval.json", "--max_heldout", "2"],
        ["sweep", "--global_model", model_dir, "--data_path", data, "--num_clients", "2", "--methods", "fedit,florist",
         "--thresholds", "0.9", "--heter", "false", "--no-report", "--output_dir", tmp_path / "sweep", *TINY],
    ]  # fmt: skip
    for argv in commands:
        assert main([str(a) for a in argv]) == 0, argv
    written = sorted(tmp_path.rglob("*.json"))
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"data/2/split.json", "run/metrics.json", "eval.json", "sweep/sweep.json"} <= names, names
    assert any(n.startswith("run/checkpoint/") for n in names), names
    for path in written:
        if path != source:
            strict_loads(path.read_text())
    metrics = strict_loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["privacy"]["epsilon"])


# --- group 4: no non-finite tensor is ever written ------------------------------------------------


def test_fedex_base_update_that_overflows_float32_is_refused(tmp_path: Path) -> None:
    """Finite uploads whose FedEx residual leaves float32: once written as an Inf lora_B into
    OUT/base_update/ while the global adapter was checked."""
    dirs = [tmp_path / "site_a", tmp_path / "site_b"]
    for k, d in enumerate(dirs):
        make_client(d, 4, seed=30 + k, num_examples=4)
    out = tmp_path / "out"
    _edit_tensors(dirs[1], lambda t: t[_key(Q1, "B")].fill_(1e38))
    assert main(["aggregate", "--method", "fedex", "--out", str(out), *map(str, dirs)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _edit_tensors(dirs[1], lambda t: t[_key(Q1, "B")].fill_(3e38))  # s_k B_k = 6e38 in the residual
    line = refused(["aggregate", "--method", "fedex", "--overwrite", "--out", out, *dirs])
    assert f"module '{Q1}': the fedex base_update's lora_B overflows float32" in line, line
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_the_adapter_writer_checks_what_it_writes(tmp_path: Path) -> None:
    A, B = torch.ones(2, 8, dtype=torch.float64), torch.ones(6, 2, dtype=torch.float64)
    for bad, problem in [
        (1e39, r"lora_B overflows float32 \(a value beyond 3.4e\+38\)"),
        (math.nan, "lora_B contains NaN or Inf"),
    ]:
        adapter = {"layer.q_proj": LoraFactors(A=A, B=B * bad, scaling=1.0)}
        with pytest.raises(ValueError, match=f"module 'layer.q_proj': {problem}; refusing to write it"):
            write_peft_adapter(tmp_path / "adapter", adapter)
        assert not (tmp_path / "adapter").exists()
    with pytest.raises(NonFiniteTensor, match=r"x.safetensors: tensor 'w' contains NaN or Inf"):
        atomic_save_safetensors(tmp_path / "x.safetensors", {"w": torch.tensor([0.0, math.inf])})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_is_never_replaced_by_a_non_finite_one(tmp_path: Path) -> None:
    good = {"layer.q_proj": LoraFactors(A=torch.ones(2, 4), B=torch.ones(3, 2), scaling=2.0)}
    save_checkpoint(
        tmp_path, CheckpointState(completed_round=1, metrics={"loss": 1.0}, config={}, global_adapter=good)
    )
    files = {p: p.read_bytes() for p in (tmp_path / "checkpoint").rglob("*") if p.is_file()}
    poisoned = {"layer.q_proj": LoraFactors(A=torch.ones(2, 4), B=torch.full((3, 2), math.inf), scaling=2.0)}
    for state in (
        CheckpointState(completed_round=2, metrics={}, config={}, global_adapter=poisoned),
        CheckpointState(completed_round=2, metrics={}, config={}, merged=[good, poisoned]),
        CheckpointState(
            completed_round=2, metrics={}, config={}, global_adapter=good, client_state={"c0": poisoned}
        ),
    ):
        with pytest.raises(
            CheckpointError, match=r"not saving round 2: .*module 'layer.q_proj', has NaN or Inf in B"
        ):
            save_checkpoint(tmp_path, state)
        assert {p: p.read_bytes() for p in (tmp_path / "checkpoint").rglob("*") if p.is_file()} == files
    assert load_checkpoint(tmp_path).completed_round == 1


# --- group 6: symlink loops -----------------------------------------------------------------------


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    return tmp_path / "loop_a"


def test_a_symlink_loop_anywhere_is_one_line(tmp_path: Path, loop: Path, model_dir: Path) -> None:
    site = tmp_path / "site"
    make_client(site, 2, seed=1, num_examples=3)
    source = _write_dolly(tmp_path / "dolly.jsonl")
    cases = [
        (["aggregate", "--method", "fedit", "--out", tmp_path / "out", site, loop], f"client directory {loop}: cannot resolve the path (a symlink loop)"),
        (["aggregate", "--method", "fedit", "--out", loop, site], f"--out {loop}: cannot resolve the path (a symlink loop)"),
        (["run", "--output_dir", loop, "--global_model", model_dir], f"output directory {loop}: cannot resolve the path (a symlink loop)"),
        (["run", "--config", loop], f"{loop}: cannot read YAML config"),
        (["data", "split", source, "--num-clients", "2", "--out", loop], f"--out {loop}: cannot resolve the path (a symlink loop)"),
        (["eval", "smollm2-135m", "--heldout", source, "--out", loop], f"--out {loop}: cannot resolve the path (a symlink loop)"),
    ]  # fmt: skip
    for argv, message in cases:
        assert message in refused(argv, trap=False), argv  # the run's output lock is in run_federated
    assert loop.is_symlink() and not (tmp_path / "out").exists()


def test_a_symlink_loop_resolved_anywhere_else_is_one_line_too(capsys) -> None:
    def resolve_a_loop() -> None:
        raise RuntimeError("Symlink loop from '/x/a'")

    assert run_cli(resolve_a_loop) == 2
    assert (
        capsys.readouterr().err
        == "florist: error: Symlink loop from '/x/a' (a symlink that leads back to itself)\n"
    )

    def other_bug() -> None:
        raise RuntimeError("a bug, not bad input")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(other_bug)


def test_main_py_resume_from_a_loop_is_one_line(tmp_path: Path, loop: Path) -> None:
    from test_settings import refused_by_main_py

    line = refused_by_main_py([f"--output_dir={tmp_path / 'out'}", f"--resume_from_checkpoint={loop}"])
    assert f"--resume_from_checkpoint {loop}: cannot resolve the path (a symlink loop)" in line
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
