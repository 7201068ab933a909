"""PEFT LoRA adapter directories <-> the plain ``Adapter`` of florist.aggregation.

A client upload is a directory as ``peft`` writes it::

    adapter_config.json           r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, ...
    adapter_model.safetensors     base_model.model.<module>.lora_A.weight (r x n) and .lora_B.weight (m x r)
    florist_client.json           optional: {"num_examples": N, "client_id": "..."}  (see CLIENT_INFO_FILE)

Uploads come from other institutions, so the reader trusts nothing: safetensors only (a pickle
``adapter_model.bin`` is refused without being opened), the file size is checked before reading,
and every tensor is checked for shape, dtype and finiteness. Every error is an ``AdapterError``
(a ``ValueError``) naming the directory, the client and the module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

try:  # the regex parser, to vet untrusted patterns before they run (Python 3.11+, then 3.10)
    from re import _constants as C
    from re import _parser as parser
except ImportError:  # pragma: no cover
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse as parser  # type: ignore[no-redef]

from florist.adapter_files import (  # noqa: F401  (re-exported: the names users import from here)
    CLIENT_INFO_FILE,
    CONFIG_FILE,
    DEFAULT_MAX_BYTES,
    MAX_JSON_BYTES,
    MAX_NUM_EXAMPLES,
    NUM_EXAMPLES_FILE,
    PICKLE_FILES,
    WEIGHTS_FILE,
    AdapterError,
)
from florist.aggregation.base import Adapter, LoraFactors
from florist.io import atomic_directory, atomic_save_safetensors, atomic_write_bytes, atomic_write_json

# peft's key layout: base_model.model.<module>.lora_A[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<factor>[AB])(?:\.default)?\.weight$")
_MODULE = re.compile(r"^[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*$")  # a dotted module path, nothing else
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$")


def _where(directory: Path, client_id: str | None, module: str | None = None) -> str:
    text = f"{directory}" + (f" (client {client_id!r})" if client_id is not None else "")
    return text + (f", module {module!r}" if module is not None else "")


# --- untrusted names -----------------------------------------------------------------------


def sanitize_client_id(text: object) -> str:
    """Return ``text`` if it is safe as a client id and as a single path component, else raise.

    Allowed: 1-128 characters from letters, digits and ``. _ @ + = -``, starting with a letter
    or digit (so never ``.``, ``..``, a hidden name, a separator, NUL or an absolute path). We
    refuse rather than rewrite, because two different ids must never map to one directory.
    """
    if not isinstance(text, str) or not _CLIENT_ID.match(text):
        raise AdapterError(
            f"unsafe client id {text!r}: use 1-128 characters from letters, digits and '._@+=-', "
            "starting with a letter or digit"
        )
    return text


def safe_join(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts`` that is guaranteed to stay inside ``root`` (no ``..``, absolute parts,
    separators inside a part, NUL, or symlinks leading out)."""
    root_path = Path(root)
    path = root_path
    for part in parts:
        if (
            not isinstance(part, str)
            or part in ("", ".", "..")
            or "\x00" in part
            or "/" in part
            or "\\" in part
            or os.path.isabs(part)
        ):
            raise AdapterError(f"unsafe file name {part!r} under {root_path}")
        path = path / part
    resolved_root = root_path.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise AdapterError(f"{path} escapes {root_path}")
    return path


# --- reading -------------------------------------------------------------------------------


def _read_small_json(path: Path, what: str) -> Any:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise AdapterError(f"{what}: {path.name} is {size} bytes, more than the {MAX_JSON_BYTES} allowed")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:  # e.g. "[" * 100000: never a config, and not worth a traceback
        raise AdapterError(f"{what}: {path.name} is nested too deeply to be a config") from None
    except ValueError as e:  # malformed JSON, bad UTF-8, an integer of more than 4300 digits
        raise AdapterError(f"{what}: {path.name} is not valid JSON ({e})") from None


