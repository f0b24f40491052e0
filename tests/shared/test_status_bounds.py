"""Status messages stay within what a gRPC client accepts: a caller's value is quoted cut to its first
characters, and every message the servers send is cut to MAX_STATUS_CHARS (grpc-message travels
percent-encoded in trailing metadata, which clients cap at 16 KiB with every other header)."""

from openlora.text_rules import MAX_QUOTED_CHARS, bounded_status, quoted


def test_a_short_value_is_quoted_whole():
    assert quoted("2026-13") == "'2026-13'"


def test_a_long_value_is_quoted_cut_with_its_length():
    text = quoted("x" * 20_000)
    assert text.startswith(repr("x" * MAX_QUOTED_CHARS)) and "20000 characters" in text
    assert len(text) < MAX_QUOTED_CHARS + 40


def test_status_messages_are_cut_to_the_bound_and_say_so():
    assert bounded_status("period: bad") == "period: bad"
    long = "filename: " + "é" * 50_000
    cut = bounded_status(long)
    assert cut.startswith("filename: ") and cut.endswith("characters cut)")
    # Percent-encoded, each character takes at most 12 bytes (4 UTF-8 bytes of %XX): within 16 KiB.
    assert len(cut.encode()) * 3 < 16 * 1024
