"""The Flower ClientApp: one institution's SuperNode trains its LoRA with florist's LocalTrainer.

A SuperNode is started with its own ``--node-config``::

    flower-supernode ... --node-config 'partition-id=3 num-partitions=8 lora-rank=16 data-path="/data/dolly"'

* ``partition-id`` (required): this client's index k. It names the client (``client_k``, as in
  ``florist run``) and seeds its randomness through ``client_generator(seed, round, k)``, so a
  SuperNode draws exactly what client k draws in the in-process simulation.
* ``data-path`` + ``num-partitions``: the paper's layout, ``<data-path>/<K>/local_training_<k>.json``
  (the whole split must be present, as ``florist.data.load_client_datasets`` checks it);
  or ``data-file``: just this institution's own JSON/JSONL file.
* ``lora-rank`` (heterogeneous runs, ``heter=true``): this client's rank r_k, with alpha = 2 r_k as in
  the paper. In homogeneous runs every client uses the run's ``lora-r``/``lora-alpha``. Without
  ``lora-rank`` the rank comes from the run config (``local-ranks[k]``).
* ``device`` (optional): overrides the run's device on this machine (e.g. ``cuda``).
* ``output-dir`` (optional): where the node writes the final global adapter it receives.

The model, method and training settings come from the run config (``florist.flower.app_config``).
Each round is the round engine's (``florist.rounds``): ``Method.task`` and ``Method.start`` from
what the server sent, ``run_client``, then ``protect_upload`` (local DP's noise, or central DP's
clipping) before anything leaves the node. A ClientApp process may be started afresh for every
message, so what must survive between rounds lives in ``context.state``, which the SuperNode keeps
for the run: the global adapters merged into the base so far (merge methods) and the node's own
last trained adapter. Heavy imports happen inside the handlers so the ``info`` query answers quickly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from florist.config import ConfigError, RunConfig
from florist.flower import protocol, secagg
from florist.flower.app_config import run_config_from_flower
from florist.flower.payload import adapter_to_record, record_to_adapter
from florist.settings import Setting, Source

app = ClientApp()


@dataclass
class NodeSettings:
    partition_id: int
    num_partitions: int | None
    rank: int
    alpha: float
    data_path: str | None
    data_file: str | None
    output_dir: str | None

    @property
    def client_id(self) -> str:
        from florist.algebra import client_id

        return client_id(self.partition_id)


NODE_CONFIG = Source("node config")
# Every node-config key this node reads, checked as every other setting (florist.settings).
NODE_SETTINGS = {
    "partition-id": Setting(int, low=0),
    "num-partitions": Setting(int, optional=True, low=1),
    "lora-rank": Setting(int, optional=True, low=1),
    "hold-in-round": Setting(int, optional=True, low=1),
}


def _node_setting(node_config: dict[str, Any], key: str) -> Any:
    return NODE_SETTINGS[key].parse(node_config.get(key), name=key, source=NODE_CONFIG)


def node_settings(context: Context) -> tuple[RunConfig, NodeSettings]:
    """The run's RunConfig (with this node's device) and this node's own settings."""
    cfg, _ = run_config_from_flower(context.run_config)
    node_config = dict(context.node_config)
    if "device" in node_config:
        cfg.device = str(node_config["device"])
    if "partition-id" not in node_config:
        raise ConfigError("node config needs partition-id (this client's index, 0-based)")
    partition_id = _node_setting(node_config, "partition-id")
    num_partitions = _node_setting(node_config, "num-partitions")
    if num_partitions is not None and partition_id >= num_partitions:
        raise ConfigError(f"partition-id {partition_id} is not below num-partitions {num_partitions}")
    rank, alpha = cfg.client_rank(partition_id), cfg.client_alpha(partition_id)
    node_rank = _node_setting(node_config, "lora-rank")
    if cfg.heter and node_rank is not None:
        rank, alpha = node_rank, 2.0 * node_rank  # the paper's alpha = 2 r_k
    data_file, data_path, output = (node_config.get(k) for k in ("data-file", "data-path", "output-dir"))
    data_path = data_path or cfg.data_path
    settings = NodeSettings(
        partition_id=partition_id,
        num_partitions=num_partitions,
        rank=rank,
        alpha=alpha,
        data_path=str(data_path) if data_path else None,
        data_file=str(data_file) if data_file else None,
        output_dir=str(output) if output else None,
    )
    return cfg, settings


def _hold_if_asked(node_config: dict[str, Any], rnd: int) -> None:
    """Fault injection: with ``hold-in-round`` = r, the node stalls before training in round r until
    ``resume-file`` exists, as a hung machine would. A test can then kill it mid-round on an event,
    not by racing the round (tests/test_flower.py)."""
    hold = _node_setting(node_config, "hold-in-round")
    if hold is None or hold != rnd:
        return
    if not node_config.get("resume-file"):
        raise ConfigError("node config hold-in-round needs resume-file (the path that releases the node)")
    resume = Path(str(node_config["resume-file"]))
    while not resume.exists():
        time.sleep(0.2)


# --- node state: merged global adapters and the node's own adapter -------------------------------------


def stored_merged_rounds(state: RecordDict) -> list[int]:
    return sorted(
        int(key.rsplit(".", 1)[1]) for key in state.array_records if key.startswith(protocol.STATE_MERGED)
    )


def _absorb_merged(message: Message, state: RecordDict, expected: int) -> list[int]:
    """Store the merged adapters this message carries; check the node then has rounds 1..expected."""
    for r in protocol.carried_rounds(message.content):
        state[f"{protocol.STATE_MERGED}.{r:04d}"] = message.content[protocol.merged_key(r)]
        state[f"{protocol.STATE_MERGED_SCALING}.{r:04d}"] = message.content[protocol.merged_scaling_key(r)]
    have = stored_merged_rounds(state)
    if have != list(range(1, expected + 1)):
        raise RuntimeError(
            f"this node holds the merged updates of rounds {have} but the server expects rounds 1..{expected}; "
            "its SuperNode state was lost (restart the run with resume=true so the server resends them)"
        )
    return have


def _merged_adapter(state: RecordDict, r: int, shapes: dict[str, tuple[int, int]]) -> Any:
    return record_to_adapter(
        state[f"{protocol.STATE_MERGED}.{r:04d}"],
        state[f"{protocol.STATE_MERGED_SCALING}.{r:04d}"],
        expected_shapes=shapes,
        sender=f"merged update of round {r}",
    )


def _held(
    state: RecordDict, config: ConfigRecord, method: Any, shapes: dict[str, tuple[int, int]], client: str
) -> Any:
    """This node's own last trained adapter, or None before its first round.

    A method with local factors (FedSA-LoRA) cannot continue without it: if the server says this
    client trained in round r but the node holds nothing from round r, its state was lost.
    """
    expected = int(config.get("own-round", 0))
    have = int(state[protocol.STATE_OWN_ROUND]["round"]) if protocol.STATE_OWN_ROUND in state else 0
    if method.local_factors and expected and have != expected:
        raise RuntimeError(
            f"{client}: {method.name} keeps this client's own {'/'.join(method.local_factors)} on the node, "
            f"from its round {expected}, but the node holds {'round ' + str(have) if have else 'none'}; "
            "its SuperNode state was lost and the run cannot continue exactly"
        )
    if not have:
        return None
    return record_to_adapter(
        state[protocol.STATE_OWN],
        state[protocol.STATE_OWN_SCALING],
        expected_shapes=shapes,
        sender="this node's own state",
    )


def _load_model(cfg: RunConfig) -> tuple[Any, Any]:
    """``tiny-llama[:seed]`` builds florist's tiny test model; anything else goes to load_model."""
    from florist.models import load_model, resolve_device, tiny_llama

    name = cfg.global_model
    if name == "tiny-llama" or name.startswith("tiny-llama:"):
        model, tokenizer = tiny_llama(seed=int(name.partition(":")[2] or 0))
        return model.to(resolve_device(cfg.device)), tokenizer
    return load_model(name, device=cfg.device)


