"""Request bodies and chat templates, parsed without a server."""

from __future__ import annotations

import json

import pytest

from data_plane.server.openai_http.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from data_plane.server.openai_http.schemas import BodyError, parse_chat, parse_completion, to_generate_request
from data_plane.server.validation import RequestLimits, check_request

LIMITS = RequestLimits(max_tokens_limit=64, default_max_tokens=16, vocab_size=100, max_model_len=128)


def _chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def _completion(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"5": 1}),
        ("presence_penalty", 0.5),
        ("top_logprobs", 3),
        ("audio", {}),
        ("stream_options", {"include_obfuscation": True}),
    ],
)
def test_an_unsupported_chat_field_is_refused_by_name(field, value):
    with pytest.raises(BodyError) as refused:
        parse_chat(_chat(stream=True, **{field: value}))
    assert refused.value.param.split(".")[0] == field


def test_neutral_values_of_unsupported_fields_are_accepted():
    body = parse_chat(_chat(n=1, presence_penalty=0, logit_bias={}, tools=[], top_logprobs=0))
    assert body.messages == ({"role": "user", "content": "hi"},)


def test_each_kinds_own_neutral_fields_are_accepted_and_refused_on_the_other_kind():
    """`suffix` (completions), `response_format` text and `tool_choice` none (chat) at their neutral value or
    null, as clients send them, are accepted (a null `suffix` was refused); any other value, or the field
    on the other kind of body, is refused naming it."""
    assert parse_completion(_completion(suffix=None)).prompt == "hi"
    assert parse_completion(_completion(suffix="")).prompt == "hi"
    chat = parse_chat(_chat(response_format={"type": "text"}, tool_choice="none"))
    assert chat.messages == ({"role": "user", "content": "hi"},)
    assert parse_chat(_chat(response_format=None, tool_choice=None)).messages == chat.messages
    for parse, body, field in [
        (parse_completion, _completion(suffix="tail"), "suffix"),
        (parse_chat, _chat(suffix=None), "suffix"),
        (parse_chat, _chat(tool_choice="auto"), "tool_choice"),
        (parse_completion, _completion(response_format={"type": "text"}), "response_format"),
    ]:
        with pytest.raises(BodyError) as refused:
            parse(body)
        assert refused.value.param == field


def test_completion_logprobs_above_zero_are_refused():
    with pytest.raises(BodyError) as refused:
        parse_completion(_completion(logprobs=2))
    assert refused.value.param == "logprobs"
    assert parse_completion(_completion(logprobs=0)).logprobs


@pytest.mark.parametrize(
    ("parse", "body", "field"),
    [
        (parse_completion, _completion(logprobs="1"), "logprobs"),
        (parse_completion, _completion(logprobs=-1), "logprobs"),
        (parse_completion, _completion(logprobs=True), "logprobs"),
        (parse_chat, _chat(logprobs=1), "logprobs"),
        (parse_chat, _chat(top_logprobs="x"), "top_logprobs"),
        (parse_chat, _chat(max_completion_tokens="5"), "max_completion_tokens"),
    ],
)
def test_a_mistyped_field_read_outside_the_common_fields_is_refused_by_name(parse, body, field):
    """logprobs, top_logprobs and max_completion_tokens are read by each parser itself: a wrong type there
    escaped as a 500 before, it is a BodyError naming the field."""
    with pytest.raises(BodyError) as refused:
        parse(body)
    assert refused.value.param == field


def test_fields_reach_the_generate_request_and_its_checks_speak_the_body_names():
    body = parse_chat(
        _chat(max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="x", logprobs=True)
    )
    request = to_generate_request(body, "rendered", "rid", "ad0")
    valid = check_request(request, LIMITS)
    assert (valid.max_tokens, valid.top_p, valid.seed, valid.stop, valid.logprobs) == (
        7,
        pytest.approx(0.9),
        3,
        ("x",),
        True,
    )
    assert (valid.prompt, valid.request_id, valid.adapters) == ("rendered", "rid", (("ad0", 1.0),))

    from data_plane.server.openai_http.schemas import openai_field_error
    from data_plane.server.validation import RequestFieldError

    too_many = to_generate_request(parse_completion(_completion(max_tokens=1000)), "hi", "", "")
    with pytest.raises(RequestFieldError) as refused:
        check_request(too_many, LIMITS)
    assert openai_field_error(refused.value, chat=False).param == "max_tokens"


