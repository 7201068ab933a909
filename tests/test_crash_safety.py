"""Crash safety: a failure or a SIGKILL at any moment never leaves a truncated or half-written file.

* ``florist.io``: a write that fails (or is killed) leaves the previous content whole and no
  temporary files behind; data is fsynced before the rename that publishes it.
* checkpoints: damage of any kind is detected by the checksums in the manifest, never loaded.
* a real ``florist run`` subprocess is SIGKILLed at seeded random moments across rounds and
  resumed until it completes: at every kill every visible file is whole and the checkpoint
  verifies, and the final adapter equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD
from safetensors.torch import load_file

from florist.adapters import read_peft_adapter
from florist.aggregation import LoraFactors
from florist.checkpoint import (
    CheckpointError,
    CheckpointState,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from florist.io import LOCK_FILE, atomic_directory, atomic_write_bytes, atomic_write_json
from florist.models import tiny_llama

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "PYTHONUNBUFFERED": "1",
    "FLORIST_PROGRESS": "0",
}
# Hidden names florist's atomic helpers use while writing: ".<name>.<random>.tmp" and the
# previous directory parked during the swap, ".<name>.old-<pid>".
TEMP_NAME = re.compile(r"^\..+(\.tmp|\.old-\d+)$")


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Boom(Exception):
    pass


# --- florist.io -------------------------------------------------------------------------------


def test_atomic_write_bytes_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old content")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["metrics.json"]

    # the data is flushed to disk before the rename makes it visible
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(target, b"third")
    assert events[:2] == ["fsync", "replace"]
    monkeypatch.undo()

    # a failure at any step leaves the old file intact and nothing else
    def explode(*args: object) -> None:
        raise Boom

    for step in ("fsync", "replace"):
        monkeypatch.setattr(os, step, explode)
        with pytest.raises(Boom):
            atomic_write_bytes(target, b"never seen")
        monkeypatch.undo()
        assert target.read_bytes() == b"third"
        assert os.listdir(tmp_path) == ["metrics.json"], step
    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        atomic_write_json(target, {"x": object()})
    assert target.read_bytes() == b"third" and os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_directory_failure_keeps_the_previous_directory(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "adapter"
    with atomic_directory(out) as tmp:
        (tmp / "a.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    before = listing(out)
    with pytest.raises(Boom), atomic_directory(out) as tmp:
        (tmp / "a.json").write_text("2")
        raise Boom
    assert listing(out) == before and os.listdir(tmp_path) == ["adapter"]
    with pytest.raises(FileExistsError), atomic_directory(out, overwrite=False):
        pass
    assert listing(out) == before and os.listdir(tmp_path) == ["adapter"]

    # every file inside is fsynced before the directory is swapped in
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with atomic_directory(out) as tmp:
        for i in range(3):
            (tmp / f"f{i}").write_bytes(b"x")
    monkeypatch.undo()
    assert len(synced) >= 3 and sorted(listing(out)) == ["f0", "f1", "f2"]


def test_atomic_directory_interrupted_between_its_two_renames_restores_the_old_one(
    tmp_path: Path, monkeypatch
) -> None:
    """atomic_directory parks the old directory, then moves the new one in. If the second rename
    fails (or Ctrl-C lands between them), the old directory must be put back, not left parked."""
    out = tmp_path / "adapter"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_bytes(b"previous")
    real_replace, calls = os.replace, []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "weights").write_bytes(b"next")
    monkeypatch.undo()
    assert len(calls) >= 2
    assert listing(out) == {"weights": b"previous"}
    assert os.listdir(tmp_path) == ["adapter"]


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """SIGKILL skips every cleanup: the temporary file or directory of the killed write stays.
    The next successful write of the same path must remove it, so a resumed run ends clean."""
    fd, _ = tempfile.mkstemp(
        prefix=".metrics.json.", suffix=".tmp", dir=tmp_path
    )  # as a killed write leaves it
    os.write(fd, b'{"trunc')
    os.close(fd)
    stale = Path(tempfile.mkdtemp(prefix=".checkpoint.", suffix=".tmp", dir=tmp_path))
    (stale / "state.json").write_bytes(b'{"half')
    parked = tmp_path / ".checkpoint.old-99999"
    parked.mkdir()
    (parked / "state.json").write_text("{}")
    atomic_write_json(tmp_path / "metrics.json", {"ok": True})
    with atomic_directory(tmp_path / "checkpoint") as tmp:
        (tmp / "state.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "metrics.json"]


def test_atomic_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    """Atomic files and directories are created like open()/mkdir() would: mode 0o666/0o777 minus
    the umask (mkstemp's private 0o600 would make shared adapters unreadable to the group)."""
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "file", b"x")
        with atomic_directory(tmp_path / "dir") as tmp:
            (tmp / "inner").write_bytes(b"y")
        (tmp_path / "plain").write_bytes(b"z")
    finally:
        os.umask(umask)
    assert (tmp_path / "file").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o755


WRITER = """
import sys
from florist.io import atomic_write_bytes
target, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    atomic_write_bytes(target, bytes([65 + i % 2]) * size)
    i += 1
"""


def test_sigkilled_writer_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target, size = tmp_path / "blob", 8 * 1024**2
    rng = random.Random(1)
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(size)], env=ENV, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.2, 0.8))
        finally:
            proc.kill()
            proc.wait(timeout=HANG_GUARD)
        data = target.read_bytes()
        assert len(data) == size and data in (b"A" * size, b"B" * size)
        assert all(TEMP_NAME.match(name) for name in os.listdir(tmp_path) if name != "blob")


