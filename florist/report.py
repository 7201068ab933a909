"""Plots and a Markdown report for a run directory (metrics.json) or a sweep directory (sweep.json).

``write_report(run_dir)`` renders four figures with matplotlib (object API, Agg canvas, so no
global pyplot state and no display needed) and a ``report.md`` embedding them:

* accuracy against communication (the paper's Eff and real bytes per client), Pareto front marked;
* cumulative σ² energy per module against rank, with τ and the chosen ranks marked;
* a heatmap of the broadcast rank per layer and module type;
* training-loss curves per client and round.

Everything goes to ``run_dir/report/``, written as one directory that appears whole or not at all.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from florist.errors import FloristError
from florist.io import atomic_directory

REPORT_DIR = "report"
MAX_CURVES = 9  # energy curves drawn individually; the rest are summarised by a band


def method_label(method: str, options: dict[str, Any] | None = None) -> str:
    """A method's label as it declares it (``Aggregator.describe``: "FLoRIST τ=0.90")."""
    from florist.aggregation import AGGREGATORS  # torch: only when a report is drawn

    cls = AGGREGATORS.get(method)
    return cls.describe(options) if cls is not None else method


def swept_option(method: str) -> str | None:
    """The option ``florist sweep`` runs a grid over for ``method`` (FLoRIST: threshold)."""
    from florist.aggregation import AGGREGATORS

    cls = AGGREGATORS.get(method)
    return cls.swept_option if cls is not None else None


METHOD_COLORS = {
    "fedit": "tab:orange",
    "zeropad": "tab:brown",
    "flora": "tab:green",
    "flexlora": "tab:purple",
    "ffa": "tab:red",
    "florist": "tab:blue",
    "fedex": "tab:pink",
    "fedsa": "tab:olive",
    "rolora": "tab:cyan",
    "hetlora": "tab:gray",
    "lorafair": "gold",
}


SCORE_SOURCES = ("auto", "mmlu", "heldout", "loss")
SCORE_NAMES = {
    "mmlu": "MMLU acc. (macro, %)",
    "heldout": "held-out token acc. (%)",
    "loss": "held-out loss (nats)",
}


class ReportError(FloristError, ValueError):
    """A run directory that cannot be reported on."""


# What reading a malformed metrics.json or sweep.json raises, reported as a ReportError.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


# --- small pure helpers (tested on hand-made numbers) -------------------------------------


def pareto_front(
    xs: Sequence[float], ys: Sequence[float], *, maximize_x: bool = True, maximize_y: bool = True
) -> list[int]:
    """Indices of the points no other point dominates, sorted by x.

    Point j dominates i when it is at least as good in both coordinates and strictly better in
    one. Identical points do not dominate each other, so both stay on the front. NaN points are
    never on the front.
    """
    if len(xs) != len(ys):
        raise ValueError(f"pareto_front: {len(xs)} x values but {len(ys)} y values")
    sx = 1.0 if maximize_x else -1.0
    sy = 1.0 if maximize_y else -1.0
    pts = [(sx * float(x), sy * float(y)) for x, y in zip(xs, ys)]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if math.isnan(xi) or math.isnan(yi):
            continue
        dominated = any(
            (xj >= xi and yj >= yi) and (xj > xi or yj > yi)
            for j, (xj, yj) in enumerate(pts)
            if j != i and not (math.isnan(xj) or math.isnan(yj))
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (float(xs[i]), float(ys[i])))


def cumulative_energy(singular_values: Sequence[float]) -> np.ndarray:
    """Σ_{i≤k} σ_i² / Σ σ² for k = 1..R (all zeros stay zero rather than NaN)."""
    s2 = np.square(np.asarray(singular_values, dtype=np.float64))
    total = s2.sum()
    return np.cumsum(s2) / total if total > 0 else np.zeros_like(s2)


def parse_module_name(name: str) -> tuple[int, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "q_proj"): the layer index and the module type."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return (int(m.group(1)) if m else 0), name.rsplit(".", 1)[-1]