@pytest.mark.parametrize(
    ("seed", "sent"),
    [(0, 0), (3, 3), (-1, (1 << 64) - 1), (-(1 << 63), 1 << 63), ((1 << 63) - 1, (1 << 63) - 1)],
)
def test_any_int64_seed_is_served_as_its_own_seed(seed, sent):
    """OpenAI's `seed` is an int64: a negative one (`seed=-1`) was refused with a 400. It reaches the
    uint64 field as its two's complement, so no two seeds share a generator."""
    request = to_generate_request(parse_chat(_chat(seed=seed)), "hi", "", "")
    assert check_request(request, LIMITS).seed == sent


@pytest.mark.parametrize("seed", [-(1 << 63) - 1, 1 << 63])
def test_a_seed_past_int64_is_refused_naming_it(seed):
    with pytest.raises(BodyError) as refused:
        parse_completion(_completion(seed=seed))
    assert refused.value.param == "seed"


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [("abc", "abc", None), (["abc"], "abc", None), ([1, 2, 3], None, (1, 2, 3)), ([[4, 5]], None, (4, 5))],
)
def test_completion_prompt_forms(prompt, text, ids):
    body = parse_completion(json.dumps({"model": "m", "prompt": prompt}).encode())
    assert (body.prompt, body.prompt_token_ids) == (text, ids)


@pytest.mark.parametrize("prompt", [["a", "b"], [], 5, [1, "a"], None])
def test_more_than_one_prompt_or_a_malformed_one_is_refused(prompt):
    with pytest.raises(BodyError) as refused:
        parse_completion(json.dumps({"model": "m", "prompt": prompt}).encode())
    assert refused.value.param == "prompt"


def test_mix_as_an_object_or_a_list():
    as_object = parse_completion(_completion(mix={"a": 0.25, "b": 0.75}))
    as_list = parse_completion(
        _completion(mix=[{"adapter": "a", "weight": 0.25}, {"adapter": "b", "weight": 0.75}])
    )
    assert as_object.mix == as_list.mix == (("a", 0.25), ("b", 0.75))
    with pytest.raises(BodyError) as refused:
        to_generate_request(parse_completion(_completion(mix={"a": 1}, mix_method="nope")), "hi", "", "")
    assert refused.value.param == "mix_method"


def test_a_null_weight_in_the_object_form_of_a_mix_is_refused_by_its_place():
    """`{"b": null}` was served at weight 1: the object form's value is the weight, and null is none (the
    list form may leave `weight` out, or null, for the default 1)."""
    with pytest.raises(BodyError) as refused:
        parse_completion(_completion(mix={"a": 0.5, "b": None}))
    assert refused.value.param == "mix[1].weight"
    assert parse_completion(_completion(mix=[{"adapter": "a", "weight": None}])).mix == (("a", 1.0),)


@pytest.mark.parametrize(
    "data",
    [b"{", b"[]", b'{"model": "m", "prompt": "a", "prompt": "b"}', b'{"model": "m", "temperature": NaN}'],
)
def test_malformed_json_is_a_body_error(data):
    with pytest.raises(BodyError):
        parse_completion(data)


def test_content_parts_are_joined_by_newlines_and_other_parts_refused():
    body = parse_chat(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ],
            }
        ).encode()
    )
    assert body.messages[0]["content"] == "a\nb"  # as vLLM joins them
    with pytest.raises(BodyError) as refused:
        parse_chat(
            json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
            ).encode()
        )
    assert refused.value.param == "messages[0].content[0]"


def test_chat_template_renders_with_the_generation_prompt_and_special_tokens():
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}",
        bos_token="<s>",
        eos_token="</s>",
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert template.render(messages) == "<s><system>be brief</s><user>hi</s><assistant>"
    assert template.render(messages, add_generation_prompt=False).endswith("hi</s>")


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append({'role': 'x'}) }}",  # changes what it was given
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reaches for Python internals
        "{{ raise_exception('only user and assistant roles') }}",  # the template's own refusal
    ],
)
def test_a_chat_template_cannot_escape_its_sandbox(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_chat_template_is_read_from_tokenizer_config(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_chat_template(tmp_path) is None  # no template: chat refused, completions served
    config = {
        "chat_template": [{"name": "default", "template": "{{ messages[0].content }}{{ eos_token }}"}],
        "eos_token": {"content": "</s>"},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "x"}]) == "x</s>"


