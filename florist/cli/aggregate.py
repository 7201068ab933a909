"""``florist aggregate``: combine client LoRA adapters (PEFT directories) into what the server sends.

    florist aggregate --method florist --threshold 0.9 --out OUT CLIENT_DIR... [--num-examples 1579,685,...]

OUT receives the global adapter as a standard PEFT directory (``PeftModel.from_pretrained(base,
OUT)`` applies exactly the aggregated update) or, for methods with one result per client
(FlexLoRA, HetLoRA with heterogeneous ranks, FedSA-LoRA: Ā with the client's own B),
``OUT/client_<i>/`` for the i-th client directory on the command line. FedEx-LoRA also writes
``OUT/base_update/``, the residual to fold into the base weights: the two effective updates sum to
Σ p_k s_k B_k A_k. OUT/summary.json
records ranks, singular values, the paper's Eff, parameters and bytes on the wire, and the clients.
Everything is written to a temporary sibling directory and renamed at the end, so on any error
OUT is left exactly as it was.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import florist
from florist.adapter_files import (
    CLIENT_INFO_FILE,
    DEFAULT_MAX_BYTES,
    MAX_NUM_EXAMPLES,
    NUM_EXAMPLES_FILE,
    AdapterError,
)
from florist.config import ALL_METHODS
from florist.io import resolve_path
from florist.settings import Setting, check_args, clip

# torch, the aggregators and the adapter reader are imported when the command runs, so that
# `--help` and argument errors answer at once; aggregating never imports peft or transformers.
SUMMARY_FILE = "summary.json"
BASE_UPDATE_DIR = "base_update"
DTYPES = ("float64", "float32")  # torch dtype names
WIRE_DTYPES = ("float32", "bfloat16", "float16")
DECOMPOSITIONS = ("qr", "svd", "dense")
# Every flag's type and range, checked by florist.settings.check_args (one line naming the flag).
FLAGS = {
    "--method": Setting(str, choices=ALL_METHODS),
    "--threshold": Setting(float, optional=True, low=0.0, low_open=True, high=1.0),
    "--dtype": Setting(str, choices=DTYPES),
    "--decomposition": Setting(str, optional=True, choices=DECOMPOSITIONS),
    "--regularization": Setting(float, optional=True, low=0.0),
    "--wire-dtype": Setting(str, choices=WIRE_DTYPES),
    "--max-bytes": Setting(int, low=1),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "aggregate",
        help="aggregate client LoRA adapters (PEFT directories) into a global adapter",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "clients", nargs="*", metavar="CLIENT_DIR", help="PEFT adapter directories, one per client"
    )
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--method", default="florist", help=f"{FLAGS['--method'].description()} (default: florist)"
    )
    p.add_argument("--threshold", default=None, help="FLoRIST energy threshold tau in (0, 1] (default 0.9)")
    p.add_argument(
        "--num-examples",
        default=None,
        help=f"comma-separated example counts, one per client (default: {CLIENT_INFO_FILE} or "
        f"{NUM_EXAMPLES_FILE} in each client directory)",
    )
    p.add_argument("--dtype", default="float64", help="aggregation arithmetic: float64 or float32")
    p.add_argument("--decomposition", default=None, help="SVD route (FLoRIST): qr, svd or dense")
    p.add_argument(
        "--regularization",
        default=None,
        help="LoRA-FAIR's λ (default 0.01, relative to tr(ĀĀᵀ)/r)",
    )
    p.add_argument(
        "--data-weights",
        action="store_const",
        const=True,
        default=None,
        help="HetLoRA: weight S_k by the data weights p_k too (not in the paper)",
    )
    p.add_argument(
        "--wire-dtype",
        default="float32",
        help=f"dtype for byte counts: {FLAGS['--wire-dtype'].description()}",
    )
    p.add_argument("--max-bytes", default=DEFAULT_MAX_BYTES, help="largest accepted adapter file")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path for the output config")
    p.add_argument("--overwrite", action="store_true", help="replace an existing florist aggregate output")
    p.set_defaults(func=run_aggregate)


# --- argument checks -----------------------------------------------------------------------


def _parse_num_examples(text: str | None, clients: list[Path]) -> list[int | None]:
    if text is None:
        return [None] * len(clients)
    parts = [s.strip() for s in text.split(",")]
    if len(parts) != len(clients):
        raise AdapterError(f"--num-examples has {len(parts)} values for {len(clients)} client directories")
    counts: list[int | None] = []
    for client, part in zip(clients, parts):
        # Plain ASCII decimals only: int() would also take "1_000" and other scripts' digits.
        if not (part.isascii() and part.isdigit()):
            raise AdapterError(
                f"{client}: --num-examples value {clip(repr(part))} is not a plain decimal integer"
            )
        # 2**53 has 16 digits; a longer value is never converted (int() refuses 4,300 digits with
        # an error that names no flag).
        if len(part) > 16 or not 0 < int(part) <= MAX_NUM_EXAMPLES:
            raise AdapterError(f"{client}: --num-examples value {clip(repr(part))} must be from 1 to 2**53")
        counts.append(int(part))
    return counts


def _check_out(out: Path, clients: list[Path], overwrite: bool) -> None:
    """Every client directory once, none overlapping ``out``, and ``out`` replaceable."""
    resolved = resolve_path(out, "--out")
    seen: dict[Path, Path] = {}
    for client in clients:
        c = resolve_path(client, "client directory")
        if c in seen:
            raise AdapterError(f"{client}: the same client directory is given twice (also as {seen[c]})")
        seen[c] = client
        if resolved == c or resolved.is_relative_to(c) or c.is_relative_to(resolved):
            raise AdapterError(f"--out {out} overlaps the client directory {client}")
    if not out.exists():
        return
    if not out.is_dir():
        raise AdapterError(f"--out {out} exists and is not a directory")
    if not overwrite:
        raise AdapterError(f"--out {out} already exists; pass --overwrite to replace it")
    # Replacing deletes the old directory: only ever do that to an earlier aggregate output.
    if any(out.iterdir()) and not (out / SUMMARY_FILE).is_file():
        raise AdapterError(
            f"--out {out} is not empty and is not a florist aggregate output; refusing to replace it"
        )


def _aggregator_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method's options from the flags it accepts; the ones it declares (FLoRIST's τ) always,
    at their defaults when not given."""
    from florist.aggregation import AGGREGATORS

    cls = AGGREGATORS[args.method]
    accepted = inspect.signature(cls.__init__).parameters
    takes = [m for m, c in sorted(AGGREGATORS.items()) if "threshold" in c.options]
    if args.threshold is not None and "threshold" not in cls.options:
        raise AdapterError(f"--threshold applies to --method {' or '.join(takes)}, not {args.method}")
    options: dict[str, Any] = {name: accepted[name].default for name in cls.options}
    for key in ("threshold", "decomposition", "regularization", "data_weights"):
        value = getattr(args, key)
        if value is not None and key not in accepted:
            raise AdapterError(f"--{key.replace('_', '-')} does not apply to --method {args.method}")
        if value is not None:
            options[key] = value
    return options


