"""What the machine can do, measured in the benchmark's own run, and how each section says which
machine its figures come from.

    python bench/limits.py [--seconds 2]     # print the matmul peaks of this machine

- ``matmul_peak``: GFLOP/s of large square matmuls (2048^3) in float32 and bfloat16, best of a few
  timed repeats, with the thread count the benchmark itself runs at, plus the same at a shape a
  135M model multiplies (tokens x 576 x 1536) to show what smaller matrices reach.
- ``machine_line``: one sentence naming CPU, cores, threads, native bf16 (or its emulated absence),
  torch, date and load: written beside every figure.
- ``write_section_keeping``: a bench section replaced in docs/benchmarks.md, the figures it held
  kept below it, labelled with their machine, when they came from a different kind of machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, write_section  # noqa: E402

from florist.io import atomic_write_text  # noqa: E402

PEAK_SIZE = 2048
MODEL_SHAPE = (2048, 576, 1536)  # (tokens, hidden, MLP width) of SmolLM2-135M's largest matmuls


def _rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    """Best GFLOP/s of ``(m x k) @ (k x n)`` over repeats filling about ``seconds``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, page faults
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * m * k * n / elapsed / 1e9)
        if time.perf_counter() > deadline:
            return best


def matmul_peak(seconds: float = 2.0) -> dict[str, Any]:
    """The machine's matmul peaks at torch's current thread count (best of repeats: on a shared
    machine the best repeat is the one least disturbed)."""
    n = PEAK_SIZE
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "size": n, "model_shape": list(MODEL_SHAPE)}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[name] = _rate(n, n, n, dtype, seconds)
        out[f"{name}_model_shape"] = _rate(*MODEL_SHAPE, dtype, seconds / 2)
    return out


def peak_sentence(peak: dict[str, Any]) -> str:
    t, s = peak["model_shape"], peak["size"]
    return (
        f"Matmul peaks measured in the same run with the same {peak['threads']} thread(s), best of "
        f"repeats: {peak['float32']:.0f} GFLOP/s float32 and {peak['bfloat16']:.0f} GFLOP/s bfloat16 "
        f"at {s}x{s}x{s}; at the model's own largest shape ({t[0]}x{t[1]}x{t[2]}) "
        f"{peak['float32_model_shape']:.0f} and {peak['bfloat16_model_shape']:.0f} GFLOP/s."
    )


def emulated() -> bool:
    """Whether this process emulates a CPU without native bf16 (florist.models.cpu_has_fast_bf16)."""
    return os.environ.get("FLORIST_CPU_BF16", "").strip() in ("0", "false", "no", "off") or (
        os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("AVX512_CORE", "AVX2", "AVX512_CORE_VNNI")
    )


def bf16_label(m: dict[str, Any]) -> str:
    bf16 = m.get("bf16", "not recorded")
    native = ", ".join(bf16) if isinstance(bf16, list) else str(bf16)
    if emulated() if "emulated" not in m else m["emulated"]:
        return f"native bf16: none, EMULATED (the CPU has {native}; ONEDNN_MAX_CPU_ISA/FLORIST_CPU_BF16 set)"
    return f"native bf16: {native}"


def machine_info() -> dict[str, Any]:
    """bench/common.py's machine() plus whether bf16 is emulated away."""
    info = machine()
    info["emulated"] = emulated()
    info["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return info


def machine_line(m: dict[str, Any], command: str) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"`{command}` on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads{gpu}; "
        f"**{bf16_label(m)}**), torch {m['torch']}, {m['date']}, load average at start "
        f"{m['load_average']}."
    )


def machine_tag(m: dict[str, Any]) -> str:
    """What makes two machines the same kind for a section: CPU model and native bf16."""
    bf16 = "none (emulated)" if m.get("emulated") else m.get("bf16", "unknown")
    bf16 = "+".join(bf16) if isinstance(bf16, list) else str(bf16)
    return f"{m['cpu']} | bf16 {bf16}"


def write_section_keeping(path: Path, start: str, end: str, section: str, m: dict[str, Any]) -> None:
    """Write ``section`` (markers included) between ``start`` and ``end``. If the figures there
    came from another kind of machine (``machine_tag``), keep them below the section, labelled;
    earlier figures from this same kind of machine are replaced by the new ones."""
    tag = machine_tag(m)
    section = section.replace(start, f"{start}\n<!-- machine: {tag} -->", 1)
    text = path.read_text() if path.exists() else ""
    if start not in text or end not in text:
        write_section(path, start, end, section)
        return
    old = text.split(start, 1)[1].split(end, 1)[0]
    found = re.search(r"<!-- machine: (.*?) -->", old)
    old_tag = found.group(1) if found else None
    name = start.removeprefix("<!-- ").split(":")[0]
    e_start, e_end = f"<!-- {name}:earlier:start -->", f"<!-- {name}:earlier:end -->"
    earlier = text.split(e_start, 1)[1].split(e_end, 1)[0] if e_start in text and e_end in text else ""
    entries = [e for e in re.split(r"(?=<!-- earlier: )", earlier) if e.strip().startswith("<!-- earlier:")]
    if old_tag != tag and old.strip():
        label = (
            old_tag
            or "machine as named in the text; recorded before sections named the CPU's bf16 capability"
        )
        body = re.sub(r"<!-- machine: .*? -->\n?", "", old).strip("\n")
        body = re.sub(r"^#+ (.*)$", r"**\1**", body, flags=re.M)  # its headings, demoted
        entries = (
            [e for e in entries if not e.startswith(f"<!-- earlier: {old_tag} -->")] if old_tag else entries
        )
        entries.insert(
            0, f"<!-- earlier: {old_tag or 'untagged'} -->\n#### Earlier figures ({label})\n\n{body}\n"
        )
    entries = [e for e in entries if not e.startswith(f"<!-- earlier: {tag} -->")]
    block = ""
    if entries:
        block = "\n" + e_start + "\n" + "\n".join(x.rstrip("\n") + "\n" for x in entries) + e_end
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    if e_start in tail and e_end in tail:
        before, after = tail.split(e_start, 1)
        tail = before.rstrip("\n") + after.split(e_end, 1)[1]
    atomic_write_text(path, head + section.rstrip("\n") + block + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    m = machine_info()
    peak = matmul_peak(args.seconds)
    print(machine_line(m, "python bench/limits.py"))
    print(peak_sentence(peak))
    print(json.dumps(peak, indent=2))


if __name__ == "__main__":
    main()
