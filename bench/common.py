"""What every bench script shares: the machine it ran on, its section of a shared document, and
for the result scripts (results.py, results_newer.py, privacy_results.py) the budgets, the data
preparation, the run config and the sentences their intervals allow."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any

import torch

from florist.config import RunConfig
from florist.io import atomic_write_text
from florist.stats import heldout_records, paired_bootstrap_ci

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> dict[str, Any]:
    """CPU, cores, threads, versions, time and load: context for every figure a script writes."""
    cpu, flags = platform.processor(), set()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        if line.startswith("model name") and cpu == platform.processor():
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return {
        "cpu": cpu,
        # Native bf16 (AVX512-BF16 or AMX) decides whether bf16 autocast is fast: name it with every figure.
        "bf16": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}) or "none",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_section(path: Path, start: str, end: str, section: str, *, heading: str = "") -> None:
    """Replace the text between ``start`` and ``end`` markers (``section`` includes both), so each
    script owns its own part of one shared file; append the section if the markers are absent."""
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nEach section is written by its script under `bench/`.\n"
    )
    if not (start in text and end in text):
        section = (f"{heading}\n\n" if heading else "") + section.rstrip("\n") + "\n"
    atomic_write_text(path, splice(text, section, start, end))


# --- what the result scripts share: data, budgets, configs, statements, sections ---------------

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLORIST_SHARED_DATA", REPO.parent / "shared" / "data"))
DOCS = REPO / "docs"
# docs/results.md's section written by bench/results_newer.py, which bench/results.py keeps.
START, END = "<!-- newer-methods:start -->", "<!-- newer-methods:end -->"
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {
        # Measured on 2 cores (pilot, FLoRA): 160 records x 1 epoch at 2e-3 moves held-out loss by
        # 0.075 nats; one training group takes ~11 min, one evaluation of 400 records ~85 s.
        "records_per_client": 160,  # = steps x batch: one epoch over a fixed subset
        "steps": 10,
        "batch": 16,
        "micro_batch": 16,
        "learning_rate": 2e-3,
        "cutoff_len": 256,
        "heldout_per_client": 40,
        "thresholds": [0.80, 0.90, 0.95, 0.98],
        "seeds": [42, 43],
        "mmlu_questions": None,  # all 1,444
    },
    "smoke": {
        "records_per_client": 4,
        "steps": 1,
        "batch": 4,
        "micro_batch": 4,
        "learning_rate": 1e-3,
        "cutoff_len": 96,
        "heldout_per_client": 2,
        "thresholds": [0.9, 0.98],
        "seeds": [42, 43],
        "mmlu_questions": 16,
    },
}


def prepare_data(out: Path, budget: dict[str, Any], num_clients: int = 8) -> tuple[Path, Path, int]:
    """Write the clients' training subsets and the held-out set; return (data dir, held-out file, n)."""
    from florist.data import load_records

    source = SHARED / "dolly" / str(num_clients)
    if not (source / "global_test.json").is_file():
        sys.exit(f"bench/results.py: no Dolly split at {source} (set FLORIST_SHARED_DATA)")
    data_dir = out / "data"
    (data_dir / str(num_clients)).mkdir(parents=True, exist_ok=True)
    heldout = list(load_records(source / "global_test.json"))
    rng = random.Random(20261201)  # the data selection is fixed; training seeds vary separately
    for k in range(num_clients):
        records = load_records(source / f"local_training_{k}.json")
        order = list(range(len(records)))
        rng.shuffle(order)
        n_train, n_held = budget["records_per_client"], budget["heldout_per_client"]
        if n_train + n_held > len(records):
            sys.exit(f"client {k} has {len(records)} records, fewer than {n_train} + {n_held}")
        train = [records[i] for i in order[:n_train]]
        held = [records[i] for i in order[n_train : n_train + n_held]]
        heldout += held
        (data_dir / str(num_clients) / f"local_training_{k}.json").write_text(json.dumps(train))
        # The client's own held-out records: FedSA-LoRA's personalised scores (florist.personalised)
        (data_dir / str(num_clients) / f"local_test_{k}.json").write_text(json.dumps(held))
    heldout_file = out / "heldout.json"
    heldout_file.write_text(json.dumps(heldout))
    return data_dir, heldout_file, len(heldout)


