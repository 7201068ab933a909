"""Client-level DP (florist.privacy): clipping, noise, accounting, central DP and the refusals.

Clipping and noise are checked against independent float64 computations of the travelling
vector (s·(B - B₀) and A - A₀), the noise with a statistical test on large tensors, ε against
direct calls of dp-accounting's and Flower's accountants, and central DP against Flower's own
fixed-clipping helpers.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from florist import privacy
from florist.aggregation import AGGREGATORS, ClientUpdate, LoraFactors, get_aggregator
from florist.config import ConfigError, RunConfig

NONLINEAR = sorted(n for n, cls in AGGREGATORS.items() if not cls.linear_in_uploads)
LINEAR = sorted(n for n, cls in AGGREGATORS.items() if cls.linear_in_uploads)


def adapter(g: torch.Generator, rank: int, *, scale: float = 1.0, scaling: float = 2.0, modules: int = 3):
    return {
        f"layers.{i}.q_proj": LoraFactors(
            A=torch.randn(rank, 24, generator=g) * scale,
            B=torch.randn(16, rank, generator=g) * scale,
            scaling=scaling,
        )
        for i in range(modules)
    }


def travelling(modules, start, factors=("A", "B")) -> torch.Tensor:
    """The vector the clip bounds, computed here independently of florist.privacy."""
    parts = []
    for name in sorted(modules):
        f, f0 = modules[name], start[name]
        if "B" in factors:
            parts.append((f.scaling * (f.B.double() - f0.B.double())).flatten())
        if "A" in factors:
            parts.append((f.A.double() - f0.A.double()).flatten())
    return torch.cat(parts)


def z_score_of_std(x: torch.Tensor, std: float) -> float:
    """(s²/σ² - 1)·sqrt(n/2), about N(0, 1) when x ~ N(0, σ²) (χ² with n degrees, n large)."""
    n = x.numel()
    return float(((x.double().square().mean() / std**2) - 1) * math.sqrt(n / 2))


# --- clipping --------------------------------------------------------------------------------


@pytest.mark.parametrize("factors", [("A", "B"), ("B",)])
@pytest.mark.parametrize("scale", [1e-4, 0.05, 1.0, 30.0])
def test_clipped_norm_never_exceeds_c(factors, scale):
    g = torch.Generator().manual_seed(int(scale * 1e4) + len(factors))
    for trial in range(20):
        start = adapter(g, 4)
        moved = {
            n: LoraFactors(
                A=f.A + scale * torch.randn(f.A.shape, generator=g),
                B=f.B + scale * torch.randn(f.B.shape, generator=g),
                scaling=f.scaling,
            )
            for n, f in start.items()
        }
        if "A" not in factors:  # FFA: A is frozen and does not travel
            moved = {n: LoraFactors(A=start[n].A, B=f.B, scaling=f.scaling) for n, f in moved.items()}
        C = [0.01, 0.5, 1.0, 3.0][trial % 4]
        update = ClientUpdate("client_0", 7, moved)
        clipped, before = privacy.clip_upload(update, start, factors, C)
        v_before = travelling(moved, start, factors)
        v_after = travelling(clipped.modules, start, factors)
        assert before == pytest.approx(float(v_before.norm()), rel=1e-12)
        assert float(v_after.norm()) <= C
        if float(v_before.norm()) <= C:  # below the bound nothing changes
            torch.testing.assert_close(v_after, v_before, rtol=0, atol=1e-12)
        else:  # above it, the same direction at norm C
            assert float(v_after.norm()) == pytest.approx(C, rel=1e-9)
            torch.testing.assert_close(
                v_after, v_before * (C / float(v_before.norm())), rtol=1e-9, atol=1e-15
            )
        for n in moved:  # scaling kept; a factor that does not travel is untouched
            assert clipped.modules[n].scaling == moved[n].scaling
            if "A" not in factors:
                assert torch.equal(clipped.modules[n].A, moved[n].A)
        assert clipped.num_examples == 7


# --- noise -------------------------------------------------------------------------------------


def test_local_noise_has_std_z_c_on_the_scaled_factors():
    # The upload equals its start, so what arrives is start + noise alone.
    rank, n_in, n_out, s = 64, 4096, 2048, 4.0
    zero = {"m": LoraFactors(A=torch.zeros(rank, n_in), B=torch.zeros(n_out, rank), scaling=s)}
    z, C = 1.3, 0.7
    noisy, norm = privacy.privatize_upload(
        ClientUpdate("client_1", 3, zero),
        zero,
        ("A", "B"),
        clip_norm=C,
        noise_multiplier=z,
        generator=torch.Generator().manual_seed(0),
    )
    assert norm == 0.0
    A, B = noisy.modules["m"].A, noisy.modules["m"].B
    assert A.dtype == B.dtype == torch.float32  # uploaded in the upload's dtype
    # A carries N(0, (zC)²); B carries it after scaling, so B itself has std zC/s.
    assert abs(z_score_of_std(A, z * C)) < 5
    assert abs(z_score_of_std(s * B, z * C)) < 5
    for x in (A, s * B):
        assert abs(float(x.double().mean())) < 5 * z * C / math.sqrt(x.numel())
    # The fixed seed reproduces the noise; another draws other noise.
    again, _ = privacy.privatize_upload(
        ClientUpdate("client_1", 3, zero), zero, ("A", "B"), clip_norm=C, noise_multiplier=z,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(again.modules["m"].A, A)
    assert not torch.equal(
        privacy.privatize_upload(
            ClientUpdate("c", 3, zero), zero, ("A", "B"), clip_norm=C, noise_multiplier=z,
            generator=privacy.noise_generator(),
        )[0].modules["m"].A,
        A,
    )  # fmt: skip


def test_local_noise_only_on_the_factors_that_travel():
    g = torch.Generator().manual_seed(3)
    start = adapter(g, 4)
    noisy, _ = privacy.privatize_upload(
        ClientUpdate("c", 1, start), start, ("B",), clip_norm=1.0, noise_multiplier=1.0, generator=g
    )
    for n, f in start.items():
        assert torch.equal(noisy.modules[n].A, f.A)  # FFA's frozen A stays bit-exact
        assert not torch.equal(noisy.modules[n].B, f.B)


def test_central_noise_std_and_heterogeneous_slices():
    # zero-padding with ranks 8 and 4: every client gets a slice of the one noised average.
    m, z, C = 2, 2.0, 0.5
    zeros = {
        k: {"m": LoraFactors(A=torch.zeros(r, 2048), B=torch.zeros(1024, r), scaling=2.0)}
        for k, r in ((0, 256), (1, 128))
    }
    updates = [ClientUpdate(f"client_{k}", 5 + k, a) for k, a in zeros.items()]
    result, norms = privacy.central_aggregate(
        get_aggregator("zeropad"),
        updates,
        {u.client_id: u.modules for u in updates},
        clip_norm=C,
        noise_multiplier=z,
        generator=torch.Generator().manual_seed(1),
    )
    assert norms == {"client_0": 0.0, "client_1": 0.0}
    big, small = result.per_client["client_0"]["m"], result.per_client["client_1"]["m"]
    std = z * C / m
    assert std == privacy.central_std(z, C, m)
    assert abs(z_score_of_std(big.A, std)) < 5
    assert abs(z_score_of_std(big.scaling * big.B, std)) < 5
    assert torch.equal(small.A, big.A[:128]) and torch.equal(small.B, big.B[:, :128])


# --- central DP mirrors Flower's server-side fixed clipping -------------------------------------


def test_central_dp_agrees_with_flowers_server_side_fixed_clipping(flower_identity):
    """florist's central DP against Flower's own DifferentialPrivacyServerSideFixedClipping
    wrapping FedAvg (equal weights, as Flower's accounted mode requires), fed the travelling
    vector's pieces (s·B and A per module) with the round's start as its current arrays: the
    clipped average agrees exactly, and the noise both add has the std z·C/m."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    g = torch.Generator().manual_seed(5)
    start = adapter(g, 4, scale=0.1)
    updates = [
        ClientUpdate(
            f"client_{k}",
            10 * (k + 1),  # unequal sizes: central DP averages uniformly anyway
            {
                n: LoraFactors(
                    A=f.A + 0.3 * torch.randn(f.A.shape, generator=g),
                    B=f.B + torch.randn(f.B.shape, generator=g) * (k + 1),
                    scaling=f.scaling,
                )
                for n, f in start.items()
            },
        )
        for k in range(3)
    ]
    names = sorted(start)

    def pieces(a):  # the travelling vector's pieces: s·B and A per module
        return [x for n in names for x in (a[n].scaling * a[n].B.double().numpy(), a[n].A.double().numpy())]

    def record(arrays):
        return ArrayRecord({f"p{i:03d}": Array(x.copy()) for i, x in enumerate(arrays)})

    def flower(z: float, C: float) -> list[np.ndarray]:
        wrapper = DifferentialPrivacyServerSideFixedClipping(
            FedAvg(fraction_train=1.0, weighted_by_key="num-examples"), z, C, len(updates)
        )
        wrapper.current_arrays = record(pieces(start))
        replies = []
        for k, u in enumerate(updates):
            asked = Message(
                RecordDict({"config": ConfigRecord({})}), dst_node_id=100 + k, message_type=MessageType.TRAIN
            )
            content = RecordDict(
                {"arrays": record(pieces(u.modules)), "metrics": MetricRecord({"num-examples": 1})}
            )
            replies.append(Message(content, reply_to=asked))
        arrays, _ = wrapper.aggregate_train(1, replies)
        return [arrays[key].numpy() for key in sorted(arrays.keys())]

    def ours(z: float, C: float) -> list[np.ndarray]:
        result, _ = privacy.central_aggregate(
            get_aggregator("fedit"),
            updates,
            {u.client_id: start for u in updates},
            clip_norm=C,
            noise_multiplier=z,
            generator=torch.Generator().manual_seed(0),
        )
        return pieces(result.adapter)

    C = 1.5
    exact = ours(0.0, C)
    for x, y in zip(exact, flower(0.0, C)):  # no noise: the clip and the uniform average
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-13)  # florist clips 1e-12 below C
    z = 40.0  # noise std zC/m = 20, far above the pieces
    for noisy in (ours(z, C), flower(z, C)):
        noise = torch.from_numpy(np.concatenate([(a - b).ravel() for a, b in zip(noisy, exact)]))
        assert abs(z_score_of_std(noise, z * C / len(updates))) < 5


