"""Identifiers checked by a pattern are checked whole: `$` also matches before a final newline, so a
pattern applied with `match` took "<key>\\n" for a key (a merge directory named so was a merge, and
`path_of` built a path with the newline in it)."""

from __future__ import annotations

import pytest

from control_plane.tenancy.keys import lookup_prefix
from data_plane.fusion.store import MergeStore
from openlora.cache_scope import is_cache_key

CONTENT = "ab" * 32
API_KEY = "olk_0123456789ab_" + "k" * 24


def test_a_cache_key_with_a_trailing_newline_is_not_a_cache_key():
    assert is_cache_key(CONTENT) and is_cache_key(f"{CONTENT}-{'c' * 32}")
    assert not is_cache_key(CONTENT + "\n")
    assert not is_cache_key(f"{CONTENT}-{'c' * 32}\n")


def test_an_api_key_with_a_trailing_newline_is_not_read_as_our_format():
    assert lookup_prefix(API_KEY) == "0123456789ab"
    assert lookup_prefix(API_KEY + "\n").startswith("x")  # a digest prefix, as for any foreign key


def test_a_merge_key_with_a_trailing_newline_is_refused_and_its_directory_ignored(tmp_path):
    (tmp_path / (CONTENT + "\n")).mkdir()
    store = MergeStore(tmp_path, None, max_rank=8)
    assert store.path_of(CONTENT) == tmp_path / CONTENT
    with pytest.raises(ValueError, match="malformed merge key"):
        store.path_of(CONTENT + "\n")
    assert not store.contains(CONTENT + "\n")
