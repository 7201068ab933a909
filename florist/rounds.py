"""The round engine: one federated round, written once for `florist run`, the sweep and Flower.

A round has three parts, and every driver calls the same functions for them:

1. **Plan** (``Method``): which clients train (``sample_clients``) and, for each, its task (rank,
   alpha, FFA's frozen A, the shared init's rank, the factors it freezes and uploads) and where
   it starts (``Method.start``: a fresh LoRA, the method's own start, or what the server last
   sent it, grown or cut to its rank, with its own local factors). ``Method`` is the only code
   outside ``florist.aggregation`` that reads the methods' declarations.
2. **Train** (``run_client``, then ``protect_upload``): local training, then the client's own
   privacy step before anything leaves it (local DP's noise, or clipping for central DP where
   the server cannot see the uploads).
3. **Close** (``close_round``): screen the uploads, aggregate them (secure aggregation plugs in
   its own sum), central DP around it as a wrapper (``privacy.CentralDP``), complete the result
   for the round (``for_round``), cut what is released to what travelled (``released_view``),
   account the communication, broadcast into ``ServerState``, and build the round's record.

``RoundRecorder`` appends the record to the metrics, writes the checkpoint and the log line.
docs/architecture.md has the table of which driver calls what.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from florist import privacy
from florist.aggregation import AGGREGATORS, Adapter, Aggregator, ClientUpdate, GlobalResult
from florist.algebra import (
    client_id,
    largest,
    min_rank,
    pad_adapter,
    stack_adapters,
    to_cpu,
    total_rank,
    truncate_adapter,
    with_local_factors,
    zeros_adapter,
)
from florist.checkpoint import CheckpointState, MergedHistory, save_checkpoint
from florist.comm import eff_over_rounds, paper_eff, round_communication, total_communication
from florist.config import RunConfig
from florist.errors import FloristError
from florist.progress import bar_disabled
from florist.screening import Rejection, screen_updates

Shapes = dict[str, tuple[int, int]]


def method_options(cfg: RunConfig) -> dict[str, Any]:
    """The options ``cfg.method`` declares it takes from ``cfg`` (FLoRIST: its threshold)."""
    return {name: getattr(cfg, name) for name in AGGREGATORS[cfg.method].options}


def build_aggregator(cfg: RunConfig) -> Aggregator:
    return AGGREGATORS[cfg.method](dtype=getattr(torch, cfg.aggregation_dtype), **method_options(cfg))


def sample_clients(cfg: RunConfig, round_number: int) -> list[int]:
    """The client indices trained in a round, ascending; a pure function of (seed, round)."""
    k = cfg.num_clients
    n = min(k, max(cfg.min_clients, int(cfg.client_selection_frac * k)))
    if n == k:
        return list(range(k))
    digest = hashlib.sha256(f"florist-sampling:{cfg.seed}:{round_number}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return sorted(torch.randperm(k, generator=generator)[:n].tolist())


def round_learning_rate(cfg: RunConfig, rnd: int) -> float:
    """The peak learning rate of round ``rnd`` (1-based) of ``cfg.num_communication_rounds``:
    constant (the paper's one round), or annealed from ``local_learning_rate`` to ``lr_min``
    linearly or by a cosine of t = rnd / R, as FlowerTune's ``cosine_annealing`` (the last round
    trains at ``lr_min``). Within a round the rate then follows ``local_lr_scheduler``."""
    lr, low, t = cfg.local_learning_rate, cfg.lr_min, rnd / cfg.num_communication_rounds
    if cfg.lr_schedule == "linear":
        return low + (lr - low) * (1.0 - t)
    if cfg.lr_schedule == "cosine":
        return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * t))
    return lr


def due(every: int, rnd: int, cfg: RunConfig) -> bool:
    """Whether something done every ``every`` rounds (and after the last) is due after ``rnd``."""
    return bool(every and (rnd % every == 0 or rnd == cfg.num_communication_rounds))


def evaluation_due(cfg: RunConfig, rnd: int) -> bool:
    """Whether the global model is evaluated after round ``rnd`` (``eval_every``)."""
    return cfg.evaluate and due(cfg.eval_every, rnd, cfg)


def evaluation_samples(cfg: RunConfig, rnd: int) -> int | None:
    """Records (and MMLU questions) scored after round ``rnd``: the first ``eval_every_samples``
    before the last round, ``eval_samples`` (None: all) at the last."""
    if rnd >= cfg.num_communication_rounds or cfg.eval_every_samples is None:
        return cfg.eval_samples
    return min(cfg.eval_every_samples, cfg.eval_samples or cfg.eval_every_samples)


# --- what the server remembers ---------------------------------------------------------------


@dataclass
class ServerState:
    """What the server remembers between rounds, and what the global model is."""

    # Folded into the base, one per round; once checkpointed, read back from the checkpoint's files.
    merged: MergedHistory = field(default_factory=MergedHistory)
    global_adapter: Adapter | None = None  # continue methods: the last broadcast (or global view)
    per_client: dict[str, Adapter] | None = None  # FlexLoRA: one per client id
    # Per-client state of methods with local factors (FedSA-LoRA's B_k): each client's own last
    # trained adapter, which in a real federation lives on the client.
    client_state: dict[str, Adapter] = field(default_factory=dict)
    # The dtype the base merges in (LoraHost.merge_dtype): the history is kept at the precision the
    # merge uses, which halves it against the aggregators' float64 and leaves the base bit for bit.
    merged_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.merged, MergedHistory):
            self.merged = MergedHistory(self.merged)

    def broadcast(self, result: GlobalResult) -> None:
        if result.folded is not None:
            self.merged.append(to_cpu(result.folded, self.merged_dtype))
        if not result.merge:
            shared = result.adapter if result.adapter is not None else result.global_view
            self.global_adapter = to_cpu(shared) if shared is not None else None
            self.per_client = (
                {cid: to_cpu(a) for cid, a in result.per_client.items()} if result.per_client else None
            )

    def keep(self, cid: str, trained: Adapter) -> None:
        """Remember client ``cid``'s own trained adapter (methods with local factors)."""
        self.client_state[cid] = to_cpu(trained)

    def continuation(self, cid: str) -> Adapter | None:
        """The adapter client ``cid`` continues from (any rank), or None for a fresh start."""
        if self.per_client:
            # Truncations of one SVD are nested, so a client not sampled last round gets the
            # first components of the largest one.
            return self.per_client.get(cid) or largest(self.per_client)
        return self.global_adapter

    def active_adapter(self) -> Adapter | None:
        """The global model's adapter on top of the (merged) base: None for the merge methods."""
        if self.global_adapter is not None:
            return self.global_adapter
        return largest(self.per_client) if self.per_client else None

    def final_adapter(self) -> Adapter:
        """The whole update of the run: every folded adapter, then the active one."""
        active = self.active_adapter()
        if self.merged:
            return stack_adapters([*self.merged, active] if active is not None else self.merged)
        if active is None:
            raise FloristError("no global adapter: no round has completed")
        return active


