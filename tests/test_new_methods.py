"""FedEx-LoRA, FedSA-LoRA, RoLoRA, HetLoRA and LoRA-FAIR against independent float64 computations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_aggregation import (
    HETER_RANKS,
    HOMO_RANKS,
    SHAPES,
    _one_thread,  # noqa: F401  (autouse fixture)
    dense_delta,
    make_updates,
)
from test_flower_strategy import task_identity  # noqa: F401  (autouse: Flower messages need it)

from florist.aggregation import AGGREGATORS, ClientUpdate, LoraFactors, get_aggregator
from florist.comm import round_communication

NEW = ("fedex", "fedsa", "rolora", "hetlora", "lorafair")


def weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def with_shared(updates: list[ClientUpdate], factor: str) -> list[ClientUpdate]:
    """Every client's ``factor`` replaced by client 0's (what RoLoRA's frozen factor is)."""
    out = []
    for u in updates:
        modules = {
            n: dataclasses.replace(f, **{factor: getattr(updates[0].modules[n], factor).clone()})
            for n, f in u.modules.items()
        }
        out.append(ClientUpdate(u.client_id, u.num_examples, modules))
    return out


# --- FedEx-LoRA -----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_fedex_total_update_is_exact(alpha):
    """Invariant: s B̄ Ā + residual = Σ p_k s_k B_k A_k (rtol 1e-6), with B̄, Ā FedIT's averages."""
    updates = make_updates(HOMO_RANKS, seed=1, alpha=alpha)
    result = get_aggregator("fedex").aggregate(updates)
    p = weights(updates)
    for name in SHAPES:
        g = result.adapter[name]
        # FedIT's averages, independently
        A_bar = sum(w * u.modules[name].A.double() for w, u in zip(p, updates))
        sB_bar = sum(w * u.modules[name].scaling * u.modules[name].B.double() for w, u in zip(p, updates))
        torch.testing.assert_close(g.A, A_bar, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g.scaling * g.B, sB_bar, rtol=1e-12, atol=1e-12)
        residual = result.base_update[name]
        assert residual.rank == (len(updates) + 1) * 16  # factored: [s_k B_k …, −s B̄]
        torch.testing.assert_close(
            residual.delta(), dense_delta(updates, name) - sB_bar @ A_bar, rtol=1e-6, atol=1e-9
        )
        torch.testing.assert_close(
            g.delta() + residual.delta(), dense_delta(updates, name), rtol=1e-6, atol=1e-9
        )


def test_fedex_accounts_the_residual_download():
    updates = make_updates(HOMO_RANKS, seed=2)
    result = get_aggregator("fedex").aggregate(updates)
    comm = round_communication(result, updates)
    r, K = 16, len(updates)
    per_client_down = sum((m + n) * r + (m + n) * (K + 1) * r for m, n in SHAPES.values())
    assert comm["clients"]["client_0"]["params_down"] == per_client_down
    assert comm["total"]["params_up"] == K * sum((m + n) * r for m, n in SHAPES.values())
    assert comm["eff"] == pytest.approx(1.0 / (len(SHAPES) * (r + (K + 1) * r)))


# --- FedSA-LoRA -----------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [HOMO_RANKS, HETER_RANKS])
def test_fedsa_shares_A_and_keeps_each_B_bit_for_bit(ranks):
    """Invariant: client k gets A = Σ p_j pad(A_j)[:r_k] and its own B_k unchanged, bit for bit."""
    updates = make_updates(ranks, seed=3)
    result = get_aggregator("fedsa").aggregate(updates)
    p = weights(updates)
    r_max = max(ranks)
    for name, (m, n) in SHAPES.items():
        A_bar = torch.zeros(r_max, n, dtype=torch.float64)
        for w, u in zip(p, updates):
            A_bar[: u.modules[name].rank] += w * u.modules[name].A.double()
        view = torch.zeros(m, n, dtype=torch.float64)
        for w, u in zip(p, updates):
            f = result.per_client[u.client_id][name]
            assert torch.equal(f.B, u.modules[name].B.double())  # float32 -> float64 is exact
            assert torch.equal(f.B.float(), u.modules[name].B)
            assert f.scaling == u.modules[name].scaling
            torch.testing.assert_close(f.A, A_bar[: f.rank], rtol=1e-12, atol=1e-12)
            view += w * f.delta()
        # the global view is the average of the clients' updates after the round
        torch.testing.assert_close(result.global_view[name].delta(), view, rtol=1e-9, atol=1e-12)
    comm = round_communication(result, updates)
    for k, u in enumerate(updates):  # A only, each way, at the client's own rank
        expected = sum(ranks[k] * n for _m, n in SHAPES.values())
        assert comm["clients"][u.client_id]["params_up"] == expected
        assert comm["clients"][u.client_id]["params_down"] == expected


# --- RoLoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", ["B", "A"])
def test_rolora_average_is_exact_when_the_other_factor_is_shared(frozen):
    """Invariant: with the frozen factor shared, s B̄ Ā = Σ p_k s_k B_k A_k exactly (rtol 1e-9)."""
    updates = with_shared(make_updates(HOMO_RANKS, seed=4), frozen)
    result = get_aggregator("rolora").aggregate(updates)
    trained = "A" if frozen == "B" else "B"
    assert result.uploaded_factors == result.downloaded_factors == (trained,)
    for name in SHAPES:
        assert torch.equal(
            getattr(result.adapter[name], frozen), getattr(updates[0].modules[name], frozen).double()
        )
        torch.testing.assert_close(
            result.adapter[name].delta(), dense_delta(updates, name), rtol=1e-9, atol=1e-12
        )
    comm = round_communication(result, updates)
    per_rank = {"A": sum(n for _m, n in SHAPES.values()), "B": sum(m for m, _n in SHAPES.values())}[trained]
    assert comm["clients"]["client_3"] == {
        "params_up": 16 * per_rank,
        "bytes_up": 64 * per_rank,
        "params_down": 16 * per_rank,
        "bytes_down": 64 * per_rank,
    }


def test_rolora_refuses_unshared_factors_and_heterogeneous_ranks():
    with pytest.raises(ValueError, match="RoLoRA needs every client to share one frozen factor"):
        get_aggregator("rolora").aggregate(make_updates(HOMO_RANKS, seed=5))
    with pytest.raises(ValueError, match="needs homogeneous ranks"):
        get_aggregator("rolora").aggregate(make_updates(HETER_RANKS, seed=5))


def test_rolora_alternates_from_a_nonzero_B():
    cls = AGGREGATORS["rolora"]
    assert [cls.trained_factors(r) for r in (1, 2, 3, 4)] == [("A",), ("B",), ("A",), ("B",)]
    init = cls.initial_adapter(SHAPES, 8, seed=42)
    again = cls.initial_adapter(SHAPES, 8, seed=42)
    for name, (m, n) in SHAPES.items():
        assert init[name].A.shape == (8, n) and not init[name].A.any()  # the start is the base model
        assert init[name].B.shape == (m, 8) and init[name].B.abs().min() > 0  # A gets a gradient
        assert torch.equal(init[name].B, again[name].B)  # shared by every client, from the seed
    assert not torch.equal(init[name].B, cls.initial_adapter(SHAPES, 8, seed=43)[name].B)


# --- HetLoRA --------------------------------------------------------------------------------


@pytest.mark.parametrize("data_weights", [False, True])
@pytest.mark.parametrize("ranks", [HETER_RANKS, HOMO_RANKS])
def test_hetlora_sparsity_weighted_zero_padding(ranks, data_weights):
    """Invariant: A = Σ S_k pad(A_k), s B = Σ S_k s_k pad(B_k), S_k ∝ ‖s_k B_k A_k‖_F (× p_k if asked),
    and client k receives the first r_k directions."""
    updates = make_updates(ranks, seed=6)
    result = get_aggregator("hetlora", data_weights=data_weights).aggregate(updates)
    p = weights(updates)
    r_max = max(ranks)
    for name, (m, n) in SHAPES.items():
        norms = [float(torch.linalg.matrix_norm(u.modules[name].delta(), "fro")) for u in updates]
        S = [s * w for s, w in zip(norms, p)] if data_weights else norms
        S = [s / sum(S) for s in S]
        A = torch.zeros(r_max, n, dtype=torch.float64)
        B = torch.zeros(m, r_max, dtype=torch.float64)
        for s, u in zip(S, updates):
            f = u.modules[name]
            A[: f.rank] += s * f.A.double()
            B[:, : f.rank] += s * f.scaling * f.B.double()
        for u in updates:
            got = result.adapter_for(u.client_id)[name]
            r = u.modules[name].rank
            assert got.rank == r
            torch.testing.assert_close(got.A, A[:r], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got.scaling * got.B, B[:, :r], rtol=1e-9, atol=1e-12)


# --- LoRA-FAIR ------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_lorafair_correction_minimises_the_objective(lam):
    """Invariant: X = B̄ + ΔB minimises ‖ΔW − X Ā‖² + λ' ‖X − B̄‖² (λ' = λ tr(ĀĀᵀ)/r), checked against
    a dense float64 least-squares solve, and the gradient of the objective vanishes there."""
    updates = make_updates(HOMO_RANKS, seed=7)
    result = get_aggregator("lorafair", regularization=lam).aggregate(updates)
    p = weights(updates)
    for name in SHAPES:
        A_bar = sum(w * u.modules[name].A.double() for w, u in zip(p, updates))
        B_bar = sum(w * u.modules[name].scaling * u.modules[name].B.double() for w, u in zip(p, updates))
        dW = dense_delta(updates, name)
        reg = lam * float(torch.trace(A_bar @ A_bar.T)) / A_bar.shape[0]
        # Stack the two terms into one least-squares problem: [ΔW, √λ' B̄] ≈ X [Ā, √λ' I].
        lhs = torch.cat([A_bar, reg**0.5 * torch.eye(A_bar.shape[0], dtype=torch.float64)], dim=1)
        rhs = torch.cat([dW, reg**0.5 * B_bar], dim=1)
        X = torch.linalg.lstsq(lhs.T, rhs.T).solution.T
        got = result.adapter[name]
        torch.testing.assert_close(got.A, A_bar, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.scaling * got.B, X, rtol=1e-7, atol=1e-10)
        gradient = -(dW - got.scaling * got.B @ A_bar) @ A_bar.T + reg * (got.scaling * got.B - B_bar)
        assert float(gradient.abs().max()) < 1e-9 * max(1.0, float(dW.abs().max()))
        # the correction helps: closer to ΔW than FedIT's product
        assert torch.linalg.matrix_norm(dW - got.delta()) < torch.linalg.matrix_norm(dW - B_bar @ A_bar)


def test_lorafair_refuses_a_negative_lambda_and_heterogeneous_ranks():
    with pytest.raises(ValueError, match="regularization"):
        get_aggregator("lorafair", regularization=-1.0)
    with pytest.raises(ValueError, match="needs homogeneous ranks"):
        get_aggregator("lorafair").aggregate(make_updates(HETER_RANKS, seed=8))


# --- declarations ---------------------------------------------------------------------------


def test_declarations():
    """What the round loop, the sweep and Flower read instead of per-method branches."""
    assert {m for m in NEW if not AGGREGATORS[m].supports_heterogeneous} == {"fedex", "rolora", "lorafair"}
    assert {m for m in AGGREGATORS if AGGREGATORS[m].local_factors} == {"fedsa"}
    assert AGGREGATORS["fedsa"].uploaded_factors == ("A",)
    # one round-1 training for the methods whose clients train the same way
    kinds = {m: (AGGREGATORS[m].client_init, AGGREGATORS[m].training_kind()) for m in NEW + ("fedit",)}
    assert len({kinds[m] for m in ("fedit", "fedex", "fedsa", "hetlora", "lorafair")}) == 1
    assert kinds["rolora"] != kinds["fedit"]
    assert AGGREGATORS["ffa"].training_kind() != AGGREGATORS["rolora"].training_kind()
    for name in ("fedex", "rolora"):
        with pytest.raises(ValueError, match="homogeneous"):
            get_aggregator(name).aggregate(make_updates([8, 4], seed=9))


def test_fedex_and_lorafair_agree_with_fedit_on_the_continued_A():
    updates = make_updates(HOMO_RANKS, seed=10)
    fedit = get_aggregator("fedit").aggregate(updates).adapter
    for method in ("fedex", "lorafair"):
        other = get_aggregator(method).aggregate(updates).adapter
        for name in SHAPES:
            assert torch.equal(other[name].A, fedit[name].A)


def test_new_results_are_finite_and_typed():
    for method in NEW:
        updates = make_updates(HOMO_RANKS, seed=11)
        if method == "rolora":
            updates = with_shared(updates, "B")
        result = get_aggregator(method, dtype=torch.float32).aggregate(updates)
        for u in updates:
            for f in result.adapter_for(u.client_id).values():
                assert isinstance(f, LoraFactors) and f.A.dtype == torch.float32


# --- florist aggregate: the output contracts ------------------------------------------------


@pytest.fixture(scope="module")
def homogeneous_dirs(tmp_path_factory: pytest.TempPathFactory):
    from test_cli_aggregate import make_client

    root = tmp_path_factory.mktemp("homo")
    dirs = [root / f"site{k}" for k in range(3)]
    clients = [make_client(d, 4, seed=k + 1) for k, d in enumerate(dirs)]
    return dirs, clients, [30, 20, 10]


def test_cli_fedex_writes_the_adapter_and_the_base_update(homogeneous_dirs, tmp_path):
    """Contract: base + OUT/base_update/ merged, then OUT/ on top, is base + Σ p_k s_k B_k A_k."""
    import json

    from peft import PeftModel
    from test_cli_aggregate import IDS, aggregate, exact_delta, logits_by_hand, tiny_base

    dirs, clients, counts = homogeneous_dirs
    out = tmp_path / "out"
    assert aggregate("--method", "fedex", "--out", out, "--num-examples", "30,20,10", *dirs) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == [".", "base_update"]
    merged = PeftModel.from_pretrained(tiny_base(), str(out / "base_update")).merge_and_unload()
    with torch.no_grad():
        got = PeftModel.from_pretrained(merged, str(out)).eval()(IDS).logits
    torch.testing.assert_close(got, logits_by_hand(exact_delta(clients, counts)), rtol=1e-5, atol=1e-5)
    # the residual's two factors are counted on the way down: 3 clients, 4 modules
    shapes = [(64, 64), (32, 64)] * 2  # (out, in) of q_proj and v_proj in two layers
    down = 3 * sum(4 * (m + n) + 4 * 4 * (m + n) for m, n in shapes)
    assert summary["communication"]["total"]["params_down"] == down


def test_cli_fedsa_writes_each_client_its_own_B(homogeneous_dirs, tmp_path):
    """Contract: OUT/client_<i>/ holds A = Ā and client i's own B (and scaling)."""
    from test_cli_aggregate import aggregate, assert_same_model

    dirs, clients, counts = homogeneous_dirs
    out = tmp_path / "out"
    assert aggregate("--method", "fedsa", "--out", out, "--num-examples", "30,20,10", *dirs) == 0
    p = [n / sum(counts) for n in counts]
    for i, client in enumerate(clients):
        deltas = {}
        for name, (_A, B, s) in client.items():
            A_bar = sum(w * c[name][0].double() for w, c in zip(p, clients))
            deltas[name] = s * B.double() @ A_bar
        assert_same_model(out / f"client_{i}", deltas)


def test_cli_refuses_fedex_with_heterogeneous_ranks(tmp_path, capsys):
    from test_cli_aggregate import make_client

    dirs = [tmp_path / "a", tmp_path / "b"]
    make_client(dirs[0], 4, seed=1)
    make_client(dirs[1], 2, seed=2)
    from florist.cli import main

    code = main(
        [
            "aggregate",
            "--method",
            "fedex",
            "--out",
            str(tmp_path / "out"),
            "--num-examples",
            "1,2",
            *map(str, dirs),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs homogeneous ranks" in err[0] and str(dirs[1]) in err[0]
    assert not (tmp_path / "out").exists()


# --- the round loop: declarations drive training, state and resume --------------------------


def spy_training(monkeypatch) -> list[dict]:
    """Record every client's start and upload (round, client, init, update) during a run."""
    import florist.training

    calls: list[dict] = []
    train = florist.training.LocalTrainer.train

    def spy(self, **kwargs):
        result = train(self, **kwargs)
        calls.append({**kwargs, "update": result.update})
        return result

    monkeypatch.setattr(florist.training.LocalTrainer, "train", spy)
    return calls


def tiny_run(data, out, method: str, rounds: int, **overrides):
    from conftest import tiny_run_config

    from florist.federation import run_federated
    from florist.models import tiny_llama

    cfg = tiny_run_config(data, out, method=method, num_communication_rounds=rounds, seed=5, **overrides)
    model, tokenizer = tiny_llama(seed=0)
    return cfg, run_federated(cfg, model=model, tokenizer=tokenizer)


def test_fedsa_clients_keep_their_own_B_across_rounds_and_a_resume(tmp_path, federated_data, monkeypatch):
    """Invariant: client k starts round r + 1 from (Ā_r, its own B_k of round r) bit for bit, also
    after a resume, and the resumed run writes exactly the whole run's adapters."""
    import dataclasses

    from florist.checkpoint import load_checkpoint
    from florist.federation import run_federated
    from florist.models import tiny_llama

    data = federated_data(3)
    calls = spy_training(monkeypatch)
    cfg, _ = tiny_run(data, tmp_path / "whole", "fedsa", 3)
    by = {(c["round_index"], c["client_id"]): c for c in calls}
    for rnd in (2, 3):
        for k in range(3):
            cid = f"client_{k}"
            start, before = by[(rnd, cid)]["init"], by[(rnd - 1, cid)]["update"].modules
            ups = [by[(rnd - 1, f"client_{j}")]["update"] for j in range(3)]
            for name, f in start.items():
                assert torch.equal(f.B, before[name].B) and f.scaling == before[name].scaling
                A_bar = sum(w * u.modules[name].A.double() for w, u in zip(weights(ups), ups))
                torch.testing.assert_close(f.A, A_bar, rtol=1e-12, atol=1e-12)
    # resume: two rounds, then a third from the checkpoint
    calls.clear()
    part = dataclasses.replace(cfg, output_dir=str(tmp_path / "part"), num_communication_rounds=2)
    run_federated(part, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    state = load_checkpoint(part.output_dir)
    assert sorted(state.client_state) == ["client_0", "client_1", "client_2"]
    calls.clear()
    model, tokenizer = tiny_llama(seed=0)
    run_federated(
        dataclasses.replace(part, num_communication_rounds=3, resume=True), model=model, tokenizer=tokenizer
    )
    assert [c["round_index"] for c in calls] == [3, 3, 3]
    for c in calls:
        for name, f in c["init"].items():
            assert torch.equal(f.B, state.client_state[c["client_id"]][name].B)
    for rel in ["adapter"] + [f"adapter/clients/client_{k}" for k in range(3)]:
        a = (tmp_path / "whole" / rel / "adapter_model.safetensors").read_bytes()
        assert a == (tmp_path / "part" / rel / "adapter_model.safetensors").read_bytes(), rel


def test_rolora_with_one_client_per_round_sends_the_factor_of_the_round(
    tmp_path, federated_data, monkeypatch
):
    """One upload shares both of its factors with itself, so the uploads cannot say which trained;
    the round's declaration does (Aggregator.for_round): B goes down after an even round. With two
    clients the uploads decide, whatever the round says."""
    rolora = get_aggregator("rolora")
    one = make_updates((4,), seed=2)
    assert rolora.for_round(rolora.aggregate(one), 1).downloaded_factors == ("A",)
    assert rolora.for_round(rolora.aggregate(one), 2).downloaded_factors == ("B",)
    assert rolora.for_round(rolora.aggregate(one), 2).uploaded_factors == ("B",)
    shared_A = make_updates((4, 4), seed=3)
    shared_A[1].modules = {
        n: LoraFactors(A=shared_A[0].modules[n].A, B=f.B, scaling=f.scaling)
        for n, f in shared_A[1].modules.items()
    }
    assert rolora.for_round(rolora.aggregate(shared_A), 1).downloaded_factors == ("B",)

    calls = spy_training(monkeypatch)
    cfg, metrics = tiny_run(
        federated_data(3), tmp_path / "out", "rolora", 2, client_selection_frac=0.34, min_clients=1
    )
    for rnd, trained in ((1, "A"), (2, "B")):
        (cid,) = metrics["rounds"][rnd - 1]["clients"]
        (call,) = [c for c in calls if c["round_index"] == rnd]
        size = sum(getattr(f, trained).numel() for f in call["update"].modules.values())
        comm = metrics["rounds"][rnd - 1]["communication"]["clients"][cid]
        assert comm["params_up"] == comm["params_down"] == size, rnd


def test_rolora_run_alternates_and_sends_one_factor(tmp_path, federated_data, monkeypatch):
    """Invariant: in odd rounds only A changes (B stays the shared start bit for bit), in even
    rounds only B; the broadcast is the exact average of the clients' updates; only the trained
    factor is counted on the wire."""
    calls = spy_training(monkeypatch)
    cfg, metrics = tiny_run(federated_data(3), tmp_path / "out", "rolora", 3)
    by = {(c["round_index"], c["client_id"]): c for c in calls}
    for rnd, frozen in ((1, "B"), (2, "A"), (3, "B")):
        ups = [by[(rnd, f"client_{k}")]["update"] for k in range(3)]
        for u in ups:
            init = by[(rnd, u.client_id)]["init"]
            for name, f in u.modules.items():
                # effective factors (B carries the scaling; the start has scaling 1)
                got = {"A": f.A, "B": f.scaling * f.B}
                was = {"A": init[name].A.float(), "B": init[name].scaling * init[name].B.float()}
                assert torch.equal(got[frozen], was[frozen])
                trained = "A" if frozen == "B" else "B"
                assert not torch.equal(got[trained], was[trained])
        if rnd < 3:  # the next round starts from the exact average
            nxt = by[(rnd + 1, "client_0")]["init"]
            for name in nxt:
                want = sum(w * u.modules[name].delta() for w, u in zip(weights(ups), ups))
                torch.testing.assert_close(nxt[name].delta(), want, rtol=1e-6, atol=1e-9)
        comm = metrics["rounds"][rnd - 1]["communication"]
        ref = ups[0].modules
        per_client = sum(getattr(f, "A" if frozen == "B" else "B").numel() for f in ref.values())
        assert (
            comm["clients"]["client_1"]["params_up"]
            == comm["clients"]["client_1"]["params_down"]
            == per_client
        )
    assert metrics["client_init"] == "shared"
    assert cfg.method == "rolora"


def test_fedex_run_folds_the_residual_and_writes_the_exact_total(tmp_path, federated_data, monkeypatch):
    """Invariant: adapter/ of a two-round FedEx run is the exact total: residual of round 1 plus
    the average of the round-2 clients' updates (who started from FedIT's average)."""
    from florist.adapters import read_peft_adapter

    calls = spy_training(monkeypatch)
    _cfg, metrics = tiny_run(federated_data(3), tmp_path / "out", "fedex", 2)
    by = {(c["round_index"], c["client_id"]): c for c in calls}
    r1 = [by[(1, f"client_{k}")]["update"] for k in range(3)]
    r2 = [by[(2, f"client_{k}")]["update"] for k in range(3)]
    final, _ = read_peft_adapter(tmp_path / "out" / "adapter")
    for name, f in final.items():
        start = by[(2, "client_0")]["init"][name]  # FedIT's average of round 1
        exact1 = sum(w * u.modules[name].delta() for w, u in zip(weights(r1), r1))
        exact2 = sum(w * u.modules[name].delta() for w, u in zip(weights(r2), r2))
        torch.testing.assert_close(f.delta(), exact1 - start.delta() + exact2, rtol=1e-5, atol=1e-6)
    # the residual is downloaded: more than FedIT's two factors
    comm = metrics["rounds"][0]["communication"]["clients"]["client_0"]
    assert comm["params_down"] > comm["params_up"]


# --- main.py flags and refused combinations -------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "method"),
    [
        ({"fedex": "True"}, "fedex"),
        ({"fedsa": True}, "fedsa"),
        ({"rolora": True}, "rolora"),
        ({"hetlora": True, "heter": True, "zero_padding": True}, "hetlora"),
        ({"lorafair": "true"}, "lorafair"),
    ],
)
def test_main_py_flag_per_method(flags, method):
    from test_main_py import paper

    assert paper.build_config(**flags).method == method


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"fedex": True, "heter": True}, "fedex needs homogeneous ranks"),
        ({"rolora": True, "heter": True}, "rolora needs homogeneous ranks"),
        ({"lorafair": True, "heter": True}, "lorafair needs homogeneous ranks"),
        ({"fedex": True, "florist": True}, "choose one aggregation method"),
        ({"rolora": True, "client_init": "per_client"}, "rolora needs client_init shared"),
    ],
)
def test_bad_combinations_are_refused(flags, message):
    from test_main_py import paper

    from florist.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        paper.build_config(**flags)


