"""The Flower ServerApp: ``florist run``'s rounds across machines, with the same outputs.

``flwr run`` starts it on the SuperLink machine with the run config of the app project
(``florist flower app``). It

1. waits (bounded by ``node-wait-timeout``) for ``num-clients`` SuperNodes, then asks each who it
   is (``query.info``: partition, rank);
2. runs ``num-communication-rounds`` rounds with ``FloristStrategy`` through FedAvg's ``start()``
   loop (each round bounded by ``round-timeout``; a round with fewer than ``min-clients`` usable
   updates stops the run with a clear error, after the previous round's checkpoint);
3. sends the last broadcast (``train.finalize``), so every node ends with the global model;
4. writes ``<output-dir>/adapter/`` (PEFT), ``metrics.json`` and ``checkpoint/`` exactly as
   ``florist run`` does, plus per-round ``wire`` bytes and a ``flower`` section (nodes, failures).

With ``evaluate=true`` the server also loads the model and evaluates the global model before and
after (held-out loss, MMLU), with florist's ``Evaluator``, when it finds the evaluation data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from florist.comm import zero_counts
from florist.config import ConfigError, RunConfig
from florist.flower import protocol
from florist.flower.app_config import FlowerOptions, run_config_from_flower
from florist.flower.strategy import FloristStrategy, FlowerRunError

app = ServerApp()


class PromptGrid:
    """``grid`` with replies pulled every ``interval`` seconds (Flower's ``send_and_receive`` sleeps
    3 s between pulls, so each message stage of a round would wait 1.5 s on average for nothing).
    One small request to the SuperLink per interval; everything else is the grid's own."""

    def __init__(self, grid: Grid, interval: float = 0.5) -> None:
        self._grid = grid
        self.interval = interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting = set(self._grid.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while waiting and (timeout is None or time.time() < end):
            pulled = list(self._grid.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting:
                time.sleep(self.interval)
        return replies


def wait_for_nodes(grid: Grid, cfg: RunConfig, timeout: float) -> list[int]:
    """Node ids once ``num_clients`` are connected, or at least ``min_clients`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.num_clients:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= cfg.min_clients:
                log(
                    INFO,
                    "florist: %d of %d nodes connected after %.0fs; going on",
                    len(nodes),
                    cfg.num_clients,
                    timeout,
                )
                return nodes
            raise FlowerRunError(
                f"only {len(nodes)} SuperNodes connected within {timeout:.0f}s; the run needs "
                f"num-clients={cfg.num_clients} (at least min-clients={cfg.min_clients})"
            )
        time.sleep(1.0)


def _evaluator(cfg: RunConfig, server: Any) -> Any:
    """Centralised evaluation of ``server``'s global model (``florist.rounds.ServerState``), or None
    when it is off: a base that folds in every merged round as the run goes, then the active
    adapter, exactly as ``florist run`` evaluates."""
    if not cfg.evaluate:
        return None
    from florist import data
    from florist.evaluation.evaluator import Evaluator
    from florist.flower.client_app import _load_model
    from florist.lora import LoraHost

    model, tokenizer = _load_model(cfg)
    host = LoraHost(model, list(cfg.lora_target_modules), dropout=cfg.lora_dropout)
    evaluator = Evaluator(cfg, data.Prompter(cfg.prompt_template_name))
    for note in evaluator.notes:
        log(INFO, "florist: %s", note)
    folded = 0  # rounds already merged into this evaluator's base

    def evaluate(before: bool = False, samples: int | None = None) -> dict[str, Any]:
        nonlocal folded
        for adapter in server.merged[folded:]:
            host.merge_into_base(adapter)
            folded += 1
        return evaluator(host, tokenizer, None if before else server.active_adapter(), samples=samples)

    return evaluate


def run_flower_server(grid: Grid, cfg: RunConfig, options: FlowerOptions) -> dict[str, Any]:
    """The whole server side of a Flower run; returns the metrics it also writes. Like ``florist
    run``, it holds its output directory for itself (``florist.io.output_lock``)."""
    from florist.io import output_lock

    cfg.validate()
    with output_lock(cfg.output_dir):
        # A grid without push/pull (an in-process one) delivers at once and is used as it is.
        prompt = PromptGrid(grid) if hasattr(grid, "pull_messages") else grid
        return _run_flower_server(prompt, cfg, options)  # type: ignore[arg-type]


def _run_flower_server(grid: Grid, cfg: RunConfig, options: FlowerOptions) -> dict[str, Any]:
    from florist.checkpoint import load_checkpoint

    if cfg.save_merged:
        raise ConfigError(
            "save-merged is not supported by the Flower app; merge adapter/ into the base with peft"
        )
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    resumed = load_checkpoint(out) if cfg.resume else None
    strategy = FloristStrategy(cfg, output_dir=out, resumed=resumed)
    if resumed is not None:
        log(INFO, "florist: resuming %s after round %d", out, resumed.completed_round)

    nodes = wait_for_nodes(grid, cfg, options.node_wait_timeout)
    query = [
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord({})}),
            dst_node_id=n,
            message_type=f"{MessageType.QUERY}.{protocol.INFO_ACTION}",
        )
        for n in nodes
    ]
    strategy.register_nodes(grid.send_and_receive(query, timeout=options.round_timeout))
    if len(strategy.nodes) < cfg.min_clients:
        raise FlowerRunError(
            f"only {len(strategy.nodes)} nodes answered the info query (min-clients={cfg.min_clients})"
        )

    evaluation = _evaluator(cfg, strategy.server)
    if resumed is None:
        strategy.metrics["eval_before"] = evaluation(before=True) if evaluation and cfg.eval_base else {}
    strategy.evaluate_round = evaluation

    remaining = cfg.num_communication_rounds - strategy.round_offset
    if remaining > 0 and cfg.secure_aggregation:  # Flower's SecAgg+ workflow (florist.flower.secagg)
        from florist.flower.secagg import secure_round

        for server_round in range(1, remaining + 1):
            secure_round(strategy, grid, server_round, options.round_timeout)
    elif remaining > 0:
        strategy.start(
            grid, initial_arrays=ArrayRecord(), num_rounds=remaining, timeout=options.round_timeout
        )

    # The last broadcast: nodes get the final global model, and its bytes are accounted for.
    final_replies = grid.send_and_receive(strategy.final_messages(grid), timeout=options.round_timeout)
    strategy.absorb_final_replies(final_replies)

    metrics = strategy.metrics
    last = metrics["rounds"][-1] if metrics["rounds"] else {}
    if "eval" in last and last["round"] == cfg.num_communication_rounds:  # evaluated already
        metrics["eval_after"] = last["eval"]
    else:
        metrics["eval_after"] = evaluation() if evaluation is not None else {}
    wire_total = {
        key: sum(r.get("wire", {}).get("total", {}).get(key, 0) for r in metrics["rounds"])
        for key in zero_counts()
    }
    nodes = {
        n.client_id: {"node_id": n.node_id, "partition_id": n.partition_id, "rank": n.rank}
        for n in strategy.sorted_nodes()
    }
    flower = {"nodes": nodes, "failures": strategy.failures, "round_timeout": options.round_timeout}
    strategy.recorder.finish(strategy.server, started, extra={"wire_total": wire_total, "flower": flower})
    log(INFO, "florist: wrote %s (adapter/, metrics.json)", out)
    return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, options = run_config_from_flower(context.run_config)
    run_flower_server(grid, cfg, options)
