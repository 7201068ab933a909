"""Untrusted client uploads, end to end: nothing is ever unpickled, and a bad client is left out.

* With ``torch.load``, ``pickle.load(s)`` and ``pickle.Unpickler`` made to explode for the whole
  test, ``florist aggregate`` still reads real client adapters, writes its output, reads the
  Flower wire format and the server's checkpoint, and refuses a pickled upload (whose payload
  would create a marker file if it ever ran).
* In the in-process round loop (``florist.federation.run_federated``) a client whose upload is
  NaN or has the wrong shape is logged with its reason and excluded; the round aggregates the
  others, exactly as the aggregator does on the good uploads alone. With fewer than
  ``min_clients`` good uploads the run stops with one clear error and writes nothing.

The refusal of each kind of bad adapter file is tested in tests/test_adapters.py,
tests/test_cli_aggregate.py and tests/test_fuzz.py; screening rules in tests/test_screening.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

import florist.training
from florist.adapters import read_peft_adapter, write_peft_adapter
from florist.aggregation import ClientUpdate, LoraFactors, get_aggregator
from florist.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from florist.cli import main
from florist.config import RunConfig
from florist.errors import FloristError
from florist.federation import run_federated
from florist.models import tiny_llama

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.1.self_attn.v_proj": (8, 12)}


class Bomb:
    """Unpickling this creates ``marker``: proof of whether a pickle was ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way to unpickle raises (and is recorded) for the rest of the test."""
    calls: list[str] = []

    def refuse(name: str):
        def fn(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called on untrusted data")

        return fn

    for module, names in (
        (torch, ["load"]),
        (torch.serialization, ["load"]),
        (pickle, ["load", "loads", "Unpickler"]),
    ):
        for name in names:
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return calls


def client_dir(root: Path, name: str, rank: int, seed: int, num_examples: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    adapter = {
        m: LoraFactors(torch.randn(rank, n, generator=g), torch.randn(o, rank, generator=g), 2.0)
        for m, (o, n) in SHAPES.items()
    }
    write_peft_adapter(
        root / name, adapter, extra_files={"florist_client.json": {"num_examples": num_examples}}
    )
    return root / name


def test_nothing_is_ever_unpickled(no_unpickling: list[str], tmp_path: Path, capsys) -> None:
    # the guard works: an ordinary torch.load now fails
    torch.save({"x": 1}, tmp_path / "control.pt")
    with pytest.raises(AssertionError, match="called on untrusted data"):
        torch.load(tmp_path / "control.pt")
    no_unpickling.clear()

    clients = [client_dir(tmp_path, f"site_{k}", rank=2 + k, seed=k, num_examples=5 + k) for k in range(3)]
    out = tmp_path / "global"
    assert (
        main(
            ["aggregate", "--method", "florist", "--threshold", "0.95", "--out", str(out), *map(str, clients)]
        )
        == 0
    )
    adapter, _ = read_peft_adapter(out, expected_shapes=SHAPES)
    assert json.loads((out / "summary.json").read_text())["method"] == "florist"

    # a pickled upload (what torch.save and old peft versions write) is refused unopened
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_bytes((clients[0] / "adapter_config.json").read_bytes())
    (evil / "florist_client.json").write_text('{"num_examples": 3}')
    (evil / "adapter_model.bin").write_bytes(pickle.dumps({"lora": Bomb(tmp_path / "PWNED")}))
    capsys.readouterr()
    assert (
        main(["aggregate", "--method", "flora", "--out", str(tmp_path / "x"), str(clients[0]), str(evil)])
        == 2
    )
    err = capsys.readouterr().err
    assert str(evil) in err and "pickle" in err and not (tmp_path / "x").exists()

    # the Flower wire format and the server's own checkpoint are read without pickle too
    from florist.flower.payload import adapter_to_record, record_to_adapter

    arrays, scalings = adapter_to_record(adapter)
    back = record_to_adapter(arrays, scalings, expected_shapes=SHAPES, sender="node 7")
    assert all(torch.equal(back[m].B, adapter[m].B.float()) for m in SHAPES)
    save_checkpoint(tmp_path / "run", CheckpointState(1, {}, {}, merged=[adapter]))
    assert torch.equal(
        load_checkpoint(tmp_path / "run").merged[0][next(iter(SHAPES))].A, adapter[next(iter(SHAPES))].A
    )

    assert no_unpickling == [] and not (tmp_path / "PWNED").exists()


# --- screening in the in-process round loop --------------------------------------------------------


def make_cfg(data: Path, out: Path, **overrides) -> RunConfig:
    settings = dict(method="florist", threshold=0.95, lora_r=2, lora_alpha=4, local_batch_size=2, seed=5)
    return tiny_run_config(data, out, **(settings | overrides))


def poisoned(update: ClientUpdate) -> ClientUpdate:
    """A diverged client: NaN in one factor."""
    name = sorted(update.modules)[0]
    f = update.modules[name]
    A = f.A.clone()
    A[0, 0] = float("nan")
    return dataclasses.replace(update, modules={**update.modules, name: dataclasses.replace(f, A=A)})


def misshapen(update: ClientUpdate) -> ClientUpdate:
    """A client that trained against a different model: one module is one output row short."""
    name = sorted(update.modules)[-1]
    f = update.modules[name]
    return dataclasses.replace(
        update, modules={**update.modules, name: dataclasses.replace(f, B=f.B[:-1].clone())}
    )


@pytest.fixture
def bad_clients(monkeypatch: pytest.MonkeyPatch) -> dict[str, ClientUpdate]:
    """client_1 uploads NaN, client_2 a wrong shape; returns every honest upload by client id."""
    honest: dict[str, ClientUpdate] = {}
    train = florist.training.LocalTrainer.train

    def train_and_break(self, **kwargs):
        result = train(self, **kwargs)
        cid = kwargs["client_id"]
        honest[cid] = result.update
        breaker = {"client_1": poisoned, "client_2": misshapen}.get(cid)
        return dataclasses.replace(result, update=breaker(result.update)) if breaker else result

    monkeypatch.setattr(florist.training.LocalTrainer, "train", train_and_break)
    return honest


def test_bad_uploads_are_excluded_and_the_round_goes_on(
    bad_clients, federated_data, tmp_path, caplog
) -> None:
    cfg = make_cfg(federated_data(3), tmp_path / "out", min_clients=1)
    model, tokenizer = tiny_llama(seed=0)
    caplog.set_level(logging.WARNING, logger="florist.screening")
    metrics = run_federated(cfg, model=model, tokenizer=tokenizer)

    round_1 = metrics["rounds"][0]
    assert round_1["clients"] == ["client_0"]
    rejected = {r["client_id"]: r["reason"] for r in round_1["rejected"]}
    assert set(rejected) == {"client_1", "client_2"}
    assert "NaN or Inf" in rejected["client_1"] and "but the base model's module is" in rejected["client_2"]
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "florist.screening")
    assert "client_1" in logged and "client_2" in logged

    # the global adapter is what FLoRIST makes of the one good upload, bit for bit (as float32)
    expected = get_aggregator("florist", threshold=cfg.threshold).aggregate([bad_clients["client_0"]]).adapter
    written, _ = read_peft_adapter(Path(cfg.output_dir) / "adapter")
    assert sorted(written) == sorted(expected)
    for name, f in expected.items():
        assert torch.equal(written[name].A, f.A.float()) and torch.equal(written[name].B, f.B.float()), name
        assert written[name].scaling == 1.0
    assert (
        json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["rounds"][0]["rejected"]
        == round_1["rejected"]
    )


def test_too_few_good_uploads_stop_the_run_in_one_line(bad_clients, federated_data, tmp_path, capsys) -> None:
    data, out = federated_data(3), tmp_path / "out"
    model, tokenizer = tiny_llama(seed=0)
    with pytest.raises(
        FloristError, match=r"only 1 of 3 client uploads passed screening \(min_clients=2\)"
    ) as info:
        run_federated(make_cfg(data, out, min_clients=2), model=model, tokenizer=tokenizer)
    assert "client_1" in str(info.value) and "client_2" in str(info.value)
    assert not out.exists()

    # the command line reports it as one line with exit code 2, and writes nothing either
    model_dir = tmp_path / "tiny"
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    flags = make_cfg(data, out, min_clients=2, global_model=str(model_dir), device="cpu").to_dict()
    args = ["run"]
    for key in ("global_model", "data_path", "output_dir", "num_clients", "method", "threshold", "min_clients",
                "lora_r", "lora_alpha", "local_batch_size", "local_micro_batch_size", "local_max_steps",
                "cutoff_len", "evaluate", "precision", "device", "seed"):  # fmt: skip
        args += [f"--{key}", str(flags[key])]
    capsys.readouterr()
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("florist: error:")]
    assert len(errors) == 1 and "passed screening" in errors[0] and "client_1" in errors[0]
    assert not out.exists()
