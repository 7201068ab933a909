"""``florist demo``: the whole method on the embedded model, offline, in a few minutes on a CPU.

Eight clients with heterogeneous LoRA ranks [64, 32, 16, 16, 8, 8, 4, 4] (alpha = 2r) fine-tune
SmolLM2-135M-Instruct on the built-in non-IID instruction data (``florist.data.demo_data_path``)
for two rounds of FLoRIST (tau = 0.9). The global model is evaluated before and after on the
held-out ``global_test.json`` (loss and response-token accuracy) and, when an MMLU file is found
(``--mmlu``, $FLORIST_MMLU_PATH or ./mmlu_test_1444.jsonl), on a small stratified MMLU sample
with the log-likelihood scorer. Steps are kept small (a few optimizer steps per client and
round, a larger learning rate than the paper's 3e-4) so the run fits in minutes on two cores.
"""

from __future__ import annotations

import argparse
from typing import Any

from florist.config import DEFAULT_HETER_RANKS, DEFAULT_MODEL, RunConfig


def demo_config(
    output_dir: str = "runs/demo",
    model: str = DEFAULT_MODEL,
    *,
    rounds: int = 2,
    steps: int = 4,
    eval_samples: int | None = 57,
    mmlu: str | None = None,
    device: str = "auto",
) -> RunConfig:
    from florist.data import demo_data_path

    return RunConfig(
        global_model=model,
        data_path=str(demo_data_path()),
        output_dir=output_dir,
        num_clients=8,
        method="florist",
        threshold=0.9,
        num_communication_rounds=rounds,
        heter=True,
        local_ranks=list(DEFAULT_HETER_RANKS),
        local_batch_size=4,
        local_micro_batch_size=4,
        local_max_steps=steps,
        local_learning_rate=1e-3,
        cutoff_len=256,
        lora_dropout=0.05,
        eval_samples=eval_samples,
        dev_data_path=mmlu,
        device=device,
    ).validate()


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="FLoRIST on the embedded SmolLM2 with 8 heterogeneous clients, offline, in minutes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output_dir", "--output-dir", default="runs/demo", help="run directory (default: runs/demo)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL}, the embedded one)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="communication rounds (default: 2)")
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps of 4 records per client and round (default: 4)"
    )
    parser.add_argument(
        "--eval_samples",
        "--eval-samples",
        type=int,
        default=57,
        help="MMLU questions / held-out records evaluated (default: 57, one MMLU question per subject)",
    )
    parser.add_argument(
        "--mmlu",
        default=None,
        help="MMLU file (mmlu_test_1444.jsonl); default: $FLORIST_MMLU_PATH or ./mmlu_test_1444.jsonl",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from florist.cli.run import format_summary
    from florist.federation import run_federated

    cfg = demo_config(
        args.output_dir,
        args.model,
        rounds=args.rounds,
        steps=args.steps,
        eval_samples=args.eval_samples,
        mmlu=args.mmlu,
        device=args.device,
    )
    metrics = run_federated(cfg)
    print()
    print(format_summary(metrics))
    ranks = [sum(r["ranks"].values()) for r in metrics["rounds"]]
    stack = sum(cfg.client_rank(k) for k in range(cfg.num_clients)) * len(metrics["rounds"][0]["ranks"])
    print(
        f"global rank (sum over modules) per round: {ranks}, total {sum(ranks)}; FLoRA would send {stack} per round"
    )
    if not (metrics.get("eval_after") or {}).get("mmlu"):
        print("MMLU: skipped (no MMLU file; pass --mmlu mmlu_test_1444.jsonl or set FLORIST_MMLU_PATH)")
    try:
        from florist.report import write_report
    except ImportError:
        print(f"outputs: {cfg.output_dir} (adapter/, metrics.json)")
    else:
        report = write_report(cfg.output_dir)
        print(f"outputs: {cfg.output_dir} (adapter/, metrics.json); report: {report}")
    return 0
