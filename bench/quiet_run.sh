#!/usr/bin/env bash
# Regenerate the speed sections of docs/benchmarks.md on a quiet machine, one benchmark after
# another (each would disturb the others' timings if run side by side):
#
#   bench/quiet_run.sh                     # aggregation, training (with memory), evaluation: ~1 h on 2 cores
#   bench/quiet_run.sh --emulate-no-bf16   # first the same training and evaluation as on a CPU without
#                                          # native bf16 (figures labelled EMULATED, kept below the native ones)
#   bench/quiet_run.sh --smoke             # every script end to end on tiny inputs, in minutes; writes no docs
#
# Every section names the machine (CPU, native bf16 or its emulation, threads, load average at
# start) and keeps the figures of other kinds of machines below it (bench/limits.py). Run it with
# nothing else on the machine: the load average is printed first and written beside each figure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
smoke=0
emulate=0
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=1 ;;
        --emulate-no-bf16) emulate=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "quiet_run.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
export FLORIST_PROGRESS=0
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores" >&2

step() {
    echo "== $* ($(date -u +%H:%M:%S) UTC)" >&2
    "$@"
}

if [ "$smoke" = 1 ]; then
    step "$PY" bench/limits.py --seconds 0.5
    step "$PY" bench/aggregation.py --smoke
    step "$PY" bench/training.py --smoke
    step "$PY" bench/evaluation.py --smoke
    echo "smoke run passed: every benchmark ran end to end (docs/benchmarks.md untouched)" >&2
    exit 0
fi

if [ "$emulate" = 1 ]; then
    # oneDNN stops using AVX512-BF16/AMX and florist's precision auto picks fp32, as on an older CPU.
    step env ONEDNN_MAX_CPU_ISA=AVX512_CORE FLORIST_CPU_BF16=0 "$PY" bench/training.py --skip-memory \
        --json bench/results/training_emulated_no_bf16.json
    step env ONEDNN_MAX_CPU_ISA=AVX512_CORE FLORIST_CPU_BF16=0 "$PY" bench/evaluation.py \
        --json bench/results/evaluation_emulated_no_bf16.json
fi
step "$PY" bench/aggregation.py
step "$PY" bench/training.py --json bench/results/training.json
step "$PY" bench/evaluation.py
echo "done: docs/benchmarks.md and bench/results/*.json rewritten" >&2