# --- the command ---------------------------------------------------------------------------


def _read_clients(clients: list[Path], counts: list[int | None], max_bytes: int) -> tuple[list, list[dict]]:
    from tqdm.auto import tqdm

    from florist.adapters import read_client_info, read_num_examples, read_peft_adapter
    from florist.aggregation import ClientUpdate
    from florist.progress import bar_disabled

    updates: list[ClientUpdate] = []
    described: list[dict[str, Any]] = []
    for index, (client, count) in enumerate(
        zip(tqdm(clients, desc="reading clients", unit="client", disable=bar_disabled()), counts)
    ):
        info = read_client_info(client)
        adapter, config = read_peft_adapter(client, max_bytes=max_bytes)
        n = count if count is not None else read_num_examples(client)
        if n is None:
            raise AdapterError(
                f"{client}: number of examples unknown; write {CLIENT_INFO_FILE} "
                '({"num_examples": N}) beside the adapter or pass --num-examples'
            )
        # The directory as given is the client's id in the round, so every aggregation error names it.
        updates.append(ClientUpdate(client_id=str(client), num_examples=n, modules=adapter))
        described.append(
            {
                "index": index,
                "dir": str(client),
                "client_id": info.get("client_id", client.name),
                "num_examples": n,
                "base_model_name_or_path": config.get("base_model_name_or_path"),
                "ranks": {name: f.rank for name, f in adapter.items()},
                "scalings": sorted({f.scaling for f in adapter.values()}),
            }
        )
    return updates, described


def _base_model(described: list[dict[str, Any]], override: str | None) -> str | None:
    if override is not None:
        return override
    first = described[0]
    for d in described[1:]:
        if d["base_model_name_or_path"] != first["base_model_name_or_path"]:
            raise AdapterError(
                f"{d['dir']}: base model {d['base_model_name_or_path']!r} differs from "
                f"{first['dir']}'s {first['base_model_name_or_path']!r}; pass --base-model to override"
            )
    return first["base_model_name_or_path"]


