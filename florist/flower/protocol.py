"""The message protocol between florist's ServerApp and ClientApp: record names, in one place.

Server -> node, ``train`` (one round) and ``train.finalize`` (the last broadcast):
    config           ConfigRecord: round, merged-rounds (how many merged updates the node must
                     hold after this message), upload-factors, init-factors, ffa-rank,
                     init-rank (the rank a shared client init is drawn at)
    merged.<r>       ArrayRecord + merged-scaling.<r> ConfigRecord: round r's global adapter, for
                     merge methods (FLoRA, FLoRIST); the rounds this node does not hold yet
    init             ArrayRecord + init-scaling: what a continue method (FedIT, zero-padding,
                     FlexLoRA, FFA) starts from; only the factors the method downloads
Node -> server, ``train`` reply:
    update           ArrayRecord + update-scaling: the trained LoRA (only the uploaded factors)
    metrics          MetricRecord: num-examples, partition-id, rank, steps, tokens, seconds, losses
    stats            ConfigRecord: client-id, per-step losses, merged-rounds, module shapes
``query.info`` asks a node who it is (partition, rank) before round 1.
"""

from __future__ import annotations

from flwr.app import RecordDict

INFO_ACTION = "info"
FINALIZE_ACTION = "finalize"

CONFIG = "config"
INFO = "info"
INIT = "init"
INIT_SCALING = "init-scaling"
UPDATE = "update"
UPDATE_SCALING = "update-scaling"
METRICS = "metrics"
STATS = "stats"
SHAPES = "shapes"
MERGED = "merged"
MERGED_SCALING = "merged-scaling"

# Keys in a node's context.state.
STATE_MERGED = "florist.merged"
STATE_MERGED_SCALING = "florist.merged-scaling"
STATE_SHAPES = "florist.shapes"
# The node's own last trained adapter and its round (the factors that do not travel back to it).
STATE_OWN = "florist.own"
STATE_OWN_SCALING = "florist.own-scaling"
STATE_OWN_ROUND = "florist.own-round"


def merged_key(round_number: int) -> str:
    return f"{MERGED}.{round_number:04d}"


def merged_scaling_key(round_number: int) -> str:
    return f"{MERGED_SCALING}.{round_number:04d}"


def carried_rounds(content: RecordDict) -> list[int]:
    """The rounds whose merged update a message carries, ascending."""
    return sorted(int(key.split(".", 1)[1]) for key in content.array_records if key.startswith(f"{MERGED}."))
