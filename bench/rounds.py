"""The many-rounds experiment behind docs/rounds.md: over the rounds a federation can afford, which
method reaches the lowest held-out loss for the bytes its sites send?

    python bench/rounds.py --dataset dolly            # under 2.5 h on 2 quiet cores (docs/rounds.md)
    python bench/rounds.py --dataset alpaca           # the same settings on Alpaca
    python bench/rounds.py --dataset dolly --smoke    # the whole pipeline in minutes, under runs/ only
    python bench/rounds.py --memory                   # 64 clients, 8 a round: memory, docs/benchmarks.md

Setup (``SETUP``): 10 clients, 5 of them sampled per round, 5 rounds, the same local budget for
every method (4 optimizer steps of 8 examples per client and round), the rate annealed over the
rounds by a cosine and constant within a round (FlowerTune's recipe), each method with its default
client init. Methods: FedIT, FLoRA, FLoRIST (τ = 0.9), FlexLoRA, FFA-LoRA, FedEx-LoRA, FedSA-LoRA
(its global view and each client's own model) and RoLoRA, homogeneous rank 16; FedIT, FLoRA and
FLoRIST with a second seed. Data: Dolly's 10-client split (../shared/data/dolly/10), or Alpaca split
by ``florist data split`` (Dirichlet α = 0.5 over the instruction's first word). Held-out: the
split's global test set plus 25 unseen records of every client (each client's own are its
``local_test_<k>.json``, for FedSA's personalised scores), scored on the base model and after the
last round; every 2 rounds before it only the global test set is scored (``eval_every_samples``:
the learning curves are drawn on it), which keeps each data set's 11 runs within 2.5 h. 95%
bootstrap intervals over records, paired between methods on the records both scored.

Each run is a ``florist run`` in its own directory: an interrupted experiment resumes each run
from its last completed round and skips finished runs. Conclusions are sentences built from the
intervals stored in docs/rounds.json, and only where those intervals and the seed spread allow.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Hours of runs share the machine with whatever else runs: spinning OpenMP threads then cost up to
# 10x (seen here). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import (  # noqa: E402
    BENCHMARKS_MD,
    DOCS,
    REPO,
    SHARED,
    beyond_seeds,
    by_index,
    compare,
    fmt_ci,
    machine,
    paired_on,
    splice,
    write_section,
)

from florist import KERNEL_CACHE_CAPACITY  # noqa: E402
from florist.config import RunConfig  # noqa: E402
from florist.io import atomic_write_json, atomic_write_text  # noqa: E402
from florist.report import curve_points, learning_curve_figure, method_label  # noqa: E402
from florist.stats import (  # noqa: E402
    heldout_comparison,
    heldout_records,
    on_common_records,
    paired_bootstrap_ci,
)

SETUP: dict[str, dict[str, Any]] = {
    "full": {
        "clients": 10,
        "fraction": 0.5,
        "rounds": 5,
        "steps": 4,
        "batch": 8,
        "lr": 2e-3,
        "lr_min": 2e-4,
        "cutoff_len": 256,
        "records_per_client": 160,
        "heldout_per_client": 25,
        "eval_every": 2,
        "seeds": [42, 43],
    },  # fmt: skip
    "smoke": {
        "clients": 10,
        "fraction": 0.5,
        "rounds": 2,
        "steps": 1,
        "batch": 2,
        "lr": 2e-3,
        "lr_min": 2e-4,
        "cutoff_len": 96,
        "records_per_client": 4,
        "heldout_per_client": 2,
        "eval_every": 1,
        "seeds": [42, 43],
    },  # fmt: skip
}
METHODS = ("fedit", "flora", "florist", "flexlora", "ffa", "fedex", "fedsa", "rolora")
SEEDED = ("fedit", "flora", "florist")  # two seeds: the spread a second training shows
TAU = 0.9


# --- 1. data -----------------------------------------------------------------------------------


def prepare(dataset: str, out: Path, setup: dict[str, Any]) -> tuple[Path, Path, int]:
    """The clients' training subsets, their own held-out records and the whole held-out set; returns
    (data dir, held-out file, number of global test records before the clients' own)."""
    k = setup["clients"]
    source = _split(dataset, out, k)
    data_dir = out / "data"
    (data_dir / str(k)).mkdir(parents=True, exist_ok=True)
    heldout = json.loads((source / "global_test.json").read_text())
    n_global = len(heldout)
    rng = random.Random(20261203)  # the data selection is fixed; training seeds vary separately
    for c in range(k):
        records = json.loads((source / f"local_training_{c}.json").read_text())
        rng.shuffle(records)
        n_train, n_held = setup["records_per_client"], setup["heldout_per_client"]
        train, held = records[:n_train], records[n_train : n_train + n_held]
        heldout += held
        (data_dir / str(k) / f"local_training_{c}.json").write_text(json.dumps(train))
        (data_dir / str(k) / f"local_test_{c}.json").write_text(json.dumps(held))
    heldout_file = out / "heldout.json"
    heldout_file.write_text(json.dumps(heldout))
    return data_dir, heldout_file, n_global


def _split(dataset: str, out: Path, k: int) -> Path:
    if dataset == "dolly":
        source = SHARED / "dolly" / str(k)
        if not (source / "global_test.json").is_file():
            sys.exit(f"bench/rounds.py: no Dolly split at {source} (set FLORIST_SHARED_DATA)")
        return source
    # Alpaca has no category: its instruction's first word (Generate, Write, ...) is a task label
    # as skewed across sites as Dolly's categories, split by Dirichlet with florist data split.
    records = json.loads((SHARED / "alpaca" / "alpaca_5000.json").read_text())
    words = [
        r["instruction"].split()[0].strip(".,:").lower() if r["instruction"].split() else "" for r in records
    ]
    common = {w for w in words if words.count(w) >= 100}
    labelled = out / "alpaca_labelled.json"
    labelled.write_text(
        json.dumps([r | {"category": w if w in common else "other"} for r, w in zip(records, words)])
    )
    split = out / "split"
    if not (split / str(k) / "global_test.json").is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "florist"), "data", "split", str(labelled), "--num-clients", str(k),
                        "--out", str(split), "--mode", "dirichlet", "--alpha", "0.5", "--label-field", "category",
                        "--test-per-label", "10", "--seed", "42", "--min-client-size", "200", "--force"], check=True)  # fmt: skip
    return split / str(k)


