"""MMLU evaluation throughput on the embedded SmolLM2-135M: florist's loglik scorer against what a
user would run instead.

    python bench/evaluation.py [--questions 48] [--batch-size 8] [--full-dtype bfloat16] [--skip-full] [--no-doc]

On the same stratified sample of the 1,444-question subset (``--questions``), in the same process,
in float32 and in bfloat16, so every ratio compares like with like:

- ``florist loglik``: one forward pass per question, the LM head on the last position only, the
  prompts' shared beginning computed once (florist's default scorer);
- ``authors' protocol``: the paper's code, batch size 1, 32 sampled new tokens (temperature 0.2,
  top_p 0.6, top_k 30), the answer found by substring;
- ``florist generate``: the same protocol batched with left padding;
- ``lm-eval 0.4``: EleutherAI's harness on the same questions and prompts (florist.evaluation.harness),
  log-likelihood of " A".." D", batch size ``--batch-size``; its predictions are compared with
  florist loglik's one by one.

Then a k-shot comparison (shared prefix against recomputed prompts) and the full subset with
loglik (in ``--full-dtype``). Wall time and process CPU time are both recorded: the machine may
be shared, and CPU time is the steadier measure. Results go to bench/results/evaluation.json and
to the "Evaluation" section of docs/benchmarks.md (between the evaluation markers).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import machine, write_section  # noqa: E402

from florist.evaluation.harness import evaluate_mmlu_lm_eval  # noqa: E402
from florist.evaluation.mmlu import (  # noqa: E402
    LETTERS,
    evaluate_mmlu,
    load_mmlu,
    load_mmlu_dev,
    stratified_sample,
)
from florist.io import atomic_write_json  # noqa: E402
from florist.models import load_model  # noqa: E402

START, END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"
DEFAULT_MMLU = REPO.parent / "shared" / "data" / "mmlu" / "mmlu_test_1444.jsonl"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(
    model: Any,
    tokenizer: Any,
    questions: list,
    scorer: str,
    batch_size: int,
    dtype: str,
    label: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score ``questions`` with one scorer ("loglik", "generate" or "lm_eval"), timed after a warm-up."""
    model.to(DTYPES[dtype])

    def run(qs: list, bs: int, **extra: Any) -> dict[str, Any]:
        if scorer == "lm_eval":
            return evaluate_mmlu_lm_eval(model, tokenizer, qs, batch_size=bs, return_scores=True)
        return evaluate_mmlu(model, tokenizer, qs, scorer=scorer, batch_size=bs, **kwargs, **extra)

    # Warm-up: the first calls in a dtype pay for kernel selection, allocation and imports.
    run(questions[:2], min(2, batch_size), progress=False) if scorer != "lm_eval" else run(questions[:2], 2)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    result = run(questions, batch_size)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    if scorer == "lm_eval":
        outputs = [LETTERS[max(range(len(LETTERS)), key=row.__getitem__)] for row in result["scores"]]
    else:
        outputs = [p["output"] for p in result.get("predictions", [])]
    return {
        "label": label or scorer,
        "scorer": scorer,
        "dtype": dtype,
        "batch_size": batch_size,
        "questions": len(questions),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "questions_per_second": len(questions) / wall,
        "questions_per_cpu_second": len(questions) / cpu,
        "accuracy_macro": result["accuracy_macro"],
        "accuracy_micro": result["accuracy_micro"],
        "share_prefix": kwargs.get("share_prefix", True),
        "outputs": outputs,
    }


