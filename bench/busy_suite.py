"""The test suite on a busy machine: `make test` with CPU-bound busy loops pinned beside it.

    python bench/busy_suite.py                   # the quiet baseline, then two busy loops (one per core)
    python bench/busy_suite.py --no-baseline     # the busy run only
    python bench/busy_suite.py --loops 0 --json quiet.json   # a quiet run on its own

A slow machine is not a failure: every wait in the suite is an event or a hang guard far above
any correct run (tests/conftest.py HANG_GUARD). This runs the suite as CI does, with ``--loops``
processes spinning in pure Python, each pinned to one core, started before the suite and
stopped after it. The outcome (passed/failed counts, wall time, load average) goes to stdout as
JSON and into docs/benchmarks.md between the busy-suite markers.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
START, END = "<!-- busy-suite:start -->", "<!-- busy-suite:end -->"

from common import BENCHMARKS_MD, machine, write_section  # noqa: E402

SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def run_suite(loops: int) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    spinners = [
        subprocess.Popen([sys.executable, "-c", SPIN, str(cores[i % len(cores)])]) for i in range(loops)
    ]
    try:
        time.sleep(2 if loops else 0)  # the loops are spinning before the suite starts
        load = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(["make", "test"], cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    return {
        "loops": loops,
        "returncode": proc.returncode,
        "seconds": seconds,
        "summary": tail,
        "counts": counts,
        "load_average_at_start": [round(x, 2) for x in load],
        "failures": [line for line in proc.stdout.splitlines() if line.startswith("FAILED")][:20],
    }


def markdown(result: dict, info: dict, baseline: dict | None = None) -> str:
    status = "passed" if result["returncode"] == 0 else "FAILED"
    lines = [
        START,
        "## The suite on a busy machine",
        "",
        f"`python bench/busy_suite.py --loops {result['loops']}` on {info['cpu']} ({info['cores']} cores), "
        f"{info['date']}: `make test` with {result['loops']} busy loop(s) pinned beside it, one per core "
        f"(load average {result['load_average_at_start'][0]:.1f} when the suite started).",
        "",
        f"**{status}** in {result['seconds'] / 60:.1f} min: {result['summary']}",
        "",
    ]
    if baseline is not None:
        quiet = "passed" if baseline["returncode"] == 0 else "FAILED"
        lines += [
            f"Quiet baseline (no busy loops): {quiet} in {baseline['seconds'] / 60:.1f} min: "
            f"{baseline['summary']}. The busy run took **{result['seconds'] / baseline['seconds']:.2f}×** "
            "as long.",
            "",
        ]
    lines += [f"- {f}" for f in result["failures"]]
    lines += [
        "Every wait in the suite is an event or a hang guard (`HANG_GUARD`, an hour) far above any correct "
        "run, so a slower machine only makes the suite slower.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loops", type=int, default=2, help="busy-loop processes beside the suite")
    parser.add_argument("--no-baseline", action="store_true", help="skip the quiet run before the busy one")
    parser.add_argument(
        "--baseline-json", type=Path, help="use this earlier quiet run (--json of --loops 0) as the baseline"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    info = machine()
    baseline = None
    if args.baseline_json:
        baseline = json.loads(args.baseline_json.read_text())
    elif args.loops and not args.no_baseline:
        baseline = run_suite(0)
    result = run_suite(args.loops)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.no_docs:
        write_section(BENCHMARKS_MD, START, END, markdown(result, info, baseline))
    ok = result["returncode"] == 0 and (baseline is None or baseline["returncode"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
