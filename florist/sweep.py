"""One local training, many aggregations: the paper's comparison table in one command.

In round 1 every method starts from the same base model, and a client's training depends on the
method only through two declarations of the method (``florist.aggregation``): how the clients
draw their fresh LoRA (``client_init``: one init shared by the round, or one per client) and
whether A is frozen (FFA-LoRA). So for a one-round sweep the clients are trained ONCE per
training group, a distinct (rank setting, client init, frozen A), and the very same client
adapters are aggregated by every method and every τ of that group. With the methods' defaults
(the authors' code) and both rank settings that is:

* homogeneous ranks (``lora_r``): per-client inits for FLoRA, FlexLoRA, FLoRIST(τ); one shared
  init for FedIT; FFA-LoRA's frozen shared A;
* heterogeneous ranks (``local_ranks``): per-client inits for zero-padding, FLoRA, FlexLoRA,
  FLoRIST(τ); FFA-LoRA.

``client_init`` overrides the defaults: "shared" or "per_client" for every method that allows
it (FFA-LoRA's A is shared by construction), or "both" to run every method under each init it
allows, e.g. FLoRIST with shared and with per-client inits, which the paper never compares.

Every configuration's round is closed by the round engine exactly as round 1 of ``florist run``
(``florist.rounds.close_round``: screening, aggregation, ``for_round``, under DP the released view,
communication, broadcast), so its row's ranks, Eff and bytes are that run's round record, and its
global adapter is the one that run writes as adapter/ (``ServerState.final_adapter``). Each is
evaluated on base + adapter without merging (``LoraHost.use_adapter``), which is what the clients
of the merge methods (FLoRA, FLoRIST) hold after the round. What that adapter is per method:

* FedIT, zero-padding, FFA-LoRA: the broadcast global adapter (zero-padding: at rank r_max);
* FlexLoRA broadcasts one truncation per client; we evaluate the rank-r_max truncation of the
  dense average (the largest client's adapter, the same one ``florist run`` writes as adapter/);
* FLoRA, FLoRIST: the broadcast adapter (rank Σr_k and p(τ));
* FedEx-LoRA: the residual stacked with (B̄, Ā), the exact total the clients hold;
* FedSA-LoRA: its global view, the average of the clients' updates; and, as ``florist run``
  does, each client's own model (base + s_k B_k Ā) on its own held-out records, under
  ``eval_personal`` (florist.personalised);
* RoLoRA, HetLoRA (at rank r_max), LoRA-FAIR: the broadcast adapter.

With more than one round the methods diverge after round 1, so every configuration is trained
separately with ``florist.federation.run_federated`` (the output says so).

FLoRIST-O is the τ with the best score (ties: higher Eff, then smaller τ). FLoRIST-E is the τ
with the highest Eff whose score is within ``e_tolerance`` of FLoRIST-O's (ties: better score,
then smaller τ). The score is MMLU macro accuracy in percent when MMLU was evaluated, otherwise
held-out response-token accuracy in percent, or with ``select_by="loss"`` the held-out loss in
nats (lower is better), the sensitive choice when MMLU sits near chance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from florist import privacy
from florist.adapters import write_peft_adapter
from florist.aggregation import AGGREGATORS, Aggregator
from florist.config import METHODS, NEWER_METHODS, ConfigError, RunConfig
from florist.evaluation.evaluator import Evaluator, find_mmlu_file
from florist.federation import ClientSetup
from florist.io import atomic_directory, atomic_write_json, atomic_write_text, output_lock
from florist.progress import bar_disabled
from florist.report import SCORE_NAMES, SCORE_SOURCES, eval_score, human_bytes, per_client_bytes
from florist.rounds import (
    ClientTask,
    Method,
    RoundOutcome,
    ServerState,
    client_stats,
    close_simulated,
    train_clients,
)

# The paper's methods (the default), then those published after it (florist.config.NEWER_METHODS).
PAPER_METHODS = METHODS
SWEEP_METHODS = (*PAPER_METHODS, *NEWER_METHODS)
# Zero-padding is FedIT for mixed ranks: with one rank it would repeat FedIT's row.
HOMOGENEOUS_METHODS = tuple(m for m in SWEEP_METHODS if m != "zeropad")
# Where a method declares no rule for mixed ranks it sits out the heterogeneous setting.
HETEROGENEOUS_METHODS = tuple(m for m in SWEEP_METHODS if AGGREGATORS[m].supports_heterogeneous)
DEFAULT_THRESHOLDS = "0.80:1.00:0.01"
MAX_GRID = 1000  # τ values: each is one aggregation and one evaluation
SWEEP_CLIENT_INITS = ("auto", "shared", "per_client", "both")
DEFAULT_LOSS_TOLERANCE = 0.005  # nats: FLoRIST-E's allowance when τ is chosen on held-out loss
ModelFactory = Callable[[], tuple[Any, Any]]


# --- parsing -----------------------------------------------------------------------------


def parse_thresholds(spec: str | Sequence[float]) -> list[float]:
    """Sorted unique τ values from "0.80:1.00:0.01" (an inclusive grid), "0.8,0.9,1" or a list."""
    values = [float(v) for v in spec] if not isinstance(spec, str) else []
    if isinstance(spec, str):
        text = spec.strip()
        pieces = text.split(":") if ":" in text else [p for p in text.split(",") if p.strip()]
        try:
            values = [float(p) for p in pieces]
        except ValueError:
            values = []
        if (":" in text and len(values) != 3) or len(values) != len(pieces):
            raise ConfigError(f"thresholds {spec!r}: expected START:STOP:STEP or a comma-separated list")
        if ":" in text:
            values = _grid(spec, *values)
    if not values:
        raise ConfigError("thresholds: the grid is empty")
    if len(values) > MAX_GRID:
        raise ConfigError(f"thresholds: {len(values)} values; at most {MAX_GRID}")
    bad = [v for v in values if not (0.0 < v <= 1.0)]
    if bad:
        raise ConfigError(f"thresholds must lie in (0, 1], got {bad}")
    return sorted(set(values))


def _grid(spec: str, start: float, stop: float, step: float) -> list[float]:
    if not all(math.isfinite(p) for p in (start, stop, step)):
        raise ConfigError(f"thresholds {spec!r}: START, STOP and STEP must be finite numbers")
    if step <= 0 or stop < start:
        raise ConfigError(f"thresholds {spec!r}: need start <= stop and a positive step")
    n = math.floor((stop - start) / step + 1e-9)
    if n + 1 > MAX_GRID:  # refused before the grid is built, not after
        raise ConfigError(
            f"thresholds {spec!r}: a grid of {n + 1:.3g} values; at most {MAX_GRID} (use a larger STEP)"
        )
    return [round(start + i * step, 10) for i in range(n + 1)]


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Methods from "fedit,florist" or a list; "all" is every method, new ones included."""
    if isinstance(spec, str) and spec.strip() == "all":
        return list(SWEEP_METHODS)
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in SWEEP_METHODS]
    if unknown or not names:
        raise ConfigError(f"methods must be a subset of {','.join(SWEEP_METHODS)}, got {spec!r}")
    return [m for m in SWEEP_METHODS if m in names]  # the paper's table order