def test_central_dp_keeps_ffa_a_and_noises_b():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(4, 24, generator=g)
    start = {"m": LoraFactors(A=A, B=torch.zeros(16, 4), scaling=2.0)}
    updates = [
        ClientUpdate(
            f"client_{k}", 3, {"m": LoraFactors(A=A, B=torch.randn(16, 4, generator=g), scaling=2.0)}
        )
        for k in range(2)
    ]
    result, _ = privacy.central_aggregate(
        get_aggregator("ffa"),
        updates,
        {u.client_id: start for u in updates},
        clip_norm=1.0,
        noise_multiplier=1.0,
        generator=g,
    )
    assert torch.equal(result.adapter["m"].A.float(), A)


# --- accounting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("z,rounds,delta", [(0.5, 1, 1e-5), (1.0, 3, 1e-5), (2.0, 10, 1e-6), (1.1, 50, 1e-4)])
def test_epsilon_equals_dp_accountings_and_flowers(z, rounds, delta):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdp

    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for _ in range(rounds):
        acc.compose(dp_accounting.GaussianDpEvent(z))
    expected = acc.get_epsilon(delta)
    assert privacy.epsilon(z, rounds, delta) == pytest.approx(expected, rel=1e-9)
    # Flower's accounted fixed-clipping mode (add-or-remove, no amplification) agrees.
    flower = FlowerRdp(
        PrivacyConfig(
            target_delta=delta,
            population_size=8,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    flower.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=4, population_size=8), rounds)
    assert privacy.epsilon(z, rounds, delta) == pytest.approx(flower.get_epsilon(delta), rel=1e-6)