def _read_bounded(path: Path, max_bytes: int, what: str) -> bytes:
    # The size is checked on the open file (fstat) before reading a byte, and we never read more
    # than the limit even if the file grows meanwhile.
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise AdapterError(
                f"{what}: {path.name} is {size} bytes, more than the limit of {max_bytes} (--max-bytes)"
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AdapterError(f"{what}: {path.name} grew past the limit of {max_bytes} bytes while reading")
    return data


def _positive_int(value: Any, what: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{what}: {CONFIG_FILE} field {field!r} must be a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, what: str, field: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise AdapterError(f"{what}: {CONFIG_FILE} field {field!r} must be a positive number, got {value!r}")
    return float(value)


def _check_config(config: Any, what: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise AdapterError(f"{what}: {CONFIG_FILE} must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{what}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported"
        )
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterError(f"{what}: {flag}=true is not supported (plain LoRA only)")
    targets = config.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterError(
            f"{what}: {CONFIG_FILE} field 'target_modules' must be a string or a list of strings"
        )
    if isinstance(targets, str):
        _check_pattern(targets, what, "target_modules")
    _positive_int(config.get("r"), what, "r")
    _positive_number(config.get("lora_alpha", 8), what, "lora_alpha")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{what}: {CONFIG_FILE} field {field!r} must be an object")
        for key, value in pattern.items():
            _check_pattern(key, what, f"{field} key")
            check = _positive_int if field == "rank_pattern" else _positive_number
            check(value, what, f"{field}[{key!r}]")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{what}: {CONFIG_FILE} field 'use_rslora' must be true or false")
    return config


# Untrusted regexes (peft's target_modules and pattern keys) run against module names. Python's
# re has no time limit, so the patterns that can backtrack exponentially are refused up front:
# a repeat around another repeat or an alternation ("(a+)+", "(a|ab)*"), backreferences, and
# more than a few unbounded repeats in a row (".*.*.*.*x" is polynomial of high degree).
MAX_PATTERN_CHARS = 512
MAX_UNBOUNDED_REPEATS = 3
MAX_MODULE_CHARS = 512
_REPEATS = tuple(getattr(C, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(C, n))
_GROUPS = tuple(
    getattr(C, n) for n in ("SUBPATTERN", "ASSERT", "ASSERT_NOT", "ATOMIC_GROUP") if hasattr(C, n)
)


def _pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is unsafe or invalid as an untrusted regex, or None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long, more than the {MAX_PATTERN_CHARS} allowed"
    try:
        parsed = parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"is not a valid pattern ({e})"
    unbounded = 0
    for op, arg in _flat(parsed):
        if op in (C.GROUPREF, C.GROUPREF_EXISTS):
            return "uses a backreference"
        if op in _REPEATS and (arg[1] is C.MAXREPEAT or arg[1] > 1):
            if any(o in _REPEATS or o == C.BRANCH for o, _ in _flat(arg[2])):
                return "repeats a group that holds a repeat or an alternation (exponential backtracking)"
            unbounded += arg[1] is C.MAXREPEAT
    if unbounded > MAX_UNBOUNDED_REPEATS:
        return f"has {unbounded} unbounded repeats, more than the {MAX_UNBOUNDED_REPEATS} allowed"
    return None


def _flat(items: Any) -> list[tuple[Any, Any]]:
    """Every (op, arg) in a parsed pattern, nested groups included."""
    out: list[tuple[Any, Any]] = []
    for op, arg in items:
        out.append((op, arg))
        if op in _REPEATS:
            out += _flat(arg[2])
        elif op == C.BRANCH:
            for branch in arg[1]:
                out += _flat(branch)
        elif op in _GROUPS:
            out += _flat(arg[-1])
    return out


def _check_pattern(pattern: str, what: str, field: str) -> None:
    problem = _pattern_problem(pattern)
    if problem:
        raise AdapterError(f"{what}: {CONFIG_FILE} {field} {pattern[:60]!r} {problem}")


def _targeted(targets: Any, module: str) -> bool:
    """Whether peft would put a LoRA on ``module`` under ``target_modules`` (its matching rule)."""
    if targets is None or targets == "all-linear":  # peft's architecture defaults, or every linear
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def config_rank_and_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The rank and scaling peft gives ``module`` under this config (same pattern matching)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(_pattern_for(rank_pattern, module), config["r"])
    alpha = alpha_pattern.get(_pattern_for(alpha_pattern, module), config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return int(r), float(scaling)


def _as_float(t: torch.Tensor, where: str, factor: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise AdapterError(f"{where}: lora_{factor} has dtype {t.dtype}; LoRA factors must be floating point")
    if t.ndim != 2:
        raise AdapterError(f"{where}: lora_{factor} must be a matrix, got shape {tuple(t.shape)}")
    # Half precision and float8 are widened for the arithmetic; float64 is kept as uploaded.
    t = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{where}: lora_{factor} contains NaN or Inf")
    return t.contiguous()


def read_peft_adapter(
    directory: str | os.PathLike[str],
    *,
    client_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_shapes: dict[str, tuple[int, int]] | None = None,
) -> tuple[Adapter, dict[str, Any]]:
    """Read and validate a PEFT LoRA directory; return the adapter and its config dict.

    ``expected_shapes`` maps module name to the base model's (out_features, in_features); when
    given, the adapter must cover exactly modules of the model with matching shapes.
    """
    directory = Path(directory)
    what = _where(directory, client_id)
    if not directory.is_dir():
        raise AdapterError(f"{what}: adapter directory not found")
    weights, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not weights.is_file():
        pickles = [name for name in PICKLE_FILES if (directory / name).exists()]
        if pickles:
            # Never opened: unpickling an upload would run the uploader's code on the server.
            raise AdapterError(
                f"{what}: found {pickles[0]} (a pickle) but no {WEIGHTS_FILE}; pickled adapters are "
                "refused because loading them can execute code. Save with safe_serialization=True"
            )
        raise AdapterError(f"{what}: missing {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise AdapterError(f"{what}: missing {CONFIG_FILE}")
    config = _check_config(_read_small_json(config_path, what), what)

    data = _read_bounded(weights, max_bytes, what)
    try:
        tensors = safetensors_load(data)
    except Exception as e:  # the Rust parser raises its own SafetensorError on any malformed input
        raise AdapterError(f"{what}: {WEIGHTS_FILE} is not a valid safetensors file ({e})") from None
    del data

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{what}: unexpected tensor {key!r} in {WEIGHTS_FILE} (only lora_A/lora_B weights)"
            )
        module, factor = match["module"], match["factor"]
        if len(module) > MAX_MODULE_CHARS or not _MODULE.match(module):
            raise AdapterError(f"{what}: tensor {key!r} does not name a module (a dotted module path)")
        if not _targeted(config.get("target_modules"), module):
            raise AdapterError(
                f"{_where(directory, client_id, module)}: not covered by {CONFIG_FILE}'s target_modules "
                f"{config.get('target_modules')!r}; peft would not load it"
            )
        slot = factors.setdefault(module, {})
        if factor in slot:
            raise AdapterError(f"{_where(directory, client_id, module)}: lora_{factor} appears twice")
        slot[factor] = tensors[key]
    if not factors:
        raise AdapterError(f"{what}: {WEIGHTS_FILE} holds no LoRA tensors")

    adapter: Adapter = {}
    for module, slot in factors.items():
        where = _where(directory, client_id, module)
        for factor in ("A", "B"):
            if factor not in slot:
                other = "B" if factor == "A" else "A"
                raise AdapterError(f"{where}: lora_{other} without its lora_{factor}")
        A, B = _as_float(slot["A"], where, "A"), _as_float(slot["B"], where, "B")
        if A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{where}: rank mismatch, lora_A is {tuple(A.shape)} but lora_B is {tuple(B.shape)}"
            )
        if A.shape[0] == 0 or A.shape[1] == 0 or B.shape[0] == 0:
            raise AdapterError(
                f"{where}: empty LoRA factors, lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}"
            )
        r, scaling = config_rank_and_scaling(config, module)
        if A.shape[0] != r:
            raise AdapterError(f"{where}: rank {A.shape[0]} in {WEIGHTS_FILE} but {r} in {CONFIG_FILE}")
        if expected_shapes is not None:
            if module not in expected_shapes:
                raise AdapterError(f"{where}: the base model has no such module")
            out_in = (int(B.shape[0]), int(A.shape[1]))
            if out_in != tuple(expected_shapes[module]):
                raise AdapterError(
                    f"{where}: update shape {out_in[0]}x{out_in[1]} does not match the base model's "
                    f"{expected_shapes[module][0]}x{expected_shapes[module][1]}"
                )
        adapter[module] = LoraFactors(A=A, B=B, scaling=scaling)
    return adapter, config


def read_num_examples(directory: str | os.PathLike[str], *, client_id: str | None = None) -> int | None:
    """The client's example count from ``florist_client.json`` (or ``num_examples.json``), if any."""
    directory = Path(directory)
    what = _where(directory, client_id)
    for name in (CLIENT_INFO_FILE, NUM_EXAMPLES_FILE):
        path = directory / name
        if not path.is_file():
            continue
        value = _read_small_json(path, what)
        if isinstance(value, dict):
            if "num_examples" not in value:
                raise AdapterError(f"{what}: {name} has no 'num_examples'")
            value = value["num_examples"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_NUM_EXAMPLES:
            shown = (
                value
                if not isinstance(value, int) or value.bit_length() < 64
                else f"a {len(str(value))}-digit number"
            )
            raise AdapterError(
                f"{what}: {name}: num_examples must be an integer from 1 to 2**53, got {shown!r}"
            )
        return value
    return None


def read_client_info(directory: str | os.PathLike[str], *, client_id: str | None = None) -> dict[str, Any]:
    """The whole ``florist_client.json`` (an empty dict if absent); ``client_id`` in it is checked."""
    directory = Path(directory)
    path = directory / CLIENT_INFO_FILE
    if not path.is_file():
        return {}
    info = _read_small_json(path, _where(directory, client_id))
    if not isinstance(info, dict):
        raise AdapterError(f"{_where(directory, client_id)}: {CLIENT_INFO_FILE} must be a JSON object")
    if "client_id" in info:
        try:
            sanitize_client_id(info["client_id"])
        except AdapterError as e:
            raise AdapterError(f"{_where(directory, client_id)}: {CLIENT_INFO_FILE}: {e}") from None
    return info


# --- writing -------------------------------------------------------------------------------


def _alpha_for(rank: int, scaling: float) -> float:
    """An alpha with ``alpha / rank == scaling`` exactly in float64 (peft computes alpha / r)."""
    alpha = scaling * rank
    if alpha / rank == scaling:
        return alpha
    for direction in (math.inf, -math.inf):
        candidate = alpha
        for _ in range(4):
            candidate = math.nextafter(candidate, direction)
            if candidate / rank == scaling:
                return candidate
    return alpha  # off by one ulp of float64 at worst, far below float32 resolution


def _matches(pattern: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", module) is not None  # peft's get_pattern_key rule


def _pattern_for(patterns: dict[str, Any], module: str) -> str:
    """The first pattern key that matches ``module``, else ``module`` (peft's get_pattern_key)."""
    return next((key for key in patterns if _matches(key, module)), module)


def _pattern_key(module: str, modules: list[str]) -> str:
    # peft treats pattern keys as regular expressions: use the full name, escaped if its dots
    # would otherwise also match another module of this adapter.
    if sum(_matches(module, other) for other in modules) == 1:
        return module
    return re.escape(module)


def non_finite(tensor: torch.Tensor, written: torch.Tensor | None = None) -> str | None:
    """Why ``tensor`` (as ``written``, when it is written in another dtype) cannot be written, or None."""
    if not bool(torch.isfinite(tensor).all()):
        return "contains NaN or Inf"
    if written is not None and not bool(torch.isfinite(written).all()):
        return f"overflows {str(written.dtype).removeprefix('torch.')} (a value beyond {torch.finfo(written.dtype).max:.3g})"
    return None


def write_peft_adapter(
    directory: str | os.PathLike[str],
    adapter: Adapter,
    *,
    base_model_name_or_path: str | None = None,
    target_modules: list[str] | None = None,
    extra_files: dict[str, Any] | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write ``adapter`` as a standard PEFT LoRA directory, atomically.

    ``r``/``lora_alpha`` are the most common rank and alpha; modules that differ get entries in
    ``rank_pattern``/``alpha_pattern`` so every module's ``alpha / r`` equals its scaling and the
    loaded model applies exactly ``scaling * B @ A``. ``target_modules`` defaults to the full
    module names, so peft adapts exactly these modules. ``extra_files`` maps a file name to
    bytes, str, or a JSON-serialisable object written beside the adapter. An existing
    ``directory`` is replaced.
    """
    if not adapter:
        raise AdapterError(f"{directory}: refusing to write an adapter with no modules")
    modules = sorted(adapter)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in modules:
        f = adapter[name]
        if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1] or f.A.shape[0] == 0:
            raise AdapterError(
                f"{directory}, module {name!r}: bad factor shapes {tuple(f.A.shape)}, {tuple(f.B.shape)}"
            )
        if not (math.isfinite(f.scaling) and f.scaling > 0):
            raise AdapterError(
                f"{directory}, module {name!r}: scaling must be positive and finite, got {f.scaling}"
            )
        for factor in ("A", "B"):
            # Checked as written (float32): a finite float64 factor beyond 3.4e38 becomes Inf. Never
            # hand out an adapter that poisons a model, whichever directory it goes to.
            tensor = getattr(f, factor).detach().to(torch.float32, copy=True)
            problem = non_finite(getattr(f, factor), tensor)
            if problem:
                raise AdapterError(
                    f"{directory}, module {name!r}: lora_{factor} {problem}; refusing to write it"
                )
            tensors[f"base_model.model.{name}.lora_{factor}.weight"] = tensor
        ranks[name] = f.rank
        alphas[name] = _alpha_for(f.rank, float(f.scaling))

    # Most common values as the defaults; ties go to the larger value, for a stable choice.
    r = max(Counter(ranks.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    alpha = max(Counter(alphas.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    # peft's LoraConfig fields, written without importing peft (seconds of imports for a file
    # write); peft fills the fields left out with its defaults. Lists sorted: byte-stable runs.
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules if target_modules is not None else modules),
        "rank_pattern": {_pattern_key(n, modules): ranks[n] for n in modules if ranks[n] != r},
        "alpha_pattern": {_pattern_key(n, modules): alphas[n] for n in modules if alphas[n] != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    for name in modules:  # what peft will compute when it loads this directory
        got_r, got_scaling = config_rank_and_scaling(config, name)
        assert got_r == ranks[name] and got_scaling == alphas[name] / ranks[name], name

    with atomic_directory(directory) as tmp:
        atomic_write_json(tmp / CONFIG_FILE, config)
        atomic_save_safetensors(tmp / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        for file_name, content in (extra_files or {}).items():
            path = safe_join(tmp, file_name)
            if isinstance(content, (bytes, str)):
                atomic_write_bytes(path, content.encode("utf-8") if isinstance(content, str) else content)
            else:
                atomic_write_json(path, content)
