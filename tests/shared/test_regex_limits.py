"""A tenant's regular expression means in OpenLoRA exactly what it means to Python's `re` (PEFT's engine),
though the match runs in `regex`: strings whose meaning differs between the two engines (fuzzy matching,
POSIX classes, set operations) are matched as `re` reads them."""

from __future__ import annotations

import re
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openlora.regex_limits import RegexRefused, compile_bounded

MODULE_NAMES = [
    "base_model.model.model.layers.0.self_attn.q_proj",
    "base_model.model.model.layers.0.self_attn.k_proj",
    "base_model.model.model.layers.11.mlp.down_proj",
    "model.layers.3.self_attn.v_proj",
    "k_proj",
    "q_proj",
    "kproj",
    "K_PROJ",
    "a:b",
    "[",
    "]",
    "alpha_proj",
    ":a_proj",
    "proj\n",
    "é_proj",
    "",
]
# Each is valid to `re`; several mean something else to `regex` read as written.
PATTERNS = [
    r"(?:k_proj){e<=1}",
    r".*\.(?:q_proj){e<=1}",
    r"[[:alpha:]]_proj",
    r"[[a-z]--[aeiou]]_proj",
    r"[[a-z]&&[k]]_proj",
    r"k_proj{s<=1}",
    r"(.*\.)?(q_proj|k_proj)$",
    r"(?i)K_PROJ",
    r"(?i:k)_proj",
    r"(?x) k _ proj  # verbose",
    r"(?s).*proj",
    r".*proj$",
    r".*proj\Z",
    r"\A.*\bk_proj\b",
    r"(?P<name>k)_(?P=name)?proj",
    r"(?:^|.*?\.)layers\.(?P<idx>\d+)\.",
    r"(k)?(?(1)_proj|q_proj)",
    r"(?=.*layers\.0\.).*_proj",
    r"(?!.*mlp).*_proj",
    r"(?<=\.)k_proj",
    r".*(?<!\.)k_proj",
    r"(?>.*)proj",
    r".*+proj",
    r"[^\W\d]+_proj",
    r"[\d\s]*k_proj",
    r"\w+\.\w+",
    r".*layers\.\d{1,2}\..*",
    r".*layers\.\d{2,}?\..*",
    r"a{,3}:b",
    r"é_proj",
    r"(?a)\w_proj",
    r"k_proj|",
    r"",
]


def _same(pattern: str, subject: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = re.compile(pattern)
    got = compile_bounded(pattern)
    for how in ("fullmatch", "match", "search"):
        w, g = getattr(want, how)(subject), getattr(got, how)(subject)
        assert (w is None) == (g is None), (pattern, subject, how)
        if w is not None:
            assert w.span() == g.span(), (pattern, subject, how)
            assert w.groups() == g.groups(), (pattern, subject, how)
            assert w.groupdict() == g.groupdict(), (pattern, subject, how)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_matches_what_re_matches(pattern):
    for subject in MODULE_NAMES:
        _same(pattern, subject)


def test_fuzzy_matching_syntax_is_literal_text_as_in_re():
    # `regex` reads this as "k_proj with at most one error": q_proj would match.
    compiled = compile_bounded(r"(?:k_proj){e<=1}")
    assert compiled.fullmatch("q_proj") is None
    assert compiled.fullmatch("k_proj{e<=1}") is not None


# Regular-expression syntax of both engines, plus characters each gives a meaning of its own.
_TOKENS = [
    "a", "b", "k", "_", ".", "\\.", "*", "+", "?", "*?", "++", "{1,2}", "{e<=1}", "{,2}", "(", ")", "(?:",
    "(?i)", "(?s:", "(?=", "(?!", "(?<=a)", "(?>", "[", "]", "[:alpha:]", "[^", "--", "&&", "||", "|", "^",
    "$", "\\b", "\\d", "\\w", "\\W", "\\s", "\\A", "\\Z", "-", ":", "e", "<", "=", "\\1", "(a)", "\n",
    "\\B", "\\S", "(?a:", "(?u:", "(?-i:", "\u0131", "\u212a", "\x1c", "(?<=a+)",
]  # fmt: skip
# The refusals that are deliberate: what the two engines would read differently, or too large to compile.
_DELIBERATE = ("scopes an ASCII or Unicode flag", "ignores case around", "inside a set", "expand")
_SUBJECT = st.text(alphabet="abk_.:-[]{}e<=1\n", max_size=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(_TOKENS), max_size=8).map("".join), st.lists(_SUBJECT, min_size=1, max_size=5)
)
def test_random_patterns_match_as_re_matches_them(pattern, subjects):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re.compile(pattern)
    except re.error:
        with pytest.raises(RegexRefused):
            compile_bounded(pattern)
        return
    try:
        compile_bounded(pattern)
    except RegexRefused as refused:
        assert any(reason in str(refused) for reason in _DELIBERATE), (pattern, str(refused))
        return
    for subject in subjects:
        _same(pattern, subject)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(?ai:\u212a)_proj", "scopes an ASCII"),  # regex ignores a scoped ASCII flag: Kelvin sign matched k
        ("(?a)(?u:(?i:\u212a))_proj", "scopes an ASCII"),
        ("(?i).*l\u0131n1", "ignores case"),  # dotless i matches i in re, not in regex
        ("(?i)[\u0100-\u0200]_proj", "ignores case"),
        ("(?<=a+)b", "not a valid regular expression"),  # re refuses when it compiles, not when it parses
    ],
)
def test_what_the_engines_would_read_differently_is_refused(pattern, reason):
    with pytest.raises(RegexRefused, match=reason):
        compile_bounded(pattern)


def test_whitespace_and_non_boundaries_are_read_as_re_reads_them():
    assert compile_bounded("\\s").fullmatch("\x1c") is not None  # re's \s is str.isspace
    assert compile_bounded("[^\\S]").fullmatch("\x1f") is not None
    assert compile_bounded("\\B").search("") is None  # re's \B never matches an empty string


def test_counted_repeats_that_would_expand_past_the_bound_are_refused():
    with pytest.raises(RegexRefused, match="expand"):
        compile_bounded("(?:(?:a{1000}){1000}){1000}")
