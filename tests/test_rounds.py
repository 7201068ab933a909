"""The round engine (florist.rounds): the sweep closes a round exactly as `florist run` does, for
every registered method, with and without local DP; the engine's plan reads only declarations."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

from florist import privacy
from florist.adapters import write_peft_adapter
from florist.aggregation import AGGREGATORS
from florist.federation import ClientSetup, run_federated
from florist.models import tiny_llama
from florist.rounds import Method, ServerState, sample_clients
from florist.sweep import close_configuration, configured, run_sweep, train_group, training_groups

TIMINGS = ("seconds", "aggregation_seconds")


def without_timings(entry: dict) -> dict:
    """A round record with its wall-clock figures taken out: everything else must be identical."""
    entry = copy.deepcopy(entry)
    for key in TIMINGS:
        entry.pop(key)
    for stats in entry["client_stats"].values():
        stats.pop("seconds")
    return entry


def adapter_bytes(directory: Path) -> bytes:
    return (directory / "adapter_model.safetensors").read_bytes()


def method_config(data: Path, out: Path, method: str, dp: bool):
    # C small enough that every upload is clipped; the noise itself is switched off by the test.
    privacy_settings = dict(dp_clip_norm=1e-3, dp_noise_multiplier=1.0, dp_delta=1e-5) if dp else {}
    return tiny_run_config(data, out, method=method, seed=7, threshold=0.9, **privacy_settings)


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "local-dp-z0"])
def test_the_sweep_closes_round_one_as_florist_run_does_for_every_method(
    dp, tmp_path, federated_data, monkeypatch
):
    """For every registered method (RoLoRA and FedSA included): the sweep's path (its training
    group trained once, then the configuration's close) gives the global adapter and the round
    record of a one-round `florist run` on the same uploads, bit for bit. Under local DP the noise
    is switched off in both, so the clipped uploads and the released view must agree exactly."""
    if dp:
        monkeypatch.setattr(privacy, "add_noise_", lambda parts, std, generator: None)
    data = federated_data(3)
    assert set(AGGREGATORS) >= {"rolora", "fedsa"} and len(AGGREGATORS) == 11
    for method in sorted(AGGREGATORS):
        cfg = method_config(data, tmp_path / method / "run", method, dp)
        metrics = run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])

        setup = ClientSetup.load(cfg, *tiny_llama(seed=0))
        (group,) = training_groups([method])
        trained = train_group(setup, cfg, group, keep_start=dp, progress=False)
        gcfg = configured(dataclasses.replace(cfg, client_init=group.client_init), method, 0.9)
        outcome, server = close_configuration(gcfg, setup.host.module_shapes, trained)

        assert without_timings(outcome.entry) == without_timings(metrics["rounds"][0]), method
        assert ("privacy" in outcome.entry) == dp, method
        write_peft_adapter(tmp_path / method / "sweep", server.final_adapter(), base_model_name_or_path=cfg.global_model,
                           target_modules=list(cfg.lora_target_modules))  # fmt: skip
        assert adapter_bytes(tmp_path / method / "sweep") == adapter_bytes(
            tmp_path / method / "run" / "adapter"
        ), method


def test_run_sweep_writes_each_methods_run_adapter(tmp_path, federated_data):
    """`florist sweep` itself (every method, one training per group, --save-adapters) writes for
    each method the very adapter a one-round `florist run` writes, and rows with its round's
    ranks, Eff and bytes."""
    data = federated_data(3)
    cfg = tiny_run_config(data, tmp_path / "sweep", seed=7)
    sweep = run_sweep(cfg, methods="all", thresholds=[0.9], heter=(False,), save_adapters=True,
                      model_factory=lambda: tiny_llama(seed=0), report=False, progress=False)  # fmt: skip
    rows = {r["method"]: r for r in sweep["settings"][0]["rows"]}
    assert len(rows) == 10  # every method but zero-padding (FedIT's rule for one rank)
    for method, row in rows.items():
        run_cfg = method_config(data, tmp_path / "runs" / method, method, dp=False)
        metrics = run_federated(run_cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
        entry = metrics["rounds"][0]
        saved = (
            tmp_path
            / "sweep"
            / "adapters"
            / "homogeneous"
            / (f"{method}_tau0.90" if method == "florist" else method)
        )
        assert adapter_bytes(saved) == adapter_bytes(tmp_path / "runs" / method / "adapter"), method
        assert (row["ranks"], row["eff"]) == (entry["ranks"], entry["eff"]), method
        assert row["communication"]["total"] == entry["communication"]["total"], method


def test_the_plan_reads_the_declarations() -> None:
    """FFA's frozen A is one draw at r_max whose rows every client shares; RoLoRA freezes B in odd
    rounds and starts from its own shared start; merge methods always start fresh."""
    shapes = {"m.q": (6, 5), "m.v": (4, 5)}
    cfg = tiny_run_config(Path("."), Path("."), heter=True, local_ranks=[4, 2, 1])
    ffa = Method(dataclasses.replace(cfg, method="ffa"), shapes)
    tasks = ffa.plan(1)
    assert [t.rank for t in tasks] == [4, 2, 1] and ffa.r_max == 4
    for t in tasks:
        for name, A in t.frozen_A.items():
            assert torch.equal(A, ffa.frozen_A[name][: t.rank])
        assert t.upload == ("B",) and t.freeze == () and t.init_rank == 4
    rolora = Method(dataclasses.replace(cfg, method="rolora", heter=False, lora_r=2), shapes)
    odd, even = rolora.task(1, 0), rolora.task(2, 0)
    assert (odd.freeze, odd.upload, even.freeze, even.upload) == (("B",), ("A",), ("A",), ("B",))
    start = rolora.start(odd, None, None, fresh=lambda task: pytest.fail("no fresh draw needed"))
    assert start is not None and all(float(f.B.abs().sum()) > 0 for f in start.values())
    florist = Method(dataclasses.replace(cfg, method="florist"), shapes)
    assert florist.start(florist.task(2, 0), {"m.q": None}, None, fresh=None) is None  # type: ignore[arg-type,dict-item]
    assert ServerState().continuation("client_0") is None
    assert sample_clients(
        dataclasses.replace(cfg, num_clients=10, client_selection_frac=0.3), 2
    ) == sample_clients(dataclasses.replace(cfg, num_clients=10, client_selection_frac=0.3), 2)
