"""Local training of one client's LoRA: AdamW, micro-batches + accumulation, bf16 autocast,
length-grouped batching, and determinism from ``(seed, round, client)``.

The recipe follows the paper's code (alpaca-lora / HF ``Trainer`` defaults): AdamW with no
warm-up and a linear decay of the learning rate to 0, gradient clipping at norm 1, the loss a
mean over every label token of the optimizer batch. We write the loop ourselves instead of
using ``Trainer`` because a federated simulation trains hundreds of short client sessions on
one shared model, and the loop must be exactly reproducible and cheap to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from florist.aggregation.base import Adapter, ClientUpdate
from florist.config import RunConfig
from florist.data import IGNORE_INDEX, PAD_TO_MULTIPLE_OF, collate
from florist.lora import LoraHost
from florist.models import autocast_dtype
from florist.packing import (
    PackedBatch,
    head_loss,
    pack,
    packed_attention,
    packed_hidden_states,
    supports_packing,
)
from florist.progress import bar_disabled

MEGA_BATCH_MULT = 50  # as transformers' LengthGroupedSampler: sort within 50 micro-batches


# --- randomness ----------------------------------------------------------------------------


def _derive_seed(*parts: object) -> int:
    # hashlib, not hash(): Python salts str hashes per process, and seeds must agree across
    # processes and machines (simulation, sweep and Flower SuperNodes).
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def client_generator(seed: int, round_index: int, client_index: int) -> torch.Generator:
    """A client's own random stream in a round: its dropout seed, then its data order."""
    return torch.Generator().manual_seed(_derive_seed("florist-client", seed, round_index, client_index))


def init_generator(seed: int, round_index: int, client_index: int, *, shared: bool) -> torch.Generator:
    """The stream a client's fresh LoRA A is drawn from: one per round when the clients share
    their init (``client_init="shared"``), else one per client. Separate from the client's own
    stream, so the two init modes train on the same data order with the same dropout."""
    parts = ("florist-init", seed, round_index) + (() if shared else (client_index,))
    return torch.Generator().manual_seed(_derive_seed(*parts))


