"""``florist eval`` on a saved tiny model, a PEFT adapter and a run directory; the real model (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from florist.cli import main
from florist.evaluation.heldout import heldout_loss
from florist.evaluation.mmlu import evaluate_mmlu, load_mmlu
from florist.models import load_model, tiny_llama

SUBJECTS = ("anatomy", "astronomy", "virology")
HELDOUT = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]


def subset_record(subject: str, i: int) -> dict:
    options = [f"option {k} of {i}" for k in range(4)]
    letter = "ABCD"[i % 4]
    return {
        "instruction": "Please answer the following multiple-choice question honestly.",
        "input": f"Qusetion: question {i} about {subject}{'?' * i} Options: "
        + ", ".join(f"{L}. {o}" for L, o in zip("ABCD", options)),
        "output": f"The answer is: {letter}. {options[i % 4]}",
        "class": subject,
    }


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLORIST_MMLU_PATH", raising=False)
    model, tok = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(json.dumps([subset_record(s, i) for s in SUBJECTS for i in range(4)]))
    heldout = tmp_path / "test.json"
    heldout.write_text(json.dumps(HELDOUT))
    return {"root": tmp_path, "model": tmp_path / "tiny", "mmlu": mmlu, "heldout": heldout}


def make_adapter(ws: dict[str, Path]) -> tuple[Path, object, object]:
    from peft import LoraConfig, get_peft_model

    base, tok = load_model(str(ws["model"]), device="cpu")
    # Seeded, and scaled up (alpha 64 over r 4): the tiny random model's loss is near ln(vocab)
    # whatever it is fed, and an adapter drawn from whatever state earlier tests left the global
    # RNG in once moved it by less than the tolerance the tests use to tell it from the base.
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(ws["root"] / "adapter")  # records base_model_name_or_path = the tiny dir
    return ws["root"] / "adapter", peft_model.eval(), tok


def test_eval_base_model_both_scorers_and_heldout(workspace, capsys) -> None:
    out = workspace["root"] / "res.json"
    argv = ["eval", str(workspace["model"]), "--mmlu", str(workspace["mmlu"]), "--scorer", "both"]
    assert main([*argv, "--heldout", str(workspace["heldout"]), "--out", str(out), "--batch_size", "12"]) == 0
    results = json.loads(out.read_text())
    assert results["kind"] == "model" and results["device"] == "cpu"

    model, tok = load_model(str(workspace["model"]), device="cpu")
    expected = evaluate_mmlu(model, tok, load_mmlu(workspace["mmlu"]), progress=False)
    got = results["mmlu"]["loglik"]
    assert got["accuracy_macro"] == pytest.approx(expected["accuracy_macro"])
    assert got["predicted_letters"] == expected["predicted_letters"]
    assert got["n_questions"] == 12 and set(got["per_subject"]) == set(SUBJECTS)
    assert results["mmlu"]["generate"]["scorer"] == "generate"
    loss = heldout_loss(model, tok, HELDOUT, progress=False)
    assert results["heldout"]["loss"] == pytest.approx(loss["loss"], rel=1e-5)
    table = capsys.readouterr().out
    assert "loglik" in table and "generate" in table and "held-out" in table


def test_eval_adapter_and_run_directory(workspace) -> None:
    adapter, peft_model, tok = make_adapter(workspace)
    questions = load_mmlu(workspace["mmlu"])
    expected = evaluate_mmlu(peft_model, tok, questions, return_predictions=True, progress=False)
    expected_loss = heldout_loss(peft_model, tok, HELDOUT, progress=False)["loss"]
    base_loss = heldout_loss(*load_model(str(workspace["model"]), device="cpu"), HELDOUT, progress=False)[
        "loss"
    ]

    out = workspace["root"] / "adapter.json"
    argv = ["eval", str(adapter), "--mmlu", str(workspace["mmlu"]), "--heldout", str(workspace["heldout"])]
    assert main([*argv, "--out", str(out), "--predictions"]) == 0
    results = json.loads(out.read_text())
    assert results["kind"] == "adapter" and results["base_model"] == str(workspace["model"])
    got = results["mmlu"]["loglik"]
    assert [p["output"] for p in got["predictions"]] == [p["output"] for p in expected["predictions"]]
    assert results["heldout"]["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert abs(results["heldout"]["loss"] - base_loss) > 1e-2  # the adapter was applied

    # A run directory: the run's config says where its MMLU and held-out files are.
    run = workspace["root"] / "run"
    (run / "data" / "2").mkdir(parents=True)
    shutil.copy(workspace["heldout"], run / "data" / "2" / "global_test.json")
    shutil.copytree(adapter, run / "adapter")
    config = {
        "global_model": str(workspace["model"]),
        "data_path": str(run / "data"),
        "num_clients": 2,
        "dev_data_path": str(workspace["mmlu"]),
    }
    (run / "metrics.json").write_text(json.dumps({"config": config}))
    out = workspace["root"] / "run.json"
    assert main(["eval", str(run), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["kind"] == "run"
    assert results["mmlu"]["loglik"]["predicted_letters"] == expected["predicted_letters"]
    assert results["heldout"]["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert results["heldout"]["path"] == str(run / "data" / "2" / "global_test.json")


def test_eval_loglik_precision_flag(workspace, capsys) -> None:
    """--loglik_precision reaches the scorer: 'checked' reports how many questions it rescored in
    float32; an unknown precision is one line naming the flag, before anything runs."""
    mmlu = ["--mmlu", str(workspace["mmlu"]), "--scorer", "loglik"]
    out = workspace["root"] / "checked.json"
    assert (
        main(["eval", str(workspace["model"]), *mmlu, "--loglik_precision", "checked", "--out", str(out)])
        == 0
    )
    loglik = json.loads(out.read_text())["mmlu"]["loglik"]
    assert loglik["precision"] == "checked" and 0 <= loglik["rescored_float32"] <= loglik["n_questions"]
    capsys.readouterr()
    bad = workspace["root"] / "bad.json"
    assert (
        main(["eval", str(workspace["model"]), *mmlu, "--loglik_precision", "int8", "--out", str(bad)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--loglik_precision" in err[0] and not bad.exists()


def test_eval_errors_are_one_line_and_write_nothing(workspace, capsys) -> None:
    out = workspace["root"] / "never.json"
    mmlu = ["--mmlu", str(workspace["mmlu"]), "--out", str(out)]

    assert main(["eval", str(workspace["root"] / "missing-model"), *mmlu]) == 2
    assert "florist: error:" in capsys.readouterr().err

    pickled = workspace["root"] / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(workspace["model"])})
    )
    (pickled / "adapter_model.bin").write_bytes(b"not a pickle you want to open")
    assert main(["eval", str(pickled), *mmlu]) == 2
    assert "pickle" in capsys.readouterr().err

    assert main(["eval", str(workspace["model"]), "--out", str(out)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(workspace["model"]), *mmlu, "--eval_samples", "0"]) == 2
    assert main(["eval", str(workspace["model"]), "--mmlu", str(workspace["root"] / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_eval_embedded_smollm2_both_scorers(mmlu_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "smollm2.json"
    from florist.models import cpu_has_fast_bf16

    # A stratified sample (subjects in proportion to their size; that every subject gets one once
    # n >= 57 is tests/test_mmlu.py's), both scorers, in the CPU's fast dtype: bfloat16 is 4x
    # slower than float32 on a CPU without native bf16. Batches of 16 halve generation's steps.
    n = 24
    dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    argv = ["eval", "smollm2-135m", "--mmlu", str(mmlu_subset), "--eval_samples", str(n), "--scorer", "both"]
    argv += ["--batch_size", "16"]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--dtype", dtype]) == 0
    results = json.loads(out.read_text())
    for scorer in ("loglik", "generate"):
        r = results["mmlu"][scorer]
        assert r["n_questions"] == n and 12 <= r["n_subjects"] <= n
        assert sum(v["n"] for v in r["per_subject"].values()) == n
        assert 0.0 <= r["accuracy_macro"] <= 1.0 and 0.0 <= r["accuracy_micro"] <= 1.0
    # A 135M model is near chance on MMLU, but loglik must not collapse onto one letter.
    assert sum(n > 0 for n in results["mmlu"]["loglik"]["predicted_letters"].values()) >= 2


@pytest.mark.slow
def test_lm_eval_harness_matches_florist_loglik_on_smollm2(mmlu_subset: Path) -> None:
    from florist.evaluation.harness import evaluate_mmlu_lm_eval
    from florist.evaluation.mmlu import build_prompt, loglik_letter_scores, stratified_sample

    # SmolLM2's tokenizer writes " A" as one token, so the harness's log-likelihoods of the
    # continuations are the very numbers florist's scorer reads; fp32 for a tight comparison.
    model, tok = load_model("smollm2-135m", device="cpu")
    questions = stratified_sample(load_mmlu(mmlu_subset), 8, seed=0)
    harness = evaluate_mmlu_lm_eval(model, tok, questions, return_scores=True)
    ours = loglik_letter_scores(model, tok, [build_prompt(q) for q in questions], progress=False)
    torch.testing.assert_close(torch.tensor(harness["scores"]), ours, atol=1e-3, rtol=1e-4)
