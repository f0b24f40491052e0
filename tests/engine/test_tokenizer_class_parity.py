"""Prompt text is tokenized as transformers' AutoTokenizer tokenizes it, including when tokenizer_config.json
names a class that builds its own pipeline (LlamaTokenizer: transformers 5 sets its normalizer,
pre-tokenizer and decoder from `add_prefix_space` / `legacy`, not from tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, processors, trainers

from data_plane.tokenizer import Tokenizer

TEXTS = [
    "hello the quick fox",
    " leading space",
    "<s>[INST] hi [/INST]",
    "a</s>b <s> c",
    "two  spaces\nnewline",
    "numbers 123 and CAPS",
]


@pytest.fixture(scope="module")
def llama_style_tokenizer(tmp_path_factory) -> Path:
    """A byte-fallback BPE with Llama 2's normalizer (prepend and replace "▁") and BOS template."""
    corpus = [
        "the quick brown fox jumps over the lazy dog " * 3,
        "hello world, this is a tiny corpus for bpe training [INST] [/INST]",
        "numbers 123 456 and CAPS",
    ] * 20
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out = tmp_path_factory.mktemp("llama-tokenizer")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.mark.parametrize(
    "config",
    [
        {"tokenizer_class": "LlamaTokenizer"},
        {"tokenizer_class": "LlamaTokenizer", "legacy": False},
        # What transformers writes for a tokenizer without a length: int(1e30), out of range for the
        # worker's JSON parser, which refused the file and so missed the class (and the chat template).
        {"tokenizer_class": "LlamaTokenizer", "legacy": False, "model_max_length": int(1e30)},
        {"tokenizer_class": "LlamaTokenizer", "legacy": True},
        {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False},
        {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False, "add_eos_token": True},
        {"tokenizer_class": "PreTrainedTokenizerFast"},
        {},
    ],
)
def test_text_is_tokenized_as_autotokenizer_tokenizes_it(llama_style_tokenizer, config):
    from transformers import AutoTokenizer

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (llama_style_tokenizer / "tokenizer_config.json").write_text(json.dumps({**special, **config}))
    reference = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    ours = Tokenizer.from_dir(llama_style_tokenizer)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            want = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert ours.encode(text, add_special_tokens=add_special_tokens) == want, (
                text,
                add_special_tokens,
            )
        ids = reference(text)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


def test_a_class_transformers_cannot_load_leaves_the_file_as_it_stands(llama_style_tokenizer):
    (llama_style_tokenizer / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "NoSuchTokenizerClass"})
    )
    raw = HFTokenizer.from_file(str(llama_style_tokenizer / "tokenizer.json"))
    ours = Tokenizer.from_dir(llama_style_tokenizer)
    assert all(ours.encode(t) == raw.encode(t).ids for t in TEXTS)


_NEW_TOKEN = {"content": "<|im_end|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False}


@pytest.mark.parametrize(
    "config, special_tokens_map",
    [
        ({"added_tokens_decoder": {"300": _NEW_TOKEN}}, None),
        ({"additional_special_tokens": ["<|im_end|>"]}, None),
        ({"extra_special_tokens": ["<|im_end|>"]}, None),
        ({"eos_token": "<|im_end|>"}, None),
        ({"pad_token": "<pad>"}, None),
        ({"additional_special_tokens": ["<|im_end|>"], "tokenizer_class": "PreTrainedTokenizerFast"}, None),
        # A tokenizer saved before `added_tokens_decoder`: its special tokens in special_tokens_map.json.
        ({}, {"eos_token": "<|im_end|>"}),
    ],
)
def test_tokens_the_config_names_that_the_file_lacks_are_added_as_transformers_adds_them(
    llama_style_tokenizer, tmp_path, config, special_tokens_map
):
    """tokenizer.json taken as it stands split `<|im_end|>` into pieces where transformers, which adds
    every token tokenizer_config.json (or special_tokens_map.json) names, reads it as one token."""
    from transformers import AutoTokenizer

    model_dir = tmp_path / "tokenizer"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes((llama_style_tokenizer / "tokenizer.json").read_bytes())
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "unk_token": "<unk>", **config})
    )
    if special_tokens_map is not None:
        (model_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    reference = AutoTokenizer.from_pretrained(model_dir)
    ours = Tokenizer.from_dir(model_dir)
    texts = [*TEXTS, "hi <|im_end|> x", "a<pad>b", "[INST] hi [/INST]"]
    assert any(
        len(reference(t, add_special_tokens=False)["input_ids"])
        < len(
            HFTokenizer.from_file(str(model_dir / "tokenizer.json")).encode(t, add_special_tokens=False).ids
        )
        for t in texts
    ), "the case adds no token: it tests nothing"
    for text in texts:
        want = reference(text)["input_ids"]
        assert ours.encode(text) == want, text
        assert ours.decode(want) == reference.decode(want, skip_special_tokens=True), text
    assert ours.vocab_size == len(reference)
