"""florist.screening: every kind of unusable upload is refused alone, named, logged; the rest go on.

The uploads are built here from plain tensors; each broken one differs from a valid upload in
exactly one respect, so a rejection can only be due to that respect.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florist.aggregation import ClientUpdate, LoraFactors, get_aggregator
from florist.errors import FloristError
from florist.screening import Rejection, check_update, screen_updates

# The base model's adapted modules: (out_features, in_features).
SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
Q, V = sorted(SHAPES)


def upload(cid: str, rank: int = 2, *, seed: int = 0, num_examples: int = 5) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraFactors(
            A=torch.randn(rank, n, generator=g), B=torch.randn(m, rank, generator=g), scaling=2.0
        )
        for name, (m, n) in SHAPES.items()
    }
    return ClientUpdate(client_id=cid, num_examples=num_examples, modules=modules)


def with_module(u: ClientUpdate, name: str, **changes) -> ClientUpdate:
    modules = dict(u.modules)
    modules[name] = dataclasses.replace(modules[name], **changes)
    return dataclasses.replace(u, modules=modules)


def poison(value: float, factor: str) -> Callable[[ClientUpdate], ClientUpdate]:
    def fn(u: ClientUpdate) -> ClientUpdate:
        t = getattr(u.modules[V], factor).clone()
        t[0, -1] = value
        return with_module(u, V, **{factor: t})

    return fn


def drop_module(u: ClientUpdate) -> ClientUpdate:
    return dataclasses.replace(u, modules={Q: u.modules[Q]})


def add_module(u: ClientUpdate) -> ClientUpdate:
    return dataclasses.replace(u, modules={**u.modules, "lm_head": u.modules[Q]})


# problem -> (how a valid upload is broken, text the reason must contain, the module it must name)
BROKEN: dict[str, tuple[Callable[[ClientUpdate], ClientUpdate], str, str | None]] = {
    "nan in A": (poison(float("nan"), "A"), "NaN or Inf", V),
    "inf in B": (poison(float("inf"), "B"), "NaN or Inf", V),
    "-inf in A": (poison(float("-inf"), "A"), "NaN or Inf", V),
    "wrong out features": (
        lambda u: with_module(u, Q, B=torch.zeros(9, 2)),
        "9x6 but the base model's module is 8x6",
        Q,
    ),
    "wrong in features": (
        lambda u: with_module(u, V, A=torch.zeros(2, 7)),
        "4x7 but the base model's module is 4x6",
        V,
    ),
    "A and B ranks differ": (lambda u: with_module(u, Q, A=torch.zeros(3, 6)), "rank mismatch", Q),
    "rank above min(m, n)": (
        lambda u: with_module(u, V, A=torch.zeros(5, 6), B=torch.zeros(4, 5)),
        "rank 5 exceeds the limit 4",
        V,
    ),
    "missing module": (drop_module, "missing ['model.layers.0.self_attn.v_proj']", None),
    "module the model lacks": (add_module, "unexpected ['lm_head']", None),
    "integer tensors": (
        lambda u: with_module(u, Q, A=torch.zeros(2, 6, dtype=torch.int64)),
        "floating point",
        Q,
    ),
    "3-d tensor": (lambda u: with_module(u, Q, A=torch.zeros(2, 6, 1)), "must be matrices", Q),
    "zero scaling": (lambda u: with_module(u, Q, scaling=0.0), "scaling must be a positive", Q),
    "nan scaling": (lambda u: with_module(u, Q, scaling=float("nan")), "scaling must be a positive", Q),
    "zero examples": (
        lambda u: dataclasses.replace(u, num_examples=0),
        "num_examples must be a positive integer",
        None,
    ),
    "negative examples": (
        lambda u: dataclasses.replace(u, num_examples=-3),
        "num_examples must be a positive",
        None,
    ),
    "bool examples": (
        lambda u: dataclasses.replace(u, num_examples=True),
        "num_examples must be a positive",
        None,
    ),
    "float examples": (
        lambda u: dataclasses.replace(u, num_examples=5.0),
        "num_examples must be a positive",
        None,
    ),
    "no modules": (lambda u: dataclasses.replace(u, modules={}), "no modules", None),
}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_each_broken_upload_is_rejected_alone_with_its_reason(problem: str, caplog) -> None:
    breaker, text, module = BROKEN[problem]
    good = [upload("site-a", seed=1), upload("site-c", rank=3, seed=3)]
    bad = breaker(upload("site-b", seed=2))
    with pytest.raises(ValueError, match="site-b"):
        check_update(bad, SHAPES)
    caplog.set_level(logging.WARNING, logger="florist.screening")

    accepted, rejected = screen_updates([good[0], bad, good[1]], SHAPES, min_clients=2)

    assert accepted == good  # the same objects, in upload order
    assert [r.client_id for r in rejected] == ["site-b"]
    reason = rejected[0].reason
    assert text in reason and "'site-b'" in reason and "\n" not in reason, reason
    if module is not None:
        assert f"module '{module}'" in reason, reason
    logged = [r for r in caplog.records if r.name == "florist.screening"]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert "site-b" in logged[0].getMessage() and text in logged[0].getMessage()


def test_valid_uploads_at_their_ranks_all_pass_and_aggregate() -> None:
    updates = [upload(f"c{k}", rank=r, seed=k, num_examples=3 + k) for k, r in enumerate([4, 2, 1, 2])]
    for u in updates:
        check_update(u, SHAPES)
    accepted, rejected = screen_updates(updates, SHAPES, min_clients=4)
    assert accepted == updates and rejected == []
    # A rank up to min(m, n) is legitimate: v_proj is 4x6, so rank 4 passes.
    check_update(upload("full", rank=4), SHAPES)
    for method in ("zeropad", "flora", "flexlora", "florist"):
        get_aggregator(method).aggregate(accepted)


def test_a_bad_first_upload_does_not_get_the_good_ones_blamed() -> None:
    """validate_updates compares everyone with the first upload; screening against the base
    model's shapes refuses the culprit, whatever its position."""
    bad, good = add_module(upload("intruder", seed=9)), upload("honest", seed=1)
    with pytest.raises(ValueError, match="client 'honest'"):
        get_aggregator("flora").aggregate([bad, good])  # the unscreened route blames the wrong one
    accepted, rejected = screen_updates([bad, good], SHAPES)
    assert accepted == [good] and rejected[0].client_id == "intruder"


