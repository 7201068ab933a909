"""The aggregation methods against independent dense computations on random adapters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florist.aggregation import ClientUpdate, LoraFactors, available_methods, get_aggregator

HETER_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
HOMO_RANKS = [16] * 8
# A square-ish module, and a non-square one narrower than sum(HETER_RANKS) = 152.
SHAPES = {"model.layers.0.self_attn.q_proj": (256, 192), "model.layers.0.self_attn.v_proj": (64, 160)}
NUM_EXAMPLES = [120, 75, 300, 40, 90, 210, 60, 105]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matrices are small: one thread is faster, and immune to oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_updates(
    ranks: list[int],
    *,
    seed: int = 0,
    alpha: float | None = None,
    shapes: dict[str, tuple[int, int]] = SHAPES,
    shared_A: bool = False,
) -> list[ClientUpdate]:
    """Random trained-looking adapters; alpha=None means alpha = 2 r (scaling 2, as in the paper)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    common_A = {name: torch.randn(r_max, n, generator=g) / math.sqrt(n) for name, (m, n) in shapes.items()}
    updates = []
    for k, r in enumerate(ranks):
        modules = {}
        for name, (m, n) in shapes.items():
            A = common_A[name][:r].clone() if shared_A else torch.randn(r, n, generator=g) / math.sqrt(n)
            B = torch.randn(m, r, generator=g) * 0.1
            modules[name] = LoraFactors(A=A, B=B, scaling=(2.0 * r if alpha is None else alpha) / r)
        updates.append(ClientUpdate(client_id=f"client_{k}", num_examples=NUM_EXAMPLES[k], modules=modules))
    return updates


