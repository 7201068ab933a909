"""florist.training: seeded randomness, batching, the LocalTrainer's optimisation and determinism."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from florist.aggregation.base import LoraFactors
from florist.config import RunConfig
from florist.lora import LoraHost
from florist.models import tiny_llama
from florist.training import (
    IGNORE_INDEX,
    LocalTrainer,
    TrainConfig,
    client_generator,
    collate,
    ffa_frozen_A,
    init_generator,
    plan_batches,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "the cat sat on the mat",
    "hello world",
    "federated learning with low rank adapters",
    "a",
    "one two three four five six seven",
    "LoRA",
    "the quick brown fox jumps over the lazy dog",
    "paris is the capital of france",
]


def make_examples(tokenizer, texts: list[str] = TEXTS, mask_prompt: bool = False) -> list[dict]:
    out = []
    for text in texts:
        ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
        labels = list(ids)
        if mask_prompt:  # like train_on_inputs=False: the first 2 tokens are not learned
            labels[:2] = [IGNORE_INDEX] * min(2, len(labels))
        out.append({"input_ids": ids, "labels": labels})
    return out


def make_trainer(**overrides) -> tuple[LocalTrainer, LoraHost, object]:
    model, tokenizer = tiny_llama(seed=0)
    host = LoraHost(model, ["q_proj", "v_proj"], dropout=overrides.pop("dropout", 0.0))
    settings = dict(
        micro_batch_size=2, batch_size=4, epochs=1, learning_rate=1e-2, precision="fp32", progress=False
    )
    settings.update(overrides)
    return LocalTrainer(host, tokenizer, TrainConfig(**settings), torch.device("cpu")), host, tokenizer


def train(trainer: LocalTrainer, examples: list[dict], **kwargs):
    args = dict(client_id="c0", client_index=0, round_index=1, rank=4, alpha=8.0, init=None, seed=42)
    args.update(kwargs)
    return trainer.train(examples=examples, **args)


# --- randomness ----------------------------------------------------------------------------


def test_client_generator_depends_only_on_seed_round_client() -> None:
    def draw(*key: int) -> torch.Tensor:
        return torch.rand(5, generator=client_generator(*key))

    assert torch.equal(draw(42, 1, 3), draw(42, 1, 3))
    keys = [(42, 1, 3), (43, 1, 3), (42, 2, 3), (42, 1, 4), (42, 3, 1)]
    draws = [draw(*k) for k in keys]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])


def test_ffa_frozen_A_is_shared_and_seeded_per_module() -> None:
    shapes = {"m.a": (8, 16), "m.b": (4, 32)}
    first, second = ffa_frozen_A(1, shapes, 6), ffa_frozen_A(1, shapes, 6)
    assert {n: a.shape for n, a in first.items()} == {"m.a": (6, 16), "m.b": (6, 32)}
    assert all(torch.equal(first[n], second[n]) for n in shapes)
    assert not torch.equal(first["m.a"], ffa_frozen_A(2, shapes, 6)["m.a"])
    # A module's A does not depend on which other modules exist.
    assert torch.equal(ffa_frozen_A(1, {"m.a": (8, 16)}, 6)["m.a"], first["m.a"])
    assert all(a.abs().max() <= 1 / a.shape[1] ** 0.5 for a in first.values())  # Kaiming-uniform bound


# --- configuration and batching --------------------------------------------------------------


def test_train_config_from_run_config_and_validation() -> None:
    run = RunConfig(
        local_batch_size=32,
        local_micro_batch_size=8,
        local_num_epochs=2,
        local_learning_rate=1e-3,
        local_max_steps=5,
        group_by_length=False,
        precision="fp32",
        cutoff_len=256,
    )
    cfg = TrainConfig.from_run_config(run)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.learning_rate) == (32, 8, 2, 1e-3)
    assert (cfg.max_steps, cfg.group_by_length, cfg.precision, cfg.cutoff_len) == (5, False, "fp32", 256)
    assert cfg.accumulation_steps == 4
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainConfig(micro_batch_size=3, batch_size=8)
    with pytest.raises(ValueError, match="max_steps must be positive"):
        TrainConfig(max_steps=0)


def test_collate_pads_right_with_ignored_labels() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    batch = collate(examples, 0, 512, pad_to_multiple_of=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert collate([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}], 0, 2)["input_ids"].tolist() == [
        [1, 2]
    ]
    # Widths are rounded up to the multiple (default 32), padding with ignored labels ...
    wide = collate(examples, 0, 512)
    assert wide["input_ids"].shape == (2, 32)
    assert (
        wide["input_ids"][:, :3].tolist() == batch["input_ids"].tolist()
        and not wide["input_ids"][:, 3:].any()
    )
    assert (wide["labels"][:, 3:] == -100).all() and not wide["attention_mask"][:, 3:].any()
    # ... but never past cutoff_len.
    assert collate([{"input_ids": [1] * 40, "labels": [1] * 40}], 0, 50)["input_ids"].shape == (1, 50)
    assert collate([{"input_ids": [1] * 70, "labels": [1] * 70}], 0, 64)["input_ids"].shape == (1, 64)


def test_padding_to_a_multiple_changes_neither_the_loss_nor_the_gradient() -> None:
    trainer, host, tok = make_trainer()
    examples = make_examples(tok)
    host.install(4, 8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B != 0, so A has a gradient too
        for p in host.trainable_parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    results = []
    for multiple in (1, 32):
        loss = host.model(**collate(examples, tok.pad_token_id, 512, pad_to_multiple_of=multiple)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in host.trainable_parameters()]))
        host.model.zero_grad(set_to_none=True)
    host.remove()
    (loss1, grads1), (loss32, grads32) = results
    torch.testing.assert_close(loss32, loss1, rtol=1e-5, atol=1e-6)
    for g32, g1 in zip(grads32, grads1):
        torch.testing.assert_close(g32, g1, rtol=1e-4, atol=1e-6)


def _padded_cells(lengths: list[int], cfg: TrainConfig, steps: int) -> tuple[int, list[int]]:
    batches = plan_batches(lengths, cfg, torch.Generator().manual_seed(0))
    cells, seen = 0, []
    for _ in range(steps):
        for mb in next(batches):
            cells += len(mb) * max(lengths[i] for i in mb)
            seen += mb
    return cells, seen


def test_length_grouping_reduces_padding_and_covers_every_example() -> None:
    lengths = torch.randint(5, 400, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    grouped_cfg = TrainConfig(micro_batch_size=4, batch_size=16, group_by_length=True)
    plain_cfg = TrainConfig(micro_batch_size=4, batch_size=16, group_by_length=False)
    grouped, seen_g = _padded_cells(lengths, grouped_cfg, 16)  # one epoch
    plain, seen_p = _padded_cells(lengths, plain_cfg, 16)
    assert sorted(seen_g) == sorted(seen_p) == list(range(256))
    assert grouped < 0.7 * plain
    assert grouped >= sum(lengths)
    # Deterministic from the generator.
    assert _padded_cells(lengths, grouped_cfg, 16)[1] == seen_g


def test_short_client_still_takes_a_step() -> None:
    cfg = TrainConfig(micro_batch_size=2, batch_size=8, group_by_length=True)
    batch = next(plan_batches([3, 5, 4], cfg, torch.Generator().manual_seed(0)))
    assert sorted(i for mb in batch for i in mb) == [0, 1, 2] and [len(mb) for mb in batch] == [2, 1]


# --- training ------------------------------------------------------------------------------


def _mean_loss(host: LoraHost, examples: list[dict], pad: int, adapter=None) -> float:
    batch = collate(examples, pad, 512)
    with host.use_adapter(adapter), torch.no_grad():
        return float(host.model(**batch).loss)


def test_training_reduces_the_loss() -> None:
    trainer, host, tok = make_trainer(epochs=15, lr_scheduler="constant", learning_rate=5e-2)
    examples = make_examples(tok)
    before = _mean_loss(host, examples, tok.pad_token_id)
    result = train(trainer, examples)
    after = _mean_loss(host, examples, tok.pad_token_id, result.update.modules)
    assert result.steps == 30 and len(result.losses) == 30
    # A random tiny Llama (logits ~0.16 wide) can only learn about the byte frequencies here.
    assert after < before - 0.4, (before, after)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.4
    assert result.tokens == 15 * sum(len(e["input_ids"]) for e in examples)
    assert result.update.num_examples == 8 and result.update.client_id == "c0"
    assert not host.installed  # the slot is emptied for the next client
    assert result.seconds > 0


def test_accumulated_micro_batches_equal_one_full_batch_step() -> None:
    # A large Adam epsilon makes the step proportional to the gradient (not just its sign), so
    # this checks the accumulated gradient itself. The reference uses the model's own loss.
    overrides = dict(batch_size=8, max_steps=1, adam_epsilon=10.0, learning_rate=1.0, max_grad_norm=None)
    trainer, host, tok = make_trainer(micro_batch_size=2, **overrides)
    examples = make_examples(tok, mask_prompt=True)
    init = {
        n: LoraFactors(
            A=f.A, B=torch.randn(f.B.shape, generator=torch.Generator().manual_seed(2)) * 0.1, scaling=2.0
        )
        for n, f in _fresh(host).items()
    }
    result = train(trainer, examples, init=init)

    host.install(4, 8.0, init=init)
    params = host.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1.0, eps=10.0, weight_decay=0.0)
    loss = host.model(**collate(examples, tok.pad_token_id, 512)).loss  # mean over all label tokens
    loss.backward()
    optimizer.step()
    reference = host.extract()
    host.remove()

    assert result.losses[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    moved = 0.0
    for name, f in reference.items():
        got = result.update.modules[name]
        assert torch.allclose(got.B, f.B, atol=1e-6) and torch.allclose(got.A, f.A, atol=1e-6)
        moved += float((f.B - init[name].B).abs().max())
    assert moved > 1e-3  # the step did something

    # Same with micro-batch 8 (no accumulation) and 1 (8 micro-batches).
    for micro in (8, 1):
        other, _, _ = make_trainer(micro_batch_size=micro, **overrides)
        again = train(other, examples, init=init)
        for name, f in reference.items():
            assert torch.allclose(again.update.modules[name].B, f.B, atol=1e-6)


def _fresh(host: LoraHost):
    host.install(4, 8.0, generator=torch.Generator().manual_seed(0))
    try:
        return host.extract()
    finally:
        host.remove()


def test_fresh_init_depends_only_on_seed_round_client() -> None:
    trainer, host, tok = make_trainer(max_steps=1)
    a = train(trainer, make_examples(tok)[:4], client_index=3, round_index=2)
    b = train(trainer, make_examples(tok)[4:], client_index=3, round_index=2)  # other data
    c = train(trainer, make_examples(tok)[:4], client_index=4, round_index=2)
    # After one step from B = 0, A is still its initial value (its gradient is zero).
    host.install(4, 8.0, generator=init_generator(42, 2, 3, shared=False))
    expected = host.extract()
    host.remove()
    for name, f in expected.items():
        assert torch.equal(a.update.modules[name].A, f.A) and torch.equal(b.update.modules[name].A, f.A)
        assert not torch.equal(c.update.modules[name].A, f.A)


@pytest.mark.parametrize("ranks", [[4, 4, 4], [8, 4, 2]], ids=["homogeneous", "heterogeneous"])
def test_shared_init_is_one_draw_per_round_and_per_client_is_not(ranks) -> None:
    """client_init="shared": round r's clients start from bit-identical A (prefixes of one draw at
    the largest rank); "per_client": each client's own draw."""
    trainer, host, tok = make_trainer(max_steps=1)
    exs = make_examples(tok)
    starts = {}
    for shared in (True, False):
        # One step from B = 0 leaves A at its init (its gradient is zero), so the upload shows it.
        starts[shared] = [
            train(trainer, exs[2 * k : 2 * k + 2], client_index=k, round_index=2, rank=r, alpha=2.0 * r,
                  shared_init_rank=max(ranks) if shared else None).update.modules
            for k, r in enumerate(ranks)
        ]  # fmt: skip
    for name in starts[True][0]:
        first = starts[True][0][name].A
        for k, r in enumerate(ranks):
            assert torch.equal(starts[True][k][name].A, first[:r])
            assert starts[True][k][name].A.shape[0] == r
        others = [starts[False][k][name].A for k in range(len(ranks))]
        for k in range(1, len(ranks)):
            r = min(ranks[0], ranks[k])
            assert not torch.equal(others[k][:r], others[0][:r])
    # The next round's shared init is a new draw.
    nxt = train(trainer, exs[:2], client_index=0, round_index=3, rank=ranks[0], shared_init_rank=max(ranks))
    name = next(iter(nxt.update.modules))
    assert not torch.equal(nxt.update.modules[name].A, starts[True][0][name].A)