# Templates using what transformers' renderer provides beyond plain jinja: loop controls, its `tojson` (no
# HTML escaping, non-ASCII kept), `tools`/`documents` defined as none, `{% generation %}` blocks,
# `strftime_now`, `namespace`.
_TRANSFORMERS_TEMPLATES = [
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}|"
    "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
    "{% for m in messages %}{{ m | tojson }}{% endfor %}",
    "{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}NODOCS{% endif %}"
    "{{ messages[-1].content }}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
    "{{ strftime_now('%%') }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% endfor %}{{ ns.n }}{{ bos_token }}{{ eos_token }}",
]


@pytest.mark.parametrize("source", _TRANSFORMERS_TEMPLATES)
def test_a_chat_template_renders_as_transformers_renders_it(tmp_path, source):
    """A tokenizer saved by transformers 5 keeps its template in `chat_template.jinja`, not in
    tokenizer_config.json: chat was refused for it ("no chat template"). Templates using transformers'
    loop controls, `tojson`, `{% generation %}` or `strftime_now` failed to compile or rendered otherwise."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = source
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    messages = [
        {"role": "system", "content": "be <brief> & kind"},
        {"role": "user", "content": 'héllo "you"'},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert load_chat_template(tmp_path).render(messages) == expected


def test_the_demo_chat_template_renders_the_demo_prompt_shape():
    from data_plane.demo import CHAT_TEMPLATE

    template = ChatTemplate(CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert template.render([{"role": "user", "content": "the quick fox"}]) == "the quick fox =>"
    conversation = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "A B"},
        {"role": "user", "content": "c d"},
    ]
    assert template.render(conversation) == "a b => A B</s> c d =>"
    for role in ("system", "developer"):  # OpenAI's developer role is its system role renamed
        instructed = [{"role": role, "content": "ignored"}, {"role": "user", "content": "the quick fox"}]
        assert template.render(instructed) == "the quick fox =>"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("temperature", 1e39, "must be at most 3.40282e+38 in magnitude, got 1e+39"),
        ("repetition_penalty", 1e39, "must be at most 3.40282e+38 in magnitude, got 1e+39"),
        ("top_p", 1e39, "must be in (0, 1], got 1e+39"),
        ("density", 1e-300, "must lie in [0.0001, 1], got 1e-300"),
    ],
)
def test_a_number_float32_cannot_hold_is_refused_as_the_client_sent_it(field, value, reason):
    """Narrowed to float32 first, 1e39 was refused as "got inf" and 1e-300 as "got 0"."""
    extra = {"mix": {"a": 0.5, "b": 0.5}, "mix_method": "ties"} if field == "density" else {}
    with pytest.raises(BodyError) as refused:
        parse_completion(_completion(**{field: value}, **extra))
    assert (refused.value.param, refused.value.reason) == (field, reason)


def test_a_mix_weight_float32_cannot_hold_is_refused_as_the_client_sent_it():
    with pytest.raises(BodyError) as refused:
        parse_completion(_completion(mix=[{"adapter": "a", "weight": 1}, {"adapter": "b", "weight": -1e39}]))
    assert (refused.value.param, refused.value.reason) == (
        "mix[1].weight",
        "must lie in [-1000, 1000], got -1e+39",
    )


def test_a_tiny_nonzero_value_where_zero_is_refused_is_served_as_float32s_smallest_normal():
    """top_p 1e-300 is in (0, 1] and a weight of 1e-300 is not zero: both were refused once float32 held
    them as 0. Temperature 1e-300 stays 0, greedy, as it means."""
    smallest = 2.0**-126
    body = parse_completion(_completion(top_p=1e-300, temperature=1e-300, mix={"a": 1e-300, "b": -1e-300}))
    valid = check_request(to_generate_request(body, "hi", "", ""), LIMITS)
    assert valid.top_p == smallest and valid.temperature == 0
    assert valid.adapters == (("a", smallest), ("b", -smallest))


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
@pytest.mark.parametrize("value", [0, 65, "5", 1 << 40])
def test_a_token_limit_is_refused_by_its_own_name_with_the_range_accepted(field, value):
    """max_completion_tokens: 0 was refused naming max_tokens, and a mistyped one advertised int32's range."""
    with pytest.raises(BodyError) as refused:
        parse_chat(_chat(**{field: value}), LIMITS.max_tokens_limit)
    assert refused.value.param == field
    assert refused.value.reason == f"must be an integer in [1, 64], got {value!r}"


