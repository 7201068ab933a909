"""The output directory under hostile conditions: a second run on it, no way to write it, a full
disk, SIGTERM. Each ends in one line and a clear exit code, and no run damages another's files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from florist.cli import main
from florist.errors import run_cli
from florist.io import LOCK_FILE, atomic_directory, atomic_write_bytes, output_lock

REPO = Path(__file__).resolve().parents[1]
RUN_FLAGS = [
    "--num_clients", "3", "--num_communication_rounds", "1",
    "--local_batch_size", "2", "--local_micro_batch_size", "2", "--local_max_steps", "1",
    "--cutoff_len", "64", "--lora_r", "2", "--lora_alpha", "4", "--evaluate", "False",
    "--precision", "fp32", "--device", "cpu",
]  # fmt: skip


def run(model: Path, data: Path, out: Path) -> int:
    args = ["--global_model", str(model), "--data_path", str(data), "--output_dir", str(out)]
    return main(["run", *args, *RUN_FLAGS])


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("florist: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_second_run_on_a_busy_output_directory_is_refused(
    model_dir, federated_data, tmp_path: Path, capsys
) -> None:
    data, out = federated_data(3), tmp_path / "out"
    # Another process holds the directory: it says so once it has the lock, then waits for stdin.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from florist.io import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in out.iterdir())
        capsys.readouterr()
        assert run(model_dir, data, out) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{out}: another florist run (pid {holder.pid}) is writing this output directory" in line
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing deleted
        # A killed holder leaves its lock file, but not its lock: the next run proceeds.
        holder.kill()
        holder.wait()
        assert (out / LOCK_FILE).exists()
        assert run(model_dir, data, out) == 0
        assert (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with output_lock(tmp_path / "out"):
        with pytest.raises(Exception, match="another florist run"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released: free again
        pass
    assert not (tmp_path / "out").exists()  # created, left empty, so removed again


def test_an_unwritable_output_directory_is_found_before_training(
    model_dir, federated_data, tmp_path: Path, capsys
) -> None:
    data = federated_data(3)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    capsys.readouterr()
    assert run(model_dir, data, blocker / "out") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{blocker / 'out'}: cannot write to the output directory" in line
    assert "round" not in capsys.readouterr().out
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_found_before_training(
    model_dir, federated_data, tmp_path: Path, capsys
) -> None:
    data, parent = federated_data(3), tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        capsys.readouterr()
        assert run(model_dir, data, parent / "out") == 2
        assert "cannot write to the output directory" in one_error_line(capsys.readouterr().err)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_a_disk_that_refuses_writes_is_one_line_exit_2_and_leaves_nothing(
    model_dir, federated_data, tmp_path: Path
) -> None:
    # A file-size limit makes the kernel refuse every write past 2 KiB (EFBIG), as a full disk
    # refuses them (ENOSPC): the run's first checkpoint cannot be written.
    data, out = federated_data(3), tmp_path / "out"

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    args = ["--global_model", str(model_dir), "--data_path", str(data), "--output_dir", str(out), *RUN_FLAGS]
    proc = subprocess.run(
        [sys.executable, "-m", "florist.cli", "run", *args],
        capture_output=True, text=True, cwd=REPO, preexec_fn=limit,
        env={**os.environ, "FLORIST_PROGRESS": "0"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "File too large" in line and str(out) in line, line
    leftovers = [p for p in out.rglob("*")] if out.exists() else []
    assert leftovers == [], leftovers  # no half-written checkpoint, no temporary files


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path: Path, capsys) -> None:
    out = tmp_path / "result"

    def interrupted_write() -> None:
        with atomic_directory(out) as tmp:
            atomic_write_bytes(tmp / "half.bin", b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            atomic_write_bytes(tmp / "never.bin", b"never")

    handler = signal.getsignal(signal.SIGTERM)
    assert run_cli(interrupted_write) == 143
    assert capsys.readouterr().err.strip() == "florist: terminated"
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary leftovers
    assert signal.getsignal(signal.SIGTERM) is handler  # restored after the command
