"""florist's CUDA paths on a real GPU, each against the CPU in the same run.

    python bench/gpu.py --prepare .gpu        # here: the model's config and tokenizer, a data subset
    python bench/gpu.py --inputs .gpu --out D  # on the GPU machine: writes D/gpu.json
    python bench/gpu.py --doc D/gpu.json       # here: the "GPU" section of docs/benchmarks.md

The embedded GGUF (98 MB) does not travel to a lent GPU machine, so the model is SmolLM2-135M's
architecture and tokenizer with seeded random weights: what is checked is the code path, not what
the model learns. Data: the first records of Dolly's 8-client split (../shared/data/dolly/8).

1. Aggregation: every registered method on the same uploads as CUDA and as CPU tensors (float64):
   the effective updates it returns (B @ A of every adapter it broadcasts) agree. (The server
   aggregates on the CPU by design; this checks that GPU-trained uploads are taken as they come.)
2. Federated runs (FLoRIST, τ = 0.9, and FedIT; 4 clients, 3 rounds, LoRA dropout off): on the CPU
   in fp32, on the GPU in fp32 and with ``precision auto`` (bf16 autocast). CPU fp32 against GPU fp32
   give the same losses up to float rounding; seconds per round are compared as ratios.
3. One base model for many clients on the GPU: 16 clients with 4 a round against 4 clients all in
   every round, peak GPU memory as a ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from florist.io import atomic_write_json  # noqa: E402

START, END = "<!-- gpu:start -->", "<!-- gpu:end -->"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip
TRAIN = {"rounds": 3, "steps": 4, "batch": 8, "cutoff_len": 256, "records_per_client": 32, "heldout": 64}
RUNS = [  # name, device, precision, method, clients, fraction
    ("cpu_fp32", "cpu", "fp32", "florist", 4, 1.0),
    ("cuda_fp32", "cuda", "fp32", "florist", 4, 1.0),
    ("cuda_auto", "cuda", "auto", "florist", 4, 1.0),
    ("cuda_auto_fedit", "cuda", "auto", "fedit", 4, 1.0),
    ("cuda_auto_16clients", "cuda", "auto", "florist", 16, 0.25),
]


# --- 0. inputs that travel --------------------------------------------------------------------


def prepare(dest: Path) -> None:
    """The model's config and tokenizer files, and Dolly records for 16 clients, under ``dest``."""
    from common import SHARED

    from florist.models import convert_gguf, embedded_gguf_path

    model = convert_gguf(embedded_gguf_path())
    (dest / "model").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy(model / name, dest / "model" / name)
    source = SHARED / "dolly" / "8"
    pool = [json.loads((source / f"local_training_{k}.json").read_text()) for k in range(8)]
    n = TRAIN["records_per_client"]
    for clients in (4, 16):  # client k takes its own slice of source client k % 8
        (dest / "data" / str(clients)).mkdir(parents=True, exist_ok=True)
        for k in range(clients):
            records = pool[k % 8][(k // 8) * n : (k // 8 + 1) * n]
            (dest / "data" / str(clients) / f"local_training_{k}.json").write_text(json.dumps(records))
    heldout = json.loads((source / "global_test.json").read_text())[: TRAIN["heldout"]]
    (dest / "heldout.json").write_text(json.dumps(heldout))


def random_model(inputs: Path, where: Path, *, tiny: bool = False) -> Path:
    """SmolLM2-135M's architecture with seeded random weights, as a Hugging Face directory (``tiny``:
    2 narrow layers, to try the script on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(inputs / "model")
    if tiny:
        config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(where)  # config.json too
    for name in TOKENIZER_FILES:
        if name != "config.json" and (inputs / "model" / name).is_file():
            shutil.copy(inputs / "model" / name, where / name)
    return where


# --- 1. aggregation on CUDA tensors -----------------------------------------------------------


def aggregation_check(device: str) -> dict[str, Any]:
    from florist.aggregation import AGGREGATORS, ClientUpdate, LoraFactors, get_aggregator

    g = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i}.{p}": (576, 576 if p == "q" else 192) for i in range(2) for p in ("q", "v")}
    shared = {n: torch.randn(16, m, generator=g) / math.sqrt(m) for n, (m, _) in shapes.items()}

    def uploads(on: str, shared_A: bool) -> list[ClientUpdate]:
        gen = torch.Generator().manual_seed(1)
        out = []
        for k in range(4):
            modules = {}
            for n, (m_in, m_out) in shapes.items():
                A = shared[n] if shared_A else torch.randn(16, m_in, generator=gen) / math.sqrt(m_in)
                B = torch.randn(m_out, 16, generator=gen) * 0.1
                modules[n] = LoraFactors(A.to(on), B.to(on), 2.0)
            out.append(ClientUpdate(f"client_{k}", 100 + 10 * k, modules))
        return out

    def parts(result: Any) -> dict[str, Any]:
        out = {
            "adapter": result.adapter,
            "base_update": result.base_update,
            "global_view": result.global_view,
        }
        return {
            k: a
            for k, a in (out | {f"client/{c}": a for c, a in (result.per_client or {}).items()}).items()
            if a
        }

    def returned_on(result: Any) -> set[str]:
        return {f.A.device.type for a in parts(result).values() for f in a.values()}

    def effective(result: Any) -> dict[str, torch.Tensor]:  # every broadcast update, B @ A
        return {f"{p}/{n}": f.delta().cpu() for p, a in parts(result).items() for n, f in a.items()}

    out = {}
    for method in sorted(AGGREGATORS):
        options = {"threshold": 0.9} if method == "florist" else {}
        row: dict[str, Any] = {}
        for shared_A in (False, True):  # FFA-LoRA refuses uploads whose A differ
            try:
                cpu = effective(get_aggregator(method, **options).aggregate(uploads("cpu", shared_A)))
            except ValueError:
                continue
            try:
                result = get_aggregator(method, **options).aggregate(uploads(device, shared_A))
                gpu = effective(result)
            except Exception as e:  # noqa: BLE001 - reported, not hidden: the check's finding
                row = {"error": f"{type(e).__name__}: {e}"[:300]}
                break
            scale = max(float(t.abs().max()) for t in cpu.values())
            diff = (
                max(float((cpu[k] - gpu[k]).abs().max()) for k in cpu)
                if cpu.keys() == gpu.keys()
                else math.inf
            )
            row = {"shared_A": shared_A, "max_abs_diff_relative": diff / scale, "tensors": len(cpu),
                   "returned_on": sorted(returned_on(result))}  # fmt: skip
            break
        out[method] = row or {"error": "refused every upload"}
    return out


# --- 2. and 3. federated runs -------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One federated run in this (fresh) process: losses, seconds, peak memory."""
    from florist.config import RunConfig
    from florist.federation import run_federated
    from florist.models import autocast_dtype

    name, device, precision, method, clients, fraction = spec["run"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = RunConfig(
        global_model=spec["model"], data_path=str(Path(spec["inputs"]) / "data"), output_dir=spec["out"],
        num_clients=clients, client_selection_frac=fraction, method=method, threshold=0.9,
        num_communication_rounds=TRAIN["rounds"], local_batch_size=TRAIN["batch"],
        local_micro_batch_size=TRAIN["batch"], local_max_steps=TRAIN["steps"], local_learning_rate=2e-3,
        lr_schedule="cosine", lr_min=2e-4, cutoff_len=TRAIN["cutoff_len"], lora_r=16, lora_alpha=32, lora_dropout=0.0,
        test_data_path=str(Path(spec["inputs"]) / "heldout.json"), eval_base=True, device=device,
        precision=precision, seed=42,
    )  # fmt: skip
    metrics = run_federated(cfg)
    rounds = metrics["rounds"]
    dtype = autocast_dtype(precision, torch.device(device))
    return {
        "name": name, "device": device, "precision": precision, "method": method, "clients": clients,
        "fraction": fraction, "autocast": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "first_losses": rounds[0]["client_stats"][rounds[0]["clients"][0]]["losses"],
        "train_loss_first_last": [rounds[0]["client_stats"][rounds[0]["clients"][0]]["losses"][0],
                                  rounds[-1]["client_stats"][rounds[-1]["clients"][0]]["losses"][-1]],
        "heldout_loss_before": metrics["eval_before"]["heldout"]["loss"],
        "heldout_loss_after": metrics["eval_after"]["heldout"]["loss"],
        "ranks": [sum(r["ranks"].values()) for r in rounds],
        "round_seconds": [r["seconds"] for r in rounds],
        "train_seconds": sum(c["seconds"] for r in rounds for c in r["client_stats"].values()),
        "tokens": sum(c["tokens"] for r in rounds for c in r["client_stats"].values()),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def check(inputs: Path, out: Path, device: str, *, tiny: bool = False) -> dict[str, Any]:
    from common import machine

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(inputs, Path(tmp) / "model", tiny=tiny)
        for run in RUNS:
            run = (*run[:1], run[1] if run[1] == "cpu" else device, *run[2:])
            spec = {"run": run, "model": str(model), "inputs": str(inputs), "out": str(Path(tmp) / run[0])}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
            )
            if done.returncode != 0:
                runs[run[0]] = {"error": done.stderr[-2000:]}
                print(f"bench/gpu.py: {run[0]} failed:\n{done.stderr[-2000:]}", flush=True)
                continue
            runs[run[0]] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"bench/gpu.py: {run[0]}: {json.dumps(runs[run[0]])}", flush=True)
    doc = {"machine": machine(), "train": TRAIN, "aggregation": aggregation_check(device), "runs": runs}
    atomic_write_json(out / "gpu.json", doc)
    return doc


# --- the document ---------------------------------------------------------------------------------


def steady(run: dict[str, Any]) -> float:
    """Seconds per round after the first (which pays for CUDA's and oneDNN's one-off set-up)."""
    later = run["round_seconds"][1:] or run["round_seconds"]
    return sum(later) / len(later)


def markdown(doc: dict[str, Any]) -> str:
    m, runs, t = doc["machine"], doc["runs"], doc["train"]
    cpu, g32, auto = runs.get("cpu_fp32", {}), runs.get("cuda_fp32", {}), runs.get("cuda_auto", {})
    lines = [START, "## GPU check (bench/gpu.py)", "",
             f"`python bench/gpu.py` on {m['gpu']} beside {m['cpu']} ({m['cores']} cores, native bf16: {m['bf16']}), torch {m['torch']}, "
             f"{m['date']}. SmolLM2-135M's architecture and tokenizer with seeded random weights (the embedded "
             "GGUF does not travel to the lent GPU machine), Dolly's first records: this checks the CUDA code "
             f"paths, not what a model learns. {t['rounds']} rounds of {t['steps']} steps of {t['batch']} examples "
             f"per client, rank 16, {t['heldout']} held-out records.", "",
             "| run | device | autocast | clients (per round) | held-out loss before → after | s per round | "
             "train tokens / s (all rounds) | peak GPU memory |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} | | | | | | |")
            continue
        per_round = steady(r)
        memory = f"{r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] is not None else "–"
        lines.append(f"| {name} ({r['method']}) | {r['device']} | {r['autocast']} | {r['clients']} "
                     f"({round(r['clients'] * r['fraction'])}) | {r['heldout_loss_before']:.4f} → "
                     f"{r['heldout_loss_after']:.4f} | {per_round:.2f} | {r['tokens'] / r['train_seconds']:.0f} | "
                     f"{memory} |")  # fmt: skip
    lines.append("")
    if "error" not in cpu and "error" not in g32 and cpu and g32:
        first = max(abs(a - b) for a, b in zip(cpu["first_losses"], g32["first_losses"]))
        after = abs(cpu["heldout_loss_after"] - g32["heldout_loss_after"])
        lines.append(f"* CPU fp32 against GPU fp32, the same run (LoRA dropout off, so no device-specific random "
                     f"masks): the first client's step losses differ by at most {first:.2e}, the final held-out loss "
                     f"by {after:.2e}; kept ranks (Σ over modules) per round {cpu['ranks']} and {g32['ranks']}.")  # fmt: skip
        ratio = f"* Seconds per round after the first, GPU fp32 / CPU fp32 ({m['cores']} cores): {steady(g32) / steady(cpu):.3f}"
        if auto and "error" not in auto:
            ratio += (f"; GPU bf16 autocast / GPU fp32: {steady(auto) / steady(g32):.3f} (the first round, with "
                      f"CUDA's one-off set-up: {auto['round_seconds'][0]:.1f} s)")  # fmt: skip
        lines.append(ratio + ".")
    many = runs.get("cuda_auto_16clients", {})
    if auto.get("peak_gpu_mib") and many.get("peak_gpu_mib"):
        lines.append(f"* One base model for every client: peak GPU memory with 16 clients (4 a round) / 4 clients: "
                     f"{many['peak_gpu_mib'] / auto['peak_gpu_mib']:.3f}.")  # fmt: skip
    agg = doc["aggregation"]
    ok = [k for k, v in agg.items() if "max_abs_diff_relative" in v]
    worst = max((agg[k]["max_abs_diff_relative"] for k in ok), default=math.nan)
    bad = {k: v["error"] for k, v in agg.items() if "error" in v}
    where = sorted({d for k in ok for d in agg[k]["returned_on"]})
    lines.append(f"* Uploads as CUDA tensors against the same uploads as CPU tensors, every registered method: {len(ok)} "
                 f"of {len(agg)} agree, the largest difference {worst:.1e} of the update's largest entry. The server "
                 f"aggregates on the CPU by design (florist.aggregation.linalg.to_cpu: small float64 factor "
                 f"algebra), and returns {', '.join(where)} tensors" + (f"; failed: {json.dumps(bad)}" if bad else "") + ".")  # fmt: skip
    return "\n".join(lines + ["", END]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prepare", type=Path, help="write the inputs that travel to this folder")
    parser.add_argument("--inputs", type=Path, help="the folder --prepare wrote")
    parser.add_argument("--out", type=Path, help="where gpu.json goes")
    parser.add_argument("--device", default="cuda", help="cpu: try the script here (no GPU figures)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: try the script quickly")
    parser.add_argument("--doc", type=Path, help="a gpu.json: write its section of docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.prepare:
        prepare(args.prepare)
        return 0
    if args.doc:
        from common import BENCHMARKS_MD, write_section

        write_section(BENCHMARKS_MD, START, END, markdown(json.loads(args.doc.read_text())))
        return 0
    if not (args.inputs and args.out):
        parser.error("give --prepare, --inputs with --out, or --doc")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here (--device cpu tries the script on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(markdown(check(args.inputs, args.out, args.device, tiny=args.tiny)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
