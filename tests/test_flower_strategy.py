"""The Flower app without processes: payloads, run config, and the whole protocol on a fake grid.

``FakeGrid`` delivers each message straight to ``florist.flower.client_app.app`` with a per-node
``Context`` (node config, run config, persistent state), so the ServerApp's full logic
(``run_flower_server``: info query, FloristStrategy rounds, final broadcast, outputs) runs in
process in a few seconds and is compared with ``florist.federation.run_federated``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_config
from flwr.app import Array, ConfigRecord, Context, Error, Message, RecordDict

from florist.adapters import read_peft_adapter
from florist.aggregation.base import LoraFactors
from florist.checkpoint import load_checkpoint
from florist.config import ConfigError, RunConfig
from florist.federation import run_federated
from florist.flower import client_app
from florist.flower.app_config import (
    FlowerOptions,
    app_pyproject,
    run_config_from_flower,
    run_config_values,
    write_app_project,
)
from florist.flower.payload import PayloadError, adapter_to_record, record_nbytes, record_to_adapter
from florist.flower.server_app import run_flower_server
from florist.flower.strategy import FlowerRunError
from florist.models import tiny_llama

RANKS = [4, 2, 1]


def write_tiny_data(root: Path, sizes: tuple[int, ...] = (6, 4, 5)) -> Path:
    """A tiny instruction data set in the paper's layout: root/K/local_training_k.json."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    directory = root / str(len(sizes))
    directory.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(sizes):
        records = [
            {"instruction": f"Say {w} {k}", "input": "" if i % 2 else f"ctx {i}", "output": f"{w} " * (i + 1)}
            for i, w in enumerate(words[:n])
        ]
        (directory / f"local_training_{k}.json").write_text(json.dumps(records))
    test = [{"instruction": f"Repeat {w}", "input": "", "output": f"{w} {w}"} for w in words[:3]]
    (directory / "global_test.json").write_text(json.dumps(test))
    return root


def tiny_config(
    data: Path, out: Path, method: str, *, heter: bool, rounds: int = 2, **overrides
) -> RunConfig:
    settings = dict(
        method=method, heter=heter, local_ranks=list(RANKS), threshold=0.9, num_communication_rounds=rounds
    )
    return tiny_run_config(data, out, **(settings | dict(lora_dropout=0.05, seed=7) | overrides))


def adapter_deltas(directory: Path) -> dict[str, torch.Tensor]:
    adapter, _ = read_peft_adapter(directory)
    return {name: f.delta() for name, f in adapter.items()}


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    da, db = adapter_deltas(a), adapter_deltas(b)
    assert set(da) == set(db)
    for name in da:
        assert torch.allclose(da[name], db[name], atol=atol, rtol=0), (
            name,
            (da[name] - db[name]).abs().max(),
        )


@pytest.fixture(autouse=True)
def task_identity(flower_identity):
    """Messages built outside a Flower process need a run/node/task identity (conftest)."""


class FakeGrid:
    """Delivers messages to the ClientApp in process; nodes keep their Context between messages."""

    def __init__(self, cfg: RunConfig, data: Path, ranks: list[int]) -> None:
        run_config = run_config_values(cfg)
        self.contexts = {
            1000 + k: Context(
                run_id=1,
                node_id=1000 + k,
                node_config={
                    "partition-id": k,
                    "num-partitions": len(ranks),
                    "lora-rank": r,
                    "data-path": str(data),
                },
                state=RecordDict(),
                run_config=run_config,
            )
            for k, r in enumerate(ranks)
        }
        self.down: set[int] = set()
        self.fail_in_round: dict[int, int] = {}  # node id -> round in which it stops answering
        # As a real SuperLink does once a dead node misses its heartbeats: answer for it with an
        # error reply of its own (sender: the SuperLink) that names only the original message.
        self.link_reports_down = False
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            config = message.content.config_records.get("config", ConfigRecord())
            if node in self.down or (
                node in self.fail_in_round and self.fail_in_round[node] == config.get("round")
            ):
                self.down.add(node)
                if self.link_reports_down:
                    from flwr.server.superlink.linkstate.utils import (
                        create_message_error_unavailable_res_message,
                    )

                    message.metadata.__dict__["_message_id"] = message.object_id  # as the grid sends it
                    replies.append(
                        create_message_error_unavailable_res_message(message.metadata, "node_unavail")
                    )
                continue  # a dead node: the server only sees its silence
            try:
                replies.append(client_app.app(message, self.contexts[node]))
            except Exception as e:  # noqa: BLE001 - what Flower does with a ClientApp exception
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=message))
        return replies


