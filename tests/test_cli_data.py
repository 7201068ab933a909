"""``florist data split | fetch | info``: files, determinism, atomicity and offline failures."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import HANG_GUARD, REPO, require_shared

from florist.cli import data as data_cli
from florist.data import load_client_datasets, load_dataset_file
from florist.errors import run_cli
from florist.io import sha256_file


def florist_data(*argv: str) -> int:
    """Run ``florist data ...`` in-process through the same error handling as the real CLI."""
    parser = argparse.ArgumentParser(prog="florist")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return run_cli(lambda: args.func(args))


def dataset(tmp_path: Path, n_per_label: dict[str, int], name: str = "in.jsonl") -> Path:
    records = [
        {"instruction": f"{label} question {i}", "context": "", "response": f"answer {i}", "category": label}
        for label, n in n_per_label.items()
        for i in range(n)
    ]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_dir(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("mode", ["iid", "dirichlet", "shards"])
def test_split_writes_the_paper_layout(tmp_path: Path, mode: str) -> None:
    src = dataset(tmp_path, {"a": 120, "b": 60, "c": 40})
    out = tmp_path / "data"
    assert florist_data("split", str(src), "--num-clients", "4", "--out", str(out), "--mode", mode,
                        "--test-per-label", "3", "--seed", "5", "--min-client-size", "5") == 0  # fmt: skip
    files = sorted(p.name for p in (out / "4").iterdir())
    assert files == ["global_test.json", *[f"local_training_{k}.json" for k in range(4)], "split.json"]

    clients = load_client_datasets(out, 4)
    test, fmt = load_dataset_file(out / "4" / "global_test.json")
    assert fmt == "dolly"
    original, _ = load_dataset_file(src)
    written = [r for c in clients for r in c] + test
    assert sorted(r["instruction"] for r in written) == sorted(r["instruction"] for r in original)
    assert Counter(r["category"] for r in test) == {"a": 3, "b": 3, "c": 3}

    info = json.loads((out / "4" / "split.json").read_text())
    assert info["mode"] == mode and info["seed"] == 5 and info["num_clients"] == 4
    assert info["alpha"] == (0.5 if mode == "dirichlet" else None)
    assert info["source"] == {"path": str(src), "sha256": sha256_file(src), "format": "dolly", "records": 220}
    for k, c in enumerate(clients):
        assert info["clients"][k]["records"] == len(c)
        assert info["clients"][k]["labels"] == dict(Counter(r["category"] for r in c))


def test_split_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    src = dataset(tmp_path, {"a": 90, "b": 50, "c": 30})
    common = ["--num-clients", "3", "--mode", "dirichlet", "--alpha", "0.3", "--min-client-size", "5"]
    for out, seed in (("x", "1"), ("y", "1"), ("z", "2")):
        assert florist_data("split", str(src), "--out", str(tmp_path / out), "--seed", seed, *common) == 0
    x, y, z = (read_dir(tmp_path / out / "3") for out in "xyz")
    assert x == y
    assert {k: v for k, v in x.items() if k != "split.json"} != {
        k: v for k, v in z.items() if k != "split.json"
    }


def test_split_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = dataset(tmp_path, {"a": 40, "b": 40})
    args = ["split", str(src), "--num-clients", "2", "--out", str(tmp_path / "d"), "--mode", "iid"]
    assert florist_data(*args) == 0
    before = read_dir(tmp_path / "d" / "2")
    assert florist_data(*args, "--seed", "9") == 2
    assert "already exists" in capsys.readouterr().err
    assert read_dir(tmp_path / "d" / "2") == before
    assert florist_data(*args, "--seed", "9", "--force") == 0
    assert read_dir(tmp_path / "d" / "2") != before


def test_split_bad_record_fails_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = dataset(tmp_path, {"a": 30, "b": 30})
    lines = src.read_text().splitlines()
    lines[17] = json.dumps({"instruction": 5, "context": "", "response": "x", "category": "a"})
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "d"
    assert florist_data("split", str(src), "--num-clients", "2", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{src}: record 17: field 'instruction' must be a string" in err
    assert not out.exists() or not any(out.rglob("*"))


def test_split_without_labels_iid_on_real_alpaca(tmp_path: Path) -> None:
    src = require_shared("alpaca/alpaca_5000.json")
    out = tmp_path / "alpaca"
    assert florist_data("split", str(src), "--num-clients", "4", "--out", str(out), "--mode", "iid") == 0
    clients = load_client_datasets(out, 4)
    assert [len(c) for c in clients] == [1248, 1248, 1247, 1247]  # (5000 - 10 test) split evenly
    test, fmt = load_dataset_file(out / "4" / "global_test.json")
    assert fmt == "alpaca" and len(test) == 10
    assert (
        florist_data("split", str(src), "--num-clients", "4", "--out", str(tmp_path / "x")) == 2
    )  # dirichlet needs labels


def test_info_reports_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = dataset(tmp_path, {"a": 40, "b": 20})
    florist_data(
        "split",
        str(src),
        "--num-clients",
        "2",
        "--out",
        str(tmp_path / "d"),
        "--mode",
        "shards",
        "--test-per-label",
        "2",
    )
    capsys.readouterr()
    assert florist_data("info", str(tmp_path / "d"), "--num-clients", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["records"] for c in report["clients"]] == [28, 28]
    assert report["test"]["records"] == 4
    assert florist_data("info", str(tmp_path / "d"), "--num-clients", "3") == 2


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_fetch_offline_fails_fast_in_one_line(tmp_path: Path, offline_env: dict[str, str]) -> None:
    # A subprocess: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when it is imported.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(offline_env, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = (
        "import argparse, sys; from florist.cli import data; from florist.errors import run_cli\n"
        "parser = argparse.ArgumentParser(prog='florist'); data.add_parser(parser.add_subparsers())\n"
        "args = parser.parse_args(['data', *sys.argv[1:]]); sys.exit(run_cli(lambda: args.func(args)))"
    )
    cmd = [sys.executable, "-c", code, "fetch", "dolly", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(
        "florist: error: cannot reach the Hugging Face Hub to fetch databricks/databricks-dolly-15k"
    )
    assert err.endswith("download it on a machine with internet and pass the file path")
    assert not (tmp_path / "out").exists()


def test_fetch_writes_local_formats_from_hub_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion half of fetch, with the Hub replaced by in-memory tables of its schemas."""
    import datasets

    hub = {
        "tatsu-lab/alpaca": [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "text": "### ..."}],
        "cais/mmlu": [
            {
                "question": "2+2?",
                "subject": "elementary_mathematics",
                "choices": ["3", "4", "5", "6"],
                "answer": 1,
            },
            {
                "question": "Capital of Peru?",
                "subject": "geography",
                "choices": ["Lima", "Quito", "Cusco", "La Paz"],
                "answer": 0,
            },
        ],
    }

    def fake_load_dataset(repo: str, config: str | None = None, *, split: str) -> datasets.Dataset:
        return datasets.Dataset.from_list(hub[repo])

    monkeypatch.setattr(data_cli, "_check_hub_reachable", lambda repo: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    assert florist_data("fetch", "alpaca", "--out", str(tmp_path)) == 0
    records, fmt = load_dataset_file(tmp_path / "alpaca.jsonl")
    assert fmt == "alpaca" and records == [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]

    assert florist_data("fetch", "mmlu", "--out", str(tmp_path)) == 0
    for split in ("test", "dev"):
        text = (tmp_path / "mmlu" / split / f"geography_{split}.csv").read_text()
        assert text.splitlines() == [
            "question,choice0,choice1,choice2,choice3,answer",
            "Capital of Peru?,Lima,Quito,Cusco,La Paz,0",
        ]
    # Same header as the MMLU CSVs the evaluation reads.
    shared = require_shared("mmlu/test/high_school_geography_test.csv").read_text().splitlines()[0]
    assert shared == "question,choice0,choice1,choice2,choice3,answer"