# --- planning: each client's task and start ---------------------------------------------------


@dataclass(frozen=True)
class ClientTask:
    """Everything client ``index`` needs to train round ``round``, besides its start and data."""

    round: int
    index: int
    rank: int
    alpha: float
    seed: int
    init_rank: int | None  # the rank of the init the round's clients share; None: their own
    frozen_A: dict[str, torch.Tensor] | None  # FFA-LoRA: the shared frozen A's first r_k rows
    freeze: tuple[str, ...]  # factors kept frozen this round (RoLoRA's other factor)
    upload: tuple[str, ...]  # factors that leave the client this round
    learning_rate: float  # this round's peak rate (round_learning_rate)

    @property
    def client_id(self) -> str:
        return client_id(self.index)


class Method:
    """One method under one RunConfig, as the round engine reads its declarations.

    ``r_max`` is the run's largest client rank (FFA's frozen A and a shared init are drawn at it);
    a Flower node learns it from the server, since ranks are set per node there.
    """

    def __init__(
        self,
        cfg: RunConfig,
        shapes: Shapes,
        *,
        r_max: int | None = None,
        aggregator: Aggregator | None = None,
    ) -> None:
        self.cfg = cfg
        self.aggregator = aggregator if aggregator is not None else build_aggregator(cfg)
        self.shapes = shapes
        self.r_max = r_max if r_max is not None else max(cfg.client_rank(k) for k in range(cfg.num_clients))
        self._frozen_A: dict[str, torch.Tensor] | None = None

    @property
    def frozen_A(self) -> dict[str, torch.Tensor] | None:
        """FFA-LoRA's frozen A at r_max, from (seed, module) only: the same on every machine."""
        if self.aggregator.frozen_A and self._frozen_A is None:
            from florist.training import ffa_frozen_A

            self._frozen_A = ffa_frozen_A(self.cfg.seed, self.shapes, self.r_max)
        return self._frozen_A

    @property
    def init_rank(self) -> int | None:
        """The rank of the one init a round's clients share (client k takes its first r_k rows),
        or None when each client draws its own."""
        return self.r_max if self.cfg.resolved_client_init() == "shared" else None

    def task(self, rnd: int, k: int, *, rank: int | None = None, alpha: float | None = None) -> ClientTask:
        rank = self.cfg.client_rank(k) if rank is None else rank
        alpha = self.cfg.client_alpha(k) if alpha is None else alpha
        frozen, agg = self.frozen_A, self.aggregator
        if frozen is not None and min(A.shape[0] for A in frozen.values()) < rank:
            raise FloristError(f"{client_id(k)}: rank {rank} exceeds the run's FFA rank {self.r_max}")
        return ClientTask(
            round=rnd,
            index=k,
            rank=rank,
            alpha=alpha,
            seed=self.cfg.seed,
            init_rank=self.init_rank,
            frozen_A={n: A[:rank] for n, A in frozen.items()} if frozen is not None else None,
            # RoLoRA's untrained factor; FFA's frozen A is installed as ``frozen_A`` instead
            freeze=() if frozen is not None else tuple(f for f in "AB" if f not in agg.trained_factors(rnd)),
            upload=agg.sent_factors(rnd),
            learning_rate=round_learning_rate(self.cfg, rnd),
        )

    def plan(self, rnd: int) -> list[ClientTask]:
        """The tasks of round ``rnd``'s sampled clients, by client index."""
        return [self.task(rnd, k) for k in sample_clients(self.cfg, rnd)]

    def start(
        self,
        task: ClientTask,
        received: Adapter | None,
        own: Adapter | None,
        fresh: Callable[[ClientTask], Adapter],
    ) -> Adapter | None:
        """Where client ``task.index`` starts, from the method's declarations alone.

        Merge methods: a fresh LoRA (None). Before anything was received: the method's own shared
        start (``initial_adapter``, RoLoRA) or a fresh LoRA. Otherwise the first r_k components
        of ``received``; if it has fewer (the client was not sampled when a larger-rank client
        was), it is grown with rows of the client's fresh A (``fresh(task)``) and zero columns of
        B, which leaves the update unchanged and keeps the new directions trainable. Local factors
        (FedSA-LoRA's B) come from the client's ``own`` last trained adapter (zeros before it has
        trained).
        """
        if self.aggregator.merges_into_base:
            return None
        if received is None:
            start = self.aggregator.initial_adapter(self.shapes, task.rank, self.cfg.seed)
            return truncate_adapter(start, task.rank) if start is not None else None
        if min_rank(received) < task.rank:
            received = pad_adapter(received, fresh(task))
        init = truncate_adapter(received, task.rank)
        return with_local_factors(init, own, self.aggregator.local_factors)

    def known_start(self, server: ServerState, cid: str, rank: int) -> Adapter:
        """Client ``cid``'s start as the server knows it, to fill the factors it did not upload
        (RoLoRA's shared frozen factor). Local factors never reach the server: zeros here."""
        start = server.continuation(cid) or self.aggregator.initial_adapter(self.shapes, rank, self.cfg.seed)
        start = start or zeros_adapter(self.shapes, rank)
        start = truncate_adapter(start, min(rank, min_rank(start)))
        return with_local_factors(start, None, self.aggregator.local_factors)