# --- the sweep ------------------------------------------------------------------------------


def test_sweep_all_shares_one_training_and_matches_florist_run(tmp_path):
    """`--methods all` groups FedIT, FedEx, FedSA, HetLoRA and LoRA-FAIR in one shared-init
    training and RoLoRA in its own; every new method's sweep adapter is bit-identical to its own
    `florist run` (FedEx: residual + continued adapter; FedSA: the global view)."""
    import dataclasses
    import json
    from pathlib import Path

    from test_sweep import _tensors, make_cfg, tiny

    from florist.federation import run_federated
    from florist.sweep import parse_methods, run_sweep, training_groups

    assert parse_methods("all")[-5:] == list(NEW)
    groups = training_groups(parse_methods("all"))
    shared = next(g for g in groups if g.client_init == "shared" and not g.frozen_A and "fedit" in g.methods)
    assert set(shared.methods) == {"fedit", "fedex", "fedsa", "hetlora", "lorafair"}
    assert [g.methods for g in groups if "rolora" in g.methods] == [("rolora",)]

    from conftest import write_federated_data

    data = write_federated_data(tmp_path / "data", 3)
    cfg = make_cfg(data, tmp_path / "sweep", local_ranks=[4, 2, 1])
    methods = ["fedit", *NEW]
    sweep = run_sweep(cfg, methods=methods, thresholds="0.9", model_factory=tiny, save_adapters=True,
                      report=False, progress=False)  # fmt: skip
    homo, heter = sweep["settings"]
    assert [g["methods"] for g in homo["training_groups"]] == [
        ["fedit", "fedex", "fedsa", "hetlora", "lorafair"],
        ["rolora"],
    ]
    assert [g["methods"] for g in heter["training_groups"]] == [["fedsa", "hetlora"]]
    cases = [(False, m) for m in NEW] + [(True, "fedsa"), (True, "hetlora")]
    for heterogeneous, method in cases:
        run_cfg = dataclasses.replace(cfg, method=method, heter=heterogeneous,
                                      output_dir=str(tmp_path / f"run_{method}_{heterogeneous}"))  # fmt: skip
        model, tokenizer = tiny()
        metrics = run_federated(run_cfg, model=model, tokenizer=tokenizer)
        mine = _tensors(
            tmp_path / "sweep" / "adapters" / ("heterogeneous" if heterogeneous else "homogeneous") / method
        )
        theirs = _tensors(Path(run_cfg.output_dir) / "adapter")
        assert mine.keys() == theirs.keys(), method
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (method, heterogeneous, key)
        row = next(r for r in (heter if heterogeneous else homo)["rows"] if r["method"] == method)
        assert row["eff"] == pytest.approx(metrics["eff_total"])
        assert row["communication"]["total"] == metrics["rounds"][0]["communication"]["total"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["methods"] == methods


def test_fedsa_reports_personalised_and_global_evaluation(tmp_path, federated_data):
    """Each client's model (base + s_k B_k Ā) is scored on its own held-out records (here the global
    test records of its own category, reweighted), checked against a direct held-out loss of the
    client's written adapter on exactly those records; the global view is eval_after."""
    from florist.adapters import read_peft_adapter
    from florist.data import Prompter, load_dataset_file
    from florist.evaluation.heldout import heldout_loss
    from florist.lora import LoraHost
    from florist.models import tiny_llama

    data = federated_data(3)
    cfg, metrics = tiny_run(data, tmp_path / "out", "fedsa", 2, evaluate=True, cutoff_len=512)
    assert metrics["eval_after"]["heldout"]["loss"] > 0  # the global view on the global test
    personal = metrics["eval_personal"]
    assert sorted(personal["clients"]) == ["client_0", "client_1", "client_2"]
    test, _ = load_dataset_file(data / "3" / "global_test.json")
    model, tokenizer = tiny_llama(seed=0)
    host = LoraHost(model, list(cfg.lora_target_modules))
    losses = {}
    for k in range(3):
        own, _ = read_peft_adapter(tmp_path / "out" / "adapter" / "clients" / f"client_{k}")
        # write_federated_data: client k trains on one category, open_qa if k is odd
        mine = [r for r in test if r["category"] == ("open_qa" if k % 2 else "brainstorming")]
        with host.use_adapter(own) as m:
            want = heldout_loss(m, tokenizer, mine, cutoff_len=cfg.cutoff_len, prompter=Prompter("alpaca"))
        got = personal["clients"][f"client_{k}"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        losses[k] = want["loss"]
    sizes = [6, 7, 8]  # write_federated_data: per_client + k records
    mean = sum(n * losses[k] for k, n in enumerate(sizes)) / sum(sizes)
    assert personal["mean_loss"] == pytest.approx(mean, rel=1e-6)
    from florist.cli.run import format_summary

    assert f"personalised held-out loss: {mean:.4f}" in format_summary(metrics)


def test_sweep_scores_fedsa_clients_on_their_own_records_as_florist_run_does(tmp_path, federated_data):
    """The one-round sweep's FedSA row carries eval_personal, and it equals a one-round
    `florist run`'s: the same clients' models (Ā, B_k) on each client's local_test_<k>.json, with
    the per-record sums that paired intervals need."""
    import dataclasses
    import json

    from florist.federation import run_federated
    from florist.models import tiny_llama
    from florist.sweep import run_sweep

    data = federated_data(3)
    for k in range(3):  # each client's own held-out records
        own = json.loads((data / "3" / f"local_training_{k}.json").read_text())[:2]
        (data / "3" / f"local_test_{k}.json").write_text(json.dumps(own))
    from conftest import tiny_run_config

    cfg = tiny_run_config(data, tmp_path / "sweep", method="fedsa", seed=5, evaluate=True, cutoff_len=512)
    sweep = run_sweep(cfg, methods=["fedit", "fedsa"], thresholds="0.9", heter=(False,), report=False,
                      progress=False, model_factory=lambda: tiny_llama(seed=0))  # fmt: skip
    rows = {r["method"]: r for r in sweep["settings"][0]["rows"]}
    assert "eval_personal" not in rows["fedit"]
    got = rows["fedsa"]["eval_personal"]
    model, tokenizer = tiny_llama(seed=0)
    metrics = run_federated(dataclasses.replace(cfg, output_dir=str(tmp_path / "run")), model=model,
                            tokenizer=tokenizer)  # fmt: skip
    want = metrics["eval_personal"]
    assert sorted(got["clients"]) == sorted(want["clients"]) == ["client_0", "client_1", "client_2"]
    for cid, c in want["clients"].items():
        assert got["clients"][cid]["loss"] == pytest.approx(c["loss"], rel=1e-9)
        assert got["clients"][cid]["source"].endswith(f"local_test_{cid[-1]}.json")
        assert len(got["clients"][cid]["records"]["loss_sum"]) == 2
    assert got["mean_loss"] == pytest.approx(want["mean_loss"], rel=1e-9)


# --- Flower: the same rounds, one factor on the wire ----------------------------------------


@pytest.mark.parametrize("method", ["fedsa", "rolora", "fedex"])
def test_flower_equals_the_in_process_run(tmp_path, method):
    """The ServerApp and ClientApp (on test_flower_strategy's in-process grid) give the in-process
    run's adapters, and the bytes that crossed the wire equal florist's accounting: FedSA and
    RoLoRA one factor each way, FedEx its residual too. FedSA's nodes write their own (Ā, B_k)."""
    from test_flower_strategy import FakeGrid, assert_same_adapter, tiny_config, write_tiny_data

    from florist.federation import run_federated
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server
    from florist.models import tiny_llama

    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "inproc", method, heter=False, rounds=2)
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(cfg, model=model, tokenizer=tokenizer)

    fcfg = tiny_config(data, tmp_path / "flower", method, heter=False, rounds=2)
    grid = FakeGrid(fcfg, data, [4, 4, 4])
    for k, context in enumerate(grid.contexts.values()):
        context.node_config["output-dir"] = str(tmp_path / f"node{k}")
    metrics = run_flower_server(grid, fcfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert metrics["flower"]["failures"] == []
    for ours, theirs in zip(metrics["rounds"], expected["rounds"], strict=True):
        assert ours["communication"]["total"] == theirs["communication"]["total"]
        wire, comm = ours["wire"]["total"], ours["communication"]["total"]
        assert wire == {k: comm[k] for k in wire}
    if method == "fedsa":  # the server never sees B_k: each node's own adapter is the result
        for k in range(3):
            assert_same_adapter(
                tmp_path / "inproc" / "adapter" / "clients" / f"client_{k}", tmp_path / f"node{k}"
            )
    else:
        assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "flower" / "adapter")
        assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "node1")