def test_shared_init_keeps_data_order_and_dropout_of_the_client() -> None:
    """The init mode changes the init only: with the same A the two modes take the same steps."""
    trainer, host, tok = make_trainer(max_steps=3, dropout=0.2)
    exs = make_examples(tok)
    a = train(trainer, exs, client_index=0, round_index=1, shared_init_rank=4)
    # per_client with client 0's draw replaced by the shared one: install it as an explicit init.
    host.install(4, 8.0, generator=init_generator(42, 1, 0, shared=True), init_rank=4)
    init = host.extract()
    host.remove()
    b = train(trainer, exs, client_index=0, round_index=1, init=init)
    assert a.losses == b.losses
    for name in a.update.modules:
        assert torch.equal(a.update.modules[name].B, b.update.modules[name].B)


def test_fedit_is_closer_to_the_exact_aggregate_with_a_shared_init() -> None:
    """After one local step each, FedIT's B̄Ā equals the exact Σ p_k B_k A_k when the clients shared
    their init (B starts at 0, so A's first gradient is 0 and every A_k is still the shared init:
    no cross terms), and keeps little of it with unrelated per-client inits."""
    from florist.aggregation import get_aggregator

    trainer, host, tok = make_trainer(max_steps=1, learning_rate=1e-2)
    exs = make_examples(tok)
    errors = {}
    for shared in (True, False):
        updates = [
            train(trainer, exs[2 * k : 2 * k + 2], client_index=k, client_id=f"c{k}",
                  shared_init_rank=4 if shared else None).update
            for k in range(4)
        ]  # fmt: skip
        fedit = get_aggregator("fedit").aggregate(updates).adapter
        exact = get_aggregator("flora").aggregate(updates).adapter
        num = sum(float((fedit[n].delta() - exact[n].delta()).norm() ** 2) for n in fedit)
        den = sum(float(exact[n].delta().norm() ** 2) for n in fedit)
        errors[shared] = (num / den) ** 0.5
    assert errors[True] < 1e-6 and errors[False] > 0.5, errors  # one step: every A_k is still the init


