"""The in-process round loop, end to end on a tiny random Llama, for every method.

Each run is checked against quantities computed here, independently of florist's server code:
the round-2 starting adapters the clients receive and the final adapter's effect on the logits
are rebuilt from the clients' uploads (captured by a spy on LocalTrainer.train) with plain
dense algebra: FedIT averages, zero-padding, FFA's shared A, FlexLoRA's dense SVD truncation,
FLoRA's exact sum, and FLoRIST's energy bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import florist.models
import florist.training
from florist.aggregation import Adapter
from florist.config import RunConfig
from florist.federation import run_federated
from florist.models import tiny_llama
from florist.rounds import sample_clients

RANKS = [4, 2, 1]
CASES = [("fedit", False)] + [
    (m, h) for m in ("zeropad", "flora", "flexlora", "ffa", "florist") for h in (False, True)
]
METRIC_KEYS = {
    "config",
    "method",
    "threshold",
    "model",
    "rounds",
    "eval_before",
    "eval_after",
    "communication_total",
    "eff_per_round",
    "eff_total",
}
ROUND_KEYS = {
    "round",
    "clients",
    "client_stats",
    "ranks",
    "singular_values",
    "communication",
    "eff",
    "aggregation_seconds",
}


def make_cfg(data: Path, out: Path, method: str, heter: bool, **overrides) -> RunConfig:
    settings = dict(
        method=method, heter=heter, local_ranks=list(RANKS), threshold=0.9, num_communication_rounds=2
    )
    return tiny_run_config(data, out, **(settings | dict(cutoff_len=96, seed=7) | overrides))


class Spy:
    """Records every LocalTrainer.train call: its keyword arguments and its ClientResult."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = florist.training.LocalTrainer.train

        def train(trainer, **kwargs):
            result = original(trainer, **kwargs)
            self.calls.append({**kwargs, "result": result})
            return result

        monkeypatch.setattr(florist.training.LocalTrainer, "train", train)

    def round(self, r: int) -> list[dict]:
        return [c for c in self.calls if c["round_index"] == r]


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("run_federated must use the model it is given, not load another")

    monkeypatch.setattr(florist.models, "load_model", refuse)


# --- independent expectations from the uploads ----------------------------------------------


def weights(calls: list[dict]) -> list[float]:
    n = [c["result"].update.num_examples for c in calls]
    return [x / sum(n) for x in n]


def pad_cols(B: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)


def pad_rows(A: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], dim=0)


def exact_sum(calls: list[dict], name: str) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k in float64."""
    return sum(p * c["result"].update.modules[name].delta() for p, c in zip(weights(calls), calls))


def expected_delta(method: str, calls: list[dict], name: str, rank: int) -> torch.Tensor:
    """The dense update a client of ``rank`` receives from aggregating ``calls``' uploads."""
    mods = [c["result"].update.modules[name] for c in calls]
    p = weights(calls)
    r_max = max(f.rank for f in mods)
    if method in ("fedit", "zeropad"):
        B = sum(w * f.scaling * pad_cols(f.B.double(), r_max) for w, f in zip(p, mods))
        A = sum(w * pad_rows(f.A.double(), r_max) for w, f in zip(p, mods))
        return B[:, :rank] @ A[:rank]
    if method == "ffa":
        A = max(mods, key=lambda f: f.rank).A.double()  # the shared frozen A at r_max
        B = sum(w * f.scaling * pad_cols(f.B.double(), r_max) for w, f in zip(p, mods))
        return B[:, :rank] @ A[:rank]
    if method == "flexlora":
        U, S, Vh = torch.linalg.svd(exact_sum(calls, name), full_matrices=False)
        return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    raise AssertionError(method)


def dense(adapter: Adapter, name: str) -> torch.Tensor:
    return adapter[name].delta()


def read_merged(path: Path) -> dict[str, torch.Tensor]:
    """A checkpointed merged adapter as dense updates, read with safetensors directly."""
    with safe_open(str(path), framework="pt") as f:
        scalings = json.loads(f.metadata()["scalings"])
        return {
            n: s * f.get_tensor(f"{n}/B").double() @ f.get_tensor(f"{n}/A").double()
            for n, s in scalings.items()
        }