def test_flower_fedsa_node_that_lost_its_B_is_refused(tmp_path):
    """FedSA without its per-client state: a node whose SuperNode state was lost cannot continue."""
    from test_flower_strategy import FakeGrid, tiny_config, write_tiny_data

    from florist.flower import protocol
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server
    from florist.flower.strategy import FlowerRunError

    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "flower", "fedsa", heter=False, rounds=2, min_clients=3)
    grid = FakeGrid(cfg, data, [4, 4, 4])
    deliver = grid.send_and_receive

    def forgetful(messages, *, timeout=None):
        for m in messages:  # node 1001 loses its state before round 2
            if m.content.config_records["config"].get("round") == 2 and m.metadata.dst_node_id == 1001:
                del grid.contexts[1001].state[protocol.STATE_OWN_ROUND]
        return deliver(messages, timeout=timeout)

    grid.send_and_receive = forgetful
    with pytest.raises(FlowerRunError, match=r"client_1.*fedsa keeps this client's own B on the node"):
        run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))


@pytest.mark.parametrize("method", ["rolora", "fedex"])
def test_resume_continues_the_alternation_and_the_folded_residuals(tmp_path, federated_data, method):
    """Two rounds, then a resumed third: bit-identical to three rounds at once (RoLoRA's third round
    trains A again; FedEx replays the folded residuals into the base)."""
    import dataclasses

    from florist.federation import run_federated
    from florist.models import tiny_llama

    data = federated_data(3)
    cfg, whole = tiny_run(data, tmp_path / "whole", method, 3)
    part = dataclasses.replace(cfg, output_dir=str(tmp_path / "part"), num_communication_rounds=2)
    run_federated(part, model=tiny_llama(seed=0)[0], tokenizer=tiny_llama(seed=0)[1])
    model, tokenizer = tiny_llama(seed=0)
    resumed = run_federated(
        dataclasses.replace(part, num_communication_rounds=3, resume=True), model=model, tokenizer=tokenizer
    )
    weights_file = "adapter/adapter_model.safetensors"
    assert (tmp_path / "whole" / weights_file).read_bytes() == (tmp_path / "part" / weights_file).read_bytes()
    assert [r["communication"]["total"] for r in resumed["rounds"]] == [
        r["communication"]["total"] for r in whole["rounds"]
    ]


