"""Every setting's type and range, checked in one place whatever its source.

A ``Setting`` declares what a setting holds: its kind (bool, int, float, str, or a list of one of
them), whether None (unset) is allowed, and its range or choices. ``parse`` turns a value from
a source into a checked value, or raises ``ConfigError`` with one line that names the source,
the setting and the value::

    run.yaml: num_clients must be an integer >= 1, got '2'
    main.py: --threshold must be a finite number in (0, 1], got None
    command line: --seed must be an integer >= 0, got -1

RunConfig's settings are derived from its type hints (``florist.config.run_settings``); the other
commands declare their flags beside their parsers and check them with ``check_args``. Sources
differ only in how values arrive: command-line flags are text; YAML files, Flower's run config
and python-fire (main.py) give typed values. A float is always finite: no setting gives
infinity or NaN a meaning. Imports nothing heavy, so bad flags are refused at once.
"""

from __future__ import annotations

import argparse
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# No count, size or seed needs more, and beyond int64 numpy and torch raise OverflowError.
INT_MAX = 2**63 - 1
TRUE_WORDS = ("true", "yes", "y", "on", "1")
FALSE_WORDS = ("false", "no", "n", "off", "0")
NONE_WORDS = ("", "none")
# ASCII only: int() and float() would also take "1_000" and other scripts' digits. Bounded, so a
# 50,000-digit value is refused before any conversion (int() stops at 4,300 digits, with an error
# that names no setting).
_INT = re.compile(r"[+-]?[0-9]{1,40}")
_FLOAT = re.compile(
    r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,5})?|[+-]?(?:inf|infinity|nan)", re.I
)
_MAX_NUMBER_TEXT = 400
# florist.models.resolve_device's devices
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]{1,3})?"
DEVICE_WORDS = "auto, cpu, cuda or cuda:N"


class ConfigError(ValueError):
    """A bad setting; the CLIs print it in one line and exit with code 2."""


@dataclass(frozen=True)
class Source:
    """Where values come from, and so how they arrive."""

    where: str | None  # named in every message: "command line", "main.py", a file path; None: code
    text: bool = False  # values are text to parse (command-line flags)
    fire: bool = False  # python-fire: a bool may be a word ("true"), a string may have become an int
    flags: bool = False  # a setting is named --name here
    dashes: bool = False  # ... or name-with-dashes (Flower's run config)

    def spell(self, name: str) -> str:
        """How ``name`` (a RunConfig field) is written in this source."""
        name = name.replace("_", "-") if self.dashes else name
        return f"--{name}" if self.flags else name


COMMAND_LINE = Source("command line", text=True, flags=True)
MAIN_PY = Source("main.py", fire=True, flags=True)
RUN_CONFIG = Source("run config", dashes=True)  # Flower's, from pyproject.toml and --run-config
IN_CODE = Source(None)


def file_source(path: object) -> Source:
    return Source(str(path))


