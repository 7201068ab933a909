"""Property tests on untrusted input: the reader and every aggregator either give the right answer
or a clean ValueError naming the client, never another exception, a hang or a silent wrong result."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from florist.adapters import AdapterError, read_peft_adapter
from florist.aggregation import AGGREGATORS, ClientUpdate, LoraFactors, get_aggregator

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int8]


def _write_dir(directory: Path, weights: bytes, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _read(weights: bytes, config: dict):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "client"
        _write_dir(directory, weights, config)
        try:
            return read_peft_adapter(directory, client_id="fuzz-client")[0], None
        except AdapterError as e:
            # The one allowed failure: a ValueError naming the directory and the client.
            assert isinstance(e, ValueError)
            assert str(directory) in str(e) and "fuzz-client" in str(e)
            return None, e


# --- the reader: random tensors --------------------------------------------------------------


@st.composite
def tensor_sets(draw):
    """A set of lora tensors that is valid or broken in one of many ways."""
    rank = draw(st.integers(1, 4))
    modules = draw(
        st.lists(st.sampled_from(["m.q", "m.v", "layers.0.k", "x"]), min_size=1, max_size=3, unique=True)
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in modules:
        n_in, n_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        for factor, shape in (("A", [rank, n_in]), ("B", [n_out, rank])):
            if draw(st.integers(0, 9)) == 0:  # sometimes the wrong shape: rank, ndim or empty
                shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
            dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 4)) == 0 else torch.float32
            values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
            special = draw(st.sampled_from([None, None, None, math.nan, math.inf, -math.inf, 1e30]))
            if special is not None and values.numel():
                values.view(-1)[0] = special
            tensors[f"base_model.model.{name}.lora_{factor}.weight"] = values.to(dtype)
    if draw(st.integers(0, 9)) == 0:
        tensors.pop(sorted(tensors)[0])  # an A without its B (or the reverse)
    if draw(st.integers(0, 14)) == 0:
        tensors["base_model.model.m.q.lora_embedding_A"] = torch.zeros(1, 1)
    return tensors, {
        "peft_type": "LORA",
        "r": rank if draw(st.integers(0, 9)) else rank + 1,
        "lora_alpha": 2 * rank,
    }


def _expected_valid(tensors: dict[str, torch.Tensor], config: dict) -> bool:
    """Independent statement of what a valid upload is."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not (key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            return False
        modules.setdefault(key[len("base_model.model.") : -len(".lora_A.weight")], {})[key[-8]] = t
    for pair in modules.values():
        if set(pair) != {"A", "B"}:
            return False
        A, B = pair["A"], pair["B"]
        if not (A.is_floating_point() and B.is_floating_point() and A.ndim == 2 and B.ndim == 2):
            return False
        if not (A.shape[0] == B.shape[1] == config["r"] and A.shape[1] > 0 and B.shape[0] > 0):
            return False
        if not (torch.isfinite(A.float()).all() and torch.isfinite(B.float()).all()):
            return False
    return True


@SETTINGS
@given(tensor_sets())
def test_reader_accepts_exactly_the_valid_uploads(case) -> None:
    tensors, config = case
    adapter, error = _read(safetensors_bytes(tensors), config)
    assert (error is None) == _expected_valid(tensors, config), error
    if adapter is not None:
        for name, f in adapter.items():
            assert f.scaling == 2.0
            for factor in "AB":
                original = tensors[f"base_model.model.{name}.lora_{factor}.weight"]
                got = getattr(f, factor)
                assert got.dtype in (torch.float32, torch.float64)
                assert torch.equal(got, original.to(got.dtype))  # widening is exact


# --- the reader: random bytes ----------------------------------------------------------------

VALID = safetensors_bytes(
    {
        "base_model.model.m.q.lora_A.weight": torch.randn(2, 3),
        "base_model.model.m.q.lora_B.weight": torch.randn(4, 2),
    }
)
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}


@st.composite
def mangled_files(draw) -> bytes:
    data = bytearray(VALID)
    how = draw(st.sampled_from(["truncate", "flip", "header", "random", "length"]))
    if how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "header":
        header = draw(st.binary(max_size=200))
        data = bytearray(len(header).to_bytes(8, "little") + header + bytes(data[8:]))
    elif how == "length":
        data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    else:
        data = bytearray(draw(st.binary(max_size=300)))
    return bytes(data)


