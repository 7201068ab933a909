"""The methods published after FLoRIST, in bench/results.py's experiment: its section of docs/results.md.

    python bench/results_newer.py            # about 1 h on 2 idle CPU cores
    python bench/results_newer.py --smoke    # a tiny budget end to end, output under runs/ only

FedEx-LoRA, FedSA-LoRA, HetLoRA, LoRA-FAIR and RoLoRA on bench/results.py's data, budget, seed,
held-out set and statistics, with FedIT and FLoRA (and zero-padding for heterogeneous ranks)
trained again in the same run as anchors:

* homogeneous (r=16), every method on ONE shared client init (the newer methods' default, the
  authors' code): FedIT, FLoRA, FedEx, FedSA, HetLoRA and LoRA-FAIR aggregate the very same client
  uploads, so "Δ vs FLoRA, same uploads" isolates each aggregation's own error; RoLoRA trains A
  alone (its round 1) from its own start and is compared with FLoRA on other uploads;
* heterogeneous ranks (64,32,16,16,8,8,4,4): zero-padding, FLoRA, FedSA and HetLoRA, again on one
  shared init. HetLoRA is zero-padding plus sparsity-weighted aggregation, so the pair on the same
  uploads tests the published weighting.

FedSA-LoRA is scored twice: its global view (the average of the clients' updates) on the whole
held-out set, and each client's own model (base + s_k B_k Ā) on that client's own held-out
records, paired record by record with FedIT's and with FedSA's global model on the same records.

The anchors are printed beside the main experiment's same rows: training is deterministic on one
machine and commit, so equal values show these are the main table's very uploads; a change of
kernels (another CPU, another torch) would show as a difference there. Everything is written into docs/results.md between the markers below and under
"newer_methods" in docs/results.json, leaving the rest of both files as bench/results.py wrote it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import (  # noqa: E402
    BUDGETS,
    END,
    SHARED,
    START,
    base_config,
    beyond_seeds,
    by_index,
    compare,
    fmt_ci,
    machine,
    paired_on,
    personal_records,
    prepare_data,
    records_of,
    splice,
    sweep,
)

from florist.io import atomic_write_json, atomic_write_text  # noqa: E402
from florist.report import human_bytes, method_label  # noqa: E402
from florist.stats import bootstrap_ci, heldout_comparison  # noqa: E402

SETTINGS = {  # sub-directory: (heterogeneous ranks, methods)
    "homogeneous": (False, ["fedit", "flora", "fedex", "fedsa", "hetlora", "lorafair", "rolora"]),
    "heterogeneous": (True, ["zeropad", "flora", "fedsa", "hetlora"]),
}
NEWER = ("fedex", "fedsa", "hetlora", "lorafair", "rolora")


# --- statistics ------------------------------------------------------------------------------


def analyse(out: Path, budget: dict[str, Any], n_global: int) -> dict[str, Any]:
    settings = []
    for sub in SETTINGS:
        raw = json.loads((out / sub / "sweep.json").read_text())["settings"][0]
        base = raw["base_eval"]
        rows_raw = {r["method"]: r for r in raw["rows"]}
        flora = rows_raw["flora"]
        reference = "fedit" if "fedit" in rows_raw else "zeropad"  # the plain average, same uploads
        rows = []
        for method, r in rows_raw.items():
            same = r["client_init"] == flora["client_init"] and method != "rolora"
            refs = {"base": base, "flora": flora["eval"], reference: rows_raw[reference]["eval"]}
            row = {
                "method": method,
                "label": method_label(method),
                "client_init": r["client_init"],
                **heldout_comparison(r["eval"], {k: v for k, v in refs.items() if k != method}),
                "flora_reference": "same uploads" if same else "other uploads (RoLoRA trains A alone)",
                "eff": float(r["eff"]),
                "rank_total": int(r["rank_total"]),
                "bytes_down_per_client": float(r["bytes_down_per_client"]),
                "bytes_up_per_client": float(r["bytes_up_per_client"]),
            }
            if r.get("eval_personal"):  # FedSA: each client's own model on its own records
                mine = personal_records(r, n_global, budget["heldout_per_client"])
                row["personalised"] = {
                    "mean_loss_over_clients": r["eval_personal"]["mean_loss"],
                    "clients": {cid: c["loss"] for cid, c in r["eval_personal"]["clients"].items()},
                    "vs_own_global_view": paired_on(mine, by_index(r["eval"]["heldout"])),
                }
                row["personalised"][f"vs_{reference}"] = paired_on(
                    mine, by_index(rows_raw[reference]["eval"]["heldout"])
                )
            rows.append(row)
        base_losses, base_tokens = records_of(base)
        settings.append(
            {
                "name": raw["name"],
                "heter": raw["heter"],
                "base_heldout_loss": float(base["heldout"]["loss"]),
                "base_heldout_loss_ci95": list(bootstrap_ci(base_losses, base_tokens)),
                "training_groups": [
                    {k: g[k] for k in ("client_init", "frozen_A", "methods")} for g in raw["training_groups"]
                ],
                "rows": rows,
            }
        )
    return {"settings": settings}


def anchors(result: dict[str, Any]) -> list[str]:
    """The anchors against the main experiment's same rows (docs/results.json), when it has them."""
    main_file = REPO / "docs" / "results.json"
    if not main_file.is_file():
        return []
    main = json.loads(main_file.read_text())
    lines = []
    for s in result["settings"]:
        ref = next((m for m in main.get("settings", []) if m["heter"] == s["heter"]), None)
        if ref is None:
            continue
        for r in s["rows"]:
            if r["method"] not in ("fedit", "flora", "zeropad"):
                continue
            old = next(
                (
                    x
                    for x in ref["rows"]
                    if x["method"] == r["method"] and x["client_init"] == r["client_init"]
                ),
                None,
            )
            if old is not None:
                lines.append(
                    f"{s['name']}, {r['label']} ({r['client_init'].replace('_', '-')} init): "
                    f"{r['heldout_loss']:.4f} here, {old['heldout_loss']:.4f} in the main table "
                    f"({r['heldout_loss'] - old['heldout_loss']:+.4f})"
                )
    return lines


