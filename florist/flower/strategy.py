"""One Flower strategy for every florist method: FedAvg's round loop, florist's aggregation.

``FloristStrategy(cfg)`` subclasses Flower's message-based ``FedAvg`` and keeps its ``start()``
loop (sampling, ``send_and_receive`` with a round timeout, logging), overriding the two steps that
differ for federated LoRA:

* ``configure_train`` builds one message per node, because what a node needs depends on it:
  FlexLoRA and zero-padding send each client its own truncation, continue methods send the
  adapter the client continues from, and merge methods (FLoRA, FLoRIST) send the global updates
  the node has not merged yet (normally just last round's; after a lost or new SuperNode state,
  all of them, so its base is rebuilt exactly).
* ``aggregate_train`` decodes and validates each reply (untrusted), keys it by the node it came
  from (``message.metadata.src_node_id``), orders clients by partition like ``florist run``, and
  closes the round with the round engine (``florist.rounds.close_round``: screening, aggregation,
  central DP, communication, broadcast), then records it and writes the per-round checkpoint.

The round is the engine's, as in ``florist run``, so with the same seeds, data and ranks a Flower
run produces the same global adapter as the in-process one. Besides florist's accounting, every round also records the bytes that really went
through Flower's messages (``wire``): the array payloads of the replies (up) and of the messages
that delivered the round's broadcast (down, sent with the next round or the final broadcast).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from florist import privacy
from florist.aggregation import Adapter, ClientUpdate, GlobalResult
from florist.comm import zero_counts
from florist.config import RunConfig
from florist.errors import FloristError
from florist.flower import protocol
from florist.flower.payload import PayloadError, adapter_to_record, record_nbytes, record_to_adapter
from florist.rounds import (
    Method,
    RoundOutcome,
    RoundRecorder,
    ServerState,
    build_aggregator,
    close_round,
    evaluation_due,
    evaluation_samples,
    mean_losses,
    method_options,
    new_metrics,
    sample_clients,
)


class FlowerRunError(FloristError):
    """A Flower run that cannot continue (too few clients, inconsistent nodes)."""


@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    client_id: str
    rank: int
    merged_rounds: int = 0  # merged global updates this node holds


class FloristStrategy(FedAvg):
    """FedAvg's loop with florist's per-node payloads and LoRA aggregation (any method)."""

    def __init__(self, cfg: RunConfig, *, output_dir: str | Path | None = None, resumed: Any = None) -> None:
        super().__init__(
            fraction_train=cfg.client_selection_frac,
            fraction_evaluate=0.0,  # evaluation is centralised (florist's Evaluator), not federated
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            weighted_by_key="num-examples",
        )
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output_dir)
        self.aggregator = build_aggregator(cfg)
        self.nodes: dict[int, NodeInfo] = {}
        self._method: Method | None = None  # once the nodes' module shapes are known
        self.server = ServerState()
        self.last_result: GlobalResult | None = None
        self.round_offset = 0
        self.failures: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = new_metrics(cfg)
        self.sent: dict[int, dict[str, Any]] = {}  # node id -> what this round sent it
        self.evaluate_round: Any = None  # the server's evaluation of the global model (eval_every)
        self.reply_scalings: dict[str, dict[str, Any]] = {}  # secure aggregation: scalings only
        if resumed is not None:
            # A resumed run: nodes start with empty state, so the merged updates are resent.
            self.server = ServerState(resumed.merged, resumed.global_adapter, resumed.per_client)
            self.metrics = resumed.metrics
            self.metrics["config"] = cfg.to_dict()
            self.round_offset = resumed.completed_round
        self.recorder = RoundRecorder(
            cfg,
            self.output_dir,
            self.metrics,
            log=lambda line: log(INFO, "florist: %s", line),
            client_state=False,
        )

    @property
    def method(self) -> Method:
        """The round engine's view of the method, once a node has told the module shapes."""
        if self._method is None:
            raise FlowerRunError("no node has reported its model's module shapes yet")
        return self._method

    def learn_shapes(self, shapes: dict[str, tuple[int, int]], sender: str) -> None:
        if self._method is None:
            self._method = Method(self.cfg, shapes, r_max=self.ffa_rank(), aggregator=self.aggregator)
        elif shapes != self._method.shapes:
            raise PayloadError(f"{sender}: its model's module shapes differ from the other nodes'")

    # --- nodes ------------------------------------------------------------------------------

    def ffa_rank(self) -> int:
        """FFA's frozen A has the largest client rank; client k uses its first r_k rows."""
        ranks = [n.rank for n in self.nodes.values()] or [self.cfg.lora_r]
        return max([*ranks, *(self.cfg.client_rank(k) for k in range(self.cfg.num_clients))])

    def register_nodes(self, replies: Iterable[Message]) -> None:
        """Record who each node is from its ``query.info`` reply; refuse inconsistent setups."""
        by_partition: dict[int, int] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._failure(0, node_id, f"info query failed: {reply.error.reason}")
                continue
            info = reply.content[protocol.INFO]
            k = int(info["partition-id"])
            if not 0 <= k < self.cfg.num_clients:
                raise FlowerRunError(
                    f"node {node_id} has partition-id {k}, outside 0..{self.cfg.num_clients - 1} (num-clients={self.cfg.num_clients})"
                )
            if k in by_partition:
                raise FlowerRunError(f"nodes {by_partition[k]} and {node_id} both have partition-id {k}")
            by_partition[k] = node_id
            if not self.cfg.heter and int(info["rank"]) != self.cfg.lora_r:
                raise FlowerRunError(
                    f"node {node_id} reports rank {info['rank']} in a homogeneous run (lora-r {self.cfg.lora_r})"
                )
            self.nodes[node_id] = NodeInfo(
                node_id, k, str(info["client-id"]), int(info["rank"]), int(info["merged-rounds"])
            )
        log(
            INFO, "florist: %d nodes: %s", len(self.nodes), {n.client_id: n.rank for n in self.sorted_nodes()}
        )

    def sorted_nodes(self) -> list[NodeInfo]:
        return sorted(self.nodes.values(), key=lambda n: n.partition_id)

    def _failure(self, round_number: int, node_id: int, reason: str) -> None:
        client = self.nodes[node_id].client_id if node_id in self.nodes else None
        log(WARNING, "florist: round %d: node %s (%s): %s", round_number, node_id, client, reason)
        self.failures.append(
            {"round": round_number, "node_id": int(node_id), "client": client, "reason": reason}
        )

    # --- payloads ----------------------------------------------------------------------------

    def _broadcast(
        self, node: NodeInfo, round_number: int, config: ConfigRecord, message_type: str, group_id: str = ""
    ) -> Message:
        """The message with what ``node`` must receive before training round ``round_number`` (or
        finishing), and ``config``."""
        records: dict[str, Any] = {}
        carried: list[tuple[int, ArrayRecord]] = []
        if self.server.merged:
            for r in range(node.merged_rounds + 1, len(self.server.merged) + 1):
                arrays, scalings = adapter_to_record(
                    self.server.merged[r - 1], wire_dtype=self.cfg.wire_dtype
                )
                records[protocol.merged_key(r)] = arrays
                records[protocol.merged_scaling_key(r)] = scalings
                carried.append((r, arrays))
        if not self.aggregator.merges_into_base:  # FedEx-LoRA: a folded update and a continuation
            init = self.server.continuation(node.client_id)
            if init is not None:
                # All but the node's own factors after a resume, or when the node missed the last
                # round: its copy of what did not travel (RoLoRA's frozen factor) is stale then.
                everything = tuple(f for f in ("A", "B") if f not in self.aggregator.local_factors)
                stale = self._last_trained(node.client_id) < round_number - 1
                factors = (
                    everything if stale or self.last_result is None else self.last_result.downloaded_factors
                )
                arrays, scalings = adapter_to_record(init, factors=factors, wire_dtype=self.cfg.wire_dtype)
                records[protocol.INIT] = arrays
                records[protocol.INIT_SCALING] = scalings
                config["init-factors"] = list(factors)
                carried.append((round_number - 1, arrays))
        config["merged-rounds"] = len(self.server.merged)
        config["ffa-rank"] = self.ffa_rank()
        config["init-rank"] = self.ffa_rank()  # a shared init is drawn at the largest rank too
        config.setdefault("init-factors", ["A", "B"])
        # Bytes on the wire belong to the round whose broadcast they deliver.
        for origin, arrays in carried:
            if 0 < origin <= len(self.metrics["rounds"]):
                _add_wire(self.metrics["rounds"][origin - 1], node.client_id, "down", arrays)
        content = RecordDict({protocol.CONFIG: config, **records})
        return Message(content, dst_node_id=node.node_id, message_type=message_type, group_id=group_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per selected node, each with exactly what that node needs."""
        rnd = server_round + self.round_offset
        connected = set(grid.get_node_ids())
        selected = set(sample_clients(self.cfg, rnd))
        nodes = [n for n in self.sorted_nodes() if n.partition_id in selected and n.node_id in connected]
        upload = list(self.aggregator.sent_factors(rnd))
        messages = []
        self.sent = {}
        for node in nodes:
            node_config = ConfigRecord(
                {"round": rnd, "upload-factors": upload, "own-round": self._last_trained(node.client_id)}
            )
            message = self._broadcast(node, rnd, node_config, MessageType.TRAIN, group_id=str(rnd))
            messages.append(message)
            # The grid gives the message its id when it sends it; a SuperLink error reply (node
            # down) comes from the SuperLink itself and names only that id.
            self.sent[node.node_id] = {"round": rnd, "message": message}
        log(INFO, "florist: round %d: training %s", rnd, [n.client_id for n in nodes])
        self._round_started = time.perf_counter()
        return messages

    def _last_trained(self, client: str) -> int:
        """The last round in which ``client``'s update was aggregated (0: never)."""
        return max((r["round"] for r in self.metrics["rounds"] if client in r["clients"]), default=0)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def final_messages(self, grid: Grid) -> list[Message]:
        """``train.finalize`` for every connected node: the last broadcast, which nobody trains on."""
        connected = set(grid.get_node_ids())
        # Nodes that failed the last round are probably gone; do not wait for them again.
        last = len(self.metrics["rounds"])
        failed = {f["node_id"] for f in self.failures if f["round"] == last}
        action = f"{MessageType.TRAIN}.{protocol.FINALIZE_ACTION}"
        return [
            self._broadcast(node, last + 1, ConfigRecord({"round": last + 1}), action)
            for node in self.sorted_nodes()
            if node.node_id in connected and node.node_id not in failed
        ]

    def absorb_final_replies(self, replies: Iterable[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self._failure(
                    len(self.metrics["rounds"]) + 1,
                    reply.metadata.src_node_id,
                    f"final broadcast: {reply.error.reason}",
                )

    # --- aggregation -------------------------------------------------------------------------

    def _replier(self, reply: Message) -> int:
        """The node a reply is about: its sender, or for the SuperLink's error reply about a node
        that went down, the node the original message was sent to."""
        sender, about = reply.metadata.src_node_id, reply.metadata.reply_to_message_id
        if sender in self.sent or not about:
            return sender
        for node_id, sent in self.sent.items():
            if sent["message"].metadata.message_id == about:
                return node_id
        return sender

    def _decode_reply(self, reply: Message, rnd: int) -> ClientUpdate:
        node_id = reply.metadata.src_node_id
        node = self.nodes.get(node_id)
        if node is None or node_id not in self.sent:
            raise PayloadError(f"reply from node {node_id}, which was not asked to train in round {rnd}")
        content = reply.content
        metrics, stats = content[protocol.METRICS], content[protocol.STATS]
        sender = f"round {rnd}, node {node_id} ({node.client_id})"
        if int(metrics["partition-id"]) != node.partition_id or str(stats["client-id"]) != node.client_id:
            raise PayloadError(
                f"{sender}: reports partition {metrics['partition-id']}, registered as {node.partition_id}"
            )
        n = metrics["num-examples"]
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise PayloadError(f"{sender}: num-examples must be a positive integer, got {n!r}")
        self.learn_shapes(
            {name: (int(v[0]), int(v[1])) for name, v in content[protocol.SHAPES].items()}, sender
        )
        if self.cfg.secure_aggregation:  # the upload stays on the node until SecAgg+ masks it
            self.reply_scalings[node.client_id] = dict(content[protocol.UPDATE_SCALING])
            modules = {}
        else:
            modules = self.decode_upload(
                content[protocol.UPDATE], content[protocol.UPDATE_SCALING], node, rnd, sender
            )
        node.merged_rounds = int(stats["merged-rounds"])
        return ClientUpdate(client_id=node.client_id, num_examples=int(n), modules=modules)

    def decode_upload(
        self, arrays: ArrayRecord, scalings: ConfigRecord, node: NodeInfo, rnd: int, sender: str
    ) -> Adapter:
        """An upload of round ``rnd``'s factors, with what the node did not send filled in as the
        server knows it (FFA's frozen A, RoLoRA's shared start; ``Method.known_start``)."""
        factors = self.aggregator.sent_factors(rnd)
        method = self.method
        return record_to_adapter(
            arrays,
            scalings,
            factors=factors,
            frozen_A=method.frozen_A,
            expected_shapes=method.shapes,
            sender=sender,
            fill=method.known_start(self.server, node.client_id, node.rank)
            if factors != ("A", "B")
            else None,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        ordered, stats, uploads = self.collect(rnd, replies)
        outcome = self.close(rnd, ordered, stats)
        return self.finish_round(outcome, uploads)

    def close(
        self,
        rnd: int,
        updates: list[ClientUpdate],
        stats: dict[str, dict[str, Any]],
        combine: Any = None,
    ) -> RoundOutcome:
        """The round engine's close; under central DP the nodes clipped, the server noises."""
        outcome = close_round(
            self.method,
            self.server,
            rnd,
            updates,
            stats,
            expected_ranks={n.client_id: n.rank for n in self.nodes.values()},
            history=self.metrics["rounds"],
            central=privacy.CentralDP.of(self.cfg, server_clips=False),
            combine=combine,
            started=self._round_started,
        )
        for rejection in outcome.rejected:
            node_id = next(n.node_id for n in self.nodes.values() if n.client_id == rejection.client_id)
            self._failure(rnd, node_id, f"rejected update: {rejection.reason}")
        return outcome

    def collect(
        self, rnd: int, replies: Iterable[Message]
    ) -> tuple[list[ClientUpdate], dict[str, dict[str, Any]], dict[str, ArrayRecord]]:
        """The round's usable updates (by partition), their statistics and upload records. A
        failed or rejected reply is recorded as a failure; fewer than min-clients stop the run."""
        updates: dict[int, ClientUpdate] = {}
        stats: dict[str, dict[str, Any]] = {}
        uploads: dict[str, ArrayRecord] = {}
        answered = set()
        for reply in replies:
            node_id = self._replier(reply)
            answered.add(node_id)
            if reply.has_error():
                # From the SuperLink itself: the node went down (no heartbeat) or its reply expired.
                by_link = node_id != reply.metadata.src_node_id
                what = "no reply from the node" if by_link else "training failed"
                self._failure(rnd, node_id, f"{what}: {reply.error.reason}")
                continue
            try:
                update = self._decode_reply(reply, rnd)
            except (PayloadError, KeyError, TypeError, ValueError) as e:
                self._failure(rnd, node_id, f"rejected update: {e}")
                continue
            node = self.nodes[node_id]
            updates[node.partition_id] = update
            stats[node.client_id] = _reply_stats(reply) | {"node_id": int(node_id)}
            if protocol.UPDATE in reply.content.array_records:  # not under secure aggregation
                uploads[node.client_id] = reply.content[protocol.UPDATE]
        missing = sorted(
            self.nodes[n].client_id for n in self.sent if self.nodes[n].partition_id not in updates
        )
        for node_id in self.sent:
            if node_id not in answered:
                self._failure(rnd, node_id, "no reply within the round timeout (node down or too slow)")
        if missing:
            log(WARNING, "florist: round %d: no usable update from %s", rnd, missing)
        if len(updates) < self.cfg.min_clients:
            reasons = "; ".join(
                f"{f['client'] or f['node_id']}: {f['reason']}" for f in self.failures if f["round"] == rnd
            )
            raise FlowerRunError(
                f"round {rnd}: only {len(updates)} of {len(self.sent)} clients returned a usable update "
                f"(min-clients={self.cfg.min_clients}; missing {missing}{'; ' + reasons if reasons else ''}). "
                f"The checkpoint of round {rnd - 1} in {self.output_dir} is intact: fix the nodes and rerun with resume=true."
            )
        ordered = [updates[k] for k in sorted(updates)]  # by partition, as florist run orders clients
        return ordered, stats, uploads

    def finish_round(
        self, outcome: RoundOutcome, uploads: dict[str, ArrayRecord]
    ) -> tuple[None, MetricRecord]:
        """Record the closed round: the bytes that crossed the wire up, metrics, checkpoint."""
        self.last_result = outcome.result
        entry = outcome.entry | {"wire": {"clients": {}, "total": zero_counts()}}
        for client, arrays in uploads.items():
            if client in entry["client_stats"]:
                _add_wire(entry, client, "up", arrays)
        if self.evaluate_round is not None and evaluation_due(self.cfg, entry["round"]):
            entry["eval"] = self.evaluate_round(samples=evaluation_samples(self.cfg, entry["round"]))
        self.recorder.record(entry, self.server)
        first, last = mean_losses(entry)
        summary = MetricRecord(
            {
                "loss-first": first,
                "loss-last": last,
                "global-rank": int(sum(outcome.result.ranks.values())),
                "eff": entry["eff"],
                "clients": len(outcome.updates),
            }
        )
        return None, summary

    def summary(self) -> None:
        log(INFO, "\t├──> florist method: %s", self.aggregator.describe(method_options(self.cfg)))
        log(
            INFO,
            "\t└──> min clients per round: %d, selection fraction %.2f",
            self.cfg.min_clients,
            self.cfg.client_selection_frac,
        )


def _add_wire(entry: dict[str, Any], client: str, direction: str, arrays: ArrayRecord) -> None:
    """Count ``arrays`` into a round record's ``wire`` section, for ``client`` and in total."""
    wire = entry.setdefault("wire", {"clients": {}, "total": zero_counts()})
    params, nbytes = record_nbytes([arrays])
    for counter in (wire["clients"].setdefault(client, zero_counts()), wire["total"]):
        counter[f"params_{direction}"] += params
        counter[f"bytes_{direction}"] += nbytes


def _reply_stats(reply: Message) -> dict[str, Any]:
    """A client's line of the round record, as its node reported it."""
    m, s = reply.content[protocol.METRICS], reply.content[protocol.STATS]
    return {
        "rank": int(m["rank"]),
        "num_examples": int(m["num-examples"]),
        "losses": [float(x) for x in s["losses"]],
        "steps": int(m["steps"]),
        "tokens": int(m["tokens"]),
        "seconds": float(m["seconds"]),
    }