def base_config(data_dir: Path, heldout: Path, out: Path, budget: dict[str, Any], seed: int) -> RunConfig:
    return RunConfig(
        global_model="smollm2-135m",
        data_path=str(data_dir),
        output_dir=str(out),
        num_clients=8,
        num_communication_rounds=1,
        local_batch_size=budget["batch"],
        local_micro_batch_size=budget["micro_batch"],
        local_max_steps=budget["steps"],
        local_learning_rate=budget["learning_rate"],
        cutoff_len=budget["cutoff_len"],
        lora_r=16,
        lora_alpha=32,
        local_ranks=[64, 32, 16, 16, 8, 8, 4, 4],
        test_data_path=str(heldout),
        seed=seed,
        device="cpu",
    )


def sweep(cfg: RunConfig, **options: Any) -> dict[str, Any]:
    from florist.sweep import run_sweep

    return run_sweep(cfg, select_by="loss", progress=True, **options)


def records_of(evaluation: dict[str, Any] | None) -> tuple[list[float], list[int]]:
    return heldout_records(evaluation)


def fmt_ci(ci: list[float] | tuple[float, float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def compare(d: float, ci: list[float], what: str, other: str) -> str:
    """One sentence on ``what`` minus ``other`` (a loss difference), as far as the interval allows."""
    if ci[1] < 0:
        return f"{what} has a lower held-out loss than {other}, by {-d:.4f} nats (95% CI {fmt_ci(ci)})"
    if ci[0] > 0:
        return f"{what} has a higher held-out loss than {other}, by {d:.4f} nats (95% CI {fmt_ci(ci)})"
    return f"{what} and {other} cannot be told apart (difference {d:+.4f} nats, 95% CI {fmt_ci(ci)})"


def default_init(method: str) -> str:
    from florist.aggregation import AGGREGATORS

    return AGGREGATORS[method].client_init  # the authors' code (docs/methods.md)


def beyond_seeds(d: float, noise: float | None, ci: list[float]) -> str:
    """How a difference between two trainings compares with the training-seed spread; nothing where
    the interval ``ci`` does not resolve the difference in the first place."""
    if noise is None or ci[0] <= 0 <= ci[1]:
        return ""
    if abs(d) > noise:
        return f"; larger than the {noise:.4f}-nat spread a second training seed shows"
    return f"; within the {noise:.4f}-nat spread a second training seed shows, so not a conclusion"


def splice(text: str, block: str, start: str = START, end: str = END) -> str:
    """``text`` with the block between the markers replaced by ``block`` (appended when absent)."""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block.rstrip("\n") + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block


def keep_newer(docs: Path, doc: dict[str, Any], text: str) -> tuple[dict[str, Any], str]:
    """bench/results.py's new (results.json, results.md) with this script's part of the old ones."""
    old_json, old_md = docs / "results.json", docs / "results.md"
    if old_json.is_file() and "newer_methods" in (old := json.loads(old_json.read_text())):
        doc = doc | {"newer_methods": old["newer_methods"]}
    if old_md.is_file() and START in (old_text := old_md.read_text()) and END in old_text:
        text = splice(text, START + old_text.split(START, 1)[1].split(END, 1)[0] + END + "\n")
    return doc, text


# --- pairing records across evaluations ------------------------------------------------------


def by_index(evaluation: dict[str, Any] | None, offset: int = 0) -> dict[int, tuple[float, int]]:
    """{held-out record index: (loss sum, tokens)} of an evaluation (``heldout_loss``'s records)."""
    recs = (evaluation or {}).get("records") or {}
    return {
        offset + i: (loss, tokens)
        for i, loss, tokens in zip(recs.get("index", []), recs.get("loss_sum", []), recs.get("tokens", []))
    }


def personal_records(row: dict[str, Any], n_global: int, per_client: int) -> dict[int, tuple[float, int]]:
    """FedSA's personalised per-record sums, re-indexed into heldout.json: bench/results.py puts
    client k's held-out sample at n_global + k * per_client."""
    out: dict[int, tuple[float, int]] = {}
    for cid, c in row["eval_personal"]["clients"].items():
        k = int(cid.rsplit("_", 1)[1])
        out |= by_index(c, n_global + k * per_client)
    return out


def paired_on(a: dict[int, tuple[float, int]], b: dict[int, tuple[float, int]]) -> dict[str, Any]:
    """a - b (token-weighted mean loss) on the records both scored, with its paired 95% CI."""
    keys = sorted(a.keys() & b.keys())
    la, tokens = [a[i][0] for i in keys], [a[i][1] for i in keys]
    lb = [b[i][0] for i in keys]
    n = sum(tokens)
    return {
        "a": sum(la) / n,
        "b": sum(lb) / n,
        "delta": (sum(la) - sum(lb)) / n,
        "ci95": list(paired_bootstrap_ci(la, lb, tokens)),
        "n_records": len(keys),
    }
