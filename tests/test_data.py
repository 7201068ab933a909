"""florist.data: reading and checking instruction files, the paper's client layout, prompts,
tokenisation, splits and the built-in demo data set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from florist.data import (
    IGNORE_INDEX,
    DataError,
    Prompter,
    demo_data_path,
    detect_format,
    find_test_file,
    load_client_datasets,
    load_dataset_file,
    load_records,
    normalize_record,
    split_records,
    tokenize_dataset,
    tokenize_example,
)

DOLLY_8_COUNTS = [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]
WIZARD = [
    {"instruction": "Name a prime number larger than 10.", "output": "11 is a prime number larger than 10."},
    {"instruction": "What colour is a clear daytime sky?", "output": "It is blue."},
]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte plus </s>: token counts are byte counts, independently known."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Real data and formats


def test_paper_dolly_split_loads_with_exact_counts(dolly_dir: Path) -> None:
    clients = load_client_datasets(dolly_dir, 8)
    assert [len(c) for c in clients] == DOLLY_8_COUNTS
    raw = json.loads((dolly_dir / "8" / "local_training_3.json").read_text())
    assert detect_format(raw, "x") == "dolly"
    # Normalisation maps context -> input and response -> output, keeping the category.
    assert clients[3][0] == {
        "instruction": raw[0]["instruction"],
        "input": raw[0]["context"],
        "output": raw[0]["response"],
        "category": raw[0]["category"],
    }
    test = find_test_file(dolly_dir, 8)
    assert test == dolly_dir / "8" / "global_test.json"
    records, fmt = load_dataset_file(test)
    assert fmt == "dolly" and len(records) == 80
    assert set(Counter(r["category"] for r in records).values()) == {10}
    assert find_test_file(dolly_dir, 3) is None


def test_alpaca_is_detected_and_normalised() -> None:
    path = require_shared("alpaca/alpaca_5000.json")
    records, fmt = load_dataset_file(path)
    raw = json.loads(path.read_text())
    assert fmt == "alpaca" and len(records) == 5000
    assert all(
        r == {"instruction": q["instruction"], "input": q["input"], "output": q["output"]}
        for r, q in zip(records, raw)
    )


def test_mmlu_array_named_jsonl_is_read_as_an_array(mmlu_subset: Path) -> None:
    records = load_records(mmlu_subset)
    assert len(records) == 1444 and detect_format(records, mmlu_subset) == "alpaca"


def test_wizard_detected_and_jsonl_matches_json(tmp_path: Path) -> None:
    as_json = write(tmp_path / "wiz.json", json.dumps(WIZARD))
    as_jsonl = write(tmp_path / "wiz.jsonl", "\n".join(json.dumps(r) for r in WIZARD) + "\n\n")
    a, fmt_a = load_dataset_file(as_json)
    b, fmt_b = load_dataset_file(as_jsonl)
    assert fmt_a == fmt_b == "wizard"
    assert a == b == [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in WIZARD]


def test_jsonl_with_json_extension_and_bom(tmp_path: Path) -> None:
    # datasets.Dataset.to_json writes JSON lines into ".json" files; Windows editors add a BOM.
    text = "\ufeff" + "\n".join(
        json.dumps({"instruction": f"q{i}", "input": "", "output": "a"}) for i in range(3)
    )
    records, fmt = load_dataset_file(write(tmp_path / "lines.json", text))
    assert fmt == "alpaca" and [r["instruction"] for r in records] == ["q0", "q1", "q2"]


def test_dolly_jsonl_full_release() -> None:
    path = require_shared("dolly/databricks-dolly-15k.jsonl")
    records, fmt = load_dataset_file(path)
    assert fmt == "dolly" and len(records) == 15011
    assert len({r["category"] for r in records}) == 8


# --------------------------------------------------------------------------------------------
# Bad input names the file and the record

DOLLY_OK = {"instruction": "q", "context": "", "response": "a", "category": "open_qa"}
BAD_CASES = {
    "empty file": ("", "is empty"),
    "whitespace only": ("  \n\n ", "is empty"),
    "empty array": ("[]", "array is empty"),
    "top-level object": (json.dumps({"data": [DOLLY_OK]}, indent=1), "top level is a JSON object"),
    "top-level string": ('"hello"', "expected a JSON array"),
    "malformed array": (
        '[\n {"instruction": "q",\n  "context": ""\n  "response": "a"}\n]',
        "malformed JSON at line 4",
    ),
    "malformed jsonl": (
        json.dumps(DOLLY_OK) + "\n" + json.dumps(DOLLY_OK) + '\n{"instruction": "q", oops}\n',
        "line 3 (record 2)",
    ),
    "jsonl line not object": (
        json.dumps(DOLLY_OK) + "\n[1, 2]\n",
        "line 2 (record 1): expected an object, got an array",
    ),
    "array item not object": (json.dumps([DOLLY_OK, "text"]), "record 1: expected an object, got a string"),
    "missing field": (
        json.dumps([DOLLY_OK, {"instruction": "q", "response": "a"}]),
        "record 1: missing field 'context'",
    ),
    "instruction is a number": (
        json.dumps([DOLLY_OK, DOLLY_OK, {**DOLLY_OK, "instruction": 7}]),
        "record 2: field 'instruction' must be a string, got a number",
    ),
    "instruction is null": (
        json.dumps([{**DOLLY_OK, "instruction": None}]),
        "record 0: field 'instruction' must be a string, got null",
    ),
    "response is a list": (
        json.dumps([DOLLY_OK, {**DOLLY_OK, "response": ["a"]}]),
        "record 1: field 'response' must be a string, got an array",
    ),
    "blank instruction": (
        json.dumps([DOLLY_OK, {**DOLLY_OK, "instruction": "  "}]),
        "record 1: field 'instruction' is empty",
    ),
    "category not a string": (
        json.dumps([{**DOLLY_OK, "category": 3}]),
        "record 0: field 'category' must be a string",
    ),
    "unknown format": (json.dumps([{"question": "q", "answer": "a"}]), "cannot tell the data format"),
    "alpaca missing input": (
        "\n".join(
            json.dumps(r)
            for r in [{"instruction": "q", "input": "", "output": "a"}, {"instruction": "q", "output": "a"}]
        ),
        "record 1: missing field 'input'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_files_name_file_and_record(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CASES[case]
    path = write(tmp_path / "client_data.json", text)
    with pytest.raises(DataError) as err:
        load_dataset_file(path)
    message = str(err.value)
    assert str(path) in message and expected in message, message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)  # CLIs report ValueErrors in one line, exit code 2


def test_non_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json: not UTF-8"):
        load_records(path)
    with pytest.raises(DataError, match="no such data file"):
        load_records(tmp_path / "nope.json")


def test_normalize_record_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown data format"):
        normalize_record(DOLLY_OK, "csv")


# --------------------------------------------------------------------------------------------
# The paper's client layout


def make_layout(root: Path, sizes: list[int]) -> Path:
    (root / str(len(sizes))).mkdir(parents=True)
    for k, n in enumerate(sizes):
        recs = [{**DOLLY_OK, "instruction": f"client {k} question {i}"} for i in range(n)]
        write(root / str(len(sizes)) / f"local_training_{k}.json", json.dumps(recs))
    return root


def test_layout_mismatches_name_the_directory(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "d", [3, 3, 3])
    assert [len(c) for c in load_client_datasets(root, np.int64(3))] == [3, 3, 3]
    with pytest.raises(DataError, match=r"d/4: no such directory.*splits for 3 clients"):
        load_client_datasets(root, 4)
    (root / "3" / "local_training_1.json").unlink()
    with pytest.raises(DataError, match=r"d/3: missing local_training_1.json"):
        load_client_datasets(root, 3)
    write(root / "3" / "local_training_1.json", json.dumps([DOLLY_OK]))
    write(root / "3" / "local_training_3.json", json.dumps([DOLLY_OK]))
    with pytest.raises(DataError, match=r"d/3: has 4 local_training files \(local_training_3.json"):
        load_client_datasets(root, 3)
    for bad in (0, -2, 2.0, "3", True):
        with pytest.raises(DataError, match="num_clients must be a positive integer"):
            load_client_datasets(root, bad)


def test_bad_record_in_a_client_file_names_it(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "d", [2, 2])
    write(root / "2" / "local_training_1.json", json.dumps([DOLLY_OK, {**DOLLY_OK, "response": None}]))
    with pytest.raises(DataError, match=r"local_training_1.json: record 1: field 'response'"):
        load_client_datasets(root, 2)


def test_max_samples_per_client_is_a_seeded_subset_in_file_order(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "d", [30, 5, 12])
    full = load_client_datasets(root, 3)
    a = load_client_datasets(root, 3, max_samples_per_client=10, seed=1)
    assert [len(c) for c in a] == [10, 5, 10]
    assert a == load_client_datasets(root, 3, max_samples_per_client=10, seed=1)
    assert a[0] != load_client_datasets(root, 3, max_samples_per_client=10, seed=2)[0]
    for sub, whole in zip(a, full):
        positions = [whole.index(r) for r in sub]
        assert positions == sorted(positions) and len(set(positions)) == len(sub)
    assert a[0] != full[0][:10]  # a random subset, not the head of the file
    with pytest.raises(DataError, match="max_samples_per_client"):
        load_client_datasets(root, 3, max_samples_per_client=0)


# --------------------------------------------------------------------------------------------
# Prompts and tokenisation

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSummarize.\n\n### Input:\nA long {text}.\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Response:\n"
)


def test_alpaca_prompt_is_exactly_the_papers() -> None:
    p = Prompter("alpaca")
    assert p.generate_prompt("Summarize.", "A long {text}.") == ALPACA_INPUT
    assert p.generate_prompt("Name a colour.") == ALPACA_NO_INPUT
    assert p.generate_prompt("Name a colour.", "") == ALPACA_NO_INPUT
    assert p.generate_prompt("Name a colour.", None, "Red.") == ALPACA_NO_INPUT + "Red."
    assert p.get_response(ALPACA_NO_INPUT + "  Red.\n") == "Red."
    assert p.get_response("no marker here ") == "no marker here"


def test_custom_and_missing_templates(tmp_path: Path) -> None:
    path = write(
        tmp_path / "short.json",
        json.dumps(
            {
                "prompt_input": "I:{instruction} X:{input} R:",
                "prompt_no_input": "I:{instruction} R:",
                "response_split": "R:",
            }
        ),
    )
    assert Prompter(str(path)).generate_prompt("a", "b", "c") == "I:a X:b R:c"
    with pytest.raises(DataError, match="not found"):
        Prompter("no_such_template")
    with pytest.raises(DataError, match="response_split"):
        Prompter(str(write(tmp_path / "bad.json", json.dumps({"prompt_input": "", "prompt_no_input": ""}))))


EXAMPLE = {
    "instruction": "Summarize.",
    "input": "Bees dance to share where food is.",
    "output": "Bees dance to point at food.",
}


def test_tokenize_full_text_with_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    prompter = Prompter()
    full = prompter.generate_prompt(EXAMPLE["instruction"], EXAMPLE["input"], EXAMPLE["output"])
    prompt = prompter.generate_prompt(EXAMPLE["instruction"], EXAMPLE["input"])
    n_full, n_prompt = len(full.encode()), len(prompt.encode())

    out = tokenize_example(EXAMPLE, tokenizer, cutoff_len=512, train_on_inputs=True, prompter=prompter)
    assert len(out["input_ids"]) == n_full + 1 and out["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(out["input_ids"][:-1]) == full
    assert out["labels"] == out["input_ids"]

    masked = tokenize_example(EXAMPLE, tokenizer, cutoff_len=512, train_on_inputs=False, prompter=prompter)
    assert masked["input_ids"] == out["input_ids"]
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert masked["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert tokenizer.decode(masked["labels"][n_prompt:-1]) == EXAMPLE["output"]


def test_tokenize_cutoff_rules(tokenizer: PreTrainedTokenizerFast) -> None:
    prompter = Prompter()
    full = prompter.generate_prompt(EXAMPLE["instruction"], EXAMPLE["input"], EXAMPLE["output"])
    prompt = prompter.generate_prompt(EXAMPLE["instruction"], EXAMPLE["input"])
    n_full, n_prompt = len(full.encode()), len(prompt.encode())

    def tok(cutoff: int, train_on_inputs: bool = True) -> dict[str, list[int]]:
        return tokenize_example(
            EXAMPLE, tokenizer, cutoff_len=cutoff, train_on_inputs=train_on_inputs, prompter=prompter
        )

    # Truncated: exactly cutoff tokens, no EOS.
    cut = tok(n_full - 5)
    assert len(cut["input_ids"]) == n_full - 5 and tokenizer.eos_token_id not in cut["input_ids"]
    assert tokenizer.decode(cut["input_ids"]) == full.encode()[: n_full - 5].decode()
    # Exactly filling the cutoff counts as truncated (no room for EOS); one more token leaves room.
    assert tok(n_full)["input_ids"][-1] != tokenizer.eos_token_id and len(tok(n_full)["input_ids"]) == n_full
    assert (
        len(tok(n_full + 1)["input_ids"]) == n_full + 1
        and tok(n_full + 1)["input_ids"][-1] == tokenizer.eos_token_id
    )
    # Cut inside the prompt with train_on_inputs=False: everything is masked.
    inside = tok(n_prompt - 3, train_on_inputs=False)
    assert inside["labels"] == [IGNORE_INDEX] * (n_prompt - 3)
    with pytest.raises(ValueError, match="cutoff_len"):
        tok(0)


def test_tokenize_dataset_matches_per_example(tokenizer: PreTrainedTokenizerFast) -> None:
    records = [EXAMPLE, {"instruction": "Name a colour.", "input": "", "output": "Red."}]
    batch = tokenize_dataset(records, tokenizer, cutoff_len=512, train_on_inputs=False, progress=False)
    single = [
        tokenize_example(r, tokenizer, cutoff_len=512, train_on_inputs=False, prompter=Prompter())
        for r in records
    ]
    assert batch == single


def test_tokenize_needs_normalised_records(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="normalised record"):
        tokenize_example(DOLLY_OK, tokenizer, cutoff_len=64, train_on_inputs=True, prompter=Prompter())


def test_tokenizer_without_eos_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    no_eos = byte_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        tokenize_example(EXAMPLE, no_eos, cutoff_len=64, train_on_inputs=True, prompter=Prompter())


# --------------------------------------------------------------------------------------------
# Splits


def labelled(n_per_label: dict[str, int]) -> list[dict]:
    return [
        {**DOLLY_OK, "instruction": f"{label} {i}", "category": label}
        for label, n in n_per_label.items()
        for i in range(n)
    ]


def check_partition(split, n: int) -> None:
    everything = [i for c in split.clients for i in c] + split.test
    assert sorted(everything) == list(range(n)), "every record lands exactly once"


@pytest.mark.parametrize("mode", ["iid", "dirichlet", "shards"])
def test_split_is_complete_and_deterministic(mode: str) -> None:
    records = labelled({"a": 300, "b": 120, "c": 60, "d": 25})
    kwargs = dict(mode=mode, alpha=0.5, test_per_label=5, min_client_size=10)
    split = split_records(records, 5, seed=7, **kwargs)
    check_partition(split, len(records))
    assert Counter(records[i]["category"] for i in split.test) == {"a": 5, "b": 5, "c": 5, "d": 5}
    assert split.clients == split_records(records, 5, seed=7, **kwargs).clients
    assert split.test == split_records(records, 5, seed=7, **kwargs).test
    assert split.clients != split_records(records, 5, seed=8, **kwargs).clients
    # The description matches the indices.
    for info, idx in zip(split.info["clients"], split.clients):
        assert info["records"] == len(idx)
        assert info["labels"] == dict(Counter(records[i]["category"] for i in idx))
    sizes = [len(c) for c in split.clients]
    if mode == "iid":
        assert max(sizes) - min(sizes) <= 1
    if mode == "shards":
        # 2 shards of a label-sorted list: a client sees at most 2 shard ranges, hence few labels.
        assert max(sizes) - min(sizes) <= 2
        assert all(len(info["labels"]) <= 3 for info in split.info["clients"])
    if mode == "dirichlet":
        assert min(sizes) >= 10


def label_skew(records: list[dict], split) -> float:
    """Mean total-variation distance between each client's label mix and the overall mix."""
    labels = sorted({r["category"] for r in records})
    overall = np.array([sum(1 for r in records if r["category"] == lab) for lab in labels], dtype=float)
    overall /= overall.sum()
    tvs = []
    for idx in split.clients:
        counts = Counter(records[i]["category"] for i in idx)
        mix = np.array([counts[lab] for lab in labels], dtype=float) / len(idx)
        tvs.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(tvs))


