"""One rule for florist's progress bars: FLORIST_PROGRESS=0 silences them all, everywhere."""

from __future__ import annotations

import pytest

from florist.evaluation.heldout import heldout_loss
from florist.evaluation.mmlu import MMLUQuestion, evaluate_mmlu
from florist.models import tiny_llama
from florist.progress import bar_disabled


def test_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLORIST_PROGRESS", raising=False)
    assert bar_disabled() is None  # tqdm decides: a terminal only
    assert bar_disabled(True) is False and bar_disabled(False) is True
    monkeypatch.setenv("FLORIST_PROGRESS", "0")
    assert bar_disabled() is True


@pytest.mark.parametrize("setting", ["0", None])
def test_evaluation_bars_follow_the_rule(setting, monkeypatch, capsys) -> None:
    if setting is None:
        monkeypatch.delenv("FLORIST_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("FLORIST_PROGRESS", setting)
    model, tok = tiny_llama(seed=0)
    questions = [MMLUQuestion("s", "Why?", ("a", "b", "c", "d"), 0)]
    evaluate_mmlu(model, tok, questions)
    heldout_loss(model, tok, [{"instruction": "Say hi.", "input": "", "output": "Hi."}])
    # pytest's captured stderr is not a terminal: no bars in either case, as in a log file.
    assert "MMLU" not in capsys.readouterr().err
    evaluate_mmlu(model, tok, questions, progress=True)
    assert ("MMLU" in capsys.readouterr().err) is True
