"""Compiling a tenant's regular expression without letting it take the process's memory or time.

Adapter configs carry regular expressions PEFT applies with Python's `re` (`target_modules`,
`exclude_modules`, `layers_pattern`, the keys of `rank_pattern` / `alpha_pattern`). OpenLoRA matches them
in the `regex` engine, which can stop a match at a deadline, but which expands counted repeats when it
compiles: a 30-character key, `(?:(?:a{1000}){1000}){1000}`, took 3 GB and then the whole memory of a
24 GB machine. So an expression is first parsed as `re` parses it (what PEFT accepts is exactly what is
accepted here), and refused when its counted repeats, multiplied through their nesting, would expand past
MAX_EXPANSION items.

`regex` is never handed the tenant's text itself: its syntax is larger than `re`'s, and some strings
mean one thing to each (`k_proj{e<=1}` is fuzzy matching to `regex` and eight literal characters to
`re`; `[[:alpha:]]` a POSIX class to one and a set followed by `]` to the other), so matching the text
in `regex` served some adapters with scalings PEFT does not apply. What `regex` compiles is `re`'s
parse written back out (`render`): every literal escaped, every construct in the syntax both engines
read alike, so the expression matches exactly what `re` matches.
"""

from __future__ import annotations

import re
import re._constants as sre_constants
import re._parser as sre_parser
import warnings

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


_AT = {
    sre_constants.AT_BEGINNING: "^",
    sre_constants.AT_BEGINNING_STRING: r"\A",
    sre_constants.AT_END: "$",
    sre_constants.AT_END_STRING: r"\Z",
    sre_constants.AT_BOUNDARY: r"\b",
    # re's \B never matches in an empty string, regex's does: only beside a character
    sre_constants.AT_NON_BOUNDARY: r"(?:\B(?=[\s\S])|\B(?<=[\s\S]))",
}
_CATEGORY = {
    sre_constants.CATEGORY_DIGIT: r"\d",
    sre_constants.CATEGORY_NOT_DIGIT: r"\D",
    sre_constants.CATEGORY_SPACE: r"\s",
    sre_constants.CATEGORY_NOT_SPACE: r"\S",
    sre_constants.CATEGORY_WORD: r"\w",
    sre_constants.CATEGORY_NOT_WORD: r"\W",
}
# Inline flags written back; VERBOSE is left out (the parse has already dropped the whitespace and
# comments it allows) and so is UNICODE (the default for str patterns in both engines).
_FLAG_LETTERS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"), (re.ASCII, "a"))


def _char(code: int) -> str:
    """One character as an escape both engines read as that literal character, inside a set or out."""
    if code < 0x80 and (chr(code).isalnum() or chr(code) == "_"):
        return chr(code)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _flags(flags: int) -> str:
    return "".join(letter for flag, letter in _FLAG_LETTERS if flags & flag)


# Characters `re` counts as whitespace (str.isspace) that `regex`'s \s leaves out.
_EXTRA_SPACE = r"\x1c-\x1f"


def _set(items, flags: int) -> str:
    negate = bool(items) and items[0][0] == sre_constants.NEGATE
    members = items[1:] if negate else items
    lone_not_space = members == [(sre_constants.CATEGORY, sre_constants.CATEGORY_NOT_SPACE)]
    if lone_not_space and not flags & re.ASCII:  # [\S] is [^\s]: so written, \s takes re's extra ones
        return f"[{'' if negate else '^'}\\s{_EXTRA_SPACE}]"
    out = ["^"] if negate else []
    for op, av in members:
        if op == sre_constants.LITERAL:
            _check_case(flags, av)
            out.append(_char(av))
        elif op == sre_constants.RANGE:
            _check_case(flags, av[1])
            out.append(f"{_char(av[0])}-{_char(av[1])}")
        elif op == sre_constants.CATEGORY:
            if av == sre_constants.CATEGORY_NOT_SPACE and not flags & re.ASCII:
                raise RegexRefused("uses \\S inside a set with other members: write the set without it")
            out.append(_CATEGORY[av])
            if av == sre_constants.CATEGORY_SPACE and not flags & re.ASCII:
                out.append(_EXTRA_SPACE)
        else:
            raise RegexRefused(f"uses a construct this server does not match ({op} in a set)")
    return "[" + "".join(out) + "]"


def _check_case(flags: int, code: int) -> None:
    """A non-ASCII character under IGNORECASE: the two engines fold some of them onto ASCII letters
    differently (re: dotless i matches i, regex: not), so it is refused rather than matched either way."""
    if flags & re.IGNORECASE and code >= 0x80:
        raise RegexRefused(
            f"ignores case around the non-ASCII character {chr(code)!r}: write the letters it stands for"
        )


