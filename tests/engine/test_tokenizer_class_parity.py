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
