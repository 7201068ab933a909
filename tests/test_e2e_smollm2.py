"""End to end on the real embedded SmolLM2 with the paper's Dolly split: the federation learns."""

from __future__ import annotations

import json

import pytest

from florist.config import RunConfig
from florist.federation import run_federated


@pytest.mark.slow
def test_florist_on_smollm2_and_dolly_lowers_heldout_loss(tmp_path, dolly_dir, monkeypatch):
    monkeypatch.delenv("FLORIST_MMLU_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray mmlu file in cwd: this test measures held-out loss only
    cfg = RunConfig(
        global_model="smollm2-135m",
        data_path=str(dolly_dir),
        output_dir=str(tmp_path / "out"),
        num_clients=8,
        method="florist",
        threshold=0.9,
        num_communication_rounds=2,
        heter=True,
        local_batch_size=2,
        local_micro_batch_size=2,
        local_max_steps=2,
        local_learning_rate=2e-3,
        max_samples_per_client=4,  # each client's 4 records, 2 per step, in both rounds
        cutoff_len=128,
        eval_samples=24,  # a subset of global_test.json
        device="cpu",
    )
    metrics = run_federated(cfg)

    # the training loss falls: every client sees the same 4 records in both rounds (two per
    # step), so the mean loss over them in round 2 (on the merged base) must be below round 1's
    def mean_loss(r: int) -> float:
        losses = [x for s in metrics["rounds"][r]["client_stats"].values() for x in s["losses"]]
        assert len(losses) == 16
        return sum(losses) / len(losses)

    assert mean_loss(1) < mean_loss(0)

    before, after = metrics["eval_before"]["heldout"], metrics["eval_after"]["heldout"]
    assert before["n_tokens"] == after["n_tokens"] > 0
    assert after["loss"] < before["loss"], (before, after)
    assert "mmlu" not in metrics["eval_after"]
    assert 0 < metrics["eff_total"] and all(0 < sum(r["ranks"].values()) for r in metrics["rounds"])
    assert (
        json.loads((tmp_path / "out" / "metrics.json").read_text())["eval_after"]["heldout"]["loss"]
        == after["loss"]
    )
