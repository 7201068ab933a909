"""`florist run`: the in-process federation, every client simulated on one base model.

One base model lives in memory; every client is the same model with a different LoRA (see
``florist.lora.LoraHost``, ``ClientSetup``). Each round is the round engine's
(``florist.rounds``), which the sweep and the Flower apps call too: sample the clients, train
each from where it starts, screen and aggregate the uploads, broadcast. Merge methods (FLoRA,
FLoRIST) also fold the global adapter into the one base here. Round ``r`` of client ``k`` draws its
randomness from ``client_generator(seed, r, k)`` and its fresh LoRA from ``init_generator``, as on
a Flower SuperNode. After each round an atomic checkpoint is written (``florist.checkpoint``), so
``resume`` continues exactly where a killed run stopped.

The final global adapter goes to ``<output_dir>/adapter/`` as a standard PEFT directory
(``ServerState.final_adapter``):

* merge methods: the exact cumulative update of all rounds, i.e. every round's merged global
  adapter concatenated along the rank (B = [s_1 B_1 | s_2 B_2 | ...], A = [A_1; A_2; ...],
  scaling 1), so that base + adapter equals the base the clients ended with;
* FedIT, zero-padding, FFA: the last broadcast global adapter;
* FlexLoRA: the truncation at the largest client rank.

When clients received different adapters (FlexLoRA, zero-padding and FFA with heterogeneous
ranks), each client's own is also written under ``adapter/clients/<client id>/``.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from florist import privacy
from florist.aggregation import Adapter
from florist.checkpoint import CheckpointState, checkpoint_path, load_checkpoint
from florist.config import ConfigError, RunConfig
from florist.evaluation.evaluator import Evaluator
from florist.io import atomic_directory, output_lock
from florist.progress import bar_disabled
from florist.rounds import (
    Method,
    RoundRecorder,
    ServerState,
    close_simulated,
    evaluation_due,
    evaluation_samples,
    new_metrics,
    train_clients,
)

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
    "eval_every",
    "eval_every_samples",
    "eval_base",
    "save_every",
    "device",
}


@dataclass
class ClientSetup:
    """One base model in memory, the trainer on it, and every client's records; each client's
    examples are tokenised once, when first needed."""

    host: Any  # florist.lora.LoraHost
    tokenizer: Any
    trainer: Any  # florist.training.LocalTrainer
    prompter: Any
    records: list[list[dict]] | dict[int, list[dict]]  # by client index (a Flower node: its own)
    cfg: RunConfig
    tokenized: dict[int, list[dict]] = field(default_factory=dict)

    @classmethod
    def load(
        cls, cfg: RunConfig, model: Any = None, tokenizer: Any = None, records: Any = None
    ) -> ClientSetup:
        """Data first (its errors surface before the slow model load), then the model. ``records``
        (by client index): the clients' records, when they are not the paper's layout at
        ``cfg.data_path``."""
        from florist import data
        from florist.lora import LoraHost
        from florist.models import load_model
        from florist.training import LocalTrainer, TrainConfig

        if records is None:
            records = data.load_client_datasets(
                cfg.data_path,
                cfg.num_clients,
                max_samples_per_client=cfg.max_samples_per_client,
                seed=cfg.seed,
            )
        if model is None:
            model, tokenizer = load_model(cfg.global_model, device=cfg.device)
        elif tokenizer is None:
            raise ValueError("a tokenizer must be passed together with the model")
        host = LoraHost(model, list(cfg.lora_target_modules), dropout=cfg.lora_dropout)
        device = next(model.parameters()).device
        trainer = LocalTrainer(host, tokenizer, TrainConfig.from_run_config(cfg), device)
        return cls(host, tokenizer, trainer, data.Prompter(cfg.prompt_template_name), records, cfg)

    def examples(self, k: int) -> list[dict]:
        from florist import data

        if k not in self.tokenized:
            self.tokenized[k] = data.tokenize_dataset(
                self.records[k],
                self.tokenizer,
                cutoff_len=self.cfg.cutoff_len,
                train_on_inputs=self.cfg.train_on_inputs,
                prompter=self.prompter,
                desc=f"tokenizing client_{k}",
            )
        return self.tokenized[k]


# --- the run ---------------------------------------------------------------------------------


def _check_resumable(saved: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    """Refuse to resume when a setting that shapes the rounds differs from the checkpointed run."""
    current = json.loads(json.dumps(cfg.to_dict()))  # as stored: tuples become lists
    # An annealed rate depends on the number of rounds: a longer run anneals differently throughout.
    annealed = saved.get("lr_schedule", "constant") != "constant"
    for key, value in saved.items():
        if (
            key in RESUMABLE_CHANGES and not (annealed and key == "num_communication_rounds")
        ) or key not in current:
            continue
        if current[key] != value:
            raise ConfigError(
                f"{where}: cannot resume, setting {key!r} was {value!r} in the checkpointed run "
                f"but is {current[key]!r} now"
            )


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
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    resumed = _read_checkpoint(cfg, out)  # before the slow model load, so a bad one fails fast
    setup = ClientSetup.load(cfg, model, tokenizer)
    evaluate = Evaluator(cfg, setup.prompter)
    for note in evaluate.notes:
        tqdm.write(f"florist: {note}")
    method = Method(cfg, setup.host.module_shapes)
    server, metrics, first = _begin(cfg, out, resumed, setup, evaluate, method)
    recorder = RoundRecorder(cfg, out, metrics, log=tqdm.write)
    rounds = cfg.num_communication_rounds
    bar = tqdm(
        range(first, rounds + 1), desc="rounds", initial=first - 1, total=rounds, disable=bar_disabled()
    )
    dp = privacy.dp_enabled(cfg)  # DP measures each update from its start: keep that
    for rnd in bar:
        started_round = time.perf_counter()
        trained = train_clients(setup, method, server, rnd, keep_start=dp, desc=f"round {rnd} clients")
        outcome = close_simulated(
            method, server, rnd, trained, history=metrics["rounds"], started=started_round
        )
        if outcome.result.folded is not None:
            setup.host.merge_into_base(server.merged[-1])
        if evaluation_due(cfg, rnd):  # folded updates already live in the base
            outcome.entry["eval"] = evaluate(
                setup.host, setup.tokenizer, server.active_adapter(), samples=evaluation_samples(cfg, rnd)
            )
        recorder.record(outcome.entry, server)

    host, tokenizer = setup.host, setup.tokenizer
    last = metrics["rounds"][-1] if metrics["rounds"] else {}
    if "eval" in last and last["round"] == rounds:  # the last round's evaluation is the final one
        metrics["eval_after"] = last["eval"]
    else:
        metrics["eval_after"] = evaluate(host, tokenizer, server.active_adapter()) if cfg.evaluate else {}
    local = method.aggregator.local_factors
    if cfg.evaluate and local and evaluate.heldout:  # personalised clients
        from florist.personalised import evaluate_run

        metrics["eval_personal"] = evaluate_run(cfg, setup, server, local, evaluate.heldout)
    save_merged = functools.partial(_save_merged, cfg, out, server, host, tokenizer)
    return recorder.finish(server, started, also=save_merged if cfg.save_merged else None)


def _read_checkpoint(cfg: RunConfig, out: Path) -> CheckpointState | None:
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
    return resumed


def _begin(
    cfg: RunConfig,
    out: Path,
    resumed: CheckpointState | None,
    setup: ClientSetup,
    evaluate: Evaluator,
    method: Method,
) -> tuple[ServerState, dict[str, Any], int]:
    """The server state, the metrics so far and the first round to run: fresh, or resumed."""
    if resumed is None:
        metrics = new_metrics(cfg)
        metrics["eval_before"] = (
            evaluate(setup.host, setup.tokenizer, None) if cfg.evaluate and cfg.eval_base else {}
        )
        return ServerState(merged_dtype=setup.host.merge_dtype), metrics, 1
    if method.aggregator.local_factors and not resumed.client_state:
        raise ConfigError(
            f"{checkpoint_path(out)}: {cfg.method} keeps each client's own {'/'.join(method.aggregator.local_factors)} "
            "across rounds, but the checkpoint holds no per-client state; it cannot be resumed exactly"
        )
    server = ServerState(
        resumed.merged,
        resumed.global_adapter,
        resumed.per_client,
        resumed.client_state,
        setup.host.merge_dtype,
    )
    # Same ops in the same order as the original run, so the base is bit-identical.
    for adapter in server.merged:
        setup.host.merge_into_base(adapter)
    resumed.metrics["config"] = cfg.to_dict()
    tqdm.write(f"florist: resuming {out} after round {resumed.completed_round}")
    return server, resumed.metrics, resumed.completed_round + 1


def _save_merged(
    cfg: RunConfig, out: Path, server: ServerState, host: Any, tokenizer: Any, final: Adapter
) -> None:
    """merged/: the base with the final update folded in and peft's (now empty) layers taken
    out. It changes the model in memory, so it comes last."""
    if not server.merged:
        host.merge_into_base(final)
    host.remove()
    plain = host.peft.unload()
    with atomic_directory(out / "merged") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
