"""The model's own chat template (`tokenizer_config.json`'s `chat_template`), rendered in a sandbox.

Rendered as Hugging Face does it: jinja2 with `trim_blocks` and `lstrip_blocks`, the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` and a `raise_exception` function, but in
an `ImmutableSandboxedEnvironment`: a template reads only what it is given and changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from openlora.safe_json import JsonFieldError, load_json_object

log = logging.getLogger(__name__)

MAX_RENDERED_CHARS = 1 << 20
_CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template refused the messages."""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ({"role", "content"} each)."""
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._tokens
            )
        except TemplateError as error:
            raise ChatTemplateError(f"the model's chat template refused the messages: {error}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise ChatTemplateError(f"the rendered chat is longer than {MAX_RENDERED_CHARS} characters")
        return text


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The template of `model_dir/tokenizer_config.json`; None when there is none (or it is unusable,
    logged): chat is then refused while completions still work."""
    path = Path(model_dir) / _CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = load_json_object(path.read_bytes(), _CONFIG_FILE)
        source = config.data.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        return ChatTemplate(
            source, _token(config.data.get("bos_token")), _token(config.data.get("eos_token"))
        )
    except (JsonFieldError, TemplateError, OSError) as error:
        log.warning("%s: chat template not usable, chat completions refused: %s", path, error)
        return None


def _token(value: object) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise(message: str) -> None:
    raise TemplateError(message)
