"""Crash-safe file output: every file florist writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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


def _target(path: str | os.PathLike[str]) -> Path:
    """Where writing ``path`` lands: a symlink's target (renaming over the link would replace the
    link itself), and a symlink loop refused in one line rather than written over."""
    path = Path(path)
    return resolve_path(path, "output") if path.is_symlink() else path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside ``path`` for the body to write; then fsynced and renamed over
    ``path``, or removed if the body raises."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb"):
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's private 0o600 would hide shared outputs
        yield Path(tmp)
        with open(tmp, "rb") as f:
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as strict JSON: a NaN or Infinity (which strict parsers refuse) is written as
    null with a ``<key>_note`` beside it saying what it was, unless the writer gave its own note."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` as one safetensors file; a NaN or Inf anywhere is refused, naming the
    file and the tensor, so no adapter or checkpoint that would poison a model is ever written."""
    import torch
    from safetensors.torch import save as safetensors_save  # not at import: `florist --help` stays light

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteTensor(f"{path}: tensor {key!r} contains NaN or Inf; refusing to write it")
    data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


class NonFiniteTensor(FloristError, ValueError):
    """A tensor about to be written holds NaN or Inf."""


def resolve_path(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` made absolute with its symlinks resolved; a symlink loop is a one-line error
    naming ``what`` (pathlib raises RuntimeError for it, with a traceback)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as e:
        reason = "a symlink loop" if "loop" in str(e).lower() else (getattr(e, "strerror", None) or str(e))
        raise FloristError(f"{what} {path}: cannot resolve the path ({reason})") from None


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
    path = _target(path)
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


def strict_json(obj: Any) -> Any:
    """``obj`` as plain JSON values (tensors and numpy values as lists and numbers, paths as
    strings), with every non-finite float replaced by null and named in a ``<key>_note``."""
    return _strict(obj)[0]


def _strict(obj: Any) -> tuple[Any, str | None]:
    """(the plain value, a note on the non-finite numbers it held, or None)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj, None
        name = "NaN" if math.isnan(obj) else "Infinity" if obj > 0 else "-Infinity"
        return None, f"{name}: not a finite number, written as null"
    if obj is None or isinstance(obj, (str, int)):
        return obj, None
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            out[key], note = _strict(value)
            if note and f"{key}_note" not in obj:
                out[f"{key}_note"] = note
        return out, None
    if isinstance(obj, (list, tuple)):
        items = [_strict(v) for v in obj]
        bad = [i for i, (_, note) in enumerate(items) if note]
        note = f"entries {', '.join(map(str, bad))} were not finite (NaN or Infinity), written as null"
        return [v for v, _ in items], note if bad else None
    if isinstance(obj, Path):
        return str(obj), None
    if hasattr(obj, "detach"):  # a torch.Tensor
        return _strict(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist"):  # a numpy array or scalar
        return _strict(obj.tolist())
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
    resolve_path(directory, "output directory")  # a symlink loop: one line, not "File exists"
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