# --- 2. runs -----------------------------------------------------------------------------------


def runs(setup: dict[str, Any]) -> list[tuple[str, int]]:
    return [(m, s) for s in setup["seeds"] for m in METHODS if s == setup["seeds"][0] or m in SEEDED]


def config(
    data_dir: Path, heldout: Path, out: Path, setup: dict[str, Any], method: str, seed: int, n_global: int
) -> RunConfig:
    return RunConfig(
        global_model="smollm2-135m", data_path=str(data_dir), output_dir=str(out), num_clients=setup["clients"],
        method=method, threshold=TAU, num_communication_rounds=setup["rounds"],
        client_selection_frac=setup["fraction"], local_batch_size=setup["batch"],
        local_micro_batch_size=setup["batch"], local_max_steps=setup["steps"], local_learning_rate=setup["lr"],
        lr_schedule="cosine", lr_min=setup["lr_min"], local_lr_scheduler="constant", cutoff_len=setup["cutoff_len"],
        lora_r=16, lora_alpha=32, test_data_path=str(heldout), eval_every=setup["eval_every"], eval_every_samples=n_global, eval_base=False,
        seed=seed, device="cpu",
    )  # fmt: skip


def run_all(out: Path, data_dir: Path, heldout: Path, setup: dict[str, Any], n_global: int) -> dict[str, Any]:
    """Every run, each resumed from its checkpoint or skipped when finished; the base model's
    evaluation once for all."""
    from florist.evaluation.evaluator import Evaluator
    from florist.federation import ClientSetup, run_federated

    base_file = out / "base_eval.json"
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else {}
    if not base_file.is_file():
        t0 = time.perf_counter()
        cfg = config(data_dir, heldout, out / "base", setup, "fedit", setup["seeds"][0], n_global)
        clients = ClientSetup.load(cfg)
        atomic_write_json(base_file, Evaluator(cfg, clients.prompter)(clients.host, clients.tokenizer, None))
        timing["base_eval"] = time.perf_counter() - t0
        atomic_write_json(out / "timing.json", timing)
    for method, seed in runs(setup):
        name = f"{method}_s{seed}"
        run_dir = out / "runs" / name
        if (run_dir / "metrics.json").is_file():
            continue
        print(f"bench/rounds.py: {name}", flush=True)
        t0 = time.perf_counter()
        cfg = config(data_dir, heldout, run_dir, setup, method, seed, n_global)
        cfg.resume = (run_dir / "checkpoint").exists()
        run_federated(cfg)
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0
        atomic_write_json(out / "timing.json", timing)
    return {"base": json.loads(base_file.read_text()), "timing": timing}