def eval_score(evaluation: dict[str, Any] | None, prefer: str = "auto") -> tuple[str, float] | None:
    """The headline score of an evaluation dict, in percent, as (name, value); None if absent.

    ``prefer="auto"``: MMLU macro accuracy (the paper's number) when MMLU ran, else held-out
    response-token accuracy. ``"mmlu"`` or ``"heldout"``: only that one. ``"loss"``: the held-out
    loss in nats (not a percentage; lower is better).
    """
    if prefer not in SCORE_SOURCES:
        raise ValueError(f"score source must be one of {', '.join(SCORE_SOURCES)}, got {prefer!r}")
    if not evaluation:
        return None
    mmlu = evaluation.get("mmlu") or {}
    if prefer in ("auto", "mmlu") and mmlu.get("accuracy_macro") is not None:
        return SCORE_NAMES["mmlu"], 100.0 * float(mmlu["accuracy_macro"])
    heldout = evaluation.get("heldout") or {}
    if prefer == "loss":
        return (SCORE_NAMES["loss"], float(heldout["loss"])) if heldout.get("loss") is not None else None
    if prefer in ("auto", "heldout") and heldout.get("token_accuracy") is not None:
        return SCORE_NAMES["heldout"], 100.0 * float(heldout["token_accuracy"])
    return None


def per_client_bytes(communication: dict[str, Any]) -> tuple[float, float]:
    """Mean (bytes down, bytes up) per client from a florist.comm communication dict."""
    clients = communication.get("per_client") or communication.get("clients") or {}
    if isinstance(clients, dict) and clients:
        stats = list(clients.values())
        down = float(np.mean([float(c.get("bytes_down", 0)) for c in stats]))
        up = float(np.mean([float(c.get("bytes_up", 0)) for c in stats]))
        return down, up
    total = communication.get("total") or communication
    n = max(1, int(communication.get("num_clients", 1)))
    return float(total.get("bytes_down", 0)) / n, float(total.get("bytes_up", 0)) / n


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


