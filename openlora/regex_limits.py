"""Compiling a tenant's regular expression without letting it take the process's memory or time.

Adapter configs carry regular expressions PEFT applies with Python's `re` (`target_modules`,
`exclude_modules`, `layers_pattern`, the keys of `rank_pattern` / `alpha_pattern`). OpenLoRA matches them
in the `regex` engine, which can stop a match at a deadline, but which expands counted repeats when it
compiles: a 30-character key, `(?:(?:a{1000}){1000}){1000}`, took 3 GB and then the whole memory of a
24 GB machine. So an expression is first parsed as `re` parses it (what PEFT accepts is exactly what is
accepted here, nothing of `regex`'s larger syntax), and refused when its counted repeats, multiplied
through their nesting, would expand past MAX_EXPANSION items; only then is it compiled by `regex`.
"""

from __future__ import annotations

import re
import re._constants as sre_constants
import re._parser as sre_parser

import regex

MAX_REGEX_CHARS = 1024
MAX_EXPANSION = 100_000
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}


class RegexRefused(ValueError):
    """The expression is not one PEFT's `re` accepts, or too large to compile safely; the message says
    which."""


def _expansion(items) -> int:
    """Items a compiled form may hold for this parsed sequence: a counted repeat counts its largest bound
    (its smallest when unbounded: those loop rather than copy) times its body."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            count = low if high == sre_constants.MAXREPEAT else high
            total += max(1, count) * _expansion(body)
        elif op == sre_constants.SUBPATTERN:
            total += _expansion(av[-1])
        elif op == sre_constants.BRANCH:
            total += sum(_expansion(branch) for branch in av[1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            total += _expansion(av[1])
        elif op == sre_constants.ATOMIC_GROUP:
            total += _expansion(av)
        elif op == sre_constants.GROUPREF_EXISTS:
            total += sum(_expansion(branch) for branch in av[1:] if branch is not None)
        else:
            total += 1
        if total > MAX_EXPANSION:  # stop early: the bound is all that matters
            return total
    return total


def compile_bounded(pattern: str):
    """`pattern` compiled by `regex`, after `re` has parsed it and its expansion is bounded; raises
    RegexRefused with the reason."""
    if len(pattern) > MAX_REGEX_CHARS:
        raise RegexRefused(f"a regular expression of {len(pattern)} characters (at most {MAX_REGEX_CHARS})")
    try:
        parsed = sre_parser.parse(pattern)
    except (re.error, OverflowError, RecursionError) as error:
        raise RegexRefused(f"is not a valid regular expression: {error}") from None
    if _expansion(list(parsed)) > MAX_EXPANSION:
        raise RegexRefused(
            f"its counted repeats expand to more than {MAX_EXPANSION} items: write the pattern without them"
        )
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError, MemoryError) as error:
        raise RegexRefused(f"is not a valid regular expression: {error}") from None
