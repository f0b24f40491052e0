"""The model's own chat template, rendered in a sandbox as transformers renders it.

Where transformers finds it: `chat_template.jinja` beside the tokenizer (what `save_pretrained` writes
since transformers 4.5x), else `tokenizer_config.json`'s `chat_template` (a string, or named templates of
which "default" is used). Rendered as `apply_chat_template` does: jinja2 with `trim_blocks`,
`lstrip_blocks` and loop controls (`break`, `continue`), transformers' `tojson` (no HTML escaping),
`raise_exception` and `strftime_now`, a `{% generation %}` block rendered as its body, and the variables
`messages`, `tools` and `documents` (none: this API takes neither), `add_generation_prompt`, and the
tokenizer's named special tokens as transformers' `special_tokens_map` gives them (`bos_token`, `eos_token`,
`unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token` and the model's own `extra_special_tokens`;
one the tokenizer does not set stays undefined); in an `ImmutableSandboxedEnvironment`: a template reads
only what it is given and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import ClassVar

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_plane.tokenizer import special_tokens
from openlora.safe_json import JsonFieldError, load_json_object

log = logging.getLogger(__name__)

MAX_RENDERED_CHARS = 1 << 20
_CONFIG_FILE = "tokenizer_config.json"
_TEMPLATE_FILE = "chat_template.jinja"
# Larger template files are not read (the largest templates on the Hub are tens of KiB).
MAX_TEMPLATE_BYTES = 1 << 20


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens with it for
    training masks): rendered as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: json.dumps, without jinja's HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template refused the messages (or the request's variables:
    `field`). The message reads after the field's name (`messages renders longer than ...`), as every
    field refusal's does."""

    def __init__(self, message: str, field: str = "messages") -> None:
        super().__init__(message)
        self.field = field


class ChatTemplate:
    def __init__(
        self,
        source: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        """`special_tokens`: name -> token text, the tokens the template may read (`bos_token`, `eos_token`
        given on their own are added to them); a token left out is undefined in the template, as in
        transformers when the tokenizer does not set it."""
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        tokens = dict(special_tokens or {})
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if value is not None:
                tokens[name] = value
        self._tokens = tokens

    def render(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        variables: dict | None = None,
    ) -> str:
        """The prompt text of `messages` ({"role", "content"} each); `variables`: the request's own template
        variables (`chat_template_kwargs`), over the special tokens as transformers lays its kwargs over them."""
        context = {
            **self._tokens,
            **(variables or {}),
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        # Rendered piece by piece and stopped once past the limit: a template that writes a variable (or
        # `eos_token`) once per message turned a 4 MiB body (a 4 MB `chat_template_kwargs` value and 1,000
        # messages) into 4 GB of text, 8 GB of memory and 20 s on the event loop before its length was checked.
        pieces, num_chars = [], 0
        try:
            with contextlib.closing(self._template.generate(context)) as rendered:
                for piece in rendered:
                    num_chars += len(piece)
                    if num_chars > MAX_RENDERED_CHARS:
                        break
                    pieces.append(piece)
        except TemplateError as error:
            raise ChatTemplateError(f"were refused by the model's chat template: {error}") from None
        except (TypeError, ValueError, ArithmeticError) as error:
            # Python's own operation on a value of the wrong type (`'Today: ' + date_string` given a
            # number), which jinja does not turn into a TemplateError: the request's values, not a fault.
            raise ChatTemplateError(
                f"hold values the model's chat template cannot use: {error}",
                "chat_template_kwargs" if variables else "messages",
            ) from None
        if num_chars > MAX_RENDERED_CHARS:
            raise ChatTemplateError(f"render a chat longer than {MAX_RENDERED_CHARS} characters")
        return "".join(pieces)


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The template of `model_dir` (`chat_template.jinja`, else `tokenizer_config.json`'s), with the
    special tokens transformers gives it (`special_tokens`); None when there is none (or it is unusable, logged): chat
    is then refused while completions still work."""
    path = Path(model_dir) / _CONFIG_FILE
    template_file = Path(model_dir) / _TEMPLATE_FILE
    try:
        config = (  # transformers writes int(1e30) for an unbounded model_max_length: not a reason to refuse
            load_json_object(path.read_bytes(), _CONFIG_FILE, mark_out_of_range=True)
            if path.is_file()
            else None
        )
        source = config.data.get("chat_template") if config is not None else None
        if template_file.is_file():  # transformers reads the file over the config's entry
            path = template_file
            if template_file.stat().st_size > MAX_TEMPLATE_BYTES:
                raise OSError(f"larger than {MAX_TEMPLATE_BYTES} bytes")
            source = template_file.read_bytes().decode("utf-8")
        if isinstance(source, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        return ChatTemplate(source, special_tokens=special_tokens(model_dir, config.data if config else {}))
    except (JsonFieldError, TemplateError, OSError, UnicodeError) as error:
        log.warning("%s: chat template not usable, chat completions refused: %s", path, error)
        return None


def _raise(message: str) -> None:
    raise TemplateError(message)
