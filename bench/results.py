"""The experiment behind docs/results.md: a method comparison on SmolLM2 that can separate methods.

    python bench/results.py              # the whole experiment (about 2 h on 2 idle CPU cores)
    python bench/results.py --smoke      # a tiny budget end to end, output under runs/ only
    python bench/results.py --render     # re-render docs/ from an existing runs/results/

One command regenerates docs/results.md, docs/results.json and docs/img/results_*.png:

1. Data. The paper's Dolly split (../shared/data/dolly/8). Each client trains on a fixed random
   subset of its records (the same for every seed and method); the held-out set is Dolly's
   global_test.json plus a fixed sample of every client's records that it does not train on.
2. Training and aggregation. ``florist sweep`` with one round (as the paper's README commands),
   homogeneous (r=16) with every method under both client inits, and heterogeneous ranks with each
   method's default init (the sweep trains once per init and frozen-A group and aggregates every
   method and τ of the group from the same uploads). A second training seed repeats FedIT, FLoRA and FLoRIST at
   FLoRIST-O's τ (homogeneous, default inits), where the conclusions rest.
3. Evaluation. Held-out loss (response tokens, float32) for every configuration, with a 95%
   percentile-bootstrap interval over held-out records and paired intervals of the difference
   to FLoRA on the same clients and to the base model (florist.stats). FLoRIST-O/-E are chosen
   on held-out loss (MMLU sits near chance at 135M parameters). MMLU (the 1,444-question subset,
   log-likelihood) for the base model and FLoRIST-O/-E.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("FLORIST_MMLU_PATH", None)  # MMLU is evaluated below, for chosen models only

from common import (  # noqa: E402
    BUDGETS,
    DOCS,
    REPO,
    SHARED,
    base_config,
    beyond_seeds,
    compare,
    default_init,
    fmt_ci,
    keep_newer,
    machine,
    prepare_data,
    records_of,
    sweep,
)

from florist.io import atomic_write_json, atomic_write_text  # noqa: E402
from florist.report import human_bytes, method_label  # noqa: E402
from florist.stats import bootstrap_ci, heldout_comparison, paired_bootstrap_ci  # noqa: E402

PAPER_ORDER = ["florist", "fedit", "flexlora", "flora", "ffa"]  # TinyLlama, Dolly, MMLU (notes/paper.md)


# --- 1. data -------------------------------------------------------------------------------


# --- 2. training and aggregation -------------------------------------------------------------


def load_main(out: Path, budget: dict[str, Any]) -> dict[str, Any]:
    """The first seed's two sweeps (homogeneous, heterogeneous) as one sweep.json-like dict."""
    parts = [
        json.loads((out / f"seed{budget['seeds'][0]}" / sub / "sweep.json").read_text())
        for sub in ("homogeneous", "heterogeneous")
    ]
    return dict(parts[0], settings=[s for p in parts for s in p["settings"]])


# --- 3. statistics -------------------------------------------------------------------------


