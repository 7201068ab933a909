"""The in-process federated round loop: sampling, local training, aggregation, broadcast.

One base model lives in memory; every client is the same model with a different LoRA (see
``florist.lora.LoraHost``). A round is:

1. sample clients (``client_selection_frac``, seeded by ``(seed, round)``, at least ``min_clients``);
2. each sampled client trains its LoRA at its own rank (``RunConfig.client_rank``), starting from a
   fresh init (round 1, and every round of the merge methods FLoRA and FLoRIST) or from what the
   server last broadcast to it (FedIT, zero-padding, FlexLoRA, FFA; see docs/architecture.md);
3. the server aggregates the uploads with ``florist.aggregation.get_aggregator(cfg.method)``;
4. broadcast: merge methods fold the global adapter into the base weights (and the server keeps
   each round's merged adapter); continue methods store what each client starts from next round.

After each round an atomic checkpoint is written (``florist.checkpoint``) so ``resume`` continues
exactly where a killed run stopped. Rounds are numbered from 1, and round ``r`` of client ``k``
draws its randomness from ``client_generator(seed, r, k)`` and its fresh LoRA from
``init_generator`` (one draw per round shared by all clients under ``client_init="shared"``,
one per client under ``"per_client"``), as on a Flower SuperNode.

The final global adapter goes to ``<output_dir>/adapter/`` as a standard PEFT directory:

* merge methods: the exact cumulative update of all rounds, i.e. every round's merged global
  adapter concatenated along the rank (B = [s_1 B_1 | s_2 B_2 | ...], A = [A_1; A_2; ...],
  scaling 1), so that base + adapter equals the base the clients ended with;
* FedIT, zero-padding, FFA: the last broadcast global adapter;
* FlexLoRA: the truncation at the largest client rank.

When clients received different adapters (FlexLoRA, zero-padding and FFA with heterogeneous
ranks), each client's own is also written under ``adapter/clients/<client id>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from florist import privacy
from florist.aggregation import Adapter, GlobalResult, LoraFactors, get_aggregator
from florist.checkpoint import CheckpointState, checkpoint_path, load_checkpoint, save_checkpoint
from florist.comm import eff_over_rounds, paper_eff, round_communication, total_communication
from florist.config import ConfigError, RunConfig
from florist.errors import FloristError
from florist.io import atomic_directory, atomic_write_json, output_lock
from florist.progress import bar_disabled
from florist.screening import screen_updates

MMLU_FILE_NAME = "mmlu_test_1444.jsonl"
# Settings that may change between a run and its resumption: they do not affect the rounds.
RESUMABLE_CHANGES = {
    "resume",
    "output_dir",
    "num_communication_rounds",
    "evaluate",
    "eval_samples",
    "eval_scorer",
    "dev_data_path",
    "test_data_path",
    "save_merged",
    "device",
}


def client_id(index: int) -> str:
    return f"client_{index}"


def sample_clients(cfg: RunConfig, round_number: int) -> list[int]:
    """The client indices trained in a round, ascending; a pure function of (seed, round)."""
    k = cfg.num_clients
    n = min(k, max(cfg.min_clients, int(cfg.client_selection_frac * k)))
    if n == k:
        return list(range(k))
    digest = hashlib.sha256(f"florist-sampling:{cfg.seed}:{round_number}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return sorted(torch.randperm(k, generator=generator)[:n].tolist())


def find_mmlu_file(cfg: RunConfig) -> Path | None:
    """cfg.dev_data_path, else $FLORIST_MMLU_PATH, else mmlu_test_1444.jsonl in data_path or cwd."""
    if cfg.dev_data_path:
        path = Path(cfg.dev_data_path)
        if not path.exists():
            raise FileNotFoundError(f"dev_data_path {path} (the MMLU file) does not exist")
        return path
    env = os.environ.get("FLORIST_MMLU_PATH")
    if env:
        if not Path(env).exists():
            raise FileNotFoundError(f"FLORIST_MMLU_PATH={env} does not exist")
        return Path(env)
    for candidate in (Path(cfg.data_path) / MMLU_FILE_NAME, Path.cwd() / MMLU_FILE_NAME):
        if candidate.is_file():
            return candidate
    return None


# --- adapter helpers -----------------------------------------------------------------------


def stack_adapters(adapters: list[Adapter]) -> Adapter:
    """One adapter whose update is the sum of all: B = [s_1 B_1 | ...], A = [A_1; ...], scaling 1."""
    stacked: Adapter = {}
    for name in adapters[0]:
        Bs = [a[name].B * a[name].scaling for a in adapters]
        stacked[name] = LoraFactors(
            A=torch.cat([a[name].A for a in adapters], dim=0), B=torch.cat(Bs, dim=1), scaling=1.0
        )
    return stacked


def truncate_adapter(adapter: Adapter, rank: int) -> Adapter:
    """The first ``rank`` components of every module (zero-padding and FlexLoRA clients)."""
    return {n: LoraFactors(A=f.A[:rank], B=f.B[:, :rank], scaling=f.scaling) for n, f in adapter.items()}


def pad_adapter(adapter: Adapter, fresh: Adapter) -> Adapter:
    """Grow ``adapter`` to ``fresh``'s rank: fresh A rows and zero B columns, same update."""
    padded: Adapter = {}
    for n, f in adapter.items():
        have, want = f.rank, fresh[n].rank
        A = torch.cat([f.A, fresh[n].A[have:want].to(f.A.dtype)], dim=0)
        B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], want - have)], dim=1)
        padded[n] = LoraFactors(A=A, B=B, scaling=f.scaling)
    return padded