# --- payloads ----------------------------------------------------------------------------------


def _random_adapter(ranks=(3, 2), shapes=((8, 6), (5, 6)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.q_proj": LoraFactors(
            A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), scaling=2.0 / (i + 1)
        )
        for i, (r, (m, n)) in enumerate(zip(ranks, shapes))
    }


def test_payload_round_trip_keys_order_dtype_and_bytes():
    adapter = _random_adapter()
    arrays, scalings = adapter_to_record(adapter)
    names = sorted(adapter)
    assert list(arrays) == [f"{n}/{f}" for n in names for f in ("A", "B")]
    assert all(a.dtype == "float32" for a in arrays.values())
    params, nbytes = record_nbytes([arrays])
    expected = sum(f.A.numel() + f.B.numel() for f in adapter.values())
    assert (params, nbytes) == (expected, 4 * expected)
    # numpy's .npy header is the only extra in the serialised data
    assert all(len(a.data) > np.prod(a.shape) * 4 for a in arrays.values())
    back = record_to_adapter(
        arrays, scalings, expected_shapes={n: (f.out_features, f.in_features) for n, f in adapter.items()}
    )
    for n, f in adapter.items():
        assert torch.equal(back[n].A, f.A) and torch.equal(back[n].B, f.B) and back[n].scaling == f.scaling

    # FFA: only B travels; A comes from the shared frozen init (first r rows)
    b_only, scalings = adapter_to_record(adapter, factors=("B",))
    assert all(k.endswith("/B") for k in b_only)
    frozen = {n: torch.cat([f.A, torch.zeros(2, f.in_features)]) for n, f in adapter.items()}
    back = record_to_adapter(b_only, scalings, factors=("B",), frozen_A=frozen)
    assert all(torch.equal(back[n].A, f.A) for n, f in adapter.items())


def _corrupt(kind: str):
    adapter = _random_adapter()
    arrays, scalings = adapter_to_record(adapter)
    name = sorted(adapter)[0]
    if kind == "nan":
        bad = adapter[name].A.clone()
        bad[0, 0] = float("nan")
        arrays[f"{name}/A"] = Array(bad.numpy())
    elif kind == "int":
        arrays[f"{name}/B"] = Array(np.ones((8, 3), dtype=np.int32))
    elif kind == "3d":
        arrays[f"{name}/B"] = Array(np.ones((8, 3, 1), dtype=np.float32))
    elif kind == "rank":
        arrays[f"{name}/B"] = Array(np.ones((8, 2), dtype=np.float32))
    elif kind == "missing":
        del arrays[f"{name}/B"]
    elif kind == "scaling":
        scalings[name] = -1.0
    elif kind == "shape":
        arrays[f"{name}/A"] = Array(np.ones((3, 7), dtype=np.float32))
    elif kind == "header":
        good = arrays[f"{name}/A"]
        arrays[f"{name}/A"] = Array(
            dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"\x93NUMPY garbage"
        )
    return arrays, scalings, name


@pytest.mark.parametrize(
    "kind, message",
    [
        ("nan", "NaN or Inf"),
        ("int", "not a float type"),
        ("3d", "expected a matrix"),
        ("rank", "rank mismatch"),
        ("missing", "do not match the modules"),
        ("scaling", "scaling must be a positive"),
        ("shape", "but the module is"),
        ("header", "cannot decode"),
    ],
)
def test_payload_rejects_untrusted_input_naming_sender_and_module(kind, message):
    arrays, scalings, name = _corrupt(kind)
    shapes = {n: (f.out_features, f.in_features) for n, f in _random_adapter().items()}
    with pytest.raises(PayloadError, match=message) as err:
        record_to_adapter(arrays, scalings, expected_shapes=shapes, sender="node 7 (client_2)")
    assert "node 7 (client_2)" in str(err.value)
    if kind not in ("missing",):
        assert name in str(err.value)


