"""Training data: reading, checking, prompting, tokenising and splitting over clients.

The paper's layout is ``D/K/local_training_{k}.json`` (one file per client) plus an optional
held-out ``D/K/global_test.json``. A file is a JSON array or JSON lines, in one of these formats
recognised from its fields:

- Dolly:  instruction, context, response (and usually category)
- Alpaca: instruction, input, output
- Wizard: instruction, output
- conversations (florist.chat_data): TRL ``messages``, ShareGPT ``conversations``, and
  ``prompt``/``completion`` pairs (strings or message lists)

Instruction records are normalised to ``{"instruction", "input", "output"}`` and conversations to
``{"messages", "prompt_turns"}`` (both plus ``category`` when the record has one) before they
reach the prompt template. The template ``auto`` (the default) renders conversations with the
tokenizer's chat template and instruction records with Alpaca's; ``chat`` renders both with the
chat template. Files are user input: every problem is reported as a :class:`DataError` naming
the file and the record (or JSONL line).
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from florist.chat_data import (
    CONVERSATION_FORMATS,
    check_chat_tokenizer,
    conversation_format,
    instruction_messages,
    is_conversation,
    normalize_conversation,
    prompt_messages,
    render,
    tokenize_conversation,
)
from florist.config import PAD_TO_MULTIPLE_OF
from florist.progress import bar_disabled
from florist.records import IGNORE_INDEX, DataError
from florist.records import json_type as _json_type

if TYPE_CHECKING:
    import torch

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
    "wizard": ("instruction", "output"),
}
# Where each format keeps the optional input and the target output.
_INPUT_FIELD = {"dolly": "context", "alpaca": "input", "wizard": None}
_OUTPUT_FIELD = {"dolly": "response", "alpaca": "output", "wizard": "output"}

SPLIT_MODES = ("iid", "dirichlet", "shards")


def padded_width(longest: int, multiple: int = PAD_TO_MULTIPLE_OF, cap: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, but not past ``cap`` if it fits there."""
    width = -(-longest // multiple) * multiple if multiple > 1 else longest
    return min(width, cap) if cap is not None and longest <= cap else width


def collate(
    examples: Sequence[dict],
    pad_token_id: int,
    cutoff_len: int | None = None,
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
) -> dict[str, torch.Tensor]:
    """Right-pad tokenised examples (cut at ``cutoff_len``): pad ids, labels -100, attention mask 0."""
    longest = max(len(e["input_ids"]) for e in examples)
    if cutoff_len is not None:
        longest = min(longest, cutoff_len)
    width = padded_width(longest, pad_to_multiple_of, cutoff_len)
    import torch  # here, not at import: `florist data` answers without loading torch

    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        k = min(longest, len(e["input_ids"]))
        input_ids[row, :k] = torch.as_tensor(e["input_ids"][:k], dtype=torch.long)
        labels[row, :k] = torch.as_tensor(e["labels"][:k], dtype=torch.long)
        attention_mask[row, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------------
# Reading and checking files


def load_records(path: str | Path) -> list[dict]:
    """Read a JSON array or JSON lines file of record objects (format-agnostic).

    JSON lines is recognised from the content, not the extension: ``.json`` files written by
    ``datasets.Dataset.to_json`` are JSON lines, and MMLU's ``mmlu_test_1444.jsonl`` is an array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty; expected a JSON array of records or JSON lines")

    if stripped[0] == "[":
        try:
            records = _loads(text, path)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    elif stripped[0] == "{":
        records = _parse_jsonl_or_object(text, path)
    else:
        raise DataError(f"{path}: expected a JSON array of records or JSON lines, found {stripped[:20]!r}")

    if not isinstance(records, list):
        raise DataError(f"{path}: the top level must be an array of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: the array is empty; there are no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {_json_type(record)}")
    return records


def _loads(text: str, path: Path, where: str = "") -> Any:
    """json.loads, with the errors it raises besides JSONDecodeError as one-line DataErrors."""
    try:
        return json.loads(text)
    except RecursionError:  # "[" * 100000 and the like
        raise DataError(f"{path}: {where + ': ' if where else ''}JSON nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # an integer of more than 4300 digits
        raise DataError(f"{path}: {where + ': ' if where else ''}{e}") from None


def _parse_jsonl_or_object(text: str, path: Path) -> list[dict]:
    # One JSON value spanning the whole file is a top-level object, which is not a data set.
    try:
        whole = _loads(text, path)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and len(text.strip().splitlines()) > 1:
        raise DataError(
            f"{path}: the top level is a JSON object; expected an array of records or JSON lines "
            "(one record object per line)"
        )
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line, path, f"line {lineno} (record {len(records)})")
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {lineno} (record {len(records)}): malformed JSON line: {e.msg} at column {e.colno}"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: line {lineno} (record {len(records)}): expected an object, got {_json_type(record)}"
            )
        records.append(record)
    return records


def detect_format(records: Sequence[dict], path: str | Path = "<records>", *, prompts: bool = False) -> str:
    """The data format, from the fields the records use: 'messages', 'sharegpt',
    'prompt_completion', 'dolly', 'alpaca' or 'wizard'.

    With ``prompts`` (``florist generate``'s input) answers may be missing: a lone ``prompt`` or
    ``instruction`` field is enough.
    """
    keys: set[str] = set()
    for record in records:
        if isinstance(record, dict):
            keys.update(record)
    conversation = conversation_format(keys)
    if conversation is not None:
        return conversation
    if prompts and "prompt" in keys:
        return "prompt_completion"
    if "response" in keys or (prompts and "context" in keys):
        return "dolly"
    if "output" in keys or (prompts and "instruction" in keys):
        return "alpaca" if "input" in keys else "wizard"
    shown = ", ".join(sorted(keys)[:12]) or "none"
    raise DataError(
        f"{path}: cannot tell the data format from the fields ({shown}); expected conversations "
        "(messages; conversations; prompt and completion) or instructions: Dolly (instruction, "
        "context, response), Alpaca (instruction, input, output) or Wizard (instruction, output)"
    )


def normalize_record(record: dict, fmt: str, *, where: str = "record", prompts: bool = False) -> dict:
    """Instruction records as {"instruction", "input", "output"}, conversations as
    {"messages", "prompt_turns"} (+ "category"), after checking fields and types.

    ``where`` prefixes error messages, e.g. ``"data.json: record 12"``. With ``prompts`` a record
    may lack its answer (the output field, or a conversation's assistant turn).
    """
    if fmt not in FORMAT_FIELDS and fmt not in CONVERSATION_FORMATS:
        raise ValueError(
            f"unknown data format {fmt!r}; expected one of {', '.join((*CONVERSATION_FORMATS, *FORMAT_FIELDS))}"
        )
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {_json_type(record)}")
    if fmt in CONVERSATION_FORMATS:
        out = normalize_conversation(record, fmt, where=where, require_assistant=not prompts)
    else:
        out = _normalize_instruction(record, fmt, where=where, prompts=prompts)
    if "category" in record:
        if not isinstance(record["category"], str):
            raise DataError(
                f"{where}: field 'category' must be a string, got {_json_type(record['category'])}"
            )
        out["category"] = record["category"]
    return out


def _normalize_instruction(record: dict, fmt: str, *, where: str, prompts: bool) -> dict:
    if prompts:  # a prompt needs no answer (nor an input)
        blanks = [_OUTPUT_FIELD[fmt], _INPUT_FIELD[fmt]]
        record = {**{name: "" for name in blanks if name}, **record}
    for name in FORMAT_FIELDS[fmt]:
        if name not in record:
            raise DataError(
                f"{where}: missing field {name!r} (a {fmt} record needs {', '.join(FORMAT_FIELDS[fmt])})"
            )
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {_json_type(record[name])}")
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    input_field = _INPUT_FIELD[fmt]
    return {
        "instruction": record["instruction"],
        "input": record[input_field] if input_field else "",
        "output": record[_OUTPUT_FIELD[fmt]],
    }


def load_dataset_file(path: str | Path, *, prompts: bool = False) -> tuple[list[dict], str]:
    """Read, detect, check and normalise one file: (normalised records, format).

    ``prompts``: records may lack their answers (see :func:`normalize_record`).
    """
    records = load_records(path)
    fmt = detect_format(records, path, prompts=prompts)
    where = f"{path}: record {{}}"
    return [
        normalize_record(r, fmt, where=where.format(i), prompts=prompts) for i, r in enumerate(records)
    ], fmt


# --------------------------------------------------------------------------------------------
# The paper's client layout


def _client_dir(data_path: str | Path, num_clients: int) -> Path:
    try:
        count = -1 if isinstance(num_clients, bool) else operator.index(num_clients)  # ints, numpy ints
    except TypeError:
        count = -1
    if count <= 0:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients = count
    root = Path(data_path)
    directory = root / str(num_clients)
    if not directory.is_dir():
        found = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
        )
        hint = f"; {root} has splits for {', '.join(found)} clients" if found else ""
        raise DataError(
            f"{directory}: no such directory; data_path must hold {num_clients}/local_training_{{k}}.json "
            f"for num_clients={num_clients}{hint}"
        )
    return directory


def load_client_datasets(
    data_path: str | Path,
    num_clients: int,
    *,
    max_samples_per_client: int | None = None,
    seed: int = 42,
) -> list[list[dict]]:
    """The normalised records of every client, read from ``data_path/K/local_training_{k}.json``.

    With ``max_samples_per_client`` each client keeps a seeded random subset (in file order), so
    quick runs are reproducible and still cover the whole file rather than its first records.
    """
    directory = _client_dir(data_path, num_clients)
    present = {p.name for p in directory.glob("local_training_*.json")}
    expected = [f"local_training_{k}.json" for k in range(num_clients)]
    missing = [name for name in expected if name not in present]
    if missing:
        raise DataError(f"{directory}: missing {', '.join(missing)} for num_clients={num_clients}")
    extra = sorted(present - set(expected))
    if extra:
        raise DataError(
            f"{directory}: has {len(present)} local_training files ({', '.join(extra)} beyond the "
            f"first {num_clients}) but num_clients={num_clients}"
        )
    if max_samples_per_client is not None and (
        isinstance(max_samples_per_client, bool) or int(max_samples_per_client) <= 0
    ):
        raise DataError(f"max_samples_per_client must be a positive integer, got {max_samples_per_client!r}")

    clients: list[list[dict]] = []
    for k, name in enumerate(expected):
        records, _fmt = load_dataset_file(directory / name)
        if max_samples_per_client is not None:
            records = subset_records(records, k, int(max_samples_per_client), seed)
        clients.append(records)
    return clients


def subset_records(records: list[dict], client_index: int, max_samples: int, seed: int) -> list[dict]:
    """Client ``client_index``'s seeded random subset of at most ``max_samples`` records, in file order.

    Seeded by (seed, client_index), so one client's subset does not depend on the others'.
    """
    if len(records) <= max_samples:
        return list(records)
    keep = np.sort(
        np.random.default_rng([seed, client_index]).choice(len(records), size=max_samples, replace=False)
    )
    return [records[i] for i in keep]


def find_test_file(data_path: str | Path, num_clients: int, name: str = "global_test.json") -> Path | None:
    """``data_path/K/global_test.json`` (or another file of the split) when it exists."""
    path = Path(data_path) / str(num_clients) / name
    return path if path.is_file() else None


def demo_data_path() -> Path:
    """The small built-in instruction data set (8 non-IID clients), in the paper's layout."""
    return Path(str(resources.files("florist") / "resources" / "demo"))


# --------------------------------------------------------------------------------------------
# Prompts and tokenisation


class Prompter:
    """How records become text: ``auto`` (the default), ``chat``, or an Alpaca-style template.

    - ``auto``: conversations through the tokenizer's chat template, instruction records through
      Alpaca's template (the paper's), so instruction data trains exactly as before;
    - ``chat``: every record through the tokenizer's chat template (an instruction record is one
      user turn and one assistant turn);
    - a template shipped in ``florist/resources/templates`` (``alpaca``) or a path to a JSON file
      with ``prompt_input``, ``prompt_no_input`` and ``response_split`` (Alpaca-LoRA's format).

    The chat template is the tokenizer's, so it is resolved when a record is tokenised.
    """

    def __init__(self, template_name: str = "auto") -> None:
        self.template_name = template_name
        # auto and chat fall back on Alpaca's template for instruction records (auto) and for
        # callers of generate_prompt, such as the MMLU generate scorer.
        name = "alpaca" if template_name in ("auto", "chat") else template_name
        path = Path(name)
        if path.suffix != ".json":
            path = Path(str(resources.files("florist") / "resources" / "templates" / f"{name}.json"))
        if not path.is_file():
            raise DataError(
                f"prompt template {template_name!r} not found (looked for {path}); use auto, chat, "
                "alpaca or a JSON template file"
            )
        try:
            template = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        for key in ("prompt_input", "prompt_no_input", "response_split"):
            if not isinstance(template.get(key), str):
                raise DataError(f"{path}: the template needs a string {key!r}")
        self.template: dict[str, str] = template

    def uses_chat(self, example: dict) -> bool:
        """Whether ``example`` is rendered with the tokenizer's chat template."""
        if self.template_name == "chat":
            return True
        if is_conversation(example):
            if self.template_name != "auto":
                raise DataError(
                    f"prompt template {self.template_name!r} renders instruction records only; "
                    "conversations need --prompt_template_name auto or chat"
                )
            return True
        return False

    def generate_prompt(self, instruction: str, input: str | None = None, output: str | None = None) -> str:
        """The prompt for a record; with ``output`` the full training text (prompt + response)."""
        if input:
            prompt = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            prompt = self.template["prompt_no_input"].format(instruction=instruction)
        return prompt + output if output else prompt

    def get_response(self, text: str) -> str:
        """The model's answer: the text after the response marker (all of it if there is none)."""
        parts = text.split(self.template["response_split"])
        return (parts[1] if len(parts) > 1 else parts[0]).strip()


def _tokenize(text: str, tokenizer: Any, cutoff_len: int, add_eos: bool) -> list[int]:
    ids = list(tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"])
    # As in Alpaca-LoRA/FLoRA: EOS marks the end of the response, unless the text was cut off.
    if add_eos and len(ids) < cutoff_len and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_example(
    example: dict,
    tokenizer: Any,
    *,
    cutoff_len: int,
    train_on_inputs: bool,
    prompter: Prompter,
) -> dict[str, list[int]]:
    """One normalised record as {"input_ids", "labels"}, truncated at ``cutoff_len`` tokens.

    Alpaca (the paper's tokenisation): the full text (prompt + response) gets EOS when it was not
    truncated; labels equal input_ids, except that with ``train_on_inputs=False`` the prompt's
    tokens are masked with -100 so only the response is learned.

    Chat template: only the assistant turns are learned, each with its end-of-turn token
    (florist.chat_data); system and user text, role headers and padding never are, whatever
    ``train_on_inputs`` says (its default True is the paper's Alpaca setting).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; tokenize_example needs one to end responses")
    if cutoff_len <= 0:
        raise ValueError(f"cutoff_len must be positive, got {cutoff_len}")
    if "messages" not in example and ("instruction" not in example or "output" not in example):
        raise ValueError(
            f"tokenize_example needs a normalised record (instruction, input, output or messages), got "
            f"fields {', '.join(sorted(example))}; see normalize_record"
        )
    if prompter.uses_chat(example):
        if "messages" not in example:
            example = {"messages": instruction_messages(example)}
        return tokenize_conversation(example, tokenizer, cutoff_len=cutoff_len)
    full = prompter.generate_prompt(example["instruction"], example.get("input"), example["output"])
    input_ids = _tokenize(full, tokenizer, cutoff_len, add_eos=True)
    labels = list(input_ids)
    if not train_on_inputs:
        user = prompter.generate_prompt(example["instruction"], example.get("input"))
        n_prompt = min(len(_tokenize(user, tokenizer, cutoff_len, add_eos=False)), len(labels))
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": input_ids, "labels": labels}


def has_trained_token(example: dict[str, list[int]]) -> bool:
    """Whether any token is learned (position 0 predicts nothing: labels are shifted by one)."""
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


class TokenizedExamples(list):
    """The tokenised examples of a data set; ``dropped`` counts the records left out because
    truncation left them without a single trained token."""

    dropped: int = 0


def tokenize_dataset(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    cutoff_len: int,
    train_on_inputs: bool,
    prompter: Prompter | None = None,
    desc: str = "tokenizing",
    progress: bool | None = None,
) -> TokenizedExamples:
    """:func:`tokenize_example` over normalised records, with a progress bar.

    A record that ``cutoff_len`` leaves without a trained token is dropped (and counted, and
    reported), never trained as a zero loss that would still count as an example.
    """
    prompter = prompter or Prompter()
    out = TokenizedExamples()
    for i, r in enumerate(tqdm(records, desc=desc, disable=bar_disabled(progress), leave=False)):
        try:
            example = tokenize_example(
                r, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, prompter=prompter
            )
        except DataError as e:
            raise DataError(f"{desc}: record {i}: {e}") from None
        if has_trained_token(example):
            out.append(example)
        else:
            out.dropped += 1
    if out.dropped:
        where = desc.removeprefix("tokenizing ")
        if not out:
            raise DataError(
                f"{where}: cutoff_len={cutoff_len} leaves none of its {len(records)} records a trained token"
            )
        tqdm.write(
            f"florist: {where}: dropped {out.dropped} of {len(records)} records that cutoff_len={cutoff_len} "
            "leaves without a trained token"
        )
    return out


def encode_prompt(example: dict, tokenizer: Any, prompter: Prompter) -> list[int]:
    """The token ids a model is given to answer ``example``, as training renders that prompt.

    Chat: the messages before the answer (florist.chat_data.prompt_messages) with the template's
    generation prompt, no special tokens added; Alpaca: the prompt text, tokenised as in training.
    """
    if prompter.uses_chat(example):
        check_chat_tokenizer(tokenizer)
        messages, _answer = prompt_messages(example)
        text = render(tokenizer, messages, generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(
        tokenizer(prompter.generate_prompt(example["instruction"], example.get("input")))["input_ids"]
    )


# --------------------------------------------------------------------------------------------
# Splitting one data set over clients (florist data split)


@dataclass
class Split:
    """Record indices per client and for the global test, with a JSON-ready description."""

    clients: list[list[int]]
    test: list[int]
    info: dict[str, Any] = field(default_factory=dict)


def _labels_of(records: Sequence[dict], label_field: str, mode: str, path: str) -> list[str]:
    has = [label_field in r for r in records]
    if not any(has):
        if mode == "iid":
            return [""] * len(records)  # one pseudo-label: the test is test_per_label records in all
        raise DataError(
            f"{path}: {mode} split needs a label field, but no record has {label_field!r} (use --label-field)"
        )
    for i, r in enumerate(records):
        if label_field not in r:
            raise DataError(f"{path}: record {i}: missing label field {label_field!r}")
        if not isinstance(r[label_field], (str, int)) or isinstance(r[label_field], bool):
            raise DataError(
                f"{path}: record {i}: label field {label_field!r} must be a string or integer, "
                f"got {_json_type(r[label_field])}"
            )
    return [str(r[label_field]) for r in records]


def split_records(
    records: Sequence[dict],
    num_clients: int,
    *,
    mode: str = "dirichlet",
    alpha: float = 0.5,
    label_field: str = "category",
    test_per_label: int = 10,
    seed: int = 42,
    shards_per_client: int = 2,
    min_client_size: int = 40,
    max_attempts: int = 1000,
    path: str = "<records>",
) -> Split:
    """Partition record indices over ``num_clients`` (the FedIT/FLoRA allocation procedure).

    First ``test_per_label`` records of every label are held out as the global test. Then:

    - ``iid``: shuffle and cut into K near-equal parts.
    - ``dirichlet``: for each label draw proportions ~ Dir(alpha) over the clients (zeroing the
      clients that already hold their fair share N/K) and cut that label's shuffled records
      accordingly; redraw everything until every client has at least
      ``min(min_client_size, N // (2K))`` records.
    - ``shards``: sort by label, cut into K * shards_per_client shards, deal each client
      ``shards_per_client`` of them at random.

    Deterministic for a given seed (numpy's PCG64).
    """
    if mode not in SPLIT_MODES:
        raise DataError(f"split mode must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
    if num_clients <= 0:
        raise DataError(f"num_clients must be positive, got {num_clients}")
    if test_per_label < 0:
        raise DataError(f"test_per_label must be >= 0, got {test_per_label}")
    if mode == "dirichlet" and not alpha > 0:
        raise DataError(f"the Dirichlet concentration alpha must be > 0, got {alpha}")
    if mode == "shards" and shards_per_client <= 0:
        raise DataError(f"shards_per_client must be positive, got {shards_per_client}")
    labels = np.array(_labels_of(records, label_field, mode, path), dtype=object)
    label_names = sorted(set(labels.tolist()))
    rng = np.random.default_rng(seed)

    # The held-out test set: test_per_label records of every label.
    test: list[int] = []
    for name in label_names:
        idx = np.flatnonzero(labels == name)
        if test_per_label and len(idx) <= test_per_label:
            raise DataError(
                f"{path}: label {name!r} has {len(idx)} records, not more than test_per_label={test_per_label}"
            )
        test.extend(rng.choice(idx, size=test_per_label, replace=False).tolist())
    held = np.zeros(len(records), dtype=bool)
    held[test] = True
    pool = np.flatnonzero(~held)
    n = len(pool)
    if n < num_clients:
        raise DataError(f"{path}: {n} training records cannot give each of {num_clients} clients one")

    required = 0
    if mode == "iid":
        parts = [p.tolist() for p in np.array_split(rng.permutation(pool), num_clients)]
    elif mode == "shards":
        n_shards = num_clients * shards_per_client
        if n < n_shards:
            raise DataError(f"{path}: {n} training records are fewer than {n_shards} shards")
        by_label = pool[np.argsort(labels[pool], kind="stable")]
        shards = np.array_split(by_label, n_shards)
        order = rng.permutation(n_shards)
        parts = [
            np.concatenate(
                [shards[j] for j in order[k * shards_per_client : (k + 1) * shards_per_client]]
            ).tolist()
            for k in range(num_clients)
        ]
    else:
        required = max(1, min(min_client_size, n // (2 * num_clients)))
        for _attempt in range(max_attempts):
            parts = _dirichlet_once(pool, labels, label_names, num_clients, alpha, rng)
            if min(len(p) for p in parts) >= required:
                break
        else:
            raise DataError(
                f"{path}: no Dirichlet(alpha={alpha}) draw in {max_attempts} gave every client "
                f">= {required} records; raise alpha or lower --min-client-size"
            )

    clients = [sorted(p) for p in parts]  # keep the source file's order within a client
    test = sorted(test)

    def counts(idx: Sequence[int]) -> dict[str, int]:
        return dict(sorted(Counter(labels[i] for i in idx).items()))

    info = {
        "mode": mode,
        "num_clients": num_clients,
        "seed": seed,
        "alpha": alpha if mode == "dirichlet" else None,
        "min_client_size": required if mode == "dirichlet" else None,
        "shards_per_client": shards_per_client if mode == "shards" else None,
        "label_field": label_field if label_names != [""] else None,
        "test_per_label": test_per_label,
        "clients": [
            {"file": f"local_training_{k}.json", "records": len(c), "labels": counts(c)}
            for k, c in enumerate(clients)
        ],
        "test": {"file": "global_test.json" if test else None, "records": len(test), "labels": counts(test)},
    }
    return Split(clients=clients, test=test, info=info)


def _dirichlet_once(
    pool: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    fair_share = len(pool) / num_clients
    for name in label_names:
        idx = rng.permutation(pool[labels[pool] == name])
        p = rng.dirichlet(np.full(num_clients, alpha))
        # Clients that already hold their fair share get nothing more (keeps sizes in check).
        p = p * np.array([len(part) < fair_share for part in parts])
        p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    return parts


def write_split(
    records: Sequence[dict],
    split: Split,
    out_dir: str | Path,
    *,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/K/`` (client files, global_test.json, split.json) in one atomic step."""
    from florist.io import atomic_directory

    target = Path(out_dir) / str(len(split.clients))
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise DataError(f"{target}: already exists and is not empty (pass --force to replace it)")
    with atomic_directory(target, overwrite=True) as tmp:
        for k, idx in enumerate(split.clients):
            _write_json(tmp / f"local_training_{k}.json", [records[i] for i in idx])
        if split.test:
            _write_json(tmp / "global_test.json", [records[i] for i in split.test])
        _write_json(tmp / "split.json", {**split.info, "source": source or {}})
    return target


def _write_json(path: Path, obj: Any) -> None:
    # Written inside an atomic_directory, so a plain write is enough here.
    from florist.io import strict_json

    path.write_text(
        json.dumps(strict_json(obj), ensure_ascii=False, indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )
