"""``florist report RUN_DIR``: plots and report.md for a run (metrics.json) or a sweep (sweep.json)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="plots and report.md for a run or sweep directory",
        description="Render accuracy-vs-communication, σ² energy, rank heatmap and loss plots plus report.md.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory (metrics.json) or a sweep directory (sweep.json)"
    )
    p.add_argument("--out", default=None, help="where to write the report (default RUN_DIR/report)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from florist.report import write_report

    path = write_report(args.run_dir, out_dir=args.out)
    print(f"report written to {path}")
    return 0