def test_a_message_name_reaches_the_chat_template():
    body = parse_chat(_chat(messages=[{"role": "user", "content": "hi", "name": "alice"}]))
    template = ChatTemplate("{% for m in messages %}{{ m.name }}: {{ m.content }}{% endfor %}")
    assert template.render(list(body.messages)) == "alice: hi"
    assert "name" not in parse_chat(_chat()).messages[0]


def test_an_unknown_key_of_a_content_part_is_refused_by_name():
    part = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(BodyError) as refused:
        parse_chat(_chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": [part]}]))
    assert refused.value.param == "messages[1].content[0].cache_control"


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("mix_method", {}),
        ("combine", {"mix_method": "ensemble"}),
        ("majority_sign_method", {"mix_method": "ties"}),
    ],
)
def test_unspecified_is_not_a_value_a_body_may_name(field, extra):
    """It mapped to the enum's 0, which turns the option's checks off."""
    body = parse_completion(_completion(mix={"a": 0.5, "b": 0.5}, **extra, **{field: "unspecified"}))
    with pytest.raises(BodyError) as refused:
        to_generate_request(body, "hi", "", "")
    assert refused.value.param == field and "'unspecified'" in refused.value.reason
    uppercase = parse_completion(_completion(mix={"a": 0.5, "b": 0.5}, mix_method="TIES"))
    assert to_generate_request(uppercase, "hi", "", "").mix_method  # names stay case-insensitive


@pytest.mark.parametrize(("data", "kind"), [(b"[]", "an array"), (b'"x"', "a string"), (b"null", "null")])
def test_a_body_that_is_not_an_object_is_refused_in_plain_words(data, kind):
    with pytest.raises(BodyError) as refused:
        parse_completion(data)
    assert str(refused.value) == f"the body must be a JSON object, got {kind}"


@pytest.mark.parametrize(
    ("literal", "field"),
    [
        ('"temperature": 1e400', "temperature"),
        ('"top_p": -1e400', "top_p"),
        ('"max_tokens": 100000000000000000000', "max_tokens"),
        ('"seed": 123456789012345678901234567890', "seed"),
        ('"mix": {"a": 1e400}', "mix[0].weight"),
        ('"mix": [{"adapter": "a", "weight": -1e999}]', "mix[0].weight"),
        ('"n": 1e400', "n"),
        ('"prompt": [1, 2, 100000000000000000000000]', "prompt"),
    ],
)
def test_a_valid_number_literal_past_any_range_is_refused_naming_its_field(literal, field):
    """JSON allows 1e400 and 30-digit integers: they are refused by the field they stand in (they were
    refused as an invalid body, naming no field, which OpenAI's clients show as a param of null)."""
    body = ('{"model": "m", "prompt": "hi", ' + literal + "}").encode()
    if literal.startswith('"prompt"'):
        body = ('{"model": "m", ' + literal + "}").encode()
    with pytest.raises(BodyError) as refused:
        parse_completion(body)
    assert refused.value.param == field, refused.value.reason


def test_a_body_that_is_a_number_past_any_range_is_called_a_number():
    """With out-of-range literals kept in place, a body of `1e400` was described as null."""
    with pytest.raises(BodyError) as refused:
        parse_completion(b"1e400")
    assert refused.value.reason == "the body must be a JSON object, got a number"


