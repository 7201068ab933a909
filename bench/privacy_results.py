"""Held-out loss against ε: does freezing A (FFA-LoRA) make LoRA more robust to DP noise?

    python bench/privacy_results.py            # the experiment (about 70 min on 2 idle cores)
    python bench/privacy_results.py --smoke    # a tiny budget end to end, output under runs/ only

FFA-LoRA (arXiv 2403.12313) argues that the product B·A amplifies DP noise and that freezing A
fixes it. This script measures that claim on real training: FedIT, FFA-LoRA, FLoRA and FLoRIST
(τ = 0.9) under client-level local DP (florist.privacy: each client clips the factors it uploads,
``[s·(B−B₀), A−A₀]`` as one vector, to C and adds N(0, (zC)²) to every coordinate) at several noise
multipliers z, plus each method without DP. Data, budget, seed, held-out set and statistics are
bench/results.py's (the paper's Dolly split, SmolLM2-135M, homogeneous r = 16, one round), and each
method trains with its default client init (the authors' code).

One training serves every noise level. Local DP acts after the client's training, on its upload,
so in one round the noised upload of a (method, z) configuration has exactly the distribution a
run of its own would give; the script trains each training group once (as ``florist sweep``) and
draws fresh noise, from the operating system's entropy, for every configuration and draw. The
comparison across z is then paired: the same client adapters under different noise.

The clip norm C: for each method, the median over the 8 clients of the norm of its travelling
vector in this training (so about half the uploads are clipped; the target of adaptive clipping,
Andrew et al. 2021, at the median). Looking at the norms makes C itself data-dependent, so this
is an oracle choice that favours utility, the same rule for every method; a deployment fixes C
in advance or spends budget on adaptive clipping.

ε is florist's (dp-accounting RDP, add-or-remove one client, one release per client, δ below).
Intervals are 95% paired bootstrap intervals over held-out records; they do not cover the
randomness of the noise draw, which the repeated draws (--draws at the levels in --repeat) show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import BUDGETS, base_config, compare, fmt_ci, machine, prepare_data  # noqa: E402

from florist.aggregation import AGGREGATORS  # noqa: E402
from florist.io import atomic_write_json, atomic_write_text  # noqa: E402
from florist.report import method_label  # noqa: E402
from florist.stats import heldout_comparison  # noqa: E402

METHODS = ("fedit", "ffa", "flora", "florist")
TAU = 0.9
NOISE = {"full": [0.001, 0.01, 0.1, 1.0], "smoke": [0.01, 1.0]}
REPEAT = {"full": [0.01, 0.1], "smoke": [0.01]}  # levels drawn twice: the noise draw's own spread


def run(out: Path, budget: dict[str, Any], noise: list[float], repeat: list[float], delta: float) -> dict:
    """Train each group once; every (method, z, draw) noises the same uploads afresh."""
    import dataclasses

    from florist import privacy
    from florist.evaluation.evaluator import Evaluator
    from florist.federation import ClientSetup
    from florist.sweep import close_configuration, configured, train_group, training_groups

    data_dir, heldout, _ = prepare_data(out, budget)
    cfg = base_config(data_dir, heldout, out / "run", budget, seed=budget["seeds"][0])
    setup = ClientSetup.load(cfg)
    host, tokenizer = setup.host, setup.tokenizer
    evaluate = Evaluator(cfg, setup.prompter)
    base = evaluate(host, tokenizer, None)
    rows: list[dict[str, Any]] = []
    for group in training_groups(METHODS, "auto"):
        print(f"privacy_results: training {'+'.join(group.methods)} ({group.client_init} init)", flush=True)
        trained = train_group(setup, cfg, group, keep_start=True)
        for method in group.methods:
            mcfg = configured(dataclasses.replace(cfg, client_init=group.client_init), method, TAU)
            factors = AGGREGATORS[method].sent_factors(1)
            travelling = [
                list(privacy.factor_deltas(r.update.modules, r.start, factors).values()) for _, r in trained
            ]
            norms = [privacy.l2_norm(parts) for parts in travelling]
            coordinates = sum(p.numel() for p in travelling[0])
            del travelling
            clip = statistics.median(norms)
            plan = [(None, 0)] + [(z, d) for z in noise for d in range(2 if z in repeat else 1)]
            for z, draw in plan:
                # The round engine's close on the same uploads: each client's local DP step with
                # fresh noise, the aggregate, and what is released of it.
                dp = {} if z is None else {"dp_clip_norm": clip, "dp_noise_multiplier": z, "dp_delta": delta}
                outcome, server = close_configuration(
                    dataclasses.replace(mcfg, **dp), host.module_shapes, trained
                )
                evaluation = evaluate(host, tokenizer, server.final_adapter())
                rows.append(
                    {
                        "method": method,
                        "client_init": group.client_init,
                        "noise_multiplier": z,
                        "draw": draw,
                        "clip_norm": None if z is None else clip,
                        "upload_norms": norms,
                        "clipped": None if z is None else outcome.entry["privacy"]["clipped"],
                        "coordinates": coordinates,
                        "epsilon": None if z is None else outcome.entry["privacy"]["epsilon"],
                        "rank_total": int(
                            sum(outcome.entry["ranks"].values())
                        ),  # FLoRIST's τ reacts to noise
                        "eval": evaluation,
                    }
                )
                print(f"privacy_results: {method} z={z} draw {draw}: held-out loss "
                      f"{evaluation['heldout']['loss']:.4f}", flush=True)  # fmt: skip
    return {"base_eval": base, "rows": rows}


def analyse(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row's loss and CI, its paired difference to the base and to the same method without DP;
    FFA-LoRA's rows also to each other method at the same noise level and draw."""
    nodp = {r["method"]: r for r in raw["rows"] if r["noise_multiplier"] is None}
    same = {(r["method"], r["noise_multiplier"], r["draw"]): r for r in raw["rows"]}
    out = []
    for r in raw["rows"]:
        refs = {"base": raw["base_eval"]}
        if r["noise_multiplier"] is not None:
            refs["nodp"] = nodp[r["method"]]["eval"]
        if r["method"] == "ffa":
            for m in (m for m in METHODS if m != "ffa"):
                other = same.get((m, r["noise_multiplier"], r["draw"]))
                refs[m] = other["eval"] if other else None
        out.append({k: v for k, v in r.items() if k != "eval"} | heldout_comparison(r["eval"], refs))
    return out


