"""Checkpoints and resume: a run killed or failed after a round continues to a bit-identical result.

The killed run is a real subprocess, SIGKILLed once its round-1 checkpoint appears; the failed
one raises inside round 3. Both are resumed with ``resume=True`` on a fresh base model and must
produce exactly the adapter file and per-round metrics of an uninterrupted run with the same seeds.
A checkpoint with one flipped byte is refused with an error naming the damaged file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_GUARD, tiny_run_config

import florist.training
from florist.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from florist.config import ConfigError, RunConfig
from florist.federation import run_federated
from florist.models import tiny_llama

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import florist.training
from florist.config import RunConfig
from florist.federation import run_federated
from florist.models import tiny_llama

cfg = RunConfig(**json.loads(sys.argv[1]))
train = florist.training.LocalTrainer.train

def slow(self, **kwargs):
    while kwargs["round_index"] >= 2:  # round 1 is checkpointed; we hang until the parent kills us
        time.sleep(1)
    return train(self, **kwargs)

florist.training.LocalTrainer.train = slow
model, tokenizer = tiny_llama(seed=0)
run_federated(cfg, model=model, tokenizer=tokenizer)
"""


def make_cfg(data: Path, out: Path, method: str, heter: bool = False, **overrides) -> RunConfig:
    settings = dict(
        method=method, heter=heter, local_ranks=[4, 2, 1], threshold=0.9, num_communication_rounds=3
    )
    # Dropout on: its randomness must be replayed too.
    small = dict(lora_r=2, lora_alpha=4, local_batch_size=2, lora_dropout=0.05, seed=3)
    return tiny_run_config(data, out, **(settings | small | overrides))


def run(cfg: RunConfig) -> dict:
    model, tokenizer = tiny_llama(seed=0)
    return run_federated(cfg, model=model, tokenizer=tokenizer)


def strip_times(rounds: list[dict]) -> list[dict]:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k not in ("seconds", "aggregation_seconds")}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    return clean(json.loads(json.dumps(rounds)))


def assert_same_result(a: Path, b: Path) -> None:
    weights = "adapter/adapter_model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert json.loads((a / "adapter/adapter_config.json").read_text()) == json.loads(
        (b / "adapter/adapter_config.json").read_text()
    )
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert strip_times(ma["rounds"]) == strip_times(mb["rounds"])
    assert ma["eff_total"] == mb["eff_total"] and ma["communication_total"] == mb["communication_total"]


def flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_sigkill_after_round_one_then_resume_is_bit_identical(tmp_path, federated_data):
    data = federated_data(3)
    cfg = make_cfg(data, tmp_path / "killed", "florist", heter=True)
    env = {**os.environ, "FLORIST_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg.to_dict())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        state = checkpoint_path(cfg.output_dir) / "state.json"
        deadline = time.monotonic() + HANG_GUARD
        while not state.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, f"no round-1 checkpoint within {HANG_GUARD} s"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=HANG_GUARD)
    killed = Path(cfg.output_dir)
    assert not (killed / "metrics.json").exists() and not (killed / "adapter").exists()
    assert load_checkpoint(killed).completed_round == 1

    resumed = run(dataclasses.replace(cfg, resume=True))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    run(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    assert_same_result(killed, tmp_path / "whole")


@pytest.mark.parametrize(("method", "heter"), [("fedit", False), ("flexlora", True)])
def test_failure_in_round_three_then_resume(method, heter, tmp_path, federated_data, monkeypatch, capsys):
    data = federated_data(3)
    cfg = make_cfg(data, tmp_path / "failed", method, heter=heter)
    train = florist.training.LocalTrainer.train

    def failing(self, **kwargs):
        if kwargs["round_index"] == 3:
            raise RuntimeError("injected failure")
        return train(self, **kwargs)

    monkeypatch.setattr(florist.training.LocalTrainer, "train", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg)
    monkeypatch.setattr(florist.training.LocalTrainer, "train", train)
    assert load_checkpoint(cfg.output_dir).completed_round == 2

    # a damaged copy of the checkpoint is refused, naming the file; the CLI says so in one line
    corrupt = tmp_path / "corrupt"
    shutil.copytree(cfg.output_dir, corrupt)
    damaged = corrupt / "checkpoint" / "server.safetensors"
    flip_byte(damaged)
    with pytest.raises(CheckpointError, match=r"server\.safetensors: checksum mismatch"):
        run(dataclasses.replace(cfg, output_dir=str(corrupt), resume=True))
    from florist.cli import main

    code = main(
        [
            "run",
            "--output_dir",
            str(corrupt),
            "--data_path",
            str(data),
            "--num_clients",
            "3",
            "--resume",
            "--method",
            method,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(damaged) in err and len(err.strip().splitlines()) == 1
    # so is a damaged state.json, and a resume with a setting that changes the rounds
    flip_byte(damaged)  # repaired
    assert load_checkpoint(corrupt).completed_round == 2
    flip_byte(corrupt / "checkpoint" / "state.json", offset=10)
    with pytest.raises(CheckpointError, match=r"state\.json: checksum mismatch"):
        load_checkpoint(corrupt)
    with pytest.raises(ConfigError, match="local_learning_rate"):
        run(dataclasses.replace(cfg, resume=True, local_learning_rate=0.1))

    run(dataclasses.replace(cfg, resume=True))
    run(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")))
    assert_same_result(Path(cfg.output_dir), tmp_path / "whole")
    if heter:
        for k in range(3):
            client = f"adapter/clients/client_{k}/adapter_model.safetensors"
            assert (Path(cfg.output_dir) / client).read_bytes() == (tmp_path / "whole" / client).read_bytes()


def test_kill_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path, federated_data):
    """atomic_directory parks the old checkpoint before moving the new one in; a kill in between
    leaves only the parked copy, which load_checkpoint still finds and verifies."""
    data = federated_data(3)
    cfg = make_cfg(data, tmp_path / "out", "florist", num_communication_rounds=1)
    run(cfg)
    ckpt = checkpoint_path(cfg.output_dir)
    parked = ckpt.with_name(".checkpoint.old-12345")
    os.replace(ckpt, parked)
    state = load_checkpoint(cfg.output_dir)
    assert state is not None and state.completed_round == 1 and len(state.merged) == 1
    assert load_checkpoint(tmp_path / "nothing-here") is None
