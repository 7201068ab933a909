"""Shared fixtures. Real data comes from ../shared/data; in CI a missing file is a failure."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # florist imports torch, which must come after OMP_WAIT_POLICY below
    from florist.config import RunConfig

# torch's OpenMP threads spin while waiting; with several processes on 2 cores (Flower nodes,
# subprocess runs) that costs 10x. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
# The only wall-clock limit a test may set: a guard against a hang, far above any correct run
# however busy the machine (a slow machine is not a failure).
HANG_GUARD = 3600
SHARED_DATA = Path(os.environ.get("FLORIST_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(relative: str) -> Path:
    """Path to a file under ../shared/data: fail in CI (CI=true), skip elsewhere, if it is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"shared data missing: {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def dolly_dir() -> Path:
    """The paper's Dolly split: dolly/8/local_training_{0..7}.json and global_test.json."""
    return require_shared("dolly/8").parent


@pytest.fixture
def mmlu_subset() -> Path:
    return require_shared("mmlu/mmlu_test_1444.jsonl")


def write_federated_data(root: Path, num_clients: int, *, per_client: int = 6, test_records: int = 4) -> Path:
    """A tiny Dolly-format data set in the paper's layout: root/K/local_training_{k}.json + global_test.json.

    Short, client-specific texts (so byte-level tokenisation stays small and clients differ).
    Returns ``root`` (the ``data_path``).
    """
    import json

    directory = root / str(num_clients)
    directory.mkdir(parents=True, exist_ok=True)
    topics = ["colours", "numbers", "animals", "cities", "fruits", "planets", "tools", "music"]

    def record(k: int, i: int) -> dict:
        topic = topics[k % len(topics)]
        return {
            "instruction": f"Name thing {i} about {topic}.",
            "context": "" if i % 2 else f"Client {k} talks about {topic}.",
            "response": f"Item {i} of {topic} is {topic[: 1 + i % 5]}{i * (k + 1)}.",
            "category": "open_qa" if k % 2 else "brainstorming",
        }

    for k in range(num_clients):
        # Unequal sizes, so FedAvg weights p_k differ between clients.
        records = [record(k, i) for i in range(per_client + k)]
        (directory / f"local_training_{k}.json").write_text(json.dumps(records))
    (directory / "global_test.json").write_text(json.dumps([record(k, 100 + k) for k in range(test_records)]))
    return root


@pytest.fixture
def federated_data(tmp_path: Path) -> Callable[..., Path]:
    """``federated_data(num_clients, **kw)`` writes a tiny paper-layout data set under tmp_path."""
    return lambda num_clients, **kw: write_federated_data(tmp_path / "data", num_clients, **kw)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama saved as a model directory, for runs through the command lines."""
    from florist.models import tiny_llama

    path = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_config(data: Path, out: Path, **overrides: object) -> RunConfig:
    """A quick run on the tiny random Llama: 3 clients, one fp32 step each, no evaluation."""
    from florist.config import RunConfig

    values: dict = dict(
        global_model="tiny-llama",
        data_path=str(data),
        output_dir=str(out),
        num_clients=3,
        num_communication_rounds=1,
        lora_r=4,
        lora_alpha=8,
        local_batch_size=4,
        local_micro_batch_size=2,
        local_max_steps=1,
        local_learning_rate=0.05,
        cutoff_len=64,
        lora_dropout=0.0,
        evaluate=False,
        precision="fp32",
        device="cpu",
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture
def flower_identity():
    """Flower messages built outside a Flower process need a run/node/task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def flower_federation(tmp_path_factory: pytest.TempPathFactory):
    """One SuperLink and three SuperNodes on the tiny data set, shared by the tests that only run
    apps on them (each run is its own Flower run): (federation, root, data, app project)."""
    from test_flower import start_federation
    from test_flower_strategy import write_tiny_data

    from florist.flower.app_config import write_app_project

    root = tmp_path_factory.mktemp("flower")
    data = write_tiny_data(root / "data")
    app = write_app_project(root / "app")
    with start_federation(root / "processes", data) as fed:
        yield fed, root, data, app
    # teardown: no Flower process of ours survives
    assert all(not p.alive() for p in fed.supernodes + [fed.superlink])