def test_epsilon_falls_with_noise_and_grows_with_rounds():
    zs = [0.5, 0.8, 1.0, 2.0, 4.0]
    for rounds in (1, 5, 20):
        eps = [privacy.epsilon(z, rounds, 1e-5) for z in zs]
        assert all(a > b > 0 for a, b in zip(eps, eps[1:])), eps
    for z in zs:
        eps = [privacy.epsilon(z, r, 1e-5) for r in (1, 2, 5, 10, 40)]
        assert all(a < b for a, b in zip(eps, eps[1:])), eps
        assert all(math.isfinite(e) for e in eps)


def test_releases_per_round_local_counts_each_clients_participation():
    rounds = [["client_0", "client_1"], ["client_1", "client_2"], ["client_0", "client_2"], ["client_3"]]
    assert privacy.releases_per_round("central", rounds) == [1, 2, 3, 4]
    assert privacy.releases_per_round("local", rounds) == [1, 2, 2, 2]


# --- refusals ------------------------------------------------------------------------------------


def dp_config(**kw) -> RunConfig:
    return RunConfig(**({"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0} | kw))


def test_linear_methods_are_declared():
    assert {"fedit", "ffa", "zeropad", "fedsa", "rolora"} <= set(LINEAR)
    assert {"flora", "florist", "flexlora"} <= set(NONLINEAR)


@pytest.mark.parametrize("method", NONLINEAR)
def test_central_dp_and_secure_aggregation_refused_for_methods_that_need_individual_adapters(method):
    with pytest.raises(ConfigError) as e:
        dp_config(method=method, dp_mode="central").validate()
    assert str(e.value).startswith(f"--dp_mode central is not valid for {method}: ")
    assert "individual adapters" in str(e.value) and "C/m" in str(e.value)
    assert "use --dp_mode local" in str(e.value)
    with pytest.raises(ConfigError) as e:
        RunConfig(method=method, secure_aggregation=True).validate()
    assert str(e.value).startswith(f"--secure_aggregation is not possible with {method}: ")
    assert "individual adapter" in str(e.value) and "only the sum" in str(e.value)
    dp_config(method=method).validate()  # local DP is valid for every method


@pytest.mark.parametrize("method", LINEAR)
def test_central_dp_and_secure_aggregation_allowed_for_linear_methods(method):
    dp_config(method=method, dp_mode="central").validate()
    RunConfig(method=method, secure_aggregation=True).validate()


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"dp_noise_multiplier": 1.0}, "needs --dp_clip_norm C > 0"),
        ({"dp_mode": "central"}, "needs --dp_clip_norm C > 0"),
        ({"dp_clip_norm": 1.0}, "needs --dp_noise_multiplier z > 0"),
        ({"dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "dp_delta must be a finite number in (0, 1), got 1.0"),
        ({"dp_clip_norm": -1.0}, "dp_clip_norm must be a finite number >= 0, got -1.0"),
        ({"dp_clip_norm": 1.0, "dp_noise_multiplier": 1e-320}, "--dp_noise_multiplier 1e-320 is too small: epsilon would be infinite"),
        ({"dp_clip_norm": float("nan")}, "dp_clip_norm must be a finite number"),
        ({"dp_mode": "global"}, "dp_mode must be local or central"),
    ],
)  # fmt: skip
def test_bad_privacy_settings(kw, message):
    with pytest.raises(ConfigError) as e:
        RunConfig(**kw).validate()
    assert message in str(e.value)


def test_cli_refuses_central_dp_for_florist_in_one_line(tmp_path, capsys):
    from florist.cli import main

    args = ["run", "--method", "florist", "--dp_clip_norm", "1", "--dp_noise_multiplier", "1"]
    code = main([*args, "--dp_mode", "central", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("florist: error: --dp_mode central is not valid for florist")
    assert not (tmp_path / "out").exists()
    code = main(["run", "--method", "fedit", "--secure_aggregation", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Flower runs" in err[0], err


# --- runs on the tiny model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,mode,heter",
    [
        ("florist", "local", False),
        ("fedit", "central", False),
        ("zeropad", "central", True),
        ("fedsa", "central", True),
        ("fedsa", "local", False),
        ("rolora", "central", False),
    ],
)
def test_run_writes_privacy_section(method, mode, heter, tmp_path, federated_data):
    from conftest import tiny_run_config

    from florist.federation import run_federated
    from florist.models import tiny_llama

    cfg = tiny_run_config(
        federated_data(3),
        tmp_path / "out",
        method=method,
        heter=heter,
        local_ranks=[4, 2, 1],
        num_communication_rounds=2,
        client_selection_frac=0.67,
        min_clients=2,
        dp_clip_norm=0.5,
        dp_noise_multiplier=1.2,
        dp_delta=1e-6,
        dp_mode=mode,
    )
    model, tokenizer = tiny_llama(seed=0)
    metrics = run_federated(cfg, model=model, tokenizer=tokenizer)
    p = json.loads((tmp_path / "out" / "metrics.json").read_text())["privacy"]
    assert {"mode", "clip_norm", "noise_multiplier", "delta", "epsilon", "epsilon_per_round"} <= set(p)
    assert (p["mode"], p["clip_norm"], p["noise_multiplier"], p["delta"]) == (mode, 0.5, 1.2, 1e-6)
    clients = [r["clients"] for r in metrics["rounds"]]
    releases = privacy.releases_per_round(mode, clients)
    assert p["epsilon_per_round"] == [privacy.epsilon(1.2, n, 1e-6) for n in releases]
    assert p["epsilon"] == p["epsilon_per_round"][-1] > 0 and math.isfinite(p["epsilon"])
    assert [r["privacy"]["epsilon"] for r in metrics["rounds"]] == p["epsilon_per_round"]
    for r in metrics["rounds"]:
        assert 0 <= r["privacy"]["clipped"] <= len(r["clients"])
    from florist.cli.run import format_summary
    from florist.report import write_report

    assert f"epsilon {p['epsilon']:.3g}" in format_summary(metrics)
    assert f"ε = {p['epsilon']:.3g} at δ = 1e-06" in write_report(tmp_path / "out").read_text()
    if method == "fedsa":  # the released view is the noised Ā alone; each client keeps its B_k
        from florist.adapters import read_peft_adapter

        view, _ = read_peft_adapter(tmp_path / "out" / "adapter")
        assert all(not f.B.any() for f in view.values())
        for cid in metrics["rounds"][-1]["clients"]:
            own, _ = read_peft_adapter(tmp_path / "out" / "adapter" / "clients" / cid)
            assert all(f.B.any() for f in own.values())


# --- main.py and Flower ------------------------------------------------------------------------


def test_main_py_maps_the_privacy_flags():
    from test_main_py import paper

    cfg = paper.build_config(
        fedit=True, dp_clip_norm="0.5", dp_noise_multiplier=2, dp_delta=1e-6, dp_mode="central"
    )
    assert (cfg.method, cfg.dp_clip_norm, cfg.dp_noise_multiplier, cfg.dp_delta, cfg.dp_mode) == (
        "fedit",
        0.5,
        2.0,
        1e-6,
        "central",
    )
    with pytest.raises(ConfigError, match="--dp_mode central is not valid for florist"):
        paper.build_config(florist=True, dp_clip_norm=1.0, dp_noise_multiplier=1.0, dp_mode="central")
    with pytest.raises(ConfigError, match="main.py: --dp_clip_norm must be a finite number >= 0, got 'one'"):
        paper.build_config(dp_clip_norm="one")


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages built outside a Flower process need a run/node/task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_flower_nodes_clip_and_noise_their_uploads(tmp_path, flower_identity):
    """Local DP on Flower (fake grid, the real ClientApp): what leaves a node is noised with z·C."""
    from test_flower_strategy import FakeGrid, tiny_config, write_tiny_data

    from florist.flower import protocol
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server

    data = write_tiny_data(tmp_path / "data")
    C, z = 1e-3, 50.0  # the noise (std 0.05) dwarfs the clipped update (norm <= 0.001)
    cfg = tiny_config(
        data, tmp_path / "flower", "ffa", heter=False, rounds=1, dp_clip_norm=C, dp_noise_multiplier=z
    )
    grid = FakeGrid(cfg, data, [cfg.lora_r] * 3)
    replies = []
    deliver = grid.send_and_receive

    def capture(messages, *, timeout=None):
        out = deliver(messages, timeout=timeout)
        replies.extend(out)
        return out

    grid.send_and_receive = capture
    metrics = run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    uploads = [r.content for r in replies if protocol.UPDATE in r.content.array_records]
    assert len(uploads) == 3
    for content in uploads:
        # FFA's round 1 starts from B = 0 and only B travels: s·B is the clipped update plus noise.
        scaled = [
            content[protocol.UPDATE_SCALING][key.rsplit("/", 1)[0]]
            * torch.from_numpy(arr.numpy().copy()).double()
            for key, arr in content[protocol.UPDATE].items()
        ]
        assert all(key.endswith("/B") for key in content[protocol.UPDATE])
        v = torch.cat([x.flatten() for x in scaled])
        # ‖v - noise‖ <= C moves the root mean square by at most C/sqrt(n), 1/(z sqrt(n)) relative
        # to z·C; the sample's own spread is 1/sqrt(2n) (six of them allowed).
        rms, n = float(v.square().mean().sqrt()), v.numel()
        assert abs(rms / (z * C) - 1) < 6 / math.sqrt(2 * n) + 1 / (z * math.sqrt(n)), (rms, n)
    p = metrics["privacy"]
    assert (p["mode"], p["epsilon"]) == ("local", privacy.epsilon(z, 1, cfg.dp_delta))
    assert metrics["rounds"][0]["privacy"] == {"epsilon": p["epsilon"]}  # no norms reach the server
    # nor the training losses, which are computed on the private records
    assert all(s["losses"] == [] for s in metrics["rounds"][0]["client_stats"].values())


# --- SmolLM2 -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_florist_run_with_local_dp_on_smollm2(tmp_path, dolly_dir, capsys):
    """The issue's command on the real SmolLM2 and Dolly split, then z = 2 against z = 0.5."""
    from florist.adapters import read_peft_adapter
    from florist.cli import main
    from florist.federation import run_federated
    from florist.models import load_model

    small = [
        "--data_path", str(dolly_dir), "--num_clients", "8", "--client_selection_frac", "0.25",
        "--max_samples_per_client", "2", "--local_batch_size", "2", "--local_micro_batch_size", "2",
        "--local_max_steps", "1", "--cutoff_len", "64", "--evaluate", "False", "--device", "cpu",
    ]  # fmt: skip
    dp = [
        "--method",
        "florist",
        "--dp_clip_norm",
        "1.0",
        "--dp_noise_multiplier",
        "1.0",
        "--dp_delta",
        "1e-5",
    ]
    assert main(["run", *dp, *small, "--output_dir", str(tmp_path / "z1")]) == 0
    p = json.loads((tmp_path / "z1" / "metrics.json").read_text())["privacy"]
    assert p["mode"] == "local" and math.isfinite(p["epsilon"]) and p["epsilon"] > 0
    assert p["epsilon"] == privacy.epsilon(1.0, 1, 1e-5)
    assert f"epsilon {p['epsilon']:.3g}" in capsys.readouterr().out
    adapter, _ = read_peft_adapter(tmp_path / "z1" / "adapter")
    assert all(bool(torch.isfinite(f.delta()).all()) for f in adapter.values())

    eps = {}
    for z in (2.0, 0.5):
        model, tokenizer = load_model("smollm2-135m", device="cpu")  # florist merges into the base
        cfg = RunConfig(
            global_model="smollm2-135m",
            data_path=str(dolly_dir),
            output_dir=str(tmp_path / f"z{z}"),
            method="florist",
            num_clients=8,
            client_selection_frac=0.25,
            max_samples_per_client=2,
            local_batch_size=2,
            local_micro_batch_size=2,
            local_max_steps=1,
            cutoff_len=64,
            evaluate=False,
            device="cpu",
            dp_clip_norm=1.0,
            dp_noise_multiplier=z,
        )
        eps[z] = run_federated(cfg, model=model, tokenizer=tokenizer)["privacy"]["epsilon"]
    assert 0 < eps[2.0] < p["epsilon"] < eps[0.5] < math.inf


# --- the sweep -----------------------------------------------------------------------------------


def test_sweep_under_dp_runs_each_configuration_and_reports_epsilon(tmp_path, federated_data):
    from conftest import tiny_run_config

    from florist.models import tiny_llama
    from florist.sweep import run_sweep

    data = federated_data(3)
    cfg = tiny_run_config(data, tmp_path / "sweep", dp_clip_norm=0.5, dp_noise_multiplier=2.0)
    sweep = run_sweep(
        cfg,
        methods="fedit,florist",
        thresholds=[0.9],
        heter=(False,),
        model_factory=lambda: tiny_llama(seed=0),
        progress=False,
    )
    assert sweep["mode"] == "separate-runs" and "every run draws its own noise" in sweep["note"]
    rows = sweep["settings"][0]["rows"]
    assert [r["method"] for r in rows] == ["fedit", "florist"]
    for r in rows:
        p = json.loads((tmp_path / "sweep" / r["run_dir"] / "metrics.json").read_text())["privacy"]
        assert r["epsilon"] == p["epsilon"] == privacy.epsilon(2.0, 1, cfg.dp_delta)
    central = tiny_run_config(
        data, tmp_path / "c", dp_clip_norm=0.5, dp_noise_multiplier=2.0, dp_mode="central"
    )
    with pytest.raises(ConfigError, match="--dp_mode central is not valid for florist"):
        run_sweep(central, methods="fedit,florist", thresholds=[0.9], heter=(False,), model_factory=None)


def test_sent_factors_follow_the_declarations():
    assert AGGREGATORS["fedit"].sent_factors(1) == ("A", "B")
    assert AGGREGATORS["ffa"].sent_factors(3) == ("B",)
    if "fedsa" in AGGREGATORS:  # B_k stays on the client
        assert AGGREGATORS["fedsa"].sent_factors(2) == ("A",)
    if "rolora" in AGGREGATORS:  # one factor trains per round, the other is the public start
        one, two = (AGGREGATORS["rolora"].sent_factors(r) for r in (1, 2))
        assert len(one) == len(two) == 1 and one != two


def test_central_noise_leaves_what_does_not_travel_per_client():
    from florist.aggregation import GlobalResult

    g = torch.Generator().manual_seed(2)
    A = torch.randn(4, 32, dtype=torch.float64, generator=g)
    per_client = {
        f"client_{k}": {
            "m": LoraFactors(A=A, B=torch.randn(8, 4, dtype=torch.float64, generator=g), scaling=2.0)
        }
        for k in range(3)
    }
    result = GlobalResult("x", merge=False, ranks={"m": 4}, per_client=per_client)
    noised = privacy.noise_result(result, ("A",), 0.1, g)
    As = [a["m"].A for a in noised.per_client.values()]
    assert all(torch.equal(x, As[0]) for x in As) and not torch.equal(As[0], A)
    for cid, a in noised.per_client.items():  # each client's own B, untouched
        assert torch.equal(a["m"].B, per_client[cid]["m"].B)


# --- central DP for the one-factor methods (FedSA-LoRA, RoLoRA) ---------------------------------


def fedsa_round(g: torch.Generator, ranks: tuple[int, ...], *, scale: float = 1.0):
    """FedSA uploads against their starts: the shared Ā₀ (client k its first r_k rows) and each
    client's own B_k from before the round; each client has trained both."""
    r = max(ranks)
    A0 = {n: f.A for n, f in adapter(g, r).items()}
    updates, starts = [], {}
    for k, rank in enumerate(ranks):
        own = adapter(g, rank)  # B_k before the round
        cid = f"client_{k}"
        starts[cid] = {n: LoraFactors(A=A0[n][:rank], B=f.B, scaling=f.scaling) for n, f in own.items()}
        trained = {
            n: LoraFactors(
                A=A0[n][:rank] + scale * torch.randn(rank, 24, generator=g),
                B=f.B + torch.randn(f.B.shape, generator=g),
                scaling=f.scaling,
            )
            for n, f in own.items()
        }
        updates.append(ClientUpdate(cid, 3 + 2 * k, trained))
    return updates, starts


def clipped_A_average(updates, starts, clip_norm: float) -> dict[str, torch.Tensor]:
    """Ā from the clipped A_k, uniformly weighted and zero-padded to the largest rank, computed
    here from the travelling vector A - A₀ alone."""
    total: dict[str, torch.Tensor] = {}
    r = max(f.rank for u in updates for f in u.modules.values())
    for u in updates:
        v = travelling(u.modules, starts[u.client_id], ("A",))
        factor = min(1.0, clip_norm / float(v.norm()))
        for n, f in u.modules.items():
            A = starts[u.client_id][n].A.double() + factor * (
                f.A.double() - starts[u.client_id][n].A.double()
            )
            padded = torch.zeros(r, A.shape[1], dtype=torch.float64)
            padded[: f.rank] = A
            total[n] = total.get(n, 0) + padded / len(updates)
    return total


@pytest.mark.parametrize("ranks", [(4, 4, 4), (4, 2, 3)])
@pytest.mark.parametrize("clip_norm", [1e6, 0.5])
def test_central_dp_fedsa_without_noise_is_the_average_of_the_clipped_A(ranks, clip_norm):
    g = torch.Generator().manual_seed(11)
    updates, starts = fedsa_round(g, ranks)
    fedsa = get_aggregator("fedsa")
    result, norms = privacy.central_aggregate(
        fedsa, updates, starts, clip_norm=clip_norm, noise_multiplier=0.0, generator=g,
        factors=fedsa.sent_factors(1),
    )  # fmt: skip
    expected = clipped_A_average(updates, starts, clip_norm)
    for u in updates:
        assert norms[u.client_id] == pytest.approx(
            float(travelling(u.modules, starts[u.client_id], ("A",)).norm())
        )
        for n, f in result.per_client[u.client_id].items():
            torch.testing.assert_close(f.A.double(), expected[n][: f.rank], rtol=0, atol=1e-12)
            assert torch.equal(f.B.double(), u.modules[n].B.double())  # B_k: the client's own, untouched
    if clip_norm > 1e3:  # nothing clipped: plain FedSA with uniform weights
        plain = fedsa.aggregate(privacy.uniform_weights(updates))
        for cid, a in plain.per_client.items():
            for n, f in a.items():
                torch.testing.assert_close(result.per_client[cid][n].A, f.A, rtol=0, atol=1e-12)
    # The released global view is Ā alone: Σ p_k s_k B_k never travelled.
    for n, f in result.global_view.items():
        torch.testing.assert_close(f.A.double(), expected[n], rtol=0, atol=1e-12)
        assert not f.B.any()


def test_central_dp_fedsa_noises_A_with_z_c_over_m_and_never_B():
    g = torch.Generator().manual_seed(12)
    m, z, C = 3, 2.0, 0.5
    A0 = torch.randn(64, 2048, generator=g)
    starts = {
        f"client_{k}": {"m": LoraFactors(A=A0, B=torch.randn(1024, 64, generator=g), scaling=2.0)}
        for k in range(m)
    }
    updates = [ClientUpdate(cid, 4 + k, start) for k, (cid, start) in enumerate(starts.items())]
    result, _ = privacy.central_aggregate(
        get_aggregator("fedsa"), updates, starts, clip_norm=C, noise_multiplier=z, generator=g, factors=("A",)
    )
    noised = result.per_client["client_0"]["m"].A
    assert abs(z_score_of_std(noised.double() - A0.double(), z * C / m)) < 5
    for cid, a in result.per_client.items():  # one noised Ā for all, each its own B
        assert torch.equal(a["m"].A, noised) and torch.equal(a["m"].B.float(), starts[cid]["m"].B)
    assert torch.equal(result.global_view["m"].A, noised) and not result.global_view["m"].B.any()


@pytest.mark.parametrize("round_index", [1, 2])
def test_central_dp_rolora_noises_only_the_travelling_factor(round_index):
    rolora = get_aggregator("rolora")
    (trained,) = rolora.sent_factors(round_index)
    frozen = "B" if trained == "A" else "A"
    g = torch.Generator().manual_seed(13)
    m, z, C, s = 3, 3.0, 0.2, 2.0
    start = {
        "m": LoraFactors(A=torch.randn(32, 1024, generator=g), B=torch.randn(512, 32, generator=g), scaling=s)
    }
    updates = []
    for k in range(m):  # the frozen factor is the shared start, bit for bit
        f = start["m"]
        moved = {trained: getattr(f, trained) + torch.randn(getattr(f, trained).shape, generator=g) * 0.01}
        updates.append(
            ClientUpdate(
                f"client_{k}", 2 + k, {"m": LoraFactors(**({"A": f.A, "B": f.B} | moved), scaling=s)}
            )
        )
    starts = {u.client_id: start for u in updates}
    result, _ = privacy.central_aggregate(
        rolora, updates, starts, clip_norm=C, noise_multiplier=z, generator=g, factors=(trained,)
    )
    assert result.downloaded_factors == result.uploaded_factors == (trained,)
    got = result.adapter["m"]
    assert torch.equal(getattr(got, frozen).float(), getattr(start["m"], frozen))  # public, not noised
    # The clipped uniform mean, here from the travelling vector alone, then the noise on it.
    weight = 1.0 if trained == "A" else s  # B is clipped and noised after scaling
    mean = 0
    for u in updates:
        v = travelling(u.modules, start, (trained,))
        mean = mean + min(1.0, C / float(v.norm())) * v / m
    noise = weight * (getattr(got, trained).double() - getattr(start["m"], trained).double()).flatten() - mean
    assert abs(z_score_of_std(noise, z * C / m)) < 5


def test_aggregate_mean_keeps_the_client_ids_and_the_rounds_factor():
    g = torch.Generator().manual_seed(14)
    mean = adapter(g, 4)
    clients = [ClientUpdate(f"client_{k}", 2 + k, {}) for k in range(3)]
    fedsa = get_aggregator("fedsa").aggregate_mean(mean, clients, 1)
    assert set(fedsa.per_client) == {c.client_id for c in clients}
    for a in fedsa.per_client.values():
        for n, f in a.items():
            torch.testing.assert_close(f.A, mean[n].A.double(), rtol=0, atol=1e-12)
    for rnd, factor in ((1, "A"), (2, "B")):  # identical stand-ins share both: the round says which
        result = get_aggregator("rolora").aggregate_mean(mean, clients, rnd)
        assert result.downloaded_factors == result.uploaded_factors == (factor,)
        assert result.options["trained_factor"] == factor
        for n, f in result.adapter.items():
            torch.testing.assert_close(f.delta(), mean[n].delta(), rtol=0, atol=1e-10)


# --- secure aggregation (SecAgg+) ----------------------------------------------------------------


def assert_within_secagg_bound(flower_dir, inproc_dir, num_examples):
    """The Flower global adapter against the in-process one, factor by factor, within SecAgg+'s
    quantisation bound for these client sizes (plus float32 rounding on the wire)."""
    from florist.adapters import read_peft_adapter
    from florist.flower import secagg

    bound = secagg.quantisation_bound([n / max(num_examples) for n in num_examples]) + 1e-6
    ours, theirs = read_peft_adapter(flower_dir)[0], read_peft_adapter(inproc_dir)[0]
    assert set(ours) == set(theirs)
    worst = 0.0
    for name in ours:
        for factor in ("A", "B"):
            a, b = getattr(ours[name], factor).double(), getattr(theirs[name], factor).double()
            worst = max(worst, float((a - b).abs().max()))
    assert worst <= bound, (worst, bound)
    return worst, bound


def capture_replies(grid) -> list:
    """Deliver each node its own copy of every message and collect the replies. A real grid
    serialises every message; SecAgg+ sends one content object to all nodes and secaggplus_mod
    pops from it, so in process each node needs its own copy."""
    replies: list = []
    deliver = grid.send_and_receive

    def capture(messages, *, timeout=None):
        out = deliver([copy.deepcopy(m) for m in messages], timeout=timeout)
        replies.extend(out)
        return out

    grid.send_and_receive = capture
    return replies


@pytest.mark.parametrize("method", ["fedit", "ffa"])
def test_secure_aggregation_on_the_fake_grid_equals_in_process(method, tmp_path, flower_identity):
    from test_flower_strategy import FakeGrid, tiny_config, write_tiny_data

    from florist.federation import run_federated
    from florist.flower import protocol
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server
    from florist.models import tiny_llama

    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "inproc", method, heter=False, rounds=1)
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(cfg, model=model, tokenizer=tokenizer)
    fcfg = tiny_config(data, tmp_path / "flower", method, heter=False, rounds=1, secure_aggregation=True)
    grid = FakeGrid(fcfg, data, [fcfg.lora_r] * 3)
    replies = capture_replies(grid)
    metrics = run_flower_server(grid, fcfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert metrics["flower"]["failures"] == []
    sizes = [s["num_examples"] for s in expected["rounds"][0]["client_stats"].values()]
    worst, bound = assert_within_secagg_bound(
        tmp_path / "flower" / "adapter", tmp_path / "inproc" / "adapter", sizes
    )
    assert 0 < worst  # quantised, so not bit-equal: the sum really went through SecAgg+
    # No reply ever carried a client's adapter: only masked integer vectors reached the server.
    assert not any(protocol.UPDATE in r.content.array_records for r in replies)
    assert any("secaggplus_configs" in r.content.config_records for r in replies)
    assert metrics["rounds"][0]["clients"] == expected["rounds"][0]["clients"]


def max_difference(a, b) -> float:
    """The largest difference of any factor of two adapter directories."""
    from florist.adapters import read_peft_adapter

    ours, theirs = read_peft_adapter(a)[0], read_peft_adapter(b)[0]
    assert set(ours) == set(theirs)
    return max(
        float((getattr(ours[n], f).double() - getattr(theirs[n], f).double()).abs().max())
        for n in ours
        for f in ("A", "B")
    )


@pytest.mark.parametrize("method,rounds", [("fedsa", 1), ("fedsa", 2), ("rolora", 2)])
def test_secure_aggregation_of_one_factor_equals_in_process(method, rounds, tmp_path, flower_identity):
    """FedSA-LoRA and RoLoRA under SecAgg+ on the fake grid: only the round's travelling factor is
    summed (FedSA: A, B_k stays on the node; RoLoRA: A, then B), and every node ends with the
    in-process run's adapter for it, with the same bytes accounted. After one round that holds
    within the quantisation bound. Round 2 trains from the quantised round-1 factor, and Adam turns
    its ~5e-6 differences into up to ~1e-4 on what trains; a node that missed the round's average
    (a B never broadcast, a B_k lost) would be off by the update itself, ~0.05 here."""
    from test_flower_strategy import FakeGrid, tiny_config, write_tiny_data

    from florist.adapters import read_peft_adapter
    from florist.federation import run_federated
    from florist.flower import protocol, secagg
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server
    from florist.models import tiny_llama

    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "inproc", method, heter=False, rounds=rounds)
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(cfg, model=model, tokenizer=tokenizer)
    fcfg = tiny_config(data, tmp_path / "flower", method, heter=False, rounds=rounds, secure_aggregation=True)
    grid = FakeGrid(fcfg, data, [fcfg.lora_r] * 3)
    for k, context in enumerate(grid.contexts.values()):
        context.node_config["output-dir"] = str(tmp_path / f"node{k}")
    replies = capture_replies(grid)
    metrics = run_flower_server(grid, fcfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert metrics["flower"]["failures"] == []
    assert not any(protocol.UPDATE in r.content.array_records for r in replies)
    sizes = [s["num_examples"] for s in expected["rounds"][0]["client_stats"].values()]
    bound = secagg.quantisation_bound([n / max(sizes) for n in sizes]) + 1e-6
    tolerance = bound if rounds == 1 else 1e-3
    inproc = tmp_path / "inproc" / "adapter"
    for k in range(3):  # FedSA: (Ā, B_k) on node k; RoLoRA: the global adapter on every node
        theirs = inproc / "clients" / f"client_{k}" if method == "fedsa" else inproc
        assert 0 < max_difference(tmp_path / f"node{k}", theirs) <= tolerance
    for ours, theirs in zip(metrics["rounds"], expected["rounds"], strict=True):
        assert ours["clients"] == theirs["clients"]
        assert ours["communication"]["total"] == theirs["communication"]["total"]  # one factor each way
        assert ours["wire"]["total"]["params_up"] == 0
    if method == "rolora":  # A moved in round 1 only: it is round 1's secure mean
        ours, theirs = (read_peft_adapter(d)[0] for d in (tmp_path / "flower" / "adapter", inproc))
        assert max(float((ours[n].A - theirs[n].A).abs().max()) for n in ours) <= bound


def test_secure_aggregation_with_local_dp_over_several_rounds(tmp_path, flower_identity):
    """SecAgg+ and local DP together, two rounds on the fake grid: the nodes noise, SecAgg+ sums."""
    from test_flower_strategy import FakeGrid, tiny_config, write_tiny_data

    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server

    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(
        data, tmp_path / "flower", "fedit", heter=False, rounds=2, secure_aggregation=True,
        dp_clip_norm=0.5, dp_noise_multiplier=0.01,
    )  # fmt: skip
    grid = FakeGrid(cfg, data, [cfg.lora_r] * 3)
    deliver = grid.send_and_receive
    grid.send_and_receive = lambda messages, *, timeout=None: deliver(
        [copy.deepcopy(m) for m in messages], timeout=timeout
    )
    metrics = run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert [len(r["clients"]) for r in metrics["rounds"]] == [3, 3]
    assert all(r["wire"]["total"]["params_up"] == 0 for r in metrics["rounds"])
    assert metrics["privacy"]["epsilon_per_round"] == [privacy.epsilon(0.01, n, cfg.dp_delta) for n in (1, 2)]


def test_secure_aggregation_refuses_heterogeneous_ranks_and_single_clients():
    with pytest.raises(ConfigError, match="--secure_aggregation needs homogeneous ranks"):
        RunConfig(method="ffa", heter=True, secure_aggregation=True).validate()
    with pytest.raises(ConfigError, match="needs at least 2 clients per round .* got 1"):
        RunConfig(
            method="fedit", num_clients=4, client_selection_frac=0.25, secure_aggregation=True
        ).validate()


@pytest.mark.parametrize("method", ["fedit", "fedsa", "rolora"])
@pytest.mark.parametrize("secure", [False, True])
def test_central_dp_on_flower_noises_the_mean_with_z_c_over_m(secure, method, tmp_path, flower_identity):
    """Central DP on Flower: the nodes clip (Flower's client-side fixed clipping), the server adds
    N(0, (zC/m)²) to the uniform mean of what travels, also when SecAgg+ hid the uploads from it.
    FedSA's adapter/ is the noised Ā with B = 0; RoLoRA's round-1 B is the public start, unnoised."""
    from test_flower_strategy import FakeGrid, tiny_config, write_tiny_data

    from florist.adapters import read_peft_adapter
    from florist.flower.app_config import FlowerOptions
    from florist.flower.server_app import run_flower_server

    data = write_tiny_data(tmp_path / "data")
    C, z, m = 1e-3, 3e5, 3  # noise std zC/m = 100 dwarfs the start (|x| < 1) and the clipped mean (<= C)
    cfg = tiny_config(
        data, tmp_path / "flower", method, heter=False, rounds=1, dp_clip_norm=C, dp_noise_multiplier=z,
        dp_mode="central", secure_aggregation=secure,
    )  # fmt: skip
    grid = FakeGrid(cfg, data, [cfg.lora_r] * m)
    deliver = grid.send_and_receive
    grid.send_and_receive = lambda messages, *, timeout=None: deliver(
        [copy.deepcopy(m) for m in messages], timeout=timeout
    )
    metrics = run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    adapter, _ = read_peft_adapter(tmp_path / "flower" / "adapter")
    travelled = {
        "A": torch.cat([f.A.double().flatten() for f in adapter.values()]),
        "B": torch.cat([(f.scaling * f.B.double()).flatten() for f in adapter.values()]),
    }
    std = z * C / m
    sent = get_aggregator(method).sent_factors(1)
    for factor in sent:  # the start and the clipped mean move the RMS by at most 1/std relative
        rms = float(travelled[factor].square().mean().sqrt())
        assert abs(rms / std - 1) < 6 / math.sqrt(2 * travelled[factor].numel()) + 1 / std, (rms, std)
    if method == "fedsa":  # B_k never reached the server: the global view is (Ā + noise, 0)
        assert not travelled["B"].any()
    if method == "rolora":  # B did not travel in round 1: the shared start (rescaled to s), no noise
        shapes = {n: (f.out_features, f.in_features) for n, f in adapter.items()}
        start = get_aggregator("rolora").initial_adapter(shapes, cfg.lora_r, cfg.seed)
        for n, f in adapter.items():
            torch.testing.assert_close(f.scaling * f.B, start[n].scaling * start[n].B, rtol=1e-6, atol=1e-7)
    assert metrics["flower"]["failures"] == []
    assert metrics["privacy"]["mode"] == "central"
    assert metrics["privacy"]["epsilon"] == privacy.epsilon(z, 1, cfg.dp_delta)


def test_the_sweep_refuses_secure_aggregation(tmp_path, federated_data):
    from conftest import tiny_run_config

    from florist.sweep import run_sweep

    cfg = tiny_run_config(federated_data(3), tmp_path / "s", method="fedit", secure_aggregation=True)
    with pytest.raises(ConfigError, match="--secure_aggregation applies to Flower runs"):
        run_sweep(cfg, methods="fedit", thresholds=[0.9], heter=(False,), model_factory=None)


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; JSON writes 1e-05 that way too.
    (tmp_path / "run.yaml").write_text("dp_delta: 1e-5\ndp_clip_norm: 1\ndp_noise_multiplier: 2e0\n")
    cfg = RunConfig.from_yaml(tmp_path / "run.yaml").validate()
    assert (cfg.dp_delta, cfg.dp_clip_norm, cfg.dp_noise_multiplier) == (1e-5, 1.0, 2.0)
    (tmp_path / "bad.yaml").write_text("dp_delta: tiny\n")
    with pytest.raises(
        ConfigError, match="bad.yaml: dp_delta must be a finite number in \\(0, 1\\), got 'tiny'"
    ):
        RunConfig.from_yaml(tmp_path / "bad.yaml").validate()


@pytest.mark.parametrize("method", ["fedit", "ffa", "florist"])
def test_one_training_noised_per_configuration_is_florist_runs_local_dp(
    method, tmp_path, federated_data, monkeypatch
):
    """bench/privacy_results.py trains each group once (florist.sweep.train_group with
    keep_start) and privatizes the uploads per configuration (close_configuration). With the noise switched off in
    both, that equals a one-round `florist run` under local DP: the same clipped uploads from the
    same starts, the same aggregate (C small enough that every upload is clipped)."""
    from conftest import tiny_run_config

    from florist.adapters import read_peft_adapter
    from florist.federation import ClientSetup, run_federated
    from florist.models import tiny_llama
    from florist.sweep import close_configuration, train_group, training_groups

    monkeypatch.setattr(privacy, "add_noise_", lambda parts, std, generator: None)
    options = {"threshold": 0.9} if method == "florist" else {}
    cfg = tiny_run_config(federated_data(3), tmp_path / "run", method=method, seed=7, dp_clip_norm=1e-3,
                          dp_noise_multiplier=1.0, dp_delta=1e-5, **options)  # fmt: skip
    model, tokenizer = tiny_llama(seed=0)
    metrics = run_federated(cfg, model=model, tokenizer=tokenizer)
    assert metrics["rounds"][0]["privacy"]["clipped"] == 3
    want, _ = read_peft_adapter(tmp_path / "run" / "adapter")

    setup = ClientSetup.load(cfg, *tiny_llama(seed=0))
    (group,) = training_groups([method])
    trained = train_group(setup, cfg, group, keep_start=True, progress=False)
    got = close_configuration(cfg, setup.host.module_shapes, trained)[1].final_adapter()
    assert got.keys() == want.keys()
    for name in want:
        delta_want = want[name].scaling * want[name].B.double() @ want[name].A.double()
        delta_got = got[name].scaling * got[name].B.double() @ got[name].A.double()
        assert torch.allclose(delta_got, delta_want, rtol=1e-5, atol=1e-9), name