def test_cli_method_options(homogeneous_dirs, tmp_path, capsys):
    """--regularization reaches LoRA-FAIR and --data-weights HetLoRA; elsewhere they are refused."""
    import json

    from florist.cli import main

    dirs, _clients, _counts = homogeneous_dirs
    common = ["--num-examples", "30,20,10", *map(str, dirs)]
    assert (
        main(
            [
                "aggregate",
                "--method",
                "lorafair",
                "--regularization",
                "0.5",
                "--out",
                str(tmp_path / "f"),
                *common,
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["options"]["regularization"] == 0.5
    assert (
        main(["aggregate", "--method", "hetlora", "--data-weights", "--out", str(tmp_path / "h"), *common])
        == 0
    )
    assert json.loads((tmp_path / "h" / "summary.json").read_text())["options"]["data_weights"] is True
    capsys.readouterr()
    assert (
        main(["aggregate", "--method", "fedit", "--data-weights", "--out", str(tmp_path / "x"), *common]) == 2
    )
    assert (
        capsys.readouterr().err.strip() == "florist: error: --data-weights does not apply to --method fedit"
    )


@pytest.mark.parametrize(
    ("method", "ranks", "frozen"),
    [
        ("fedex", HOMO_RANKS, None),
        ("fedsa", HOMO_RANKS, None),
        ("fedsa", HETER_RANKS, None),
        ("rolora", HOMO_RANKS, "B"),
        ("rolora", HOMO_RANKS, "A"),
        ("hetlora", HETER_RANKS, None),
        ("lorafair", HOMO_RANKS, None),
    ],
)
def test_shape_only_accounting_agrees_with_the_measured_round(method, ranks, frozen):
    """comm.shape_communication (from shapes alone, for the paper's Eff tables) equals the
    accounting of a real aggregation, in every direction and in Eff."""
    from florist.comm import shape_communication

    updates = make_updates(ranks, seed=12)
    if frozen is not None:
        updates = with_shared(updates, frozen)
    report = round_communication(get_aggregator(method).aggregate(updates), updates)
    round_index = 2 if frozen == "A" else 1  # RoLoRA trains B in even rounds
    planned = shape_communication(list(SHAPES.values()), ranks, method, round_index=round_index)
    assert planned["total"] == {k: report["total"][k] for k in planned["total"]}
    assert planned["eff"] == pytest.approx(report["eff"])


def test_flower_rolora_with_partial_participation_equals_the_in_process_run(tmp_path):
    """Two of three clients a round: a node that missed the last round gets both factors (its
    frozen one is stale), so its round starts where florist run starts it."""
    from test_flower_strategy import FakeGrid, assert_same_adapter, tiny_config, write_tiny_data

    from florist.federation import run_federated
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server
    from florist.models import tiny_llama
    from florist.rounds import sample_clients

    data = write_tiny_data(tmp_path / "data")
    settings = dict(heter=False, rounds=4, client_selection_frac=0.67, min_clients=2)
    cfg = tiny_config(data, tmp_path / "inproc", "rolora", **settings)
    picked = [sample_clients(cfg, r) for r in range(1, 5)]
    assert any(set(b) - set(a) for a, b in zip(picked, picked[1:]))  # someone comes back stale
    model, tokenizer = tiny_llama(seed=0)
    run_federated(cfg, model=model, tokenizer=tokenizer)
    fcfg = tiny_config(data, tmp_path / "flower", "rolora", **settings)
    grid = FakeGrid(fcfg, data, [4, 4, 4])
    metrics = run_flower_server(grid, fcfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert metrics["flower"]["failures"] == []
    assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "flower" / "adapter")


def test_fedsa_resume_without_per_client_state_is_refused(tmp_path, federated_data, monkeypatch):
    """A FedSA checkpoint that lacks the clients' own B (e.g. from an older florist) cannot resume."""
    import dataclasses

    import florist.federation
    from florist.checkpoint import load_checkpoint
    from florist.config import ConfigError
    from florist.federation import run_federated
    from florist.models import tiny_llama

    cfg, _ = tiny_run(federated_data(3), tmp_path / "out", "fedsa", 1)
    state = load_checkpoint(cfg.output_dir)
    assert state.client_state  # written by this version
    monkeypatch.setattr(
        florist.federation, "load_checkpoint", lambda out: dataclasses.replace(state, client_state={})
    )
    model, tokenizer = tiny_llama(seed=0)
    with pytest.raises(
        ConfigError,
        match="fedsa keeps each client's own B across rounds, but the checkpoint holds no per-client state",
    ):
        run_federated(
            dataclasses.replace(cfg, num_communication_rounds=2, resume=True),
            model=model,
            tokenizer=tokenizer,
        )
