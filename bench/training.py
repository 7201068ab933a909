"""Local-training benchmarks: florist's LocalTrainer against a plain transformers Trainer + peft,
and the peak memory of a federated simulation with 8 against 32 clients.

    python bench/training.py            # ~5-10 minutes on 2 CPU cores; GPU used when present
    python bench/training.py --examples 32 --no-docs

(a) Throughput: SmolLM2-135M, LoRA r=16/alpha=32 on q_proj,v_proj, dropout 0.05, the first N
    records of the real Dolly client 0 (../shared/data/dolly/8), cutoff 512, micro-batch 8,
    batch 16, one epoch. Tokens/s counts non-padding tokens. All runs happen in this process,
    one after another, each after a one-step warm-up, so their ratio is a fair comparison.
(b) Memory: ``florist.federation.run_federated`` (FLoRIST, one round, one optimizer step per
    client) with 8 and with 32 clients, each in a fresh process; the peak RSS (VmHWM) is read
    from /proc/self/status at the end. One base model is shared by every client, so the peak
    must not grow with the number of clients.

Results go to stdout as JSON and into docs/benchmarks.md between the training markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FLORIST_SHARED_DATA", REPO.parent / "shared" / "data"))
START, END = "<!-- training:start -->", "<!-- training:end -->"


from common import BENCHMARKS_MD, machine, write_section  # noqa: E402

from florist import data  # noqa: E402
from florist.io import atomic_write_json  # noqa: E402
from florist.lora import LoraHost  # noqa: E402
from florist.models import load_model, resolve_device  # noqa: E402
from florist.training import LocalTrainer, TrainConfig  # noqa: E402

LORA = dict(r=16, alpha=32.0, targets=["q_proj", "v_proj"], dropout=0.05)
MICRO, BATCH, CUTOFF = 8, 16, 512
PER_CLIENT = 8  # memory run: examples per client, 2 per step (so 4 steps each)


def dolly_examples(tokenizer: Any, n: int) -> list[dict]:
    path = SHARED / "dolly" / "8" / "local_training_0.json"
    if not path.is_file():
        sys.exit(f"bench/training.py: {path} is missing (set FLORIST_SHARED_DATA)")
    records = data.load_records(path)[:n]
    fmt = data.detect_format(records, path)
    prompter = data.Prompter("alpaca")
    return [
        data.tokenize_example(
            data.normalize_record(r, fmt),
            tokenizer,
            cutoff_len=CUTOFF,
            train_on_inputs=True,
            prompter=prompter,
        )
        for r in records
    ]


# --- (a) throughput ------------------------------------------------------------------------


def run_florist(examples: list[dict], *, precision: str, group: bool, device: str) -> dict[str, Any]:
    model, tokenizer = load_model("smollm2-135m", device=device)
    host = LoraHost(model, LORA["targets"], dropout=LORA["dropout"])
    cfg = TrainConfig(
        micro_batch_size=MICRO, batch_size=BATCH, epochs=1, learning_rate=3e-4, group_by_length=group,
        precision=precision, cutoff_len=CUTOFF, progress=False,
    )  # fmt: skip
    trainer = LocalTrainer(host, tokenizer, cfg, resolve_device(device))
    args = dict(
        client_id="bench",
        client_index=0,
        round_index=1,
        rank=LORA["r"],
        alpha=LORA["alpha"],
        init=None,
        seed=42,
    )
    trainer.train(examples=examples[:MICRO], **args)  # warm-up (one step)
    result = trainer.train(examples=examples, **args)
    return {
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / result.seconds,
        "steps": result.steps,
        "autocast": str(trainer.autocast).replace("torch.", "") if trainer.autocast else "fp32",
        "final_loss": result.losses[-1],
    }


def run_hf_trainer(examples: list[dict], *, device: str) -> dict[str, Any]:
    """The plain recipe: peft's get_peft_model + transformers Trainer in fp32, no length grouping."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = load_model("smollm2-135m", device=device)
    config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], lora_dropout=LORA["dropout"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, config)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")

    def trainer_for(rows: list[dict], out: str) -> Trainer:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=BATCH // MICRO,
            num_train_epochs=1, learning_rate=3e-4, warmup_steps=0, logging_steps=10**6, save_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=resolve_device(device).type == "cpu", seed=42,
            dataloader_num_workers=0,  # no length grouping (the Trainer default)
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator)

    with tempfile.TemporaryDirectory() as out:
        trainer_for(examples[:MICRO], out).train()  # warm-up (one step)
        trainer = trainer_for(examples, out)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(len(e["input_ids"]) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "autocast": "fp32"}