def _max_rank_adapter(adapters: dict[str, Adapter]) -> Adapter:
    return max(adapters.values(), key=lambda a: sum(f.rank for f in a.values()))


@dataclass
class ServerState:
    """What the server remembers between rounds."""

    merged: list[Adapter] = field(default_factory=list)  # folded into the base, one per round
    global_adapter: Adapter | None = None  # continue methods: the last broadcast (or global view)
    per_client: dict[str, Adapter] | None = None  # FlexLoRA: one per client id
    # Per-client state of methods with local factors (FedSA-LoRA's B_k): each client's own last
    # trained adapter, which in a real federation lives on the client.
    client_state: dict[str, Adapter] = field(default_factory=dict)

    def broadcast(self, result: GlobalResult) -> None:
        if result.folded is not None:
            self.merged.append(_to_cpu(result.folded))
        if not result.merge:
            shared = result.adapter if result.adapter is not None else result.global_view
            self.global_adapter = _to_cpu(shared) if shared is not None else None
            self.per_client = (
                {cid: _to_cpu(a) for cid, a in result.per_client.items()} if result.per_client else None
            )

    def keep(self, cid: str, trained: Adapter) -> None:
        """Remember client ``cid``'s own trained adapter (methods with local factors)."""
        self.client_state[cid] = _to_cpu(trained)

    def continuation(self, cid: str) -> Adapter | None:
        """The adapter client ``cid`` continues from (any rank), or None for a fresh start."""
        if self.per_client:
            # Truncations of one SVD are nested, so a client not sampled last round gets the
            # first components of the largest one.
            return self.per_client.get(cid) or _max_rank_adapter(self.per_client)
        return self.global_adapter

    def active_adapter(self) -> Adapter | None:
        """The global model's adapter on top of the (merged) base: None for the merge methods."""
        if self.global_adapter is not None:
            return self.global_adapter
        return _max_rank_adapter(self.per_client) if self.per_client else None

    def final_adapter(self) -> Adapter:
        """The whole update of the run: every folded adapter, then the active one."""
        active = self.active_adapter()
        if self.merged:
            return stack_adapters([*self.merged, active] if active is not None else self.merged)
        if active is None:
            raise FloristError("no global adapter: no round has completed")
        return active


def _to_cpu(adapter: Adapter) -> Adapter:
    return {
        n: LoraFactors(A=f.A.detach().cpu(), B=f.B.detach().cpu(), scaling=f.scaling)
        for n, f in adapter.items()
    }


# --- evaluation ------------------------------------------------------------------------------


