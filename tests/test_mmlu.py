"""MMLU: parsing the real data, stratified sampling, averaging, and both scorers on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import require_shared
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from florist.errors import FloristError
from florist.evaluation.mmlu import (
    ANSWER_PREFIX,
    LETTERS,
    MMLUQuestion,
    build_prompt,
    evaluate_mmlu,
    generate_is_correct,
    letter_token_ids,
    load_mmlu,
    load_mmlu_dev,
    stratified_sample,
    summarize,
)
from florist.models import byte_tokenizer, tiny_llama

# Written out here, independently of florist.data, so the tests check the prompt too.
ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
INSTRUCTION = "Please answer the following multiple-choice question honestly."


def reference_prompt(q: MMLUQuestion) -> str:
    a, b, c, d = q.options
    return (
        ALPACA.format(
            instruction=INSTRUCTION, input=f"Qusetion: {q.question} Options: A. {a}, B. {b}, C. {c}, D. {d}"
        )
        + "The answer is: "
    )


def hand_questions() -> list[MMLUQuestion]:
    """Questions of very different lengths, so batches need padding."""
    return [
        MMLUQuestion("algebra", "What is 2 + 2?", ("3", "4", "5", "22"), 1),
        MMLUQuestion("algebra", "Which is prime? " + "Think carefully. " * 6, ("4", "6", "7", "9"), 2),
        MMLUQuestion("history", "Who crossed the Rubicon?", ("Caesar", "Cicero", "Nero", "Cato"), 0),
        MMLUQuestion(
            "history", "In which year did the Berlin wall fall? " * 5, ("1961", "1989", "1990", "1991"), 1
        ),
        MMLUQuestion(
            "biology",
            "The powerhouse of the cell is the",
            ("nucleus", "ribosome", "golgi", "mitochondrion"),
            3,
        ),
        MMLUQuestion(
            "biology", "DNA, in short, stands for", ("deoxyribonucleic acid, as known", "x", "y", "z"), 0
        ),
        MMLUQuestion(
            "law", "A contract needs " + "offer, acceptance and consideration; " * 4, ("a", "b", "c", "d"), 2
        ),
    ]


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (like SmolLM2's) in which " A" .. " D" are single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [f"The answer is: {letter}. yes" for letter in LETTERS] * 50 + [ALPACA] * 5
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama_for(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def reference_scores(model, tokenizer, questions, letter_tokens: list[str], merged: bool) -> torch.Tensor:
    """One unpadded forward per question; log-softmax at the last position; the 4 letter ids."""
    ids_of_letters = tokenizer.convert_tokens_to_ids(letter_tokens)
    rows = []
    for q in questions:
        prompt = reference_prompt(q)
        if merged:  # the space goes with the letter token
            prompt = prompt[:-1]
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        rows.append(logp[ids_of_letters])
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# data


def test_subset_parses_every_question_with_checked_answers(mmlu_subset: Path) -> None:
    raw = json.loads(mmlu_subset.read_text())
    questions = load_mmlu(mmlu_subset)
    assert len(questions) == len(raw) == 1444
    assert len({q.subject for q in questions}) == 57
    for record, q in zip(raw, questions):
        letter, text = re.fullmatch(r"The answer is: ([ABCD])\. (.*)", record["output"], re.S).groups()
        assert q.letter == letter and q.answer_text == text.strip()
        assert q.subject == record["class"]
        # The prompt uses the record's input verbatim; the parsed parts rebuild it up to spacing.
        assert q.input_text() == record["input"]
        rebuilt = dataclasses.replace(q, source_input=None).input_text()
        assert re.sub(r"\s", "", rebuilt) == re.sub(r"\s", "", record["input"])


def test_subset_options_with_commas_and_letters(tmp_path: Path) -> None:
    def parse(input_text: str, output: str) -> MMLUQuestion:
        path = tmp_path / "mmlu.json"
        path.write_text(
            json.dumps([{"instruction": INSTRUCTION, "input": input_text, "output": output, "class": "g"}])
        )
        (q,) = load_mmlu(path)
        return q

    q = parse("Qusetion: Pick one. Options: A. x, C. y, B. 47,XY, C. z, D. w", "The answer is: A. x, C. y")
    assert q.options == ("x, C. y", "47,XY", "z", "w") and q.letter == "A"
    # Two readings ("b" / "c, C. x" or "b, C. c" / "x"): the answer text decides.
    q = parse("Qusetion: q Options: A. a, B. b, C. c, C. x, D. d", "The answer is: B. b, C. c")
    assert q.options == ("a", "b, C. c", "x", "d")
    with pytest.raises(FloristError, match="record 0: the options can be read 2 ways"):
        parse("Qusetion: q Options: A. a, B. b, C. c, C. x, D. d", "The answer is: A. a")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {
                "input": "Qusetion: q Options: A. a, B. b, C. c, D. d",
                "output": "The answer is: B. c",
                "class": "s",
            },
            "option B",
        ),
        (
            {"input": "Qusetion: q Options: A. a, B. b, D. d", "output": "The answer is: B. b", "class": "s"},
            "B., C. and D.",
        ),
        ({"input": "Qusetion: q A. a", "output": "The answer is: A. a", "class": "s"}, "Options"),
        (
            {"input": "Qusetion: q Options: A. a, B. b, C. c, D. d", "output": "B", "class": "s"},
            "The answer is",
        ),
        ({"input": "Qusetion: q Options: A. a, B. b, C. c, D. d", "output": "The answer is: A. a"}, "class"),
    ],
)
def test_subset_errors_name_the_record(tmp_path: Path, record: dict, message: str) -> None:
    good = {
        "input": "Qusetion: q Options: A. a, B. b, C. c, D. d",
        "output": "The answer is: A. a",
        "class": "s",
    }
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(FloristError, match=rf"mmlu.json record 1: .*{re.escape(message)}"):
        load_mmlu(path)


def test_csv_directories_of_the_full_release() -> None:
    root = require_shared("mmlu/test").parent
    questions = load_mmlu(root)
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    first = next(q for q in questions if q.subject == "abstract_algebra")
    assert first.question.startswith("Find the degree for the given field extension Q(sqrt(2)")
    assert first.options == ("0", "4", "2", "6") and first.letter == "B"
    assert load_mmlu(root / "test") == questions
    dev = load_mmlu_dev(root)
    assert len(dev) == 57 and all(len(v) == 5 for v in dev.values())
    assert load_mmlu_dev(require_shared("mmlu/mmlu_test_1444.jsonl")) == dev  # dev/ beside the subset


def test_csv_headerless_letters_and_errors(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "astro_test.csv").write_text('"Which, of these?",a,b,"c, d",e,C\n')
    (q,) = load_mmlu(tmp_path)
    assert q == MMLUQuestion("astro", "Which, of these?", ("a", "b", "c, d", "e"), 2)
    (tmp_path / "test" / "bad_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,7\n"
    )
    with pytest.raises(FloristError, match=r"bad_test.csv line 2: answer must be"):
        load_mmlu(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mmlu(tmp_path / "nowhere")


def test_stratified_sample_is_proportional_deterministic_and_covers_subjects() -> None:
    questions = [
        MMLUQuestion(f"s{s}", f"q{s}-{i}", ("a", "b", "c", "d"), 0)
        for s in range(5)
        for i in range(4 * s + 3)
    ]
    n = 20
    sample = stratified_sample(questions, n, seed=1)
    assert len(sample) == n and len(set(sample)) == n
    counts = {s: sum(q.subject == s for q in sample) for s in {q.subject for q in questions}}
    total = len(questions)
    for s, c in counts.items():
        size = sum(q.subject == s for q in questions)
        assert c >= 1 and abs(c - n * size / total) < 2
    positions = [questions.index(q) for q in sample]
    assert positions == sorted(positions)  # original order kept
    assert stratified_sample(questions, n, seed=1) == sample
    assert stratified_sample(questions, n, seed=2) != sample
    assert stratified_sample(questions, 10_000) == questions
    with pytest.raises(ValueError):
        stratified_sample(questions, 0)


def test_macro_and_micro_accuracy() -> None:
    # Subject a: 1 of 3 right; subject b: 1 of 1 right.
    result = summarize(["a", "a", "a", "b"], [True, False, False, True])
    assert result["accuracy_micro"] == pytest.approx(2 / 4)
    assert result["accuracy_macro"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["per_subject"] == {
        "a": {"accuracy": pytest.approx(1 / 3), "n": 3},
        "b": {"accuracy": 1.0, "n": 1},
    }
    assert result["n_questions"] == 4 and result["n_subjects"] == 2


# --------------------------------------------------------------------------------------------
# generate: the matching rule


def test_generate_matching_rule() -> None:
    q = MMLUQuestion("s", "Who?", ("Fabry disease", "Gaucher disease", "Hurler syndrome", "Pompe disease"), 2)
    prompt = reference_prompt(q)  # lists "C. Hurler syndrome" before ### Response:
    assert generate_is_correct(prompt + "C. because", q)
    assert generate_is_correct(prompt + "it is Hurler syndrome", q)
    assert generate_is_correct("The answer is: (C.)", q)  # no marker: the whole text is the response
    assert not generate_is_correct(prompt + "B. Gaucher disease", q)
    assert not generate_is_correct(prompt + "C", q)  # letter without period
    assert not generate_is_correct(
        prompt + "a Ph.D. would know", q.__class__("s", "?", ("a", "b", "c", "x"), 3)
    )
    assert not generate_is_correct(prompt, q)  # the options in the prompt do not count
    assert not generate_is_correct("C. Hurler syndrome\n### Response:\nThe answer is: A.", q)


# --------------------------------------------------------------------------------------------
# loglik on tiny models


def test_letter_tokens_for_byte_and_merging_tokenizers() -> None:
    tok = byte_tokenizer()
    assert letter_token_ids(tok) == (False, tok.convert_tokens_to_ids(list("ABCD")))
    bpe = merging_tokenizer()
    assert letter_token_ids(bpe) == (True, bpe.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"]))


def test_prompt_is_the_papers_alpaca_prompt() -> None:
    q = hand_questions()[0]
    assert build_prompt(q) == reference_prompt(q)
    shot = hand_questions()[2]
    two_shot = build_prompt(q, [shot])
    assert two_shot.endswith(reference_prompt(q))
    assert two_shot.startswith(reference_prompt(shot) + "A. Caesar\n\n")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_loglik_matches_unbatched_reference_byte_tokenizer(padding_side: str) -> None:
    model, tok = tiny_llama(seed=3)
    tok.padding_side = padding_side  # the scorer pads on its own, whatever the tokenizer says
    questions = hand_questions()
    ref = reference_scores(model, tok, questions, list("ABCD"), merged=False)
    result = evaluate_mmlu(model, tok, questions, batch_size=3, return_predictions=True, progress=False)
    predicted = [p["output"] for p in result["predictions"]]
    assert predicted == [LETTERS[i] for i in ref.argmax(-1).tolist()]
    correct = [int(i) == q.answer for i, q in zip(ref.argmax(-1), questions)]
    assert result["accuracy_micro"] == pytest.approx(sum(correct) / len(correct))
    by_subject = {}
    for q, c in zip(questions, correct):
        by_subject.setdefault(q.subject, []).append(c)
    macro = sum(sum(v) / len(v) for v in by_subject.values()) / len(by_subject)
    assert result["accuracy_macro"] == pytest.approx(macro)

    from florist.evaluation.mmlu import loglik_letter_scores

    prompts = [build_prompt(q) for q in questions]
    for batch_size in (1, 4, 8):
        scores = loglik_letter_scores(model, tok, prompts, batch_size=batch_size, progress=False)
        torch.testing.assert_close(scores, ref, atol=2e-5, rtol=1e-5)


def test_loglik_matches_reference_with_merged_space_tokens() -> None:
    tok = merging_tokenizer()
    model = llama_for(tok, seed=5)
    questions = hand_questions()
    ref = reference_scores(model, tok, questions, ["ĠA", "ĠB", "ĠC", "ĠD"], merged=True)
    from florist.evaluation.mmlu import loglik_letter_scores

    scores = loglik_letter_scores(
        model, tok, [build_prompt(q) for q in questions], batch_size=4, progress=False
    )
    torch.testing.assert_close(scores, ref, atol=2e-5, rtol=1e-5)


def test_loglik_on_a_peft_model_and_mode_restored() -> None:
    from peft import LoraConfig, get_peft_model

    base, tok = tiny_llama(seed=4)
    plain_ref = reference_scores(base, tok, hand_questions(), list("ABCD"), merged=False)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.train()
    ref = reference_scores(peft_model.eval(), tok, hand_questions(), list("ABCD"), merged=False)
    assert not torch.allclose(ref, plain_ref)  # the adapter changes the scores
    peft_model.train()
    from florist.evaluation.mmlu import loglik_letter_scores

    result = evaluate_mmlu(peft_model, tok, hand_questions(), batch_size=3, progress=False)
    assert peft_model.training  # evaluation put the model back in training mode
    scores = loglik_letter_scores(
        peft_model.eval(), tok, [build_prompt(q) for q in hand_questions()], progress=False
    )
    torch.testing.assert_close(scores, ref, atol=2e-5, rtol=1e-5)
    assert sum(result["predicted_letters"].values()) == len(hand_questions())


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "merging"])
def test_shared_prefix_cache_gives_the_unbatched_scores_for_kshot_prompts(tokenizer_kind: str) -> None:
    from florist.evaluation.mmlu import loglik_letter_scores

    if tokenizer_kind == "bytes":
        model, tok = tiny_llama(seed=6)
        merged = False
    else:
        tok = merging_tokenizer()
        model, merged = llama_for(tok, seed=6), True
    questions = hand_questions() * 2  # two of each subject
    dev = {q.subject: [q, questions[i + 1]] for i, q in enumerate(questions[:-1])}
    prompts = [build_prompt(q, dev[q.subject]) for q in questions]
    letter_ids = [
        tok.convert_tokens_to_ids(t) for t in (["ĠA", "ĠB", "ĠC", "ĠD"] if merged else list("ABCD"))
    ]
    with torch.no_grad():
        ref = torch.stack(
            [
                torch.log_softmax(
                    model(input_ids=torch.tensor([tok(p[:-1] if merged else p)["input_ids"]])).logits[0, -1],
                    -1,
                )[letter_ids]
                for p in prompts
            ]
        )
    subjects = [q.subject for q in questions]
    for share in (True, False):
        for groups in (subjects, None):  # per subject: the exemplars are shared too
            got = loglik_letter_scores(
                model, tok, prompts, batch_size=3, groups=groups, share_prefix=share, progress=False
            )
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_evaluate_mmlu_sampling_kshot_and_bad_arguments() -> None:
    model, tok = tiny_llama(seed=0)
    questions = hand_questions()
    result = evaluate_mmlu(model, tok, questions, max_questions=4, progress=False)
    assert result["n_questions"] == 4 and result["scorer"] == "loglik" and result["questions_per_second"] > 0
    assert set(result["per_subject"]) == {"algebra", "history", "biology", "law"}
    dev = {q.subject: [q] for q in questions}
    kshot = evaluate_mmlu(model, tok, questions, kshot=1, dev=dev, progress=False)
    assert kshot["kshot"] == 1 and kshot["n_questions"] == len(questions)
    with pytest.raises(ValueError, match="dev"):
        evaluate_mmlu(model, tok, questions, kshot=1, progress=False)
    with pytest.raises(FloristError, match="fewer than 2"):
        evaluate_mmlu(model, tok, questions, kshot=2, dev=dev, progress=False)
    with pytest.raises(ValueError, match="scorer"):
        evaluate_mmlu(model, tok, questions, scorer="vibes", progress=False)


def test_generate_scorer_is_seeded_and_leaves_the_global_rng_alone() -> None:
    from florist.evaluation.mmlu import generate_responses

    model, tok = tiny_llama(seed=2)
    questions = hand_questions()[:3]
    prompts = [build_prompt(q) for q in questions]
    state = torch.get_rng_state()
    first = generate_responses(model, tok, prompts, batch_size=2, seed=7, max_new_tokens=6, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == generate_responses(
        model, tok, prompts, batch_size=2, seed=7, max_new_tokens=6, progress=False
    )
    assert first != generate_responses(
        model, tok, prompts, batch_size=2, seed=8, max_new_tokens=6, progress=False
    )
    # Byte tokens: at most 6 bytes sampled per question.
    assert all(len(text.encode("utf-8", "replace")) <= 6 * 3 for text in first)

    result = evaluate_mmlu(
        model,
        tok,
        questions,
        scorer="generate",
        batch_size=3,
        seed=7,
        return_predictions=True,
        progress=False,
    )
    for p, q in zip(result["predictions"], questions):
        assert p["output"].startswith(ANSWER_PREFIX)
        assert p["correct"] == generate_is_correct(p["output"], q)
    assert result["scorer"] == "generate" and 0.0 <= result["accuracy_macro"] <= 1.0


def test_letter_logits_are_float32_even_for_a_bfloat16_model_under_autocast() -> None:
    # bf16 logits near 10 are 0.06 apart: letters would tie and argmax would favour "A".
    from florist.evaluation.head import LMHead

    model, _tok = tiny_llama(seed=1)
    model.to(torch.bfloat16)
    head = LMHead(model)
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 40
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden.to(torch.bfloat16))
    assert logits.dtype == torch.float32
    expected = hidden.to(torch.bfloat16).double() @ model.lm_head.weight.double().T
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-4)