# --- (b) memory ----------------------------------------------------------------------------


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_clients(directory: Path, num_clients: int, per_client: int) -> None:
    """``directory/K/local_training_{k}.json`` from consecutive Dolly records (the same per-client
    size for every K, so only the number of clients changes)."""
    records = data.load_records(SHARED / "dolly" / "8" / "local_training_2.json")
    target = directory / str(num_clients)
    target.mkdir(parents=True, exist_ok=True)
    for k in range(num_clients):
        chunk = records[k * per_client : (k + 1) * per_client]
        (target / f"local_training_{k}.json").write_text(json.dumps(chunk))


def memory_child(num_clients: int, workdir: str) -> None:
    from florist.config import RunConfig
    from florist.federation import run_federated

    write_clients(Path(workdir) / "data", num_clients, per_client=PER_CLIENT)
    cfg = RunConfig(
        global_model="smollm2-135m", data_path=str(Path(workdir) / "data"), output_dir=str(Path(workdir) / "out"),
        num_clients=num_clients, method=os.environ.get("BENCH_METHOD", "florist"), threshold=0.9, num_communication_rounds=1,
        local_batch_size=2, local_micro_batch_size=2, local_max_steps=PER_CLIENT // 2, cutoff_len=256,
        pad_to_multiple_of=int(os.environ.get("BENCH_PAD_MULTIPLE", data.PAD_TO_MULTIPLE_OF)),
        evaluate=False, device="cpu", precision=os.environ.get("BENCH_PRECISION", "auto"),
    )  # fmt: skip
    start = time.perf_counter()
    run_federated(cfg)
    print(
        json.dumps(
            {"clients": num_clients, "peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - start}
        )
    )


def measure_memory(num_clients: int, pad_multiple: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        env = dict(os.environ, FLORIST_PROGRESS="0", BENCH_PAD_MULTIPLE=str(pad_multiple))
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(num_clients), workdir],
            capture_output=True, text=True, env=env, cwd=REPO,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"memory run with {num_clients} clients failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), pad_to_multiple_of=pad_multiple)


# --- report --------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    t = results["throughput"]
    lines = [
        START,
        "## Local training",
        "",
        f"`python bench/training.py` on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"), torch {m['torch']}, load average at start {m['load_average'][0]:.1f}. "
        f"SmolLM2-135M, LoRA r={LORA['r']} alpha={int(LORA['alpha'])} on q_proj/v_proj, "
        f"{results['examples']} Dolly client-0 records, micro-batch {MICRO}, batch {BATCH}, one epoch.",
        "",
        "| recipe | precision | length grouping | tokens/s | seconds | vs HF Trainer |",
        "|---|---|---|---:|---:|---:|",
    ]
    base = t["hf_trainer_fp32"]["tokens_per_s"]
    rows = [
        ("transformers Trainer + peft", "hf_trainer_fp32", "fp32", "no"),
        ("florist LocalTrainer", "florist_fp32", "fp32", "no"),
        ("florist LocalTrainer", "florist_fp32_grouped", "fp32", "yes"),
        (
            "florist LocalTrainer (default)",
            "florist_auto_grouped",
            t["florist_auto_grouped"]["autocast"],
            "yes",
        ),
    ]
    for label, key, precision, grouped in rows:
        r = t[key]
        lines.append(
            f"| {label} | {precision} | {grouped} | {r['tokens_per_s']:.0f} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s'] / base:.2f}× |"
        )
    mem = results["memory"]
    lines += [
        "",
        f"bf16 autocast alone: {results['bf16_speedup']:.2f}× over fp32 (both length-grouped); "
        f"florist default vs the plain fp32 Trainer: **{results['speedup_vs_hf']:.2f}×** (target ≥ 2×).",
        "",
        f"Peak RSS of a one-round FLoRIST simulation, fresh process per run, {PER_CLIENT} Dolly records "
        f"and {PER_CLIENT // 2} optimizer steps (micro-batch 2, cutoff 256) per client:",
        "",
        "| clients | batch widths padded to | peak RSS (MiB) | seconds |",
        "|---:|---|---:|---:|",
    ]
    for r in mem["runs"]:
        width = (
            "longest example" if r["pad_to_multiple_of"] == 1 else f"multiple of {r['pad_to_multiple_of']}"
        )
        lines.append(f"| {r['clients']} | {width} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
    lines += [
        "",
        f"32 vs 8 clients: **{mem['ratio']:.3f}×** with florist's default padding (target ≤ 1.15); "
        f"{mem['ratio_exact_widths']:.3f}× when every batch is padded only to its longest example.",
        "",
        "One base model is shared and clients differ only in their LoRA: tensor and module counts stay "
        "flat across clients, and the uploads held for aggregation add ~3.7 MiB per client at r=16. "
        "What grew with clients was per-shape native memory: oneDNN's primitive cache and the "
        "allocator keep buffers for every new sequence length, so with exact-length batches each "
        "client's new lengths added memory. Rounding batch widths up to a multiple of 32 "
        "(`--pad_to_multiple_of`, at most cutoff/32 widths) bounds that set, and RSS then levels off "
        "once every width has been seen.",
        "",
        "The machine is shared with other jobs; absolute figures vary from run to run, ratios less so.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=48, help="Dolly records for the throughput runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--memory-child", nargs=2, metavar=("CLIENTS", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    os.environ.setdefault("FLORIST_PROGRESS", "0")
    results: dict[str, Any] = {"machine": machine(), "examples": args.examples}
    _, tokenizer = load_model("smollm2-135m", device="cpu")  # converts and caches the GGUF once
    examples = dolly_examples(tokenizer, args.examples)

    t: dict[str, Any] = {}
    t["hf_trainer_fp32"] = run_hf_trainer(examples, device=args.device)
    t["florist_fp32"] = run_florist(examples, precision="fp32", group=False, device=args.device)
    t["florist_fp32_grouped"] = run_florist(examples, precision="fp32", group=True, device=args.device)
    t["florist_auto_grouped"] = run_florist(examples, precision="auto", group=True, device=args.device)
    for name, r in t.items():
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s ({r['seconds']:.1f} s)", file=sys.stderr)
    results["throughput"] = t
    results["bf16_speedup"] = (
        t["florist_auto_grouped"]["tokens_per_s"] / t["florist_fp32_grouped"]["tokens_per_s"]
    )
    results["speedup_vs_hf"] = (
        t["florist_auto_grouped"]["tokens_per_s"] / t["hf_trainer_fp32"]["tokens_per_s"]
    )

    runs = [measure_memory(k, m) for m in (data.PAD_TO_MULTIPLE_OF, 1) for k in (8, 32)]
    for r in runs:
        print(
            f"{r['clients']} clients, widths x{r['pad_to_multiple_of']}: peak RSS {r['peak_rss_mib']:.0f} MiB",
            file=sys.stderr,
        )
    peak = [r["peak_rss_mib"] for r in runs]
    results["memory"] = {"runs": runs, "ratio": peak[1] / peak[0], "ratio_exact_widths": peak[3] / peak[2]}

    print(json.dumps(results, indent=2))
    if args.json:
        atomic_write_json(args.json, results)
    if not args.no_docs:
        write_section(BENCHMARKS_MD, START, END, markdown(results))
        print(f"updated {BENCHMARKS_MD}", file=sys.stderr)


if __name__ == "__main__":
    main()
