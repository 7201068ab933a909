"""MMLU through lm-evaluation-harness agrees with florist's own loglik scorer, offline."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_eval import workspace  # noqa: F401  (fixture)
from test_mmlu import hand_questions, llama_for, merging_tokenizer

from florist.cli import main
from florist.evaluation.harness import evaluate_mmlu_lm_eval
from florist.evaluation.mmlu import build_prompt, evaluate_mmlu, load_mmlu, loglik_letter_scores
from florist.models import load_model, tiny_llama


def _florist_scores(model, tok, questions) -> torch.Tensor:
    return loglik_letter_scores(
        model, tok, [build_prompt(q) for q in questions], batch_size=3, progress=False
    )


def test_harness_scores_equal_florist_loglik_with_merged_space_tokens() -> None:
    # " A" .. " D" are single tokens here: the harness's continuation log-likelihoods are
    # exactly the log-probabilities florist's scorer reads at the last prompt position.
    tok = merging_tokenizer()
    model = llama_for(tok, seed=5)
    questions = hand_questions()
    result = evaluate_mmlu_lm_eval(model, tok, questions, batch_size=4, return_scores=True)
    torch.testing.assert_close(
        torch.tensor(result["scores"]), _florist_scores(model, tok, questions), atol=2e-5, rtol=1e-5
    )
    florist = evaluate_mmlu(model, tok, questions, batch_size=4, progress=False)
    for key in ("accuracy_macro", "accuracy_micro", "per_subject", "n_questions"):
        assert result[key] == florist[key]
    assert result["harness_accuracy"] == pytest.approx(result["accuracy_micro"])
    assert result["scorer"] == "lm_eval" and result["questions_per_second"] > 0


def test_harness_agrees_up_to_the_shared_space_token_with_a_byte_tokenizer() -> None:
    # Bytes: the harness scores " " + letter, florist the letter after the prompt's space. The
    # space's log-probability is the same for all four options, so the differences must agree.
    model, tok = tiny_llama(seed=3)
    questions = hand_questions()
    result = evaluate_mmlu_lm_eval(model, tok, questions, batch_size=2, return_scores=True)
    harness = torch.tensor(result["scores"])
    ours = _florist_scores(model, tok, questions)
    torch.testing.assert_close(harness - harness[:, :1], ours - ours[:, :1], atol=5e-5, rtol=1e-5)
    assert not torch.allclose(harness, ours)  # really the " " + letter continuation


def test_florist_eval_lm_eval_flag(workspace, capsys) -> None:  # noqa: F811
    out = workspace["root"] / "res.json"
    argv = ["eval", str(workspace["model"]), "--mmlu", str(workspace["mmlu"]), "--lm_eval", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    harness, loglik = results["mmlu"]["lm_eval"], results["mmlu"]["loglik"]
    assert harness["n_questions"] == loglik["n_questions"] == 12
    assert harness["accuracy_macro"] == pytest.approx(loglik["accuracy_macro"])
    assert set(harness["per_subject"]) == set(loglik["per_subject"])
    assert "lm_eval" in capsys.readouterr().out

    model, tok = load_model(str(workspace["model"]), device="cpu")
    direct = evaluate_mmlu_lm_eval(model, tok, load_mmlu(workspace["mmlu"]))
    assert direct["accuracy_micro"] == harness["accuracy_micro"]


def test_florist_eval_lm_eval_missing_is_one_line(workspace, capsys, monkeypatch) -> None:  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    out = workspace["root"] / "res.json"
    argv = ["eval", str(workspace["model"]), "--mmlu", str(workspace["mmlu"]), "--lm_eval", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lm-eval" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
