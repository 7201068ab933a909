"""``florist report RUN_DIR``: plots and report.md for a run (metrics.json) or a sweep (sweep.json);
``florist report RUN_DIR RUN_DIR ... --out DIR``: the learning curves of several runs together."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="plots and report.md for a run or sweep directory",
        description="Render accuracy-vs-communication, σ² energy, rank heatmap and loss plots plus report.md.",
    )
    p.add_argument(
        "run_dirs",
        metavar="RUN_DIR",
        nargs="+",
        help="a run directory (metrics.json) or a sweep directory (sweep.json); several runs: their learning curves",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write the report (default RUN_DIR/report; several runs: required)",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from florist.report import ReportError, write_curves_report, write_report

    if len(args.run_dirs) > 1:
        if args.out is None:
            raise ReportError("several runs: say where their report goes with --out DIR")
        path = write_curves_report(args.run_dirs, args.out)
    else:
        path = write_report(args.run_dirs[0], out_dir=args.out)
    print(f"report written to {path}")
    return 0
