"""What every bench script shares: the machine it ran on, and its section of docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch

from florist.io import atomic_write_text

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> dict[str, Any]:
    """CPU, cores, threads, versions, time and load: context for every figure a script writes."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_section(path: Path, start: str, end: str, section: str, *, heading: str = "") -> None:
    """Replace the text between ``start`` and ``end`` markers (``section`` includes both), so each
    script owns its own part of one shared file; append the section if the markers are absent."""
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nEach section is written by its script under `bench/`.\n"
    )
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = (
            text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + section.rstrip("\n") + "\n"
        )
    atomic_write_text(path, text)
