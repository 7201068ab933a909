"""The global model's evaluation in a run: held-out loss and MMLU, each when its data is found.

``florist run``, the sweep and the Flower server evaluate the global model with this one
``Evaluator``, so their numbers are the same computation on the same records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from florist.aggregation import Adapter
from florist.config import RunConfig
from florist.evaluation.head import eval_mode

MMLU_FILE_NAME = "mmlu_test_1444.jsonl"


def find_mmlu_file(cfg: RunConfig) -> Path | None:
    """cfg.dev_data_path, else $FLORIST_MMLU_PATH, else mmlu_test_1444.jsonl in data_path or cwd."""
    if cfg.dev_data_path:
        path = Path(cfg.dev_data_path)
        if not path.exists():
            raise FileNotFoundError(f"dev_data_path {path} (the MMLU file) does not exist")
        return path
    env = os.environ.get("FLORIST_MMLU_PATH")
    if env:
        if not Path(env).exists():
            raise FileNotFoundError(f"FLORIST_MMLU_PATH={env} does not exist")
        return Path(env)
    for candidate in (Path(cfg.data_path) / MMLU_FILE_NAME, Path.cwd() / MMLU_FILE_NAME):
        if candidate.is_file():
            return candidate
    return None


class Evaluator:
    """Held-out loss and MMLU on the global model, each when its data is available."""

    def __init__(self, cfg: RunConfig, prompter: Any) -> None:
        from florist import data

        self.cfg, self.prompter = cfg, prompter
        self.heldout: list[dict] = []
        self.mmlu: list[Any] = []
        self.notes: list[str] = []
        if not cfg.evaluate:
            return
        test_file = (
            Path(cfg.test_data_path)
            if cfg.test_data_path
            else data.find_test_file(cfg.data_path, cfg.num_clients)
        )
        if test_file is not None:
            self.heldout, _ = data.load_dataset_file(test_file)  # errors name the file and record
        else:
            self.notes.append("no held-out test file (global_test.json): held-out loss skipped")
        mmlu_file = find_mmlu_file(cfg)
        if mmlu_file is not None:
            from florist.evaluation.mmlu import load_mmlu

            self.mmlu = load_mmlu(mmlu_file)
        else:
            self.notes.append(
                f"no MMLU file ({MMLU_FILE_NAME} via --dev_data_path or FLORIST_MMLU_PATH): MMLU skipped"
            )

    @property
    def enabled(self) -> bool:
        """Whether there is anything to evaluate."""
        return bool(self.heldout or self.mmlu)

    def __call__(
        self, host: Any, tokenizer: Any, adapter: Adapter | None, *, samples: int | None = None
    ) -> dict[str, Any]:
        """Evaluate ``host``'s base with ``adapter`` active (None: the base alone) on the first
        ``samples`` records and questions (None: ``eval_samples``)."""
        samples = samples if samples is not None else self.cfg.eval_samples
        out: dict[str, Any] = {}
        if not (self.heldout or self.mmlu):
            return out
        model = host.model
        with eval_mode(model), host.use_adapter(adapter):
            if self.heldout:
                from florist.evaluation.heldout import heldout_loss

                out["heldout"] = heldout_loss(
                    model,
                    tokenizer,
                    self.heldout,
                    cutoff_len=self.cfg.cutoff_len,
                    prompter=self.prompter,
                    max_records=samples,
                )
            if self.mmlu:
                from florist.evaluation.mmlu import evaluate_mmlu

                out["mmlu"] = evaluate_mmlu(
                    model,
                    tokenizer,
                    self.mmlu,
                    scorer=self.cfg.eval_scorer,
                    seed=self.cfg.seed,
                    max_questions=samples,
                )
        return out