# --- damaged checkpoints ------------------------------------------------------------------------


def small_checkpoint(out: Path) -> Path:
    g = torch.Generator().manual_seed(0)

    def adapter() -> dict[str, LoraFactors]:
        return {
            "model.layers.0.q_proj": LoraFactors(
                torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
            )
        }

    save_checkpoint(
        out, CheckpointState(2, {"rounds": [1, 2]}, {"method": "florist"}, merged=[adapter(), adapter()])
    )
    assert load_checkpoint(out).completed_round == 2
    return checkpoint_path(out)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated round file": (
        lambda c: _truncate(c / "merged" / "round_0002.safetensors"),
        "round_0002.safetensors: checksum mismatch",
    ),
    "flipped bit in a round file": (
        lambda c: _flip(c / "merged" / "round_0001.safetensors"),
        "round_0001.safetensors: checksum mismatch",
    ),
    "deleted round file": (
        lambda c: (c / "merged" / "round_0001.safetensors").unlink(),
        "round_0001.safetensors: listed in the checkpoint manifest but missing",
    ),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "damaged or missing checkpoint manifest"),
    "truncated manifest": (
        lambda c: _truncate(c / "manifest.json"),
        "damaged or missing checkpoint manifest",
    ),
    "manifest escapes": (
        lambda c: (c / "manifest.json").write_text(
            json.dumps({"format": "florist-checkpoint", "files": {"../x": "0"}})
        ),
        "invalid file name '../x'",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    """Complements tests/test_resume.py (a flipped byte in server.safetensors and state.json)."""
    breaker, text = DAMAGE[damage]
    breaker(small_checkpoint(tmp_path))
    with pytest.raises(CheckpointError, match=re.escape(text)) as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


# --- SIGKILL a real run at random moments, resume until done --------------------------------------

ROUNDS = 4
RUN_FLAGS = [
    "--num_clients", "3", "--method", "florist", "--threshold", "0.9", "--heter", "True",
    "--local_ranks", "4,2,1", "--num_communication_rounds", str(ROUNDS),
    "--local_batch_size", "2", "--local_micro_batch_size", "2", "--local_max_steps", "1",
    "--local_learning_rate", "0.05", "--cutoff_len", "64", "--lora_dropout", "0.05",
    "--evaluate", "False", "--precision", "fp32", "--device", "cpu", "--seed", "3",
]  # fmt: skip
CLI = "import sys; from florist.cli import main; sys.exit(main())"


def assert_whole(out: Path) -> int:
    """Every visible file parses in full and the checkpoint verifies; returns its round (0: none)."""
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        hidden = [part for part in rel.parts if part.startswith(".")]
        if hidden:  # a write in progress when the kill came, or the dead run's lock: never read
            assert TEMP_NAME.match(hidden[0]) or hidden[0] == LOCK_FILE, rel
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
    state = load_checkpoint(out) if out.exists() else None  # verifies every checksum
    if (out / "adapter").exists():
        read_peft_adapter(out / "adapter")
    if (out / "metrics.json").exists():
        assert len(json.loads((out / "metrics.json").read_text())["rounds"]) == ROUNDS
    return 0 if state is None else state.completed_round


def run_until_killed(args: list[str], delay: float) -> tuple[int | None, list[str]]:
    """Start ``florist run``; SIGKILL it ``delay`` s after its first round line; (exit code, output)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(HANG_GUARD, proc.kill)  # never hang the suite
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if re.match(rf"round \d+/{ROUNDS}:", line):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=HANG_GUARD)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()
    return proc.returncode, lines


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path, federated_data):
    from florist.cli import main

    data = federated_data(3)
    model_dir = tmp_path / "tiny"
    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["run", "--global_model", str(model_dir), "--data_path", str(data), *RUN_FLAGS]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main([*common, "--output_dir", str(whole)]) == 0

    # Kill within the next round and a half after a round's line, whatever the machine's speed.
    round_seconds = statistics.median(
        r["seconds"] for r in json.loads((whole / "metrics.json").read_text())["rounds"]
    )
    rng = random.Random(20250607)
    completed, kills = 0, []
    for attempt in range(3):
        args = [*common, "--output_dir", str(killed)] + (["--resume"] if attempt else [])
        code, lines = run_until_killed(args, delay=rng.uniform(0.0, 1.5 * round_seconds))
        if code == 0:  # it finished before the kill came
            break
        assert code == -signal.SIGKILL, "\n".join(lines)
        now = assert_whole(killed)
        assert now > completed, f"attempt {attempt} made no progress: {lines[-3:]}"
        completed = now
        kills.append(now)
    if code != 0:
        assert main([*common, "--output_dir", str(killed), "--resume"]) == 0
    assert kills, "no kill landed"
    assert assert_whole(killed) == ROUNDS

    weights = "adapter/adapter_model.safetensors"
    assert (killed / weights).read_bytes() == (whole / weights).read_bytes(), f"killed after rounds {kills}"
    assert json.loads((killed / "adapter/adapter_config.json").read_text()) == json.loads(
        (whole / "adapter/adapter_config.json").read_text()
    )

    def untimed(obj: object) -> object:
        if isinstance(obj, dict):
            return {k: untimed(v) for k, v in obj.items() if k not in ("seconds", "aggregation_seconds")}
        return [untimed(v) for v in obj] if isinstance(obj, list) else obj

    def rounds(d: Path) -> object:
        return untimed(json.loads((d / "metrics.json").read_text())["rounds"])

    assert rounds(killed) == rounds(whole)
