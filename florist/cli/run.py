"""``florist run``: federated fine-tuning in one process, configured by flags and/or a YAML file.

Every ``RunConfig`` field is a flag, in both spellings (``--num_clients`` and ``--num-clients``).
Lists are comma-separated (``--local_ranks 64,32,16``); booleans take True/False (a bare
``--resume`` means True). With ``--config run.yaml`` the file is read first and flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from florist.config import RunConfig, run_settings
from florist.settings import COMMAND_LINE


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, taken as text and checked by its Setting (config_from_args);
    defaults are None so that YAML values survive unless a flag overrides them."""
    group = parser.add_argument_group("run settings (RunConfig)")
    for f in dataclasses.fields(RunConfig):
        setting = run_settings()[f.name]
        extra: dict[str, Any] = {"nargs": "?", "const": True} if setting.kind is bool else {}  # bare --resume
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(
            *names, dest=f.name, default=None, help=f"{setting.description()} (default: {default})", **extra
        )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The flags (each checked and named as a flag) over the ``--config`` file (named by its path)."""
    settings = run_settings()
    flags = {
        name: settings[name].parse(value, name=COMMAND_LINE.spell(name), source=COMMAND_LINE)
        for name, value in vars(args).items()
        if name in settings and value is not None
    }
    if getattr(args, "config", None):
        return dataclasses.replace(RunConfig.from_yaml(args.config), **flags)
    return RunConfig(**flags)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="federated fine-tuning in one process (all clients simulated on one model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of RunConfig settings; flags override it")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from florist.federation import run_federated

    cfg = config_from_args(args).validate()
    metrics = run_federated(cfg)
    print(format_summary(metrics))
    return 0


# --- the end-of-run table, shared by run, demo and main.py -----------------------------------


def _eval_cells(ev: dict[str, Any]) -> tuple[str, str, str]:
    held = ev.get("heldout") or {}
    mmlu = ev.get("mmlu") or {}
    loss = f"{held['loss']:.4f}" if "loss" in held else "-"
    acc = f"{held['token_accuracy']:.4f}" if "token_accuracy" in held else "-"
    mm = f"{100 * mmlu['accuracy_macro']:.2f}%" if "accuracy_macro" in mmlu else "-"
    return loss, acc, mm


def format_summary(metrics: dict[str, Any]) -> str:
    """A short plain-text table of a run's metrics."""
    from florist.report import human_bytes, per_client_bytes

    cfg = metrics.get("config", {})
    tau = f" (tau={metrics['threshold']})" if metrics.get("threshold") is not None else ""
    lines = [
        f"method: {metrics['method']}{tau}   model: {metrics['model']}   output: {cfg.get('output_dir', '?')}",
        "",
        f"{'round':>5} {'clients':>7} {'global rank':>11} {'Eff':>10} {'up/client':>11} {'down/client':>11}",
    ]
    for r in metrics["rounds"]:
        down, up = per_client_bytes(r["communication"])
        lines.append(
            f"{r['round']:>5} {len(r['clients']):>7} {sum(r['ranks'].values()):>11} {r['eff']:>10.3e} "
            f"{human_bytes(up):>11} {human_bytes(down):>11}"
        )
    lines.append(f"Eff total: {metrics['eff_total']:.4e}")
    dp = metrics.get("privacy")
    if dp:
        eps = "unbounded" if dp["epsilon"] is None else f"{dp['epsilon']:.3g}"  # see epsilon_note
        lines.append(
            f"privacy: {dp['mode']} DP, epsilon {eps} at delta {dp['delta']:g} "
            f"(clip C={dp['clip_norm']:g}, noise multiplier z={dp['noise_multiplier']:g})"
        )
    before, after = metrics.get("eval_before") or {}, metrics.get("eval_after") or {}
    if before or after:
        lines += ["", f"{'':>10} {'held-out loss':>13} {'token acc':>10} {'MMLU':>8}"]
        for label, ev in (("base", before), ("federated", after)):
            loss, acc, mm = _eval_cells(ev)
            lines.append(f"{label:>10} {loss:>13} {acc:>10} {mm:>8}")
    personal = metrics.get("eval_personal")  # FedSA-LoRA: each client's own model, its own records
    if personal and personal.get("mean_loss") is not None:
        each = ", ".join(
            f"{cid} {c['loss']:.4f}" for cid, c in personal["clients"].items() if c.get("loss") is not None
        )
        lines.append(f"personalised held-out loss: {personal['mean_loss']:.4f} (weighted mean; {each})")
    return "\n".join(lines)