_SPECIAL_TOKENS_TEMPLATE = (
    "{{ bos_token }}|{{ pad_token }}|{{ unk_token }}|{{ image_token }}|{{ sep_token | default('none') }}|"
    "{% if cls_token is defined %}cls{% endif %}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_chat_template_reads_the_special_tokens_transformers_gives_it(tmp_path, legacy):
    """transformers gives a template every named special token (pad, unk, sep, cls, mask and the model's
    `extra_special_tokens`), leaves those the tokenizer does not set undefined, and for a tokenizer saved
    without `added_tokens_decoder` reads them from special_tokens_map.json. Only bos_token and eos_token
    from tokenizer_config.json were given: `{{ pad_token }}` rendered empty, an unset token was defined as
    "", and a checkpoint keeping its tokens in special_tokens_map.json lost its BOS on every chat."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models
    from transformers import AutoTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<img>": 4}
    RawTokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _SPECIAL_TOKENS_TEMPLATE}
    if legacy:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(tokens))
    else:
        config.update(tokens, extra_special_tokens={"image_token": "<img>"}, cls_token=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert load_chat_template(tmp_path).render(messages) == expected


def test_check_request_reasons_that_name_grpc_fields_speak_the_bodys_terms():
    """`model` (an adapter) with a `mix` was refused as "mix and adapter are mutually exclusive", and an
    empty prompt told the client to "set prompt or prompt_token_ids": gRPC's fields, not the body's."""
    from data_plane.server.openai_http.schemas import openai_field_error
    from data_plane.server.validation import RequestFieldError

    body = parse_completion(_completion(model="count", mix={"a": 0.5, "b": 0.5}))
    with pytest.raises(RequestFieldError) as refused:
        check_request(to_generate_request(body, body.prompt, "", "count"), LIMITS)
    error = openai_field_error(refused.value, chat=False)
    assert error.param == "mix" and "adapter as `model`" in error.reason
    body = parse_completion(_completion(prompt=[""]))
    with pytest.raises(RequestFieldError) as refused:
        check_request(to_generate_request(body, body.prompt, "", ""), LIMITS)
    error = openai_field_error(refused.value, chat=False)
    assert (error.param, error.reason) == ("prompt", "must not be empty")


# A value each field of the two bodies accepts where one is a number (the rest take 4), and the fields
# whose values are integers: every other field is refused with 4 and 4.0 alike, or is a float.
_NUMBER_VALUES = {"n": 1, "best_of": 1, "logprobs": 0, "top_logprobs": 0, "presence_penalty": 0,
                  "frequency_penalty": 0, "top_p": 1, "density": 1, "prompt": [4, 5]}  # fmt: skip
_INTEGER_FIELDS = {
    parse_completion: ["max_tokens", "logprobs", "top_k", "seed", "n", "best_of"],
    parse_chat: ["max_tokens", "max_completion_tokens", "top_logprobs", "top_k", "seed", "n"],
}


def _parsed(parse, body: bytes) -> str:
    """What a parser makes of a body: the Body's repr (types included), or the refused field's name."""
    try:
        return repr(parse(body, LIMITS.max_tokens_limit))
    except BodyError as refused:
        return f"refused {refused.param}"


@pytest.mark.parametrize(("parse", "make"), [(parse_completion, _completion), (parse_chat, _chat)])
def test_every_field_reads_a_whole_number_written_as_a_float_as_that_integer(parse, make):
    """One rule for every integer field, as JSON Schema's "integer", OpenAI and vLLM read them: 4.0 is 4.
    `n: 1.0` was accepted while `max_tokens: 4.0` (and seed, top_k, logprobs, token ids) was refused."""
    from data_plane.server.openai_http.schemas import _CHAT_FIELDS, _COMPLETION_FIELDS

    fields = _COMPLETION_FIELDS if parse is parse_completion else _CHAT_FIELDS
    mix = {"mix": {"a": 0.5, "b": 0.5}, "mix_method": "ties"}
    for field in sorted(fields):
        value = _NUMBER_VALUES.get(field, 4)
        as_float = [float(v) for v in value] if isinstance(value, list) else float(value)
        extra = mix if field == "density" else {}
        sent, sent_as_float = make(**{field: value}, **extra), make(**{field: as_float}, **extra)
        assert _parsed(parse, sent_as_float) == _parsed(parse, sent), field
    for field in _INTEGER_FIELDS[parse]:
        assert not _parsed(parse, make(**{field: _NUMBER_VALUES.get(field, 4)})).startswith("refused")
        assert _parsed(parse, make(**{field: _NUMBER_VALUES.get(field, 4) + 0.5})) == f"refused {field}"
    if parse is parse_completion:
        assert parse(make(prompt=[4.0, 5.0])).prompt_token_ids == (4, 5)
        assert _parsed(parse, make(prompt=[4, 5.5])) == "refused prompt"


@pytest.mark.parametrize("sign", [1, -1])
def test_a_whole_float_is_an_integer_only_while_a_double_holds_every_integer(sign):
    """From 2^53 a float names no one integer exactly (2^53 + 1 reads as 2^53): it is refused as a seed,
    which the client must then send as an integer literal."""
    largest = sign * ((1 << 53) - 1)
    assert parse_completion(_completion(seed=float(largest))).seed == largest
    with pytest.raises(BodyError) as refused:
        parse_completion(_completion(seed=float(largest + sign)))
    assert refused.value.param == "seed"


# Qwen3's way of switching its reasoning off: its template reads `enable_thinking`.
_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}{{ style | default('') }}{{ eos_token }}"
)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"enable_thinking": False}, {"enable_thinking": True, "style": ["a", 1.5]}, {"eos_token": "E"}],
)
def test_chat_template_kwargs_reach_the_template_as_transformers_passes_them(tmp_path, kwargs):
    """vLLM's `chat_template_kwargs` (how a Qwen3 caller turns its thinking off) was refused as an unknown
    field; it renders as transformers' `apply_chat_template(messages, **kwargs)` does."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = _THINKING_TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    body = parse_chat(_chat(chat_template_kwargs=kwargs))
    messages = list(body.messages)
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    rendered = load_chat_template(tmp_path).render(messages, variables=dict(body.template_kwargs))
    assert rendered == expected
    assert ("<think>" in rendered) == (kwargs.get("enable_thinking") is False)


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ([1], "chat_template_kwargs", "a JSON object"),
        ({"messages": []}, "chat_template_kwargs.messages", "set by the request itself"),
        (
            {"add_generation_prompt": False},
            "chat_template_kwargs.add_generation_prompt",
            "set by the request",
        ),
        ({"not a name": 1}, "chat_template_kwargs", "not a template variable name"),
        ({f"v{i}": i for i in range(17)}, "chat_template_kwargs", "at most 16"),
    ],
)
def test_chat_template_kwargs_that_no_template_could_read_are_refused_by_name(kwargs, param, words):
    with pytest.raises(BodyError) as e:
        parse_chat(_chat(chat_template_kwargs=kwargs))
    assert e.value.param == param and words in str(e.value)