def draw_spread(rows: list[dict[str, Any]]) -> dict[tuple[str, float], float]:
    """Per (method, repeated level): how much its loss moved between its two noise draws."""
    first = {(r["method"], r["noise_multiplier"]): r["heldout_loss"] for r in rows if r["draw"] == 0}
    return {
        (r["method"], r["noise_multiplier"]): abs(
            r["heldout_loss"] - first[(r["method"], r["noise_multiplier"])]
        )
        for r in rows
        if r["draw"] == 1
    }


def beyond_draws(d: float, spreads: list[float | None]) -> str:
    """The difference against the noise draws' spread: one method's against its own no-DP model,
    the sum of both methods' spreads between two noisy models (each draw can move either way)."""
    if any(x is None for x in spreads):
        return "; one noise draw at this level, so the draw's own spread is not measured"
    spread = float(sum(x for x in spreads if x is not None))
    what = (
        "spread between two noise draws" if len(spreads) == 1 else "sum of both methods' noise-draw spreads"
    )
    if abs(d) > spread:
        return f"; larger than the {spread:.4f}-nat {what}"
    return f"; within the {spread:.4f}-nat {what}, so not a conclusion"


def conclusions(rows: list[dict[str, Any]]) -> list[str]:
    """Per level: each method's damage (vs its own no-DP model), and FFA-LoRA against the others,
    each set against the spread of two noise draws on the same uploads."""
    lines = []
    spread = draw_spread(rows)
    by = {(r["method"], r["noise_multiplier"], r["draw"]): r for r in rows}
    levels = sorted({r["noise_multiplier"] for r in rows if r["noise_multiplier"] is not None})
    for z in levels:
        eps = next(r["epsilon"] for r in rows if r["noise_multiplier"] == z)
        for method in METHODS:
            row = by[(method, z, 0)]
            d = row["delta_vs_nodp"]
            lines.append(
                compare(d, row["delta_vs_nodp_ci95"], f"At z={z:g} (ε={eps:.3g}), {method_label(method)}",
                        "without DP") + beyond_draws(d, [spread.get((method, z))]) + "."
            )  # fmt: skip
        ffa = by[("ffa", z, 0)]
        for method in ("fedit", "flora", "florist"):
            d = ffa[f"delta_vs_{method}"]
            lines.append(compare(d, ffa[f"delta_vs_{method}_ci95"], f"At z={z:g}, FFA-LoRA", method_label(method))
                         + " (other uploads)" + beyond_draws(d, [spread.get(("ffa", z)), spread.get((method, z))])
                         + ".")  # fmt: skip
    ranks = {
        (r["noise_multiplier"], r["draw"]): r.get("rank_total") for r in rows if r["method"] == "florist"
    }
    if ranks.get((None, 0)) is not None:
        noisy = ", ".join(f"{ranks[(z, 0)]} at z={z:g}" for z in levels if ranks.get((z, 0)) is not None)
        lines.append(
            f"FLoRIST (τ={TAU}) keeps a global rank of {ranks[(None, 0)]} without DP and {noisy}: noise spreads "
            "the stack's energy over every direction, so the threshold keeps more of them and the download grows."
        )
    return lines