class Evaluator:
    """Held-out loss and MMLU on the global model, each when its data is available."""

    def __init__(self, cfg: RunConfig, prompter: Any) -> None:
        from florist import data

        self.cfg, self.prompter = cfg, prompter
        self.heldout: list[dict] = []
        self.mmlu: list[Any] = []
        self.notes: list[str] = []
        if not cfg.evaluate:
            return
        test_file = (
            Path(cfg.test_data_path)
            if cfg.test_data_path
            else data.find_test_file(cfg.data_path, cfg.num_clients)
        )
        if test_file is not None:
            self.heldout, _ = data.load_dataset_file(test_file)  # errors name the file and record
        else:
            self.notes.append("no held-out test file (global_test.json): held-out loss skipped")
        mmlu_file = find_mmlu_file(cfg)
        if mmlu_file is not None:
            from florist.evaluation.mmlu import load_mmlu

            self.mmlu = load_mmlu(mmlu_file)
        else:
            self.notes.append(
                f"no MMLU file ({MMLU_FILE_NAME} via --dev_data_path or FLORIST_MMLU_PATH): MMLU skipped"
            )

    def __call__(self, host: Any, tokenizer: Any, adapter: Adapter | None) -> dict[str, Any]:
        """Evaluate ``host``'s base with ``adapter`` active (None: the base alone)."""
        out: dict[str, Any] = {}
        if not (self.heldout or self.mmlu):
            return out
        model = host.model
        was_training = model.training
        model.eval()
        with host.use_adapter(adapter):
            if self.heldout:
                from florist.evaluation.heldout import heldout_loss

                out["heldout"] = heldout_loss(
                    model,
                    tokenizer,
                    self.heldout,
                    cutoff_len=self.cfg.cutoff_len,
                    prompter=self.prompter,
                    max_records=self.cfg.eval_samples,
                )
            if self.mmlu:
                from florist.evaluation.mmlu import evaluate_mmlu

                out["mmlu"] = evaluate_mmlu(
                    model,
                    tokenizer,
                    self.mmlu,
                    scorer=self.cfg.eval_scorer,
                    seed=self.cfg.seed,
                    max_questions=self.cfg.eval_samples,
                )
        model.train(was_training)
        return out


# --- the run ---------------------------------------------------------------------------------