def logits_with(
    deltas: dict[str, torch.Tensor] | None, ids: torch.Tensor, adapter_dir: Path | None = None
) -> torch.Tensor:
    model, _ = tiny_llama(seed=0)
    with torch.no_grad():
        for name, d in (deltas or {}).items():
            W = model.get_submodule(name).weight
            W.copy_((W.double() + d).float())
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("method", "heter"), CASES, ids=[f"{m}-{'heter' if h else 'homo'}" for m, h in CASES]
)
def test_every_method_end_to_end(method, heter, tmp_path, federated_data, monkeypatch, no_model_loading):
    data = federated_data(3)
    save_merged = method in ("fedit", "florist")  # a continue and a merge method
    cfg = make_cfg(data, tmp_path / "out", method, heter, save_merged=save_merged)
    spy = Spy(monkeypatch)
    model, tokenizer = tiny_llama(seed=0)
    metrics = run_federated(cfg, model=model, tokenizer=tokenizer)
    out = Path(cfg.output_dir)
    ranks = [cfg.client_rank(k) for k in range(3)]
    r_max = max(ranks)

    # metrics: documented keys, on disk and returned
    on_disk = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(on_disk) and on_disk["rounds"] == json.loads(json.dumps(metrics["rounds"]))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert ROUND_KEYS <= set(r)
        assert r["clients"] == ["client_0", "client_1", "client_2"]
        for k, cid in enumerate(r["clients"]):
            stats = r["client_stats"][cid]
            assert stats["rank"] == ranks[k] and stats["num_examples"] == 6 + k and stats["steps"] == 1
            assert len(stats["losses"]) == 1 and stats["tokens"] > 0
        assert r["eff"] == pytest.approx(1 / (sum(r["ranks"].values()) * (0.5 if method == "ffa" else 1)))
        assert r["communication"]["total"]["bytes_up"] > 0
    assert metrics["eff_total"] == pytest.approx(1 / sum(1 / e for e in metrics["eff_per_round"]))
    assert metrics["communication_total"]["bytes_up"] == sum(
        r["communication"]["total"]["bytes_up"] for r in metrics["rounds"]
    )
    assert metrics["method"] == method and metrics["threshold"] == (0.9 if method == "florist" else None)

    # every client trains in both rounds at its own rank
    assert [(c["round_index"], c["client_index"], c["rank"]) for c in spy.calls] == [
        (r, k, ranks[k]) for r in (1, 2) for k in range(3)
    ]
    assert all(c["init"] is None for c in spy.round(1))
    names = sorted(spy.calls[0]["result"].update.modules)
    assert names and all("q_proj" in n or "v_proj" in n for n in names)

    if method == "ffa":
        frozen = {n: spy.calls[0]["frozen_A"][n] for n in names}
        for c in spy.calls:  # one frozen A for all clients and rounds; A is never trained
            for n in names:
                assert torch.equal(c["frozen_A"][n], frozen[n][: c["rank"]])
                assert torch.equal(c["result"].update.modules[n].A, c["frozen_A"][n])
    else:
        assert all(c["frozen_A"] is None for c in spy.calls)

    if method in ("flora", "florist"):
        # merge methods: fresh LoRA every round; the base carries every round's merged update
        assert all(c["init"] is None for c in spy.round(2))
        merged = [read_merged(out / "checkpoint" / "merged" / f"round_{r:04d}.safetensors") for r in (1, 2)]
        for r, calls in ((0, spy.round(1)), (1, spy.round(2))):
            for n in names:
                exact = exact_sum(calls, n)
                if method == "flora":
                    torch.testing.assert_close(merged[r][n], exact, atol=1e-7, rtol=1e-6)
                else:  # FLoRIST keeps at least tau of the energy with rank p <= sum r_k
                    assert metrics["rounds"][r]["ranks"][n] <= sum(ranks)
                    residual = torch.linalg.matrix_norm(exact - merged[r][n]) ** 2
                    assert residual <= (1 - cfg.threshold) * torch.linalg.matrix_norm(exact) ** 2 + 1e-10
        total = {n: merged[0][n] + merged[1][n] for n in names}
        expected = logits_with(total, IDS)
        # the clients' in-memory base ends with the same weights
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    else:
        # continue methods: round 2 starts from what the server broadcast after round 1
        for c in spy.round(2):
            for n in names:
                got = dense(c["init"], n)
                assert c["init"][n].rank == c["rank"]
                torch.testing.assert_close(
                    got, expected_delta(method, spy.round(1), n, c["rank"]), atol=1e-6, rtol=1e-5
                )
        total = {n: expected_delta(method, spy.round(2), n, r_max) for n in names}
        expected = logits_with(total, IDS)
        clients_dir = out / "adapter" / "clients"
        assert clients_dir.is_dir() == (
            heter and method != "fedit"
        )  # only when clients got different adapters
        if method == "flexlora" and heter:  # each client's own truncation
            for k, rank in enumerate(ranks):
                client_dir = clients_dir / f"client_{k}"
                own = {n: expected_delta(method, spy.round(2), n, rank) for n in names}
                torch.testing.assert_close(
                    logits_with(None, IDS, client_dir), logits_with(own, IDS), atol=1e-4, rtol=1e-4
                )

    # the PEFT adapter on a fresh copy of the base gives base + the cumulative update
    assert (out / "adapter" / "adapter_config.json").is_file()
    torch.testing.assert_close(logits_with(None, IDS, out / "adapter"), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, logits_with(None, IDS), atol=1e-4)  # training did something
    assert (out / "merged").is_dir() == save_merged
    if save_merged:  # a plain transformers model with the update folded in
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        assert not any("lora" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_partial_sampling_and_padding(tmp_path, federated_data, monkeypatch, no_model_loading):
    """Half the clients per round; a client unseen last round continues from the nested global."""
    data = federated_data(4)
    cfg = make_cfg(
        data,
        tmp_path / "out",
        "zeropad",
        True,
        num_clients=4,
        local_ranks=[4, 2, 1, 3],
        client_selection_frac=0.5,
        num_communication_rounds=3,
    )
    assert sample_clients(cfg, 2) == sample_clients(cfg, 2)  # a function of (seed, round)
    assert all(len(sample_clients(cfg, r)) == 2 for r in range(1, 10))
    assert len({tuple(sample_clients(cfg, r)) for r in range(1, 10)}) > 1
    few = make_cfg(data, tmp_path, "fedit", False, num_clients=4, client_selection_frac=0.1, min_clients=3)
    assert len(sample_clients(few, 1)) == 3  # at least min_clients

    spy = Spy(monkeypatch)
    model, tokenizer = tiny_llama(seed=0)
    metrics = run_federated(cfg, model=model, tokenizer=tokenizer)
    for r in (1, 2, 3):
        assert [c["client_index"] for c in spy.round(r)] == sample_clients(cfg, r)
        assert metrics["rounds"][r - 1]["clients"] == [f"client_{k}" for k in sample_clients(cfg, r)]
    for r in (2, 3):
        previous = spy.round(r - 1)
        r_prev = max(c["rank"] for c in previous)
        for c in spy.round(r):
            assert c["init"] is not None and all(f.rank == c["rank"] for f in c["init"].values())
            for n, f in c["init"].items():
                full = expected_delta("zeropad", previous, n, r_prev)
                if c["rank"] <= r_prev:
                    torch.testing.assert_close(
                        f.delta(), expected_delta("zeropad", previous, n, c["rank"]), atol=1e-6, rtol=1e-5
                    )
                else:  # grown with fresh A rows and zero B columns: the same update
                    torch.testing.assert_close(f.delta(), full, atol=1e-6, rtol=1e-5)
                    assert torch.count_nonzero(f.B[:, r_prev:]) == 0 and torch.count_nonzero(f.A[r_prev:]) > 0


def test_evaluation_before_and_after(tmp_path, federated_data, mmlu_subset, monkeypatch, no_model_loading):
    data = federated_data(3)
    monkeypatch.setenv("FLORIST_MMLU_PATH", str(mmlu_subset))
    cfg = make_cfg(
        data,
        tmp_path / "out",
        "florist",
        True,
        evaluate=True,
        eval_samples=4,
        num_communication_rounds=1,
        cutoff_len=320,
    )
    model, tokenizer = tiny_llama(seed=0)
    metrics = run_federated(cfg, model=model, tokenizer=tokenizer)
    for key in ("eval_before", "eval_after"):
        held, mmlu = metrics[key]["heldout"], metrics[key]["mmlu"]
        assert held["loss"] > 0 and 0 <= held["token_accuracy"] <= 1 and held["n_tokens"] > 0
        assert mmlu["n_questions"] == 4 and mmlu["scorer"] == "loglik"
    # the base model's held-out loss, recomputed directly on a fresh copy
    from florist.data import Prompter, load_records, normalize_record
    from florist.evaluation.heldout import heldout_loss

    base, tok = tiny_llama(seed=0)
    records = [normalize_record(r, "dolly") for r in load_records(data / "3" / "global_test.json")]
    direct = heldout_loss(base, tok, records, cutoff_len=cfg.cutoff_len, prompter=Prompter(), max_records=4)
    assert metrics["eval_before"]["heldout"]["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert metrics["eval_after"]["heldout"]["loss"] != pytest.approx(direct["loss"], rel=1e-6)


def test_cli_run_with_yaml_and_flags(tmp_path, federated_data, capsys):
    from florist.cli import main

    data = federated_data(3)
    model_dir = tmp_path / "tiny"
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = make_cfg(data, tmp_path / "ignored", "fedit", False).to_dict()
    cfg.update(global_model=str(model_dir), device="cpu", num_communication_rounds=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "from-cli"
    code = main(
        [
            "run",
            "--config",
            str(tmp_path / "run.yaml"),
            "--output-dir",
            str(out),
            "--method",
            "flora",
            "--heter",
            "True",
            "--local_ranks",
            "3,2,1",
            "--num_communication_rounds",
            "2",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "flora" and len(metrics["rounds"]) == 2
    assert metrics["config"]["local_ranks"] == [3, 2, 1] and metrics["config"]["local_learning_rate"] == 0.05
    assert [s["rank"] for s in metrics["rounds"][0]["client_stats"].values()] == [3, 2, 1]
    printed = capsys.readouterr().out
    assert "method: flora" in printed and "Eff total" in printed

    # bad input: one line, exit code 2, nothing written
    code = main(
        [
            "run",
            "--config",
            str(tmp_path / "run.yaml"),
            "--output_dir",
            str(tmp_path / "bad"),
            "--method",
            "fedavg",
        ]
    )
    assert code == 2 and "method must be one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_demo_command_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    """`florist demo` end to end (built-in data, one training per init, FedIT/FLoRA/FLoRIST) on a tiny model."""
    from florist.cli import main
    from florist.stats import heldout_records

    monkeypatch.delenv("FLORIST_MMLU_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tmp_path / "tiny"), "--output_dir", str(out), "--steps", "1"]
    assert main([*args, "--eval_samples", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    sweep = json.loads((out / "sweep.json").read_text())
    (setting,) = sweep["settings"]
    # One training per init: FLoRA and FLoRIST share per-client inits, FedIT its shared one.
    assert [(g["client_init"], g["methods"]) for g in setting["training_groups"]] == [
        ("per_client", ["flora", "florist"]),
        ("shared", ["fedit"]),
    ]
    labels = [r["label"] for r in setting["rows"]]
    assert labels == ["FedIT", "FLoRA", "FLoRIST τ=0.80", "FLoRIST τ=0.90", "FLoRIST τ=0.95"]
    assert sweep["score"]["source"] == "loss" and setting["florist_o"] is not None
    held = setting["base_eval"]["heldout"]
    assert len(heldout_records(setting["base_eval"])[0]) == held["n_records"] == 5 - held["n_skipped"]
    # The printed table: every model with its interval, and each against FLoRA with its saving.
    for label in ["base model", *labels]:
        assert label in printed
    assert "nats against FLoRA (95% CI" in printed and "less download per client" in printed
    assert (out / "report" / "accuracy_vs_communication.png").is_file()
