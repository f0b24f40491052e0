"""JSON from outside the process, parsed so that every malformed document is one exception.

`load_json` bounds nesting depth and size, refuses NaN/Infinity, numbers that overflow, duplicate keys,
text that is not UTF-8 and lone surrogates; `JsonObject` reads fields by type and range (a bool is not
an int). Both raise only `JsonFieldError(field, reason)`, never RecursionError, OverflowError or a
TypeError from a value of the wrong type, so each parser maps one exception to its own domain error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

DEFAULT_MAX_DEPTH = 32
# Longest integer literal accepted (a signed 64-bit value has at most 20 characters).
MAX_INT_CHARS = 20
# Every integer up to this magnitude is a double, and no two of them round to the same one: a JSON number
# read as a double (as most parsers read it, RFC 8259 section 6) names one integer only up to here
# (JavaScript's Number.MAX_SAFE_INTEGER; 2^53 + 1 reads as 2^53).
MAX_SAFE_FLOAT_INT = (1 << 53) - 1
_REQUIRED: Any = object()


class JsonFieldError(ValueError):
    """A JSON document, or one field of it, was refused. `field` names it (`adapter_config.json.r`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class LoneSurrogate(JsonFieldError):
    """A string of the document (or a key: `in_key`) holds a lone surrogate, which only a `\\ud800`-style
    escape can spell (the document itself may be ASCII): no character, so no UTF-8 text. `path` names the
    value holding it within the document (`stop[1]`, `messages[0].content`; "" for the document itself, or
    for a key of its top-level object), so that a reader can refuse that field by name."""

    def __init__(self, field: str, path: str, code_point: int, in_key: bool) -> None:
        where = f"{'a key of ' if in_key else ''}{path or 'the document'}"
        super().__init__(
            field, f"not valid JSON ({where} holds a lone surrogate \\u{code_point:04x}: not UTF-8 text)"
        )
        self.path = path
        self.code_point = code_point
        self.in_key = in_key


def describe(value: object, max_chars: int = 64) -> str:
    """repr() of a refused value for a message, cut to `max_chars` (values may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_CHARS:
        raise ValueError(f"integer literal of {len(text)} characters is out of range")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


class OutOfRangeNumber:
    """A number literal no Python int of MAX_INT_CHARS characters or finite float holds (`1e400`, a
    30-digit integer), kept in place of its value by `load_json(..., mark_out_of_range=True)`: it is valid
    JSON, so the field it stands in is refused by name (no getter takes it) instead of the whole document."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"{self.text[:32]} (out of range)"


def _parse_int_as_serde(text: str) -> int | float:
    # serde_json (the Rust safetensors' parser) reads `-0` as the float -0.0, which no integer field takes.
    return -0.0 if text == "-0" else _parse_int(text)


def _mark_int(text: str) -> int | OutOfRangeNumber:
    return OutOfRangeNumber(text) if len(text) > MAX_INT_CHARS else int(text)


def _mark_float(text: str) -> float | OutOfRangeNumber:
    value = float(text)
    return value if math.isfinite(value) else OutOfRangeNumber(text)


def _parse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {describe(duplicate)}")
    return result


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_pairs,
    parse_int=_parse_int,
    parse_float=_parse_float,
    parse_constant=_parse_constant,
)
_SERDE_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_pairs,
    parse_int=_parse_int_as_serde,
    parse_float=_parse_float,
    parse_constant=_parse_constant,
)
_MARKING_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_pairs,
    parse_int=_mark_int,
    parse_float=_mark_float,
    parse_constant=_parse_constant,
)


def _check_tree(value: object, max_depth: int) -> None:
    """Depth of arrays/objects at most `max_depth` (the top level counts 1); every string valid UTF-8."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            items: list = [node]
        elif isinstance(node, dict):
            items = list(node.keys()) + list(node.values())
        elif isinstance(node, list):
            items = node
        else:
            continue
        if isinstance(node, dict | list) and depth > max_depth:
            raise ValueError(f"nested deeper than {max_depth} levels")
        for item in items:
            if isinstance(item, str):
                if not item.isascii():
                    item.encode("utf-8")  # a lone surrogate from a \\ud800 escape raises here
            elif isinstance(item, dict | list):
                stack.append((item, depth + 1))


def _lone_surrogate(value: object) -> tuple[str, int, bool]:
    """(path, code point, in a key) of a lone surrogate in a parsed document that holds one. Only
    run once `_check_tree` found one: it builds a path for every value it visits, which the check does not."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            children = []
            for key, item in node.items():
                code_point = _surrogate_in(key)
                if code_point is not None:
                    return path, code_point, True
                children.append((item, f"{path}.{key}" if path else key))
        elif isinstance(node, list):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node)]
        else:
            children = [(node, path)]
        for item, where in children:
            if isinstance(item, str):
                code_point = _surrogate_in(item)
                if code_point is not None:
                    return where, code_point, False
            elif isinstance(item, dict | list):
                stack.append((item, where))
    raise AssertionError("no lone surrogate in the document")