# --- app project and run config ------------------------------------------------------------------


def test_run_config_round_trip_and_errors():
    cfg = RunConfig(
        local_ranks=[8, 4, 2], lora_target_modules=["q_proj", "k_proj", "v_proj"], local_max_steps=3
    )
    back, options = run_config_from_flower(
        run_config_values(cfg, FlowerOptions(round_timeout=12, node_wait_timeout=5))
    )
    assert back == cfg and options == FlowerOptions(12.0, 5.0)
    assert run_config_from_flower(run_config_values(RunConfig()))[0] == RunConfig()
    with pytest.raises(ConfigError, match="num-clients"):
        run_config_from_flower({"num-clients": 2.5})
    with pytest.raises(ConfigError, match="heter"):
        run_config_from_flower({"heter": "yes"})


def test_app_project_is_a_valid_small_flower_app(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    directory = write_app_project(tmp_path / "app", RunConfig(method="flexlora"))
    import tomli

    config = tomli.loads((directory / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=directory)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["method"] == "flexlora"
    assert len(build_fab_from_disk(directory)) < 64 * 1024  # no data, no code: far below Flower's 10 MB cap
    assert "florist.flower.server_app:app" in app_pyproject()


# --- the whole protocol on a fake grid, against the in-process loop -------------------------------


@pytest.mark.parametrize(
    "method, heter",
    [
        ("florist", True),
        ("flora", True),
        ("flexlora", True),
        ("zeropad", True),
        ("ffa", True),
        ("fedit", False),
    ],
)
def test_fake_grid_run_equals_in_process(tmp_path, method, heter):
    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "inproc", method, heter=heter)
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(cfg, model=model, tokenizer=tokenizer)

    fcfg = tiny_config(data, tmp_path / "flower", method, heter=heter)
    grid = FakeGrid(fcfg, data, RANKS)
    metrics = run_flower_server(grid, fcfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))

    assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "flower" / "adapter")
    assert metrics["flower"]["failures"] == []
    for ours, theirs in zip(metrics["rounds"], expected["rounds"]):
        assert ours["clients"] == theirs["clients"]
        assert ours["ranks"] == theirs["ranks"]
        assert ours["communication"]["total"] == theirs["communication"]["total"]
        # the bytes that crossed the (fake) wire equal florist's accounting, both directions
        wire, comm = ours["wire"]["total"], ours["communication"]["total"]
        assert {k: wire[k] for k in wire} == {k: comm[k] for k in wire}
    on_disk = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    assert set(expected) - {"seconds"} <= set(on_disk)
    # independently: every array the server sent, by direction, adds up to the metrics
    sent = sum(record_nbytes(m.content.array_records.values())[1] for m in grid.sent)
    assert sent == metrics["wire_total"]["bytes_down"]


def test_round_with_too_few_clients_fails_clearly_and_keeps_the_checkpoint(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "flower", "florist", heter=True, min_clients=3)
    grid = FakeGrid(cfg, data, RANKS)
    grid.fail_in_round[1002] = 2  # client_2's machine dies during round 2
    with pytest.raises(FlowerRunError, match=r"round 2: only 2 of 3 clients.*client_2.*resume=true"):
        run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    state = load_checkpoint(tmp_path / "flower")
    assert state is not None and state.completed_round == 1 and len(state.merged) == 1
    assert not (tmp_path / "flower" / "metrics.json").exists()

    # With min-clients 2 the same failure is survived: round 2 aggregates the other two.
    cfg2 = tiny_config(data, tmp_path / "flower2", "florist", heter=True, min_clients=2)
    grid2 = FakeGrid(cfg2, data, RANKS)
    grid2.fail_in_round[1002] = 2
    metrics = run_flower_server(grid2, cfg2, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert metrics["rounds"][1]["clients"] == ["client_0", "client_1"]
    assert (tmp_path / "flower2" / "adapter" / "adapter_model.safetensors").exists()
    (failure,) = metrics["flower"]["failures"]
    assert failure == {"round": 2, "node_id": 1002, "client": "client_2", "reason": failure["reason"]}
    assert failure["reason"].startswith("no reply within the round timeout")


def test_a_node_the_superlink_reports_down_is_one_failure_with_its_cause(tmp_path):
    # Once recorded twice: as the SuperLink's anonymous node (node 1, no client) and as a timeout.
    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "flower", "florist", heter=True, min_clients=2)
    grid = FakeGrid(cfg, data, RANKS)
    grid.fail_in_round[1002] = 2
    grid.link_reports_down = True
    metrics = run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert metrics["rounds"][1]["clients"] == ["client_0", "client_1"]
    (failure,) = metrics["flower"]["failures"]
    assert (failure["round"], failure["node_id"], failure["client"]) == (2, 1002, "client_2")
    assert failure["reason"].startswith("no reply from the node: Error: Node Unavailable"), failure