def test_dirichlet_on_real_dolly_is_non_iid() -> None:
    path = require_shared("dolly/databricks-dolly-15k.jsonl")
    records = load_records(path)
    dirichlet = split_records(records, 8, mode="dirichlet", alpha=0.5, seed=42, path=str(path))
    iid = split_records(records, 8, mode="iid", seed=42, path=str(path))
    check_partition(dirichlet, len(records))
    check_partition(iid, len(records))
    assert len(dirichlet.test) == 80
    assert label_skew(records, iid) < 0.03
    assert label_skew(records, dirichlet) > 0.25
    assert min(len(c) for c in dirichlet.clients) >= 40


def test_split_errors() -> None:
    records = labelled({"a": 30, "b": 3})
    with pytest.raises(DataError, match="label 'b' has 3 records"):
        split_records(records, 2, test_per_label=5)
    with pytest.raises(DataError, match="alpha must be > 0"):
        split_records(records, 2, alpha=0, test_per_label=1)
    with pytest.raises(DataError, match="split mode"):
        split_records(records, 2, mode="random")
    with pytest.raises(DataError, match="cannot give each of 40 clients"):
        split_records(records, 40, mode="iid", test_per_label=0)
    no_label = [{k: v for k, v in r.items() if k != "category"} for r in records]
    with pytest.raises(DataError, match="needs a label field"):
        split_records(no_label, 2, mode="dirichlet", path="in.json")
    with pytest.raises(DataError, match="in.json: record 1: missing label field 'category'"):
        split_records([records[0], no_label[1], *records[2:]], 2, mode="shards", path="in.json")
    # IID without labels: the test set is test_per_label records of the whole set.
    split = split_records(no_label, 3, mode="iid", test_per_label=4)
    check_partition(split, len(records))
    assert len(split.test) == 4


# --------------------------------------------------------------------------------------------
# The built-in demo data set


def test_demo_data_loads_and_is_non_iid() -> None:
    root = demo_data_path()
    clients = load_client_datasets(root, 8)
    assert len(clients) == 8 and all(40 <= len(c) <= 60 for c in clients)
    dominant = []
    for records in clients:
        label, count = Counter(r["category"] for r in records).most_common(1)[0]
        assert count >= 0.5 * len(records)
        dominant.append(label)
        assert all(r["instruction"].strip() and r["output"].strip() for r in records)
    assert len(set(dominant)) == 8  # every client is dominated by a different category
    test, fmt = load_dataset_file(find_test_file(root, 8))
    assert fmt == "dolly" and 30 <= len(test) <= 60
    assert len(Counter(r["category"] for r in test)) == 8
    seen = {(r["instruction"], r["input"]) for c in clients for r in c}
    assert len(seen) == sum(len(c) for c in clients)
    assert not seen & {(r["instruction"], r["input"]) for r in test}, "the test set is held out"
    assert (root / "README.md").read_text().count("Apache-2.0") >= 1