def fresh_lora(host: Any, task: ClientTask) -> Adapter:
    """The fresh LoRA ``task``'s client draws this round (``init_generator``), without training."""
    from florist.training import init_generator

    generator = init_generator(task.seed, task.round, task.index, shared=task.init_rank is not None)
    host.install(task.rank, task.alpha, generator=generator, init_rank=task.init_rank)
    fresh = host.extract()
    host.remove()
    return fresh


# --- training: one client's task --------------------------------------------------------------


def run_client(
    trainer: Any, task: ClientTask, examples: list[dict], start: Adapter | None, *, keep_start: bool
) -> Any:
    """Train ``task``'s client from ``start``; a ``florist.training.ClientResult``. ``keep_start``
    keeps the start in it, from which DP measures the update."""
    return trainer.train(
        client_id=task.client_id,
        client_index=task.index,
        round_index=task.round,
        examples=examples,
        rank=task.rank,
        alpha=task.alpha,
        init=start,
        seed=task.seed,
        frozen_A=task.frozen_A,
        shared_init_rank=task.init_rank,
        keep_start=keep_start,
        freeze=task.freeze,
        learning_rate=task.learning_rate,
    )


def train_clients(
    setup: Any,
    method: Method,
    server: ServerState,
    rnd: int,
    *,
    keep_start: bool,
    desc: str,
    progress: bool | None = None,
) -> list[tuple[ClientTask, Any]]:
    """Round ``rnd``'s sampled clients in order (``setup``: a ``florist.federation.ClientSetup``),
    each trained from where it starts: what ``server`` last sent it, with its own local factors."""
    fresh = functools.partial(fresh_lora, setup.host)
    trained = []
    for task in tqdm(method.plan(rnd), desc=desc, leave=False, disable=bar_disabled(progress)):
        cid = task.client_id
        start = method.start(task, server.continuation(cid), server.client_state.get(cid), fresh)
        result = run_client(setup.trainer, task, setup.examples(task.index), start, keep_start=keep_start)
        trained.append((task, result))
    return trained


