"""``florist sweep``: one local training, every method and every τ aggregated and evaluated.

Shared training settings are the ``florist run`` flags (RunConfig, ``--config run.yaml`` too);
``--method`` and ``--threshold`` are ignored (the sweep covers ``--methods`` and ``--thresholds``).
Writes sweep.json, sweep.md and report/ into ``--output_dir``.
"""

from __future__ import annotations

import argparse
from typing import Any

from florist.cli.run import add_config_flags, config_from_args
from florist.settings import Setting, check_args

HETER_CHOICES = {"both": (False, True), "true": (True,), "false": (False,)}
SELECT_BY = ("auto", "mmlu", "heldout", "loss")
CLIENT_INITS = ("auto", "shared", "per_client", "both")
# The sweep's own flags (RunConfig's are checked by config_from_args); --methods and
# --thresholds are parsed by florist.sweep.
FLAGS = {
    "--heter": Setting(str, choices=tuple(HETER_CHOICES)),
    "--e-tolerance": Setting(float, optional=True, low=0.0),
    "--select-by": Setting(str, choices=SELECT_BY),
    "--client-init": Setting(str, choices=CLIENT_INITS),
}
DESTS = {"--heter": "heter_mode", "--client-init": "sweep_client_init"}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train once, aggregate with every method and τ, evaluate, tabulate (FLoRIST-O/-E)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",  # our --heter (both|true|false) replaces RunConfig's boolean one
    )
    parser.add_argument("--config", help="YAML file of RunConfig settings; flags override it")
    add_config_flags(parser)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--heter",
        dest="heter_mode",
        type=str.lower,
        default="both",
        help="rank settings: homogeneous (false), heterogeneous (true) or both (default)",
    )
    sweep.add_argument(
        "--methods",
        default="fedit,zeropad,flora,flexlora,ffa,florist",
        help="comma-separated methods, or all (the paper's and fedex,fedsa,rolora,hetlora,lorafair)",
    )
    sweep.add_argument(
        "--thresholds", default="0.80:1.00:0.01", help="FLoRIST τ grid: START:STOP:STEP (inclusive) or a list"
    )
    sweep.add_argument(
        "--e-tolerance",
        "--e_tolerance",
        dest="e_tolerance",
        default=None,
        help="FLoRIST-E: the highest-Eff τ whose score is within this of FLoRIST-O's "
        "(default 1 accuracy point, or 0.005 nats with --select-by loss)",
    )
    sweep.add_argument(
        "--select-by",
        "--select_by",
        dest="select_by",
        default="auto",
        help="score that ranks τ: MMLU macro accuracy, held-out token accuracy, held-out loss, "
        "or auto (MMLU when evaluated, else held-out accuracy)",
    )
    sweep.add_argument(
        "--client-init",
        "--client_init",
        dest="sweep_client_init",
        type=str.lower,
        default="auto",
        help="how each round's clients draw their fresh LoRA: each method's default (auto: shared for "
        "FedIT and FFA-LoRA, per-client for the others, as in the authors' code), shared or per_client "
        "for every method that allows it, or both (every method under each init)",
    )
    sweep.add_argument(
        "--save-adapters",
        "--save_adapters",
        dest="save_adapters",
        action="store_true",
        help="also write every global adapter (one round) to OUTPUT_DIR/adapters/",
    )
    sweep.add_argument(
        "--no-report", dest="report", action="store_false", help="skip the plots and report.md"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args, FLAGS, DESTS)
    if args.output_dir is None and not args.config:
        args.output_dir = "./florist-sweep"
    cfg = config_from_args(args)
    from florist.sweep import run_sweep

    sweep = run_sweep(
        cfg,
        methods=args.methods,
        thresholds=args.thresholds,
        heter=HETER_CHOICES[args.heter_mode],
        e_tolerance=args.e_tolerance,
        select_by=args.select_by,
        client_init=args.sweep_client_init,
        save_adapters=args.save_adapters,
        report=args.report,
    )
    for setting in sweep["settings"]:
        print(f"\n{setting['name']}\n{setting['table_markdown']}")
    print(
        f"\n{sweep['note']}\nresults: {cfg.output_dir}/sweep.json, sweep.md"
        + (", report/" if args.report else "")
    )
    return 0