# --- FLoRIST-O / -E and the table -----------------------------------------------------------


def swept(method: str) -> bool:
    """Whether ``method`` declares an option the sweep runs a grid over (FLoRIST's τ)."""
    return AGGREGATORS[method].swept_option is not None


def select_florist(
    rows: Sequence[dict[str, Any]], *, e_tolerance: float = 1.0, higher_is_better: bool = True
) -> tuple[dict, dict] | None:
    """(FLoRIST-O, FLoRIST-E) among per-τ rows with "threshold", "accuracy" (the score) and "eff".

    The score is an accuracy in % (higher is better) or a loss (``higher_is_better=False``).
    None when no row has a score (evaluation was off).
    """
    if e_tolerance < 0:
        raise ValueError(f"e_tolerance must be >= 0, got {e_tolerance}")
    sign = 1.0 if higher_is_better else -1.0
    scored = [r for r in rows if r.get("accuracy") is not None and not math.isnan(float(r["accuracy"]))]
    if not scored:
        return None

    def good(r: dict[str, Any]) -> float:
        return sign * float(r["accuracy"])

    best = max(scored, key=lambda r: (good(r), float(r["eff"]), -float(r["threshold"])))
    eligible = [r for r in scored if good(r) >= good(best) - float(e_tolerance) - 1e-9]
    efficient = max(eligible, key=lambda r: (float(r["eff"]), good(r), -float(r["threshold"])))
    return best, efficient