def plot(rows: list[dict[str, Any]], base_loss: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method and r["draw"] == 0 and r["epsilon"]),
                      key=lambda r: r["epsilon"])  # fmt: skip
        xs = [r["epsilon"] for r in mine]
        ys = [r["heldout_loss"] for r in mine]
        err = [[y - r["heldout_loss_ci95"][0] for y, r in zip(ys, mine)],
               [r["heldout_loss_ci95"][1] - y for y, r in zip(ys, mine)]]  # fmt: skip
        line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method_label(method))
        nodp = next(r for r in rows if r["method"] == method and r["noise_multiplier"] is None)
        ax.axhline(nodp["heldout_loss"], color=line[0].get_color(), linestyle=":", linewidth=1)
    ax.axhline(base_loss, color="black", linestyle="--", linewidth=1, label="base model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ε (δ = 1e-5, one round, client-level local DP)")
    ax.set_ylabel("held-out loss (nats); dotted: without DP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(doc: dict[str, Any], command: str, image: str) -> str:
    b = doc["budget"]
    coords = {r["method"]: r["coordinates"] for r in doc["rows"]}
    lines = [
        "# Held-out loss against ε under client-level local DP",
        "",
        f"Generated by `{command}` (do not edit by hand); the numbers are in privacy_results.json. "
        f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, {doc['date']}; wall time "
        f"{doc['wall_time_s'] / 60:.1f} min.",
        "",
        f"Setup: bench/results.py's ({b['records_per_client']} records and {b['steps']} steps of {b['batch']} "
        f"per client, learning rate {b['learning_rate']}, SmolLM2-135M, r = 16 on q_proj/v_proj, 8 Dolly "
        f"clients, one round, each method's default client init; FLoRIST at τ = {TAU}). Each client clips "
        "the factors it uploads, as one vector, to C and adds N(0, (zC)²) per coordinate; the server sees "
        f"only noised uploads. The vector has {coords.get('fedit', 0):,} coordinates ({coords.get('ffa', 0):,} "
        "for FFA-LoRA, which uploads B only). C is each method's median upload norm in this training (an "
        "oracle choice that favours utility; see the script). ε: dp-accounting RDP, add-or-remove one "
        f"client, δ = {doc['delta']:g}, one release per client. Intervals: 95% paired bootstrap over held-out "
        "records; they do not cover the noise draw's randomness, which the repeated draw shows.",
        "",
        f"![held-out loss against ε]({image})",
        "",
        "## What holds",
        "",
        *[f"- {c}" for c in doc["conclusions"]],
        "",
        "## Every configuration",
        "",
        "| method | z | ε | draw | C | uploads clipped | global rank | held-out loss [95% CI] | Δ vs same method without DP [95% CI] | Δ vs base [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
        f"| base model | | | | | | | {doc['base_heldout_loss']:.4f} | | |",
    ]
    for r in doc["rows"]:
        z = "no DP" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        clip = "" if r["clip_norm"] is None else f"{r['clip_norm']:.3g}"
        clipped = "" if r["clipped"] is None else f"{r['clipped']}/{len(r['upload_norms'])}"
        lo, hi = r["heldout_loss_ci95"]
        nodp = (
            ""
            if r.get("delta_vs_nodp") is None
            else f"{r['delta_vs_nodp']:+.4f} {fmt_ci(r['delta_vs_nodp_ci95'])}"
        )
        lines.append(
            f"| {method_label(r['method'])} | {z} | {eps} | {r['draw'] + 1} | {clip} | {clipped} | "
            f"{r.get('rank_total', '')} | "
            f"{r['heldout_loss']:.4f} [{lo:.4f}, {hi:.4f}] | {nodp} | "
            f"{r['delta_vs_base']:+.4f} {fmt_ci(r['delta_vs_base_ci95'])} |"
        )
    lines += [
        "",
        "Why local DP is this harsh here: the noise on one upload has norm about z·C·√d against a "
        "signal of norm at most C, with d near a million, and averaging 8 clients divides it by only "
        "about √8. A single-round ε below 10 needs z ≥ 0.5, where the noise is hundreds of times the "
        "signal. Central DP (the server noises the average with z·C/m, florist's `--dp_mode central` for "
        "the methods whose aggregate is linear in the uploads) divides the noise by m = 8 instead of "
        "√8; client-level DP needs many more clients than 8 before it leaves a useful update.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny budget; outputs under runs/ only")
    parser.add_argument("--render", action="store_true", help="only re-render from an existing run")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--noise", default=None, help="comma-separated noise multipliers z")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    kind = "smoke" if args.smoke else "full"
    budget = BUDGETS[kind]
    out = args.out or REPO / "runs" / f"privacy_results{'_smoke' if args.smoke else ''}"
    docs = out / "docs" if args.smoke else REPO / "docs"
    command = "python bench/privacy_results.py" + (" --smoke" if args.smoke else "")
    noise = [float(z) for z in args.noise.split(",")] if args.noise else NOISE[kind]
    out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        started = time.perf_counter()
        raw = run(out, budget, noise, REPEAT[kind], args.delta)
        raw |= {"machine": machine(), "budget": budget, "delta": args.delta,
                "wall_time_s": time.perf_counter() - started}  # fmt: skip
        atomic_write_json(out / "raw.json", raw)
    raw = json.loads((out / "raw.json").read_text())
    rows = analyse(raw)
    doc = {
        "command": command,
        "machine": raw["machine"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((out / "raw.json").stat().st_mtime)),
        "wall_time_s": raw["wall_time_s"],
        "budget": raw["budget"],
        "delta": raw["delta"],
        "base_heldout_loss": float(raw["base_eval"]["heldout"]["loss"]),
        "conclusions": conclusions(rows),
        "rows": rows,
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "img").mkdir(exist_ok=True)
    plot(rows, doc["base_heldout_loss"], docs / "img" / "privacy_epsilon.png")
    atomic_write_json(docs / "privacy_results.json", doc)
    atomic_write_text(docs / "privacy_results.md", markdown(doc, command, "img/privacy_epsilon.png"))
    print(f"privacy_results: wrote {docs / 'privacy_results.md'} ({doc['wall_time_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