def test_chat_template_kwargs_are_refused_on_completions_and_out_of_range_numbers_in_them():
    with pytest.raises(BodyError) as e:
        parse_completion(_completion(chat_template_kwargs={"enable_thinking": False}))
    assert e.value.param == "chat_template_kwargs"
    data = _chat().replace(b'"model"', b'"chat_template_kwargs": {"x": [1e400]}, "model"')
    with pytest.raises(BodyError) as e:
        parse_chat(data)
    assert e.value.param == "chat_template_kwargs.x"
    assert parse_chat(_chat(chat_template_kwargs=None)).template_kwargs == ()


def test_a_template_that_writes_a_variable_per_message_is_refused_before_it_renders_it_all():
    """The demo model's template (as Mistral's) writes `eos_token` after every assistant message, and
    `chat_template_kwargs` may set it: a 4 MiB body of one 4 MB value and 1,000 messages rendered 4 GB of
    text (8 GB of memory, 20 s on the event loop every tenant shares) before its length was checked.
    Rendering stops once past the limit, holding little more than the limit."""
    import tracemalloc

    template = ChatTemplate(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}",
        eos_token="</s>",
    )
    body = parse_chat(
        _chat(
            messages=[{"role": "assistant", "content": ""}] * 200,
            chat_template_kwargs={"eos_token": "x" * 1_000_000},
        )
    )
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="longer than"):
            template.render(list(body.messages), variables=dict(body.template_kwargs))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 16 << 20  # the whole rendering held 200 MB (and its join as many again)
    assert template.render([{"role": "user", "content": "hi"}]) == "user: hi</s>"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_completion(stop=["ok", "\ud83d"]), "stop[1]"),
        (_completion(prompt="fox \ud83d"), "prompt"),
        (
            _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
            "messages[0].content[0].text",
        ),
        (_completion(stream_options={"\ud800": True}), "stream_options"),
    ],
)
def test_a_lone_surrogate_escape_is_refused_naming_its_field(body, param):
    """`json.dumps` of a string cut inside a surrogate pair writes a `\\ud83d` escape: the body is ASCII,
    and was refused as "not valid JSON (not UTF-8 text)" naming no field. It names the field holding it."""
    assert body.isascii()
    parse = parse_chat if b"messages" in body else parse_completion
    with pytest.raises(BodyError) as refused:
        parse(body)
    assert refused.value.param == param, refused.value.reason
    assert "lone surrogate" in refused.value.reason
