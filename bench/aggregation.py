"""Server-side aggregation cost at Llama-7B scale: FLoRIST's latent SVD against the dense route.

    python bench/aggregation.py [--dense-modules 1] [--threads N] [--json PATH] [--no-doc]
    python bench/aggregation.py --smoke     # 4 modules of 1024 x 1024, a minute; writes no docs

8 clients, q_proj and v_proj of 32 layers (64 modules of 4096 x 4096), at r = 16 and at the
heterogeneous ranks [64, 32, 16, 16, 8, 8, 4, 4]. Methods: FLoRIST (tau = 0.9) in float64 with its
modules side by side (the default), one module at a time (as before: multi-threaded LAPACK per
module), in float32 (certified rank, float64 for the modules it cannot certify) and by thin SVDs;
the dense route (form sum_k p_k s_k B_k A_k, then SVD, as FlexLoRA and dense FLoRIST
implementations do), FedIT (zero-padding at heterogeneous ranks) and FLoRA. The float32 route's
singular values of one module are compared with the dense float64 route's, against its stated
bound (florist.aggregation.linalg.float32_error_bound).

Every measurement runs in a fresh subprocess: it builds the client uploads (float32), warms up
the BLAS/LAPACK kernels on a small problem, resets the peak resident set size (writing "5" to
/proc/self/clear_refs), reads VmRSS, runs the aggregation, and reads VmHWM. Peak extra memory is
VmHWM - VmRSS: everything the aggregation allocated at its peak (outputs included), seen by the
kernel, which tracemalloc would miss for torch tensors. The dense route takes ~a minute per
module here, so it is timed on ``--dense-modules`` modules and scaled to 64 (said in the output).
Results go to bench/results/aggregation.json and to the "Aggregation" section of
docs/benchmarks.md (between the aggregation markers, so other benchmarks keep their sections).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from limits import machine_info, machine_line, write_section_keeping  # noqa: E402

from florist.aggregation import ClientUpdate, LoraFactors, get_aggregator  # noqa: E402
from florist.aggregation.base import check_range, client_weights, validate_updates  # noqa: E402
from florist.aggregation.linalg import float32_error_bound, weighted_stack  # noqa: E402
from florist.io import atomic_write_json  # noqa: E402

LAYERS, HIDDEN = 32, 4096
MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in ("q", "v")]
CONFIGS = {"homogeneous r=16": [16] * 8, "heterogeneous": [64, 32, 16, 16, 8, 8, 4, 4]}
NUM_EXAMPLES = [1200, 1800, 1500, 1700, 1300, 1900, 1400, 1600]
START, END = "<!-- aggregation:start -->", "<!-- aggregation:end -->"


# --- one measurement, in its own process ---------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: robust to other jobs on the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_updates(
    ranks: list[int], names: list[str], seed: int = 0, hidden: int = HIDDEN
) -> list[ClientUpdate]:
    """Random uploads; module i of client k depends on (seed, k, i) only, whatever the module count."""
    g = torch.Generator()
    updates = []
    for k, r in enumerate(ranks):
        modules = {}
        for i, name in enumerate(names):
            g.manual_seed(seed * 1_000_003 + k * 1000 + i)
            A = torch.randn(r, hidden, generator=g) / hidden**0.5
            modules[name] = LoraFactors(A=A, B=torch.randn(hidden, r, generator=g) * 0.01, scaling=2.0)
        updates.append(ClientUpdate(f"client_{k}", NUM_EXAMPLES[k], modules))
    return updates


def worker(spec: dict) -> dict:
    """Time one aggregator on ``spec["modules"]`` modules; report wall time and peak extra RSS."""
    torch.set_num_threads(spec["threads"])
    hidden = spec.get("hidden", HIDDEN)
    updates = make_updates(spec["ranks"], MODULES[: spec["modules"]], hidden=hidden)
    options = dict(spec["options"])
    dtype = getattr(torch, options.pop("dtype", "float64"))
    aggregator = get_aggregator(spec["method"], dtype=dtype, **options)
    # Warm-up: the first LAPACK call of a kind and size costs up to ~0.5 s of one-off set-up.
    # Latent routes warm up on one full-size module; the dense route on a 512 x 512 slice (a
    # full-size warm-up would double its minute-long run).
    warm = make_updates(spec["ranks"], ["warmup", "warmup2"], seed=1, hidden=hidden)
    if spec["options"].get("decomposition") == "dense":
        for u in warm:
            f = u.modules["warmup"]
            u.modules["warmup"] = LoraFactors(f.A[:, :512].contiguous(), f.B[:512].contiguous(), f.scaling)
            del u.modules["warmup2"]
    aggregator.aggregate(warm)
    del warm
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss = _status_kib("VmRSS")
    if _status_kib("VmHWM") > rss + 16 * 1024:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs; peak memory unmeasurable")
    cpu, start = _cpu_seconds(), time.perf_counter()
    result = aggregator.aggregate(updates)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _status_kib("VmHWM")
    # The checks every aggregate() runs first (florist.aggregation.base), timed alone: part of the above.
    guard = time.perf_counter()
    validate_updates(updates)
    check_range(updates, dtype)
    guard = time.perf_counter() - guard
    first = sorted(updates[0].modules)[0]
    out = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "guard_seconds": guard,
        "peak_extra_mib": (peak - rss) / 1024,
        "rss_before_mib": rss / 1024,
        "ranks": {"mean": sum(result.ranks.values()) / len(result.ranks), "max": max(result.ranks.values())},
        "sample": {  # a few numbers to cross-check routes that must agree
            "sigma_head": [float(s) for s in next(iter(result.singular_values.values()))[:4]]
            if result.singular_values
            else [],
            # module 0's whole spectrum, for the float32 bound check against the dense route
            "sigma": [float(s) for s in result.singular_values.get(first, [])],
        },
    }
    if "float64_modules" in result.options:
        out["float64_modules"] = len(result.options["float64_modules"])  # type: ignore[arg-type]
    if dtype == torch.float32:
        B, A = weighted_stack(updates, first, client_weights(updates, dtype), dtype)
        out["eps_module0"] = float32_error_bound(B, A)
    return out


def measure(method: str, options: dict, ranks: list[int], modules: int, threads: int, hidden: int) -> dict:
    spec = {
        "method": method, "options": options, "ranks": ranks, "modules": modules, "threads": threads,
        "hidden": hidden,
    }  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return {**spec, **json.loads(out.stdout.strip().splitlines()[-1])}


# --- the command as a user runs it ---------------------------------------------------------


def command_process(ranks: list[int], threads: int) -> dict:
    """``florist aggregate`` as a whole process (imports, reading 8 PEFT directories, FLoRIST over all
    64 modules, writing the adapter), beside the same aggregation in-process, and ``--help``."""
    import os
    import tempfile

    from florist.adapters import write_peft_adapter

    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for u in make_updates(ranks, MODULES):
            d = Path(tmp) / u.client_id
            write_peft_adapter(
                d, u.modules, extra_files={"florist_client.json": {"num_examples": u.num_examples}}
            )
            dirs.append(str(d))
        env = dict(os.environ, FLORIST_PROGRESS="0", OMP_NUM_THREADS=str(threads))
        cli = [sys.executable, "-m", "florist.cli", "aggregate"]
        timings = {}
        for name, args in (
            ("help", ["--help"]),
            ("aggregate", ["--method", "florist", "--threshold", "0.9", "--out", f"{tmp}/out", *dirs]),
        ):
            start = time.perf_counter()
            proc = subprocess.run(cli + args, capture_output=True, text=True, env=env, cwd=REPO)
            timings[name] = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"florist aggregate {args[:4]} failed:\n{proc.stderr[-3000:]}")
        inside = json.loads(Path(tmp, "out", "summary.json").read_text())["seconds"]
    return {
        "help_seconds": timings["help"],
        "process_seconds": timings["aggregate"],
        "read_seconds": inside["read"],
        "aggregate_seconds": inside["aggregate"],
        "command_seconds": inside["total"],  # from argument parsing to the written output
        "startup_seconds": timings["aggregate"] - inside["total"],  # interpreter and imports
    }


# --- the whole benchmark -------------------------------------------------------------------


LATENT, SEQUENTIAL, FLOAT32, ONE, DENSE = (
    "florist, latent QR, float64 (default: modules side by side)",
    "florist, latent QR, float64, one module at a time (before)",
    "florist, latent QR, float32 (certified rank)",
    "florist, latent QR, one module",
    "dense route: sum B_k A_k, then SVD",
)


def run(dense_modules: int, threads: int, total: int, hidden: int) -> dict:
    results: dict[str, dict] = {}
    for config, ranks in CONFIGS.items():
        average = "fedit" if len(set(ranks)) == 1 else "zeropad"
        florist = {"threshold": 0.9}
        plan = [
            (LATENT, "florist", {**florist, "decomposition": "qr"}, total),
            (SEQUENTIAL, "florist", {**florist, "decomposition": "qr", "workers": 1}, total),
            (FLOAT32, "florist", {**florist, "decomposition": "qr", "dtype": "float32"}, total),
            ("florist, latent thin SVDs", "florist", {**florist, "decomposition": "svd"}, total),
            (ONE, "florist", {**florist, "decomposition": "qr"}, 1),
            (DENSE, "florist", {**florist, "decomposition": "dense"}, dense_modules),
            (average, average, {}, total),
            ("flora", "flora", {}, total),
        ]
        rows = {}
        for label, method, options, modules in plan:
            print(f"[{config}] {label}: {modules} module(s) ...", file=sys.stderr, flush=True)
            row = measure(method, options, ranks, modules, threads, hidden)
            # The dense route is timed on a few modules: scale to all of them (said in the output).
            row["scaled"] = modules != total and label != ONE
            factor = total / modules if row["scaled"] else 1.0
            row["seconds_all"], row["cpu_seconds_all"] = row["seconds"] * factor, row["cpu_seconds"] * factor
            rows[label] = row
            print(
                f"    {row['seconds']:.3f} s wall, {row['cpu_seconds']:.3f} s CPU, peak extra {row['peak_extra_mib']:.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
        latent, dense = rows[LATENT], rows[DENSE]
        agree = all(
            abs(a - b) <= 1e-8 * max(1.0, abs(b))
            for a, b in zip(latent["sample"]["sigma_head"], dense["sample"]["sigma_head"])
        )
        f32, exact = rows[FLOAT32], dense["sample"]["sigma"]
        n = min(len(f32["sample"]["sigma"]), len(exact))
        f32_error = max(abs(a - b) for a, b in zip(f32["sample"]["sigma"][:n], exact[:n]))
        results[config] = {
            "ranks": ranks,
            "R": sum(ranks),
            "rows": rows,
            "speedup_wall": dense["seconds_all"] / latent["seconds_all"],
            "speedup_cpu": dense["cpu_seconds_all"] / latent["cpu_seconds_all"],
            "singular_values_agree": agree,
            "float32_sigma_error": f32_error,
            "float32_eps": f32["eps_module0"],
            "float32_ranks_equal": f32["ranks"] == latent["ranks"],
            "dense_buffer_mib": hidden * hidden * 8 / 2**20,
            "stack_buffers_mib": 2 * hidden * sum(ranks) * 8 / 2**20,
        }
    return results


def markdown(report: dict) -> str:
    m, total, hidden = report["machine"], report["modules"], report["hidden"]
    full = total == len(MODULES) and hidden == HIDDEN
    command = "python bench/aggregation.py" + (" --smoke" if report.get("smoke") else "")
    lines = [
        START,
        f"{machine_line(m, command)} {report['threads']} torch thread(s) per measurement. "
        "Wall times are upper bounds when the load average shows other jobs; CPU time (user + system, "
        "all threads of the measuring process) is less sensitive to that.",
        "",
        f"Llama-7B shapes: {total} modules (q_proj and v_proj of {total // 2} layers, {hidden}x{hidden}), "
        "8 clients, float32 uploads, float64 aggregation unless the row says float32, FLoRIST at tau = 0.9 "
        "on random client factors (a flat spectrum, so the kept rank is high and the outputs are large). "
        f"The dense route is timed on {report['dense_modules']} module(s) and **scaled** to {total} (marked *). "
        "Each row is a fresh process; peak extra memory is VmHWM - VmRSS around the aggregation call "
        "(VmHWM reset through /proc/self/clear_refs), outputs included: the kernel's view, which "
        "tracemalloc would miss for torch tensors.",
        "",
    ]
    for config, r in report["results"].items():
        lines += [
            f"**{config}** (ranks {r['ranks']}, R = {r['R']}; one dense {hidden}x{hidden} update is "
            f"{r['dense_buffer_mib']:.0f} MiB, the two stacks of one module {r['stack_buffers_mib']:.1f} MiB)",
            "",
            "| method | modules timed | wall (s) | CPU (s) | per module, wall (ms) | peak extra memory (MiB) | mean broadcast rank |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, row in r["rows"].items():
            star = "*" if row["scaled"] else ""
            lines.append(
                f"| {label} | {row['modules']} | {row['seconds_all']:.3f}{star} | {row['cpu_seconds_all']:.3f}{star} | "
                f"{1000 * row['seconds'] / row['modules']:.1f} | {row['peak_extra_mib']:.1f} | {row['ranks']['mean']:.1f} |"
            )
        latent, one, seq, f32 = r["rows"][LATENT], r["rows"][ONE], r["rows"][SEQUENTIAL], r["rows"][FLOAT32]
        no_dense_buffer = one["peak_extra_mib"] < r["dense_buffer_mib"] / 2
        lines += [
            "",
            f"FLoRIST (latent QR) against the dense route, same run: **{r['speedup_wall']:.0f}x** faster in wall "
            f"time, {r['speedup_cpu']:.0f}x in CPU time"
            + (f" (target >= 50x: {'met' if r['speedup_wall'] >= 50 else 'NOT met'}). " if full else ". ")
            + f"All {total} modules in float64: **{latent['seconds']:.2f} s** wall with the modules side by side "
            f"(each single-threaded, so the result does not depend on the thread count), against "
            f"{seq['seconds']:.2f} s one module at a time with multi-threaded LAPACK ({seq['seconds'] / latent['seconds']:.2f}x); "
            f"in float32 **{f32['seconds']:.2f} s** ({f32.get('float64_modules', 0)} of {total} modules redone in float64 "
            f"because float32 could not certify their rank; ranks equal to float64's: "
            f"{'yes' if r['float32_ranks_equal'] else 'NO'}). "
            + (
                f"Target < 2 s: {'met' if latent['seconds'] < 2 else 'NOT met'} in float64, "
                f"{'met' if f32['seconds'] < 2 else 'NOT met'} in float32. "
                if full
                else "(A smoke run at reduced size: the targets apply to the full run.) "
            )
            + f"Of the float64 time, {latent['guard_seconds']:.2f} s is the uploads' validation and range check that "
            "every aggregate() runs first (florist.aggregation.base). One module peaks at "
            f"{one['peak_extra_mib']:.1f} MiB extra against {r['dense_buffer_mib']:.0f} MiB for a single dense "
            f"m x n buffer (no m x n buffer: {'yes' if no_dense_buffer else 'NO'}). The leading singular values of "
            f"the two routes agree: {'yes' if r['singular_values_agree'] else 'NO'}.",
            "",
            f"float32's error bound on module 0 (eps = (4 + 4 sqrt(R)) u32 ||B||_F ||A||_F = {r['float32_eps']:.3g}): "
            f"its singular values differ from the dense float64 SVD's by at most {r['float32_sigma_error']:.3g}, "
            f"{r['float32_sigma_error'] / r['float32_eps']:.1%} of the bound "
            f"(within it: {'yes' if r['float32_sigma_error'] <= r['float32_eps'] else 'NO'}).",
            "",
        ]
        if "command" in r:
            c = r["command"]
            lines += [
                f"`florist aggregate --method florist` on the same uploads written as 8 PEFT directories, as a "
                f"whole process: **{c['process_seconds']:.1f} s** ({c['startup_seconds']:.1f} s interpreter and "
                f"imports, {c['read_seconds']:.1f} s reading and checking the uploads, "
                f"{c['aggregate_seconds']:.2f} s aggregating, the rest writing), "
                f"{c['process_seconds'] / latent['seconds']:.1f}x the in-process aggregation above. "
                f"`florist aggregate --help` answers in {c['help_seconds']:.2f} s (target < 1 s: "
                f"{'met' if c['help_seconds'] < 1 else 'NOT met'}); the command imports torch and safetensors, "
                "not peft or transformers (`tests/test_cli_aggregate.py`).",
                "",
            ]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dense-modules", type=int, default=1, help="modules the dense route is timed on")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker"
    )
    parser.add_argument(
        "--modules", type=int, default=len(MODULES), help="modules to aggregate (quick checks)"
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "aggregation.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="module size (square)")
    parser.add_argument(
        "--smoke", action="store_true", help="4 modules of 1024 x 1024, no docs: checks the script end to end"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.smoke:
        args.modules, args.hidden, args.no_doc = 4, 1024, True
        args.json = Path(tempfile.gettempdir()) / "florist-bench-smoke" / "aggregation.json"
    if not 1 <= args.modules <= len(MODULES) or not 1 <= args.dense_modules <= args.modules:
        parser.error(f"need 1 <= --dense-modules <= --modules <= {len(MODULES)}")
    info = machine_info()
    start = time.perf_counter()
    results = run(args.dense_modules, args.threads, args.modules, args.hidden)
    if args.modules == len(MODULES) and args.hidden == HIDDEN:
        for config, ranks in CONFIGS.items():
            print(f"[{config}] florist aggregate as a process ...", file=sys.stderr, flush=True)
            results[config]["command"] = command_process(ranks, args.threads)
    report = {
        "machine": info,
        "smoke": args.smoke,
        "hidden": args.hidden,
        "modules": args.modules,
        "dense_modules": args.dense_modules,
        "threads": args.threads,
        "results": results,
    }
    report["bench_seconds"] = time.perf_counter() - start
    atomic_write_json(args.json, report)
    section = markdown(report)
    if not args.no_doc:
        write_section_keeping(args.doc, START, END, section, info)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