def test_duplicate_ids_reject_every_copy() -> None:
    first, second, other = upload("same", seed=1), upload("same", seed=2), upload("other", seed=3)
    accepted, rejected = screen_updates([first, other, second], SHAPES)
    assert accepted == [other]
    assert rejected == [Rejection("same", "client 'same' uploaded 2 times in one round")] * 2


def test_assigned_ranks_and_rank_limit() -> None:
    updates = [upload("r4", rank=4, seed=1), upload("r2", rank=2, seed=2), upload("unlisted", rank=3)]
    accepted, rejected = screen_updates(updates, SHAPES, expected_ranks={"r4": 2, "r2": 2})
    assert accepted == updates[1:]
    assert "rank 4, but the client was assigned rank 2" in rejected[0].reason
    accepted, rejected = screen_updates(updates, SHAPES, max_rank=3)
    assert accepted == updates[1:] and "rank 4 exceeds the limit 3" in rejected[0].reason
    # without the base model's shapes the rank limit still applies
    with pytest.raises(ValueError, match="rank 4 exceeds the limit 2"):
        check_update(updates[0], max_rank=2)


def test_too_few_survivors_stop_the_round_with_every_reason() -> None:
    updates = [
        upload("ok", seed=1),
        poison(float("nan"), "A")(upload("nan-site")),
        drop_module(upload("short")),
    ]
    accepted, _ = screen_updates(updates, SHAPES, min_clients=1)
    assert accepted == updates[:1]
    with pytest.raises(FloristError) as info:
        screen_updates(updates, SHAPES, min_clients=2)
    message = str(info.value)
    assert message.startswith("only 1 of 3 client uploads passed screening (min_clients=2): ")
    assert (
        "'nan-site'" in message and "NaN or Inf" in message and "'short'" in message and "missing" in message
    )
    assert "\n" not in message
    with pytest.raises(FloristError, match="only 0 of 0 .*no uploads"):
        screen_updates([], SHAPES)
    with pytest.raises(ValueError, match="min_clients must be at least 1"):
        screen_updates(updates, SHAPES, min_clients=0)


def test_not_an_update_is_rejected_not_crashing() -> None:
    accepted, rejected = screen_updates([upload("fine"), {"client_id": "dict"}], SHAPES)  # type: ignore[list-item]
    assert [u.client_id for u in accepted] == ["fine"]
    assert rejected[0].client_id == "None" and "expected a ClientUpdate" in rejected[0].reason


CORRUPTIONS = [poison(float("nan"), "A"), poison(float("inf"), "B"), drop_module, add_module]


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    corrupt=st.lists(st.integers(-1, len(CORRUPTIONS) - 1), min_size=6, max_size=6),
    min_clients=st.integers(1, 6),
)
def test_screening_keeps_exactly_the_intact_uploads(
    ranks: list[int], corrupt: list[int], min_clients: int
) -> None:
    updates, intact = [], []
    for k, r in enumerate(ranks):
        u = upload(f"c{k}", rank=r, seed=k)
        if corrupt[k] >= 0:
            u = CORRUPTIONS[corrupt[k]](u)
        else:
            intact.append(u)
        updates.append(u)
    if len(intact) < min_clients:
        with pytest.raises(FloristError, match=f"only {len(intact)} of {len(updates)}"):
            screen_updates(updates, SHAPES, min_clients=min_clients)
        return
    accepted, rejected = screen_updates(updates, SHAPES, min_clients=min_clients)
    assert accepted == intact
    assert sorted(r.client_id for r in rejected) == sorted(u.client_id for u in updates if u not in intact)
    if accepted:
        get_aggregator("florist", threshold=0.9).aggregate(accepted)  # never raises on screened input
