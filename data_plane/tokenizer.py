"""Tokenizer (the `tokenizers` library) and incremental detokenization with stop strings."""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from openlora.safe_json import JsonFieldError, load_json_object

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context so that the first output tokens decode with the right spacing.
_CONTEXT_TOKENS = 4
_PIECE_CHARS = 1024  # a long text is counted in pieces of this many characters
_WHOLE_CHARS = 16 * _PIECE_CHARS  # up to this long a text is encoded whole at once (a short lock)
_BOUNDARY_TOKENS = 4  # what cutting the text at a piece boundary may add to the count
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token (SentencePiece, Llama 2)
_METASPACE = "\u2581"  # SentencePiece's "▁", a space


# tokenizer_config.json classes that take tokenizer.json as it stands, in every transformers version.
_FILE_AS_IS_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
_TOKENIZER_CONFIG = "tokenizer_config.json"
_MAX_TOKENIZER_CONFIG_BYTES = 16 << 20


def pipeline_of(model_dir: Path) -> HFTokenizer:
    """The `tokenizers` pipeline transformers' AutoTokenizer encodes and decodes with for this directory:
    tokenizer.json as it stands, unless tokenizer_config.json names a tokenizer class (LlamaTokenizer, the
    class of Llama 2, Mistral and TinyLlama checkpoints) whose constructor builds a pipeline of its own, or
    names special or added tokens that tokenizer.json does not hold as added tokens; then that class's
    (`backend_tokenizer`). transformers 5 rebuilds LlamaTokenizer's normalizer, pre-tokenizer and decoder
    from `add_prefix_space` and `legacy` instead of reading the file's: a leading space, text after a
    special token (a chat template's `<s>[INST]`) and `add_prefix_space: false` were encoded differently
    from transformers, so the same prompt text gave other tokens. And it adds every token the config names
    (`added_tokens_decoder`, `eos_token`, `additional_special_tokens`, ...) that the file lacks, so such a
    token's text is one token there and was split into pieces here. Without transformers installed, or
    when it cannot load the directory, the file is used as it stands (logged)."""
    path = model_dir / "tokenizer.json"
    config = _tokenizer_config(model_dir)
    tokenizer_class = config.get("tokenizer_class")
    if not isinstance(tokenizer_class, str) or tokenizer_class in _FILE_AS_IS_CLASSES:
        as_is = HFTokenizer.from_file(str(path))
        added = {token.content for token in as_is.get_added_tokens_decoder().values()}
        try:
            if _named_tokens(model_dir, config) <= added:
                return as_is
        except (OSError, JsonFieldError, UnicodeError) as error:  # an unreadable special_tokens_map.json
            log.warning(
                "%s: special tokens not readable (%s): transformers loads the tokenizer",
                model_dir.name,
                error,
            )
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
        backend = loaded.backend_tokenizer
    except Exception as error:  # an unknown class, a version without it, transformers absent
        log.warning(
            "%s: tokenizer (class %s) not loadable by transformers (%s): tokenizer.json is used as it stands",
            model_dir.name,
            tokenizer_class,
            str(error)[:200],
        )
        return HFTokenizer.from_file(str(path))
    return HFTokenizer.from_str(backend.to_str())  # a copy of its own, detached from transformers' object


def _tokenizer_config(model_dir: Path) -> dict:
    """tokenizer_config.json's object; empty when the file is missing or unreadable."""
    path = model_dir / _TOKENIZER_CONFIG
    try:
        # transformers writes `model_max_length` as int(1e30) when the tokenizer has none: out of range
        # for this parser, kept as a marker instead of refusing the file (the key is not read here).
        config = load_json_object(
            path.read_bytes(),
            _TOKENIZER_CONFIG,
            max_bytes=_MAX_TOKENIZER_CONFIG_BYTES,
            mark_out_of_range=True,
        )
    except (OSError, JsonFieldError):
        return {}
    return config.data


# Where a tokenizer saved before transformers wrote `added_tokens_decoder` keeps its special tokens.
_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the special tokens every tokenizer has by name.
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip


def special_tokens(model_dir: Path, config: dict) -> dict[str, str]:
    """The named special tokens transformers' `apply_chat_template` passes to a template (its
    `special_tokens_map`): the seven of SPECIAL_TOKEN_NAMES and the names of `extra_special_tokens` when it
    is a dict (model-specific tokens, `image_token`), from tokenizer_config.json (`config`); for a
    tokenizer saved without `added_tokens_decoder` (before transformers 4.34), special_tokens_map.json's
    entries replace them, as transformers reads that file over the config then. A token set to null or
    absent is left out (undefined in the template)."""
    values = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        values.update((name, value) for name, value in extra.items() if isinstance(name, str))
    legacy_path = Path(model_dir) / _SPECIAL_TOKENS_MAP_FILE
    if "added_tokens_decoder" not in config and legacy_path.is_file():
        legacy = load_json_object(legacy_path.read_bytes(), _SPECIAL_TOKENS_MAP_FILE, mark_out_of_range=True)
        values.update((name, value) for name, value in legacy.data.items() if name in SPECIAL_TOKEN_NAMES)
    tokens = {name: _token(value) for name, value in values.items()}
    return {name: token for name, token in tokens.items() if token is not None}


def _token(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}; None for none."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_tokens(model_dir: Path, config: dict) -> set[str]:
    """The text of every token tokenizer_config.json names, which transformers adds to the tokenizer when
    tokenizer.json lacks it: its added tokens, its named special tokens (`special_tokens`) and its list of
    extra special tokens (`additional_special_tokens`, or `extra_special_tokens` as a list)."""
    entries = (
        list(config["added_tokens_decoder"].values())
        if isinstance(config.get("added_tokens_decoder"), dict)
        else []
    )
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            entries += config[key]
    texts = {text for text in map(_token, entries) if text}
    return texts | {text for text in special_tokens(model_dir, config).values() if text}


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_dir(cls, model_dir: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        """The tokenizer of a checkpoint directory, as transformers tokenizes with it (`pipeline_of`)."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{Path(model_dir).name}: no tokenizer.json")
        return cls(pipeline_of(Path(model_dir)), eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own, as the vocabulary spells it: a token that holds part
        of a multi-byte character gives those bytes (`decode([id])` gives U+FFFD for it). A byte-fallback
        token `<0xNN>` is that byte; a byte-level (GPT-2 style) token maps each character back through
        the byte-to-unicode table; SentencePiece's "▁" is a space; an added token, or one of a vocabulary
        none of these fits, is the UTF-8 of its decoded text (a special token's own text, `</s>`, as vLLM
        and OpenAI spell an end token in log-probabilities)."""
        spelling = self._spelling
        token = self._tokenizer.id_to_token(token_id)
        if token is None or token_id in spelling.added_ids:
            return self.decode([token_id], skip_special_tokens=False).encode()
        if spelling.byte_fallback and (byte := _BYTE_TOKEN.fullmatch(token)):
            return bytes([int(byte.group(1), 16)])
        if spelling.byte_level and all(c in _BYTE_LEVEL_CHARS for c in token):
            return bytes(_BYTE_LEVEL_CHARS[c] for c in token)
        if spelling.metaspace:
            return token.replace(_METASPACE, " ").encode()
        return self.decode([token_id]).encode()

    @functools.cached_property
    def _spelling(self) -> _Spelling:
        config = json.loads(self._tokenizer.to_str())
        decoders = _decoder_types(config.get("decoder"))
        model = config.get("model") or {}
        return _Spelling(
            added_ids=frozenset(self._tokenizer.get_added_tokens_decoder()),
            byte_fallback=bool(model.get("byte_fallback")) or "ByteFallback" in decoders,
            byte_level="ByteLevel" in decoders,
            metaspace="Metaspace" in decoders or f"Replace:{_METASPACE}" in decoders,
        )

    def encode_within(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """`encode(text, add_special_tokens)`, or PromptTooLong as soon as the text is known to exceed
        `max_tokens` (a rendered chat is encoded without special tokens: its template wrote them).

        The tokenizer holds the interpreter lock while it runs, so one long text stops every other thread
        (the engine's steps, the server) for as long as it takes: a million characters took 25 s. A text
        longer than `_WHOLE_CHARS` is first counted piece by piece (each held briefly), stopping once the
        count passes the limit; only a text that may fit is then encoded whole (cutting a word at a piece
        boundary can only add a few tokens, allowed for). A shorter text is encoded once, whole."""
        if len(text) > _WHOLE_CHARS:
            counted = 0
            for boundary, start in enumerate(range(0, len(text), _PIECE_CHARS)):
                piece = text[start : start + _PIECE_CHARS]
                counted += len(self._tokenizer.encode(piece, add_special_tokens=False).ids)
                if counted > max_tokens + _BOUNDARY_TOKENS * boundary:
                    raise PromptTooLong(max_tokens)
        ids = self.encode(text, add_special_tokens)
        if len(ids) > max_tokens:
            raise PromptTooLong(max_tokens, len(ids))
        return ids


@dataclass(frozen=True)
class _Spelling:
    """How a vocabulary spells its tokens' bytes (read from tokenizer.json once)."""

    added_ids: frozenset[int]
    byte_fallback: bool
    byte_level: bool
    metaspace: bool


def _decoder_types(decoder: object) -> set[str]:
    """The types of a tokenizer.json decoder and of those in its sequences; a Replace decoder also as
    `Replace:<pattern>`."""
    found: set[str] = set()
    pending = [decoder]
    while pending:
        node = pending.pop()
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        found.add(kind)
        if kind == "Replace":
            found.add(f"Replace:{(node.get('pattern') or {}).get('String')}")
        pending.extend(node.get("decoders") or [])
    return found


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable bytes stand for themselves, the others for
    chr(256 + n) in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL_CHARS = _byte_level_chars()


class PromptTooLong(ValueError):
    """A text encodes to more than `limit` tokens (`count` when it was encoded whole, else None)."""

    def __init__(self, limit: int, count: int | None = None) -> None:
        super().__init__(f"more than {limit} tokens" if count is None else f"{count} tokens, above {limit}")
        self.limit = limit
        self.count = count


class IncrementalDetokenizer:
    """Turns generated tokens into text deltas that never end inside a multi-byte character, and finds
    stop strings (the stop string itself is not emitted; text that could begin one is held back)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._matchers = [_StopMatcher(s) for s in self._stop]
        self.text = ""  # all output text decoded so far (cut at a stop string when one was hit)
        self._emitted_chars = 0
        self._last_begins = 0  # len(text) before the last token was added
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Adds one generated token; returns the text now safe to emit (possibly "")."""
        self._last_begins = len(self.text)
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for the next token
        new_text = full_text[len(prefix_text) :]
        start = len(self.text)
        self.text += new_text
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._find_stop(new_text, start):
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back_chars())

    @property
    def last_offset(self) -> int:
        """Where the text of the token added last begins in `text`, in characters: a token holding part of
        a character begins where that character does (its text is not in `text` yet), and none lies past
        the end of `text` (a stop string cut it). Bytes that never form a character are told from the start
        of one only by the token after them: that token begins at the U+FFFD they become."""
        return min(self._last_begins, len(self.text))

    def flush(self) -> str:
        """On finish: everything not yet emitted (a trailing incomplete character is dropped). Text held
        back for an incomplete character is read for stop strings too: when one is found there, the text is
        cut at it and `stopped` is set."""
        if not self.stopped and self._read_offset < len(self._ids):
            tail = self._tokenizer.decode(self._ids[self._prefix_offset :])
            prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
            new_text = tail[len(prefix) :].rstrip(_REPLACEMENT)
            start = len(self.text)
            self.text += new_text
            self._prefix_offset = self._read_offset = len(self._ids)
            self._find_stop(new_text, start)
        return self._emit(len(self.text))

    def _find_stop(self, new_text: str, start: int) -> bool:
        """Each stop string's matcher reads the new characters (appended at `start`) once: the earliest stop
        string to start among those that end in them cuts the text there. True when one did."""
        if not self._matchers:
            return False
        hits = [m.feed(new_text, start) for m in self._matchers]
        found = [h for h in hits if h is not None]
        if not found:
            return False
        self.text = self.text[: min(found)]
        self.stopped = True
        return True

    def _held_back_chars(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        return max((m.matched for m in self._matchers), default=0)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._emitted_chars)
        delta = self.text[self._emitted_chars : upto]
        self._emitted_chars = upto
        return delta


class _StopMatcher:
    """Knuth-Morris-Pratt over the output for one stop string: `matched` is the length of the longest
    prefix of it that the text ends with, kept up to date in O(1) amortized per character (checking every
    suffix against every stop string cost 4.7 ms per token with 16 stop strings of 256 characters)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        # failure[k]: the longest proper prefix of stop[:k] that is also its suffix
        self._failure = [0] * (len(stop) + 1)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._failure[k]
            if stop[i] == stop[k]:
                k += 1
            self._failure[i + 1] = k

    def feed(self, text: str, start: int) -> int | None:
        """Reads `text` (appended at position `start` of the output); returns where the stop string's first
        occurrence ending in it starts, or None."""
        stop, failure, k = self.stop, self._failure, self.matched
        for offset, char in enumerate(text):
            while k and char != stop[k]:
                k = failure[k]
            if char == stop[k]:
                k += 1
            if k == len(stop):
                self.matched = k
                return start + offset + 1 - len(stop)
        self.matched = k
        return None
