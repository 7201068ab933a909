"""Secure aggregation on Flower: SecAgg+ through Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod``.

With ``secure_aggregation`` the server learns only the weighted sum of the uploads of a round,
never one client's adapter. That suffices exactly for the methods whose aggregate is an average of
the uploads (``Aggregator.linear_in_uploads``: FedIT, FFA-LoRA, zero-padding, FedSA-LoRA, RoLoRA),
so the others are refused (``florist.privacy.check_config``), as are heterogeneous ranks (SecAgg+
sums vectors of one shape). Only the round's ``sent_factors`` are summed (FedSA: A; RoLoRA: the
factor trained this round).

A round has two steps:

1. ``train.secagg``: florist's usual train message (the node's start, as in any round). The node
   trains, applies local DP if asked, and KEEPS its upload in its state; it replies with its
   statistics and shapes only, no parameters.
2. Flower's ``SecAggPlusWorkflow`` (setup, share keys, collect masked vectors, unmask) with the
   nodes that trained. In the collect stage ``secaggplus_mod`` asks the node's train handler for
   its result, which is the kept upload (arrays in sorted key order, weight = num_examples); the
   mod quantises, masks and sends it. The server unmasks only the sum and gets
   sum_k w_k x_k / sum_k w_k, FedIT's weighted average up to quantisation.

Under central DP each node clips its upload and weighs it 1, and the server adds N(0, (zC/m)²) to
the unmasked mean (``florist.privacy.CentralDP``); under local DP the nodes noise before masking.

The average, with the factors that did not travel filled in as the server holds them (RoLoRA's
frozen factor: the round's start; FedSA's B_k: zeros, as in every Flower round), is then turned
into the round's result by the method's own ``Aggregator.aggregate_mean``, so the broadcast,
checkpoint and metrics are exactly those of a normal round.

Quantisation (Flower's defaults, ``clipping_range`` 8 and ``quantization_range`` 2**22): each
weighted value w_k x_k (|x| <= 8) is rounded stochastically to a step of 16 / 2**22, so every
coordinate of the average is within m * 16 / 2**22 / sum_k w_k of the exact one, with
w_k = n_k / max_weight. The server sets ``max_weight`` to the round's largest n_k (the counts are
not secret: they are in metrics.json anyway), so sum_k w_k >= 1 and the error is at most
m * 3.8e-6 per coordinate.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from florist.flower import protocol

SECAGG_ACTION = "secagg"  # train.secagg: train, keep the upload for the SecAgg+ stages
STATE_UPLOAD = "florist.secagg-upload"
STATE_UPLOAD_META = "florist.secagg-upload-meta"
# Flower's SecAgg+ defaults: values clipped to [-8, 8], quantised to 2**22 levels.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22


def quantisation_bound(weights: list[float]) -> float:
    """The largest error of one coordinate of the SecAgg+ average, for per-client weights
    w_k = n_k / max_weight: each w_k x_k is rounded by less than one step."""
    return len(weights) * (2 * CLIPPING_RANGE / QUANTIZATION_RANGE) / sum(weights)


# --- the SuperNode ------------------------------------------------------------------------------


def client_mod(message: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ stages; florist's own messages pass untouched."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_masking_call(message: Message) -> bool:
    """Whether ``secaggplus_mod`` is asking the train handler for the result it will mask."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def kept_upload(message: Message, context: Context) -> Message:
    """The upload ``train.secagg`` kept, as the FitRes ``secaggplus_mod`` masks."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    if STATE_UPLOAD not in context.state.array_records:
        raise RuntimeError("SecAgg+ asked for this node's upload, but it has not trained this round")
    arrays = context.state[STATE_UPLOAD]
    meta = context.state[STATE_UPLOAD_META]
    ndarrays = [arrays[key].numpy() for key in sorted(arrays.keys())]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ndarrays), int(meta["num-examples"]), {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def register(app: Any, train: Any) -> None:
    """Add the ``train.secagg`` handler to the ClientApp: ``train``, keeping the upload here."""

    from florist import privacy
    from florist.flower.app_config import run_config_from_flower

    @app.train(SECAGG_ACTION)
    def secagg_train(message: Message, context: Context) -> Message:
        reply = train(message, context)
        content = reply.content
        context.state[STATE_UPLOAD] = content[protocol.UPDATE]
        cfg = run_config_from_flower(context.run_config)[0]
        central = privacy.dp_enabled(cfg) and cfg.dp_mode == "central"  # a uniform mean
        weight = 1 if central else int(content[protocol.METRICS]["num-examples"])
        context.state[STATE_UPLOAD_META] = ConfigRecord({"num-examples": weight})
        kept = RecordDict({key: value for key, value in content.items() if key != protocol.UPDATE})
        return Message(kept, reply_to=message)


# --- the ServerApp ------------------------------------------------------------------------------


def _bridge(node_ids: list[int]) -> Any:
    """A legacy Strategy that gives SecAgg+ its nodes and catches the unmasked average."""
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy

    class Node(ClientProxy):
        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class SumOnly(Strategy):
        average: list[Any] | None = None
        failures: list[Any] = []

        def initialize_parameters(self, client_manager: Any) -> Any:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            return [(Node(n), FitIns(parameters, {})) for n in node_ids]

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            self.failures = list(failures)
            if results:  # every result carries the one unmasked average
                self.average = parameters_to_ndarrays(results[0][1].parameters)
                self.contributors = [proxy.node_id for proxy, _ in results]
            return None, {}

        def configure_evaluate(self, *args: Any) -> Any:
            return []

        def aggregate_evaluate(self, *args: Any) -> Any:
            return None, {}

        def evaluate(self, *args: Any) -> Any:
            return None

    return SumOnly()


def secure_round(strategy: Any, grid: Any, server_round: int, timeout: float) -> None:
    """One round of ``strategy`` (a FloristStrategy) whose uploads only SecAgg+ sees: the nodes
    train (``train.secagg``), SecAgg+ sums their uploads, and the round engine closes the round
    with that sum in place of the aggregation (``Aggregator.aggregate_mean``)."""
    from flwr.common import ndarray_to_bytes  # noqa: F401  (fails early if flwr lacks SecAgg+)

    from florist import privacy
    from florist.aggregation import ClientUpdate
    from florist.flower.strategy import FlowerRunError

    rnd = server_round + strategy.round_offset
    messages = [
        Message(
            m.content,
            dst_node_id=m.metadata.dst_node_id,
            message_type=f"{MessageType.TRAIN}.{SECAGG_ACTION}",
            group_id=m.metadata.group_id,
        )
        for m in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    ]
    for m in messages:  # the record of what was sent, for the SuperLink's error replies
        strategy.sent[m.metadata.dst_node_id]["message"] = m
    trained, stats, _ = strategy.collect(rnd, grid.send_and_receive(messages, timeout=timeout))
    by_node = {strategy.nodes[n].client_id: n for n in strategy.sent}
    node_ids = [by_node[u.client_id] for u in trained]
    if len(node_ids) < max(2, strategy.cfg.min_clients):
        raise FlowerRunError(f"round {rnd}: secure aggregation needs at least 2 clients, got {len(node_ids)}")
    # Central DP needs the uniform mean of the clipped uploads (florist.privacy).
    central = privacy.dp_enabled(strategy.cfg) and strategy.cfg.dp_mode == "central"
    max_weight = 1.0 if central else float(max(u.num_examples for u in trained))
    average = _secure_average(grid, rnd, node_ids, max_weight, timeout)
    factors = tuple(strategy.aggregator.sent_factors(rnd))
    names = sorted(strategy.method.shapes)
    keys = sorted(f"{n}/{f}" for n in names for f in factors)
    if len(keys) != len(average):
        raise FlowerRunError(f"round {rnd}: the secure sum has {len(average)} arrays, expected {len(keys)}")
    from flwr.app import Array

    arrays = ArrayRecord({key: Array(arr.astype("float32")) for key, arr in zip(keys, average)})
    # One scaling per module for all (homogeneous ranks and alpha), or the sum means nothing.
    scalings = [strategy.reply_scalings.get(u.client_id) for u in trained]
    if any(s != scalings[0] for s in scalings):
        raise FlowerRunError(f"round {rnd}: the clients' LoRA scalings differ; secure aggregation needs one")
    # Homogeneous ranks: every node's held factors are the same.
    node = strategy.nodes[node_ids[0]]
    mean = strategy.decode_upload(arrays, scalings[0], node, rnd, f"round {rnd}, the secure sum")
    # For florist's byte accounting, every client uploaded what the sum has (same shapes).
    stand_ins = [ClientUpdate(u.client_id, u.num_examples, mean) for u in trained]
    outcome = strategy.close(
        rnd, stand_ins, stats, combine=lambda ups: strategy.aggregator.aggregate_mean(mean, ups, rnd)
    )
    strategy.finish_round(outcome, {})


def _secure_average(grid: Any, rnd: int, node_ids: list[int], max_weight: float, timeout: float) -> list[Any]:
    """Flower's SecAggPlusWorkflow over ``node_ids``: the unmasked weighted average of their kept
    uploads, as arrays in sorted key order."""
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from florist.flower.strategy import FlowerRunError

    bridge = _bridge(node_ids)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=bridge,
    )
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled node holds a share of every other's keys
        reconstruction_threshold=0.67,
        max_weight=max_weight,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        timeout=timeout,
    )
    workflow(grid, context)
    if bridge.average is None or sorted(bridge.contributors) != sorted(node_ids):
        raise FlowerRunError(
            f"round {rnd}: secure aggregation did not complete for every client that trained "
            f"({len(bridge.failures)} failure(s): {'; '.join(str(f) for f in bridge.failures)[:300]})"
        )
    return bridge.average