def _check_resumable(saved: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    """Refuse to resume when a setting that shapes the rounds differs from the checkpointed run."""
    current = json.loads(json.dumps(cfg.to_dict()))  # as stored: tuples become lists
    for key, value in saved.items():
        if key in RESUMABLE_CHANGES or key not in current:
            continue
        if current[key] != value:
            raise ConfigError(
                f"{where}: cannot resume, setting {key!r} was {value!r} in the checkpointed run "
                f"but is {current[key]!r} now"
            )


def round_entry(
    rnd: int,
    client_stats: dict[str, Any],
    result: GlobalResult,
    communication: dict[str, Any],
    *,
    aggregation_seconds: float,
    seconds: float,
) -> dict[str, Any]:
    """One round of ``metrics.json``, as ``florist run`` and the Flower server both write it."""
    return {
        "round": rnd,
        "clients": list(client_stats),
        "client_stats": client_stats,
        "ranks": {n: int(r) for n, r in result.ranks.items()},
        "singular_values": {
            n: [float(x) for x in s.flatten().tolist()] for n, s in result.singular_values.items()
        },
        "communication": communication,
        "eff": float(paper_eff(result)),
        "aggregation_seconds": aggregation_seconds,
        "seconds": seconds,
    }


def run_totals(rounds: list[dict[str, Any]], final: Adapter) -> dict[str, Any]:
    """The whole run's communication, Eff and global adapter ranks, from its rounds."""
    eff_per_round = [r["eff"] for r in rounds]
    return {
        "communication_total": total_communication(rounds),
        "eff_per_round": eff_per_round,
        "eff_total": eff_over_rounds(eff_per_round),
        "global_adapter": {
            "ranks": {n: f.rank for n, f in final.items()},
            "total_rank": sum(f.rank for f in final.values()),
        },
    }


def _round_stats(results: dict[str, Any]) -> dict[str, Any]:
    return {
        cid: {
            "rank": int(next(iter(r.update.modules.values())).rank),
            "num_examples": int(r.update.num_examples),
            "losses": [float(x) for x in r.losses],
            "steps": int(r.steps),
            "tokens": int(r.tokens),
            "seconds": float(r.seconds),
        }
        for cid, r in results.items()
    }


def _plain_model(host: Any) -> Any:
    """The transformers model with peft's (now empty) LoRA layers taken out, for save_pretrained."""
    host.remove()
    return host.peft.unload()


def run_federated(cfg: RunConfig, *, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run ``cfg.num_communication_rounds`` rounds in process; write outputs; return the metrics.

    ``model``/``tokenizer`` may be passed in (tests, sweeps); otherwise ``cfg.global_model`` is
    loaded once. Outputs in ``cfg.output_dir``: ``adapter/``, ``metrics.json``, ``checkpoint/``
    and, with ``save_merged``, ``merged/``. The run holds ``cfg.output_dir`` for itself
    (``florist.io.output_lock``): a second run on it is refused, and an unwritable one is found
    before any training.
    """
    cfg.validate()
    if cfg.secure_aggregation:
        raise ConfigError(privacy.IN_PROCESS_SECAGG)
    with output_lock(cfg.output_dir):
        return _run_federated(cfg, model=model, tokenizer=tokenizer)


def _run_federated(cfg: RunConfig, *, model: Any, tokenizer: Any) -> dict[str, Any]:
    from florist import data
    from florist.lora import LoraHost
    from florist.models import load_model
    from florist.training import LocalTrainer, TrainConfig, ffa_frozen_A

    if cfg.client_selection_strategy != "random":
        raise ConfigError(
            f"client_selection_strategy must be 'random', got {cfg.client_selection_strategy!r}"
        )
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    # Read (and verify) the checkpoint before the slow model load, so a bad one fails fast.
    resumed = load_checkpoint(out) if cfg.resume else None
    if resumed is not None:
        _check_resumable(resumed.config, cfg, checkpoint_path(out))
        if resumed.completed_round > cfg.num_communication_rounds:
            raise ConfigError(
                f"{checkpoint_path(out)}: the checkpoint has {resumed.completed_round} rounds, more than "
                f"num_communication_rounds={cfg.num_communication_rounds}"
            )
    elif cfg.resume:
        tqdm.write(f"florist: no checkpoint in {out}; starting from round 1")
    elif checkpoint_path(out).exists():
        tqdm.write(
            f"florist: {out} holds a checkpoint of an earlier run; starting over (use --resume to continue it)"
        )

    # Data errors surface before the slow model load, too.
    datasets = data.load_client_datasets(
        cfg.data_path, cfg.num_clients, max_samples_per_client=cfg.max_samples_per_client, seed=cfg.seed
    )
    prompter = data.Prompter(cfg.prompt_template_name)
    evaluate = Evaluator(cfg, prompter)
    for note in evaluate.notes:
        tqdm.write(f"florist: {note}")
    if model is None:
        model, tokenizer = load_model(cfg.global_model, device=cfg.device)
    elif tokenizer is None:
        raise ValueError("run_federated: a tokenizer must be passed together with the model")
    device = next(model.parameters()).device
    host = LoraHost(model, list(cfg.lora_target_modules), dropout=cfg.lora_dropout)
    trainer = LocalTrainer(host, tokenizer, TrainConfig.from_run_config(cfg), device)
    options: dict[str, Any] = {"threshold": cfg.threshold} if cfg.method == "florist" else {}
    aggregator = get_aggregator(cfg.method, dtype=getattr(torch, cfg.aggregation_dtype), **options)
    wire_dtype = getattr(torch, cfg.wire_dtype)
    dp = cfg.dp_mode if privacy.dp_enabled(cfg) else None
    noise = privacy.noise_generator() if dp else None

    tokenized: dict[int, list[dict]] = {}  # tokenise each client once, when first sampled

    def examples(k: int) -> list[dict]:
        if k not in tokenized:
            tokenized[k] = data.tokenize_dataset(
                datasets[k],
                tokenizer,
                cutoff_len=cfg.cutoff_len,
                train_on_inputs=cfg.train_on_inputs,
                prompter=prompter,
                desc=f"tokenizing {client_id(k)}",
            )
        return tokenized[k]

    # FFA: one frozen A for all clients and rounds; client k trains against its first r_k rows.
    r_max = max(cfg.client_rank(k) for k in range(cfg.num_clients))
    frozen_A = ffa_frozen_A(cfg.seed, host.module_shapes, r_max) if aggregator.frozen_A else None
    shared_init_rank = cfg.shared_init_rank()

    server = ServerState()
    if resumed is not None:
        metrics = resumed.metrics
        metrics["config"] = cfg.to_dict()
        if aggregator.local_factors and not resumed.client_state:
            raise ConfigError(
                f"{checkpoint_path(out)}: {cfg.method} keeps each client's own {'/'.join(aggregator.local_factors)} "
                "across rounds, but the checkpoint holds no per-client state; it cannot be resumed exactly"
            )
        server = ServerState(resumed.merged, resumed.global_adapter, resumed.per_client, resumed.client_state)
        # Same ops in the same order as the original run, so the base is bit-identical.
        for adapter in server.merged:
            host.merge_into_base(adapter)
        start = resumed.completed_round + 1
        tqdm.write(f"florist: resuming {out} after round {resumed.completed_round}")
    else:
        metrics = {
            "config": cfg.to_dict(),
            "method": cfg.method,
            "threshold": cfg.threshold if cfg.method == "florist" else None,
            "client_init": cfg.resolved_client_init(),
            "model": cfg.global_model,
            "rounds": [],
            "eval_before": evaluate(host, tokenizer, None) if cfg.evaluate else {},
        }
        start = 1

    rounds = cfg.num_communication_rounds
    disable = bar_disabled()
    for rnd in tqdm(
        range(start, rounds + 1), desc="rounds", initial=start - 1, total=rounds, disable=disable
    ):
        round_started = time.perf_counter()
        selected = sample_clients(cfg, rnd)
        results = {}
        dp_norms: dict[str, float] = {}
        for k in tqdm(selected, desc=f"round {rnd} clients", leave=False, disable=disable):
            cid, rank = client_id(k), cfg.client_rank(k)
            init = _start(aggregator, server, host, cfg, rnd, k)
            results[cid] = trainer.train(
                client_id=cid,
                client_index=k,
                round_index=rnd,
                examples=examples(k),
                rank=rank,
                alpha=cfg.client_alpha(k),
                init=init,
                seed=cfg.seed,
                frozen_A={n: A[:rank] for n, A in frozen_A.items()} if frozen_A is not None else None,
                shared_init_rank=shared_init_rank,
                keep_start=dp is not None,
                freeze=frozen_factors(aggregator, rnd),
            )
            if aggregator.local_factors:  # the client keeps what it trained (FedSA-LoRA's B)
                server.keep(cid, results[cid].update.modules)
            if dp == "local":  # the client's own step, before its upload leaves it
                results[cid].update, dp_norms[cid] = privacy.privatize_upload(
                    results[cid].update,
                    results[cid].start,
                    aggregator.sent_factors(rnd),
                    clip_norm=cfg.dp_clip_norm,
                    noise_multiplier=cfg.dp_noise_multiplier,
                    generator=noise,
                )
        # Uploads are untrusted: a bad one is logged and left out while min_clients remain.
        updates, rejected = screen_updates(
            [r.update for r in results.values()],
            host.module_shapes,
            min_clients=cfg.min_clients,
            expected_ranks={client_id(k): cfg.client_rank(k) for k in selected},
        )
        results = {u.client_id: results[u.client_id] for u in updates}
        t0 = time.perf_counter()
        if dp == "central":
            result, dp_norms = privacy.central_aggregate(
                aggregator,
                updates,
                {cid: r.start for cid, r in results.items()},
                clip_norm=cfg.dp_clip_norm,
                noise_multiplier=cfg.dp_noise_multiplier,
                generator=noise,
                factors=aggregator.sent_factors(rnd),
            )
        else:
            result = aggregator.aggregate(updates)
            if dp:  # what the run releases is built from the uploads alone (FedSA: no B_k)
                result = privacy.released_view(result, aggregator.sent_factors(rnd))
        result = aggregator.for_round(result, rnd)
        aggregation_seconds = time.perf_counter() - t0
        communication = round_communication(result, updates, wire_dtype=wire_dtype)
        server.broadcast(result)
        if result.folded is not None:
            host.merge_into_base(server.merged[-1])
        stats = _round_stats(results)
        entry = round_entry(
            rnd,
            stats,
            result,
            communication,
            aggregation_seconds=aggregation_seconds,
            seconds=time.perf_counter() - round_started,
        )
        if dp:
            entry["privacy"] = privacy.round_privacy(cfg, [*metrics["rounds"], entry], dp_norms)
        metrics["rounds"].append(entry | {"rejected": [dataclasses.asdict(r) for r in rejected]})
        eff = entry["eff"]
        save_checkpoint(
            out,
            CheckpointState(
                rnd,
                metrics,
                cfg.to_dict(),
                server.merged,
                server.global_adapter,
                server.per_client,
                server.client_state,
            ),
        )
        losses = [s["losses"] for s in stats.values() if s["losses"]]
        first = sum(x[0] for x in losses) / max(len(losses), 1)
        last = sum(x[-1] for x in losses) / max(len(losses), 1)
        tqdm.write(
            f"round {rnd}/{rounds}: {len(results)} clients, loss {first:.4f} -> {last:.4f}, "
            f"global rank {sum(result.ranks.values())}, Eff {eff:.3e}, "
            f"aggregation {aggregation_seconds:.2f}s, round {time.perf_counter() - round_started:.1f}s"
        )

    final = server.final_adapter()
    active = server.active_adapter()  # folded updates already live in the base
    metrics["eval_after"] = evaluate(host, tokenizer, active) if cfg.evaluate else {}
    if cfg.evaluate and aggregator.local_factors and evaluate.heldout:  # personalised clients
        from florist.personalised import evaluate_run

        metrics["eval_personal"] = evaluate_run(
            cfg, host, tokenizer, prompter, server, aggregator.local_factors, datasets, evaluate.heldout
        )
    metrics.update(run_totals(metrics["rounds"], final))
    metrics["privacy"] = privacy.privacy_report(cfg, metrics["rounds"])
    metrics["seconds"] = time.perf_counter() - started
    _write_outputs(cfg, out, server, final, host, tokenizer)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _continuation(server: ServerState, host: Any, cfg: RunConfig, rnd: int, k: int) -> Adapter | None:
    """What client k of a continue method starts round ``rnd`` from, at its own rank r_k.

    The first r_k components of what the server broadcast; if that has fewer (the client was
    not sampled when a larger-rank client was), it is grown with rows of the client's fresh A
    and zero columns of B, which leaves the update unchanged and keeps the new directions
    trainable. None in round 1: a fresh LoRA.
    """
    from florist.training import init_generator

    init = server.continuation(client_id(k))
    rank = cfg.client_rank(k)
    if init is None:
        return None
    if min(f.rank for f in init.values()) < rank:
        shared = cfg.shared_init_rank()
        generator = init_generator(cfg.seed, rnd, k, shared=shared is not None)
        host.install(rank, cfg.client_alpha(k), generator=generator, init_rank=shared)
        fresh = host.extract()
        host.remove()
        init = pad_adapter(init, fresh)
    return truncate_adapter(init, rank)


def frozen_factors(aggregator: Any, rnd: int) -> tuple[str, ...]:
    """The factors a client keeps frozen in round ``rnd`` (RoLoRA: the one it does not train).
    FFA's frozen A is installed from its own seed (``frozen_A``), so it is not listed here."""
    if aggregator.frozen_A:
        return ()
    return tuple(f for f in ("A", "B") if f not in aggregator.trained_factors(rnd))


def _start(
    aggregator: Any, server: ServerState, host: Any, cfg: RunConfig, rnd: int, k: int
) -> Adapter | None:
    """What client k starts round ``rnd`` from, from the method's declarations alone.

    Merge methods: a fresh LoRA. Otherwise the continuation (``_continuation``); in round 1 the
    method's shared start (``initial_adapter``, RoLoRA) if it has one. For methods with local
    factors, those come from the client's own last trained adapter (zeros, the fresh value of B,
    before it has trained).
    """
    if aggregator.merges_into_base:
        return None
    init = _continuation(server, host, cfg, rnd, k)
    rank = cfg.client_rank(k)
    if init is None:
        start = aggregator.initial_adapter(host.module_shapes, rank, cfg.seed)
        return truncate_adapter(start, rank) if start is not None else None
    return with_local_factors(init, server.client_state.get(client_id(k)), aggregator.local_factors)


def with_local_factors(received: Adapter, own: Adapter | None, factors: tuple[str, ...]) -> Adapter:
    """``received`` with ``factors`` replaced by the client's own (zeros when it has none yet).

    The scaling goes with B: the client's own B keeps the client's own scaling.
    """
    if not factors:
        return received
    out: Adapter = {}
    for name, f in received.items():
        mine = own[name] if own is not None else None
        A = mine.A if mine is not None and "A" in factors else f.A
        B = (mine.B if mine is not None else torch.zeros_like(f.B)) if "B" in factors else f.B
        scaling = mine.scaling if mine is not None and "B" in factors else f.scaling
        out[name] = LoraFactors(A=A, B=B, scaling=scaling)
    return out


def _write_outputs(
    cfg: RunConfig, out: Path, server: ServerState, final: Adapter, host: Any, tokenizer: Any
) -> None:
    """adapter/ (and adapter/clients/), and with save_merged the merged model in merged/.

    save_merged folds the final update into the in-memory base and takes peft's layers out of
    the model, so it comes last.
    """
    from florist.adapters import write_peft_adapter

    target = list(cfg.lora_target_modules)
    with atomic_directory(out / "adapter") as tmp:
        write_peft_adapter(tmp, final, base_model_name_or_path=cfg.global_model, target_modules=target)
        for cid, adapter in (server.per_client or {}).items():
            write_peft_adapter(
                tmp / "clients" / cid,
                adapter,
                base_model_name_or_path=cfg.global_model,
                target_modules=target,
            )
    if cfg.save_merged:
        if not server.merged:
            host.merge_into_base(final)
        plain = _plain_model(host)
        with atomic_directory(out / "merged") as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