def client_privacy(cfg: RunConfig, *, server_sees_uploads: bool) -> str | None:
    """The privacy step a client takes before its upload leaves it: "noise" (local DP), "clip"
    (central DP when the server cannot see the uploads, as on Flower), or None."""
    if not privacy.dp_enabled(cfg) or (cfg.dp_mode == "central" and server_sees_uploads):
        return None
    return "noise" if cfg.dp_mode == "local" else "clip"


def protect_upload(
    cfg: RunConfig, result: Any, factors: tuple[str, ...], step: str | None, generator: torch.Generator | None
) -> tuple[ClientUpdate, float | None]:
    """The upload after the client's privacy step, and the norm of its update before clipping."""
    if step == "noise":
        assert generator is not None
        return privacy.privatize_upload(
            result.update,
            result.start,
            factors,
            clip_norm=cfg.dp_clip_norm,
            noise_multiplier=cfg.dp_noise_multiplier,
            generator=generator,
        )
    if step == "clip":
        return privacy.clip_upload(result.update, result.start, factors, cfg.dp_clip_norm)
    return result.update, None


def client_stats(result: Any) -> dict[str, Any]:
    """One client's line of a round record: rank, examples, losses, steps, tokens, seconds."""
    return {
        "rank": int(next(iter(result.update.modules.values())).rank),
        "num_examples": int(result.update.num_examples),
        "losses": [float(x) for x in result.losses],
        "steps": int(result.steps),
        "tokens": int(result.tokens),
        "seconds": float(result.seconds),
    }


