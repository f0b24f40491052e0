"""A prompt far over the context is refused after encoding only a bounded part of it: the tokenizer holds
the interpreter lock while it runs, so encoding a million characters whole stopped every other thread of
the worker (the engine's steps included) for seconds. A prompt that fits is encoded exactly as a whole."""

from __future__ import annotations

import random

import pytest

from data_plane.tokenizer import PromptTooLong, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(demo_model_dir)


class _Counting:
    """Wraps the tokenizers object to count the characters it is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.chars = 0

    def encode(self, text: str, add_special_tokens: bool = True):
        self.chars += len(text)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def _text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["the", "quick", "fox", "jumps", "over", "dog", "=>", "uppercase", "count", "\U0001f600"]
    return " ".join(rng.choice(words) for _ in range(num_words))


@pytest.mark.parametrize("text", ["x" * 1_000_000, "\U0001f600" * 1_000_000, _text(300_000, 1)])
def test_a_huge_prompt_is_refused_after_a_bounded_part_is_encoded(tokenizer, text):
    counting = _Counting(tokenizer._tokenizer)
    bounded = Tokenizer(counting)
    with pytest.raises(PromptTooLong):
        bounded.encode_within(text, 1023)
    assert counting.chars <= 64 * 1024  # whatever the text's length: it was not encoded whole


# 5,000 and 20,000 words are past the length counted piece by piece (16 KiB); the others are encoded at once.
@pytest.mark.parametrize("num_words", [1, 50, 400, 2000, 5000, 20_000])
def test_a_prompt_that_fits_is_encoded_exactly_as_a_whole(tokenizer, num_words):
    text = _text(num_words, num_words)
    whole = tokenizer.encode(text)
    assert tokenizer.encode_within(text, len(whole)) == whole  # fits with not a token to spare
    with pytest.raises(PromptTooLong):
        tokenizer.encode_within(text, len(whole) - 1)