def row_stats(row: dict[str, Any], floras: dict[str, dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """Intervals of a row; FLoRA is the one trained on the same uploads, else the default-init one
    (a FFA row, say, whose frozen-A training no FLoRA shares), and the row names which it used."""
    from florist.aggregation import AGGREGATORS

    flora = floras.get(row["client_init"]) or floras.get("per_client") or next(iter(floras.values()), None)
    out = heldout_comparison(row["eval"], {"base": base, "flora": flora["eval"] if flora else None})
    if flora is not None:
        kind = AGGREGATORS[row["method"]].training_kind()  # FFA and RoLoRA train apart from FLoRA
        same = flora["client_init"] == row["client_init"] and kind == AGGREGATORS["flora"].training_kind()
        out["flora_reference"] = "same uploads" if same else f"FLoRA, {flora['client_init']} init"
    return out


def analyse(main: dict[str, Any], seeds: list[dict[str, Any]], budget: dict[str, Any]) -> dict[str, Any]:
    settings = []
    for s in main["settings"]:
        base = s["base_eval"]
        flora = {r["client_init"]: r for r in s["rows"] if r["method"] == "flora"}
        rows = []
        for r in s["rows"]:
            rows.append(
                {
                    "method": r["method"],
                    "label": r["label"],
                    "tau": r["threshold"],
                    "client_init": r["client_init"],
                    **row_stats(r, flora, base),
                    "eff": float(r["eff"]),
                    "rank_total": int(r["rank_total"]),
                    "bytes_down_per_client": float(r["bytes_down_per_client"]),
                    "bytes_up_per_client": float(r["bytes_up_per_client"]),
                }
            )
        base_losses, base_tokens = records_of(base)
        setting = {
            "name": s["name"],
            "heter": s["heter"],
            "base_heldout_loss": float(base["heldout"]["loss"]),
            "base_heldout_loss_ci95": list(bootstrap_ci(base_losses, base_tokens)),
            "florist_o": {"tau": s["florist_o"]["threshold"], "client_init": s["florist_o"]["client_init"]},
            "florist_e": {"tau": s["florist_e"]["threshold"], "client_init": s["florist_e"]["client_init"]},
            "training_groups": [
                {k: g[k] for k in ("client_init", "frozen_A", "methods")} for g in s["training_groups"]
            ],
            "singular_values": s.get("singular_values") or {},
            "rows": rows,
        }
        settings.append(setting)
    # Seeds: the same configurations trained again; per-record CIs cover the held-out sample,
    # the spread over seeds covers training randomness.
    spread = []
    homogeneous = next(s for s in settings if not s["heter"])
    for key in seed_keys(homogeneous):
        values = [row_value(homogeneous, key)] + [row_value(sd_setting(sd), key) for sd in seeds]
        values = [v for v in values if v is not None]
        spread.append(
            {
                "method": key[0],
                "tau": key[1],
                "client_init": key[2],
                "seeds": budget["seeds"][: len(values)],
                "heldout_loss": values,
                "spread": max(values) - min(values) if values else None,
                "delta_vs_base": [
                    v - b for v, b in zip(values, [homogeneous["base_heldout_loss"]] * len(values))
                ],
            }
        )
    return {"settings": settings, "seed_spread": spread}


def seed_keys(setting: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    o = setting["florist_o"]
    return [("fedit", None, "shared"), ("flora", None, "per_client"), ("florist", o["tau"], "per_client")]


def row_value(setting: dict[str, Any], key: tuple[str, float | None, str]) -> float | None:
    for r in setting["rows"]:
        if (r["method"], r["tau"], r["client_init"]) == key:
            return r["heldout_loss"]
    return None


def sd_setting(sweep_json: dict[str, Any]) -> dict[str, Any]:
    s = sweep_json["settings"][0]
    return {
        "rows": [
            {
                "method": r["method"],
                "tau": r["threshold"],
                "client_init": r["client_init"],
                "heldout_loss": r["eval"]["heldout"]["loss"],
            }
            for r in s["rows"]
        ]
    }


# --- MMLU for the chosen models ----------------------------------------------------------------


def mmlu_scores(run_dir: Path, main: dict[str, Any], questions: int | None) -> dict[str, Any]:
    """MMLU (1,444 subset, loglik) for the base model and each setting's FLoRIST-O/-E adapters."""
    import torch

    from florist.adapters import read_peft_adapter
    from florist.evaluation.mmlu import evaluate_mmlu, load_mmlu
    from florist.lora import LoraHost
    from florist.models import load_model
    from florist.sweep import adapter_label

    items = load_mmlu(SHARED / "mmlu" / "mmlu_test_1444.jsonl")
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    host = LoraHost(model, ["q_proj", "v_proj"])
    out: dict[str, Any] = {}

    def score(adapter: Any) -> dict[str, Any]:
        # bf16 autocast for the decoder (2.6x faster here); the letters come from a float32 head.
        with host.use_adapter(adapter), torch.autocast("cpu", dtype=torch.bfloat16):
            r = evaluate_mmlu(model, tokenizer, items, scorer="loglik", seed=42, max_questions=questions)
        return {k: r[k] for k in ("accuracy_macro", "accuracy_micro", "n_questions")}

    out["base"] = score(None)
    for s in main["settings"]:
        sub = "heterogeneous" if s["heter"] else "homogeneous"
        for key in ("florist_o", "florist_e"):
            row = s[key]
            same_tau = [
                r for r in s["rows"] if r["method"] == "florist" and r["threshold"] == row["threshold"]
            ]
            path = run_dir / sub / "adapters" / sub / adapter_label(row, with_init=len(same_tau) > 1)
            adapter, _ = read_peft_adapter(path)
            out[f"{sub}/{key}"] = score(adapter) | {
                "tau": row["threshold"],
                "client_init": row["client_init"],
            }
    return out


# --- statements the intervals support --------------------------------------------------------


def find(
    setting: dict[str, Any], method: str, init: str | None = None, tau: float | None = None
) -> dict | None:
    for r in setting["rows"]:
        if (
            r["method"] == method
            and (init is None or r["client_init"] == init)
            and (tau is None or r["tau"] == tau)
        ):
            return r
    return None


def paired(main: dict[str, Any], name: str, a: dict, b: dict) -> tuple[float, list[float]]:
    """Paired difference a - b over the held-out records (rows of the raw sweep)."""
    s = next(s for s in main["settings"] if s["name"] == name)

    def raw(row: dict) -> dict:
        return next(
            r for r in s["rows"]
            if r["method"] == row["method"] and r["threshold"] == row["tau"] and r["client_init"] == row["client_init"]
        )  # fmt: skip

    la, tokens = records_of(raw(a)["eval"])
    lb, _ = records_of(raw(b)["eval"])
    return a["heldout_loss"] - b["heldout_loss"], list(paired_bootstrap_ci(la, lb, tokens))


def conclusions(result: dict[str, Any], main: dict[str, Any]) -> dict[str, list[str]]:
    spreads = [
        r["spread"] for r in result["seed_spread"] if r["spread"] is not None and len(r["heldout_loss"]) > 1
    ]
    noise = max(spreads) if spreads else None
    out: dict[str, list[str]] = {}
    for s in result["settings"]:
        lines = []
        name = s["name"]
        rows = s["rows"]
        best = min(rows, key=lambda r: r["heldout_loss"])
        lo, hi = best["delta_vs_base_ci95"]
        verdict = (
            "the whole interval lies more than 0.05 nats below the base"
            if hi <= -0.05
            else "the interval does not lie entirely 0.05 nats below the base"
        )
        lines.append(
            f"The best configuration, {best['label']}, lowers the held-out loss from {s['base_heldout_loss']:.4f} "
            f"(base model) to {best['heldout_loss']:.4f}: {best['delta_vs_base']:+.4f} nats, paired 95% CI "
            f"{fmt_ci(best['delta_vs_base_ci95'])}; {verdict}."
        )
        flora = find(s, "flora", "per_client")
        others = ("fedit", "zeropad", "flexlora", "ffa", "fedex", "fedsa", "rolora", "hetlora", "lorafair")
        for method in [m for m in others if find(s, m)]:
            row = find(s, method, default_init(method))
            label = f"{method_label(method)} ({default_init(method).replace('_', '-')} init, its default)"
            if row.get("delta_vs_flora_ci95") is not None and row["client_init"] == "per_client":
                lines.append(compare(row["delta_vs_flora"], row["delta_vs_flora_ci95"], label,
                                     "FLoRA on the same client uploads") + ".")  # fmt: skip
            elif flora is not None:
                d, ci = paired(main, name, row, flora)
                same = find(s, "flora", row["client_init"])
                text = compare(d, ci, label, "FLoRA (per-client init, its default)") + beyond_seeds(
                    d, noise, ci
                )
                if same is not None and row.get("flora_reference") == "same uploads":
                    text += (
                        f"; against FLoRA on the very same uploads ({row['client_init'].replace('_', '-')} init) "
                        f"the difference is {row['delta_vs_flora']:+.4f} nats (95% CI {fmt_ci(row['delta_vs_flora_ci95'])}), "
                        "the aggregation's own error"
                    )
                lines.append(text + ".")
        for key, tag in (("florist_o", "FLoRIST-O"), ("florist_e", "FLoRIST-E")):
            sel = s[key]
            row = find(s, "florist", sel["client_init"], sel["tau"])
            ref = find(s, "flora", sel["client_init"])
            if row is None or ref is None:
                continue
            saving = ref["bytes_down_per_client"] / row["bytes_down_per_client"]
            lo, hi = row["delta_vs_flora_ci95"]
            bound = max(abs(lo), abs(hi))
            lines.append(
                f"{tag} (τ={sel['tau']:.2f}, {sel['client_init'].replace('_', '-')} init) downloads "
                + (f"{saving:.1f}× less than" if saving > 1.05 else "as much as")
                + f" FLoRA ({human_bytes(row['bytes_down_per_client'])} against {human_bytes(ref['bytes_down_per_client'])} "
                f"per client) and its held-out loss is within {bound:.4f} nats of FLoRA's on the same uploads "
                f"(difference {row['delta_vs_flora']:+.4f}, 95% CI {fmt_ci(row['delta_vs_flora_ci95'])})."
            )
        # The init choice, method by method (the same records, different trainings).
        for method in ("fedit", "zeropad", "flora", "florist"):
            tau = s["florist_o"]["tau"] if method == "florist" else None
            shared, own = find(s, method, "shared", tau), find(s, method, "per_client", tau)
            if shared and own:
                d, ci = paired(main, name, shared, own)
                what = method_label(method) + (f" τ={tau:.2f}" if tau else "")
                lines.append(
                    compare(d, ci, f"{what} with a shared init", "with per-client inits")
                    + beyond_seeds(d, noise, ci)
                    + "."
                )
        out[name] = lines
    return out


def paper_ordering(result: dict[str, Any], main: dict[str, Any]) -> list[str]:
    """Where the paper's accuracy ordering (TinyLlama, Dolly) holds on held-out loss here."""
    spreads = [
        r["spread"] for r in result["seed_spread"] if r["spread"] is not None and len(r["heldout_loss"]) > 1
    ]
    noise = max(spreads) if spreads else None
    s = next(s for s in result["settings"] if not s["heter"])
    o = s["florist_o"]
    rows = {
        "florist": find(s, "florist", o["client_init"], o["tau"]),
        **{m: find(s, m, default_init(m)) for m in PAPER_ORDER if m != "florist"},
    }
    lines = []
    for better, worse in zip(PAPER_ORDER, PAPER_ORDER[1:]):
        d, ci = paired(main, s["name"], rows[better], rows[worse])
        a, b = method_label(better) + ("-O" if better == "florist" else ""), method_label(worse)
        if ci[1] < 0:
            verdict = "holds"
        elif ci[0] > 0:
            verdict = "is reversed"
        else:
            verdict = "is not resolved"
        lines.append(
            f"{a} above {b} (paper): {verdict} here, loss difference {d:+.4f} nats (95% CI {fmt_ci(ci)})"
            + beyond_seeds(d, noise, ci)
            + "."
        )
    return lines


# --- plots -----------------------------------------------------------------------------------


def plot_tradeoff(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from florist.report import METHOD_COLORS

    settings = result["settings"]
    fig = Figure(figsize=(6.2 * len(settings), 4.8), layout="constrained")
    for i, s in enumerate(settings):
        ax = fig.add_subplot(1, len(settings), i + 1)
        lo, hi = s["base_heldout_loss_ci95"]
        ax.axhline(s["base_heldout_loss"], color="grey", ls=":", label="base model")
        for init, style in (("per_client", "-"), ("shared", "--")):
            tau = sorted((r for r in s["rows"] if r["method"] == "florist" and r["client_init"] == init),
                         key=lambda r: r["bytes_down_per_client"])  # fmt: skip
            if tau:
                x = [r["bytes_down_per_client"] / 1e6 for r in tau]
                y = [r["heldout_loss"] for r in tau]
                err = [[r["heldout_loss"] - r["heldout_loss_ci95"][0] for r in tau],
                       [r["heldout_loss_ci95"][1] - r["heldout_loss"] for r in tau]]  # fmt: skip
                ax.errorbar(x, y, yerr=err, fmt="o" + style, ms=4, capsize=2, lw=1,
                            color=METHOD_COLORS["florist"], mfc="white" if init == "shared" else None,
                            label=f"FLoRIST τ grid ({init.replace('_', '-')} init)")  # fmt: skip
                for r, xx, yy in zip(tau, x, y):
                    ax.annotate(
                        f"{r['tau']:.2f}", (xx, yy), fontsize=6, xytext=(3, -9), textcoords="offset points"
                    )
        for r in s["rows"]:
            if r["method"] == "florist":
                continue
            own = r["client_init"] == default_init(r["method"])
            ax.errorbar([r["bytes_down_per_client"] / 1e6], [r["heldout_loss"]],
                        yerr=[[r["heldout_loss"] - r["heldout_loss_ci95"][0]], [r["heldout_loss_ci95"][1] - r["heldout_loss"]]],
                        fmt="s", ms=6, capsize=2, color=METHOD_COLORS.get(r["method"], "tab:gray"),
                        mfc=None if own else "white",
                        label=f"{method_label(r['method'])} ({r['client_init'].replace('_', '-')} init)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("download per client (MB, log scale)")
        ax.set_ylabel("held-out loss (nats), 95% CI over records")
        ax.set_title(f"{s['name']}; base {s['base_heldout_loss']:.3f} [{lo:.3f}, {hi:.3f}]", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("Held-out loss against download: filled markers are each method's default init", fontsize=11)
    fig.savefig(path, dpi=110)


def plot_deltas(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    settings = result["settings"]
    n = max(len(s["rows"]) for s in settings)
    fig = Figure(figsize=(6.2 * len(settings), 0.28 * n + 1.6), layout="constrained")
    for i, s in enumerate(settings):
        ax = fig.add_subplot(1, len(settings), i + 1)
        rows = [r for r in s["rows"] if r["method"] != "flora" and "delta_vs_flora_ci95" in r]
        for y, r in enumerate(rows):
            lo, hi = r["delta_vs_flora_ci95"]
            color = "tab:red" if lo > 0 else "tab:green" if hi < 0 else "tab:gray"
            ax.plot([lo, hi], [y, y], color=color, lw=2)
            ax.plot([r["delta_vs_flora"]], [y], "o", color=color, ms=4)
        ax.axvline(0, color="black", lw=0.8)
        labels = [r["label"] + ("" if r["flora_reference"] == "same uploads" else " *") for r in rows]
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel("held-out loss minus FLoRA's on the same uploads (nats, paired 95% CI)")
        ax.set_title(s["name"], fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Each configuration against the exact aggregate (red: worse, green: better, grey: unresolved;"
                 " * against FLoRA trained on other uploads)",
                 fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=110)


# --- the page ----------------------------------------------------------------------------------


def table(s: dict[str, Any]) -> list[str]:
    lines = [
        "| method | client init | τ | held-out loss [95% CI] | Δ vs base [95% CI] | Δ vs FLoRA, same uploads [95% CI] "
        "| Eff ×10⁻⁴ | down / client | up / client |",
        "|---|---|---|---|---|---|---:|---:|---:|",
        f"| base model | | | {s['base_heldout_loss']:.4f} [{s['base_heldout_loss_ci95'][0]:.4f}, "
        f"{s['base_heldout_loss_ci95'][1]:.4f}] | | | | | |",
    ]
    for r in s["rows"]:
        mark = " (default)" if r["client_init"] == default_init(r["method"]) else ""
        tag = ""
        for key, name in (("florist_o", "O"), ("florist_e", "E")):
            sel = s[key]
            if r["method"] == "florist" and (r["tau"], r["client_init"]) == (sel["tau"], sel["client_init"]):
                tag += f" **{name}**"
        dflora = (
            f"{r['delta_vs_flora']:+.4f} {fmt_ci(r['delta_vs_flora_ci95'])}"
            if r.get("delta_vs_flora_ci95") is not None and r["method"] != "flora"
            else ""
        )
        if dflora and r.get("flora_reference") != "same uploads":
            dflora += f" (vs {r['flora_reference']}; other uploads)"
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(
            f"| {method_label(r['method'])}{tag} | {r['client_init'].replace('_', '-')}{mark} | "
            f"{tau} | {r['heldout_loss']:.4f} "
            f"[{r['heldout_loss_ci95'][0]:.4f}, {r['heldout_loss_ci95'][1]:.4f}] | "
            f"{r['delta_vs_base']:+.4f} {fmt_ci(r['delta_vs_base_ci95'])} | {dflora} | {1e4 * r['eff']:.2f} | "
            f"{human_bytes(r['bytes_down_per_client'])} | {human_bytes(r['bytes_up_per_client'])} |"
        )
    return lines


def render(out: Path, docs: Path, command: str) -> dict[str, Any]:
    experiment = json.loads((out / "experiment.json").read_text())
    main_sweep = load_main(out, experiment["budget"])
    seed_sweeps = [
        json.loads((out / f"seed{sd}" / "sweep.json").read_text()) for sd in experiment["budget"]["seeds"][1:]
    ]
    result = analyse(main_sweep, seed_sweeps, experiment["budget"])
    said = conclusions(result, main_sweep)
    order = paper_ordering(result, main_sweep)
    budget = experiment["budget"]
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(result, img / "results_tradeoff.png")
    plot_deltas(result, img / "results_delta_vs_flora.png")
    for sub in ("homogeneous", "heterogeneous"):
        for name in ("energy_curves.png", "loss_curves.png"):
            source = out / f"seed{budget['seeds'][0]}" / sub / "report" / name
            if source.is_file():
                shutil.copyfile(source, img / f"results_{sub}_{name}")
    heldout_records = len(records_of(main_sweep["settings"][0]["base_eval"])[0])
    doc = {
        "generated_by": "python bench/results.py",
        "machine": experiment["machine"],
        "wall_time_s": experiment["wall_time_s"],
        "phases_s": experiment["phases_s"],
        "wall_time_note": experiment.get("note"),  # what else ran beside it, if anything
        "budget": {
            "optimizer_steps_per_client": budget["steps"],
            "records_per_client": budget["records_per_client"],
            "batch_size": budget["batch"],
            "learning_rate": budget["learning_rate"],
            "cutoff_len": budget["cutoff_len"],
            "rounds": 1,
            "seeds": budget["seeds"],
            "heldout_records": heldout_records,
            "heldout_records_in_file": len(json.loads((out / "heldout.json").read_text())),
            "thresholds": budget["thresholds"],
        },
        "settings": result["settings"],
        "seed_spread": result["seed_spread"],
        "mmlu": experiment["mmlu"],
        "conclusions": said,
        "paper_ordering": order,
        "selection_rule": main_sweep["selection_rule"],
    }
    # bench/results_newer.py's section (a second run of this setup) is kept as it wrote it.
    doc, text = keep_newer(docs, doc, markdown(doc, command))
    atomic_write_json(docs / "results.json", doc)
    atomic_write_text(docs / "results.md", text)
    return doc


def markdown(doc: dict[str, Any], command: str) -> str:
    b, m = doc["budget"], doc["machine"]
    lines = [
        "# Results: which method is better, on SmolLM2-135M and the paper's Dolly split",
        "",
        "Generated by `python bench/results.py` (do not edit by hand); the numbers are in "
        "[results.json](results.json).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}. "
        f"Wall time of the whole experiment: **{doc['wall_time_s'] / 60:.1f} min** "
        f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in doc['phases_s'].items())})."
        + (f" {doc['wall_time_note']}" if doc.get("wall_time_note") else ""),
        "",
        "## Setup",
        "",
        "- SmolLM2-135M-Instruct, LoRA on q_proj/v_proj, 8 clients of the paper's Dolly split (Dirichlet "
        "α=0.5 over category), **1 round** as in the paper's README commands; homogeneous r=16 (α=32) and "
        "heterogeneous ranks 64,32,16,16,8,8,4,4 (α=2r).",
        f"- Budget per client: **{b['records_per_client']} records, {b['optimizer_steps_per_client']} optimizer "
        f"steps** of {b['batch_size']} (one epoch over a fixed random subset of the client's data), AdamW, "
        f"learning rate {b['learning_rate']:g} (linear decay, no warm-up), cutoff {b['cutoff_len']}, dropout "
        "0.05, bf16 autocast. The paper uses 3e-4 over 3 epochs of all the data; a few steps need a larger "
        "rate to move the model measurably.",
        f"- Held-out data: **{b['heldout_records']} records** scored, Dolly's global_test.json plus a fixed sample of "
        "each client's records that no client trained on. Loss over response tokens, float32. "
        f"The held-out file holds {b.get('heldout_records_in_file', b['heldout_records'])} records; those whose "
        f"prompt fills the cutoff of {b['cutoff_len']} tokens have no response token left to score.",
        "- Intervals: 95% percentile bootstrap over held-out records (4,000 resamples). Differences are "
        "paired: both models scored on the same records in every resample. They measure the held-out "
        "sample's uncertainty; training randomness is shown by the second seed below.",
        "- Client init: homogeneous, every method under both `shared` and `per-client` inits "
        "(docs/methods.md); heterogeneous, each method's default. '(default)' marks the init the "
        'authors\' code uses. "Δ vs FLoRA, same uploads" compares with FLoRA '
        "aggregating the very same client adapters, so it isolates the aggregation's own error.",
        f"- {doc['selection_rule']} Both are chosen among the τ grid {', '.join(f'{t:.2f}' for t in b['thresholds'])} "
        "under either init, on held-out loss because MMLU cannot separate configurations at this size.",
        "- τ = 1.00 has no row of its own: FLoRIST at τ=1 keeps every nonzero singular value of the stack, so "
        "its update is FLoRA's exactly (`test_florist_tau_one_matches_dense_svd`), and FLoRA's row is τ=1.00.",
        "",
        "```",
        command,
        "```",
        "",
        "## What holds",
        "",
    ]
    for name, said in doc["conclusions"].items():
        lines += [f"**{name}**", ""] + [f"- {x}" for x in said] + [""]
    lines += (
        [
            "**The paper's ordering** (TinyLlama on Dolly, MMLU: FLoRIST-O > FedIT > FlexLoRA > FLoRA > "
            "FFA-LoRA), checked pairwise on held-out loss with each method's default init, homogeneous:",
            "",
        ]
        + [f"- {x}" for x in doc["paper_ordering"]]
        + [""]
    )
    for s in doc["settings"]:
        lines += [f"## {s['name']}", ""] + table(s) + [""]
        groups = "; ".join(
            f"{'+'.join(g['methods'])} ({g['client_init'].replace('_', '-')} init{', A frozen' if g['frozen_A'] else ''})"
            for g in s["training_groups"]
        )
        lines += [f"Trained once per group: {groups}.", ""]
    lines += [
        "## Training seeds",
        "",
        "The configurations the conclusions rest on, trained again with another seed (homogeneous, default "
        "inits, FLoRIST at FLoRIST-O's τ; the data subsets stay fixed):",
        "",
        "| method | τ | client init | held-out loss per seed | spread | Δ vs base per seed |",
        "|---|---|---|---|---:|---|",
    ]
    for r in doc["seed_spread"]:
        tau = "" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(
            f"| {method_label(r['method'])} | {tau} | {r['client_init'].replace('_', '-')} | "
            + ", ".join(f"{v:.4f} (seed {sd})" for v, sd in zip(r["heldout_loss"], r["seeds"]))
            + f" | {r['spread']:.4f} | "
            + ", ".join(f"{d:+.4f}" for d in r["delta_vs_base"])
            + " |"
        )
    mm = doc["mmlu"]
    lines += [
        "",
        "## MMLU",
        "",
        f"The 1,444-question subset, log-likelihood scoring of A/B/C/D ({mm['base']['n_questions']} questions). "
        "At 135M parameters MMLU sits **near chance (25%)**; one standard error is about "
        f"{100 * math.sqrt(0.25 * 0.75 / mm['base']['n_questions']):.1f} points, so these numbers cannot rank "
        "methods and are shown for completeness.",
        "",
        "| model | τ | client init | MMLU macro % | MMLU micro % |",
        "|---|---|---|---:|---:|",
        f"| base model | | | {100 * mm['base']['accuracy_macro']:.2f} | {100 * mm['base']['accuracy_micro']:.2f} |",
    ]
    for key, v in mm.items():
        if key == "base":
            continue
        sub, sel = key.split("/")
        lines.append(
            f"| {sub} FLoRIST-{sel[-1].upper()} | {v['tau']:.2f} | {v['client_init'].replace('_', '-')} | "
            f"{100 * v['accuracy_macro']:.2f} | {100 * v['accuracy_micro']:.2f} |"
        )
    lines += [
        "",
        "## Plots",
        "",
        "![held-out loss against download](img/results_tradeoff.png)",
        "",
        "![each configuration against FLoRA](img/results_delta_vs_flora.png)",
        "",
        "![FLoRIST energy curves, homogeneous](img/results_homogeneous_energy_curves.png)",
        "",
        "![FLoRIST energy curves, heterogeneous](img/results_heterogeneous_energy_curves.png)",
        "",
        "![client training losses, homogeneous](img/results_homogeneous_loss_curves.png)",
        "",
        "![client training losses, heterogeneous](img/results_heterogeneous_loss_curves.png)",
        "",
        "## What these numbers cannot show",
        "",
        "- One round and a small model: the paper's MMLU gains need its models (1.1B to 7B) and budgets "
        "(3 local epochs); this experiment tests the methods' aggregation on real training, not those numbers.",
        "- The intervals cover the held-out sample only. The seed table shows how much a second training "
        "moves each loss; differences smaller than that spread are not conclusions about the methods.",
        "",
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny budget; outputs under runs/ only")
    parser.add_argument("--render", action="store_true", help="only re-render from an existing run")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/results[_smoke])")
    args = parser.parse_args()
    budget = BUDGETS["smoke" if args.smoke else "full"]
    out = args.out or REPO / "runs" / ("results_smoke" if args.smoke else "results")
    docs = out / "docs" if args.smoke else DOCS
    command = "python bench/results.py" + (" --smoke" if args.smoke else "")
    if not args.render:
        out.mkdir(parents=True, exist_ok=True)
        phases: dict[str, float] = {}
        started = time.perf_counter()
        data_dir, heldout, n_heldout = prepare_data(out, budget)
        print(
            f"results: {n_heldout} held-out records; clients train on {budget['records_per_client']} each",
            flush=True,
        )
        seed = budget["seeds"][0]
        # Homogeneous: every method under both inits; heterogeneous: each method's default init.
        for sub, heter, inits in (("homogeneous", False, "both"), ("heterogeneous", True, "auto")):
            t = time.perf_counter()
            cfg = base_config(data_dir, heldout, out / f"seed{seed}" / sub, budget, seed=seed)
            sweep(cfg, methods="all", thresholds=budget["thresholds"], client_init=inits, heter=(heter,),
                  save_adapters=True)  # fmt: skip
            phases[f"{sub} ({'both inits' if inits == 'both' else 'default inits'})"] = (
                time.perf_counter() - t
            )
        main_sweep = load_main(out, budget)
        o = next(s for s in main_sweep["settings"] if not s["heter"])["florist_o"]
        for seed in budget["seeds"][1:]:
            t = time.perf_counter()
            cfg = base_config(data_dir, heldout, out / f"seed{seed}", budget, seed=seed)
            sweep(cfg, methods=["fedit", "flora", "florist"], thresholds=[o["threshold"]], heter=(False,),
                  report=False)  # fmt: skip
            phases[f"seed {seed} (homogeneous FedIT, FLoRA, FLoRIST-O)"] = time.perf_counter() - t
        t = time.perf_counter()
        mmlu = mmlu_scores(out / f"seed{budget['seeds'][0]}", main_sweep, budget["mmlu_questions"])
        phases["MMLU"] = time.perf_counter() - t
        atomic_write_json(
            out / "experiment.json",
            {
                "machine": machine(),
                "budget": budget,
                "wall_time_s": time.perf_counter() - started,
                "phases_s": phases,
                "mmlu": mmlu,
            },
        )
    doc = render(out, docs, command)
    print(
        f"results: wrote {docs / 'results.md'} and {docs / 'results.json'} ({doc['wall_time_s'] / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