# --- closing the round -----------------------------------------------------------------------


@dataclass
class RoundOutcome:
    result: GlobalResult
    entry: dict[str, Any]  # the round's record in metrics.json
    updates: list[ClientUpdate]  # the uploads aggregated (those that passed screening)
    rejected: list[Rejection]


def close_round(
    method: Method,
    server: ServerState,
    rnd: int,
    uploads: Sequence[ClientUpdate],
    stats: dict[str, dict[str, Any]],
    *,
    expected_ranks: dict[str, int] | None = None,
    history: Sequence[dict[str, Any]] = (),
    starts: dict[str, Adapter] | None = None,
    norms: dict[str, float] | None = None,
    central: privacy.CentralDP | None = None,
    combine: Callable[[list[ClientUpdate]], GlobalResult] | None = None,
    started: float | None = None,
) -> RoundOutcome:
    """Screen, aggregate, broadcast and record one round; ``server`` is updated in place.

    ``combine`` replaces the aggregation (secure aggregation's sum; its uploads are stand-ins the
    server cannot screen); ``expected_ranks`` are the ranks the clients were assigned.
    ``central`` wraps it in central DP (``starts``: what each client
    started from, where the server clips). ``history`` is the rounds recorded so far, for the
    privacy accountant; ``norms`` are the clients' own pre-clipping norms where known.
    """
    cfg, aggregator = method.cfg, method.aggregator
    updates, rejected = list(uploads), []
    if combine is None:  # uploads are untrusted: a bad one is logged and left out
        updates, rejected = screen_updates(
            updates, method.shapes, min_clients=cfg.min_clients, expected_ranks=expected_ranks
        )
    aggregate = combine or aggregator.aggregate
    factors = aggregator.sent_factors(rnd)
    t0 = time.perf_counter()
    if central is not None:
        result, clip_norms = central.aggregate(aggregate, updates, starts, factors)
        norms = clip_norms if clip_norms is not None else norms
    else:
        result = aggregate(updates)
    result = aggregator.for_round(result, rnd)
    if privacy.dp_enabled(cfg):  # what is released is built from the uploads alone (FedSA: no B_k)
        result = privacy.released_view(result, factors)
    _check_broadcast(result, rnd, cfg)  # before anything is broadcast or checkpointed
    aggregation_seconds = time.perf_counter() - t0
    communication = round_communication(result, updates, wire_dtype=getattr(torch, cfg.wire_dtype))
    server.broadcast(result)
    clients = {u.client_id: stats[u.client_id] for u in updates}
    entry: dict[str, Any] = {  # the round's record in metrics.json
        "round": rnd,
        "clients": list(clients),
        "client_stats": clients,
        "ranks": {n: int(r) for n, r in result.ranks.items()},
        "singular_values": {
            n: [float(x) for x in s.flatten().tolist()] for n, s in result.singular_values.items()
        },
        "communication": communication,
        "eff": float(paper_eff(result)),
        "aggregation_seconds": aggregation_seconds,
        "seconds": time.perf_counter() - (started if started is not None else t0),
        "learning_rate": round_learning_rate(cfg, rnd),
        "cumulative": cumulative_bytes(history, communication, cfg.num_clients),
    }
    if privacy.dp_enabled(cfg):
        entry["privacy"] = privacy.round_privacy(cfg, [*history, entry], norms)
    entry["rejected"] = [dataclasses.asdict(r) for r in rejected]
    return RoundOutcome(result, entry, updates, rejected)


