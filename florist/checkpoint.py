"""Atomic per-round checkpoints of a federated run, with checksums, and their loading for resume.

A checkpoint is the directory ``<output_dir>/checkpoint/``::

    state.json                    completed round, metrics so far, the run's config
    merged/round_0001.safetensors merge methods: the global adapter folded into the base each round
    server.safetensors            continue methods: what the server broadcast last (one global
                                  adapter, or one per client for FlexLoRA), and the clients' own
                                  state where the method keeps one (FedSA-LoRA's B_k)
    manifest.json                 sha256 of every file above

It is written as a whole directory with ``florist.io.atomic_directory`` so a kill at any moment
leaves either the previous checkpoint or the new one, never a mixture. Loading verifies every
checksum first: a damaged checkpoint is refused with an error naming the file, never loaded
silently. Only safetensors and JSON are read; nothing is unpickled.

A long run keeps at most the current round's merged adapter in memory: once a checkpoint holds it,
``MergedHistory`` reads it back from that file when asked for it, and the next checkpoint links the
file instead of writing it again, so the history costs disk, not memory, and each round writes
only its own adapter.

Resume is exact because every random draw of a run derives from ``(seed, round, client)``: with
the base weights rebuilt bit for bit (the merged adapters re-applied in the same order with the
same operation) and the server state restored, the next round computes what it would have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from florist.aggregation.base import Adapter, LoraFactors
from florist.errors import FloristError
from florist.io import atomic_directory, atomic_save_safetensors, atomic_write_json, sha256_file

CHECKPOINT_DIR = "checkpoint"
FORMAT = "florist-checkpoint"
VERSION = 1


class CheckpointError(FloristError):
    """A checkpoint that is missing pieces, damaged or from an incompatible run."""


def merged_file(round_number: int) -> Path:
    """Where a checkpoint keeps round ``round_number``'s merged adapter, relative to it."""
    return Path("merged") / f"round_{round_number:04d}.safetensors"


class MergedHistory(Sequence[Adapter]):
    """The adapters folded into the base, one per round, in order: each in memory until a checkpoint
    holds it (``spill``), then read back from the checkpoint's file whenever it is asked for."""

    def __init__(self, adapters: Iterable[Adapter] = ()) -> None:
        self._items: list[Adapter | Path] = list(adapters)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Adapter: ...
    @overload
    def __getitem__(self, index: slice) -> list[Adapter]: ...
    def __getitem__(self, index: int | slice) -> Adapter | list[Adapter]:
        if isinstance(index, slice):
            return [_read(item) for item in self._items[index]]
        return _read(self._items[index])

    def append(self, adapter: Adapter) -> None:
        self._items.append(adapter)

    def file(self, index: int) -> Path | None:
        """The file holding entry ``index``, or None while it is only in memory."""
        item = self._items[index]
        return item if isinstance(item, Path) else None

    def in_memory(self) -> list[tuple[int, Adapter]]:
        return [(i, item) for i, item in enumerate(self._items) if not isinstance(item, Path)]

    def spill(self, checkpoint: Path) -> None:
        """From now on read every entry from ``checkpoint``, which save_checkpoint just wrote."""
        self._items = [checkpoint / merged_file(i) for i in range(1, len(self._items) + 1)]


def _read(item: Adapter | Path) -> Adapter:
    return _unflatten(*_load(item), "", item) if isinstance(item, Path) else item