def dense_delta(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k, computed the obvious way in float64."""
    total = sum(u.num_examples for u in updates)
    out = 0
    for u in updates:
        f = u.modules[name]
        out = out + (u.num_examples / total) * f.scaling * (f.B.double() @ f.A.double())
    return out


def energy_cutoff(sigma: torch.Tensor, tau: float) -> int:
    """min{k : sum_{i<=k} sigma_i^2 >= tau * sum sigma^2}, by a plain loop."""
    energy = [float(s) ** 2 for s in sigma]
    total, running = sum(energy), 0.0
    for k, e in enumerate(energy, start=1):
        running += e
        if running >= tau * total:
            return k
    return len(energy)


@pytest.fixture(scope="module")
def heter() -> list[ClientUpdate]:
    return make_updates(HETER_RANKS, seed=1)


@pytest.fixture(scope="module")
def homo() -> list[ClientUpdate]:
    return make_updates(HOMO_RANKS, seed=2)


def test_registry_has_every_method():
    assert available_methods() == [
        "fedex", "fedit", "fedsa", "ffa", "flexlora", "flora", "florist", "hetlora", "lorafair", "rolora", "zeropad"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown aggregation method 'fedavg'"):
        get_aggregator("fedavg")


# --- exact methods -----------------------------------------------------------------------


@pytest.mark.parametrize("ranks,alpha", [(HOMO_RANKS, None), (HETER_RANKS, None), (HETER_RANKS, 32.0)])
def test_flora_is_exact_stack(ranks, alpha):
    updates = make_updates(ranks, seed=3, alpha=alpha)
    result = get_aggregator("flora").aggregate(updates)
    assert result.merge and result.adapter is not None and result.per_client is None
    for name in SHAPES:
        f = result.adapter[name]
        assert f.rank == sum(ranks) == result.ranks[name]
        assert f.scaling == 1.0
        torch.testing.assert_close(f.delta(), dense_delta(updates, name), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("decomposition", ["qr", "svd"])
@pytest.mark.parametrize("ranks,alpha", [(HOMO_RANKS, None), (HETER_RANKS, 32.0)])
def test_florist_tau_one_matches_dense_svd(ranks, alpha, decomposition):
    updates = make_updates(ranks, seed=4, alpha=alpha)
    result = get_aggregator("florist", threshold=1.0, decomposition=decomposition).aggregate(updates)
    assert result.merge and result.options["threshold"] == 1.0
    for name, (m, n) in SHAPES.items():
        dense = dense_delta(updates, name)
        sigma = torch.linalg.svdvals(dense)
        expected_rank = min(m, n, sum(ranks))  # random factors: the stack has full rank
        f = result.adapter[name]
        assert f.rank == result.ranks[name] == expected_rank
        torch.testing.assert_close(
            result.singular_values[name][:expected_rank], sigma[:expected_rank], rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(f.delta(), dense, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.99])
@pytest.mark.parametrize("ranks", [HOMO_RANKS, HETER_RANKS])
def test_florist_energy_cutoff_and_truncation(ranks, tau):
    updates = make_updates(ranks, seed=5)
    result = get_aggregator("florist", threshold=tau).aggregate(updates)
    for name in SHAPES:
        dense = dense_delta(updates, name)
        sigma = torch.linalg.svdvals(dense)
        p = energy_cutoff(sigma, tau)
        assert result.ranks[name] == result.adapter[name].rank == p
        # The broadcast is the best rank-p approximation (Eckart-Young).
        error = torch.linalg.matrix_norm(dense - result.adapter[name].delta())
        assert float(error) == pytest.approx(float(sigma[p:].square().sum().sqrt()), rel=1e-6)


def test_florist_decompositions_agree(heter):
    results = {
        d: get_aggregator("florist", threshold=0.9, decomposition=d).aggregate(heter)
        for d in ("qr", "svd", "dense")
    }
    for name in SHAPES:
        ref = results["qr"].adapter[name]
        for d in ("svd", "dense"):
            f = results[d].adapter[name]
            assert f.rank == ref.rank
            # Same factors, not just the same product: the sign convention makes them unique.
            torch.testing.assert_close(f.B, ref.B, rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(f.A, ref.A, rtol=1e-7, atol=1e-9)


def test_florist_deterministic_signs(heter):
    agg = get_aggregator("florist", threshold=0.95)
    first, second = agg.aggregate(heter), agg.aggregate(heter)
    # Flipping the sign of both factors of one client leaves its update, hence the result, unchanged.
    flipped = [
        ClientUpdate(
            u.client_id, u.num_examples, {n: LoraFactors(-f.A, -f.B, f.scaling) for n, f in u.modules.items()}
        )
        if k % 2
        else u
        for k, u in enumerate(heter)
    ]
    third = agg.aggregate(flipped)
    for name in SHAPES:
        a, b, c = first.adapter[name], second.adapter[name], third.adapter[name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        torch.testing.assert_close(c.B, a.B, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(c.A, a.A, rtol=1e-7, atol=1e-9)
        rows = a.B.abs().argmax(dim=0)
        assert bool((a.B[rows, torch.arange(a.rank)] > 0).all())


def test_florist_all_zero_update_gives_rank_one_zero_adapter():
    updates = make_updates([4, 4], seed=6, shapes={"m": (8, 6)})
    updates = [
        ClientUpdate(
            u.client_id, u.num_examples, {"m": LoraFactors(u.modules["m"].A, torch.zeros(8, 4), 2.0)}
        )
        for u in updates
    ]
    result = get_aggregator("florist", threshold=1.0).aggregate(updates)
    assert result.ranks["m"] == 1
    assert float(result.adapter["m"].delta().abs().max()) == 0.0


def test_florist_rank_deficient_stack_keeps_only_nonzero_directions():
    # Two clients that uploaded the same update span only r directions, not 2r.
    (u,) = make_updates([6], seed=7, shapes={"m": (40, 30)})
    twin = ClientUpdate("twin", 50, u.modules)
    result = get_aggregator("florist", threshold=1.0).aggregate([u, twin])
    assert result.ranks["m"] == 6
    torch.testing.assert_close(result.adapter["m"].delta(), u.modules["m"].delta(), rtol=1e-6, atol=1e-10)


# --- FlexLoRA ------------------------------------------------------------------------------


@pytest.mark.parametrize("decomposition", ["dense", "qr"])
def test_flexlora_eckart_young_per_client(heter, decomposition):
    result = get_aggregator("flexlora", decomposition=decomposition).aggregate(heter)
    assert not result.merge and result.adapter is None
    assert sorted(result.per_client) == sorted(u.client_id for u in heter)
    for name in SHAPES:
        dense = dense_delta(heter, name)
        sigma = torch.linalg.svdvals(dense)
        assert result.ranks[name] == max(HETER_RANKS)
        torch.testing.assert_close(result.singular_values[name][:20], sigma[:20], rtol=1e-9, atol=1e-12)
        for u in heter:
            r = u.modules[name].rank
            f = result.adapter_for(u.client_id)[name]
            assert f.rank == r and f.scaling == 1.0
            error = torch.linalg.matrix_norm(dense - f.delta())
            assert float(error) == pytest.approx(float(sigma[r:].square().sum().sqrt()), rel=1e-6)


def test_flexlora_homogeneous_is_one_shared_adapter(homo):
    result = get_aggregator("flexlora").aggregate(homo)
    assert result.per_client is None and result.adapter is not None
    assert all(f.rank == 16 for f in result.adapter.values())


# --- FFA-LoRA ------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks,alpha", [(HOMO_RANKS, None), (HETER_RANKS, None), (HETER_RANKS, 32.0)])
def test_ffa_is_exact_with_shared_A(ranks, alpha):
    updates = make_updates(ranks, seed=8, alpha=alpha, shared_A=True)
    result = get_aggregator("ffa").aggregate(updates)
    assert result.downloaded_factors == ("B",) and result.uploaded_factors == ("B",) and not result.merge
    biggest = updates[ranks.index(max(ranks))]
    for name in SHAPES:
        full = result.adapter_for(biggest.client_id)[name]
        assert full.rank == max(ranks) == result.ranks[name]
        torch.testing.assert_close(full.delta(), dense_delta(updates, name), rtol=1e-5, atol=1e-10)
        assert torch.equal(full.A, biggest.modules[name].A.double())  # A is the shared one, untouched
        for u in updates:  # each client continues from its own prefix of the average
            f = result.adapter_for(u.client_id)[name]
            assert f.rank == u.modules[name].rank
            assert torch.equal(f.B, full.B[:, : f.rank]) and torch.equal(f.A, full.A[: f.rank])
    assert (result.per_client is None) == (len(set(ranks)) == 1)


def test_ffa_rejects_different_A():
    updates = make_updates(HETER_RANKS, seed=9, shared_A=True)
    name = "model.layers.0.self_attn.v_proj"
    f = updates[5].modules[name]
    A = f.A.clone()
    A[2, 3] += 1e-3
    updates[5].modules[name] = LoraFactors(A=A, B=f.B, scaling=f.scaling)
    with pytest.raises(
        ValueError, match=r"client 'client_5', module 'model\.layers\.0\.self_attn\.v_proj'.*shared frozen A"
    ):
        get_aggregator("ffa").aggregate(updates)


# --- FedIT and zero-padding on hand-computed examples --------------------------------------


def two_clients(
    scalings: tuple[float, float] = (2.0, 2.0), ranks: tuple[int, int] = (2, 2)
) -> list[ClientUpdate]:
    A1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    B1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    A2 = torch.tensor([[2.0, 2.0, 0.0], [4.0, 0.0, 4.0]])[: ranks[1]]
    B2 = torch.tensor([[-1.0, 1.0], [0.0, 8.0]])[:, : ranks[1]]
    return [
        ClientUpdate("a", 1, {"m": LoraFactors(A1, B1, scalings[0])}),
        ClientUpdate("b", 3, {"m": LoraFactors(A2, B2, scalings[1])}),
    ]


def test_fedit_hand_computed_average():
    result = get_aggregator("fedit").aggregate(two_clients())
    f = result.adapter["m"]
    # p = (1/4, 3/4); the common scaling 2 is kept.
    expected_A = torch.tensor([[1.75, 1.5, 0.5], [3.0, 0.25, 2.75]], dtype=torch.float64)
    expected_B = torch.tensor([[-0.5, 1.25], [0.75, 7.0]], dtype=torch.float64)
    assert f.scaling == 2.0 and not result.merge and result.ranks == {"m": 2}
    torch.testing.assert_close(f.A, expected_A)
    torch.testing.assert_close(f.B, expected_B)


def test_fedit_folds_differing_scalings():
    result = get_aggregator("fedit").aggregate(two_clients(scalings=(2.0, 4.0)))
    f = result.adapter["m"]
    expected_B = torch.tensor(
        [
            [0.25 * 2 * 1 + 0.75 * 4 * -1, 0.25 * 2 * 2 + 0.75 * 4 * 1],
            [0.25 * 2 * 3, 0.25 * 2 * 4 + 0.75 * 4 * 8],
        ],
        dtype=torch.float64,
    )
    assert f.scaling == 1.0
    torch.testing.assert_close(f.B, expected_B)


def test_fedit_rejects_heterogeneous_ranks():
    with pytest.raises(ValueError, match=r"client 'b', module 'm': rank 1 differs.*homogeneous"):
        get_aggregator("fedit").aggregate(two_clients(ranks=(2, 1)))


def test_zeropad_hand_computed_average_and_slices():
    result = get_aggregator("zeropad").aggregate(two_clients(ranks=(2, 1)))
    expected_A = torch.tensor([[1.75, 1.5, 0.5], [0.0, 0.25, -0.25]], dtype=torch.float64)
    expected_B = torch.tensor([[-0.5, 0.5], [0.75, 1.0]], dtype=torch.float64)
    assert result.ranks == {"m": 2} and result.adapter is None and not result.merge
    a, b = result.adapter_for("a")["m"], result.adapter_for("b")["m"]
    torch.testing.assert_close(a.A, expected_A)
    torch.testing.assert_close(a.B, expected_B)
    torch.testing.assert_close(b.A, expected_A[:1])
    torch.testing.assert_close(b.B, expected_B[:, :1])
    assert a.scaling == b.scaling == 2.0


def test_zeropad_homogeneous_equals_fedit(homo):
    z, f = get_aggregator("zeropad").aggregate(homo), get_aggregator("fedit").aggregate(homo)
    assert z.adapter is not None
    for name in SHAPES:
        assert torch.equal(z.adapter[name].A, f.adapter[name].A) and torch.equal(
            z.adapter[name].B, f.adapter[name].B
        )


# --- numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,options", [("florist", {"threshold": 0.9}), ("flora", {}), ("flexlora", {}), ("zeropad", {})]
)
def test_float32_mode(heter, method, options):
    r64 = get_aggregator(method, **options).aggregate(heter)
    r32 = get_aggregator(method, dtype=torch.float32, **options).aggregate(heter)
    for u in heter[:2]:
        for name in SHAPES:
            f32, f64 = r32.adapter_for(u.client_id)[name], r64.adapter_for(u.client_id)[name]
            assert f32.A.dtype == f32.B.dtype == torch.float32
            assert f32.rank == f64.rank
            torch.testing.assert_close(f32.delta(), f64.delta(), rtol=1e-4, atol=1e-5)


def test_low_precision_uploads_are_accepted(homo):
    bf16 = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {n: LoraFactors(f.A.bfloat16(), f.B.bfloat16(), f.scaling) for n, f in u.modules.items()},
        )
        for u in homo
    ]
    result = get_aggregator("flora").aggregate(bf16)
    for name in SHAPES:
        torch.testing.assert_close(
            result.adapter[name].delta(), dense_delta(bf16, name), rtol=1e-6, atol=1e-9
        )


# --- validation ----------------------------------------------------------------------------


def with_module(
    updates: list[ClientUpdate], k: int, name: str, factors: LoraFactors | None
) -> list[ClientUpdate]:
    out = [ClientUpdate(u.client_id, u.num_examples, dict(u.modules)) for u in updates]
    if factors is None:
        del out[k].modules[name]
    else:
        out[k].modules[name] = factors
    return out


@pytest.mark.parametrize("method", ["fedit", "zeropad", "flora", "flexlora", "ffa", "florist"])
def test_validation_errors_name_client_and_module(method):
    updates = make_updates([4, 4, 4], seed=10, shapes={"q": (12, 10), "v": (6, 10)}, shared_A=True)
    agg = get_aggregator(method)
    good = updates[1].modules["v"]
    inf_B = good.B.clone()
    inf_B[0, 0] = math.inf
    cases = {
        r"client 'client_1', module 'v': rank mismatch": LoraFactors(good.A, good.B[:, :3], good.scaling),
        r"client 'client_1', module 'v': contains NaN or Inf": LoraFactors(
            good.A, good.B.clone().fill_(math.nan), good.scaling
        ),
        r"client 'client_1', module 'v': contains NaN or Inf\b": LoraFactors(good.A, inf_B, good.scaling),
        r"client 'client_1', module 'v': shape 7x10 differs": LoraFactors(
            good.A, torch.ones(7, 4), good.scaling
        ),
    }
    for pattern, factors in cases.items():
        with pytest.raises(ValueError, match=pattern):
            agg.aggregate(with_module(updates, 1, "v", factors))
    with pytest.raises(ValueError, match=r"client 'client_2': modules differ.*missing \['v'\]"):
        agg.aggregate(with_module(updates, 2, "v", None))
    with pytest.raises(ValueError, match="zero clients"):
        agg.aggregate([])
    with pytest.raises(
        ValueError, match=r"client 'client_0': num_examples must be a positive integer, got 0"
    ):
        agg.aggregate([ClientUpdate("client_0", 0, updates[0].modules), *updates[1:]])


def test_bad_options():
    for tau in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            get_aggregator("florist", threshold=tau)
    with pytest.raises(ValueError, match="decomposition must be one of qr, svd, dense"):
        get_aggregator("florist", decomposition="eig")
    with pytest.raises(ValueError, match="float32 or float64"):
        get_aggregator("flora", dtype=torch.float16)


# --- edge shapes, generated ----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_exact_methods_on_edge_shapes(m, n, ranks, seed):
    """Ranks above min(m, n), single clients, vectors: FLoRA, FLoRIST(tau=1), FFA stay exact."""
    updates = make_updates(ranks, seed=seed, alpha=3.0, shapes={"m": (m, n)}, shared_A=True)
    dense = dense_delta(updates, "m")
    sigma = torch.linalg.svdvals(dense)
    for method, options in [
        ("flora", {}),
        ("ffa", {}),
        ("florist", {"threshold": 1.0}),
        ("florist", {"decomposition": "svd", "threshold": 1.0}),
    ]:
        result = get_aggregator(method, **options).aggregate(updates)
        full = result.adapter_for(updates[ranks.index(max(ranks))].client_id)["m"]
        torch.testing.assert_close(full.delta(), dense, rtol=1e-6, atol=1e-9)
    flex = get_aggregator("flexlora").aggregate(updates)
    for u in updates:
        f = flex.adapter_for(u.client_id)["m"]
        r = u.modules["m"].rank
        assert f.rank == r
        error = float(torch.linalg.matrix_norm(dense - f.delta()))
        assert error == pytest.approx(float(sigma[r:].square().sum().sqrt()), rel=1e-6, abs=1e-9)