def _check_broadcast(result: GlobalResult, rnd: int, cfg: RunConfig) -> None:
    """Refuse a round whose result would reach the clients, the checkpoint or adapter/ with NaN or
    Inf (as float32, the wire's dtype): the round fails and the last checkpoint stays as it was."""
    adapters = [result.adapter, result.base_update, result.global_view, *(result.per_client or {}).values()]
    for adapter in (a for a in adapters if a is not None):
        for name, f in adapter.items():
            if not all(bool(torch.isfinite(t.float()).all()) for t in (f.A, f.B * f.scaling)):
                cause = (
                    f"; the DP noise (--dp_clip_norm {cfg.dp_clip_norm:g}, --dp_noise_multiplier "
                    f"{cfg.dp_noise_multiplier:g}) is beyond what float32 can carry"
                    if privacy.dp_enabled(cfg)
                    else ""
                )
                raise FloristError(
                    f"round {rnd}: the {result.method} result of module {name!r} is not finite{cause}"
                )


def close_simulated(
    method: Method,
    server: ServerState,
    rnd: int,
    trained: Sequence[tuple[ClientTask, Any]],
    *,
    history: Sequence[dict[str, Any]] = (),
    started: float | None = None,
) -> RoundOutcome:
    """Close a round whose clients ran in this process (``florist run``, the sweep): each client
    keeps its local factors and takes its privacy step, in order, then ``close_round``; a server
    that sees the uploads clips them itself under central DP."""
    cfg, factors = method.cfg, method.aggregator.sent_factors(rnd)
    step = client_privacy(cfg, server_sees_uploads=True)
    noise = privacy.noise_generator() if step else None
    uploads, norms = [], {}
    for task, result in trained:
        if method.aggregator.local_factors:  # the client keeps what it trained (FedSA-LoRA's B)
            server.keep(task.client_id, result.update.modules)
        upload, norms[task.client_id] = protect_upload(cfg, result, factors, step, noise)
        uploads.append(upload)
    return close_round(
        method,
        server,
        rnd,
        uploads,
        {task.client_id: client_stats(result) for task, result in trained},
        expected_ranks={task.client_id: task.rank for task, _ in trained},
        history=history,
        starts={task.client_id: result.start for task, result in trained},
        norms=norms if step else None,
        central=privacy.CentralDP.of(cfg, server_clips=True),
        started=started,
    )


def cumulative_bytes(
    history: Sequence[dict[str, Any]], communication: dict[str, Any], num_clients: int
) -> dict[str, Any]:
    """Bytes up and down per client over the rounds so far (this one included), and their mean over
    the federation's ``num_clients`` (a client not sampled in a round sends and receives nothing)."""
    previous = (history[-1].get("cumulative") if history else None) or {"clients": {}}
    clients = {cid: dict(c) for cid, c in previous["clients"].items()}
    for cid, c in communication["clients"].items():
        total = clients.setdefault(cid, {"bytes_up": 0, "bytes_down": 0})
        total["bytes_up"] += c["bytes_up"]
        total["bytes_down"] += c["bytes_down"]
    mean = {
        f"bytes_{d}_per_client": sum(c[f"bytes_{d}"] for c in clients.values()) / num_clients
        for d in ("up", "down")
    }
    return {"clients": clients, **mean}


# --- the record --------------------------------------------------------------------------------


def new_metrics(cfg: RunConfig) -> dict[str, Any]:
    """The head of ``metrics.json`` before any round."""
    options = method_options(cfg)
    return {
        "config": cfg.to_dict(),
        "method": cfg.method,
        "threshold": options.get("threshold"),
        "client_init": cfg.resolved_client_init(),
        "model": cfg.global_model,
        "rounds": [],
    }


