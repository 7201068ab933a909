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
  from (``message.metadata.src_node_id``), orders clients by partition like ``florist run``, calls
  ``florist.aggregation.get_aggregator(cfg.method)``, accounts the communication with
  ``florist.comm.round_communication``, and writes the per-round checkpoint.

The round semantics are those of ``florist.federation`` (whose ``ServerState`` this reuses), so
with the same seeds, data and ranks a Flower run produces the same global adapter as the
in-process one. Besides florist's accounting, every round also records the bytes that really went
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

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from florist import privacy
from florist.aggregation import Adapter, ClientUpdate, GlobalResult, LoraFactors, get_aggregator
from florist.config import RunConfig
from florist.errors import FloristError
from florist.flower import protocol
from florist.flower.payload import PayloadError, adapter_to_record, record_nbytes, record_to_adapter


class FlowerRunError(FloristError):
    """A Flower run that cannot continue (too few clients, inconsistent nodes)."""


@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    client_id: str
    rank: int
    merged_rounds: int = 0  # merged global updates this node holds


def _counter() -> dict[str, int]:
    return {"params_up": 0, "bytes_up": 0, "params_down": 0, "bytes_down": 0}


class FloristStrategy(FedAvg):
    """FedAvg's loop with florist's per-node payloads and LoRA aggregation (any method)."""

    def __init__(self, cfg: RunConfig, *, output_dir: str | Path | None = None, resumed: Any = None) -> None:
        from florist.federation import ServerState

        super().__init__(
            fraction_train=cfg.client_selection_frac,
            fraction_evaluate=0.0,  # evaluation is centralised (florist's Evaluator), not federated
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            weighted_by_key="num-examples",
        )
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output_dir)
        options = {"threshold": cfg.threshold} if cfg.method == "florist" else {}
        self.aggregator = get_aggregator(cfg.method, dtype=getattr(torch, cfg.aggregation_dtype), **options)
        self.wire_dtype = getattr(torch, cfg.wire_dtype)
        self.nodes: dict[int, NodeInfo] = {}
        self.module_shapes: dict[str, tuple[int, int]] | None = None
        self.frozen_A: dict[str, torch.Tensor] | None = None
        self.server = ServerState()
        self.last_result: GlobalResult | None = None
        self.round_offset = 0
        self.failures: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {
            "config": cfg.to_dict(),
            "method": cfg.method,
            "threshold": cfg.threshold if cfg.method == "florist" else None,
            "client_init": cfg.resolved_client_init(),
            "model": cfg.global_model,
            "rounds": [],
        }
        self._sent: dict[int, dict[str, Any]] = {}  # node id -> what this round sent it
        self.reply_scalings: dict[str, dict[str, Any]] = {}  # secure aggregation: scalings only
        if resumed is not None:
            # A resumed run: nodes start with empty state, so the merged updates are resent.
            self.server = ServerState(resumed.merged, resumed.global_adapter, resumed.per_client)
            self.metrics = resumed.metrics
            self.metrics["config"] = cfg.to_dict()
            self.round_offset = resumed.completed_round

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

    def _broadcast_records(self, node: NodeInfo, round_number: int, config: ConfigRecord) -> dict[str, Any]:
        """What ``node`` must receive before training round ``round_number`` (or finishing)."""
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
            self._count_wire(origin, node.client_id, "down", arrays)
        return records

    def _count_wire(self, round_number: int, client: str, direction: str, arrays: ArrayRecord) -> None:
        index = round_number - 1
        if not 0 <= index < len(self.metrics["rounds"]):
            return
        wire = self.metrics["rounds"][index].setdefault("wire", {"clients": {}, "total": _counter()})
        params, nbytes = record_nbytes([arrays])
        for counter in (wire["clients"].setdefault(client, _counter()), wire["total"]):
            counter[f"params_{direction}"] += params
            counter[f"bytes_{direction}"] += nbytes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per selected node, each with exactly what that node needs."""
        from florist.federation import sample_clients

        rnd = server_round + self.round_offset
        connected = set(grid.get_node_ids())
        selected = set(sample_clients(self.cfg, rnd))
        nodes = [n for n in self.sorted_nodes() if n.partition_id in selected and n.node_id in connected]
        upload = list(self.aggregator.sent_factors(rnd))
        messages = []
        self._sent = {}
        for node in nodes:
            node_config = ConfigRecord(
                {"round": rnd, "upload-factors": upload, "own-round": self._last_trained(node.client_id)}
            )
            records = self._broadcast_records(node, rnd, node_config)
            content = RecordDict({protocol.CONFIG: node_config, **records})
            message = Message(
                content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(rnd)
            )
            messages.append(message)
            # The grid gives the message its id when it sends it; a SuperLink error reply (node
            # down) comes from the SuperLink itself and names only that id.
            self._sent[node.node_id] = {"round": rnd, "message": message}
        log(INFO, "florist: round %d: training %s", rnd, [n.client_id for n in nodes])
        self._round_started = time.perf_counter()
        return messages

    def _last_trained(self, client: str) -> int:
        """The last round in which ``client``'s update was aggregated (0: never)."""
        return max((r["round"] for r in self.metrics["rounds"] if client in r["clients"]), default=0)

    def _held(self, node: NodeInfo) -> Adapter:
        """The factors a node did not send, as the server knows them: what it started the round
        from (RoLoRA's shared frozen factor); local factors (FedSA-LoRA's B) never reach the server,
        so they are zeros here and the global view cannot be formed on Flower."""
        from florist.federation import truncate_adapter, with_local_factors

        assert self.module_shapes is not None
        start = self.server.continuation(node.client_id)
        if start is None:
            start = self.aggregator.initial_adapter(self.module_shapes, node.rank, self.cfg.seed)
        if start is None:
            start = {
                n: LoraFactors(A=torch.zeros(node.rank, i), B=torch.zeros(o, node.rank))
                for n, (o, i) in self.module_shapes.items()
            }
        start = truncate_adapter(start, min(node.rank, min(f.rank for f in start.values())))
        return with_local_factors(start, None, self.aggregator.local_factors)

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
        messages = []
        for node in self.sorted_nodes():
            if node.node_id not in connected or node.node_id in failed:
                continue
            config = ConfigRecord({"round": len(self.metrics["rounds"]) + 1})
            records = self._broadcast_records(node, len(self.metrics["rounds"]) + 1, config)
            content = RecordDict({protocol.CONFIG: config, **records})
            messages.append(
                Message(
                    content,
                    dst_node_id=node.node_id,
                    message_type=f"{MessageType.TRAIN}.{protocol.FINALIZE_ACTION}",
                )
            )
        return messages

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
        if sender in self._sent or not about:
            return sender
        for node_id, sent in self._sent.items():
            if sent["message"].metadata.message_id == about:
                return node_id
        return sender

    def _decode_reply(self, reply: Message, rnd: int) -> ClientUpdate:
        node_id = reply.metadata.src_node_id
        node = self.nodes.get(node_id)
        if node is None or node_id not in self._sent:
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
        shapes = {name: (int(v[0]), int(v[1])) for name, v in content[protocol.SHAPES].items()}
        if self.module_shapes is None:
            self.module_shapes = shapes
        elif shapes != self.module_shapes:
            raise PayloadError(f"{sender}: its model's module shapes differ from the other nodes'")
        if self.cfg.secure_aggregation:  # the upload stays on the node until SecAgg+ masks it
            self.reply_scalings[node.client_id] = dict(content[protocol.UPDATE_SCALING])
            node.merged_rounds = int(stats["merged-rounds"])
            return ClientUpdate(client_id=node.client_id, num_examples=int(n), modules={})
        factors = self.aggregator.sent_factors(rnd)
        if self.aggregator.frozen_A and self.frozen_A is None:
            from florist.training import ffa_frozen_A

            self.frozen_A = ffa_frozen_A(self.cfg.seed, self.module_shapes, self.ffa_rank())
        modules = record_to_adapter(
            content[protocol.UPDATE],
            content[protocol.UPDATE_SCALING],
            factors=factors,
            frozen_A=self.frozen_A if self.aggregator.frozen_A else None,
            expected_shapes=self.module_shapes,
            sender=sender,
            fill=self._held(node) if factors != ("A", "B") else None,
        )
        node.merged_rounds = int(stats["merged-rounds"])
        return ClientUpdate(client_id=node.client_id, num_examples=int(n), modules=modules)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        ordered, stats, uploads = self.collect(rnd, replies)
        t0 = time.perf_counter()
        if privacy.dp_enabled(self.cfg) and self.cfg.dp_mode == "central":  # the nodes clipped
            result = self.aggregator.aggregate(privacy.uniform_weights(ordered))
            result = privacy.noised_mean(result, self.aggregator, self.cfg, rnd, len(ordered))
        else:
            result = self.aggregator.aggregate(ordered)
        result = self.aggregator.for_round(result, rnd)
        return self.finish_round(rnd, ordered, stats, uploads, result, time.perf_counter() - t0)

    def collect(
        self, rnd: int, replies: Iterable[Message]
    ) -> tuple[list[ClientUpdate], dict[str, dict[str, Any]], dict[str, ArrayRecord]]:
        """The round's usable updates (by partition), their statistics and upload records. A
        failed or rejected reply is recorded as a failure; fewer than min-clients stop the run."""
        updates: dict[int, ClientUpdate] = {}
        stats: dict[str, dict[str, Any]] = {}
        uploads: dict[str, ArrayRecord] = {}
        replies = list(replies)
        for reply in replies:
            node_id = self._replier(reply)
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
            m, s = reply.content[protocol.METRICS], reply.content[protocol.STATS]
            stats[node.client_id] = {
                "rank": int(m["rank"]),
                "num_examples": int(m["num-examples"]),
                "losses": [float(x) for x in s["losses"]],
                "steps": int(m["steps"]),
                "tokens": int(m["tokens"]),
                "seconds": float(m["seconds"]),
                "node_id": int(node_id),
            }
            if protocol.UPDATE in reply.content.array_records:  # not under secure aggregation
                uploads[node.client_id] = reply.content[protocol.UPDATE]
        missing = sorted(
            self.nodes[n].client_id for n in self._sent if self.nodes[n].partition_id not in updates
        )
        answered = {self._replier(reply) for reply in replies}
        for node_id in self._sent:
            if node_id not in answered:
                self._failure(rnd, node_id, "no reply within the round timeout (node down or too slow)")
        if missing:
            log(WARNING, "florist: round %d: no usable update from %s", rnd, missing)
        if len(updates) < self.cfg.min_clients:
            reasons = "; ".join(
                f"{f['client'] or f['node_id']}: {f['reason']}" for f in self.failures if f["round"] == rnd
            )
            raise FlowerRunError(
                f"round {rnd}: only {len(updates)} of {len(self._sent)} clients returned a usable update "
                f"(min-clients={self.cfg.min_clients}; missing {missing}{'; ' + reasons if reasons else ''}). "
                f"The checkpoint of round {rnd - 1} in {self.output_dir} is intact: fix the nodes and rerun with resume=true."
            )
        ordered = [updates[k] for k in sorted(updates)]  # by partition, as florist run orders clients
        return ordered, stats, uploads

    def finish_round(
        self,
        rnd: int,
        ordered: list[ClientUpdate],
        stats: dict[str, dict[str, Any]],
        uploads: dict[str, ArrayRecord],
        result: GlobalResult,
        aggregation_seconds: float,
    ) -> tuple[None, MetricRecord]:
        """Broadcast the round's ``result`` and record it: metrics, wire bytes, checkpoint."""
        from florist.checkpoint import CheckpointState, save_checkpoint
        from florist.comm import round_communication
        from florist.federation import round_entry

        communication = round_communication(result, ordered, wire_dtype=self.wire_dtype)
        self.server.broadcast(result)
        self.last_result = result
        entry = round_entry(
            rnd,
            {u.client_id: stats[u.client_id] for u in ordered},
            result,
            communication,
            aggregation_seconds=aggregation_seconds,
            seconds=time.perf_counter() - self._round_started,
        ) | {"wire": {"clients": {}, "total": _counter()}}
        if privacy.dp_enabled(self.cfg):  # local DP: the nodes noised their uploads
            entry["privacy"] = privacy.round_privacy(self.cfg, [*self.metrics["rounds"], entry])
        eff = entry["eff"]
        self.metrics["rounds"].append(entry)
        for client, arrays in uploads.items():
            if client in entry["client_stats"]:
                self._count_wire(rnd, client, "up", arrays)
        save_checkpoint(
            self.output_dir,
            CheckpointState(
                rnd,
                self.metrics,
                self.cfg.to_dict(),
                self.server.merged,
                self.server.global_adapter,
                self.server.per_client,
            ),
        )
        losses = [s["losses"] for s in entry["client_stats"].values() if s["losses"]]
        summary = MetricRecord(
            {
                "loss-first": sum(x[0] for x in losses) / max(len(losses), 1),
                "loss-last": sum(x[-1] for x in losses) / max(len(losses), 1),
                "global-rank": int(sum(result.ranks.values())),
                "eff": eff,
                "clients": len(ordered),
            }
        )
        log(
            INFO,
            "florist: round %d aggregated %d clients, global rank %d",
            rnd,
            len(ordered),
            summary["global-rank"],
        )
        return None, summary

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> florist method: %s%s",
            self.cfg.method,
            f" (tau {self.cfg.threshold})" if self.cfg.method == "florist" else "",
        )
        log(
            INFO,
            "\t└──> min clients per round: %d, selection fraction %.2f",
            self.cfg.min_clients,
            self.cfg.client_selection_frac,
        )

    def final_adapter(self) -> Adapter:
        return self.server.final_adapter()
