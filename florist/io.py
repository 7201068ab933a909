"""Crash-safe file output: every file florist writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from florist.errors import FloristError

if TYPE_CHECKING:
    import torch


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(path: Path) -> None:
    """Delete what a SIGKILLed earlier write of ``path`` left: its temp file/dir or parked old dir."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.([A-Za-z0-9_]{{8}}\.tmp|old-\d+)$")
    for entry in path.parent.iterdir():
        if pattern.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's private 0o600 would hide shared outputs
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: say which file it refused
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)
    _remove_leftovers(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save as safetensors_save  # not at import: `florist --help` stays light

    data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    If the body raises, the temporary directory is removed and ``path`` is untouched, so a
    failed command never leaves half-written outputs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        # Put a parked previous directory back if the swap was interrupted half-way.
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_leftovers(path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "detach"):  # a torch.Tensor
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


LOCK_FILE = ".florist.lock"


class OutputBusy(FloristError):
    """Another process holds the output directory (see ``output_lock``)."""


class OutputUnwritable(FloristError):
    """The output directory cannot be created or written."""


def _lock(path: Path) -> int:
    """An open descriptor of ``path`` holding an exclusive flock; the file is (still) ``path``'s."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(
                f"{path.parent}: another florist run (pid {holder}) is writing this output directory; "
                "wait for it to finish or choose another output directory"
            ) from None
        try:  # the holder we waited on may have unlinked the file: lock the current one instead
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``directory`` (created if missing) for one run: an exclusive flock on a lock file in it.

    Two runs writing one directory would each take the other's in-progress temporary files for a
    crashed run's leftovers and delete them; the second run is refused instead (``OutputBusy``),
    before it writes anything. The lock dies with its process, so a SIGKILLed run never blocks the
    next one. Creating the lock file is also the up-front check that the directory is writable
    (``OutputUnwritable`` otherwise). A directory this call created and that is still
    empty at the end is removed again: a run that failed early leaves nothing behind.
    """
    directory = Path(directory)
    created = not directory.exists()
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = _lock(path)
    except BaseException as e:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(e, OSError):  # read-only, not a directory, no space: say so before any work
            raise OutputUnwritable(
                f"{directory}: cannot write to the output directory ({e.strerror or e})"
            ) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield directory
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if the run left it empty