def _surrogate_in(text: str) -> int | None:
    """The first surrogate code point of `text` (a pair escaped as two `\\u` escapes is one character),
    or None."""
    return next((ord(c) for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)


def load_json(
    data: bytes | str,
    field: str,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int | None = None,
    mark_out_of_range: bool = False,
    negative_zero_float: bool = False,
) -> object:
    """Parses one JSON document; raises JsonFieldError(field, reason) for anything malformed.

    `max_depth` bounds nesting (1: a flat array or object); `max_bytes` bounds the encoded size. A number
    literal out of range refuses the document, or with `mark_out_of_range` stands as an OutOfRangeNumber
    for the reader of its field to refuse (only for readers that check every value's type, as JsonObject's
    getters do). With `negative_zero_float` a `-0` literal reads as the float -0.0, as serde_json reads it,
    for a document a Rust reader reads too (a safetensors header): a field that must be an integer then
    refuses it as that reader does (it takes the place of `mark_out_of_range`).
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonFieldError(field, f"larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        decoder = (
            _SERDE_DECODER if negative_zero_float else _MARKING_DECODER if mark_out_of_range else _DECODER
        )
        value = decoder.decode(text)
        _check_tree(value, max_depth)
    except RecursionError:
        raise JsonFieldError(field, f"not valid JSON (nested deeper than {max_depth} levels)") from None
    except UnicodeEncodeError:  # the text was UTF-8; a \u escape in it spelled a lone surrogate
        path, code_point, in_key = _lone_surrogate(value)
        raise LoneSurrogate(field, path, code_point, in_key) from None
    except UnicodeError:
        raise JsonFieldError(field, "not valid JSON (not UTF-8 text)") from None
    except (ValueError, TypeError) as e:
        raise JsonFieldError(field, f"not valid JSON ({str(e)[:120]})") from None
    return value


def load_json_object(
    data: bytes | str,
    field: str,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int | None = None,
    mark_out_of_range: bool = False,
) -> JsonObject:
    """`load_json` of a document that must be a JSON object, wrapped for typed field access."""
    value = load_json(data, field, max_depth, max_bytes, mark_out_of_range)
    if not isinstance(value, dict):
        raise JsonFieldError(field, "must be a JSON object")
    return JsonObject(value, field)


class JsonObject:
    """A parsed JSON object read field by field. Each getter checks the type (and range) and raises
    JsonFieldError naming `prefix.key`; an absent key (or JSON null) gives `default`, or is refused
    when no default is given. With `whole_floats`, `get_int` takes a number with no fractional part
    written as a float (`4.0`, `1e3`) as that integer (`whole_number`)."""

    def __init__(self, data: dict[str, Any], prefix: str, whole_floats: bool = False) -> None:
        self.data = data
        self.prefix = prefix
        self.whole_floats = whole_floats

    def field(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise JsonFieldError(self.field(key), "is required")
            return default, False
        return value, True

    def _refuse(self, key: str, what: str, value: object) -> JsonFieldError:
        return JsonFieldError(self.field(key), f"must be {what}, got {describe(value)}")

    def get_int(
        self, key: str, default: Any = _REQUIRED, lo: int | None = None, hi: int | None = None
    ) -> int:
        value, present = self._get(key, default)
        if not present:
            return value
        number = whole_number(value) if self.whole_floats else value if is_int(value) else None
        if number is None or (lo is not None and number < lo) or (hi is not None and number > hi):
            raise self._refuse(key, f"an integer{_range(lo, hi)}", value)
        return number

    def get_number(
        self,
        key: str,
        default: Any = _REQUIRED,
        lo: float | None = None,
        hi: float | None = None,
        positive: bool = False,
    ) -> float:
        """A finite number (int or float, not bool) as a float; `positive` excludes zero."""
        value, present = self._get(key, default)
        if not present:
            return value
        what = "a positive number" if positive else f"a finite number{_range(lo, hi)}"
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._refuse(key, what, value)
        number = float(value)  # literals are at most MAX_INT_CHARS long: no overflow
        if (
            not math.isfinite(number)
            or (positive and number <= 0)
            or (lo is not None and number < lo)
            or (hi is not None and number > hi)
        ):
            raise self._refuse(key, what, value)
        return number

    def get_bool(self, key: str, default: Any = _REQUIRED) -> bool:
        value, present = self._get(key, default)
        if present and not isinstance(value, bool):
            raise self._refuse(key, "true or false", value)
        return value

    def get_str(self, key: str, default: Any = _REQUIRED, max_chars: int | None = None) -> str:
        value, present = self._get(key, default)
        if present and (not isinstance(value, str) or (max_chars is not None and len(value) > max_chars)):
            limit = f" of at most {max_chars} characters" if max_chars is not None else ""
            raise self._refuse(key, f"a string{limit}", value)
        return value

    def get_list(self, key: str, item: Callable[[object], bool], what: str, default: Any = _REQUIRED) -> list:
        """A list whose every element satisfies `item` (`what` describes the list for the message)."""
        value, present = self._get(key, default)
        if present and (not isinstance(value, list) or not all(item(v) for v in value)):
            raise self._refuse(key, what, value)
        return value

    def get_object(self, key: str) -> JsonObject:
        """A nested object; an absent one reads as empty."""
        value, present = self._get(key, None)
        if not present:
            return JsonObject({}, self.field(key))
        if not isinstance(value, dict):
            raise self._refuse(key, "a JSON object", value)
        return JsonObject(value, self.field(key), self.whole_floats)


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def whole_number(value: object) -> int | None:
    """The integer a JSON number stands for, or None: an int (not a bool), or a float with no fractional
    part (`4.0`, `1e3`) up to MAX_SAFE_FLOAT_INT in magnitude, as JSON Schema's "integer" (and OpenAI's
    and vLLM's integer fields) take it. Past that a float names no one integer exactly."""
    if is_int(value):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SAFE_FLOAT_INT:
        return int(value)
    return None


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
