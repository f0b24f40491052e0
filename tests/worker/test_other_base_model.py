"""A worker of another base model on the same control plane: the adapters of the first one are refused
on it (FAILED_PRECONDITION), named by the field the request used for them."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import grpc
import pytest

from openlora.v1 import inference_pb2, inference_pb2_grpc

from .conftest import WORKER_TOKEN, support

OTHER_BASE_MODEL = "tiny-deep"


@pytest.fixture(scope="module")
def other_worker(system, tmp_path_factory):
    """A worker of a 3-layer variant of the system's model (other dimensions, so another fingerprint), its
    HTTP API on a port picked free (started again on another when that one was taken before it bound it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_plane.server.config import EngineSettings, WorkerConfig
    from data_plane.server.main import serve_worker

    model_dir = tmp_path_factory.mktemp("deep-model")
    config = json.loads((system.model_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig.from_dict(config)).save_pretrained(model_dir, safe_serialization=True)
    shutil.copy(system.model_dir / "tokenizer.json", model_dir / "tokenizer.json")
    state_dir = tmp_path_factory.mktemp("deep-worker")

    def start():
        return system.loop.run(
            serve_worker(
                WorkerConfig(
                    model_dir=model_dir,
                    model_name=OTHER_BASE_MODEL,
                    control_plane_target=system.control_plane.target,
                    worker_token=WORKER_TOKEN,
                    state_dir=state_dir,
                    listen="127.0.0.1:0",
                    http_listen=f"127.0.0.1:{support.free_port()}",
                    engine=EngineSettings(num_kv_blocks=64, max_num_seqs=4, max_lora_rank=16),
                    redis_url=None,
                )
            )
        )

    worker = support.retry_on_taken_port(start)
    yield worker
    system.loop.run(worker.stop(1.0))


def _refusal(worker, key: str, **fields) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(
                stub.Generate(
                    inference_pb2.GenerateRequest(
                        prompt="hello", sampling=inference_pb2.SamplingParams(max_tokens=2), **fields
                    ),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=60,
                )
            )
    return refused.value


def test_another_base_models_adapter_is_refused_naming_the_field_that_named_it(system, other_worker):
    """A mix member made for another base model was refused naming `adapter`, a field the request never
    set (as the control plane names every name it resolves); it names `mix[i].adapter`, as NOT_FOUND does."""
    _, _, key = system.new_tenant()
    refused = _refusal(other_worker, key, adapter="ad0")
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details().startswith("adapter: adapter 'ad0' was made for base model 'tiny'")
    for method, mix in (
        (inference_pb2.MIX_METHOD_LINEAR, [("ad1", 0.5), ("ad0", 0.5)]),
        (inference_pb2.MIX_METHOD_ENSEMBLE, [("", 0.5), ("ad0", 0.5)]),
    ):
        refused = _refusal(
            other_worker,
            key,
            mix=[inference_pb2.AdapterWeight(adapter=a, weight=w) for a, w in mix],
            mix_method=method,
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        index = 0 if method == inference_pb2.MIX_METHOD_LINEAR else 1
        name = mix[index][0]
        assert refused.details().startswith(f"mix[{index}].adapter: adapter {name!r} was made for base model")
    body = {
        "model": OTHER_BASE_MODEL,
        "prompt": "hello",
        "max_tokens": 2,
        "mix": [{"adapter": "", "weight": 0.5}, {"adapter": "ad0", "weight": 0.5}],
        "mix_method": "ensemble",
    }
    error = _http_refusal(other_worker, key, body)
    assert error["message"].startswith("mix[1].adapter: adapter 'ad0' was made for base model")
    assert error["param"] == "mix[1].adapter"  # it was null
    error = _http_refusal(other_worker, key, {"model": "ad0", "prompt": "hello", "max_tokens": 2})
    assert "adapter 'ad0' was made for base model" in error["message"]
    assert error["param"] == "model"


def _http_refusal(worker, key: str, body: dict) -> dict:
    """The OpenAI error object of a completion the worker refuses with HTTP 400."""
    request = urllib.request.Request(
        f"{worker.openai_base_url}/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as http_refused:
        urllib.request.urlopen(request, timeout=60)
    assert http_refused.value.code == 400
    return json.loads(http_refused.value.read())["error"]