def conclusions(result: dict[str, Any], noise: float | None) -> list[str]:
    lines = []
    for s in result["settings"]:
        rows = {r["method"]: r for r in s["rows"]}
        for method in NEWER:
            r = rows.get(method)
            if r is None:
                continue
            what = f"{method_label(method)} ({s['name']})"
            if r["flora_reference"] == "same uploads":
                lines.append(
                    compare(r["delta_vs_flora"], r["delta_vs_flora_ci95"], what, "FLoRA on the same uploads")
                    + "."
                )
            else:
                text = compare(r["delta_vs_flora"], r["delta_vs_flora_ci95"], what, "FLoRA (shared init)")
                lines.append(
                    text + beyond_seeds(r["delta_vs_flora"], noise, r["delta_vs_flora_ci95"]) + "."
                )  # the main table's seeds
            for ref in ("fedit", "zeropad"):
                if ref in rows and r["flora_reference"] == "same uploads":
                    lines.append(compare(r[f"delta_vs_{ref}"], r[f"delta_vs_{ref}_ci95"], what,
                                         f"{method_label(ref)} on the same uploads") + ".")  # fmt: skip
            personal = r.get("personalised")
            if personal:
                for key, ref_label in (
                    ("vs_own_global_view", "its own global view"),
                    ("vs_fedit", "FedIT's global model"),
                    ("vs_zeropad", "zero-padding's global model"),
                ):
                    same_as_view = (
                        key != "vs_own_global_view"
                        and key in personal
                        and (personal[key]["b"] == personal["vs_own_global_view"]["b"])
                    )
                    if key in personal and not same_as_view:  # round 1: FedSA's view is B̄Ā, FedIT's
                        p = personal[key]
                        lines.append(
                            compare(p["delta"], p["ci95"], f"{what}, each client's own model on its own "
                                    f"{p['n_records']} held-out records,", f"{ref_label} on those records") + "."
                        )  # fmt: skip
    return lines


# --- rendering -------------------------------------------------------------------------------


def table(s: dict[str, Any]) -> list[str]:
    lines = [
        "| method | client init | held-out loss [95% CI] | Δ vs base [95% CI] | Δ vs FLoRA [95% CI] | "
        "personalised loss (own records) | Eff ×10⁻⁴ | down / client | up / client |",
        "|---|---|---|---|---|---|---:|---:|---:|",
        f"| base model | | {s['base_heldout_loss']:.4f} [{s['base_heldout_loss_ci95'][0]:.4f}, "
        f"{s['base_heldout_loss_ci95'][1]:.4f}] | | | | | | |",
    ]
    for r in s["rows"]:
        lo, hi = r["heldout_loss_ci95"]
        vs_flora = ""
        if r.get("delta_vs_flora") is not None:
            vs_flora = f"{r['delta_vs_flora']:+.4f} {fmt_ci(r['delta_vs_flora_ci95'])}"
            if r["flora_reference"] != "same uploads":
                vs_flora += " (other uploads)"
        personal = ""
        if r.get("personalised"):
            p = r["personalised"]["vs_own_global_view"]
            personal = f"{p['a']:.4f} (global view {p['b']:.4f}, {p['n_records']} records)"
        name = f"**{r['label']}**" if r["method"] in NEWER else r["label"]
        lines.append(
            f"| {name} | {r['client_init'].replace('_', '-')} | {r['heldout_loss']:.4f} [{lo:.4f}, {hi:.4f}] | "
            f"{r['delta_vs_base']:+.4f} {fmt_ci(r['delta_vs_base_ci95'])} | {vs_flora} | {personal} | "
            f"{1e4 * r['eff']:.2f} | {human_bytes(r['bytes_down_per_client'])} | "
            f"{human_bytes(r['bytes_up_per_client'])} |"
        )
    return lines


