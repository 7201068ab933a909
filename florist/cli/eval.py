"""``florist eval``: MMLU accuracy and held-out loss of a model, a PEFT adapter or a run.

    florist eval TARGET [--mmlu PATH] [--scorer loglik|generate|both] [--eval_samples N]
                        [--heldout PATH] [--base MODEL] [--out results.json] [--kshot K] [--lm_eval]

TARGET is one of
* a model: an alias (``smollm2-135m``, the embedded default), a Hugging Face directory, a
  ``.gguf`` file or a hub id;
* a PEFT adapter directory (``adapter_config.json``): applied to ``--base``, or else to the
  config's ``base_model_name_or_path``;
* a ``florist run`` output directory (``metrics.json`` + ``adapter/``): the run's final global
  adapter on the run's base model, evaluated by default on the run's own MMLU and held-out files.

Results go to ``--out`` as JSON (written atomically) and a short table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import florist
from florist.errors import FloristError
from florist.io import atomic_write_json, resolve_path
from florist.settings import DEVICE_PATTERN, DEVICE_WORDS, Setting, check_args

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16")  # torch dtype names; torch is imported when the command runs
SCORERS = ("loglik", "generate", "both")
LOGLIK_PRECISIONS = ("float32", "checked", "bfloat16")  # florist.evaluation.mmlu.PRECISIONS (no torch import)
# Every flag's type and range, checked by florist.settings.check_args (one line naming the flag).
FLAGS = {
    "--scorer": Setting(str, choices=SCORERS),
    "--eval_samples": Setting(int, optional=True, low=1),
    "--max_heldout": Setting(int, optional=True, low=1),
    "--kshot": Setting(int, low=0),
    "--batch_size": Setting(int, low=1),
    "--cutoff_len": Setting(int, low=1),
    "--device": Setting(str, pattern=DEVICE_PATTERN, described=DEVICE_WORDS),
    "--dtype": Setting(str, choices=DTYPES),
    "--loglik_precision": Setting(str, choices=LOGLIK_PRECISIONS),
    "--seed": Setting(int, low=0),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model, PEFT adapter or run on MMLU and held-out instruction data",
        description=__doc__.split("\n\n")[0],
    )
    add_target_flags(p)
    p.add_argument(
        "--mmlu", default=None, help="MMLU: the 1,444-question subset file or a full MMLU directory"
    )
    p.add_argument("--scorer", default="loglik", help="loglik, generate or both (default: %(default)s)")
    p.add_argument(
        "--eval_samples",
        "--eval-samples",
        default=None,
        help="stratified MMLU subset of N questions",
    )
    p.add_argument(
        "--heldout", default=None, help="held-out instruction data (e.g. dolly/8/global_test.json)"
    )
    p.add_argument("--max_heldout", "--max-heldout", default=None, help="use the first N held-out records")
    p.add_argument("--out", default="eval_results.json", help="JSON results file (default: %(default)s)")
    p.add_argument("--kshot", default=0, help="k solved dev/ exemplars before each question")
    p.add_argument("--batch_size", "--batch-size", default=8)
    p.add_argument("--cutoff_len", "--cutoff-len", default=512, help="held-out truncation")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument(
        "--loglik_precision",
        "--loglik-precision",
        default="float32",
        help="float32 model only: 'checked' runs the decoder's linears in bf16 (fast on a CPU with native "
        "bf16) and rescores in float32 every question whose two best letters are close; 'bfloat16' "
        "does not rescore (default: %(default)s)",
    )
    p.add_argument("--seed", default=42)
    p.add_argument("--predictions", action="store_true", help="also write every question's prediction")
    p.add_argument(
        "--lm_eval",
        "--lm-eval",
        action="store_true",
        help="also score MMLU with lm-evaluation-harness (pip install 'florist[lmeval]'), from local files",
    )
    p.set_defaults(func=run_eval)


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """TARGET and --base, as eval, generate, chat and export take them."""
    p.add_argument(
        "target", metavar="TARGET", help="model name/dir/.gguf, PEFT adapter dir, or run output dir"
    )
    p.add_argument(
        "--base", default=None, help="base model for an adapter (default: the adapter's own record)"
    )


# --- what is being evaluated ---------------------------------------------------------------


@dataclass
class Target:
    kind: str  # model | adapter | run
    base: str
    adapter: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FloristError(f"{path}: cannot read {what}: {e}") from None


def resolve_target(target: str, base: str | None = None) -> Target:
    path = Path(target).expanduser()
    if path.is_dir() and (path / "metrics.json").is_file():
        if not (path / "adapter" / "adapter_config.json").is_file():
            raise FloristError(
                f"{path}: a run directory without adapter/adapter_config.json (unfinished run?)"
            )
        metrics = _read_json(path / "metrics.json", "the run's metrics")
        config = metrics.get("config", {}) if isinstance(metrics, dict) else {}
        adapter_config = _read_json(path / "adapter" / "adapter_config.json", "the adapter config")
        run_base = base or config.get("global_model") or adapter_config.get("base_model_name_or_path")
        if not run_base:
            raise FloristError(f"{path}: the run records no base model; pass --base")
        return Target("run", str(run_base), path / "adapter", config)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter_config = _read_json(path / "adapter_config.json", "the adapter config")
        adapter_base = base or (
            adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
        )
        if not adapter_base:
            raise FloristError(f"{path}: adapter_config.json names no base_model_name_or_path; pass --base")
        return Target("adapter", str(adapter_base), path)
    if base is not None:
        raise FloristError(f"--base is for adapters, but {target} is not an adapter or run directory")
    return Target("model", target)


def apply_adapter(model: Any, adapter: Path) -> Any:
    """``model`` with the PEFT adapter ``adapter`` on top, unmerged. Validated first (safetensors
    only, finite, shapes match this base model), then PEFT applies it, so rank_pattern and
    alpha_pattern mean exactly what they mean to PEFT."""
    import torch
    from peft import PeftModel

    from florist.adapters import read_peft_adapter

    shapes = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    read_peft_adapter(adapter, expected_shapes=shapes)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)


def load_target(target: Target, *, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """The model with the adapter folded in, and its tokenizer."""
    from florist.models import load_model

    model, tokenizer = load_model(target.base, device=device, dtype=dtype)
    if target.adapter is None:
        return model, tokenizer
    # Folding the update into the weights makes evaluation as fast as the base model.
    return apply_adapter(model, target.adapter).merge_and_unload(), tokenizer


# --- data --------------------------------------------------------------------------------------


def _run_cfg(target: Target, mmlu: str | None) -> Any:
    from florist.config import ConfigError, RunConfig

    try:
        cfg = RunConfig.from_dict(dict(target.run_config), source="metrics.json config")
    except (ConfigError, TypeError):
        cfg = RunConfig()
    if mmlu is not None:
        cfg.dev_data_path = mmlu
    return cfg


def find_inputs(
    target: Target, mmlu: str | None, heldout: str | None
) -> tuple[Path | None, Path | None, list[str]]:
    """The MMLU and held-out files: given ones, else (for a run) the run's own, else the usual places."""
    from florist import data
    from florist.evaluation.evaluator import find_mmlu_file

    notes: list[str] = []
    cfg = _run_cfg(target, mmlu)
    try:
        mmlu_path = find_mmlu_file(cfg)
    except FileNotFoundError:
        if mmlu is not None:
            raise
        mmlu_path = None
        notes.append(f"the run's MMLU file {cfg.dev_data_path} is not there: MMLU skipped")
    heldout_path = Path(heldout) if heldout is not None else None
    if heldout_path is None and target.kind == "run":
        if cfg.test_data_path:
            heldout_path = Path(cfg.test_data_path) if Path(cfg.test_data_path).is_file() else None
        else:
            heldout_path = data.find_test_file(cfg.data_path, cfg.num_clients)
        if heldout_path is None:
            notes.append("the run's held-out test file was not found: held-out loss skipped")
    if heldout_path is not None and not heldout_path.is_file():
        raise FileNotFoundError(f"held-out data not found: {heldout_path}")
    if mmlu_path is None and heldout_path is None:
        raise FloristError(
            "nothing to evaluate: pass --mmlu PATH (or set FLORIST_MMLU_PATH) and/or --heldout PATH"
        )
    return mmlu_path, heldout_path, notes