# --- 3. statistics -------------------------------------------------------------------------------


def final_eval(metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics["rounds"][-1]["eval"]


def analyse(out: Path, setup: dict[str, Any], base: dict[str, Any], n_global: int) -> dict[str, Any]:
    loaded = {
        f"{m}_s{s}": json.loads((out / "runs" / f"{m}_s{s}" / "metrics.json").read_text())
        for m, s in runs(setup)
    }
    seed = setup["seeds"][0]
    for metrics in loaded.values():
        metrics["eval_before"] = base  # the base model, evaluated once (eval_base=False in the runs)
    rows = []
    for name, metrics in loaded.items():
        last = metrics["rounds"][-1]
        row = {
            "run": name, "method": metrics["method"], "seed": int(metrics["config"]["seed"]),
            "label": method_label(metrics["method"], {"threshold": TAU} if metrics["method"] == "florist" else None),
            "curve": curve_points(metrics),
            "mb_down_per_client": last["cumulative"]["bytes_down_per_client"] / 1e6,
            "mb_up_per_client": last["cumulative"]["bytes_up_per_client"] / 1e6,
            "global_rank_per_round": [sum(r["ranks"].values()) for r in metrics["rounds"]],
            "learning_rate_per_round": [r["learning_rate"] for r in metrics["rounds"]],
            # against FLoRA of the same seed: the same clients sampled, the same data order
            **heldout_comparison(final_eval(metrics), {"flora": final_eval(loaded[f"flora_s{metrics['config']['seed']}"]), "base": base}),
        }  # fmt: skip
        rows.append(row)
    spread = {m: abs(loaded[f"{m}_s{seed}"]["rounds"][-1]["eval"]["heldout"]["loss"]
                     - loaded[f"{m}_s{setup['seeds'][1]}"]["rounds"][-1]["eval"]["heldout"]["loss"]) for m in SEEDED}  # fmt: skip
    return {
        "rows": rows,
        "seed_spread": spread,
        "equal_bytes": equal_bytes(loaded, seed),
        "fedit_gap": fedit_gap(loaded, setup),
        "fedsa_personal": fedsa_personal(loaded[f"fedsa_s{seed}"], n_global, setup["heldout_per_client"]),
    }


def _point(metrics: dict[str, Any], budget: float) -> tuple[int, float, dict[str, Any]]:
    """(round, MB, evaluation) of the last evaluated round within ``budget`` MB downloaded per client
    (round 0, the base model, when not even one round fits)."""
    best = (0, 0.0, metrics["eval_before"])
    for r in metrics["rounds"]:
        mb = r["cumulative"]["bytes_down_per_client"] / 1e6
        if "eval" in r and mb <= budget * (1 + 1e-9):
            best = (int(r["round"]), mb, r["eval"])
    return best


def equal_bytes(loaded: dict[str, dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Every method with the download a reference method needed for all its rounds (the cheapest
    method's, and FedIT's): each at its last evaluated round within that budget, paired with the
    reference's final model. A method that completes no round within it is listed, not compared."""
    mine = {m["method"]: m for name, m in loaded.items() if name.endswith(f"_s{seed}")}
    final_mb = {m: r["rounds"][-1]["cumulative"]["bytes_down_per_client"] / 1e6 for m, r in mine.items()}
    out = []
    for ref in dict.fromkeys([min(final_mb, key=final_mb.__getitem__), "fedit"]):
        budget, reference = final_mb[ref], final_eval(mine[ref])
        points = []
        for method, metrics in mine.items():
            rnd, mb, evaluation = _point(metrics, budget)
            point = {"method": method, "round": rnd, "mb_down_per_client": mb}
            if rnd > 0 and method != ref:  # an earlier round may have scored fewer records
                evaluation, on_same = on_common_records([evaluation, reference])
                point |= heldout_comparison(evaluation, {"reference": on_same})
            points.append(point)
        out.append({"reference": ref, "budget_mb": budget, "points": points})
    return out


def fedit_gap(loaded: dict[str, dict[str, Any]], setup: dict[str, Any]) -> list[dict[str, Any]]:
    """FedIT − FLoRA at each evaluated round (paired), and whether it changed from the first
    evaluated round to the last: (a_last − b_last) − (a_first − b_first) on the same records."""
    out = []
    for seed in setup["seeds"]:
        fedit, flora = loaded[f"fedit_s{seed}"], loaded[f"flora_s{seed}"]
        rounds = [r for r in fedit["rounds"] if "eval" in r]
        per_round = []
        for r in rounds:
            other = next(o for o in flora["rounds"] if o["round"] == r["round"])
            comparison = heldout_comparison(r["eval"], {"flora": other["eval"]})
            per_round.append(
                {
                    "round": r["round"],
                    "delta": comparison["delta_vs_flora"],
                    "ci95": comparison["delta_vs_flora_ci95"],
                }
            )
        # on the records both the first and the last evaluated round scored
        ends = [rounds[0]["eval"], _same(flora, rounds[0]), rounds[-1]["eval"], _same(flora, rounds[-1])]
        (a1, _), (b1, _), (a2, tokens), (b2, _) = map(heldout_records, on_common_records(ends))
        growth = (sum(a2) - sum(b2) - sum(a1) + sum(b1)) / sum(tokens)
        ci = paired_bootstrap_ci([x + y for x, y in zip(a2, b1)], [x + y for x, y in zip(b2, a1)], tokens)
        out.append({"seed": seed, "per_round": per_round, "growth": growth, "growth_ci95": list(ci),
                    "from_round": rounds[0]["round"], "to_round": rounds[-1]["round"], "n_records": len(tokens)})  # fmt: skip
    return out


def _same(metrics: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    return next(r["eval"] for r in metrics["rounds"] if r["round"] == entry["round"])


def fedsa_personal(metrics: dict[str, Any], n_global: int, per_client: int) -> dict[str, Any] | None:
    """FedSA's clients' own models against its global view, on the clients' own held-out records
    (which the global held-out set holds at n_global + k * per_client)."""
    personal = metrics.get("eval_personal")
    if not personal:
        return None
    mine: dict[int, tuple[float, int]] = {}
    for cid, c in personal["clients"].items():
        mine |= by_index(c, n_global + int(cid.rsplit("_", 1)[1]) * per_client)
    return paired_on(mine, by_index(final_eval(metrics)["heldout"]))


# --- 4. statements the intervals support ---------------------------------------------------------


def conclusions(result: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    noise = max(result["seed_spread"].values())
    said = []
    flora = next(r for r in result["rows"] if r["run"] == f"flora_s{setup['seeds'][0]}")
    for r in result["rows"]:
        if r["seed"] != setup["seeds"][0] or r["method"] == "flora":
            continue
        line = compare(
            r["delta_vs_flora"],
            r["delta_vs_flora_ci95"],
            f"After {setup['rounds']} rounds, {r['label']}",
            "FLoRA",
        )
        said.append(
            line
            + beyond_seeds(r["delta_vs_flora"], noise, r["delta_vs_flora_ci95"])
            + f". It downloads {r['mb_down_per_client']:.1f} MB per client, FLoRA {flora['mb_down_per_client']:.1f}."
        )
    for eq in result["equal_bytes"]:
        ref = method_label(eq["reference"])
        none = [method_label(p["method"]) for p in eq["points"] if p["round"] == 0]
        names = " and ".join([", ".join(none[:-1]), none[-1]] if len(none) > 1 else none)
        verb = "completes" if len(none) == 1 else "complete"
        said.append(f"With the download {ref} needed for all {setup['rounds']} rounds ({eq['budget_mb']:.2f} MB per "
                    f"client){f', {names} {verb} no round within it' if none else ''}:")  # fmt: skip
        for p in eq["points"]:
            if "delta_vs_reference" in p:
                what, other = (
                    f"{method_label(p['method'])} after round {p['round']}",
                    f"{ref} after round {setup['rounds']}",
                )
                line = compare(p["delta_vs_reference"], p["delta_vs_reference_ci95"], what, other)
                said.append(
                    f"- {line}{beyond_seeds(p['delta_vs_reference'], noise, p['delta_vs_reference_ci95'])}."
                )
    for g in result["fedit_gap"]:
        what = (
            f"FedIT's gap to FLoRA (seed {g['seed']}) from round {g['from_round']} to round {g['to_round']}, "
            f"on the {g['n_records']} records both rounds scored,"
        )
        if g["growth_ci95"][0] > 0:
            said.append(f"{what} grows by {g['growth']:.4f} nats (95% CI {fmt_ci(g['growth_ci95'])}).")
        elif g["growth_ci95"][1] < 0:
            said.append(f"{what} shrinks by {-g['growth']:.4f} nats (95% CI {fmt_ci(g['growth_ci95'])}).")
        else:
            said.append(f"{what} changes by {g['growth']:+.4f} nats, which its interval {fmt_ci(g['growth_ci95'])} "
                        "cannot tell from no change.")  # fmt: skip
    p = result["fedsa_personal"]
    if p:
        said.append(compare(p["delta"], p["ci95"], "FedSA-LoRA with each client's own model", "its global view")
                    + f" on the clients' own {p['n_records']} held-out records.")  # fmt: skip
    for r in result["rows"]:
        if r["method"] == "florist":
            said.append(f"FLoRIST's kept rank (Σ over modules) per round, seed {r['seed']}: "
                        f"{', '.join(map(str, r['global_rank_per_round']))}.")  # fmt: skip
    return said


CANNOT_SHOW = [
    "Five rounds of four local steps on a 135M-parameter model: the ordering after 100 or 200 rounds, "
    "or on a 7B model, can differ; these are learning curves' beginnings.",
    "One data split per data set and one learning-rate recipe for every method (no per-method tuning): "
    "a method that needs another rate is not given it.",
    "Equal-download comparisons take each method at its last evaluated round within the budget (rounds are "
    "evaluated every few rounds and at the last), not where its curve would cross it; a method whose first round "
    "costs more than the budget (FLoRA's whole stack) is not compared.",
    "Two seeds for FedIT, FLoRA and FLoRIST only: the other methods' seed-to-seed spread is assumed to be "
    "of the same size; the seed spread (both the clients sampled and the training) is given beside each claim.",
    "Before the last round only the split's global test set is scored, so the learning curves (and the "
    "comparisons at equal bytes and across rounds) rest on fewer records and have wider intervals than the "
    "final comparisons.",
    "Upload bytes are not traded off here: every method but FFA-LoRA, FedSA-LoRA and RoLoRA uploads both "
    "factors at rank 16, and those three half of it.",
]


# --- 5. the documents -------------------------------------------------------------------------------


def write_docs(
    dataset: str, doc: dict[str, Any], loaded_runs: list[tuple[str, dict[str, Any]]], docs: Path
) -> None:
    img = docs / "img" / f"rounds_{dataset}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    learning_curve_figure(loaded_runs).savefig(img, dpi=110)
    whole_json = docs / "rounds.json"
    whole = json.loads(whole_json.read_text()) if whole_json.is_file() else {}
    atomic_write_json(whole_json, whole | {dataset: doc})
    md = docs / "rounds.md"
    text = md.read_text() if md.is_file() else HEADER
    start, end = f"<!-- rounds:{dataset}:start -->", f"<!-- rounds:{dataset}:end -->"
    atomic_write_text(md, splice(text, section(dataset, doc, start, end), start, end))


HEADER = """# Many rounds: loss against rounds and bytes, with partial participation

Written by `bench/rounds.py` (do not edit by hand); every number is in docs/rounds.json. What the
experiment is, and what it cannot show, is in each section.
"""


def section(dataset: str, doc: dict[str, Any], start: str, end: str) -> str:
    s, m = doc["setup"], doc["machine"]
    lines = [start, f"## {dataset.capitalize()}", "", f"`{doc['command']}` on {m['cpu']} ({m['cores']} cores, "
             f"native bf16: {m['bf16']}), {doc['wall_time_s'] / 3600:.2f} h for the {len(doc['rows'])} runs"
             f"{' and the base model' if 'base_eval' in doc['seconds_per_run'] else ''}; {doc['date']}.", "",
             f"{s['clients']} clients, {int(s['fraction'] * s['clients'])} sampled per round, {s['rounds']} rounds; "
             f"every client-round {s['steps']} steps of {s['batch']} examples at a peak rate annealed from {s['lr']:g} "
             f"to {s['lr_min']:g} by a cosine over rounds (constant within one); rank 16; held-out: "
             f"{doc['heldout_records']} records after the last round and, every {s['eval_every']} rounds before it, "
             f"the split's global test set ({doc['intermediate_records']} records; the curves are drawn on these).", "", f"![learning curves](img/rounds_{dataset}.png)", "",
             "| method | seed | held-out loss after the last round | 95% CI | Δ vs FLoRA | 95% CI | MB down / client | MB up / client |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        lo, hi = r["heldout_loss_ci95"]
        lines.append(f"| {r['label']} | {r['seed']} | {r['heldout_loss']:.4f} | [{lo:.4f}, {hi:.4f}] | "
                     f"{r['delta_vs_flora']:+.4f} | {fmt_ci(r['delta_vs_flora_ci95'])} | {r['mb_down_per_client']:.2f} | "
                     f"{r['mb_up_per_client']:.2f} |")  # fmt: skip
    lines += ["", "**What the intervals support**", ""] + [
        f"* {c}" if not c.startswith("- ") else f"  {c}" for c in doc["conclusions"]
    ]
    lines += ["", "**What this setup cannot show**", ""] + [f"* {c}" for c in CANNOT_SHOW] + ["", end]
    return "\n".join(lines) + "\n"


# --- 6. memory: many clients stay cheap ------------------------------------------------------------

MEMORY_CHILD = """
import json, resource, sys
import florist.rounds
from florist.config import RunConfig
from florist.federation import run_federated
rss, kept, disk = [], [], []
record = florist.rounds.RoundRecorder.record
def spy(self, entry, server):
    record(self, entry, server)
    rss.append(int(open("/proc/self/statm").read().split()[1]) * 4096)
    kept.append(sum(t.numel() * t.element_size() for _, a in server.merged.in_memory() for f in a.values() for t in (f.A, f.B)))
    disk.append(sum(f.stat().st_size for f in (self.out / "checkpoint" / "merged").glob("*.safetensors")))
florist.rounds.RoundRecorder.record = spy
if sys.argv[2:] == ["no-trim"]:  # the baseline: freed heap pages left with glibc
    florist.rounds.release_free_memory = lambda: None
run_federated(RunConfig(**json.loads(sys.argv[1])))
print("MEMORY " + json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_after_round": rss, "merged_in_memory": kept, "merged_on_disk": disk}))
"""


# Compiled kernels are cached per batch shape by oneDNN and by PyTorch's ideep layer; florist bounds
# both caches (florist.KERNEL_CACHE_CAPACITY). The libraries' own capacity, for comparison in the same run.
LIBRARY_CACHES = dict.fromkeys(KERNEL_CACHE_CAPACITY, "1024")

# Every memory run: FLoRIST on SmolLM2-135M, 3 rounds of 2 steps of 8 examples per client.
MEMORY_CONFIG = dict(global_model="smollm2-135m", method="florist", num_communication_rounds=3, local_batch_size=8,
                     local_micro_batch_size=8, local_max_steps=2, cutoff_len=256, max_samples_per_client=64,
                     evaluate=False, device="cpu")  # fmt: skip

MEMORY_RUNS = (  # (key in memory.json, clients, sampled fraction, round-end trim, environment, what differs)
    # florist's kernel-cache defaults even where the caller's environment sets other capacities
    ("clients_8", 8, 1.0, True, KERNEL_CACHE_CAPACITY, "default"),
    ("clients_64", 64, 0.125, True, KERNEL_CACHE_CAPACITY, "default"),
    ("clients_64_no_trim", 64, 0.125, False, KERNEL_CACHE_CAPACITY, "no round-end trim (the baseline)"),
    ("clients_64_caches1024", 64, 0.125, True, LIBRARY_CACHES, "kernel caches at the libraries' 1024 (the baseline)"),
)  # fmt: skip


def memory_child(cfg: dict[str, Any], env: dict[str, str], trim: bool = True) -> tuple[dict[str, Any], str]:
    """Run ``cfg`` in a fresh process (never resumed): its MEMORY figures, and its whole stdout."""
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, json.dumps(cfg), *([] if trim else ["no-trim"])],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("MEMORY "))
    return json.loads(line.removeprefix("MEMORY ")), done.stdout


def memory(out: Path) -> dict[str, Any]:
    """Peak RSS of 64 simulated clients with 8 a round against 8 clients all in every round, in fresh
    processes; RSS after every round, and the 64 clients' again without the round-end trim and with
    the kernel caches at the libraries' capacity (the baselines)."""
    data = SHARED / "dolly" / "databricks-dolly-15k.jsonl"
    split = out / "split64"
    if not (split / "64" / "global_test.json").is_file():
        subprocess.run([str(REPO / ".venv" / "bin" / "florist"), "data", "split", str(data), "--num-clients", "64",
                        "--out", str(split), "--mode", "iid", "--seed", "42", "--force"], check=True)  # fmt: skip
    results = {}
    for key, k, fraction, trim, env, _ in MEMORY_RUNS:
        cfg = MEMORY_CONFIG | dict(data_path=str(split if k == 64 else SHARED / "dolly"), num_clients=k,
                                   output_dir=str(out / key), client_selection_frac=fraction)  # fmt: skip
        figures, _ = memory_child(cfg, env, trim)
        rounds = json.loads((out / key / "metrics.json").read_text())["rounds"]
        results[key] = figures | {"round_seconds": [r["seconds"] for r in rounds]}
    growth = {key: r["rss_after_round"][-1] / r["rss_after_round"][0] for key, r in results.items()}
    return results | {
        "peak_ratio": results["clients_64"]["peak_rss"] / results["clients_8"]["peak_rss"],
        # RSS after the last round with the round-end trim / without it, same config
        "trim_ratio": results["clients_64"]["rss_after_round"][-1]
        / results["clients_64_no_trim"]["rss_after_round"][-1],
        # RSS after round 3 / after round 1, per run
        "rss_growth_round1_to_3": growth["clients_64"],
        "clients_8_rss_growth_round1_to_3": growth["clients_8"],
        "caches1024_rss_growth_round1_to_3": growth["clients_64_caches1024"],
        # seconds of the 3 rounds with florist's kernel caches / with the libraries' (1024)
        "time_ratio_against_caches1024": sum(results["clients_64"]["round_seconds"])
        / sum(results["clients_64_caches1024"]["round_seconds"]),
        "onednn_primitives_per_step": primitives_per_step(out, split),
        "kernel_cache_capacity": KERNEL_CACHE_CAPACITY["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
        "same_adapter_as_caches1024": all(
            filecmp.cmp(a, out / "clients_64_caches1024" / "adapter" / a.name, shallow=False)
            for a in (out / "clients_64" / "adapter").glob("*.safetensors")
        ),
    }


def primitives_per_step(out: Path, split: Path) -> int:
    """Distinct oneDNN primitives one training step runs (one batch width, LoRA on all seven linear
    modules): the least primitive-cache capacity that does not recompile kernels at every step."""
    cfg = MEMORY_CONFIG | dict(data_path=str(split), num_clients=64, output_dir=str(out / "primitives"), method="fedit",
                               num_communication_rounds=1, client_selection_frac=1 / 64, local_max_steps=1,
                               pad_to_multiple_of=256, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    _, stdout = memory_child(cfg, {**KERNEL_CACHE_CAPACITY, "ONEDNN_VERBOSE": "1", "FLORIST_PROGRESS": "0"})
    # "onednn_verbose,v1,primitive,exec,cpu,<kind>,<impl>,...,<descriptor>,<ms>": one line per call
    return len({line.rsplit(",", 1)[0] for line in stdout.splitlines() if ",primitive,exec," in line})


def write_memory(doc: dict[str, Any]) -> None:
    m = doc["machine"]
    mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    rows = [
        f"| {k} | {what} | {mb(r['peak_rss'])} | {', '.join(map(mb, r['rss_after_round']))} | "
        f"{r['rss_after_round'][-1] / r['rss_after_round'][0]:.3f} | {', '.join(map(mb, r['merged_in_memory']))} | "
        f"{', '.join(map(mb, r['merged_on_disk']))} |"
        for key, k, *_, what in MEMORY_RUNS
        if (r := doc.get(key))
    ]
    lines = ["<!-- rounds-memory:start -->", "## Many clients stay cheap (bench/rounds.py --memory)", "",
             f"{m['cpu']}, {m['cores']} cores, native bf16: {m['bf16']}; {m['date']}. FLoRIST on SmolLM2-135M, 3 rounds, "
             "2 steps of 8 examples per client-round (cutoff_len 256), each run in a fresh process: 8 clients all in "
             "every round, against 64 simulated clients with 8 sampled per round (one base model in memory for all). "
             "Memory in MiB.", "",
             "| clients | run | peak RSS | RSS after rounds 1, 2, 3 | round 3 / round 1 | merged history in memory | on disk |",
             "|---|---|---|---|---|---|---|", *rows,
             "", f"Peak RSS ratio 64 / 8 clients: **{doc['peak_ratio']:.3f}** (target ≤ 1.15). RSS after round 3 / after "
             f"round 1 with 64 clients: **{doc['rss_growth_round1_to_3']:.3f}**.", "",
             "- **florist keeps no state that grows with the rounds in memory.** The merged history is FLoRIST's "
             "exact cumulative update, every round's folded adapter (float32, the precision the base merges in), which "
             "the run needs for resuming bit for bit and for the final adapter: it lives in the checkpoint on disk and is "
             "read back when asked for (florist.checkpoint.MergedHistory); each checkpoint links the earlier rounds' files "
             "instead of writing them again.",
             "- **Each round ends by handing freed heap pages back to the OS** (florist.rounds.release_free_memory): "
             f"RSS after round 3 with it / without it: {doc['trim_ratio']:.3f}.",
             "- **Compiled kernels are cached per batch shape, and florist bounds those caches.** bf16 matmuls on the "
             "CPU go through oneDNN, which compiles kernels for each shape it meets; oneDNN and PyTorch's ideep layer "
             "above it each keep them for up to 1024 shapes, and every batch of a new width or row count adds some. "
             f"florist sets both capacities to {doc['kernel_cache_capacity']} when the user has not (florist.KERNEL_CACHE_CAPACITY; "
             "`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`): with the libraries' 1024, in the same run, RSS "
             f"after round 3 / round 1 was {doc['caches1024_rss_growth_round1_to_3']:.3f}, and the 3 rounds took "
             f"{doc['time_ratio_against_caches1024']:.3f} times as long with florist's capacity as with it. One training "
             f"step with LoRA on all seven linear modules of SmolLM2 runs {doc['onednn_primitives_per_step']} distinct "
             "oneDNN primitives: a capacity below that would compile kernels again at every step (with the cache off, "
             "training was several times slower in a trial). The same kernels are compiled either way: the two runs' final "
             f"adapters are {'byte for byte the same' if doc['same_adapter_as_caches1024'] else 'NOT the same'}.",
             "<!-- rounds-memory:end -->"]  # fmt: skip
    write_section(BENCHMARKS_MD, lines[0], lines[-1], "\n".join(lines))


# --- entry point -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=("dolly", "alpaca"), default="dolly")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny budget end to end; outputs under runs/ only"
    )
    parser.add_argument(
        "--memory", action="store_true", help="only the memory measurement (docs/benchmarks.md)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.memory:
        out = args.out or REPO / "runs" / "rounds_memory"
        doc = memory(out) | {"machine": machine()}
        atomic_write_json(out / "memory.json", doc)
        write_memory(doc)
        print(f"bench/rounds.py --memory: peak ratio {doc['peak_ratio']:.3f}")
        return
    setup = SETUP["smoke" if args.smoke else "full"]
    out = args.out or REPO / "runs" / (f"rounds_{args.dataset}" + ("_smoke" if args.smoke else ""))
    docs = out / "docs" if args.smoke else DOCS
    command = f"python bench/rounds.py --dataset {args.dataset}" + (" --smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    data_dir, heldout, n_global = prepare(args.dataset, out, setup)
    done = run_all(out, data_dir, heldout, setup, n_global)
    result = analyse(out, setup, done["base"], n_global)
    loaded_runs = []
    for m, s in runs(setup):
        metrics = json.loads((out / "runs" / f"{m}_s{s}" / "metrics.json").read_text()) | {
            "eval_before": done["base"]
        }
        label = method_label(m, {"threshold": TAU} if m == "florist" else None)
        loaded_runs.append((label if s == setup["seeds"][0] else f"{label} (seed {s})", metrics))
    doc = {
        "command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_time_s": sum(done["timing"].values()), "seconds_per_run": done["timing"], "setup": setup,
        "heldout_records": len(json.loads(heldout.read_text())), "intermediate_records": n_global, "methods": list(METHODS),
        "conclusions": conclusions(result, setup), "cannot_show": CANNOT_SHOW, **result,
    }  # fmt: skip
    write_docs(args.dataset, doc, loaded_runs, docs)
    print(f"bench/rounds.py: wrote {docs / 'rounds.md'} ({doc['wall_time_s'] / 3600:.2f} h of runs)")


if __name__ == "__main__":
    main()
