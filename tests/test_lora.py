"""florist.lora.LoraHost: one base model, a swappable LoRA slot, exact install/extract/merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from florist.aggregation.base import GlobalResult, LoraFactors
from florist.lora import LoraHost
from florist.models import tiny_llama
from florist.rounds import ServerState

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def host() -> LoraHost:
    model, _ = tiny_llama(seed=0)
    return LoraHost(model, TARGETS)


def _inputs() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))


def _logits(host: LoraHost, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return host.model(input_ids=x).logits


def _random_adapter(
    host: LoraHost, ranks: dict[str, int] | int, scaling: float, seed: int = 1
) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n_out, n_in) in host.module_shapes.items():
        r = ranks if isinstance(ranks, int) else ranks[name]
        out[name] = LoraFactors(
            A=torch.randn(r, n_in, generator=g) * 0.1,
            B=torch.randn(n_out, r, generator=g) * 0.1,
            scaling=scaling,
        )
    return out


def test_module_names_and_shapes_come_from_the_plain_model() -> None:
    model, _ = tiny_llama(seed=0)
    expected = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    }
    host = LoraHost(model, TARGETS)
    assert host.module_names == list(expected)
    assert host.module_shapes == expected
    assert host.module_names[0] == "model.layers.0.self_attn.q_proj"
    assert host.model is model  # wrapped in place, never copied


def test_wrapping_is_a_no_op_and_freezes_the_base() -> None:
    model, _ = tiny_llama(seed=0)
    x = _inputs()
    with torch.no_grad():
        before = model(input_ids=x).logits
    host = LoraHost(model, TARGETS)
    assert torch.equal(_logits(host, x), before)
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_targets_are_rejected() -> None:
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="nope_proj"):
        LoraHost(model, ["nope_proj"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoraHost(tiny_llama(seed=0)[0], [])


def test_fresh_install_is_kaiming_A_zero_B_from_the_generator(host: LoraHost) -> None:
    x = _inputs()
    base = _logits(host, x)
    host.install(4, 8.0, generator=torch.Generator().manual_seed(11))
    assert torch.equal(_logits(host, x), base)  # B = 0: the fresh adapter changes nothing
    got = host.extract()
    # Independent reference: Kaiming-uniform(a=sqrt(5)) drawn in module order from the same seed.
    g = torch.Generator().manual_seed(11)
    for name, (n_out, n_in) in host.module_shapes.items():
        expected = torch.nn.init.kaiming_uniform_(torch.empty(4, n_in), a=math.sqrt(5), generator=g)
        assert torch.equal(got[name].A, expected)
        assert got[name].A.abs().max() <= 1 / math.sqrt(n_in)
        assert torch.equal(got[name].B, torch.zeros(n_out, 4))
        assert got[name].scaling == 2.0
        assert got[name].A.dtype == torch.float32 and got[name].A.device.type == "cpu"
    # The same generator state gives the same A; another seed another A.
    host.install(4, 8.0, generator=torch.Generator().manual_seed(11))
    again = host.extract()
    host.install(4, 8.0, generator=torch.Generator().manual_seed(12))
    other = host.extract()
    name = host.module_names[0]
    assert torch.equal(again[name].A, got[name].A) and not torch.equal(other[name].A, got[name].A)


def test_extract_returns_copies(host: LoraHost) -> None:
    host.install(2, 2.0, generator=torch.Generator().manual_seed(0))
    first = host.extract()
    name = host.module_names[0]
    first[name].A.zero_()
    assert host.extract()[name].A.abs().sum() > 0


def test_install_from_init_rescales_B_so_the_update_is_exact(host: LoraHost) -> None:
    x = _inputs()
    init = _random_adapter(host, 4, scaling=2.0)
    with host.use_adapter(init):
        reference = _logits(host, x)
    host.install(4, 16.0, init=init)  # scaling 4: B must be halved
    got = host.extract()
    for name, f in init.items():
        assert got[name].scaling == 4.0
        assert torch.equal(got[name].A, f.A)
        assert torch.allclose(got[name].B * got[name].scaling, f.B * f.scaling, rtol=0, atol=1e-7)
    assert torch.allclose(_logits(host, x), reference, atol=1e-5)
    # Same alpha/r as init: an exact copy.
    host.install(4, 8.0, init=init)
    assert all(torch.equal(host.extract()[n].B, f.B) for n, f in init.items())


def test_install_checks_the_init_adapter(host: LoraHost) -> None:
    init = _random_adapter(host, 4, scaling=1.0)
    with pytest.raises(ValueError, match="rank 4, expected 8"):
        host.install(8, 16.0, init=init)
    name = host.module_names[1]
    bad = dict(init)
    bad[name] = LoraFactors(A=init[name].A, B=init[name].B.clone().fill_(float("nan")), scaling=1.0)
    with pytest.raises(ValueError, match=f"{name}.*NaN"):
        host.install(4, 4.0, init=bad)
    missing = dict(init)
    del missing[name]
    with pytest.raises(ValueError, match=f"module '{name}' is missing"):
        host.install(4, 4.0, init=missing)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        host.install(0, 1.0)


def test_frozen_A_is_used_and_frozen(host: LoraHost) -> None:
    g = torch.Generator().manual_seed(3)
    frozen = {n: torch.randn(8, n_in, generator=g) for n, (_o, n_in) in host.module_shapes.items()}
    host.install(4, 8.0, frozen_A=frozen)
    got = host.extract()
    for name in host.module_names:
        assert torch.equal(got[name].A, frozen[name][:4])
    trainable = host.trainable_parameters()
    assert len(trainable) == len(host.module_names)  # only the Bs
    assert all(p.shape[1] == 4 for p in trainable)
    with pytest.raises(ValueError, match="need at least 16 rows"):
        host.install(16, 32.0, frozen_A=frozen)


def test_merge_into_base_is_the_dense_update(host: LoraHost) -> None:
    adapter = _random_adapter(host, 3, scaling=1.5)
    before = {n: host.base_weight(n).detach().clone() for n in host.module_names}
    x = _inputs()
    with host.use_adapter(adapter):
        unmerged = _logits(host, x)
    host.merge_into_base(adapter)
    for name, f in adapter.items():
        expected = before[name].double() + 1.5 * f.B.double() @ f.A.double()
        assert torch.allclose(host.base_weight(name).double(), expected, atol=1e-6)
        assert host.base_weight(name).dtype == torch.float32
    assert torch.allclose(_logits(host, x), unmerged, atol=1e-5)


def test_merge_is_bit_reproducible() -> None:
    hosts = [LoraHost(tiny_llama(seed=0)[0], TARGETS) for _ in range(2)]
    adapter = _random_adapter(hosts[0], 5, scaling=0.7)
    for h in hosts:
        h.merge_into_base(adapter)
    for name in hosts[0].module_names:
        assert torch.equal(hosts[0].base_weight(name), hosts[1].base_weight(name))


def test_the_server_keeps_the_merged_history_at_the_merge_precision(host: LoraHost) -> None:
    """FLoRA's update (float64, as aggregated) is stored in the float32 the base merges in: half the
    memory, and the base it rebuilds on resume is the one the float64 update gave, bit for bit."""
    folded = {n: LoraFactors(A=f.A.double(), B=f.B.double() / 3, scaling=f.scaling)
              for n, f in _random_adapter(host, 5, scaling=0.7).items()}  # fmt: skip
    server = ServerState(merged_dtype=host.merge_dtype)
    server.broadcast(GlobalResult("flora", merge=True, ranks={n: 5 for n in folded}, adapter=folded))
    (kept,) = server.merged
    assert host.merge_dtype == torch.float32
    assert all(f.A.dtype == f.B.dtype == torch.float32 for f in kept.values())
    replay = LoraHost(tiny_llama(seed=0)[0], TARGETS)
    host.merge_into_base(folded)
    replay.merge_into_base(kept)
    for name in host.module_names:
        assert torch.equal(host.base_weight(name), replay.base_weight(name))
    wide = LoraHost(tiny_llama(seed=0)[0].double(), TARGETS)
    assert wide.merge_dtype == torch.float64


def test_merge_rejects_foreign_modules(host: LoraHost) -> None:
    f = LoraFactors(A=torch.zeros(2, 64), B=torch.zeros(64, 2))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj' is not a LoRA target"):
        host.merge_into_base({"model.layers.0.mlp.up_proj": f})
    with pytest.raises(ValueError, match="expected A"):
        host.merge_into_base({host.module_names[1]: LoraFactors(A=torch.zeros(2, 64), B=torch.zeros(64, 2))})


def test_use_adapter_with_heterogeneous_ranks_matches_a_merged_copy(host: LoraHost) -> None:
    ranks = {name: r for name, r in zip(host.module_names, [1, 7, 3, 12])}
    adapter = _random_adapter(host, ranks, scaling=0.25)
    reference = LoraHost(copy.deepcopy(tiny_llama(seed=0)[0]), TARGETS)
    reference.merge_into_base(adapter)
    x = _inputs()
    with host.use_adapter(adapter) as model:
        assert model is host.model
        got = _logits(host, x)
    assert torch.allclose(got, _logits(reference, x), atol=1e-5)


def test_use_adapter_restores_the_slot_and_its_flags(host: LoraHost) -> None:
    x = _inputs()
    base = _logits(host, x)
    g = torch.Generator().manual_seed(0)
    frozen = {n: torch.randn(4, n_in, generator=g) for n, (_o, n_in) in host.module_shapes.items()}
    host.install(4, 4.0, frozen_A=frozen, init=_random_adapter(host, 4, scaling=1.0, seed=5))
    flags = [p.requires_grad for p in host.model.parameters()]
    installed = _logits(host, x)
    other = _random_adapter(host, 2, scaling=3.0, seed=9)
    with host.use_adapter(other):
        assert not torch.allclose(_logits(host, x), installed)
    assert torch.equal(_logits(host, x), installed)
    assert [p.requires_grad for p in host.model.parameters()] == flags
    with host.use_adapter(None):
        assert torch.equal(_logits(host, x), base)
    assert torch.equal(_logits(host, x), installed)
    assert [p.requires_grad for p in host.model.parameters()] == flags
    with pytest.raises(RuntimeError, match="boom"), host.use_adapter(other):
        raise RuntimeError("boom")
    assert torch.equal(_logits(host, x), installed)
    host.remove()
    assert torch.equal(_logits(host, x), base)


def test_eight_clients_share_one_base_model() -> None:
    model, _ = tiny_llama(seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    host = LoraHost(model, TARGETS)
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    for k in range(8):
        host.install(4 + k, 8.0, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            for p in host.trainable_parameters():
                p.add_(1.0)
        assert sum(p.numel() for p in model.parameters()) > n_params
        host.remove()
    assert sum(p.numel() for p in model.parameters()) == n_params
    after = dict(model.named_parameters())
    assert set(after) == set(base)
    for n, (ptr, value) in base.items():
        assert after[n].data_ptr() == ptr and torch.equal(after[n], value)


def test_unload_returns_the_plain_model(host: LoraHost) -> None:
    plain_keys = list(tiny_llama(seed=0)[0].state_dict())
    host.install(2, 4.0, generator=torch.Generator().manual_seed(0))
    plain = host.unload()
    assert list(plain.state_dict()) == plain_keys