@SETTINGS
@given(mangled_files())
def test_reader_survives_mangled_bytes(data: bytes) -> None:
    adapter, _ = _read(data, CONFIG)
    if adapter is not None:  # a byte flip inside the data can leave a valid file: then it must be sound
        f = adapter["m.q"]
        assert f.A.shape == (2, 3) and f.B.shape == (4, 2)
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()


@SETTINGS
@given(st.one_of(st.binary(max_size=100), st.text(max_size=50).map(str.encode)))
def test_reader_survives_mangled_config(config_bytes: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write_dir(directory, VALID, {})
        (directory / "adapter_config.json").write_bytes(config_bytes)
        try:
            read_peft_adapter(directory)
        except AdapterError as e:
            assert str(directory) in str(e)


# --- every aggregator ------------------------------------------------------------------------


@st.composite
def rounds(draw):
    """Client updates with random sizes, ranks, dtypes, values, scalings and example counts."""
    K = draw(st.integers(1, 4))
    homogeneous = draw(st.booleans())
    shared_A = draw(st.booleans())  # FFA is only defined when every client shares A
    poison = draw(
        st.sampled_from([None] * 6 + ["nan", "inf", "huge", "overflow", "count", "scaling", "shape"])
    )
    names = [f"layers.{i}.q" for i in range(draw(st.integers(1, 3)))]
    shapes = {n: (draw(st.integers(1, 6)), draw(st.integers(1, 6))) for n in names}
    ranks = {n: draw(st.integers(1, 4)) for n in names}
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    common_A = {n: torch.randn(8, shapes[n][1], generator=g) for n in names}
    updates = []
    for k in range(K):
        modules = {}
        for n in names:
            r = ranks[n] if homogeneous else draw(st.integers(1, 4))
            m, d = shapes[n]
            A = common_A[n][:r].clone() if shared_A else torch.randn(r, d, generator=g)
            B = torch.randn(m, r, generator=g) * draw(st.sampled_from([1.0, 1e-3, 1e3]))
            scaling = draw(st.sampled_from([1.0, 2.0, 0.5, 16.0])) if not homogeneous else 2.0
            modules[n] = LoraFactors(A=A.to(dtype), B=B.to(dtype), scaling=scaling)
        counts = draw(st.integers(1, 2000))
        updates.append(ClientUpdate(client_id=f"client-{k}", num_examples=counts, modules=modules))
    victim = updates[draw(st.integers(0, K - 1))]
    name = names[0]
    f = victim.modules[name]
    if poison in ("nan", "inf"):
        B = f.B.clone()
        B[0, 0] = math.nan if poison == "nan" else -math.inf
        victim.modules[name] = LoraFactors(f.A, B, f.scaling)
    elif poison == "huge":
        victim.modules[name] = LoraFactors(
            f.A, f.B * draw(st.sampled_from([1e30, 1e37])) if dtype != torch.float16 else f.B, f.scaling
        )
    elif poison == "overflow":  # finite in the upload, beyond float32 once scaled and summed
        big = torch.full_like(f.B, 3e38, dtype=torch.float64).to(
            f.B.dtype if dtype != torch.float16 else torch.float32
        )
        victim.modules[name] = LoraFactors(f.A, big, 16.0)
    elif poison == "count":
        victim.num_examples = draw(st.sampled_from([0, -1, -100]))
    elif poison == "scaling":
        victim.modules[name] = LoraFactors(f.A, f.B, draw(st.sampled_from([0.0, -1.0, math.nan, math.inf])))
    elif poison == "shape":
        victim.modules[name] = LoraFactors(torch.randn(f.rank, f.in_features + 1), f.B, f.scaling)
    return updates


def _dense(updates) -> dict[str, torch.Tensor]:
    total = sum(u.num_examples for u in updates)
    names = updates[0].modules
    return {
        n: sum(u.num_examples / total * u.modules[n].delta(torch.float64) for u in updates) for n in names
    }


def _scale(updates, name: str) -> float:
    """A magnitude for tolerances: sum_k p_k s_k |B_k| |A_k|."""
    total = sum(u.num_examples for u in updates)
    return sum(
        u.num_examples
        / total
        * u.modules[name].scaling
        * float(u.modules[name].B.double().norm() * u.modules[name].A.double().norm())
        for u in updates
    )


def _check_optimal_truncation(dW: torch.Tensor, got: torch.Tensor, rank: int, tol: float) -> None:
    """Eckart-Young: the best rank-r approximation error, robust to tied singular values."""
    S = torch.linalg.svdvals(dW)
    best = float(S[rank:].pow(2).sum().sqrt()) if rank < S.numel() else 0.0
    assert abs(float((dW - got).norm()) - best) <= tol, (float((dW - got).norm()), best, tol)


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
@SETTINGS
@given(
    updates=rounds(),
    agg_dtype=st.sampled_from([torch.float64, torch.float32]),
    tau=st.sampled_from([1.0, 0.9, 0.5]),
)
def test_every_aggregator_is_right_or_refuses_cleanly(method: str, updates, agg_dtype, tau) -> None:
    options = {"threshold": tau} if method == "florist" else {}
    aggregator = get_aggregator(method, dtype=agg_dtype, **options)
    names = sorted(updates[0].modules)
    try:
        result = aggregator.aggregate(updates)
    except ValueError as e:
        # Names the culprit: a client, or for an overflow of the sum, the module.
        assert any(repr(u.client_id) in str(e) for u in updates) or repr(names[0]) in str(e), e
        event(f"refused: {str(e).split(':')[1][:40]}")
        return
    event(f"aggregated ({'per client' if result.per_client is not None else 'one adapter'})")
    eps = 1e-9 if agg_dtype == torch.float64 else 1e-4
    dense = _dense(updates)
    for name, dW in dense.items():
        tol = eps * max(_scale(updates, name), 1e-30) * 10
        shares = [result.adapter] if result.adapter is not None else list(result.per_client.values())
        for share in shares:
            assert torch.isfinite(share[name].A).all() and torch.isfinite(share[name].B).all()
        if method in ("flora", "ffa") or (method == "florist" and tau == 1.0):
            largest = max(updates, key=lambda u: u.modules[name].rank)
            got = result.adapter_for(largest.client_id)[name].delta()
            assert float((got - dW).norm()) <= tol, (method, float((got - dW).norm()), tol)
        elif method in ("fedit", "zeropad"):
            total = sum(u.num_examples for u in updates)
            r = max(u.modules[name].rank for u in updates)
            m, n = dW.shape
            B_bar, A_bar = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, n, dtype=torch.float64)
            for u in updates:
                f = u.modules[name]
                B_bar[:, : f.rank] += u.num_examples / total * f.scaling * f.B.double()
                A_bar[: f.rank] += u.num_examples / total * f.A.double()
            largest = max(updates, key=lambda u: u.modules[name].rank)
            got = result.adapter_for(largest.client_id)[name].delta()
            assert float((got - B_bar @ A_bar).norm()) <= tol
        elif method == "flexlora":
            for u in updates:
                got = result.adapter_for(u.client_id)[name]
                assert got.rank == u.modules[name].rank
                _check_optimal_truncation(dW, got.delta(), got.rank, tol)
        elif method == "florist":
            got = result.adapter[name]
            assert got.rank == result.ranks[name]
            _check_optimal_truncation(dW, got.delta(), got.rank, tol)
            S2 = torch.linalg.svdvals(dW).pow(2)
            if S2.sum() > 0:
                kept = float(S2[: got.rank].sum() / S2.sum())
                assert kept >= tau - 1e-6  # enough energy...
                if got.rank > 1:  # ...and no more directions than needed
                    assert float(S2[: got.rank - 1].sum() / S2.sum()) < tau + 1e-6


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_float32_overflow_is_refused_not_returned_as_inf(method: str) -> None:
    """The deterministic core of the fuzz case above: finite uploads whose scaled sum exceeds float32.

    Methods that keep the common scaling may return the (finite) averaged factors; none may
    return Inf/NaN factors or fail with anything but a ValueError naming the module or client.
    """
    A = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    updates = [
        ClientUpdate(f"client-{k}", 5, {"layers.0.q": LoraFactors(A, torch.full((3, 2), 3e38), 16.0)})
        for k in range(2)
    ]
    aggregator = get_aggregator(
        method, dtype=torch.float32, **({"threshold": 0.9} if method == "florist" else {})
    )
    try:
        result = aggregator.aggregate(updates)
    except ValueError as e:
        assert "layers.0.q" in str(e) or "client-" in str(e), e
        return
    for adapter in [result.adapter] if result.per_client is None else result.per_client.values():
        f = adapter["layers.0.q"]
        assert bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all()), f"{method} returned Inf"