# --- the command -------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    check_args(args, FLAGS)
    resolve_path(args.out, "--out")  # a symlink loop is refused now, not after the evaluation
    if args.lm_eval and importlib.util.find_spec("lm_eval") is None:
        raise FloristError(
            "--lm_eval needs lm-evaluation-harness: pip install 'florist[lmeval]' (or lm-eval)"
        )


def run_eval(args: argparse.Namespace) -> int:
    _check_args(args)  # before the imports: bad flags answer at once
    import torch

    from florist.data import Prompter, load_dataset_file
    from florist.evaluation.heldout import heldout_loss
    from florist.evaluation.mmlu import evaluate_mmlu, load_mmlu, load_mmlu_dev

    started = time.perf_counter()
    target = resolve_target(args.target, args.base)
    mmlu_path, heldout_path, notes = find_inputs(target, args.mmlu, args.heldout)
    # Read and check all data before the (slow) model load, so bad input fails fast.
    questions = load_mmlu(mmlu_path) if mmlu_path is not None else []
    dev = load_mmlu_dev(mmlu_path) if mmlu_path is not None and args.kshot else None
    heldout = load_dataset_file(heldout_path)[0] if heldout_path is not None else []

    model, tokenizer = load_target(target, device=args.device, dtype=getattr(torch, args.dtype))
    results: dict[str, Any] = {
        "target": args.target,
        "kind": target.kind,
        "base_model": target.base,
        "adapter": str(target.adapter) if target.adapter else None,
        "device": str(next(model.parameters()).device),
        "dtype": args.dtype,
        "seed": args.seed,
        "florist_version": florist.__version__,
        "torch_version": torch.__version__,
        "machine": platform.machine(),
        "notes": notes,
    }
    if questions:
        results["mmlu"] = {"path": str(mmlu_path), "eval_samples": args.eval_samples, "kshot": args.kshot}
        # What every scorer shares: the questions, their sample and prompts, the batches.
        shared = {"batch_size": args.batch_size, "seed": args.seed, "max_questions": args.eval_samples}
        shared |= {"kshot": args.kshot, "dev": dev}
        for scorer in ("loglik", "generate") if args.scorer == "both" else (args.scorer,):
            results["mmlu"][scorer] = evaluate_mmlu(
                model,
                tokenizer,
                questions,
                scorer=scorer,
                return_predictions=args.predictions,
                **shared,
                **({"precision": args.loglik_precision} if scorer == "loglik" else {}),
            )
        if args.lm_eval:
            from florist.evaluation.harness import evaluate_mmlu_lm_eval

            results["mmlu"]["lm_eval"] = evaluate_mmlu_lm_eval(model, tokenizer, questions, **shared)
    if heldout:
        # A run's held-out records are scored with the template it trained with.
        template = dict(target.run_config or {}).get("prompt_template_name", "auto")
        results["heldout"] = {"path": str(heldout_path)} | heldout_loss(
            model,
            tokenizer,
            heldout,
            prompter=Prompter(str(template)),
            cutoff_len=args.cutoff_len,
            batch_size=args.batch_size,
            max_records=args.max_heldout,
        )
    results["seconds"] = time.perf_counter() - started
    atomic_write_json(args.out, results)
    print(format_table(results))
    print(f"results: {args.out}")
    return 0


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{results['target']} ({results['kind']}, base {results['base_model']}, {results['device']})"]
    mmlu = results.get("mmlu", {})
    scorers = [s for s in ("loglik", "generate", "lm_eval") if s in mmlu]
    if scorers:
        lines.append(f"  {'MMLU scorer':<14}{'macro %':>9}{'micro %':>9}{'n':>7}{'q/s':>8}")
        for s in scorers:
            r = mmlu[s]
            lines.append(
                f"  {s:<14}{100 * r['accuracy_macro']:>9.2f}{100 * r['accuracy_micro']:>9.2f}"
                f"{r['n_questions']:>7}{r['questions_per_second']:>8.2f}"
            )
    if "heldout" in results:
        h = results["heldout"]
        lines.append(
            f"  held-out: loss {h['loss']:.4f}, perplexity {h['perplexity']:.2f}, "
            f"token accuracy {100 * h['token_accuracy']:.2f}% over {h['n_tokens']} tokens"
        )
    lines += [f"  note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines)