def _link_or_copy(source: Path, dest: Path) -> None:
    """A file of the previous checkpoint into the next: a hard link (no bytes written), or a copy
    where the file system has none."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


@dataclass
class CheckpointState:
    """Everything needed to continue a run after ``completed_round``."""

    completed_round: int
    metrics: dict[str, Any]
    config: dict[str, Any]
    # Merge methods: the adapter merged into the base in each completed round, in order.
    merged: Sequence[Adapter] = field(default_factory=MergedHistory)
    # Continue methods: the last broadcast (one adapter for all, or one per client id).
    global_adapter: Adapter | None = None
    per_client: dict[str, Adapter] | None = None
    # Methods with local factors: each client's own last trained adapter.
    client_state: dict[str, Adapter] = field(default_factory=dict)


# --- Adapter <-> flat tensor dict ----------------------------------------------------------


def _flatten(adapter: Adapter, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    tensors: dict[str, torch.Tensor] = {}
    scalings: dict[str, float] = {}
    for name, f in adapter.items():
        tensors[f"{prefix}{name}/A"] = f.A.detach().cpu().contiguous()
        tensors[f"{prefix}{name}/B"] = f.B.detach().cpu().contiguous()
        scalings[f"{prefix}{name}"] = float(f.scaling)
    return tensors, scalings


def _unflatten(
    tensors: dict[str, torch.Tensor], scalings: dict[str, float], prefix: str, where: Path
) -> Adapter:
    adapter: Adapter = {}
    for key, scaling in scalings.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        try:
            A, B = tensors[f"{key}/A"], tensors[f"{key}/B"]
        except KeyError:
            raise CheckpointError(f"{where}: module {name!r} has no A or B tensor") from None
        adapter[name] = LoraFactors(A=A, B=B, scaling=float(scaling))
    return adapter


def _save(path: Path, tensors: dict[str, torch.Tensor], scalings: dict[str, float]) -> None:
    # Keys are sorted by safetensors itself; the scalings travel in the header metadata.
    # Serialised in memory and written by Python: safetensors' own file writer can report a full
    # disk in a many-line error, or (writing to /dev/full here) not at all. The writer refuses a
    # non-finite tensor too (checked before, with a better message, by _check_finite).
    metadata = {"scalings": json.dumps(scalings, sort_keys=True, allow_nan=False)}
    atomic_save_safetensors(path, tensors, metadata=metadata)


def _check_finite(path: Path, state: CheckpointState) -> None:
    """Refuse a state holding NaN or Inf before anything is written: a round that went wrong
    must leave the previous checkpoint as it was, never one that ``--resume`` would continue."""
    adapters: list[tuple[str, Adapter]] = [  # a spilled round was checked when it was first saved
        (f"merged adapter of round {i + 1}", a) for i, a in _history(state.merged).in_memory()
    ]
    adapters += [("global adapter", state.global_adapter or {})]
    adapters += [(f"client {cid}'s adapter", a) for cid, a in (state.per_client or {}).items()]
    adapters += [(f"client {cid}'s own state", a) for cid, a in state.client_state.items()]
    for what, adapter in adapters:
        for name, f in adapter.items():
            bad = [n for n, t in (("A", f.A), ("B", f.B)) if not bool(torch.isfinite(t).all())]
            bad += [] if math.isfinite(f.scaling) else ["scaling"]
            if bad:
                raise CheckpointError(
                    f"{path}: not saving round {state.completed_round}: the {what}, module {name!r}, has "
                    f"NaN or Inf in {' and '.join(bad)}; the previous checkpoint is kept"
                )


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        scalings = json.loads(metadata["scalings"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint tensors: {e}") from None
    return tensors, scalings


# --- save / load ---------------------------------------------------------------------------


def _history(merged: Sequence[Adapter]) -> MergedHistory:
    return merged if isinstance(merged, MergedHistory) else MergedHistory(merged)


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def save_checkpoint(output_dir: str | Path, state: CheckpointState) -> Path:
    """Write ``state`` as ``<output_dir>/checkpoint/``, replacing the previous one atomically."""
    path = checkpoint_path(output_dir)
    _check_finite(path, state)
    with atomic_directory(path) as tmp:
        files: list[Path] = []
        rounds = []
        merged = _history(state.merged)
        if merged:
            (tmp / "merged").mkdir()
        for i in range(len(merged)):
            rel, source = merged_file(i + 1), merged.file(i)
            if source is not None:
                _link_or_copy(source, tmp / rel)
            else:
                _save(tmp / rel, *_flatten(merged[i], ""))
            rounds.append(str(rel))
            files.append(rel)
        server: dict[str, Any] = {"global": state.global_adapter is not None, "clients": [], "state": []}
        if state.global_adapter is not None or state.per_client or state.client_state:
            tensors, scalings = _flatten(state.global_adapter or {}, "global/")
            for key, prefix, adapters in (
                ("clients", "client", state.per_client or {}),
                ("state", "state", state.client_state),
            ):
                for cid, adapter in adapters.items():
                    t, s = _flatten(adapter, f"{prefix}/{cid}/")
                    tensors.update(t)
                    scalings.update(s)
                    server[key].append(cid)
            _save(tmp / "server.safetensors", tensors, scalings)
            files.append(Path("server.safetensors"))
        atomic_write_json(
            tmp / "state.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "completed_round": state.completed_round,
                "merged": rounds,
                "server": server,
                "config": state.config,
                "metrics": state.metrics,
            },
        )
        files.append(Path("state.json"))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "files": {str(p): sha256_file(tmp / p) for p in files},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return path


def _find(output_dir: Path) -> Path | None:
    path = checkpoint_path(output_dir)
    if path.exists():
        return path
    # A kill between the two renames of atomic_directory leaves only the previous checkpoint,
    # parked as a hidden sibling; it is complete, so use it.
    parked = sorted(output_dir.glob(f".{CHECKPOINT_DIR}.old-*"), key=lambda p: p.stat().st_mtime)
    return parked[-1] if parked else None


def load_checkpoint(output_dir: str | Path) -> CheckpointState | None:
    """The run's checkpoint, verified file by file; ``None`` when there is none."""
    path = _find(Path(output_dir))
    if path is None:
        return None
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a florist checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{manifest_path}: damaged or missing checkpoint manifest ({e}); refusing to resume"
        ) from None
    for rel, digest in files.items():
        file = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{manifest_path}: invalid file name {rel!r}")
        if not file.is_file():
            raise CheckpointError(
                f"{file}: listed in the checkpoint manifest but missing; refusing to resume"
            )
        if sha256_file(file) != digest:
            raise CheckpointError(
                f"{file}: checksum mismatch, the checkpoint is corrupted; refusing to resume"
            )
    if "state.json" not in files:
        raise CheckpointError(f"{manifest_path}: state.json is not covered by the manifest")
    state = json.loads((path / "state.json").read_text())
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path / 'state.json'}: unsupported checkpoint version {state.get('version')!r}"
        )
    merged = MergedHistory()
    for rel in state["merged"]:
        if rel not in files:
            raise CheckpointError(f"{path / rel}: not covered by the checkpoint manifest")
        merged.append(_unflatten(*_load(path / rel), "", path / rel))
    global_adapter = per_client = None
    client_state: dict[str, Adapter] = {}
    server = state["server"]
    if server["global"] or server["clients"] or server.get("state"):
        where = path / "server.safetensors"
        tensors, scalings = _load(where)
        if server["global"]:
            global_adapter = _unflatten(tensors, scalings, "global/", where)
        if server["clients"]:
            per_client = {
                cid: _unflatten(tensors, scalings, f"client/{cid}/", where) for cid in server["clients"]
            }
        client_state = {
            cid: _unflatten(tensors, scalings, f"state/{cid}/", where) for cid in server.get("state", [])
        }
    return CheckpointState(
        completed_round=int(state["completed_round"]),
        metrics=state["metrics"],
        config=state["config"],
        merged=merged,
        global_adapter=global_adapter,
        per_client=per_client,
        client_state=client_state,
    )
