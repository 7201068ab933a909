"""How long `make test` takes on this machine, with its bf16 capability named, and where the time goes.

    python bench/suite_time.py                     # `make test` as CI runs it, on a quiet machine
    python bench/suite_time.py --emulate-no-bf16   # as on a CPU without native bf16 (see below)

The issue's bar: under 15 minutes on a quiet 2-core CPU without native bf16. On a CPU that has
AVX512-BF16 or AMX, ``--emulate-no-bf16`` runs the suite as an older CPU would: oneDNN is kept
from the bf16 instructions (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``) and florist's ``precision auto``
picks float32 (``FLORIST_CPU_BF16=0``), so every run and test takes the path it takes there.
Emulation leaves the CPU's float32 speed as it is; the label says so beside the figure.

The suite's slowest tests come from pytest's ``--durations`` (through ``PYTEST_ADDOPTS``, so the
command is still exactly `make test`). Results go to stdout as JSON and into docs/benchmarks.md
between the suite-time markers, one entry per kind of machine (bench/limits.py keeps the others).
Run it with nothing else on the machine: the load average at the start is written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
START, END = "<!-- suite-time:start -->", "<!-- suite-time:end -->"
EMULATION = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "FLORIST_CPU_BF16": "0"}
SLOWEST = 12

from common import BENCHMARKS_MD  # noqa: E402
from limits import machine_info, machine_line, write_section_keeping  # noqa: E402


def run_suite(env: dict[str, str]) -> dict[str, Any]:
    """`make test` in ``env``; its outcome, wall time and slowest tests."""
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(["make", "test"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    summary = next((x for x in reversed(lines) if re.search(r"\d+ (passed|failed)", x)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    slowest = [
        {"seconds": float(m.group(1)), "phase": m.group(2), "test": m.group(3)}
        for m in (re.match(r"\s*([\d.]+)s (call|setup|teardown)\s+(\S+)", x) for x in lines)
        if m
    ]
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "summary": summary.strip("= "),
        "counts": counts,
        "load_average_at_start": [round(x, 2) for x in load],
        "slowest": slowest[:SLOWEST],
        "failures": [x for x in lines if x.startswith("FAILED")][:20],
    }


def markdown(result: dict[str, Any], info: dict[str, Any], command: str) -> str:
    status = "passed" if result["returncode"] == 0 else "FAILED"
    total = sum(result["counts"].get(k, 0) for k in ("passed", "failed", "skipped", "error", "errors"))
    lines = [
        START,
        "## How long the suite takes",
        "",
        machine_line(info, command),
        "",
        f"`make test` (ruff, then pytest as CI runs it): **{status} in {result['seconds'] / 60:.1f} min**, "
        f"{total} tests: {result['summary']}.",
        "",
        "Slowest tests (pytest `--durations`):",
        "",
        "| seconds | test |",
        "|---:|---|",
        *[f"| {s['seconds']:.1f} | `{s['test']}` ({s['phase']}) |" for s in result["slowest"]],
        "",
    ]
    lines += [f"- {f}" for f in result["failures"]]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emulate-no-bf16", action="store_true", help="run as on a CPU without native bf16")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTEST_ADDOPTS"] = f"{env.get('PYTEST_ADDOPTS', '')} --durations={SLOWEST}".strip()
    if args.emulate_no_bf16:
        env.update(EMULATION)
        os.environ.update(EMULATION)  # machine_info labels the figures as emulated
    info = machine_info()
    result = run_suite(env)
    result["machine"] = info
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        command = "python bench/suite_time.py" + (" --emulate-no-bf16" if args.emulate_no_bf16 else "")
        write_section_keeping(BENCHMARKS_MD, START, END, markdown(result, info, command), info)
    return 0 if result["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