def ffa_frozen_A(seed: int, module_shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, torch.Tensor]:
    """FFA-LoRA's frozen A, shared by every client and round: Kaiming-uniform from (seed, module).

    Returns ``rank`` rows per module; a client of rank r_k uses the first r_k rows.
    """
    out = {}
    for name, (_out_features, in_features) in module_shapes.items():
        g = torch.Generator().manual_seed(_derive_seed("florist-ffa", seed, name))
        A = torch.empty(rank, in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        out[name] = A
    return out


# --- configuration and results -------------------------------------------------------------


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    batch_size: int = 128
    epochs: int = 1
    learning_rate: float = 3e-4
    max_steps: int | None = None  # optimizer steps; when set it replaces epochs (as in HF Trainer)
    group_by_length: bool = True
    precision: str = "auto"  # auto | bf16 | fp32 (see florist.models.autocast_dtype)
    cutoff_len: int = 512
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF  # bounded batch shapes (florist.data)
    train_on_inputs: bool = True  # used when tokenising (florist.data), kept here for one config
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0  # HF Trainer's default, which the paper's code used
    lr_scheduler: str = "linear"  # linear decay to 0 (HF default) | constant
    packing: bool = True  # padding-free micro-batches (florist.packing) where the model allows
    # Frozen nn.Linear weights as bf16 copies while training under bf16 autocast (the same
    # rounding autocast does on every call, done once per client). None: on the CPU only,
    # where memory is plentiful and the casts cost ~10% of a step.
    cast_frozen_weights: bool | None = None
    progress: bool | None = None  # None: florist.progress's rule (a terminal, FLORIST_PROGRESS != 0)

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0 or self.batch_size <= 0:
            raise ValueError("batch_size and micro_batch_size must be positive")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive (or set max_steps), got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lr_scheduler not in ("linear", "constant"):
            raise ValueError(f"lr_scheduler must be linear or constant, got {self.lr_scheduler!r}")
        if self.cutoff_len <= 1:
            raise ValueError(f"cutoff_len must be at least 2, got {self.cutoff_len}")
        if self.pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> TrainConfig:
        return cls(
            micro_batch_size=cfg.local_micro_batch_size,
            batch_size=cfg.local_batch_size,
            epochs=cfg.local_num_epochs,
            learning_rate=cfg.local_learning_rate,
            max_steps=cfg.local_max_steps,
            lr_scheduler=cfg.local_lr_scheduler,
            group_by_length=cfg.group_by_length,
            precision=cfg.precision,
            cutoff_len=cfg.cutoff_len,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
            train_on_inputs=cfg.train_on_inputs,
            packing=cfg.packing,
        )


@dataclass
class ClientResult:
    update: ClientUpdate
    losses: list[float]  # mean label-token loss of each optimizer step
    steps: int
    tokens: int  # non-padding tokens processed
    seconds: float
    start: Adapter | None = None  # the LoRA as installed, with keep_start (DP clips the change)


# --- batching ------------------------------------------------------------------------------


def plan_batches(
    lengths: list[int], cfg: TrainConfig, generator: torch.Generator
) -> Iterator[list[list[int]]]:
    """Yield optimizer batches (lists of micro-batches of example indices), epoch after epoch.

    With ``group_by_length`` a shuffled epoch is cut into mega-batches of 50 micro-batches, each
    sorted by length (so a micro-batch holds similar lengths and little padding), cut into
    optimizer batches, whose order is then shuffled. The last batch of an epoch may be short.
    """
    n = len(lengths)
    mega = MEGA_BATCH_MULT * cfg.micro_batch_size
    mega = max(cfg.batch_size, mega - mega % cfg.batch_size)  # whole optimizer batches only
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        batches: list[list[int]] = []
        if cfg.group_by_length:
            for start in range(0, n, mega):
                chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
                batches += [chunk[j : j + cfg.batch_size] for j in range(0, len(chunk), cfg.batch_size)]
            shuffled = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffled]
        else:
            batches = [order[j : j + cfg.batch_size] for j in range(0, n, cfg.batch_size)]
        for batch in batches:
            yield [batch[j : j + cfg.micro_batch_size] for j in range(0, len(batch), cfg.micro_batch_size)]


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the causal-LM loss (labels are shifted by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over label tokens of the next-token cross-entropy, in fp32 (or fp64)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).to(dtype)
    return F.cross_entropy(
        shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def micro_batch_loss(model: torch.nn.Module, batch: PackedBatch | dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed label-token loss of one micro-batch; the LM head runs on label positions only."""
    if isinstance(batch, PackedBatch):
        return head_loss(model, packed_hidden_states(model, batch), batch.targets)
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    return head_loss(model, hidden[:, :-1][keep], targets[keep])


@contextlib.contextmanager
def frozen_linears_as(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Swap every frozen ``nn.Linear`` weight for a ``dtype`` copy; the originals come back after.

    Under autocast a frozen weight is cast again on every call (autocast caches only weights
    that require grad); casting once per client gives the same numbers without that work.
    """
    swapped = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and not w.requires_grad and w.dtype != dtype:
            swapped.append((module, w))
            module.weight = torch.nn.Parameter(w.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for module, w in swapped:
            module.weight = w


def _check_examples(examples: list[dict], client_id: str, vocab_size: int) -> list[int]:
    if not examples:
        raise ValueError(f"client {client_id!r} has no training examples")
    lengths = []
    for i, e in enumerate(examples):
        ids, labels = e.get("input_ids"), e.get("labels")
        if ids is None or labels is None:
            raise ValueError(
                f"client {client_id!r}, example {i}: needs input_ids and labels (tokenise it first)"
            )
        if len(ids) == 0 or len(ids) != len(labels):
            raise ValueError(
                f"client {client_id!r}, example {i}: {len(ids)} input_ids but {len(labels)} labels"
            )
        if max(ids) >= vocab_size or min(ids) < 0:
            raise ValueError(
                f"client {client_id!r}, example {i}: token id out of the vocabulary (size {vocab_size})"
            )
        lengths.append(len(ids))
    return lengths


# --- the trainer ---------------------------------------------------------------------------


class LocalTrainer:
    """Trains one client's LoRA in the host's slot and returns it as a :class:`ClientUpdate`."""

    def __init__(
        self, host: LoraHost, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, device: torch.device
    ) -> None:
        self.host = host
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device)
        self.autocast = autocast_dtype(cfg.precision, self.device)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; load it with florist.models.load_model")
        self.pad_token_id = int(tokenizer.pad_token_id)
        host.model.to(self.device)

    def total_steps(self, num_examples: int) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return self.cfg.epochs * math.ceil(num_examples / self.cfg.batch_size)

    def train(
        self,
        *,
        client_id: str,
        client_index: int,
        round_index: int,
        examples: list[dict],
        rank: int,
        alpha: float,
        init: Adapter | None,
        seed: int,
        frozen_A: dict[str, torch.Tensor] | None = None,
        shared_init_rank: int | None = None,
        keep_start: bool = False,
        freeze: tuple[str, ...] = (),
        learning_rate: float | None = None,
    ) -> ClientResult:
        """Install the client's LoRA (fresh, from ``init``, or FFA's ``frozen_A``), train it, return it.

        A fresh LoRA's A comes from ``init_generator``: with ``shared_init_rank`` it is the first
        ``rank`` rows of the one (shared_init_rank x n) draw every client of the round makes
        alike (client_init "shared"); otherwise the client draws its own. The dropout seed and
        the data order come from ``client_generator(seed, round_index, client_index)``.
        """
        model = self.host.model
        lengths = _check_examples(examples, client_id, int(model.config.vocab_size))
        start = time.perf_counter()
        shared = shared_init_rank is not None
        self.host.install(
            rank,
            alpha,
            init=init,
            generator=init_generator(seed, round_index, client_index, shared=shared),
            frozen_A=frozen_A,
            init_rank=shared_init_rank,
            freeze=freeze,
        )
        installed = self.host.extract() if keep_start else None
        generator = client_generator(seed, round_index, client_index)
        try:
            lr = self.cfg.learning_rate if learning_rate is None else learning_rate
            result = self._train_installed(client_id, examples, lengths, generator, start, lr)
            result.start = installed
            return result
        finally:
            self.host.remove()
            model.eval()

    def _train_installed(
        self,
        client_id: str,
        examples: list[dict],
        lengths: list[int],
        generator: torch.Generator,
        start: float,
        learning_rate: float,
    ) -> ClientResult:
        cfg, model = self.cfg, self.host.model
        params = self.host.trainable_parameters()
        optimizer = torch.optim.AdamW(
            params, lr=learning_rate, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon
        )
        total = self.total_steps(len(examples))
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=total)
        # peft's dropout draws from the global RNG: seed it from the client's stream, and keep
        # the caller's RNG state untouched.
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        batches = plan_batches(lengths, cfg, generator)
        losses: list[float] = []
        tokens = 0
        model.train()
        bar = tqdm(
            total=total,
            desc=f"client {client_id}",
            unit="step",
            leave=False,
            disable=bar_disabled(self.cfg.progress),
        )
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        packed = cfg.packing and supports_packing(model)
        cast = cfg.cast_frozen_weights if cfg.cast_frozen_weights is not None else self.device.type == "cpu"
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            if packed:
                stack.enter_context(packed_attention(model))
            if cast and self.autocast is not None:
                stack.enter_context(frozen_linears_as(model, self.autocast))
            torch.manual_seed(dropout_seed)
            for _step in range(total):
                micro_batches = [self._batch([examples[i] for i in mb], packed) for mb in next(batches)]
                # Mean over every label token of the optimizer batch, so that accumulating
                # micro-batches gives exactly the full-batch gradient.
                n_label = max(1, sum(_label_count(b) for b in micro_batches))
                step_loss = 0.0
                for b in micro_batches:
                    with torch.autocast(
                        self.device.type,
                        dtype=self.autocast or torch.float32,
                        enabled=self.autocast is not None,
                    ):
                        loss = micro_batch_loss(model, b) / n_label
                    loss.backward()
                    step_loss += float(loss.detach())
                    tokens += b.tokens if isinstance(b, PackedBatch) else int(b["attention_mask"].sum())
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"client {client_id!r}: loss is {step_loss} at step {len(losses) + 1}"
                    )
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
        bar.close()
        update = ClientUpdate(client_id=client_id, num_examples=len(examples), modules=self.host.extract())
        return ClientResult(
            update=update, losses=losses, steps=total, tokens=tokens, seconds=time.perf_counter() - start
        )

    def _batch(self, examples: list[dict], packed: bool) -> PackedBatch | dict[str, torch.Tensor]:
        cfg = self.cfg
        if packed:
            return pack(examples, self.pad_token_id, cfg.cutoff_len, cfg.pad_to_multiple_of).to(self.device)
        b = collate(examples, self.pad_token_id, cfg.cutoff_len, cfg.pad_to_multiple_of)
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}


def _label_count(batch: PackedBatch | dict[str, torch.Tensor]) -> int:
    if isinstance(batch, PackedBatch):
        return len(batch.targets)
    return count_label_tokens(batch["labels"])