def _repeat_bounds(low: int, high: int) -> str:
    return f"{{{low},}}" if high == sre_constants.MAXREPEAT else f"{{{low},{high}}}"


def render(items, names: dict[int, str] | None = None, flags: int = 0) -> str:
    """`re`'s parse of an expression written back as an expression of the syntax `re` and `regex` read
    alike (every literal escaped, every group explicit), meaning what `re` means by the original, on the
    ASCII names it is matched against. `names`: group number -> name, for the groups the original names;
    `flags`: the flags in force (the global ones at the top). What the engines would read differently
    (a scoped ASCII or Unicode flag, which `regex` ignores; case folding of non-ASCII characters) is
    refused."""
    names = names or {}
    out = []
    for op, av in items:
        if op == sre_constants.LITERAL:
            _check_case(flags, av)
            out.append(_char(av))
        elif op == sre_constants.NOT_LITERAL:
            _check_case(flags, av)
            out.append(f"[^{_char(av)}]")
        elif op == sre_constants.ANY:
            out.append(".")
        elif op == sre_constants.IN:
            out.append(_set(av, flags))
        elif op == sre_constants.AT:
            out.append(_AT[av])
        elif op in _REPEATS:
            low, high, body = av
            suffix = {sre_constants.MAX_REPEAT: "", sre_constants.MIN_REPEAT: "?"}.get(op, "+")
            out.append(f"(?:{render(body, names, flags)}){_repeat_bounds(low, high)}{suffix}")
        elif op == sre_constants.SUBPATTERN:
            group, add_flags, del_flags, body = av
            if (add_flags | del_flags) & (re.ASCII | re.UNICODE):
                raise RegexRefused("scopes an ASCII or Unicode flag to a group: set it for the whole pattern")
            scoped = _flags(add_flags) + (f"-{_flags(del_flags)}" if _flags(del_flags) else "")
            inner = render(body, names, (flags | add_flags) & ~del_flags)
            if group is None:
                out.append(f"(?{scoped}:{inner})")
                continue
            inner = f"(?{scoped}:{inner})" if scoped else inner
            out.append(f"(?P<{names[group]}>{inner})" if group in names else f"({inner})")
        elif op == sre_constants.BRANCH:
            out.append("(?:" + "|".join(render(branch, names, flags) for branch in av[1]) + ")")
        elif op == sre_constants.GROUPREF:
            if av > 99:  # \NNN is an octal escape: past 99 a group has no number syntax both read alike
                raise RegexRefused(f"refers back to group {av}: at most 99 groups can be referred to")
            out.append(f"(?:\\{av})")
        elif op == sre_constants.GROUPREF_EXISTS:
            group, yes, no = av
            tail = "" if no is None else "|" + render(no, names, flags)
            out.append(f"(?({group}){render(yes, names, flags)}{tail})")
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            direction, body = av
            positive = op == sre_constants.ASSERT
            kind = ("=" if positive else "!") if direction > 0 else ("<=" if positive else "<!")
            out.append(f"(?{kind}{render(body, names, flags)})")
        elif op == sre_constants.ATOMIC_GROUP:
            out.append(f"(?>{render(av, names, flags)})")
        else:
            raise RegexRefused(f"uses a construct this server does not match ({op})")
    return "".join(out)


def compile_bounded(pattern: str):
    """`pattern` as `re` reads it, compiled by `regex` (`render`), after `re` has parsed it and its
    expansion is bounded; raises RegexRefused with the reason."""
    if len(pattern) > MAX_REGEX_CHARS:
        raise RegexRefused(f"a regular expression of {len(pattern)} characters (at most {MAX_REGEX_CHARS})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FutureWarnings about sets `re` reads as it always has
            parsed = sre_parser.parse(pattern)
    except (re.error, OverflowError, RecursionError) as error:
        raise RegexRefused(f"is not a valid regular expression: {error}") from None
    if _expansion(list(parsed)) > MAX_EXPANSION:
        raise RegexRefused(
            f"its counted repeats expand to more than {MAX_EXPANSION} items: write the pattern without them"
        )
    try:
        re.compile(pattern)  # its compile-time refusals too (a look-behind of variable width)
    except (re.error, OverflowError, RecursionError) as error:
        raise RegexRefused(f"is not a valid regular expression: {error}") from None
    flags = parsed.state.flags
    names = {number: name for name, number in parsed.state.groupdict.items()}
    rendered = render(list(parsed), names, flags)
    try:
        return regex.compile((f"(?{_flags(flags)})" if _flags(flags) else "") + rendered, regex.VERSION0)
    except (regex.error, OverflowError, RecursionError, MemoryError) as error:
        raise RegexRefused(f"is not a valid regular expression: {error}") from None
