"""MMLU: the FLoRA/FLoRIST 1,444-question subset or the full CSV release, and two scorers.

``loglik`` (the default) is deterministic: one forward pass per question, the logits of the
last prompt position only, and the answer is the letter A/B/C/D with the highest
log-probability. ``generate`` is the paper's protocol: sample 32 tokens (temperature 0.2,
top-p 0.6, top-k 30) after "The answer is: " and count the answer correct if the response
contains the correct letter followed by a period, or the answer text.

Both prompt the model in the Alpaca format the paper uses. The reported score is the mean of
the per-subject accuracies (``accuracy_macro``), as in the paper.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from florist.data import load_records, padded_width
from florist.errors import FloristError
from florist.evaluation.head import LMHead, body_in_bfloat16, eval_mode
from florist.progress import bar_disabled

LETTERS = ("A", "B", "C", "D")
# The header of an MMLU CSV with one (the Hub's, as `florist data fetch mmlu` writes it).
CSV_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
INSTRUCTION = "Please answer the following multiple-choice question honestly."
ANSWER_PREFIX = "The answer is: "
# The paper's generation settings.
GENERATE_KWARGS = {"temperature": 0.2, "top_p": 0.6, "top_k": 30}
GENERATE_MAX_NEW_TOKENS = 32
SCORERS = ("loglik", "generate")
# How loglik runs the model: float32 throughout (the default); "checked": the decoder in bfloat16
# with the head in float32, and every question whose leading letter is ahead by less than
# CHECK_MARGIN rescored in float32; "bfloat16": the same without the rescoring (predictions may
# differ from float32's; bench/evaluation.py counts them).
PRECISIONS = ("float32", "checked", "bfloat16")
# Nats between the two best letters below which a bf16-body score is redone in float32. On the
# 1,444 questions with SmolLM2-135M the bf16 body moved the gap between two letters' log-
# probabilities by at most MEASURED (bench/evaluation.py measures it on every run).
CHECK_MARGIN = 0.25
# Shorter shared prompt beginnings are not worth a KV cache of their own.
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: int  # index into options, 0..3
    # The subset's own input text, kept verbatim (odd spacing included) so prompts match the paper's.
    source_input: str | None = field(default=None, compare=False, repr=False)

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]

    def input_text(self) -> str:
        """The question as the subset writes it (the paper's prompt input, typo included)."""
        if self.source_input is not None:
            return self.source_input
        options = ", ".join(f"{letter}. {text}" for letter, text in zip(LETTERS, self.options))
        return f"Qusetion: {self.question} Options: {options}"


# --------------------------------------------------------------------------------------------
# Reading the data


def _split_options(body: str) -> list[tuple[str, str, str, str]]:
    """Every way to read "a, B. b, C. c, D. d" as four options (texts may contain ", B. ")."""
    starts = {letter: [m.start() for m in re.finditer(re.escape(f", {letter}. "), body)] for letter in "BCD"}
    readings = []
    for b in starts["B"]:
        for c in (c for c in starts["C"] if c >= b + 5):
            for d in (d for d in starts["D"] if d >= c + 5):
                readings.append((body[:b], body[b + 5 : c], body[c + 5 : d], body[d + 5 :]))
    return readings


def parse_subset_record(record: Any, *, source: str = "record") -> MMLUQuestion:
    """Parse one record of ``mmlu_test_1444.jsonl``; the answer letter is checked against the options."""
    if not isinstance(record, dict):
        raise FloristError(f"{source}: expected an object, got {type(record).__name__}")
    for key in ("input", "output", "class"):
        if not isinstance(record.get(key), str):
            raise FloristError(f"{source}: missing or non-string field {key!r}")
    text = record["input"].strip()
    if not text.startswith("Qusetion: ") and not text.startswith("Question: "):
        raise FloristError(f"{source}: input does not start with 'Qusetion: '")
    question, sep, options = text[len("Qusetion: ") :].rpartition(" Options: ")
    if not sep or not options.startswith("A. "):
        raise FloristError(f"{source}: input has no ' Options: A. ...' part")
    answer = re.fullmatch(r"The answer is: ([ABCD])\.\s?(.*)", record["output"].strip(), re.S)
    if answer is None:
        raise FloristError(f"{source}: output is not 'The answer is: X. <text>': {record['output'][:60]!r}")
    letter, answer_text = answer.group(1), answer.group(2).strip()
    index = LETTERS.index(letter)
    readings = _split_options(options[3:])
    if not readings:
        raise FloristError(f"{source}: cannot find options B., C. and D. in the input")
    # Option texts may contain ", C. " themselves; the answer text decides between readings.
    matching = [r for r in readings if r[index].strip() == answer_text]
    if len(readings) > 1 and len(matching) == 1:
        readings = matching
    if len(readings) > 1:
        raise FloristError(f"{source}: the options can be read {len(readings)} ways; cannot parse them")
    opts = tuple(o.strip() for o in readings[0])
    if opts[index] != answer_text:
        raise FloristError(
            f"{source}: answer {letter} is {answer_text!r} but option {letter} is {opts[index]!r}"
        )
    return MMLUQuestion(
        subject=record["class"].strip(),
        question=question.strip(),
        options=opts,  # type: ignore[arg-type]
        answer=index,
        source_input=record["input"],
    )


def _read_csv(path: Path, subject: str) -> list[MMLUQuestion]:
    """One MMLU CSV: with the header question,choice0..3,answer (0-3), or headerless with A-D answers."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows and tuple(c.strip() for c in rows[0]) == CSV_HEADER:
        rows, first_line = rows[1:], 2
    else:
        first_line = 1
    questions = []
    for line, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) != 6:
            raise FloristError(f"{path} line {line}: expected 6 columns, got {len(row)}")
        raw = row[5].strip()
        if raw in LETTERS:
            answer = LETTERS.index(raw)
        elif raw in ("0", "1", "2", "3"):
            answer = int(raw)
        else:
            raise FloristError(f"{path} line {line}: answer must be 0-3 or A-D, got {raw!r}")
        options = tuple(str(c).strip() for c in row[1:5])
        questions.append(MMLUQuestion(subject, row[0].strip(), options, answer))  # type: ignore[arg-type]
    return questions


def _load_csv_dir(directory: Path, split: str) -> list[MMLUQuestion]:
    suffix = f"_{split}.csv"
    files = sorted(directory.glob(f"*{suffix}"))
    if not files:
        raise FloristError(f"{directory}: no *{suffix} files")
    return [q for f in files for q in _read_csv(f, f.name[: -len(suffix)])]


def load_mmlu(path: str | os.PathLike[str]) -> list[MMLUQuestion]:
    """Questions from the 1,444 subset (a JSON array) or a full MMLU directory (``test/*_test.csv``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MMLU data not found: {path}")
    if path.is_file():  # a JSON array (or JSON lines) of records, read as training data is
        return [parse_subset_record(r, source=f"{path} record {i}") for i, r in enumerate(load_records(path))]
    if (path / "test").is_dir():
        return _load_csv_dir(path / "test", "test")
    return _load_csv_dir(path, "test")


def load_mmlu_dev(path: str | os.PathLike[str]) -> dict[str, list[MMLUQuestion]]:
    """The k-shot exemplars by subject: ``dev/*_dev.csv`` beside a subset file or inside an MMLU dir."""
    path = Path(path)
    candidates = [path] if path.name == "dev" else [path / "dev", path.parent / "dev"]
    directory = next((c for c in candidates if c.is_dir()), None)
    if directory is None:
        raise FileNotFoundError(f"no MMLU dev/ directory (k-shot exemplars) at or beside {path}")
    by_subject: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for q in _load_csv_dir(directory, "dev"):
        by_subject[q.subject].append(q)
    return dict(by_subject)


def stratified_sample(questions: Sequence[MMLUQuestion], n: int, seed: int = 42) -> list[MMLUQuestion]:
    """``n`` questions, allotted to subjects in proportion to their size (at least one each when
    ``n`` allows, so the macro average still covers every subject), in their original order."""
    if n <= 0:
        raise ValueError(f"the number of sampled questions must be positive, got {n}")
    if n >= len(questions):
        return list(questions)
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_subject[q.subject].append(i)
    subjects = sorted(by_subject)
    take = dict.fromkeys(subjects, 1 if n >= len(subjects) else 0)
    rest = n - sum(take.values())
    spare = {s: len(by_subject[s]) - take[s] for s in subjects}
    total_spare = sum(spare.values())
    quotas = {s: rest * spare[s] / total_spare for s in subjects}
    for s in subjects:
        take[s] += math.floor(quotas[s])
    # Largest remainders get the seats left over (ties by subject name, so it is deterministic).
    leftover = n - sum(take.values())
    for s in sorted(subjects, key=lambda s: (-(quotas[s] - math.floor(quotas[s])), s))[:leftover]:
        take[s] += 1
    rng = random.Random(seed)
    chosen = [i for s in subjects for i in rng.sample(by_subject[s], take[s])]
    return [questions[i] for i in sorted(chosen)]


# --------------------------------------------------------------------------------------------
# Prompts


def _alpaca(instruction: str, input_text: str, response: str = "") -> str:
    from florist.data import Prompter

    return Prompter("alpaca").generate_prompt(instruction, input_text, response)


def build_prompt(question: MMLUQuestion, exemplars: Sequence[MMLUQuestion] = ()) -> str:
    """The paper's prompt, ending in "The answer is: ", after k solved exemplars if given."""
    shots = [
        _alpaca(INSTRUCTION, ex.input_text(), f"{ANSWER_PREFIX}{ex.letter}. {ex.answer_text}")
        for ex in exemplars
    ]
    return "\n\n".join([*shots, _alpaca(INSTRUCTION, question.input_text(), ANSWER_PREFIX)])


def _continuation_id(tokenizer: PreTrainedTokenizerBase, text: str, continuation: str) -> int | None:
    """The single token that ``continuation`` adds after ``text``, or None if it is not one token."""
    base = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text + continuation, add_special_tokens=False)["input_ids"]
    if len(full) == len(base) + 1 and full[: len(base)] == base:
        return int(full[-1])
    return None


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, list[int]]:
    """How the answer letter follows "The answer is:" for this tokenizer: ``(merged, ids)``.

    BPE and SentencePiece tokenizers write the space and the letter as one token (" C"), which is
    what such a model emits after the colon; then the prompt's trailing space is dropped and the
    merged tokens are scored (``merged=True``). Tokenizers that keep the space apart (byte-level
    ones) score the bare letter after the full prompt.
    """
    probe = "### Response:\n" + ANSWER_PREFIX.rstrip(" ")
    for merged, text, prefix in ((True, probe, " "), (False, probe + " ", "")):
        ids = [_continuation_id(tokenizer, text, prefix + letter) for letter in LETTERS]
        if all(i is not None for i in ids) and len(set(ids)) == len(LETTERS):
            return merged, [int(i) for i in ids]  # type: ignore[arg-type]
    raise FloristError(
        f"{type(tokenizer).__name__}: the letters A-D are not single tokens after {ANSWER_PREFIX!r}; "
        "use --scorer generate"
    )


# --------------------------------------------------------------------------------------------
# Scoring


def generate_is_correct(response_text: str, question: MMLUQuestion) -> bool:
    """The paper's rule: "X." (the correct letter and a period) or the answer text in the response.

    Only the text after the first "### Response:" counts, so the options in the prompt never
    match. The letter must not continue a word or an abbreviation ("Ph.D." does not answer D).
    """
    _, marker, after = response_text.partition("### Response:")
    response = after if marker else response_text
    if re.search(rf"(?<![\w.]){question.letter}\.", response):
        return True
    return bool(question.answer_text) and question.answer_text in response


def summarize(subjects: Sequence[str], correct: Sequence[bool]) -> dict[str, Any]:
    """Macro (mean of per-subject accuracies: the paper's number) and micro accuracy."""
    if len(subjects) != len(correct):
        raise ValueError("subjects and correct must have the same length")
    if not subjects:
        raise ValueError("no questions to summarise")
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, c in zip(subjects, correct):
        hits[s].append(bool(c))
    per_subject = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(hits.items())}
    return {
        "accuracy_macro": sum(v["accuracy"] for v in per_subject.values()) / len(per_subject),
        "accuracy_micro": sum(map(bool, correct)) / len(correct),
        "per_subject": per_subject,
        "n_questions": len(correct),
        "n_subjects": len(per_subject),
    }


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _left_padded(
    sequences: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding whatever the tokenizer's padding side, so the last column is every row's last token."""
    width = padded_width(max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int | None
) -> list[list[int]]:
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    # Very long prompts (k-shot) keep their end: the question and "The answer is:".
    return [e[-max_length:] if max_length and len(e) > max_length else e for e in encoded]


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes into padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _shared_prefix(sequences: Sequence[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least its last token."""
    first, n = sequences[0], min(len(s) for s in sequences) - 1
    for seq in sequences[1:]:
        k = 0
        while k < n and seq[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _prefix_cache(decoder: torch.nn.Module, prefix: list[int], device: torch.device) -> Any:
    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    return decoder(input_ids=ids, use_cache=True).past_key_values


def _suffix_batch(
    suffixes: Sequence[list[int]], prefix_len: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded suffixes after a cached prefix: ids, the mask over prefix + suffix, positions."""
    ids, mask = _left_padded(suffixes, pad_id, device)
    positions = (prefix_len + mask.cumsum(-1) - 1).clamp(min=prefix_len)
    full_mask = torch.cat([mask.new_ones(mask.shape[0], prefix_len), mask], dim=1)
    return ids, full_mask, positions


def loglik_letter_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    precision: str = "float32",
    **options: Any,
) -> torch.Tensor:
    """(N, 4) log-probabilities of the tokens A/B/C/D after each prompt (prompts end in "The answer is: ").

    ``options``: batch_size (8), max_length, groups, share_prefix (True), progress. Prompts are
    batched within ``groups`` (e.g. the subject, whose k-shot exemplars they share), shortest
    first. With ``share_prefix``, the tokens all prompts of a group begin with (the Alpaca
    preamble; the exemplars) go through the model once, and every batch of the group continues
    from that KV cache: the same numbers, less compute. ``precision``: see ``PRECISIONS`` (and
    ``checked_letter_scores``, which also says which questions were rescored).
    """
    return checked_letter_scores(model, tokenizer, prompts, precision=precision, **options)[0]


def checked_letter_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    precision: str = "float32",
    groups: Sequence[Hashable] | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, list[int]]:
    """``loglik_letter_scores`` at ``precision``, and the indices of the prompts rescored in float32.

    A bf16 body changes the letters' log-probabilities a little; only close calls can change the
    answer. "checked" therefore keeps a bf16-body score when its best letter leads the next by at
    least ``CHECK_MARGIN`` and rescores the rest in float32. A model that is not float32 runs as it is.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32" or next(model.parameters()).dtype != torch.float32:
        return _letter_scores(model, tokenizer, prompts, groups=groups, progress=progress, **kwargs), []
    with body_in_bfloat16(model):
        scores = _letter_scores(model, tokenizer, prompts, groups=groups, progress=progress, **kwargs)
    if precision == "bfloat16":
        return scores, []
    best = scores.topk(2, dim=-1).values
    close = torch.nonzero(best[:, 0] - best[:, 1] < CHECK_MARGIN).flatten().tolist()
    if close:
        sub_groups = [groups[i] for i in close] if groups is not None else None
        redone = _letter_scores(
            model, tokenizer, [prompts[i] for i in close], groups=sub_groups, progress=progress, **kwargs
        )
        with torch.inference_mode():  # scores is an inference tensor
            scores[close] = redone
    return scores, close


@torch.inference_mode()
def _letter_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    groups: Sequence[Hashable] | None = None,
    share_prefix: bool = True,
    progress: bool | None = None,
) -> torch.Tensor:
    merged, letter_ids = letter_token_ids(tokenizer)
    contexts = [p[:-1] if merged and p.endswith(" ") else p for p in prompts]
    encoded = _encode(tokenizer, contexts, max_length)
    device, pad = _device_of(model), _pad_id(tokenizer)
    letters = torch.tensor(letter_ids, device=device)
    decoder, head = model.get_decoder(), LMHead(model)
    scores = torch.empty((len(prompts), len(LETTERS)), dtype=torch.float32)
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups if groups is not None else [None] * len(prompts)):
        members[g].append(i)
    bar = tqdm(total=len(prompts), desc="MMLU loglik", unit="q", disable=bar_disabled(progress))
    for rows in members.values():
        shared = _shared_prefix([encoded[i] for i in rows]) if share_prefix else 0
        cache = (
            _prefix_cache(decoder, encoded[rows[0]][:shared], device) if shared >= MIN_SHARED_PREFIX else None
        )
        if cache is None:
            shared = 0
        for batch in _batches_by_length([len(encoded[i]) for i in rows], batch_size):
            batch = [rows[j] for j in batch]
            ids, mask, positions = _suffix_batch([encoded[i][shared:] for i in batch], shared, pad, device)
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)  # the forward pass appends to it
                past.batch_repeat_interleave(len(batch))
            hidden = decoder(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=past is not None,
            ).last_hidden_state
            # The LM head on the last position only, not on the whole prompt.
            logp = head(hidden[:, -1]).log_softmax(-1)
            scores[batch] = logp.index_select(-1, letters).cpu()
            bar.update(len(batch))
    bar.close()
    return scores


@torch.inference_mode()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    seed: int = 42,
    max_new_tokens: int = GENERATE_MAX_NEW_TOKENS,
    max_length: int | None = None,
    progress: bool | None = None,
) -> list[str]:
    """Sampled continuations of each prompt with the paper's settings (left-padded batches, seeded)."""
    encoded = _encode(tokenizer, prompts, max_length)
    device, pad = _device_of(model), _pad_id(tokenizer)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        **GENERATE_KWARGS,
    )
    responses: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="MMLU generate", unit="q", disable=bar_disabled(progress))
    # Sampling draws from the global RNG; fork it so evaluation leaves the caller's state alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in _batches_by_length([len(e) for e in encoded], batch_size):
            ids, mask = _left_padded([encoded[i] for i in batch], pad, device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                responses[i] = text
            bar.update(len(batch))
    bar.close()
    return responses


def prepare_questions(
    questions: Sequence[MMLUQuestion],
    *,
    batch_size: int,
    seed: int,
    max_questions: int | None,
    kshot: int,
    dev: dict[str, list[MMLUQuestion]] | None,
) -> tuple[Sequence[MMLUQuestion], list[str]]:
    """Check the arguments, take the stratified sample, and build each question's prompt."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_questions is not None:
        questions = stratified_sample(questions, max_questions, seed)
    if not questions:
        raise ValueError("no MMLU questions to evaluate")
    if kshot:
        if dev is None:
            raise ValueError("kshot > 0 needs the dev exemplars (load_mmlu_dev)")
        missing = sorted({q.subject for q in questions} - {s for s, v in dev.items() if len(v) >= kshot})
        if missing:
            raise FloristError(f"fewer than {kshot} dev exemplars for subject(s) {', '.join(missing[:5])}")
    prompts = [build_prompt(q, dev[q.subject][:kshot] if kshot and dev else ()) for q in questions]
    return questions, prompts


def evaluate_mmlu(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MMLUQuestion],
    *,
    scorer: str = "loglik",
    batch_size: int = 8,
    seed: int = 42,
    max_questions: int | None = None,
    kshot: int = 0,
    dev: dict[str, list[MMLUQuestion]] | None = None,
    max_length: int | None = None,
    return_predictions: bool = False,
    share_prefix: bool = True,
    progress: bool | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """MMLU accuracy of ``model`` (plain or peft-wrapped, on its own device) with one scorer.

    ``share_prefix`` (loglik): run the prompts' common beginning once per subject (see
    :func:`loglik_letter_scores`); False recomputes it for every question, with the same scores.
    ``precision`` (loglik): ``PRECISIONS``; "checked" reports how many questions it rescored.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    questions, prompts = prepare_questions(
        questions, batch_size=batch_size, seed=seed, max_questions=max_questions, kshot=kshot, dev=dev
    )
    if max_length is None:
        # Keep prompts (and, for generate, the sampled tokens) within the model's context.
        limit = getattr(model.config, "max_position_embeddings", None)
        max_length = limit - (GENERATE_MAX_NEW_TOKENS if scorer == "generate" else 0) if limit else None

    start = time.perf_counter()
    with eval_mode(model):
        if scorer == "loglik":
            scores, rescored = checked_letter_scores(
                model,
                tokenizer,
                prompts,
                precision=precision,
                batch_size=batch_size,
                max_length=max_length,
                groups=[q.subject for q in questions] if kshot else None,
                share_prefix=share_prefix,
                progress=progress,
            )
            predicted = scores.argmax(-1).tolist()
            correct = [p == q.answer for p, q in zip(predicted, questions)]
            outputs: list[Any] = [LETTERS[p] for p in predicted]
        else:
            texts = generate_responses(
                model,
                tokenizer,
                prompts,
                batch_size=batch_size,
                seed=seed,
                max_length=max_length,
                progress=progress,
            )
            # The paper matches on everything after "### Response:", i.e. "The answer is: " + the sample.
            outputs = [ANSWER_PREFIX + t for t in texts]
            correct = [generate_is_correct(t, q) for t, q in zip(outputs, questions)]
    seconds = time.perf_counter() - start

    result = summarize([q.subject for q in questions], correct)
    result.update(scorer=scorer, kshot=kshot, seconds=seconds, questions_per_second=len(questions) / seconds)
    if scorer == "loglik":
        counts = Counter(outputs)
        result["predicted_letters"] = {letter: counts.get(letter, 0) for letter in LETTERS}
        result["precision"] = precision
        if precision == "checked":
            result["rescored_float32"] = len(rescored)
    if return_predictions:
        result["predictions"] = [
            {"subject": q.subject, "answer": q.letter, "output": o, "correct": c}
            for q, o, c in zip(questions, outputs, correct)
        ]
    return result
