"""What the data modules share (florist.data, florist.chat_data): the error a bad record raises,
the label that gets no loss, and how a JSON value's type is named in a message."""

from __future__ import annotations

from typing import Any

from florist.errors import FloristError

IGNORE_INDEX = -100  # the label torch's cross-entropy skips


class DataError(FloristError, ValueError):
    """Bad training data; the message names the file and the record."""


def json_type(value: Any) -> str:
    """'null', 'a string', 'an array', ...: a JSON value's type as an error message says it."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "an array", dict: "an object"})
    return names.get(type(value), type(value).__name__)
