"""How the command line reads a setting's text, from a flag or its `OPENLORA_*` variable alike: one rule
per kind of value, so that a value means the same wherever it is given and a typo is refused rather than
read as some other value.

- A whole number is ASCII digits, with a leading `-` only where the setting takes negative values. No
  surrounding spaces, `+`, `_` (`1_000`), digits of other scripts (`١٢`), `0x10` or `1e3`: Python's int()
  takes several of these, no other server does, and each can turn a typo into a surprising value. It lies
  in the setting's range, at most 2^63 - 1 (every count and size of the system fits an int64).
- A number is ASCII decimal or scientific notation (`30`, `0.5`, `.5`, `1e-3`), the same sign rule, never
  NaN or infinity, within the setting's range.
- A yes/no word is 1/true/yes/on or 0/false/no/off in any ASCII case; anything else (`ture`) is refused,
  not read as no.
- A named choice (`int4`, `cuda:0`, `DEBUG`) is one of its names in any ASCII case, nothing around it.

An empty variable is an unset one (its caller's business); an empty flag is a value, refused like any.
Each function returns the value or raises ValueError with the reason ("must be ..., got '...'") that the
caller puts after the flag, and the variable when the text came from there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bound(value: float) -> str:
    if value == INT64_MAX:
        return "2^63-1"
    if value == INT64_MIN:
        return "-2^63"
    return str(value) if isinstance(value, int) else f"{value:g}"


def range_text(
    minimum: float | None,
    maximum: float | None,
    minimum_allowed: bool = True,
    maximum_allowed: bool = True,
) -> str:
    """`>= 0`, `> 0`, `<= 1`, `in [1, 4096]`, `in (0, 0.5)`; "" when unbounded."""
    if minimum is not None and maximum is not None:
        low, high = "[" if minimum_allowed else "(", "]" if maximum_allowed else ")"
        return f"in {low}{_bound(minimum)}, {_bound(maximum)}{high}"
    if minimum is not None:
        return f"{'>=' if minimum_allowed else '>'} {_bound(minimum)}"
    if maximum is not None:
        return f"{'<=' if maximum_allowed else '<'} {_bound(maximum)}"
    return ""


def _within(
    value: float,
    minimum: float | None,
    maximum: float | None,
    minimum_allowed: bool,
    maximum_allowed: bool,
) -> bool:
    if minimum is not None and (value < minimum or (value == minimum and not minimum_allowed)):
        return False
    return maximum is None or value < maximum or (value == maximum and maximum_allowed)


def whole_number(text: str, minimum: int | None = 0, maximum: int = INT64_MAX) -> int:
    """`text` as a whole number in [minimum, maximum] (minimum None: down to -2^63)."""
    low = INT64_MIN if minimum is None else minimum
    reason = f"must be a whole number {range_text(low, maximum)}, written in ASCII digits, got {text!r}"
    # A minus sign where no value is negative is a typo, "-0" too; 20 digits bound int()'s work.
    if not _WHOLE.fullmatch(text) or (text.startswith("-") and low >= 0) or len(text) > 21:
        raise ValueError(reason)
    value = int(text)
    if not low <= value <= maximum:
        raise ValueError(reason)
    return value


def number(
    text: str,
    minimum: float | None = 0.0,
    maximum: float | None = None,
    *,
    minimum_allowed: bool = True,
    maximum_allowed: bool = True,
) -> float:
    """`text` as a finite number within the bounds (None: unbounded on that side; `*_allowed` False: the
    bound itself is outside)."""
    bounds = range_text(minimum, maximum, minimum_allowed, maximum_allowed)
    reason = (
        f"must be a number{' ' + bounds if bounds else ''}, written in ASCII decimal or scientific notation "
        f"(such as 30, 0.5 or 1e-3; not nan or inf), got {text!r}"
    )
    negative_refused = minimum is not None and minimum >= 0
    if not _DECIMAL.fullmatch(text) or (text.startswith("-") and negative_refused):
        raise ValueError(reason)
    value = float(text)
    if not math.isfinite(value):  # written as a number, too large for one (1e999)
        raise ValueError(
            f"must be a number{' ' + bounds if bounds else ''}, got {text!r}, past the largest one"
        )
    if not _within(value, minimum, maximum, minimum_allowed, maximum_allowed):
        raise ValueError(reason)
    return value + 0.0  # -0.0 as 0.0


def ascii_lower(text: str) -> str | None:
    """`text` in lower case when it is ASCII, else None: str.lower() maps some other letters onto ASCII
    ones (the Kelvin sign onto "k"; upper() maps the dotless "ı" onto "I")."""
    return text.lower() if text.isascii() else None


def yes_no(text: str) -> bool:
    """`text` as a yes/no word (TRUE_WORDS, FALSE_WORDS) in any ASCII case."""
    word = ascii_lower(text)
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)} (any case), got {text!r}")


def choice(text: str, choices: Sequence[str]) -> str:
    """`text` as one of `choices`, matched in any ASCII case; returned as `choices` spells it."""
    spelled = {c.lower(): c for c in choices}
    word = ascii_lower(text)
    if word is None or word not in spelled:
        raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
    return spelled[word]


def given_text(
    flags: Mapping[str, object], environ: Mapping[str, str], dest: str, flag: str, env: str
) -> tuple[str | None, str]:
    """(text, source) of a setting: the flag's when given (an empty one too: a value, refused by its
    reader), else the variable's when set and not empty, else (None, ""). `source` names it for a refusal:
    `--flag`, or `OPENLORA_X (for --flag)`."""
    value = flags.get(dest)
    if value is not None:
        return str(value), flag
    if environ.get(env):
        return environ[env], f"{env} (for {flag})"
    return None, ""
