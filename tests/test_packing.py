"""florist.packing and the training fast path: padding-free batches, the fused LM-head loss, bf16
weight copies and the mask dropout, each checked against the plain computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import florist.packing as packing
from florist.data import IGNORE_INDEX, collate
from florist.lora import LoraHost, MaskDropout
from florist.models import tiny_llama
from florist.packing import attention_groups, head_loss, pack, packed_attention
from florist.training import LocalTrainer, TrainConfig, frozen_linears_as, micro_batch_loss, summed_loss

# Lengths from 3 to 300 tokens: several attention groups, both sides of the eager/flash switch.
LENGTHS = [7, 300, 41, 3, 120, 118, 64, 290]


def examples(lengths: list[int] = LENGTHS, vocab: int = 250, prompt: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(len(lengths))
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * min(prompt, n) + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def host_with_lora(dtype: torch.dtype = torch.float32) -> tuple[LoraHost, object]:
    model, tokenizer = tiny_llama(seed=0)
    model.to(dtype)
    host = LoraHost(model, ["q_proj", "v_proj"], dropout=0.0)
    host.install(4, 8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B != 0, so A has a gradient too
        for p in host.trainable_parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    model.train()
    return host, tokenizer


def loss_and_grads(host: LoraHost, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = micro_batch_loss(host.model, batch)
    return loss.detach(), list(torch.autograd.grad(loss, host.trainable_parameters()))


def test_pack_lays_examples_end_to_end_without_crossing_them() -> None:
    exs = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [10, 11, 12, 13], "labels": [10, 11, 12, 13]},
    ]
    b = pack(exs, pad_token_id=0, cutoff_len=3, pad_to_multiple_of=4)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]  # the last example cut at 3
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b.lengths == [3, 2, 3] and b.tokens == 8
    # Position t predicts t+1 of its own example: never 7 -> 8 or 9 -> 10.
    assert b.positions.tolist() == [0, 1, 3, 5, 6]
    assert b.targets.tolist() == [6, 7, 9, 11, 12]
    filled = pack(exs[:2], pad_token_id=0, cutoff_len=None, pad_to_multiple_of=4)
    assert filled.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]] and filled.tokens == 5
    assert filled.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_attention_groups_cover_every_example_within_the_slack() -> None:
    lengths = torch.randint(1, 512, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    for slack in (1.0, 1.5, 4.0):
        groups = attention_groups(lengths, slack)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            longest = max(lengths[i] for i in g)
            assert lengths[g[0]] == longest
            assert len(g) == 1 or len(g) * longest**2 <= slack * sum(lengths[i] ** 2 for i in g)
    assert len(attention_groups([100] * 8)) == 1


@pytest.mark.parametrize("eager_max_len", [10**6, 0], ids=["eager", "flash"])
@pytest.mark.parametrize("prompt", [0, 5], ids=["all-labels", "masked-prompt"])
def test_packed_loss_and_gradients_equal_the_padded_ones(eager_max_len, prompt, monkeypatch) -> None:
    # float64 end to end, so any difference is a bug and not rounding.
    monkeypatch.setattr(packing, "EAGER_ATTENTION_MAX_LEN", eager_max_len)
    host, tok = host_with_lora(torch.float64)
    exs = examples(prompt=prompt)
    padded = collate(exs, tok.pad_token_id, 512)
    logits = host.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    reference = summed_loss(logits, padded["labels"])
    ref_grads = torch.autograd.grad(reference, host.trainable_parameters())
    batch = pack(exs, tok.pad_token_id, 512)
    with packed_attention(host.model):
        loss, grads = loss_and_grads(host, batch)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-10, atol=1e-9)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    # The padded path of the trainer (LM head on label positions only) gives the same too.
    padded_loss, padded_grads = loss_and_grads(host, padded)
    torch.testing.assert_close(padded_loss, reference.detach(), rtol=1e-10, atol=1e-9)
    for g, r in zip(padded_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    assert host.model.config._attn_implementation != packing.ATTENTION_NAME  # restored


def test_fused_head_loss_equals_cross_entropy(monkeypatch) -> None:
    monkeypatch.setattr(packing, "HEAD_CHUNK", 7)  # several chunks, the last one short
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).double().requires_grad_(False)
    model = type("M", (), {"get_output_embeddings": lambda self: head, "config": object()})()
    hidden = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (40,), generator=g)
    fused = head_loss(model, hidden, targets)
    (fused_grad,) = torch.autograd.grad(3.0 * fused, hidden)
    reference = F.cross_entropy(head(hidden), targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(3.0 * reference, hidden)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-10, atol=1e-12)
    # Under bf16 autocast: the projection in bf16, the softmax in float32, as autocast would.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16 = head_loss(model, hidden.float(), targets)
    head.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = F.cross_entropy(head(hidden.float()).float(), targets, reduction="sum")
    torch.testing.assert_close(fused_bf16, ref_bf16, rtol=1e-5, atol=1e-4)


def test_trainer_with_and_without_packing_takes_the_same_steps() -> None:
    exs = examples([9, 30, 17, 4, 25, 11, 40, 8])
    adapters, losses = [], []
    for packed in (True, False):
        model, tok = tiny_llama(seed=0)
        host = LoraHost(model, ["q_proj", "v_proj"], dropout=0.0)
        cfg = TrainConfig(micro_batch_size=2, batch_size=4, epochs=2, learning_rate=1e-2, precision="fp32",
                          progress=False, packing=packed)  # fmt: skip
        trainer = LocalTrainer(host, tok, cfg, torch.device("cpu"))
        r = trainer.train(client_id="c", client_index=0, round_index=1, examples=exs, rank=4, alpha=8.0,
                          init=None, seed=1)  # fmt: skip
        adapters.append(r.update.modules)
        losses.append(r.losses)
        assert r.tokens == sum(len(e["input_ids"]) for e in exs) * 2
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
    for name in adapters[0]:
        torch.testing.assert_close(adapters[0][name].B, adapters[1][name].B, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(adapters[0][name].A, adapters[1][name].A, rtol=1e-4, atol=1e-6)


def test_bf16_weight_copies_give_autocasts_numbers_and_restore_the_originals() -> None:
    host, tok = host_with_lora()
    batch = pack(examples([20, 35, 12]), tok.pad_token_id, 64)
    originals = {n: p for n, p in host.model.named_parameters()}
    with packed_attention(host.model), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = loss_and_grads(host, batch)
        with frozen_linears_as(host.model, torch.bfloat16):
            linears = [m.weight for m in host.model.modules() if type(m) is torch.nn.Linear]
            cast = {w.dtype for w in linears if not w.requires_grad}
            trained = {w.dtype for w in linears if w.requires_grad}
            cast_loss, cast_grads = loss_and_grads(host, batch)
    assert cast == {torch.bfloat16} and trained == {torch.float32}  # the LoRA factors stay fp32
    torch.testing.assert_close(cast_loss, plain_loss, rtol=0, atol=0)
    for a, b in zip(cast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    after = dict(host.model.named_parameters())
    assert after.keys() == originals.keys()
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in originals.items())


def test_mask_dropout_keeps_one_minus_p_and_scales() -> None:
    p = 0.05
    drop = MaskDropout(p).train()
    torch.manual_seed(0)
    x = torch.ones(2_000_000)
    y = drop(x)
    kept = float((y != 0).double().mean())
    # Binomial standard error on 2M draws is 1.5e-4: a 5-sigma band.
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / (1 - p))))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global RNG, like nn.Dropout (the trainer seeds it)
    assert torch.equal(drop.eval()(x), x) and torch.equal(MaskDropout(0.0).train()(x), x)
    # The gradient is the same mask, scaled.
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(1)
    out = MaskDropout(0.5).train()(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).float() * 2.0)


def test_host_installs_the_mask_dropout() -> None:
    model, _ = tiny_llama(seed=0)
    host = LoraHost(model, ["q_proj"], dropout=0.1)
    host.install(2, 4.0, generator=torch.Generator().manual_seed(0))
    layer = next(iter(host._layers.values()))
    assert isinstance(layer.lora_dropout["florist"], MaskDropout) and layer.lora_dropout["florist"].p == 0.1


def test_models_outside_the_packable_list_fall_back_to_padding() -> None:
    model, tok = tiny_llama(seed=0)
    assert packing.supports_packing(model)
    model.config.sliding_window = 16
    model.config.use_sliding_window = True
    assert not packing.supports_packing(model)
    model.config.sliding_window = None
    model.config.model_type = "gpt2"
    assert not packing.supports_packing(model)
    # The trainer still trains such a model, padded.
    host = LoraHost(model, ["q_proj", "v_proj"])
    cfg = TrainConfig(micro_batch_size=2, batch_size=2, max_steps=2, precision="fp32", progress=False)
    r = LocalTrainer(host, tok, cfg, torch.device("cpu")).train(
        client_id="c", client_index=0, round_index=1, examples=examples([5, 9]), rank=2, alpha=4.0,
        init=None, seed=0,
    )  # fmt: skip
    assert r.steps == 2 and all(torch.isfinite(torch.tensor(r.losses)))


def test_packed_attention_refuses_a_call_without_its_batch() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="PackedBatch"):
        packing.packed_attention_forward(torch.nn.Module(), q, q, q, None)
