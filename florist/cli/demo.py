"""``florist demo``: what FLoRIST buys, on the embedded model, offline, in a few minutes on a CPU.

Eight clients fine-tune SmolLM2-135M-Instruct (LoRA r=16 on q_proj/v_proj) on the built-in
non-IID instruction data (``florist.data.demo_data_path``) for one round. The clients are trained
once per client init (per-client inits for FLoRA and FLoRIST, one shared init for FedIT, as in
the authors' code) and the very same uploads are aggregated by FedIT, FLoRA (the exact stack) and
FLoRIST at a few τ (``florist sweep``'s one-training shortcut). Each global model is scored on
the held-out ``global_test.json`` (loss on response tokens, with a 95% bootstrap interval and the
paired difference to the base model), next to the bytes each client downloads. The table and
the trade-off plot show FLoRIST's point: a loss next to FLoRA's at a fraction of its download.
A larger learning rate than the paper's 3e-4 makes a few steps count. It ends with what the
models say: three held-out prompts, each answered by the base model and by the FLoRIST global
model (τ=0.9), whose adapter is kept in ``adapters/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from florist.config import DEFAULT_MODEL, RunConfig

DEMO_METHODS = ("fedit", "flora", "florist")
DEMO_THRESHOLDS = (0.8, 0.9, 0.95)
SHOWN_PROMPTS = 3  # held-out prompts answered by the base and the global model at the end


def demo_config(
    output_dir: str = "runs/demo",
    model: str = DEFAULT_MODEL,
    *,
    rounds: int = 1,
    steps: int = 8,
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
        lora_r=16,
        lora_alpha=32,
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
        help="FedIT, FLoRA and FLoRIST on the embedded SmolLM2 from one training, offline, in minutes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output_dir", "--output-dir", default="runs/demo", help="run directory (default: runs/demo)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"base model (default: {DEFAULT_MODEL}, the embedded one)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="communication rounds (default: 1)")
    parser.add_argument(
        "--steps", type=int, default=8, help="optimizer steps of 4 records per client and round (default: 8)"
    )
    parser.add_argument(
        "--eval_samples",
        "--eval-samples",
        type=int,
        default=57,
        help="held-out records and MMLU questions evaluated at most (default: 57, all 40 held-out "
        "records and one MMLU question per subject)",
    )
    parser.add_argument(
        "--mmlu",
        default=None,
        help="MMLU file (mmlu_test_1444.jsonl); default: $FLORIST_MMLU_PATH or ./mmlu_test_1444.jsonl",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.set_defaults(func=run)


def demo_table(sweep: dict[str, Any]) -> str:
    """The demo's summary: each global model's held-out loss against what a client downloads."""
    from florist.report import human_bytes
    from florist.stats import heldout_comparison

    setting = sweep["settings"][0]
    base = setting["base_eval"]
    flora = next((r for r in setting["rows"] if r["method"] == "flora"), None)
    lines = [
        f"{'model':<22} {'held-out loss [95% CI]':>26} {'vs base [95% CI]':>28} {'download':>10} {'Eff x1e-4':>9}",
    ]
    if not (base or {}).get("heldout"):
        return "held-out loss: not evaluated (no global_test.json)"
    base_stats = heldout_comparison(base, {})
    lo, hi = base_stats["heldout_loss_ci95"]
    lines.append(f"{'base model':<22} {base_stats['heldout_loss']:>8.4f} [{lo:.4f}, {hi:.4f}]")
    stats = {}
    for r in setting["rows"]:
        s = stats[id(r)] = heldout_comparison(r["eval"], {"base": base, "flora": (flora or {}).get("eval")})
        lo, hi = s["heldout_loss_ci95"]
        dlo, dhi = s["delta_vs_base_ci95"]
        lines.append(
            f"{r['label']:<22} {s['heldout_loss']:>8.4f} [{lo:.4f}, {hi:.4f}] "
            f"{s['delta_vs_base']:>+9.4f} [{dlo:+.4f}, {dhi:+.4f}] "
            f"{human_bytes(r['bytes_down_per_client']):>10} {1e4 * r['eff']:>9.2f}"
        )
    if flora is not None:
        lines.append("")
        for r in setting["rows"]:
            if r["method"] == "flora":
                continue
            s = stats[id(r)]
            lo, hi = s["delta_vs_flora_ci95"]
            ratio = flora["bytes_down_per_client"] / r["bytes_down_per_client"]
            lines.append(
                f"{r['label']}: {s['delta_vs_flora']:+.4f} nats against FLoRA (95% CI [{lo:+.4f}, {hi:+.4f}]) "
                f"with {ratio:.1f}x less download per client"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from florist.sweep import run_sweep

    cfg = demo_config(
        args.output_dir,
        args.model,
        rounds=args.rounds,
        steps=args.steps,
        eval_samples=args.eval_samples,
        mmlu=args.mmlu,
        device=args.device,
    )
    sweep = run_sweep(
        cfg,
        methods=DEMO_METHODS,
        thresholds=DEMO_THRESHOLDS,
        heter=(False,),
        select_by="loss",
        save_adapters=True,
        report=True,
    )
    print()
    print(demo_table(sweep))
    print(f"\n{sweep['note']}")
    print(
        f"outputs: {cfg.output_dir}/sweep.json, sweep.md; the trade-off plot: "
        f"{cfg.output_dir}/report/accuracy_vs_communication.png"
    )
    print(what_the_models_say(cfg))
    return 0


def what_the_models_say(cfg: RunConfig, n: int = SHOWN_PROMPTS, max_new_tokens: int = 48) -> str:
    """The first ``n`` held-out prompts, answered greedily by the base model and by the FLoRIST
    global model at the demo's τ (its adapter from the sweep's ``adapters/``)."""
    from pathlib import Path

    from florist.data import Prompter, find_test_file, load_dataset_file
    from florist.generation import Sampling, answer_records, format_answers, load_for_generation

    found = sorted(Path(cfg.output_dir, "adapters").glob(f"*/florist_tau{cfg.threshold:.2f}"))
    test_file = find_test_file(cfg.data_path, cfg.num_clients)
    if not found or test_file is None:
        return "(no FLoRIST adapter or held-out file to answer prompts with)"
    records = load_dataset_file(test_file)[0][:n]
    loaded = load_for_generation(str(found[0]), base=cfg.global_model, device=cfg.device)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    rows = answer_records(loaded, records, Prompter(cfg.prompt_template_name), sampling, compare_base=True)
    header = f"\nWhat the models say (greedy; fine-tuned = FLoRIST τ={cfg.threshold:g}, {found[0]}):"
    return "\n".join([header, *(format_answers(r) for r in rows)])
