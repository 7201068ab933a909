"""``florist data``: split a data set (instructions or conversations) over clients, fetch, describe.

    florist data split INPUT --num-clients K --out D [--mode iid|dirichlet|shards] [--alpha 0.5]
    florist data fetch dolly|alpaca|wizard|mmlu --out D
    florist data info D --num-clients K

``split`` writes the paper's layout D/K/local_training_{k}.json, D/K/global_test.json and
D/K/split.json (the settings and the label counts of every client), all in one atomic step.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from florist.data import (
    SPLIT_MODES,
    DataError,
    detect_format,
    find_test_file,
    load_client_datasets,
    load_dataset_file,
    load_records,
    normalize_record,
    split_records,
    write_split,
)
from florist.errors import FloristError
from florist.settings import Setting, check_args, one_line_errors

# name -> (Hub repository, config, output file) for the instruction data sets.
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "dolly": ("databricks/databricks-dolly-15k", None, "databricks-dolly-15k.jsonl"),
    "alpaca": ("tatsu-lab/alpaca", None, "alpaca.jsonl"),
    "wizard": ("WizardLM/WizardLM_evol_instruct_70k", None, "wizardlm_evol_instruct_70k.jsonl"),
    "mmlu": ("cais/mmlu", "all", "mmlu"),
}
# The fields each format keeps, in order (the Hub copies carry extra columns, e.g. Alpaca's "text").
KEEP_FIELDS = {
    "dolly": ("instruction", "context", "response", "category"),
    "alpaca": ("instruction", "input", "output"),
    "wizard": ("instruction", "output"),
}
HUB_PROBE_TIMEOUT_S = 10.0
# Every numeric or enumerated flag's type and range (florist.settings.check_args: one line naming it).
INFO_FLAGS = {"--num-clients": Setting(int, low=1)}
SPLIT_FLAGS = {
    **INFO_FLAGS,
    "--mode": Setting(str, choices=SPLIT_MODES),
    "--alpha": Setting(float, low=0.0, low_open=True),
    "--test-per-label": Setting(int, low=0),
    "--seed": Setting(int, low=0),
    "--shards-per-client": Setting(int, low=1),
    "--min-client-size": Setting(int, low=0),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="split, fetch or describe training data", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    s = sub.add_parser(
        "split", help="partition one data set into D/K/local_training_{k}.json + global_test.json"
    )
    s.add_argument(
        "input",
        metavar="INPUT",
        help="a JSON array or JSON lines file: conversations (messages, ShareGPT, prompt/completion) "
        "or instructions (Dolly, Alpaca, Wizard)",
    )
    s.add_argument("--num-clients", required=True, help="K, the number of clients")
    s.add_argument("--out", required=True, help="D: the split is written to D/K/")
    s.add_argument("--mode", default="dirichlet", help=f"{', '.join(SPLIT_MODES)} (default: %(default)s)")
    s.add_argument("--alpha", default=0.5, help="Dirichlet concentration > 0 (smaller = more skewed)")
    s.add_argument("--label-field", default="category", help="the record field that defines the labels")
    s.add_argument("--test-per-label", default=10, help="records per label held out as global_test.json")
    s.add_argument("--seed", default=42)
    s.add_argument("--shards-per-client", default=2)
    s.add_argument("--min-client-size", default=40, help="dirichlet: redraw until every client has this many")
    s.add_argument("--force", action="store_true", help="replace an existing D/K/")
    s.set_defaults(func=cmd_split)
    one_line_errors(s)

    f = sub.add_parser("fetch", help="download a public data set from the Hugging Face Hub (needs internet)")
    f.add_argument("name", choices=sorted(HUB_DATASETS))
    f.add_argument("--out", required=True, help="directory to write into")
    f.set_defaults(func=cmd_fetch)
    one_line_errors(f)

    i = sub.add_parser("info", help="describe a client split: records and labels per client")
    i.add_argument("data_path", metavar="D")
    i.add_argument("--num-clients", required=True)
    i.set_defaults(func=cmd_info)
    one_line_errors(i)


# --------------------------------------------------------------------------------------------
# split


def cmd_split(args: argparse.Namespace) -> int:
    check_args(args, SPLIT_FLAGS)
    from florist.io import resolve_path, sha256_file

    resolve_path(args.out, "--out")  # a symlink loop: one line naming the flag

    path = Path(args.input)
    records = load_records(path)
    fmt = detect_format(records, path)
    for idx, record in enumerate(records):  # refuse bad records before writing anything
        normalize_record(record, fmt, where=f"{path}: record {idx}")
    split = split_records(
        records,
        args.num_clients,
        mode=args.mode,
        alpha=args.alpha,
        label_field=args.label_field,
        test_per_label=args.test_per_label,
        seed=args.seed,
        shards_per_client=args.shards_per_client,
        min_client_size=args.min_client_size,
        path=str(path),
    )
    source = {"path": str(path), "sha256": sha256_file(path), "format": fmt, "records": len(records)}
    target = write_split(records, split, args.out, source=source, overwrite=args.force)
    sizes = ", ".join(str(c["records"]) for c in split.info["clients"])
    print(f"wrote {target}: {args.num_clients} clients ({sizes} records), {len(split.test)} test records")
    return 0


# --------------------------------------------------------------------------------------------
# fetch


def cmd_fetch(args: argparse.Namespace) -> int:
    repo, config, out_name = HUB_DATASETS[args.name]
    _check_hub_reachable(repo)
    import datasets

    try:
        if args.name == "mmlu":
            splits = {s: datasets.load_dataset(repo, config, split=s) for s in ("test", "dev")}
        else:
            table = datasets.load_dataset(repo, config, split="train")
    except (ConnectionError, OSError) as e:
        raise FloristError(_offline_message(repo, e)) from None

    from florist.io import atomic_write_text, strict_json

    out = Path(args.out)
    if args.name == "mmlu":
        target = out / out_name
        _write_mmlu(splits, target)
        print(f"wrote {target}/test and {target}/dev ({sum(len(s) for s in splits.values())} questions)")
        return 0

    fields = KEEP_FIELDS[args.name]
    rows = [{k: row[k] for k in fields if k in row} for row in table]
    for idx, row in enumerate(rows):  # the download must pass the same checks as a user's file
        normalize_record(row, args.name, where=f"{repo}: record {idx}")
    target = out / out_name
    atomic_write_text(
        target, "".join(json.dumps(strict_json(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    )
    print(f"wrote {target} ({len(rows)} records)")
    return 0


def _offline_message(repo: str, error: BaseException) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"cannot reach the Hugging Face Hub to fetch {repo} ({reason}); download it on a machine "
        "with internet and pass the file path"
    )


def _check_hub_reachable(repo: str) -> None:
    """Fail in one line, within seconds, when the Hub cannot be reached.

    ``datasets`` retries for tens of seconds before giving up. With HF_HUB_OFFLINE=1 we skip the
    probe so a copy already in the local Hugging Face cache can still be used.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(repo, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FloristError(f"the Hugging Face Hub refused {repo}: {first}") from None
    except Exception as e:  # any network failure: DNS, refused, timeout, proxy
        raise FloristError(_offline_message(repo, e)) from None


def _write_mmlu(splits: dict[str, Any], target: Path) -> None:
    """MMLU as <split>/<subject>_<split>.csv with question, choice0..3, answer (0-3)."""
    from florist.io import atomic_directory

    with atomic_directory(target) as tmp:
        for split_name, table in splits.items():
            by_subject: dict[str, list[list[Any]]] = {}
            for row in table:
                choices = list(row["choices"])
                if len(choices) != 4 or int(row["answer"]) not in range(4):
                    raise DataError(
                        f"cais/mmlu {split_name}: question {row['question'][:40]!r} is not 4-choice"
                    )
                by_subject.setdefault(row["subject"], []).append(
                    [row["question"], *choices, int(row["answer"])]
                )
            (tmp / split_name).mkdir()
            for subject, rows in sorted(by_subject.items()):
                buf = io.StringIO()
                writer = csv.writer(buf)
                writer.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                writer.writerows(rows)
                (tmp / split_name / f"{subject}_{split_name}.csv").write_text(
                    buf.getvalue(), encoding="utf-8"
                )


# --------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    check_args(args, INFO_FLAGS)
    clients = load_client_datasets(args.data_path, args.num_clients)
    report: dict[str, Any] = {
        "data_path": str(args.data_path),
        "num_clients": args.num_clients,
        "clients": [
            {"records": len(c), "categories": dict(Counter(r.get("category", "") for r in c).most_common())}
            for c in clients
        ],
    }
    test = find_test_file(args.data_path, args.num_clients)
    if test is not None:
        test_records, fmt = load_dataset_file(test)
        report["test"] = {"file": str(test), "format": fmt, "records": len(test_records)}
    print(json.dumps(report, indent=2))
    return 0