def _check_finite(result, dtype: str) -> None:
    """Every output as it will be written (float32): finite uploads can still sum past the
    float32 range, in the aggregate or in FedEx's base_update; never write such an adapter."""
    import torch

    from florist.adapters import non_finite

    outputs = (
        {"aggregate": result.adapter}
        if result.per_client is None
        else {f"aggregate for client {cid}": adapter for cid, adapter in result.per_client.items()}
    )
    if result.base_update is not None:
        outputs[BASE_UPDATE_DIR] = result.base_update
    for what, adapter in outputs.items():
        for name, f in adapter.items():
            for factor in ("A", "B"):
                tensor = getattr(f, factor)
                problem = non_finite(tensor, tensor.to(torch.float32))
                if problem:
                    hint = "; try --dtype float64" if dtype == "float32" else ""
                    raise AdapterError(
                        f"module {name!r}: the {result.method} {what}'s lora_{factor} {problem} "
                        f"(computed in {dtype}, written in float32){hint}"
                    )


def run_aggregate(args: argparse.Namespace) -> int:
    check_args(args, FLAGS)
    clients = [Path(c) for c in args.clients]
    if not clients:
        raise AdapterError("no client directories given (zero clients)")
    out = Path(args.out)
    _check_out(out, clients, args.overwrite)
    counts = _parse_num_examples(args.num_examples, clients)
    options = _aggregator_options(args)

    import torch

    from florist.adapters import write_peft_adapter
    from florist.aggregation import get_aggregator
    from florist.comm import paper_eff, round_communication
    from florist.io import atomic_directory, atomic_write_json

    start = time.perf_counter()  # the summary's times leave out the imports above
    aggregator = get_aggregator(args.method, dtype=getattr(torch, args.dtype), **options)

    updates, described = _read_clients(clients, counts, args.max_bytes)
    base_model = _base_model(described, args.base_model)
    read_seconds = time.perf_counter() - start

    t0 = time.perf_counter()
    try:
        result = aggregator.aggregate(updates)
    except torch.linalg.LinAlgError as e:  # e.g. an overflow to Inf inside the SVD
        hint = "; try --dtype float64" if args.dtype == "float32" else ""
        raise AdapterError(
            f"{args.method} aggregation in {args.dtype} failed: {str(e).splitlines()[0]}{hint}"
        ) from None
    aggregate_seconds = time.perf_counter() - t0
    _check_finite(result, args.dtype)
    communication = round_communication(result, updates, wire_dtype=getattr(torch, args.wire_dtype))
    total = sum(u.num_examples for u in updates)
    for d in described:
        d["weight"] = d["num_examples"] / total

    with atomic_directory(out, overwrite=True) as tmp:
        if result.per_client is not None:
            outputs = []
            for d in described:
                name = f"client_{d['index']}"
                write_peft_adapter(
                    tmp / name, result.per_client[d["dir"]], base_model_name_or_path=base_model
                )
                d["output"] = name
                outputs.append(name)
        else:
            assert result.adapter is not None
            write_peft_adapter(tmp, result.adapter, base_model_name_or_path=base_model)
            outputs = ["."]
        if result.base_update is not None:  # FedEx-LoRA: the residual to fold into the base
            write_peft_adapter(tmp / BASE_UPDATE_DIR, result.base_update, base_model_name_or_path=base_model)
            outputs.append(BASE_UPDATE_DIR)
        summary = {
            "florist_version": florist.__version__,
            "method": result.method,
            "threshold": options.get("threshold"),
            "options": {"dtype": args.dtype, "wire_dtype": args.wire_dtype, **options},
            "merge_into_base": result.merge,
            "base_model_name_or_path": base_model,
            "outputs": outputs,
            "ranks": result.ranks,
            "total_rank": sum(result.ranks.values()),
            "singular_values": {name: s.tolist() for name, s in result.singular_values.items()},
            "eff": paper_eff(result),
            "communication": communication,
            "clients": described,
            "seconds": {
                "read": read_seconds,
                "aggregate": aggregate_seconds,
                "total": time.perf_counter() - start,
            },
        }
        atomic_write_json(tmp / SUMMARY_FILE, summary)

    print(
        f"florist aggregate: {result.method} over {len(updates)} clients -> {out} "
        f"(rank {summary['total_rank']} over {len(result.ranks)} modules, Eff {summary['eff']:.4g})",
        file=sys.stdout,
    )
    return 0