# --- figures -----------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _accuracy_panels(
    fig: Figure,
    row: int,
    nrows: int,
    points: list[dict[str, Any]],
    *,
    title: str,
    score_name: str,
    base_score: float | None,
    higher_is_better: bool = True,
) -> None:
    """Two panels for one set of points: accuracy vs Eff (higher is better) and vs bytes (lower)."""
    panels = [
        ("eff_e4", "Eff ×10⁻⁴ (paper metric, higher = cheaper)", True),
        ("mb_per_client", "MB per client per run (down + up)", False),
    ]
    for col, (key, xlabel, maximize_x) in enumerate(panels):
        ax = fig.add_subplot(nrows, 2, 2 * row + col + 1)
        xs = [p[key] for p in points]
        ys = [p["accuracy"] for p in points]
        tau = sorted((p for p in points if p.get("series") == "tau"), key=lambda p: p[key])
        if tau:
            tx, ty = [p[key] for p in tau], [p["accuracy"] for p in tau]
            ax.plot(tx, ty, "-", color=METHOD_COLORS["florist"], alpha=0.35)
            ax.scatter(tx, ty, s=14, color=METHOD_COLORS["florist"], label="FLoRIST τ grid")
            for p in tau[:: max(1, len(tau) // 5)]:  # a few τ labels along the curve
                ax.annotate(
                    f"{p['tau']:.2f}",
                    (p[key], p["accuracy"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        for p in points:
            if p.get("series") == "tau":
                continue
            star = bool(p.get("highlight"))  # FLoRIST-O/-E; O drawn larger, as the two may coincide
            ax.scatter(
                [p[key]],
                [p["accuracy"]],
                marker="*" if star else None,
                s=(220 if p.get("color") == "gold" else 110) if star else 40,
                color=p.get("color", "gold") if star else METHOD_COLORS.get(p.get("method", ""), "tab:gray"),
                edgecolors="black" if star else None,
                linewidths=0.5 if star else None,
                label=p["label"],
                zorder=4 if star else 3,
            )
        front = pareto_front(xs, ys, maximize_x=maximize_x, maximize_y=higher_is_better)
        if front:
            fx, fy = [xs[i] for i in front], [ys[i] for i in front]
            ax.plot(fx, fy, "--", color="black", lw=0.8)
            ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", label="Pareto front", zorder=5)
        if base_score is not None:
            ax.axhline(base_score, color="grey", ls=":", label="base model")
        if len({x for x in xs if x > 0}) > 1 and max(xs) / max(min(x for x in xs if x > 0), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(score_name)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if col == 1:
            ax.legend(fontsize=7, loc="best")


def accuracy_figure(groups: list[dict[str, Any]], score_name: str, higher_is_better: bool = True) -> Figure:
    """groups: [{"title", "points": [{"label","accuracy","eff_e4","mb_per_client",...}], "base"}]."""
    fig = Figure(figsize=(11, 4.4 * len(groups)), layout="constrained")
    for row, g in enumerate(groups):
        _accuracy_panels(
            fig,
            row,
            len(groups),
            g["points"],
            title=g["title"],
            score_name=score_name,
            base_score=g.get("base"),
            higher_is_better=higher_is_better,
        )
    fig.suptitle(
        ("Accuracy" if higher_is_better else "Held-out loss") + " against communication", fontsize=12
    )
    return fig


def _representative(names: list[str]) -> list[str]:
    """First, middle and last layer of each module type (all modules when there are few)."""
    if len(names) <= MAX_CURVES:
        return names
    by_type: dict[str, list[str]] = {}
    for n in sorted(names, key=parse_module_name):
        by_type.setdefault(parse_module_name(n)[1], []).append(n)
    per_type = max(1, MAX_CURVES // len(by_type))
    chosen: list[str] = []
    for group in by_type.values():
        idx = np.unique(np.linspace(0, len(group) - 1, min(per_type, len(group))).round().astype(int))
        chosen += [group[i] for i in idx]
    return chosen[:MAX_CURVES]


def energy_figure(
    panels: list[dict[str, Any]],
) -> Figure:
    """panels: [{"title", "singular_values": {module: [σ]}, "marks": [(label, τ, {module: rank})]}]."""
    fig = Figure(figsize=(6.5 * len(panels), 4.8), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        curves = {m: cumulative_energy(s) for m, s in panel["singular_values"].items() if len(s) > 0}
        if not curves:
            ax.text(0.5, 0.5, "no singular values recorded", ha="center", transform=ax.transAxes)
            continue
        length = max(len(c) for c in curves.values())
        # Shorter curves have reached their full energy: pad with 1 so they can share the band.
        padded = np.stack(
            [np.concatenate([c, np.full(length - len(c), c[-1] if len(c) else 0.0)]) for c in curves.values()]
        )
        ks = np.arange(1, length + 1)
        if len(curves) > 1:
            ax.fill_between(
                ks,
                padded.min(0),
                padded.max(0),
                color="grey",
                alpha=0.2,
                label=f"all {len(curves)} modules (min–max)",
            )
            ax.plot(ks, np.median(padded, 0), color="grey", lw=1, ls="--", label="median")
        shown = _representative(sorted(curves))
        for name in shown:
            layer, kind = parse_module_name(name)
            ax.plot(np.arange(1, len(curves[name]) + 1), curves[name], lw=1.2, label=f"L{layer} {kind}")
        styles = ["-.", ":", "--"]
        for j, (label, tau, ranks) in enumerate(panel.get("marks", [])):
            ax.axhline(tau, color="black", ls=styles[j % len(styles)], lw=0.8, label=f"{label}: τ={tau:.2f}")
            pts = [
                (ranks[n], curves[n][ranks[n] - 1])
                for n in shown
                if n in ranks and 0 < ranks[n] <= len(curves[n])
            ]
            if pts:
                ax.scatter(*zip(*pts), marker="x", color="black", s=30, zorder=5)
        ax.set_xlabel("rank k")
        ax.set_ylabel("cumulative σ² energy")
        ax.set_ylim(0, 1.02)
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("σ² energy of the aggregated update per module (× = chosen rank)", fontsize=12)
    return fig


def rank_grid(ranks: dict[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """Layers × module types matrix of ranks (NaN where a module is absent)."""
    parsed = {name: parse_module_name(name) for name in ranks}
    layers = sorted({p[0] for p in parsed.values()})
    kinds = sorted({p[1] for p in parsed.values()})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for name, (layer, kind) in parsed.items():
        grid[layers.index(layer), kinds.index(kind)] = ranks[name]
    return grid, layers, kinds


def heatmap_figure(panels: list[tuple[str, dict[str, int]]]) -> Figure:
    n = len(panels)
    height = max(3.0, 0.22 * max(len(rank_grid(r)[1]) for _, r in panels) + 1.5)
    fig = Figure(figsize=(max(3.2 * n, 4.5), height), layout="constrained")
    vmax = max(max(r.values()) for _, r in panels)
    for i, (title, ranks) in enumerate(panels):
        grid, layers, kinds = rank_grid(ranks)
        ax = fig.add_subplot(1, n, i + 1)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, origin="lower")
        ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
        step = max(1, len(layers) // 16)
        ax.set_yticks(
            range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)], fontsize=7
        )
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}\n(total {int(sum(ranks.values()))})", fontsize=9)
        if grid.size <= 240:
            for (y, x), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(x, y, f"{int(v)}", ha="center", va="center", fontsize=6, color="white")
        fig.colorbar(im, ax=ax, shrink=0.8, label="rank")
    fig.suptitle("Broadcast rank per layer and module", fontsize=12)
    return fig


def loss_figure(groups: list[tuple[str, list[dict[str, Any]]]]) -> Figure:
    """groups: [(title, rounds)] where rounds are metrics.json rounds (round, client_stats)."""
    fig = Figure(figsize=(7 * len(groups), 4.5), layout="constrained")
    for i, (title, rounds) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        # x = (round - 1) + progress within the round, so round boundaries line up across clients
        # whatever their number of steps.
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in rounds:
            rnd = int(r["round"])
            for cid, stats in (r.get("client_stats") or {}).items():
                losses = list(stats.get("losses") or [])
                xs, ys = series.setdefault(str(cid), ([], []))
                if xs:  # break the line between rounds
                    xs.append(math.nan)
                    ys.append(math.nan)
                xs += [rnd - 1 + (j + 1) / len(losses) for j in range(len(losses))]
                ys += [float(v) for v in losses]
        for cid in sorted(series, key=lambda c: (len(c), c)):  # client_2 before client_10
            xs, ys = series[cid]
            label = cid if cid.startswith("client") else f"client {cid}"
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None, lw=1, label=label)
        for rnd in range(1, len(rounds)):
            ax.axvline(rnd, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("round (steps spread over each round)")
        ax.set_ylabel("training loss")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.text(0.5, 0.5, "no losses recorded", ha="center", transform=ax.transAxes)
    fig.suptitle("Local training loss per client", fontsize=12)
    return fig


# --- learning curves over rounds ------------------------------------------------------------


def curve_points(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's held-out loss at every evaluated round (round 0: the base model), with its 95%
    bootstrap interval over records and the mean MB each client has downloaded by then; every
    point on the records all of them scored (eval_every_samples scores fewer before the last)."""
    from florist.stats import bootstrap_ci, heldout_records, on_common_records

    points = []
    evaluated = [(0, 0.0, metrics.get("eval_before"))] + [
        (
            int(r["round"]),
            (r.get("cumulative") or {}).get("bytes_down_per_client", math.nan) / 1e6,
            r.get("eval"),
        )
        for r in metrics.get("rounds") or []
    ]
    evaluated = [(rnd, mb, e) for rnd, mb, e in evaluated if (e or {}).get("heldout")]
    common = on_common_records([e for _, _, e in evaluated]) if evaluated else []
    for (rnd, mb, _), evaluation in zip(evaluated, common):
        heldout = evaluation["heldout"]
        losses, tokens = heldout_records(evaluation)
        ci = list(bootstrap_ci(losses, tokens)) if tokens else [math.nan, math.nan]
        points.append({"round": rnd, "mb_down_per_client": mb, "loss": float(heldout["loss"]), "ci95": ci})
    return points


def learning_curve_figure(runs: list[tuple[str, dict[str, Any]]]) -> Figure:
    """Held-out loss against rounds and against MB downloaded per client, one line per run, with
    95% intervals at the evaluated rounds; the global rank each round in its own panel (FLoRIST's
    kept rank moves with the round; the other methods' is fixed by their ranks)."""
    fig = Figure(figsize=(17, 4.8), layout="constrained")
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for label, metrics in runs:
        method = str(metrics.get("method"))
        color = METHOD_COLORS.get(method)
        points = curve_points(metrics)
        for ax, key in zip(axes[:2], ("round", "mb_down_per_client")):
            xs = [p[key] for p in points]
            ys = [p["loss"] for p in points]
            err = [[p["loss"] - p["ci95"][0] for p in points], [p["ci95"][1] - p["loss"] for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, lw=1, color=color, label=label)
        rounds = metrics.get("rounds") or []
        axes[2].plot(
            [r["round"] for r in rounds],
            [sum(r["ranks"].values()) for r in rounds],
            marker=".",
            color=color,
            label=label,
        )
    titles = [("round", "held-out loss (nats)"), ("MB downloaded per client (cumulative)", "held-out loss (nats)"),
              ("round", "global rank (Σ over modules)")]  # fmt: skip
    for ax, (xlabel, ylabel) in zip(axes, titles):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Learning curves: held-out loss over rounds and bytes (95% intervals over records)", fontsize=12
    )
    return fig


def _run_options(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """A run's value of its method's swept option (FLoRIST: {"threshold": τ}); None without one."""
    option = swept_option(str(metrics.get("method", "?")))
    return {option: (metrics.get("config") or {}).get(option, metrics.get("threshold"))} if option else None


def run_label(metrics: dict[str, Any]) -> str:
    return method_label(str(metrics.get("method", "?")), _run_options(metrics))


def write_curves_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Learning curves of several runs in one report (``florist report RUN RUN ... --out DIR``):
    the figure and a table of every evaluated round. Runs of one configuration (seeds) are told
    apart by their directory names."""
    dirs = [Path(d) for d in run_dirs]
    loaded = [_load_json(d / "metrics.json") for d in dirs]
    labels = [run_label(m) for m in loaded]
    labels = [f"{lab} ({d.name})" if labels.count(lab) > 1 else lab for lab, d in zip(labels, dirs)]
    md = [
        "# Learning curves",
        "",
        "| run | round | MB down / client | held-out loss | 95% CI |",
        "|---|---|---|---|---|",
    ]
    try:
        for label, metrics in zip(labels, loaded):
            for pt in curve_points(metrics):
                lo, hi = pt["ci95"]
                md.append(
                    f"| {label} | {pt['round']} | {pt['mb_down_per_client']:.2f} | {pt['loss']:.4f} | [{lo:.4f}, {hi:.4f}] |"
                )
        figures = {"learning_curves.png": _png(learning_curve_figure(list(zip(labels, loaded))))}
    except MALFORMED as e:
        raise ReportError(
            f"malformed run metrics among {', '.join(map(str, dirs))} ({type(e).__name__}: {e})"
        ) from None
    return _write(Path(out_dir), figures, md + [""], "the runs' metrics.json")


# --- run directories ---------------------------------------------------------------------


def _run_report(metrics: dict[str, Any]) -> tuple[dict[str, bytes], list[str]]:
    rounds = list(metrics.get("rounds") or [])
    options = _run_options(metrics)
    label = run_label(metrics)
    figures: dict[str, bytes] = {}
    md = [f"# Report: {label} on {metrics.get('model', '?')}", ""]
    md += [
        f"{len(rounds)} round(s); clients per round: "
        + ", ".join(str(len(r.get("clients", []))) for r in rounds),
        "",
    ]

    after = eval_score(metrics.get("eval_after"))
    before = eval_score(metrics.get("eval_before"))
    if rounds:
        md += [
            "| round | clients | broadcast rank (Σ modules) | Eff ×10⁻⁴ | bytes down / client | bytes up / client |",
            "|---|---|---|---|---|---|",
        ]
        for r in rounds:
            down, up = per_client_bytes(r.get("communication") or {})
            md.append(
                f"| {r['round']} | {len(r.get('clients', []))} | {sum((r.get('ranks') or {}).values())} | "
                f"{1e4 * float(r.get('eff', 0)):.2f} | {human_bytes(down)} | {human_bytes(up)} |"
            )
        md.append("")
    dp = metrics.get("privacy")
    if dp:

        def eps(e: float | None) -> str:  # null: infinite, with its reason beside it (florist.io)
            return "∞" if e is None else f"{e:.3g}"

        per_round = ", ".join(eps(e) for e in dp.get("epsilon_per_round") or [])
        md += [
            f"Differential privacy ({dp['mode']}, florist.privacy): ε = {eps(dp['epsilon'])} at "
            f"δ = {dp['delta']:g} for the run (after each round: {per_round}); clip norm C = "
            f"{dp['clip_norm']:g}, noise multiplier z = {dp['noise_multiplier']:g}.",
            "",
        ]
    if before or after:
        md += ["| model | score |", "|---|---|"]
        if before:
            md.append(f"| base | {before[1]:.2f} ({before[0]}) |")
        if after:
            md.append(f"| federated | {after[1]:.2f} ({after[0]}) |")
        md.append("")

    if after and rounds:
        downs_ups = [per_client_bytes(r.get("communication") or {}) for r in rounds]
        point = {
            "label": label,
            "accuracy": after[1],
            "eff_e4": 1e4 * float(metrics.get("eff_total") or rounds[-1].get("eff", 0)),
            "mb_per_client": sum(d + u for d, u in downs_ups) / 1e6,
            "highlight": True,
        }
        fig = accuracy_figure(
            [{"title": label, "points": [point], "base": before[1] if before else None}], after[0]
        )
        figures["accuracy_vs_communication.png"] = _png(fig)

    svd_rounds = [r for r in rounds if r.get("singular_values")]
    if svd_rounds:
        r = svd_rounds[-1]
        value = next(iter(options.values())) if options else None
        marks = [(label, float(value), r.get("ranks") or {})] if value is not None else []
        panel = {"title": f"round {r['round']}", "singular_values": r["singular_values"], "marks": marks}
        figures["energy_curves.png"] = _png(energy_figure([panel]))

    rank_rounds = [r for r in rounds if r.get("ranks")][-4:]
    if rank_rounds:
        figures["rank_heatmap.png"] = _png(
            heatmap_figure([(f"round {r['round']}", r["ranks"]) for r in rank_rounds])
        )
    if any(r.get("client_stats") for r in rounds):
        figures["loss_curves.png"] = _png(loss_figure([(label, rounds)]))
    if sum(1 for r in rounds if (r.get("eval") or {}).get("heldout")) >= 1:  # eval_every
        figures["learning_curves.png"] = _png(learning_curve_figure([(label, metrics)]))
    return figures, md


# --- sweep directories -------------------------------------------------------------------


def _sweep_point(row: dict[str, Any], label: str, **extra: Any) -> dict[str, Any]:
    """A sweep row as a point of the accuracy figure."""
    mb = (float(row["bytes_down_per_client"]) + float(row["bytes_up_per_client"])) / 1e6
    return {
        "label": label,
        "accuracy": float(row["accuracy"]),
        "eff_e4": 1e4 * float(row["eff"]),
        "mb_per_client": mb,
        **extra,
    }


def _sweep_report(sweep: dict[str, Any]) -> tuple[dict[str, bytes], list[str]]:
    settings = list(sweep.get("settings") or [])
    score_name = (sweep.get("score") or {}).get("name", "accuracy (%)")
    md = [f"# Sweep report: {sweep.get('model', '?')}", ""]
    if sweep.get("note"):
        md += [str(sweep["note"]), ""]
    groups, energy_panels, heat_panels, loss_groups = [], [], [], []
    for s in settings:
        name = str(s.get("name", "setting"))
        rows = [r for r in s.get("rows", []) if r.get("accuracy") is not None]
        points = [
            _sweep_point(
                r,
                r.get("label", r.get("method")),
                method=r.get("method"),
                tau=r.get("threshold"),
                series="tau" if swept_option(str(r.get("method"))) is not None else "method",
            )
            for r in rows
        ]
        points += [
            _sweep_point(
                s[key],
                f"FLoRIST-{key[-1].upper()} (τ={float(s[key]['threshold']):.2f})",
                highlight=True,
                color="gold" if key == "florist_o" else "cyan",
            )
            for key in ("florist_o", "florist_e")
            if s.get(key)
        ]
        base = eval_score(s.get("base_eval"), prefer=(sweep.get("score") or {}).get("source", "auto"))
        if points:
            groups.append({"title": name, "points": points, "base": base[1] if base else None})
        marks = [
            (f"FLoRIST-{k[-1].upper()}", float(s[k]["threshold"]), s[k].get("ranks") or {})
            for k in ("florist_o", "florist_e")
            if s.get(k)
        ]
        if s.get("singular_values"):
            energy_panels.append({"title": name, "singular_values": s["singular_values"], "marks": marks})
        heat_panels += [(f"{name}: {label}", ranks) for label, _tau, ranks in marks if ranks]
        if s.get("training_rounds"):
            loss_groups.append((name, s["training_rounds"]))
        if s.get("table_markdown"):
            md += [f"## {name}", "", s["table_markdown"], ""]
    figures: dict[str, bytes] = {}
    if groups:
        higher = bool((sweep.get("score") or {}).get("higher_is_better", True))
        figures["accuracy_vs_communication.png"] = _png(accuracy_figure(groups, score_name, higher))
    if energy_panels:
        figures["energy_curves.png"] = _png(energy_figure(energy_panels))
    if heat_panels:
        figures["rank_heatmap.png"] = _png(heatmap_figure(heat_panels))
    if loss_groups:
        figures["loss_curves.png"] = _png(loss_figure(loss_groups))
    return figures, md


# --- entry point -------------------------------------------------------------------------

CAPTIONS = {
    "accuracy_vs_communication.png": "Accuracy against communication; the dashed line and circles mark the Pareto front.",
    "energy_curves.png": "Cumulative σ² energy against rank; horizontal lines are τ, crosses the rank chosen per module.",
    "rank_heatmap.png": "Broadcast rank per layer (rows) and module type (columns).",
    "loss_curves.png": "Training loss per optimizer step, per client; dotted lines separate rounds.",
    "learning_curves.png": "Held-out loss at the evaluated rounds (round 0: the base model) against rounds and "
    "against MB downloaded per client, with 95% bootstrap intervals over records; global rank per round.",
}


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object at the top level")
    return data


def write_report(run_dir: str | Path, *, out_dir: str | Path | None = None) -> Path:
    """Render the plots and report.md for a run or sweep directory; return the report.md path.

    A directory with sweep.json is reported as a sweep, otherwise metrics.json as a single run.
    The report directory (default ``run_dir/report``) is replaced atomically.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    kinds = [("sweep.json", "sweep results", _sweep_report), ("metrics.json", "run metrics", _run_report)]
    found = [(run_dir / name, what, report) for name, what, report in kinds if (run_dir / name).is_file()]
    if not found:
        raise ReportError(f"{run_dir}: neither metrics.json (a run) nor sweep.json (a sweep) found")
    source, what, report = found[0]
    try:
        figures, md = report(_load_json(source))
    except MALFORMED as e:
        raise ReportError(f"{source}: malformed {what} ({type(e).__name__}: {e})") from None

    return _write(
        Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR, figures, md, f"`{source.name}`"
    )


def _write(out: Path, figures: dict[str, bytes], md: list[str], source: str) -> Path:
    md += [f"_Generated from {source}._", ""]
    for name in figures:
        md += [f"![{name[:-4]}]({name})", "", f"*{CAPTIONS[name]}*", ""]
    if not figures:
        md += ["No figures: the source has no evaluation, singular values, ranks or losses.", ""]
    with atomic_directory(out) as tmp:
        for name, data in figures.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.md").write_text("\n".join(md))
    return out / "report.md"