@dataclass(frozen=True)
class Setting:
    """What one setting may hold."""

    kind: type  # bool, int, float, str or list
    item: type | None = None  # a list's items: int or str
    optional: bool = False  # None (unset) is allowed
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None  # a str must match it whole; ``described`` says it in words
    described: str | None = None  # overrides the generated description

    def description(self) -> str:
        if self.described:
            text = self.described
        elif self.choices:
            names = [str(c) for c in self.choices]
            text = " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)
        elif self.kind is list:
            plural = {int: "integers", str: "strings"}[self.item]  # type: ignore[index]
            text = f"a comma-separated list of {plural}{self._range()}"
        else:
            text = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}[
                self.kind
            ] + self._range()
        return text

    def _range(self) -> str:
        low, high = (None if v is None else f"{v:g}" for v in (self.low, self.high))
        if low is not None and high is not None:
            if self.kind is int or self.item is int:
                return f" from {low} to {high}"
            return f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f" {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f" {'<' if self.high_open else '<='} {high}"
        return ""

    def parse(self, value: Any, *, name: str, source: Source = IN_CODE) -> Any:
        """``value`` as this setting holds it; ``ConfigError`` naming source, setting and value if bad."""
        try:
            return self._parse(value, source)
        except _Bad:
            where = f"{source.where}: " if source.where else ""
            shown = value if source.text and isinstance(value, str) and value else show(value)
            raise ConfigError(f"{where}{name} must be {self.description()}, got {clip(str(shown))}") from None

    def _parse(self, value: Any, source: Source) -> Any:
        if value is None:
            if self.optional:
                return None
            raise _Bad
        if self.optional and source.text and isinstance(value, str) and value.strip().lower() in NONE_WORDS:
            return None  # --local_max_steps none
        if self.kind is list:
            if isinstance(value, str):  # "q_proj,v_proj" and fire's "[q_proj,v_proj]"
                texts = [x.strip().strip("'\"") for x in value.strip().strip("[]()").split(",")]
                items = [self._item(_scalar(self.item, x, COMMAND_LINE)) for x in texts if x]
            elif isinstance(value, (list, tuple)):
                items = [self._item(_scalar(self.item, x, source)) for x in value]
            else:
                raise _Bad
            if not items:
                raise _Bad
            return items
        return self._item(_scalar(self.kind, value, source))

    def _item(self, value: Any) -> Any:
        """``value`` if it is within the range, choices and pattern."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise _Bad
            if isinstance(value, int) and not -INT_MAX <= value <= INT_MAX:
                raise _Bad
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise _Bad
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                raise _Bad
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                raise _Bad
            if self.pattern and not re.fullmatch(self.pattern, value):
                raise _Bad
        return value


class _Bad(Exception):
    """The value does not fit the setting (reported by ``Setting.parse``)."""


def _scalar(kind: type | None, value: Any, source: Source) -> Any:
    """``value`` as ``kind``, or _Bad: a bool is never a number, a number never a bool."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and (source.text or source.fire):
            word = value.strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
        if source.fire and type(value) is int and value in (0, 1):  # fire reads the text "1" as 1
            return bool(value)
        raise _Bad
    if isinstance(value, bool):
        raise _Bad
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and source.text and _INT.fullmatch(value.strip()):
            return int(value)
        raise _Bad
    if kind is float:
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:  # an int beyond any float
                raise _Bad from None
        # Text from every source: YAML 1.1 reads 1e-5 (no dot) as a string, and so did the
        # sweep's JSON-as-YAML config.
        if isinstance(value, str) and len(value) <= _MAX_NUMBER_TEXT and _FLOAT.fullmatch(value.strip()):
            return float(value)
        raise _Bad
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and source.fire:  # fire reads --output_dir 2024 as a number
            return str(value)
        raise _Bad
    raise TypeError(f"unsupported setting kind {kind!r}")


# --- showing a hostile value in one short line ------------------------------------------------


class _ShortRepr(reprlib.Repr):
    """reprlib's bounded repr (nesting, lengths, recursion), and ints of any size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 60
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:  # repr() itself refuses past 4,300 digits
            return f"<an integer of {len(str(x)) if x.bit_length() < 14000 else 'over 4,000'} digits>"
        return super().repr_int(x, level)


_short = _ShortRepr()


def show(value: Any) -> str:
    """A short, one-line repr of any value."""
    try:
        return clip(_short.repr(value))
    except Exception:  # a hostile object's own __repr__
        return f"<{type(value).__name__}>"


def clip(text: str, limit: int = 80) -> str:
    """``text`` on one line, at most about ``limit`` characters, saying how long it was."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


# --- checking the flags of an argparse command ------------------------------------------------


def check_args(
    args: argparse.Namespace, settings: Mapping[str, Setting], dests: Mapping[str, str] | None = None
) -> None:
    """Parse and check, in place, the flags ``settings`` declares (keyed by the flag: "--seed";
    ``dests`` names the attribute where it is not the flag's own).

    The flags are declared without an argparse ``type`` or ``choices``, so every check (and its
    one-line message) happens here rather than in argparse's usage-and-error output.
    """
    for flag, setting in settings.items():
        dest = (dests or {}).get(flag) or flag.lstrip("-").replace("-", "_")
        value = getattr(args, dest)
        source = COMMAND_LINE if isinstance(value, str) else IN_CODE  # defaults are typed
        setattr(args, dest, setting.parse(value, name=flag, source=source))


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse's own errors (unknown flag, missing argument) one ``florist: error:`` line
    with exit code 2, as every other bad input is, instead of the usage text and the error."""

    def error(message: str) -> None:
        parser.exit(2, f"florist: error: {clip(message, 300)} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser
