"""Padding-free training batches: a micro-batch's examples laid end to end in one row.

Dolly's records are short (median ~100 tokens with the Alpaca prompt), so a padded micro-batch
spends much of its compute on padding. Here every position-wise part of the model (embeddings,
projections, norms, MLPs, the LM head) runs on exactly the real tokens. Attention must stay
within each example: the position ids restart at 0 for every example (so RoPE sees the same
positions as in a padded row), and a registered attention function re-pads only q, k and v
into an (examples x longest) block for the attention product, causal as usual. Right padding
needs no mask there: a real query never reaches a padded key under the causal mask.

The loss is the same sum over label tokens as the padded path (``florist.training``), computed
by :func:`head_loss` from the hidden states of the scored positions only. With a frozen,
plain ``nn.Linear`` LM head it fuses the head and the cross-entropy: the vocabulary-sized
logits exist one chunk at a time and the gradient of the hidden states is formed in the same
pass, so neither the full fp32 logits nor their gradient are ever stored.

Shapes are bounded: the packed length is rounded up to a multiple of ``pad_to_multiple_of``
with a filler example that is never scored (see ``florist.data.padded_width`` for why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from florist.data import IGNORE_INDEX

ATTENTION_NAME = "florist_packed"
# Architectures whose attention is plain causal softmax(q kᵀ · scaling) v through transformers'
# attention interface (no sliding window, soft-capping, ALiBi or sinks): packing is exact there.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Up to this length the plain matmul-softmax beats the CPU flash kernel, whose backward has a
# large fixed cost; beyond it the two cost about the same, and flash does not keep the
# (examples x heads x L x L) probabilities for the backward pass (gigabytes over 30 layers).
EAGER_ATTENTION_MAX_LEN = 128
ATTENTION_SLACK = 1.5  # padded attention work allowed per group, relative to the exact work
HEAD_CHUNK = 256  # scored positions per LM-head chunk: its (chunk x vocab) logits stay in cache
# Attention blocks and LM-head chunks are padded to a multiple of this many rows. oneDNN caches a
# primitive for every bf16 matmul shape it meets; unbounded lengths made that cache, and RSS, grow
# with every client (docs/benchmarks.md, memory). Padded rows are never scored.
SHAPE_MULTIPLE = 16


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (1, T): the examples end to end, then filler
    position_ids: torch.Tensor  # (1, T): 0.. within each example
    lengths: list[int]  # tokens of each example (the filler is not an example)
    groups: list[list[int]]  # examples whose attention runs as one padded block (similar lengths)
    positions: torch.Tensor  # (N,) positions whose next token is a label
    targets: torch.Tensor  # (N,) those labels

    @property
    def tokens(self) -> int:
        """Real tokens, without the filler."""
        return sum(self.lengths)

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            lengths=self.lengths,
            groups=self.groups,
            positions=self.positions.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
        )


def pack(
    examples: Sequence[dict], pad_token_id: int, cutoff_len: int | None, pad_to_multiple_of: int = 32
) -> PackedBatch:
    """Lay ``examples`` (input_ids, labels) end to end, each cut at ``cutoff_len``."""
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    lengths: list[int] = []
    for e in examples:
        k = len(e["input_ids"]) if cutoff_len is None else min(cutoff_len, len(e["input_ids"]))
        start = len(ids)
        ids += e["input_ids"][:k]
        labels = e["labels"][:k]
        # Position t predicts token t+1 of the same example; nothing crosses into the next one.
        for t in range(k - 1):
            if labels[t + 1] != IGNORE_INDEX:
                positions.append(start + t)
                targets.append(labels[t + 1])
        lengths.append(k)
    filler = -len(ids) % pad_to_multiple_of
    ids += [pad_token_id] * filler
    position_ids = [p for k in lengths for p in range(k)] + list(range(filler))
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        lengths=lengths,
        groups=attention_groups(lengths),
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
    )


def attention_groups(lengths: Sequence[int], slack: float | None = None) -> list[list[int]]:
    """Examples grouped by length, longest first, so that padding each group to its longest
    costs at most ``slack`` times the attention of the examples alone (Σ l²)."""
    slack = ATTENTION_SLACK if slack is None else slack
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            exact = sum(lengths[j] ** 2 for j in group) + lengths[i] ** 2
            if (len(group) + 1) * longest**2 <= slack * exact:
                group.append(i)
                continue
        groups.append([i])
    return groups


# --- attention within each example ---------------------------------------------------------


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling, causal) v on (n, heads, L, d); kv heads are shared (GQA)."""
    groups = q.shape[1] // k.shape[1]
    if q.shape[2] > EAGER_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    length = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scaling
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return weights @ v


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (1, heads, T, d) in, (1, T, heads, d) out."""
    packed = kwargs.get("florist_packed")
    if not isinstance(packed, PackedBatch):
        raise RuntimeError("florist_packed attention called without a PackedBatch (use packed_forward)")
    if dropout:
        raise ValueError("attention dropout is not supported with packed batches")
    lengths = packed.lengths
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    filler = query.shape[2] - sum(lengths)
    sizes = lengths + ([filler] if filler else [])
    # Per example (k, heads, d) views; slices and pads, whose backward is a copy, not a scatter.
    q, k, v = (x[0].transpose(0, 1).split(sizes) for x in (query, key, value))
    rows: list[torch.Tensor] = [query.new_empty(0)] * len(lengths)
    for group in packed.groups:
        longest = lengths[group[0]]
        width = longest + -longest % SHAPE_MULTIPLE

        def block(
            parts: tuple[torch.Tensor, ...], group: list[int] = group, width: int = width
        ) -> torch.Tensor:
            padded = nn.utils.rnn.pad_sequence([parts[i] for i in group], batch_first=True)
            # Right padding: under the causal mask no real query reaches the padded keys.
            padded = F.pad(padded, (0, 0, 0, 0, 0, width - padded.shape[1]))
            return padded.transpose(1, 2)  # (n, heads, L, d)

        out = _causal_attention(block(q), block(k), block(v), scale).transpose(1, 2)  # (n, L, heads, d)
        for row, i in enumerate(group):
            rows[i] = out[row, : lengths[i]]
    if filler:
        rows.append(query.new_zeros(filler, query.shape[1], query.shape[3]))
    return torch.cat(rows).unsqueeze(0), None


def supports_packing(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return getattr(config, "attention_dropout", 0.0) in (0, 0.0, None)


@contextlib.contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through :func:`packed_attention_forward` for the duration."""
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    configs = {id(c): c for c in (model.config, getattr(model.get_decoder(), "config", model.config))}
    saved = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = saved[key]


def packed_hidden_states(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The decoder's last hidden states at the scored positions, (N, hidden)."""
    out = model.get_decoder()(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        florist_packed=batch,
    )
    return out.last_hidden_state[0, batch.positions]


# --- the LM head and the loss, fused --------------------------------------------------------


class _FusedHeadLoss(torch.autograd.Function):
    """Σ cross-entropy(hidden @ Wᵀ, targets); W is frozen, so only d loss / d hidden is needed.

    The forward pass forms each chunk's logits, its loss and its gradient at once; backward
    returns the stored gradient. The projections run in ``dtype`` (the autocast dtype), the
    softmax in float32, as autocast + ``F.cross_entropy(logits.float())`` would.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):  # type: ignore[override]
        w = weight.to(dtype)
        h = hidden.to(dtype)
        accumulate = torch.promote_types(dtype, torch.float32)  # bf16 logits: softmax in float32
        grad = torch.empty_like(h)
        total = hidden.new_zeros((), dtype=accumulate)
        for c in range(0, h.shape[0], HEAD_CHUNK):
            rows = h[c : c + HEAD_CHUNK]
            real = rows.shape[0]
            # Padded to SHAPE_MULTIPLE rows (zeros), then only the real rows' logits are kept.
            rows = F.pad(rows, (0, 0, 0, -real % SHAPE_MULTIPLE))
            logits = (rows @ w.T)[:real].to(accumulate)
            tgt = targets[c : c + HEAD_CHUNK, None]
            # A log-sum-exp and softmax in place: the (chunk x vocab) buffer is the cost here.
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, tgt)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            total += (norm.log() + top - picked).sum()
            probs.div_(norm).scatter_add_(1, tgt, probs.new_full(tgt.shape, -1.0))
            grad[c : c + HEAD_CHUNK] = probs.to(dtype) @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None


def head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden`` (N, d) against ``targets`` (N,), in float32."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    autocast = torch.is_autocast_enabled(hidden.device.type)
    dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
    fusable = type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad and not softcap
    if fusable:
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedHeadLoss.apply(hidden, head.weight, targets, dtype)
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")
