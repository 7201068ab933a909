"""``florist flower app DIR``: write the Flower app project that ``flwr run DIR`` starts.

The project is one pyproject.toml naming florist's ServerApp and ClientApp, with every
``RunConfig`` setting as a run-config default (from ``--config run.yaml`` when given), so
``flwr run DIR <connection> --run-config 'method="flexlora" num-communication-rounds=3'`` can
override any of them. See docs/flower.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from florist.config import RunConfig
from florist.flower.app_config import FLOWER_DEFAULTS, FLOWER_SETTINGS, FlowerOptions, write_app_project
from florist.settings import check_args, one_line_errors


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("flower", help="run florist on Flower (multi-machine federation)")
    sub = parser.add_subparsers(dest="flower_command", required=True, metavar="ACTION")
    app = sub.add_parser("app", help="write the Flower app project (pyproject.toml) for `flwr run`")
    app.add_argument("directory", type=Path, help="directory to write pyproject.toml into")
    app.add_argument(
        "--config", type=Path, help="a run.yaml (as for `florist run --config`) for the defaults"
    )
    app.add_argument("--round-timeout", default=FLOWER_DEFAULTS["round-timeout"], help="seconds per round")
    app.add_argument(
        "--node-wait-timeout",
        default=FLOWER_DEFAULTS["node-wait-timeout"],
        help="seconds to wait for the SuperNodes before round 1",
    )
    app.set_defaults(func=_app)
    one_line_errors(app)


def _app(args: argparse.Namespace) -> int:
    check_args(args, {f"--{key}": setting for key, setting in FLOWER_SETTINGS.items()})
    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    cfg.validate()
    options = FlowerOptions(round_timeout=args.round_timeout, node_wait_timeout=args.node_wait_timeout)
    directory = write_app_project(args.directory, cfg, options)
    print(f"wrote {directory / 'pyproject.toml'}; start it with: flwr run {directory} <connection>")
    return 0