def test_resume_with_fresh_nodes_resends_merged_updates_and_matches(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    model, tokenizer = tiny_llama(seed=0)
    run_federated(
        tiny_config(data, tmp_path / "inproc", "florist", heter=True), model=model, tokenizer=tokenizer
    )

    cfg = tiny_config(data, tmp_path / "flower", "florist", heter=True, min_clients=3)
    grid = FakeGrid(cfg, data, RANKS)
    grid.fail_in_round[1001] = 2
    with pytest.raises(FlowerRunError):
        run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    # A new run (new SuperNode state: nothing merged) resumes after round 1.
    resumed = tiny_config(data, tmp_path / "flower", "florist", heter=True, min_clients=3, resume=True)
    grid = FakeGrid(resumed, data, RANKS)
    metrics = run_flower_server(grid, resumed, FlowerOptions(round_timeout=5, node_wait_timeout=1))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert_same_adapter(tmp_path / "inproc" / "adapter", tmp_path / "flower" / "adapter")
    first_train = [m for m in grid.sent if m.metadata.message_type == "train"][0]
    assert "merged.0001" in first_train.content.array_records  # round 1's update was resent


def test_duplicate_partition_is_refused(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "flower", "florist", heter=True)
    grid = FakeGrid(cfg, data, RANKS)
    grid.contexts[1002].node_config["partition-id"] = 0
    with pytest.raises(FlowerRunError, match="both have partition-id 0"):
        run_flower_server(grid, cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1))


def test_node_without_partition_id_replies_with_a_clear_error(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "flower", "florist", heter=True)
    context = Context(
        run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config=run_config_values(cfg)
    )
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=5, message_type="query.info")
    with pytest.raises(Exception, match="partition-id"):
        client_app.app(query, context)


def test_cli_writes_the_app_project_from_a_yaml_config(tmp_path, capsys):
    import tomli

    from florist.cli import main

    (tmp_path / "run.yaml").write_text("method: flexlora\nheter: true\nlocal_ranks: [8, 4]\n")
    assert (
        main(
            [
                "flower",
                "app",
                str(tmp_path / "app"),
                "--config",
                str(tmp_path / "run.yaml"),
                "--round-timeout",
                "90",
            ]
        )
        == 0
    )
    config = tomli.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert (config["method"], config["heter"], config["local-ranks"], config["round-timeout"]) == (
        "flexlora",
        True,
        "8,4",
        90.0,
    )
    assert main(["flower", "app", str(tmp_path / "bad"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_server_side_evaluation_matches_in_process(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(
        tiny_config(data, tmp_path / "inproc", "florist", heter=True, evaluate=True, cutoff_len=256),
        model=model,
        tokenizer=tokenizer,
    )
    cfg = tiny_config(data, tmp_path / "flower", "florist", heter=True, evaluate=True, cutoff_len=256)
    metrics = run_flower_server(
        FakeGrid(cfg, data, RANKS), cfg, FlowerOptions(round_timeout=5, node_wait_timeout=1)
    )
    for when in ("eval_before", "eval_after"):
        ours, theirs = metrics[when]["heldout"], expected[when]["heldout"]
        assert (
            ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5) and ours["n_tokens"] == theirs["n_tokens"]
        )
    assert metrics["eval_after"]["heldout"]["loss"] != metrics["eval_before"]["heldout"]["loss"]
