"""Real Flower processes on 127.0.0.1: one SuperLink, three SuperNodes, ``flwr run``.

The global adapter of a Flower run must equal (to 1e-5) the one ``florist.federation.run_federated``
produces in process with the same seeds, data and ranks; the bytes that went through Flower's
messages must equal florist's accounting; and a SuperNode killed mid-round must neither hang the
server nor lose what was checkpointed. Every process is torn down at the end, even on failure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_flower_strategy import RANKS, assert_same_adapter, tiny_config, write_tiny_data

from florist.checkpoint import checkpoint_path, load_checkpoint
from florist.federation import run_federated
from florist.flower.app_config import FlowerOptions, run_config_values, write_app_project
from florist.flower.local import LocalFederation
from florist.models import tiny_llama

pytestmark = [pytest.mark.flower, pytest.mark.slow]
# Only a guard against a hang: far above any correct run, however busy the machine.
RUN_TIMEOUT = 3600.0


def start_federation(work: Path, data: Path, extra: dict[int, dict] | None = None) -> LocalFederation:
    """A SuperLink and one SuperNode per client; ``extra``: more node config by partition."""
    fed = LocalFederation(work)
    try:
        fed.start_superlink()
        fed.start_supernodes(
            [
                {"partition-id": k, "num-partitions": len(RANKS), "lora-rank": rank, "data-path": str(data)}
                | (extra or {}).get(k, {})
                for k, rank in enumerate(RANKS)
            ]
        )
    except BaseException:
        fed.close()
        raise
    return fed


def flower_run(fed: LocalFederation, app: Path, cfg, options: FlowerOptions) -> dict:
    outcome = fed.run(app, run_config_values(cfg, options), timeout=RUN_TIMEOUT)
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n{fed.run_logs(outcome.run_id)[-4000:]}"
    return json.loads((Path(cfg.output_dir) / "metrics.json").read_text())


@pytest.mark.parametrize(
    "method, heter", [("florist", True), ("flexlora", True), ("fedit", False), ("rolora", False)]
)
def test_flower_run_equals_in_process_run(flower_federation, method, heter):
    fed, root, data, app = flower_federation
    # Two rounds where the second round's start depends on state the nodes keep between messages
    # (FLoRIST's merged rounds, RoLoRA's alternation); one round for FedIT and FlexLoRA, whose
    # second round on real processes is the same code (their two-round runs are checked in
    # process, tests/test_flower_strategy.py). Every ClientApp message is a fresh process.
    rounds = 2 if method in ("florist", "rolora") else 1
    cfg = tiny_config(data, root / f"inproc-{method}", method, heter=heter, rounds=rounds)
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(cfg, model=model, tokenizer=tokenizer)

    fcfg = tiny_config(data, root / f"flower-{method}", method, heter=heter, rounds=rounds)
    metrics = flower_run(
        fed, app, fcfg, FlowerOptions(round_timeout=RUN_TIMEOUT, node_wait_timeout=RUN_TIMEOUT)
    )

    assert_same_adapter(
        root / f"inproc-{method}" / "adapter", root / f"flower-{method}" / "adapter", atol=1e-5
    )
    if method == "flexlora":  # each client's own truncation too
        for k in range(3):
            assert_same_adapter(
                root / f"inproc-{method}" / "adapter" / "clients" / f"client_{k}",
                root / f"flower-{method}" / "adapter" / "clients" / f"client_{k}",
            )
    assert [r["clients"] for r in metrics["rounds"]] == [r["clients"] for r in expected["rounds"]]
    assert {c: s["rank"] for c, s in metrics["rounds"][0]["client_stats"].items()} == (
        {f"client_{k}": r for k, r in enumerate(RANKS)} if heter else {f"client_{k}": 4 for k in range(3)}
    )
    for ours, theirs in zip(metrics["rounds"], expected["rounds"]):
        # Bytes measured from the ArrayRecords that crossed Flower == florist.comm's accounting.
        wire, comm = ours["wire"]["total"], theirs["communication"]["total"]
        assert wire == {k: comm[k] for k in wire}
        assert ours["wire"]["clients"] == {
            c: {k: v[k] for k in wire} for c, v in theirs["communication"]["clients"].items()
        }
    assert metrics["flower"]["failures"] == []
    assert len(metrics["flower"]["nodes"]) == 3


def test_supernode_killed_mid_round(tmp_path):
    """min-clients=2: round 2 finishes with the two survivors once the SuperLink reports the dead
    node (missed heartbeats), an event, not a timeout: the round timeout is far above any round.
    The checkpoint of round 1 stays valid throughout; the failure is recorded once, with its cause.
    client_2 stalls at the start of round 2 (hold-in-round) until it is killed, so however busy the
    machine, it cannot finish round 2 before the kill."""
    data = write_tiny_data(tmp_path / "data")
    app = write_app_project(tmp_path / "app")
    out = tmp_path / "flower"
    cfg = tiny_config(data, out, "florist", heter=True, min_clients=2)
    options = FlowerOptions(round_timeout=RUN_TIMEOUT, node_wait_timeout=RUN_TIMEOUT)
    hold = {2: {"hold-in-round": 2, "resume-file": str(tmp_path / "never")}}
    with start_federation(tmp_path / "processes", data, hold) as fed:
        run_id = fed.start_run(app, run_config_values(cfg, options))
        deadline = time.monotonic() + RUN_TIMEOUT
        while load_checkpoint(out) is None:  # round 1 done and checkpointed
            assert time.monotonic() < deadline, fed.logs()
            assert fed.run_info(run_id)["status"] != "finished:failed", fed.run_logs(run_id)
            time.sleep(0.5)
        fed.kill(fed.supernodes[2])  # client_2's machine dies as round 2 starts
        assert load_checkpoint(out).completed_round == 1

        outcome = fed.wait(run_id, timeout=RUN_TIMEOUT)
        assert outcome.completed, fed.run_logs(run_id)[-4000:]
        assert fed.superlink.alive()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][0]["clients"] == ["client_0", "client_1", "client_2"]
    assert metrics["rounds"][1]["clients"] == ["client_0", "client_1"]
    (failure,) = metrics["flower"]["failures"]  # once, not also as an anonymous SuperLink node
    assert failure["client"] == "client_2" and failure["round"] == 2, failure
    assert failure["reason"].startswith("no reply from the node: Error: Node Unavailable"), failure
    state = load_checkpoint(out)
    assert state.completed_round == 2 and len(state.merged) == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert checkpoint_path(out).is_dir()
