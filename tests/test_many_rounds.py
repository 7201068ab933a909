"""Many rounds (issue 20): the learning rate over rounds, evaluation every N rounds, cumulative
bytes per client, and Flower = in-process for an annealed run with partial participation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

import florist.rounds
import florist.training
from florist.cli import main
from florist.config import ConfigError
from florist.federation import run_federated
from florist.models import tiny_llama
from florist.rounds import round_learning_rate


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # round r of R = 4 at t = r / R, from 1e-3 down to 1e-4 (FlowerTune's cosine_annealing)
        ("constant", [1e-3, 1e-3, 1e-3, 1e-3]),
        ("linear", [1e-4 + 9e-4 * (1 - r / 4) for r in (1, 2, 3, 4)]),
        ("cosine", [1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * r / 4)) for r in (1, 2, 3, 4)]),
    ],
)
def test_the_schedules_give_the_documented_rate_at_each_round(schedule, expected):
    cfg = tiny_run_config(Path("."), Path("."), num_communication_rounds=4, local_learning_rate=1e-3,
                          lr_schedule=schedule, lr_min=1e-4)  # fmt: skip
    got = [round_learning_rate(cfg, r) for r in (1, 2, 3, 4)]
    assert got == pytest.approx(expected, rel=1e-12)
    if schedule == "cosine":  # by hand: 0.5 (1 + cos(pi/4)) = 0.8536; the last round reaches lr_min
        assert got[0] == pytest.approx(1e-4 + 9e-4 * 0.853553, rel=1e-5) and got[3] == pytest.approx(1e-4)


def test_a_run_trains_each_round_at_its_rate_and_records_it(tmp_path, federated_data, monkeypatch):
    """The optimizer of every client in round r starts at round r's rate; constant within the
    round with local_lr_scheduler constant; each round's record holds it."""
    seen: list[tuple[int, list[float]]] = []
    step = florist.training.torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append((len(seen), [g["lr"] for g in self.param_groups]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(florist.training.torch.optim.AdamW, "step", spy)
    cfg = tiny_run_config(federated_data(3), tmp_path / "run", method="fedit", num_communication_rounds=3,
                          local_max_steps=2, lr_schedule="cosine", lr_min=0.01, local_learning_rate=0.05,
                          local_lr_scheduler="constant")  # fmt: skip
    metrics = run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    rates = [round_learning_rate(cfg, r) for r in (1, 2, 3)]
    assert [r["learning_rate"] for r in metrics["rounds"]] == rates
    # 3 clients x 2 steps per round, every step at the round's rate (constant within it)
    assert [lrs[0] for _, lrs in seen] == [rate for rate in rates for _ in range(6)]


def test_cumulative_bytes_per_client_add_up_over_rounds(tmp_path, federated_data):
    cfg = tiny_run_config(federated_data(4), tmp_path / "run", method="florist", num_clients=4,
                          num_communication_rounds=3, client_selection_frac=0.5)  # fmt: skip
    metrics = run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    total = {f"client_{k}": {"bytes_up": 0, "bytes_down": 0} for k in range(4)}
    for entry in metrics["rounds"]:
        assert len(entry["clients"]) == 2  # half of the clients each round
        for cid, c in entry["communication"]["clients"].items():
            total[cid]["bytes_up"] += c["bytes_up"]
            total[cid]["bytes_down"] += c["bytes_down"]
        cumulative = entry["cumulative"]
        assert {cid: c for cid, c in total.items() if c["bytes_up"]} == cumulative["clients"]
        for d in ("up", "down"):
            assert cumulative[f"bytes_{d}_per_client"] == sum(c[f"bytes_{d}"] for c in total.values()) / 4
    assert (
        metrics["rounds"][-1]["cumulative"]["bytes_down_per_client"] * 4
        == metrics["communication_total"]["bytes_down"]
    )


def test_every_round_hands_freed_memory_back(tmp_path, federated_data, monkeypatch):
    """Each round ends by returning freed heap pages to the OS: RSS between rounds is what is live."""
    calls = []
    release = florist.rounds.release_free_memory
    monkeypatch.setattr(florist.rounds, "release_free_memory", lambda: calls.append(1) or release())
    cfg = tiny_run_config(federated_data(2), tmp_path / "run", method="florist", num_clients=2,
                          num_communication_rounds=3)  # fmt: skip
    run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    assert len(calls) == 3


def test_the_merged_history_lives_in_the_checkpoint_not_in_memory(tmp_path, federated_data, monkeypatch):
    """After each round the server holds no merged adapter in memory: each is read back from the
    checkpoint (bit for bit what was folded), whose earlier rounds' files are linked, not rewritten."""
    folded, seen = [], []
    broadcast = florist.rounds.ServerState.broadcast

    def spy_broadcast(self, result):
        broadcast(self, result)
        folded.append({n: (f.A.clone(), f.B.clone()) for n, f in self.merged[-1].items()})

    record = florist.rounds.RoundRecorder.record

    def spy_record(self, entry, server):
        record(self, entry, server)
        first = tmp_path / "run" / "checkpoint" / "merged" / "round_0001.safetensors"
        seen.append((server.merged.in_memory(), list(server.merged), first.stat().st_ino))

    monkeypatch.setattr(florist.rounds.ServerState, "broadcast", spy_broadcast)
    monkeypatch.setattr(florist.rounds.RoundRecorder, "record", spy_record)
    cfg = tiny_run_config(federated_data(2), tmp_path / "run", method="florist", num_clients=2,
                          num_communication_rounds=3)  # fmt: skip
    run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    assert len(seen) == 3
    for rnd, (held, history, _) in enumerate(seen, 1):
        assert held == [] and len(history) == rnd
        for adapter, kept in zip(history, folded):
            assert all(f.A.dtype == torch.float32 for f in adapter.values())
            assert all(
                torch.equal(f.A, kept[n][0]) and torch.equal(f.B, kept[n][1]) for n, f in adapter.items()
            )
    assert len({inode for *_, inode in seen}) == 1  # round 1's file, written once


@pytest.mark.skipif(
    not Path("/proc/self/statm").exists() or not florist.rounds._malloc_trim(), reason="glibc on Linux"
)
def test_release_free_memory_returns_the_heap_holes_glibc_keeps():
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    big = bytearray(16 << 20)  # freeing a 16 MB mmapped block raises glibc's mmap threshold to it,
    del big  # so the 1 MB blocks below come from the heap
    blocks = [bytearray(1 << 20) for _ in range(256)]
    for i in range(0, len(blocks) - 1, 2):  # holes in the middle of the heap: not trimmed on free
        blocks[i] = None
    before = rss()
    florist.rounds.release_free_memory()
    assert before - rss() > 64 << 20  # of the 127 MB freed in holes
    del blocks


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_eval_every_records_match_florist_eval_of_that_rounds_adapter(
    method, tmp_path, federated_data, model_dir
):
    """With eval_every 1 and save_every 1, each round's recorded held-out loss is what `florist
    eval` says of the global adapter written after that round (rounds/round_<r>/); with
    eval_every_samples 2, of its first 2 records before the last round and of all at the last."""
    data = federated_data(3)
    cfg = tiny_run_config(data, tmp_path / "run", global_model=str(model_dir), method=method, evaluate=True,
                          num_communication_rounds=2, eval_every=1, eval_every_samples=2, save_every=1,
                          cutoff_len=256)  # fmt: skip
    from florist.models import load_model

    metrics = run_federated(cfg, model=load_model(str(model_dir), device="cpu")[0],
                            tokenizer=load_model(str(model_dir), device="cpu")[1])  # fmt: skip
    heldout = data / "3" / "global_test.json"
    for entry in metrics["rounds"]:
        adapter = tmp_path / "run" / "rounds" / f"round_{entry['round']:04d}"
        out = tmp_path / f"eval_{entry['round']}.json"
        argv = ["eval", str(adapter), "--heldout", str(heldout), "--out", str(out), "--cutoff_len", "256"]
        assert main(argv + (["--max_heldout", "2"] if entry["round"] < 2 else [])) == 0
        evaluated = json.loads(out.read_text())["heldout"]
        assert entry["eval"]["heldout"]["loss"] == pytest.approx(evaluated["loss"], rel=1e-4), entry["round"]
        assert entry["eval"]["heldout"]["n_tokens"] == evaluated["n_tokens"]
    indices = [entry["eval"]["heldout"]["records"]["index"] for entry in metrics["rounds"]]
    # records whose response the tokenizer cuts away entirely are not scored, in both
    assert indices[0] == [i for i in indices[1] if i < 2] and indices[1][-1] >= 2
    assert metrics["eval_after"] == metrics["rounds"][-1]["eval"]  # not evaluated twice
    assert metrics["rounds"][0]["eval"]["heldout"]["loss"] != metrics["rounds"][1]["eval"]["heldout"]["loss"]


def test_an_annealed_run_cannot_be_resumed_with_more_rounds(tmp_path, federated_data):
    cfg = tiny_run_config(federated_data(3), tmp_path / "run", method="fedit", num_communication_rounds=1,
                          lr_schedule="cosine")  # fmt: skip
    run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    longer = tiny_run_config(federated_data(3), tmp_path / "run", method="fedit", num_communication_rounds=2,
                             lr_schedule="cosine", resume=True)  # fmt: skip
    with pytest.raises(ConfigError, match="cannot resume, setting 'num_communication_rounds' was 1"):
        run_federated(longer, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("method", ["florist", "fedit"])
def test_flower_equals_in_process_for_a_cosine_run_with_partial_participation(method, tmp_path):
    """Three rounds, two of three clients a round, the rate annealed by a cosine: the Flower app
    (on the fake grid) trains and aggregates exactly as florist run, and records the same rates,
    cumulative bytes and evaluations."""
    from test_flower_strategy import RANKS, FakeGrid, assert_same_adapter, tiny_config, write_tiny_data

    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server

    data = write_tiny_data(tmp_path / "data")
    settings = dict(rounds=3, client_selection_frac=0.67, min_clients=2, lr_schedule="cosine", lr_min=0.005,
                    local_learning_rate=0.05, evaluate=True, eval_every=1, eval_every_samples=2, cutoff_len=256, test_data_path=str(data / "3" / "global_test.json"))  # fmt: skip
    heter = method == "florist"
    cfg = tiny_config(data, tmp_path / "inproc", method, heter=heter, **settings)
    expected = run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    fcfg = tiny_config(data, tmp_path / "flower", method, heter=heter, **settings)
    metrics = run_flower_server(
        FakeGrid(fcfg, data, RANKS), fcfg, FlowerOptions(round_timeout=5, node_wait_timeout=1)
    )

    assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "flower" / "adapter")
    assert [len(r["clients"]) for r in metrics["rounds"]] == [2, 2, 2]
    for ours, theirs in zip(metrics["rounds"], expected["rounds"], strict=True):
        assert ours["clients"] == theirs["clients"] and ours["learning_rate"] == theirs["learning_rate"]
        assert ours["cumulative"] == theirs["cumulative"]
        assert ours["eval"]["heldout"]["loss"] == pytest.approx(theirs["eval"]["heldout"]["loss"], rel=1e-5)
        assert ours["eval"]["heldout"]["n_records"] == (2 if ours["round"] < 3 else 3)
    assert len({r["learning_rate"] for r in metrics["rounds"]}) == 3


def test_the_report_draws_learning_curves_from_two_round_runs(tmp_path, federated_data, capsys):
    """`florist report` on a 2-round run with eval_every 1 draws its learning curves; on several
    runs, one line per run, with a table of every evaluated round and its interval."""
    data = federated_data(3)
    runs = []
    for method in ("fedit", "florist"):
        cfg = tiny_run_config(data, tmp_path / method, method=method, evaluate=True, num_communication_rounds=2,
                              eval_every=1, cutoff_len=256)  # fmt: skip
        run_federated(cfg, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
        runs.append(tmp_path / method)
    assert main(["report", str(runs[1])]) == 0
    single = (runs[1] / "report" / "learning_curves.png").read_bytes()
    assert single.startswith(b"\x89PNG") and len(single) > 20_000
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "curves")]) == 0
    table = [
        line
        for line in (tmp_path / "curves" / "report.md").read_text().splitlines()
        if line.startswith("| F")
    ]
    assert [line.split(" | ")[1] for line in table] == [
        "0",
        "1",
        "2",
        "0",
        "1",
        "2",
    ]  # each run: base, round 1, 2
    for line in table:
        loss = float(line.split(" | ")[3])
        low, high = (float(x) for x in line.split(" | ")[4].strip(" |[]").split(", "))
        assert low <= loss <= high
    assert (tmp_path / "curves" / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    assert main(["report", *map(str, runs)]) == 2  # several runs need --out
    assert "--out" in capsys.readouterr().err


def test_learning_curves_put_every_round_on_the_records_all_rounds_scored():
    """A curve whose intermediate rounds scored the first records (eval_every_samples) and whose
    last round scored all of them: every point is the token-weighted loss on the common records,
    computed here by hand, and the full score is left to the final table."""
    from florist.report import curve_points
    from florist.stats import on_common_records

    def evaluation(index, loss_sum, tokens):
        loss = sum(loss_sum) / sum(tokens)
        return {
            "heldout": {"loss": loss, "records": {"index": index, "loss_sum": loss_sum, "tokens": tokens}}
        }

    base = evaluation([0, 1, 3], [6.0, 8.0, 30.0], [2, 4, 10])  # record 2 had nothing to score
    first = evaluation([0, 1], [4.0, 6.0], [2, 4])
    last = evaluation([0, 1, 3], [2.0, 4.0, 10.0], [2, 4, 10])
    rounds = [
        {"round": r, "eval": e, "cumulative": {"bytes_down_per_client": 1e6 * r}}
        for r, e in ((1, first), (2, last))
    ]
    points = curve_points({"eval_before": base, "rounds": rounds})
    assert [p["loss"] for p in points] == pytest.approx([14 / 6, 10 / 6, 6 / 6])
    assert [p["mb_down_per_client"] for p in points] == [0.0, 1.0, 2.0]
    assert all(p["ci95"][0] <= p["loss"] <= p["ci95"][1] for p in points)
    same = on_common_records([base, last])  # the same records: untouched
    assert same[0] is base and same[1] is last and last["heldout"]["loss"] == pytest.approx(16 / 16)