def test_ffa_trains_only_B() -> None:
    trainer, host, tok = make_trainer(max_steps=3)
    frozen = ffa_frozen_A(42, host.module_shapes, 8)
    result = train(trainer, make_examples(tok), frozen_A={n: a[:4] for n, a in frozen.items()})
    for name, f in result.update.modules.items():
        assert torch.equal(f.A, frozen[name][:4])
        assert f.B.abs().sum() > 0


def test_eight_clients_leave_one_unchanged_base_model() -> None:
    trainer, host, tok = make_trainer(max_steps=2, dropout=0.1)
    model = host.model
    n_params = sum(p.numel() for p in model.parameters())
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    examples = make_examples(tok)
    updates = [
        train(trainer, examples, client_id=f"c{k}", client_index=k, rank=2 + k).update for k in range(8)
    ]
    assert [next(iter(u.modules.values())).rank for u in updates] == list(range(2, 10))
    assert sum(p.numel() for p in model.parameters()) == n_params
    for n, p in model.named_parameters():
        ptr, value = base[n]
        assert p.data_ptr() == ptr and torch.equal(p, value) and not p.requires_grad


DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from florist.lora import LoraHost
    from florist.models import tiny_llama
    from florist.training import LocalTrainer, TrainConfig
    model, tok = tiny_llama(seed=0)
    host = LoraHost(model, ["q_proj", "v_proj"], dropout=0.1)
    cfg = TrainConfig(micro_batch_size=2, batch_size=4, epochs=2, learning_rate=1e-2, precision="bf16", progress=False)
    texts = {texts!r}
    examples = []
    for t in texts:
        ids = tok(t).input_ids + [tok.eos_token_id]
        examples.append({{"input_ids": ids, "labels": ids}})
    r = LocalTrainer(host, tok, cfg, torch.device("cpu")).train(
        client_id="c0", client_index=1, round_index=2, examples=examples, rank=4, alpha=8.0, init=None, seed=5)
    tensors = {{f"{{n}}.{{k}}": getattr(f, k) for n, f in r.update.modules.items() for k in "AB"}}
    tensors["losses"] = torch.tensor(r.losses, dtype=torch.float64)
    save_file(tensors, sys.argv[1])
    """
)


def test_training_is_deterministic_in_process_and_in_a_fresh_process(tmp_path: Path) -> None:
    # Dropout and bf16 autocast on, so both must be seeded/deterministic too; the fresh process
    # also checks that client_generator does not depend on Python's per-process hash salt.
    runs = []
    for _ in range(2):
        trainer, _host, tok = make_trainer(epochs=2, precision="bf16", dropout=0.1)
        runs.append(train(trainer, make_examples(tok), client_index=1, round_index=2, seed=5))
    a, b = runs
    assert a.losses == b.losses
    for name, f in a.update.modules.items():
        assert torch.equal(f.A, b.update.modules[name].A) and torch.equal(f.B, b.update.modules[name].B)
    out = tmp_path / "run.safetensors"
    script = DETERMINISM_SCRIPT.format(texts=TEXTS)
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, cwd=REPO, capture_output=True)
    fresh = load_file(out)
    assert fresh["losses"].tolist() == a.losses
    for name, f in a.update.modules.items():
        assert torch.equal(fresh[f"{name}.A"], f.A) and torch.equal(fresh[f"{name}.B"], f.B)


def test_different_seeds_differ_and_caller_rng_is_untouched() -> None:
    trainer, _host, tok = make_trainer(max_steps=2, dropout=0.1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = train(trainer, make_examples(tok), seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = train(trainer, make_examples(tok), seed=2)
    name = next(iter(a.update.modules))
    assert not torch.equal(a.update.modules[name].A, b.update.modules[name].A)


def test_bf16_autocast_keeps_fp32_master_weights() -> None:
    trainer, host, tok = make_trainer(max_steps=3, precision="bf16")
    assert trainer.autocast is torch.bfloat16
    result = train(trainer, make_examples(tok))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(
        f.A.dtype == torch.float32 and f.B.dtype == torch.float32 for f in result.update.modules.values()
    )
    assert all(p.dtype == torch.float32 for p in host.model.parameters())


def test_bad_examples_name_the_client_and_example() -> None:
    trainer, host, tok = make_trainer(max_steps=1)
    with pytest.raises(ValueError, match="client 'c7' has no training examples"):
        train(trainer, [], client_id="c7")
    bad = make_examples(tok)
    bad[3] = {"input_ids": [1, 2, 3], "labels": [1, 2]}
    with pytest.raises(ValueError, match="client 'c0', example 3: 3 input_ids but 2 labels"):
        train(trainer, bad)
    bad[3] = {"input_ids": [1, 99999], "labels": [1, 2]}
    with pytest.raises(ValueError, match="example 3: token id out of the vocabulary"):
        train(trainer, bad)
    assert not host.installed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_matches_cpu() -> None:
    results = []
    for device in ("cpu", "cuda"):
        model, tok = tiny_llama(seed=0)
        host = LoraHost(model.to(device), ["q_proj", "v_proj"])
        cfg = TrainConfig(
            micro_batch_size=2, batch_size=4, epochs=2, learning_rate=1e-2, precision="fp32", progress=False
        )
        results.append(train(LocalTrainer(host, tok, cfg, torch.device(device)), make_examples(tok)))
    cpu, cuda = results
    assert cuda.losses == pytest.approx(cpu.losses, rel=1e-4)
    for name, f in cpu.update.modules.items():
        assert cuda.update.modules[name].B.device.type == "cpu"
        assert torch.allclose(cuda.update.modules[name].B, f.B, atol=1e-4)
