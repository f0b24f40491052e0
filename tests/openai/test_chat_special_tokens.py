"""A rendered chat is tokenized without the tokenizer's special tokens: its template wrote them. A model
whose template starts with `{{ bos_token }}` and whose tokenizer also adds BOS (Llama 2 and 3, Mistral)
got two BOS tokens on every chat, and was billed for both; transformers' apply_chat_template and vLLM
give one."""

from __future__ import annotations

import json

import openai
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from .conftest import start_http_worker

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _model_with_bos(tiny_model_dir, out):
    """The tiny model whose tokenizer adds a BOS (an existing token, `!`, so that the weights still fit)
    before every text, and whose chat template writes it too."""
    out.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name not in ("tokenizer.json", "tokenizer_config.json"):
            (out / item.name).symlink_to(item)
    tokenizer = HFTokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    bos_id = tokenizer.token_to_id("!")
    tokenizer.post_processor = processors.TemplateProcessing(single="! $A", special_tokens=[("!", bos_id)])
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"chat_template": TEMPLATE, "bos_token": "!", "eos_token": ""}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out, bos_id


def test_a_chat_gets_one_bos_as_apply_chat_template_gives_it(system, tiny_model_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    model_dir, bos_id = _model_with_bos(tiny_model_dir, tmp_path / "model")
    messages = [{"role": "user", "content": "the quick brown fox"}]
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="!", chat_template=TEMPLATE
    )
    rendered = reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = list(rendered["input_ids"])
    assert expected[0] == bos_id and expected[1] != bos_id
    assert reference("the quick brown fox")["input_ids"][0] == bos_id  # the tokenizer adds BOS itself

    tenant, _, key = system.new_tenant()
    running = start_http_worker(system, tmp_path / "worker", model_dir)
    engine = running.worker.engine
    seen = []
    generate = engine.generate

    def recording(request):
        seen.append(list(request.prompt_token_ids))
        return generate(request)

    engine.generate = recording
    try:
        client = openai.OpenAI(base_url=running.base_url, api_key=key, max_retries=0)
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        completion = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=2)
    finally:
        engine.generate = generate
        system.loop.run(running.worker.stop(1.0))
    assert seen[0] == expected
    assert chat.usage.prompt_tokens == len(expected)
    # A plain completion still gets the tokenizer's BOS.
    assert seen[1] == reference("the quick brown fox")["input_ids"]
    assert completion.usage.prompt_tokens == len(seen[1])
    billed = system.wait_usage(tenant, 2)
    assert billed.total_requests == 2
    assert billed.total_prompt_tokens == len(expected) + len(seen[1])