def _records(cfg: RunConfig, node: NodeSettings) -> list[dict]:
    """This node's records: its own file, or its part of the paper's layout."""
    from florist import data

    if node.data_file:
        records, _fmt = data.load_dataset_file(node.data_file)
        if cfg.max_samples_per_client is None:
            return records
        return data.subset_records(records, node.partition_id, cfg.max_samples_per_client, cfg.seed)
    if node.data_path is None or node.num_partitions is None:
        raise ConfigError("node config needs data-path and num-partitions (paper layout) or data-file")
    return data.load_client_datasets(
        node.data_path, node.num_partitions, max_samples_per_client=cfg.max_samples_per_client, seed=cfg.seed
    )[node.partition_id]


# --- handlers ------------------------------------------------------------------------------------


@app.query(protocol.INFO_ACTION)
def info(message: Message, context: Context) -> Message:
    """Who this node is: partition, rank and the merged rounds it already holds."""
    _cfg, node = node_settings(context)
    reply = ConfigRecord(
        {
            "partition-id": node.partition_id,
            "client-id": node.client_id,
            "rank": node.rank,
            "alpha": float(node.alpha),
            "merged-rounds": len(stored_merged_rounds(context.state)),
        }
    )
    return Message(RecordDict({protocol.INFO: reply}), reply_to=message)


@app.train(mods=[secagg.client_mod])
def train(message: Message, context: Context) -> Message:
    """One round of local training, starting where the server's message says (``florist.rounds``)."""
    if secagg.is_masking_call(message):  # SecAgg+ wants the upload train.secagg kept
        return secagg.kept_upload(message, context)
    import functools

    from florist import privacy
    from florist.federation import ClientSetup
    from florist.rounds import Method, client_privacy, fresh_lora, protect_upload, run_client

    cfg, node = node_settings(context)
    config = message.content[protocol.CONFIG]
    rnd = int(config["round"])
    _hold_if_asked(dict(context.node_config), rnd)

    # This node's own records only, trained as florist run trains client k (florist.federation).
    setup = ClientSetup.load(cfg, *_load_model(cfg), records={node.partition_id: _records(cfg, node)})
    host = setup.host
    shapes = host.module_shapes
    context.state[protocol.STATE_SHAPES] = ConfigRecord(
        {n: [int(s) for s in shape] for n, shape in shapes.items()}
    )
    # Rebuild this node's base exactly as the server's: every merged update, in round order.
    for r in _absorb_merged(message, context.state, int(config["merged-rounds"])):
        host.merge_into_base(_merged_adapter(context.state, r, shapes))

    # The run's largest rank comes from the server: FFA's frozen A and a shared init are drawn at it.
    method = Method(cfg, shapes, r_max=int(config["ffa-rank"]))
    task = method.task(rnd, node.partition_id, rank=node.rank, alpha=node.alpha)
    held = _held(context.state, config, method.aggregator, shapes, node.client_id)
    received = _received(message, config, method, task.rank, held)
    start = method.start(task, received, held, functools.partial(fresh_lora, host))
    dp = privacy.dp_enabled(cfg)
    result = run_client(setup.trainer, task, setup.examples(node.partition_id), start, keep_start=dp)
    # What this node keeps for the next round: the factors that will not travel back to it
    # (FedSA-LoRA's own B, RoLoRA's frozen factor), as trained here, before any DP noise.
    own, own_scalings = adapter_to_record(result.update.modules, wire_dtype="float32")
    context.state[protocol.STATE_OWN] = own
    context.state[protocol.STATE_OWN_SCALING] = own_scalings
    context.state[protocol.STATE_OWN_ROUND] = ConfigRecord({"round": rnd})
    # Local DP noises here, central DP clips here: the server never sees an unprotected upload.
    step = client_privacy(cfg, server_sees_uploads=False)
    upload, _norm = protect_upload(
        cfg, result, task.upload, step, privacy.noise_generator() if step else None
    )
    return _reply(message, context, cfg, node, result, upload, tuple(config["upload-factors"]), dp)


