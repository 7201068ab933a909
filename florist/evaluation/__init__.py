"""Evaluation: MMLU (log-likelihood and the paper's generation scorer) and held-out instruction loss."""

from florist.evaluation.heldout import heldout_loss
from florist.evaluation.mmlu import (
    MMLUQuestion,
    evaluate_mmlu,
    generate_is_correct,
    load_mmlu,
    load_mmlu_dev,
    stratified_sample,
    summarize,
)

__all__ = [
    "MMLUQuestion",
    "evaluate_mmlu",
    "generate_is_correct",
    "heldout_loss",
    "load_mmlu",
    "load_mmlu_dev",
    "stratified_sample",
    "summarize",
]