def markdown(report: dict[str, Any]) -> str:
    m, rows = report["machine"], report["sample"]
    lines = [
        START,
        "## Evaluation (MMLU scoring)",
        "",
        f"`python bench/evaluation.py` on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, {m['date']}, load average at start {m['load_average']}. Model: the embedded "
        f"SmolLM2-135M-Instruct on the CPU, batch size {report['batch_size']}.",
        "",
        f"Same {rows[0]['questions']} questions (stratified over subjects), same process:",
        "",
        "| scorer | dtype | batch | wall s | CPU s | questions/s | questions/CPU-s | macro acc % | micro acc % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['dtype']} | {r['batch_size']} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} "
            f"| {r['questions_per_second']:.2f} | {r['questions_per_cpu_second']:.3f} "
            f"| {100 * r['accuracy_macro']:.2f} | {100 * r['accuracy_micro']:.2f} |"
        )
    lines.append("")
    for dtype, ratios in report["speedup"].items():
        lines.append(
            f"- {dtype}: florist loglik is **{ratios['authors']['wall']:.1f}x** faster than the authors' "
            f"protocol in wall time ({ratios['authors']['cpu']:.1f}x in CPU time; target 10x), "
            f"**{ratios['lm_eval']['wall']:.1f}x** faster than lm-eval 0.4 ({ratios['lm_eval']['cpu']:.1f}x "
            f"in CPU time; target 1.5x) with {ratios['lm_eval']['differing']} of {rows[0]['questions']} "
            f"predictions differing, and {ratios['generate']['wall']:.1f}x faster than florist's batched "
            "generate."
        )
    kshot = report.get("kshot")
    if kshot:
        shared, plain = kshot["shared"], kshot["recomputed"]
        differ = sum(a != b for a, b in zip(shared["outputs"], plain["outputs"]))
        same = (
            "the same predictions"
            if differ == 0
            else f"{differ} of {len(plain['outputs'])} predictions differing"
        )
        lines += [
            "",
            f"{kshot['k']}-shot loglik on the full MMLU release ({shared['questions']} test "
            f"questions from {kshot['subjects']} subjects, dev exemplars, {shared['dtype']}), same process: with the shared prefix (each "
            f"subject's exemplars run once, then every batch continues from their KV cache) "
            f"{shared['wall_seconds']:.1f} s wall / {shared['cpu_seconds']:.1f} CPU s, recomputing every "
            f"prompt in full {plain['wall_seconds']:.1f} s / {plain['cpu_seconds']:.1f} CPU s: "
            f"**{plain['cpu_seconds'] / shared['cpu_seconds']:.1f}x** less CPU time, with {same} "
            f"(macro accuracy {100 * shared['accuracy_macro']:.2f} % and {100 * plain['accuracy_macro']:.2f} %).",
        ]
    full = report.get("full")
    if full:
        lines += [
            "",
            f"Full 1,444-question subset with loglik ({full['dtype']}): {full['wall_seconds']:.0f} s wall "
            f"({full['wall_seconds'] / 60:.1f} min, {full['questions_per_second']:.2f} questions/s, "
            f"{full['cpu_seconds']:.0f} CPU s); macro accuracy {100 * full['accuracy_macro']:.2f} %, "
            f"micro {100 * full['accuracy_micro']:.2f} % (chance is 25 %).",
        ]
    lines += [
        "",
        "Why: the authors' protocol pays a prefill plus 32 sequential decoding steps per question, one",
        "question at a time; loglik is one batched prefill, with the LM head on one position and the",
        "prompts' shared beginning (the Alpaca preamble, 54 of ~170 tokens) computed once. In float32,",
        "florist's default dtype for evaluation on a CPU, the prefill's matmuls dominate both, so the",
        "10x target against the authors' protocol is met only in bfloat16; florist keeps float32 for",
        "MMLU because bfloat16 logits of the four letters often round to ties (florist.evaluation.head).",
        "lm-eval",
        "scores four continuations per question (one forward pass over prompt + letter for each, which",
        "its caching shares only in part) and builds its task, filters and logs around them; its",
        "predictions are the same argmax of the same log-likelihoods. Generation is sampled, so its",
        "accuracy moves by a few questions between runs. The machine may be shared with other jobs, so",
        "wall times vary from run to run; the CPU-time columns are steadier.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mmlu", type=Path, default=DEFAULT_MMLU, help="the 1,444-question subset")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=48, help="sample scored by both scorers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--full-dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument(
        "--mmlu-dir", type=Path, default=DEFAULT_MMLU.parent, help="full release: test/ and dev/"
    )
    parser.add_argument("--kshot", type=int, default=5, help="k of the k-shot comparison (0: skip it)")
    parser.add_argument("--kshot-subjects", type=int, default=6, help="subjects in the k-shot comparison")
    parser.add_argument("--kshot-per-subject", type=int, default=8, help="questions per subject there")
    parser.add_argument("--skip-full", action="store_true", help="skip the full 1,444-question loglik run")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "evaluation.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()

    info = machine()
    model, tokenizer = load_model(args.model, device="cpu")
    questions = load_mmlu(args.mmlu)
    sample = stratified_sample(questions, args.questions, args.seed)
    rows = []
    speedup = {}
    for dtype in ("float32", "bfloat16"):
        group = {
            "loglik": timed(model, tokenizer, sample, "loglik", args.batch_size, dtype, "florist loglik",
                            return_predictions=True),
            "authors": timed(model, tokenizer, sample, "generate", 1, dtype, "authors' protocol (generate)"),
            "generate": timed(model, tokenizer, sample, "generate", args.batch_size, dtype, "florist generate"),
            "lm_eval": timed(model, tokenizer, sample, "lm_eval", args.batch_size, dtype, "lm-eval 0.4 (loglik)"),
        }  # fmt: skip
        rows += group.values()
        loglik = group["loglik"]
        speedup[dtype] = {
            name: {
                "wall": r["wall_seconds"] / loglik["wall_seconds"],
                "cpu": r["cpu_seconds"] / loglik["cpu_seconds"],
            }
            for name, r in group.items()
            if name != "loglik"
        }
        speedup[dtype]["lm_eval"]["differing"] = sum(
            a != b for a, b in zip(loglik["outputs"], group["lm_eval"]["outputs"])
        )
    report: dict[str, Any] = {
        "machine": info,
        "model": args.model,
        "batch_size": args.batch_size,
        "sample": rows,
        "speedup": speedup,
    }
    if args.kshot and (args.mmlu_dir / "dev").is_dir():
        # A few subjects with several questions each, as a real k-shot run has (hundreds each).
        every = load_mmlu(args.mmlu_dir)
        subjects = sorted({q.subject for q in every})[: args.kshot_subjects]
        csv_questions = [
            q for s in subjects for q in [q for q in every if q.subject == s][: args.kshot_per_subject]
        ]
        options = dict(kshot=args.kshot, dev=load_mmlu_dev(args.mmlu_dir), return_predictions=True)
        report["kshot"] = {
            "k": args.kshot,
            "subjects": len(subjects),
            # float32: in bfloat16 the two summation orders round apart and flip close calls.
            "shared": timed(model, tokenizer, csv_questions, "loglik", args.batch_size, "float32", **options),
            "recomputed": timed(
                model,
                tokenizer,
                csv_questions,
                "loglik",
                args.batch_size,
                "float32",
                share_prefix=False,
                **options,
            ),
        }
    if not args.skip_full:
        report["full"] = timed(model, tokenizer, questions, "loglik", args.batch_size, args.full_dtype)
    atomic_write_json(args.json, report)
    print(markdown(report))
    if not args.no_doc:
        write_section(args.doc, START, END, markdown(report))


if __name__ == "__main__":
    main()
