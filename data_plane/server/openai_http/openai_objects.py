"""OpenAI's response objects built from generation chunks: completions and chat completions, whole or
as stream chunks, and the error object."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from data_plane.server.generation import Chunk, Finish

# OpenAI knows "stop" and "length"; an engine abort ends the text as a stop does.
_FINISH_REASONS = {"length": "length"}


@dataclass
class Reply:
    """One call's identity and what has been generated so far (for the whole, non-streamed object)."""

    chat: bool
    model: str
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    finish: Finish | None = None

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.request_id}"

    def add(self, chunk: Chunk) -> None:
        self.request_id = chunk.request_id
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.text_offsets.extend(chunk.text_offsets)
        if chunk.finish is not None:
            self.finish = chunk.finish

    def whole(self, with_logprobs: bool, spell_token) -> dict:
        """The non-streamed object; `spell_token(id)` gives a token's (text, own bytes) for the logprobs."""
        text = "".join(self.text)
        logprobs = (
            # A token of a stop string the text was cut at may have begun past the cut: at most there.
            _logprobs(
                self.chat,
                self.token_ids,
                self.logprobs,
                [min(o, len(text)) for o in self.text_offsets],
                spell_token,
            )
            if with_logprobs
            else None
        )
        choice: dict = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason(self.finish)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(), "choices": [choice], "usage": usage(self.finish)}

    def chunk(self, chunk: Chunk, first: bool, with_logprobs: bool, include_usage: bool, spell_token) -> dict:
        """The stream chunk of one generation chunk."""
        logprobs = None
        if with_logprobs:
            logprobs = _logprobs(self.chat, chunk.token_ids, chunk.logprobs, chunk.text_offsets, spell_token)
        choice: dict = {"index": 0, "logprobs": logprobs, "finish_reason": None}
        if chunk.finish is not None:
            choice["finish_reason"] = finish_reason(chunk.finish)
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
            )
        else:
            choice["text"] = chunk.text
        body = {**self._head(stream=True), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict:
        """The last chunk asked for by stream_options.include_usage: no choices, the usage."""
        return {**self._head(stream=True), "choices": [], "usage": usage(self.finish)}

    def _head(self, stream: bool = False) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def finish_reason(finish: Finish | None) -> str | None:
    if finish is None:
        return None
    return _FINISH_REASONS.get(finish.reason, "stop")


def usage(finish: Finish | None) -> dict | None:
    if finish is None:
        return None
    total = finish.prompt_tokens + finish.completion_tokens
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": total,
    }


def error_object(message: str, kind: str, param: str | None, code: str | None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _logprobs(
    chat: bool, token_ids: list[int], logprobs: list[float], text_offsets: list[int], spell_token
) -> dict:
    """Chat's `content` (each token's text and its own bytes: a token holding part of a character has
    those bytes, its text U+FFFD) or the legacy object, whose `tokens` spell such a token as OpenAI's
    legacy API does, `bytes:\\xNN...`, and whose `text_offset` places each token in the completion's text
    (the engine's `text_offsets`: a token holding part of a character begins where that character
    does, so that every offset lies within the text)."""
    spelled = [spell_token(t) for t in token_ids]
    if chat:
        return {
            "content": [
                {"token": text, "logprob": lp, "bytes": list(data), "top_logprobs": []}
                for (text, data), lp in zip(spelled, logprobs, strict=True)
            ]
        }
    tokens = [
        text if _is_utf8(data) else "bytes:" + "".join(f"\\x{b:02x}" for b in data) for text, data in spelled
    ]
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": None,
        "text_offset": list(text_offsets),
    }


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
