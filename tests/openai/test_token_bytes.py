"""A token's own bytes for chat logprobs, read from the vocabulary: a token that holds part of a multi-byte
character has those bytes (decoding it alone gives U+FFFD, whose bytes were reported before)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from data_plane.tokenizer import Tokenizer

_BYTE_TOKENS = {f"<0x{b:02X}>": 3 + b for b in range(256)}


def _sentencepiece(metaspace_decoder: bool) -> Tokenizer:
    """A Llama 2 style vocabulary: "▁" for a space, byte-fallback tokens for what it lacks."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **_BYTE_TOKENS, "▁": 259, "▁hello": 260, "h": 261}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    if metaspace_decoder:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tokenizer)


def _byte_level() -> Tokenizer:
    """A GPT-2 / Llama 3 style vocabulary: every byte one character of the byte-to-unicode table."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab["Ġhello"] = len(vocab)
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return Tokenizer(tokenizer)


@pytest.mark.parametrize("metaspace_decoder", [False, True])
def test_a_byte_fallback_token_is_its_byte_and_a_metaspace_a_space(metaspace_decoder):
    tokenizer = _sentencepiece(metaspace_decoder)
    ids = tokenizer.encode("é", add_special_tokens=False)  # not in the vocabulary: its two UTF-8 bytes
    assert [tokenizer.token_bytes(t) for t in ids][-2:] == [b"\xc3", b"\xa9"]
    assert tokenizer.decode([ids[-1]]) == "\ufffd"  # what was reported: the bytes of U+FFFD
    assert tokenizer.token_bytes(260) == b" hello"  # decode([260]) drops the leading space
    assert tokenizer.token_bytes(259) == b" "
    assert tokenizer.token_bytes(261) == b"h"
    # A special token: its own text, as vLLM spells an end token in log-probabilities ("" before, as if
    # nothing had been generated).
    assert tokenizer.token_bytes(1) == b"<s>" and tokenizer.decode([1], skip_special_tokens=False) == "<s>"


def test_a_byte_level_token_maps_each_character_back_to_its_byte():
    tokenizer = _byte_level()
    ids = tokenizer.encode("é€", add_special_tokens=False)
    assert b"".join(tokenizer.token_bytes(t) for t in ids) == "é€".encode()
    assert [tokenizer.token_bytes(t) for t in ids] == [bytes([b]) for b in "é€".encode()]
    vocab = tokenizer._tokenizer.get_vocab()
    assert tokenizer.token_bytes(vocab["Ġhello"]) == b" hello"
    assert tokenizer.token_bytes(vocab["Ġ"]) == b" "
    # The whole table: the 256 characters stand for the 256 bytes, each once.
    assert sorted(tokenizer.token_bytes(i) for i in range(256)) == [bytes([b]) for b in range(256)]


def test_a_vocabulary_of_another_kind_spells_a_token_by_its_decoded_text():
    vocab = {"[UNK]": 0, "héllo": 1, "##s": 2}
    tokenizer = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    wrapped = Tokenizer(tokenizer)
    assert wrapped.token_bytes(1) == "héllo".encode()
    assert wrapped.token_bytes(2) == wrapped.decode([2]).encode()