def section(doc: dict[str, Any], command: str) -> str:
    b = doc["budget"]
    lines = [
        START,
        "## The methods published after FLoRIST",
        "",
        f"Generated by `{command}` (a second run of the setup above; do not edit by hand). "
        f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, {doc['date']}; wall time "
        f"{doc['wall_time_s'] / 60:.1f} min. Same data, held-out records, budget ({b['records_per_client']} "
        f"records, {b['steps']} steps of {b['batch']}, learning rate {b['learning_rate']}, 1 round), seed "
        f"{b['seeds'][0]} and statistics as above. Every method here uses a **shared** client init (the "
        "newer methods' default, as in their authors' code), so FedIT, FLoRA, FedEx, FedSA, HetLoRA and "
        "LoRA-FAIR aggregate the very same uploads; RoLoRA's round 1 trains A alone, from its own "
        "start. FedSA's personalised column scores each client's own model (base + s_k B_k Ā) on that "
        "client's own held-out records (those with a scored response), "
        "beside its global view on the same records. Methods in bold are the newer ones.",
        "",
        "In one round the newer methods' distinguishing state barely acts: FedSA's clients keep their "
        "B, RoLoRA alternates and HetLoRA prunes ranks over many rounds. A one-round comparison tests "
        "each method's aggregation rule on real uploads, not its multi-round behaviour. Two identities "
        "hold by construction in round 1 from a shared init: FedSA's global view Σ p_k s B_k Ā is FedIT's "
        "B̄Ā, and HetLoRA with equal ranks is FedIT with weights ∝ ‖s B_k A_k‖_F.",
        "",
        "**What holds**",
        "",
    ]
    lines += [f"- {c}" for c in doc["conclusions"]]
    if doc["anchors"]:
        lines += [
            "",
            "Anchors, trained again here, against the same rows of the main table above (equal values "
            "mean the training reproduced, so these rows aggregate the main table's very uploads):",
            "",
        ]
        lines += [f"- {a}" for a in doc["anchors"]]
    for s in doc["settings"]:
        lines += ["", f"### {s['name']}", "", *table(s), ""]
        groups = "; ".join(
            f"{'+'.join(g['methods'])} ({g['client_init'].replace('_', '-')} init)"
            for g in s["training_groups"]
        )
        lines.append(f"Trained once per group: {groups}.")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny budget; outputs under runs/ only")
    parser.add_argument("--render", action="store_true", help="only re-render from an existing run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    budget = BUDGETS["smoke" if args.smoke else "full"]
    out = args.out or REPO / "runs" / ("results_newer_smoke" if args.smoke else "results_newer")
    docs = out / "docs" if args.smoke else REPO / "docs"
    command = "python bench/results_newer.py" + (" --smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n_global = len(json.loads((SHARED / "dolly" / "8" / "global_test.json").read_text()))
    if not args.render:
        data_dir, heldout, _ = prepare_data(out, budget)
        seed = budget["seeds"][0]
        for sub, (heter, methods) in SETTINGS.items():
            cfg = base_config(data_dir, heldout, out / sub, budget, seed=seed)
            sweep(cfg, methods=methods, thresholds=[0.9], client_init="shared", heter=(heter,))
        atomic_write_json(out / "experiment.json", {"wall_time_s": time.perf_counter() - started,
                                                    "machine": machine(), "budget": budget})  # fmt: skip
    experiment = json.loads((out / "experiment.json").read_text())
    result = analyse(out, budget, n_global)
    main_doc = REPO / "docs" / "results.json"
    spread = json.loads(main_doc.read_text()).get("seed_spread") if main_doc.is_file() else None
    noises = [r["spread"] for r in spread or [] if r.get("spread") is not None]
    doc = {
        "command": command,
        "machine": experiment["machine"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((out / "experiment.json").stat().st_mtime)),
        "wall_time_s": experiment["wall_time_s"],
        "budget": experiment["budget"],
        "conclusions": conclusions(result, max(noises) if noises else None),
        "anchors": [] if args.smoke else anchors(result),  # the main table has the full budget
        "settings": result["settings"],
    }
    docs.mkdir(parents=True, exist_ok=True)
    results_json = docs / "results.json"
    whole = json.loads(results_json.read_text()) if results_json.is_file() else {}
    atomic_write_json(results_json, whole | {"newer_methods": doc})
    results_md = docs / "results.md"
    atomic_write_text(
        results_md, splice(results_md.read_text() if results_md.is_file() else "", section(doc, command))
    )
    print(f"results_newer: wrote {results_md} and {results_json} ({experiment['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