def setting_table(setting: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper-style rows of one rank setting: every baseline, then FLoRIST-O and FLoRIST-E."""

    def init_note(row: dict[str, Any]) -> str:  # " (shared init)" when the method ran under both
        label = str(row.get("label", ""))
        return label[label.rindex(" (") :] if label.endswith(" init)") else ""

    table = [
        dict(r, name=AGGREGATORS[r["method"]].label + init_note(r))
        for r in setting["rows"]
        if not swept(r["method"])
    ]
    for key, suffix in (("florist_o", "O"), ("florist_e", "E")):
        if setting.get(key):
            label = AGGREGATORS[setting[key]["method"]].label
            table.append(dict(setting[key], name=f"{label}-{suffix}" + init_note(setting[key])))
    if not setting.get("florist_o"):  # no evaluation: list the τ grid instead
        table += [dict(r, name=r["label"]) for r in setting["rows"] if swept(r["method"])]
    return table


def table_markdown(
    table: Sequence[dict[str, Any]], *, score_source: str = "auto", base: dict[str, Any] | None = None
) -> str:
    has_loss = any((r.get("eval") or {}).get("heldout") for r in table)
    score_name = SCORE_NAMES.get(score_source, "accuracy (%)")
    head = ["method", "τ", score_name, "Eff ×10⁻⁴", "Σ rank", "down / client", "up / client"]
    head += ["held-out loss"] if has_loss else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt_acc(v: Any) -> str:
        return "—" if v is None else f"{float(v):.4f}" if score_source == "loss" else f"{float(v):.2f}"

    def line(cells: list[str], heldout: dict[str, Any] | None) -> str:
        cells += [f"{heldout['loss']:.4f}" if heldout else "—"] if has_loss else []
        return "| " + " | ".join(cells) + " |"

    if base is not None:
        score = (eval_score(base, score_source) or (None, None))[1]
        lines.append(line(["base model", "", fmt_acc(score), *[""] * 4], base.get("heldout")))
    for r in table:
        tau = f"{float(r['threshold']):.2f}" if r.get("threshold") is not None else ""
        cells = [
            r["name"],
            tau,
            fmt_acc(r.get("accuracy")),
            f"{1e4 * float(r['eff']):.2f}",
            str(r["rank_total"]),
            human_bytes(float(r["bytes_down_per_client"])),
            human_bytes(float(r["bytes_up_per_client"])),
        ]
        lines.append(line(cells, (r.get("eval") or {}).get("heldout")))
    return "\n".join(lines)


def finish_setting(
    setting: dict[str, Any], *, e_tolerance: float, score_source: str = "auto"
) -> dict[str, Any]:
    """Score every row, select FLoRIST-O/-E, build the table and its Markdown (in place)."""
    for r in setting["rows"]:
        if r.get("eval") is not None or "accuracy" not in r:
            score = eval_score(r.get("eval"), score_source)
            r["accuracy"] = score[1] if score else None
    picked = select_florist(
        [r for r in setting["rows"] if swept(r["method"])],
        e_tolerance=e_tolerance,
        higher_is_better=score_source != "loss",
    )
    setting["florist_o"], setting["florist_e"] = picked if picked else (None, None)
    setting["table"] = setting_table(setting)
    setting["table_markdown"] = table_markdown(
        setting["table"], score_source=score_source, base=setting.get("base_eval")
    )
    return setting


# --- one configuration: its config, its row ----------------------------------------------------


def configurations(methods: Sequence[str], grid: Sequence[float]) -> list[tuple[str, float | None]]:
    """(method, value of its swept option) for every method, every value of the grid where it
    declares a swept option (FLoRIST's τ) and None otherwise."""
    return [(m, v) for m in methods for v in (grid if AGGREGATORS[m].swept_option else [None])]


def configured(cfg: RunConfig, method: str, value: float | None) -> RunConfig:
    """``cfg`` for one configuration: its method and, where it has one, its swept option's value."""
    option = AGGREGATORS[method].swept_option
    return dataclasses.replace(
        cfg, method=method, **({option: value} if option and value is not None else {})
    )


def row_label(method: str, value: float | None) -> str:
    option = AGGREGATORS[method].swept_option
    return AGGREGATORS[method].describe({option: value} if option and value is not None else {})


def make_row(
    method: str, value: float | None, entry: dict[str, Any], evaluation: dict[str, Any] | None
) -> dict[str, Any]:
    """A configuration's row of sweep.json, from its round record (``florist.rounds.close_round``)."""
    comm = entry["communication"]
    down, up = per_client_bytes(comm)
    return {
        "method": method,
        "label": row_label(method, value),
        "threshold": value,
        "accuracy": None,  # set by finish_setting from "eval"
        "eval": evaluation,
        "eff": entry["eff"],
        "rank_total": int(sum(entry["ranks"].values())),
        "ranks": dict(entry["ranks"]),
        "bytes_down_per_client": down,
        "bytes_up_per_client": up,
        # Per-client and total counts; the per-module breakdown is left out to keep sweep.json small.
        "communication": {k: v for k, v in comm.items() if k != "modules"},
        "aggregation_seconds": entry["aggregation_seconds"],
    }


# --- the one-round engine ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingGroup:
    """Clients trained once and aggregated by every method of the group."""

    client_init: str  # shared | per_client
    frozen_A: bool  # FFA-LoRA
    methods: tuple[str, ...]
    # The methods' Aggregator.training_kind(): e.g. RoLoRA trains A alone from its own start.
    kind: tuple[object, ...] = ()


def training_groups(methods: Sequence[str], client_init: str = "auto") -> list[TrainingGroup]:
    """The distinct trainings the methods need under ``client_init`` (auto | shared | per_client | both)."""
    if client_init not in SWEEP_CLIENT_INITS:
        raise ConfigError(f"client_init must be one of {', '.join(SWEEP_CLIENT_INITS)}, got {client_init!r}")
    groups: dict[tuple[str, tuple[object, ...]], list[str]] = {}
    for method in methods:
        cls = AGGREGATORS[method]
        if client_init == "both":
            inits = list(cls.client_inits)
        elif client_init in cls.client_inits:
            inits = [client_init]
        else:  # "auto", or an override the method cannot take (FFA-LoRA's shared A)
            inits = [cls.client_init]
        for init in inits:
            groups.setdefault((init, cls.training_kind()), []).append(method)
    # per-client inits first, then shared ones; the ordinary training before FFA's and RoLoRA's
    ordinary = Aggregator.training_kind()
    order = sorted(groups, key=lambda key: (key[1] != ordinary, key[1][0], key[0] != "per_client"))
    return [TrainingGroup(init, bool(kind[0]), tuple(groups[(init, kind)]), kind) for init, kind in order]


def init_overrides(methods: Sequence[str], client_init: str) -> dict[str, str]:
    """Per method whose client init is not the one asked for (``florist run`` would refuse it):
    which init it trains with, and why."""
    if client_init in ("auto", "both"):
        return {}
    out = {}
    for method in methods:
        cls = AGGREGATORS[method]
        if client_init not in cls.client_inits:
            out[method] = (
                f"{method} trains with {cls.client_init} inits: client_init {client_init} does not apply, "
                "its frozen factor is shared by every client"
            )
    return out


Trained = list[tuple[ClientTask, Any]]  # each sampled client's task and ClientResult


def train_group(
    setup: ClientSetup,
    cfg: RunConfig,
    group: TrainingGroup,
    *,
    keep_start: bool = False,
    progress: bool = True,
) -> Trained:
    """Round 1 of `florist run` for every sampled client, once for the whole ``group``: the
    round engine's plan, start and training under the group's first method and client init."""
    gcfg = dataclasses.replace(cfg, method=group.methods[0], client_init=group.client_init)
    method = Method(gcfg, setup.host.module_shapes)
    desc = f"training clients ({'frozen A, ' if group.frozen_A else ''}{group.client_init} init)"
    bar = None if progress else False
    return train_clients(setup, method, ServerState(), 1, keep_start=keep_start, desc=desc, progress=bar)


def close_configuration(
    cfg: RunConfig, shapes: dict[str, tuple[int, int]], trained: Trained
) -> tuple[RoundOutcome, ServerState]:
    """Round 1 of `florist run` under ``cfg`` from clients already trained: the round engine's
    close of a simulated round. The outcome and the server it leaves behind."""
    server = ServerState()
    return close_simulated(Method(cfg, shapes), server, 1, trained), server


def _setting_plans(
    cfg: RunConfig, heter: Sequence[bool], methods: Sequence[str], client_init: str
) -> list[tuple[str, RunConfig, list[TrainingGroup], dict[str, set[str]]]]:
    """Each rank setting: its name, config, training groups and the client inits of each method."""
    out = []
    for h in heter:
        c = dataclasses.replace(cfg, heter=h)
        ranks = [c.client_rank(k) for k in range(c.num_clients)]
        name = f"heterogeneous (ranks {','.join(map(str, ranks))})" if h else f"homogeneous (r={c.lora_r})"
        allowed = HETEROGENEOUS_METHODS if h else HOMOGENEOUS_METHODS
        plan = training_groups([m for m in methods if m in allowed], client_init)
        out.append((name, c, plan, {m: {g.client_init for g in plan if m in g.methods} for m in methods}))
    return out


def _with_init(row: dict[str, Any], init: str, both: bool) -> dict[str, Any]:
    """``row`` of a method trained under ``init``; its label says so when it ran under both."""
    row["client_init"] = init
    if both:
        row["label"] += f" ({init.replace('_', '-')} init)"
    return row


def _sweep_one_round(
    cfg: RunConfig,
    methods: Sequence[str],
    grid: Sequence[float],
    heter: Sequence[bool],
    model_factory: ModelFactory,
    save_adapters: Path | None,
    progress: bool,
    client_init: str = "auto",
) -> list[dict[str, Any]]:
    model, tokenizer = model_factory()
    setup = ClientSetup.load(cfg, model, tokenizer)
    # The same held-out records, MMLU questions and scoring as `florist run`'s eval_after.
    evaluate = Evaluator(cfg, setup.prompter)
    for note in evaluate.notes:
        tqdm.write(f"florist sweep: {note}")
    base_eval = evaluate(setup.host, setup.tokenizer, None) if evaluate.enabled else None
    settings = []
    for name, scfg, plan, inits_of in _setting_plans(cfg, heter, methods, client_init):
        rows: list[dict[str, Any]] = []
        singular_values: dict[str, list[float]] = {}
        training: list[dict[str, Any]] = []
        total = sum(len(configurations(g.methods, grid)) for g in plan)
        bar = tqdm(
            total=total,
            desc=f"aggregating + evaluating {name}",
            disable=bar_disabled(None if progress else False),
        )
        for group in plan:
            if progress:
                tqdm.write(f"sweep {name}: training the clients once for {', '.join(group.methods)} "
                           f"({group.client_init} init{', A frozen' if group.frozen_A else ''})")  # fmt: skip
            trained = train_group(setup, scfg, group, progress=progress)
            training.append(
                {
                    "client_init": group.client_init,
                    "frozen_A": group.frozen_A,
                    "methods": list(group.methods),
                    "round": 1,
                    "client_stats": {t.client_id: client_stats(r) for t, r in trained},
                }
            )
            for row, sv in _group_rows(setup, evaluate, scfg, group, trained, grid, save_adapters, inits_of):
                rows.append(row)
                singular_values = singular_values or sv
                bar.update()
                if progress:  # a line per configuration: the progress a log file keeps
                    tqdm.write(f"sweep {name} {len(rows)}/{total}: {_row_line(row)}")
        bar.close()
        rows.sort(key=lambda r: (SWEEP_METHODS.index(r["method"]), r["client_init"], r["threshold"] or 0.0))
        setting = _setting(name, scfg, base_eval, rows, singular_values, training[:1])
        setting["training_groups"] = training
        settings.append(setting)
    return settings


def _group_rows(
    setup: ClientSetup,
    evaluate: Evaluator,
    scfg: RunConfig,
    group: TrainingGroup,
    trained: Trained,
    grid: Sequence[float],
    save_adapters: Path | None,
    inits_of: dict[str, set[str]],
) -> Iterator[tuple[dict[str, Any], dict[str, list[float]]]]:
    """Every configuration of ``group`` on its trained clients: (row, singular values of the
    swept method's decomposition, else {}). A generator: one global result alive at a time."""
    # Neighbouring τ often keep the same rank in every module: the truncations of one SVD are
    # then identical adapters, so their evaluation is reused rather than recomputed.
    seen: dict[tuple, dict[str, Any] | None] = {}
    for method, value in configurations(group.methods, grid):
        mcfg = configured(dataclasses.replace(scfg, client_init=group.client_init), method, value)
        outcome, server = close_configuration(mcfg, setup.host.module_shapes, trained)
        adapter = server.final_adapter()  # what `florist run` writes as adapter/
        key = (method, tuple(sorted(outcome.result.ranks.items())))
        if value is None or key not in seen:
            seen[key] = evaluate(setup.host, setup.tokenizer, adapter) if evaluate.enabled else None
        both = len(inits_of[method]) > 1  # the method runs under both inits: say which
        row = _with_init(make_row(method, value, outcome.entry, seen[key]), group.client_init, both)
        local = AGGREGATORS[method].local_factors
        if local and evaluate.heldout:  # FedSA-LoRA: each client's own model, as florist run scores it
            from florist.personalised import evaluate_run

            row["eval_personal"] = evaluate_run(mcfg, setup, server, local, evaluate.heldout)
        if save_adapters is not None:
            write_peft_adapter(
                save_adapters
                / ("heterogeneous" if scfg.heter else "homogeneous")
                / adapter_label(row, with_init=both),
                adapter,
                base_model_name_or_path=scfg.global_model,
                target_modules=list(scfg.lora_target_modules),
            )
        yield row, (outcome.entry["singular_values"] if swept(method) else {})


def adapter_label(row: dict[str, Any], *, with_init: bool = False) -> str:
    """The directory name of a row's adapter, e.g. ``florist_tau0.90`` (``florist_tau0.90_shared``
    when the method ran under both inits)."""
    value = row.get("threshold")
    label = row["method"] if value is None else f"{row['method']}_tau{float(value):.2f}"
    return f"{label}_{row['client_init']}" if with_init else label


def _setting(
    name: str,
    scfg: RunConfig,
    base_eval: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    singular_values: dict[str, list[float]],
    training: list[dict[str, Any]],
) -> dict[str, Any]:
    """One rank setting (homogeneous or heterogeneous) of ``sweep.json``."""
    return {
        "name": name,
        "heter": scfg.heter,
        "client_ranks": {str(k): scfg.client_rank(k) for k in range(scfg.num_clients)},
        "base_eval": base_eval,
        "rows": rows,
        "singular_values": singular_values,
        "training_rounds": training,
    }


def _row_line(row: dict[str, Any]) -> str:
    parts = [row["label"], f"global rank {row['rank_total']}", f"Eff {row['eff']:.3e}"]
    evaluation = row.get("eval") or {}
    if evaluation.get("mmlu"):
        parts.append(f"MMLU {100 * evaluation['mmlu']['accuracy_macro']:.2f}%")
    if evaluation.get("heldout"):
        parts.append(f"held-out loss {evaluation['heldout']['loss']:.4f}")
    personal = (row.get("eval_personal") or {}).get("mean_loss")
    if personal is not None:
        parts.append(f"personalised loss {personal:.4f}")
    return ", ".join(parts)


# --- the several-round engine --------------------------------------------------------------


def _sweep_rounds(
    cfg: RunConfig,
    methods: Sequence[str],
    thresholds: Sequence[float],
    heter: Sequence[bool],
    model_factory: ModelFactory,
    runs_dir: Path,
    progress: bool,
    client_init: str = "auto",
) -> tuple[list[dict[str, Any]], str]:
    from florist.federation import run_federated

    settings = []
    for name, scfg, plan, inits_of in _setting_plans(cfg, heter, methods, client_init):
        pairs = [(m, g.client_init) for m in methods for g in plan if m in g.methods]
        configs = [(m, init, t) for m, init in pairs for _, t in configurations([m], thresholds)]
        rows, base_eval, sv, training = [], None, {}, []
        sub = "heterogeneous" if scfg.heter else "homogeneous"
        for method, init, tau in tqdm(
            configs, desc=f"runs {name}", disable=bar_disabled(None if progress else False)
        ):
            row_key = {"method": method, "threshold": tau, "client_init": init}
            both = len(inits_of[method]) > 1
            run_cfg = dataclasses.replace(
                configured(scfg, method, tau),
                client_init=init,
                output_dir=str(runs_dir / sub / adapter_label(row_key, with_init=both)),
            )
            model, tokenizer = model_factory()  # a fresh base: merge methods change it in place
            metrics = run_federated(run_cfg, model=model, tokenizer=tokenizer)
            rows.append(_with_init(_row_from_metrics(method, tau, metrics, run_cfg.output_dir), init, both))
            base_eval = base_eval or metrics.get("eval_before")
            if swept(method) and not sv:
                sv = (metrics["rounds"][0].get("singular_values") or {}) if metrics.get("rounds") else {}
            if not training:
                training = [
                    {"round": r["round"], "client_stats": r.get("client_stats", {})}
                    for r in metrics["rounds"]
                ]
        settings.append(_setting(name, scfg, base_eval, rows, sv, training))
    why = (
        f"{cfg.num_communication_rounds} rounds: the methods diverge after round 1"
        if not privacy.dp_enabled(cfg)
        else f"{cfg.dp_mode} differential privacy: every run draws its own noise"
    )
    note = (
        f"{why}, so every configuration "
        f"(each method and each τ) was trained separately with run_federated; runs are under {runs_dir}."
    )
    return settings, note


def _row_from_metrics(
    method: str, tau: float | None, metrics: dict[str, Any], run_dir: str
) -> dict[str, Any]:
    rounds = metrics.get("rounds") or []
    # Mean bytes per client in each round, summed over the rounds.
    per_round = [per_client_bytes(r.get("communication") or {}) for r in rounds]
    down, up = sum(d for d, _ in per_round), sum(u for _, u in per_round)
    last = rounds[-1] if rounds else {}
    return {
        "method": method,
        "label": row_label(method, tau),
        "threshold": tau,
        "accuracy": None,  # set by finish_setting from "eval"
        "eval": metrics.get("eval_after"),
        "eff": float(metrics.get("eff_total") or 0.0),
        "eff_per_round": metrics.get("eff_per_round"),
        "epsilon": (metrics.get("privacy") or {}).get("epsilon"),  # None without DP
        "rank_total": int(sum((last.get("ranks") or {}).values())),
        "ranks": last.get("ranks") or {},
        "bytes_down_per_client": down,
        "bytes_up_per_client": up,
        "run_dir": run_dir,
    }


# --- entry point ---------------------------------------------------------------------------


def run_sweep(
    cfg: RunConfig,
    *,
    methods: Sequence[str] = PAPER_METHODS,
    thresholds: str | Sequence[float] = DEFAULT_THRESHOLDS,
    heter: Sequence[bool] = (False, True),
    e_tolerance: float | None = None,
    select_by: str = "auto",
    client_init: str = "auto",
    model_factory: ModelFactory | None = None,
    save_adapters: bool = False,
    report: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep into ``cfg.output_dir`` (sweep.json, sweep.md, report/) and return sweep.json.

    ``select_by`` is the score that ranks the τ values (and fills the score column): "mmlu",
    "heldout" (response-token accuracy), "loss" (held-out loss, lower is better) or "auto"
    (MMLU when it was evaluated, else held-out accuracy). ``e_tolerance`` is in the score's unit
    (default: 1 accuracy point, or 0.005 nats of loss). ``client_init`` is auto (each method's
    default), shared, per_client or both. ``model_factory`` returns a fresh (model, tokenizer);
    by default ``cfg.global_model`` is loaded.
    """
    methods = parse_methods(methods)
    taus = parse_thresholds(thresholds)
    if not heter:
        raise ConfigError("heter: choose at least one rank setting")
    if select_by not in SCORE_SOURCES:
        raise ConfigError(f"select_by must be one of {', '.join(SCORE_SOURCES)}, got {select_by!r}")
    if e_tolerance is None:
        e_tolerance = DEFAULT_LOSS_TOLERANCE if select_by == "loss" else 1.0
    if not (math.isfinite(e_tolerance) and e_tolerance >= 0):
        raise ConfigError(f"--e-tolerance must be a finite number >= 0, got {e_tolerance}")
    training_groups(methods, client_init)  # checks client_init
    overrides = init_overrides(methods, client_init)
    for line in overrides.values():  # said, not silently done
        tqdm.write(f"florist sweep: {line}")
    if cfg.secure_aggregation:
        raise ConfigError(privacy.IN_PROCESS_SECAGG)
    # The common settings, under the swept method (it takes every rank setting and init), then
    # the privacy settings per method (central DP: linear methods only).
    common = next(m for m in SWEEP_METHODS if swept(m))
    dataclasses.replace(configured(cfg, common, taus[-1]), dp_mode="local").validate()
    for method in methods:
        problem = privacy.check_config(dataclasses.replace(cfg, method=method))
        if problem:
            raise ConfigError(problem)
    if select_by == "mmlu" and not (cfg.evaluate and find_mmlu_file(cfg)):
        raise ConfigError("select_by=mmlu needs MMLU: set --dev_data_path (and keep --evaluate on)")
    if model_factory is None:
        from florist.models import load_model

        def model_factory() -> tuple[Any, Any]:
            return load_model(cfg.global_model, device=cfg.device)

    out = Path(cfg.output_dir)
    with output_lock(out):  # one run per output directory (florist.io)
        t0 = time.perf_counter()
        # Under DP every configuration trains and draws its own noise (florist.privacy).
        if cfg.num_communication_rounds == 1 and not privacy.dp_enabled(cfg):
            adapters = atomic_directory(out / "adapters") if save_adapters else contextlib.nullcontext()
            with adapters as adapters_tmp:
                settings = _sweep_one_round(
                    cfg, methods, taus, heter, model_factory, adapters_tmp, progress, client_init
                )
            mode = "single-training"
            groups = "; ".join(
                f"{s['name']}: {len(s['training_groups'])} ("
                + ", ".join(
                    f"{'+'.join(g['methods'])} with {g['client_init'].replace('_', '-')} inits"
                    + (" and A frozen" if g["frozen_A"] else "")
                    for g in s["training_groups"]
                )
                + ")"
                for s in settings
            )
            note = (
                "1 round: the clients were trained once per training group (rank setting, client init, frozen A) "
                f"and every method and τ of a group aggregated the same client adapters. Groups trained: {groups}."
            )
        else:
            settings, note = _sweep_rounds(
                cfg, methods, taus, heter, model_factory, out / "runs", progress, client_init
            )
            mode = "separate-runs"

        if overrides:
            note += " " + "; ".join(overrides.values()) + "."
        has_mmlu = any((r.get("eval") or {}).get("mmlu") for s in settings for r in s["rows"])
        source = select_by if select_by != "auto" else ("mmlu" if has_mmlu else "heldout")
        for s in settings:
            finish_setting(s, e_tolerance=e_tolerance, score_source=source)
        unit = "nats" if source == "loss" else "points"
        sweep = {
            "kind": "florist-sweep",
            "model": cfg.global_model,
            "mode": mode,
            "note": note,
            "rounds": cfg.num_communication_rounds,
            "methods": list(methods),
            "thresholds": taus,
            "e_tolerance": e_tolerance,
            "client_init": client_init,
            "client_init_overrides": overrides,
            "selection_rule": (
                f"FLoRIST-O: the τ with the {'lowest' if source == 'loss' else 'highest'} {SCORE_NAMES[source]}. "
                f"FLoRIST-E: the τ with the highest Eff whose score is within {e_tolerance} {unit} of FLoRIST-O's."
            ),
            "score": {
                "name": SCORE_NAMES[source],
                "source": source,
                "unit": "nats" if source == "loss" else "%",
                "higher_is_better": source != "loss",
            },
            "seconds": time.perf_counter() - t0,
            "config": cfg.to_dict(),
            "settings": settings,
        }
        atomic_write_json(out / "sweep.json", sweep)
        atomic_write_text(out / "sweep.md", sweep_markdown(sweep))
        if report:
            from florist.report import write_report

            write_report(out)
        return sweep


def sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = [f"# Sweep: {sweep['model']}", "", sweep["note"], "", sweep["selection_rule"], ""]
    for s in sweep["settings"]:
        lines += [f"## {s['name']}", "", s["table_markdown"], ""]
        florist_rows = [r for r in s["rows"] if swept(r["method"])]
        if florist_rows:
            lines += [
                "### FLoRIST per τ",
                "",
                "| τ | client init | Σ rank | Eff ×10⁻⁴ | score | held-out loss | down / client |",
                "|---|---|---|---|---|---|---|",
            ]
            digits = 4 if (sweep.get("score") or {}).get("source") == "loss" else 2
            for r in florist_rows:
                acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.{digits}f}"
                heldout = (r.get("eval") or {}).get("heldout")
                loss = f"{heldout['loss']:.4f}" if heldout else "—"
                lines.append(
                    f"| {r['threshold']:.2f} | {r.get('client_init', '—')} | {r['rank_total']} | "
                    f"{1e4 * r['eff']:.2f} | {acc} | {loss} | {human_bytes(r['bytes_down_per_client'])} |"
                )
            lines.append("")
    return "\n".join(lines)
