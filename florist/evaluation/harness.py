"""MMLU through EleutherAI's lm-evaluation-harness, on local files only (optional: ``florist[lmeval]``).

The questions (the 1,444 subset or the CSV release, any stratified sample, k-shot exemplars) are
the ones florist's own scorers see: they are written to a JSONL file beside a generated task
YAML (``dataset_path: json``), so the harness reads them from disk and never from the hub. Each
prompt is florist's, ending "The answer is:"; the harness scores the continuations " A".." D" by
log-likelihood (its ``multiple_choice`` output type). That makes it an independent check of
florist's ``loglik`` scorer, on the same model object (base, adapter or merged) in memory.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from florist.errors import FloristError
from florist.evaluation.head import eval_mode
from florist.evaluation.mmlu import LETTERS, MMLUQuestion, prepare_questions, summarize

TASK = "florist_mmlu"


def _task_yaml(docs: Path) -> str:
    # JSON strings are valid YAML scalars, so odd characters in the path cannot break the file.
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(docs))}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: {json.dumps(list(LETTERS))}
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def evaluate_mmlu_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MMLUQuestion],
    *,
    batch_size: int = 8,
    seed: int = 42,
    max_questions: int | None = None,
    kshot: int = 0,
    dev: dict[str, list[MMLUQuestion]] | None = None,
    return_scores: bool = False,
) -> dict[str, Any]:
    """MMLU accuracy of ``model`` scored by lm-evaluation-harness; keys as ``evaluate_mmlu``'s."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FloristError(
            "lm-evaluation-harness is not installed: pip install 'florist[lmeval]' (or lm-eval)"
        ) from None
    questions, prompts = prepare_questions(
        questions, batch_size=batch_size, seed=seed, max_questions=max_questions, kshot=kshot, dev=dev
    )

    start = time.perf_counter()
    with eval_mode(model), tempfile.TemporaryDirectory(prefix="florist-lm-eval-") as tmp:
        docs = Path(tmp) / "questions.jsonl"
        with docs.open("w", encoding="utf-8") as f:
            for q, prompt in zip(questions, prompts):
                # The harness puts the delimiter " " between the prompt and the letter.
                doc = {"prompt": prompt.rstrip(" "), "answer": q.answer, "subject": q.subject}
                f.write(json.dumps(doc) + "\n")
        (Path(tmp) / f"{TASK}.yaml").write_text(_task_yaml(docs), encoding="utf-8")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[TASK],
            task_manager=TaskManager(include_path=tmp),
            num_fewshot=0,  # exemplars, if any, are already in florist's prompt
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    seconds = time.perf_counter() - start

    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    if len(samples) != len(questions):
        raise FloristError(f"lm-eval scored {len(samples)} of {len(questions)} questions")
    scores = [[float(ll) for ll, _greedy in s["filtered_resps"]] for s in samples]
    predicted = [max(range(len(LETTERS)), key=row.__getitem__) for row in scores]
    correct = [p == q.answer for p, q in zip(predicted, questions)]
    result = summarize([q.subject for q in questions], correct)
    result.update(
        scorer="lm_eval",
        kshot=kshot,
        seconds=seconds,
        questions_per_second=len(questions) / seconds,
        lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
        harness_accuracy=float(out["results"][TASK]["acc,none"]),
    )
    if return_scores:
        result["scores"] = scores
    return result