def _received(
    message: Message,
    config: ConfigRecord,
    method: Any,
    rank: int,
    held: Any,
    *,
    sender: str = "the server's broadcast",
) -> Any:
    """The adapter the server sent this node to continue from, or None. The factors it did not
    send are this node's own (``held``) or, before it has trained, the round's common start."""
    if protocol.INIT not in message.content.array_records:
        return None
    from florist.rounds import ServerState

    return record_to_adapter(
        message.content[protocol.INIT],
        message.content[protocol.INIT_SCALING],
        factors=tuple(config["init-factors"]),
        frozen_A=method.frozen_A,
        expected_shapes=method.shapes,
        sender=sender,
        fill=held or method.known_start(ServerState(), "", rank),  # nothing sent yet: the common start
    )


def _reply(
    message: Message, context: Context, cfg: RunConfig, node: NodeSettings, result: Any, upload: Any,
    factors: tuple[str, ...], dp: bool,
) -> Message:  # fmt: skip
    """The upload (only ``factors``), the training's statistics and this node's module shapes."""
    arrays, scalings = adapter_to_record(upload.modules, factors=factors, wire_dtype=cfg.wire_dtype)
    # Under DP the training losses stay here: they are computed on the private records, and only
    # the upload is privatised (florist.privacy).
    losses = [] if dp else [float(x) for x in result.losses]
    metrics = MetricRecord(
        {
            "num-examples": int(result.update.num_examples),
            "partition-id": node.partition_id,
            "rank": node.rank,
            "steps": int(result.steps),
            "tokens": int(result.tokens),
            "seconds": float(result.seconds),
            "loss-first": losses[0] if losses else 0.0,
            "loss-last": losses[-1] if losses else 0.0,
        }
    )
    stats = ConfigRecord(
        {
            "client-id": node.client_id,
            "losses": losses,
            "merged-rounds": len(stored_merged_rounds(context.state)),
        }
    )
    content = RecordDict(
        {
            protocol.UPDATE: arrays,
            protocol.UPDATE_SCALING: scalings,
            protocol.METRICS: metrics,
            protocol.STATS: stats,
            protocol.SHAPES: context.state[protocol.STATE_SHAPES],
        }
    )
    return Message(content, reply_to=message)


secagg.register(app, train)


@app.train(protocol.FINALIZE_ACTION)
def finalize(message: Message, context: Context) -> Message:
    """The last broadcast: keep it (merge methods) and optionally write this node's final adapter."""
    cfg, node = node_settings(context)
    config = message.content[protocol.CONFIG]
    have = _absorb_merged(message, context.state, int(config["merged-rounds"]))
    if node.output_dir:
        from florist.adapters import write_peft_adapter
        from florist.algebra import stack_adapters
        from florist.rounds import Method

        shapes = {n: (int(v[0]), int(v[1])) for n, v in context.state[protocol.STATE_SHAPES].items()}
        method = Method(cfg, shapes, r_max=int(config["ffa-rank"]))
        held = _held(context.state, config, method.aggregator, shapes, node.client_id)
        # what the node would continue from
        final = _received(message, config, method, node.rank, held, sender="the server's final broadcast")
        if have:  # every update folded into the base, then the continued adapter (FedEx-LoRA)
            merged = [_merged_adapter(context.state, r, shapes) for r in have]
            final = stack_adapters(merged + ([final] if final is not None else []))
        write_peft_adapter(
            Path(node.output_dir),
            final,
            base_model_name_or_path=cfg.global_model,
            target_modules=list(cfg.lora_target_modules),
        )
    reply = ConfigRecord({"client-id": node.client_id, "merged-rounds": len(have)})
    return Message(RecordDict({protocol.STATS: reply}), reply_to=message)