class RoundRecorder:
    """Appends each round's record to the metrics, writes the checkpoint, prints the log line."""

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        metrics: dict[str, Any],
        *,
        log: Callable[[str], None],
        client_state: bool = True,
    ) -> None:
        self.cfg, self.out, self.metrics, self.log = cfg, out, metrics, log
        self.client_state = client_state  # a Flower server holds none: it lives on the nodes

    def record(self, entry: dict[str, Any], server: ServerState) -> None:
        self.metrics["rounds"].append(entry)
        state = CheckpointState(
            entry["round"],
            self.metrics,
            self.cfg.to_dict(),
            server.merged,
            server.global_adapter,
            server.per_client,
            server.client_state if self.client_state else {},
        )
        server.merged.spill(save_checkpoint(self.out, state))  # the history now lives on disk
        if due(self.cfg.save_every, entry["round"], self.cfg):  # e.g. for generate or eval later
            self.write_adapter(self.out / "rounds" / f"round_{entry['round']:04d}", server)
        self.log(self.line(entry))
        release_free_memory()

    def write_adapter(self, where: Path, server: ServerState) -> Adapter:
        """The global model as a PEFT directory (``ServerState.final_adapter``), and each client's
        own under clients/<id>/ where clients received different adapters."""
        from florist.adapters import write_peft_adapter
        from florist.io import atomic_directory

        final, cfg = server.final_adapter(), self.cfg
        with atomic_directory(where) as tmp:
            for path, adapter in [
                (tmp, final),
                *((tmp / "clients" / c, a) for c, a in (server.per_client or {}).items()),
            ]:
                write_peft_adapter(
                    path,
                    adapter,
                    base_model_name_or_path=cfg.global_model,
                    target_modules=list(cfg.lora_target_modules),
                )
        return final

    def line(self, entry: dict[str, Any]) -> str:
        first, last = mean_losses(entry)
        return (
            f"round {entry['round']}/{self.cfg.num_communication_rounds}: {len(entry['clients'])} clients, "
            f"loss {first:.4f} -> {last:.4f}, global rank {sum(entry['ranks'].values())}, "
            f"Eff {entry['eff']:.3e}, aggregation {entry['aggregation_seconds']:.2f}s, "
            f"round {entry['seconds']:.1f}s"
        )

    def finish(
        self, server: ServerState, started: float, *, extra: dict[str, Any] | None = None,
        also: Callable[[Adapter], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The run's totals and privacy report, then adapter/ (and adapter/clients/<id>/ where
        clients received different adapters), ``also`` (more outputs) and metrics.json."""
        from florist.io import atomic_write_json

        cfg = self.cfg
        final = self.write_adapter(self.out / "adapter", server)
        rounds, eff_per_round = self.metrics["rounds"], [r["eff"] for r in self.metrics["rounds"]]
        self.metrics["communication_total"] = total_communication(rounds)
        self.metrics["eff_per_round"] = eff_per_round
        self.metrics["eff_total"] = eff_over_rounds(eff_per_round)
        ranks = {n: f.rank for n, f in final.items()}
        self.metrics["global_adapter"] = {"ranks": ranks, "total_rank": total_rank(final)}
        self.metrics["privacy"] = privacy.privacy_report(cfg, self.metrics["rounds"])
        self.metrics.update(extra or {})
        self.metrics["seconds"] = time.perf_counter() - started
        if also is not None:
            also(final)
        atomic_write_json(self.out / "metrics.json", self.metrics)
        return self.metrics


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap pages freed during a round back to the OS. Once a large block is freed, glibc
    serves blocks up to that size (32 MB at most) from its heap, and keeps the pages of blocks
    freed in the middle of it: without this, RSS after a round was about three times what is live
    (docs/benchmarks.md, "Many clients stay cheap")."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def mean_losses(entry: dict[str, Any]) -> tuple[float, float]:
    """The clients' mean training loss at their first and last step in a round record."""
    losses = [s["losses"] for s in entry["client_stats"].values() if s["losses"]]
    n = max(len(losses), 1)
    return sum(x[0] for x in losses) / n, sum(x[-1] for x in losses) / n
