"""Python client of InferenceService: `Client(target, api_key).generate(prompt)` yields text pieces.

    client = Client("127.0.0.1:50052", api_key)
    for piece in client.generate("Hello", adapter="upper", max_tokens=32):
        print(piece, end="", flush=True)

Failures raise the typed errors of `openlora.errors` (InvalidArgument, Unauthenticated, NotFound, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import grpc

from openlora.errors import OpenLoRAError, from_rpc_error
from openlora.grpc_reconnect import reconnect_options
from openlora.v1 import inference_pb2, inference_pb2_grpc
from openlora.wire import assign, extend

GenerateResponse = inference_pb2.GenerateResponse

_MIX_METHODS = {
    "linear": inference_pb2.MIX_METHOD_LINEAR,
    "ties": inference_pb2.MIX_METHOD_TIES,
    "dare_linear": inference_pb2.MIX_METHOD_DARE_LINEAR,
    "dare_ties": inference_pb2.MIX_METHOD_DARE_TIES,
    "magnitude_prune": inference_pb2.MIX_METHOD_MAGNITUDE_PRUNE,
    "ensemble": inference_pb2.MIX_METHOD_ENSEMBLE,
}
_SIGN_METHODS = {
    "total": inference_pb2.MAJORITY_SIGN_METHOD_TOTAL,
    "frequency": inference_pb2.MAJORITY_SIGN_METHOD_FREQUENCY,
}
_COMBINES = {
    "probs": inference_pb2.ENSEMBLE_COMBINE_PROBS,
    "logprobs": inference_pb2.ENSEMBLE_COMBINE_LOGPROBS,
}


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    adapter: str | None = None,
    mix: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    mix_method: str = "linear",
    density: float | None = None,
    majority_sign_method: str | None = None,
    combine: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    repetition_penalty: float | None = None,
    logprobs: bool = False,
    request_id: str | None = None,
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; the server validates the values. A value the wire format
    cannot carry (a negative seed, a max_tokens past int32) raises ValueError naming the field."""
    request = inference_pb2.GenerateRequest()
    assign(request, "request_id", request_id or "")
    assign(request, "adapter", adapter or "")
    assign(request, "prompt", prompt or "")
    extend(request.prompt_token_ids, "prompt_token_ids", prompt_token_ids or ())
    request.logprobs = bool(logprobs)
    sampling = request.sampling
    sampling.SetInParent()
    for field, value in (
        ("top_k", top_k),
        ("temperature", temperature),
        ("top_p", top_p),
        ("max_tokens", max_tokens),
        ("seed", seed),
        ("repetition_penalty", repetition_penalty),
    ):
        if value is not None:
            assign(sampling, field, value, "sampling.")
    extend(sampling.stop, "sampling.stop", stop)
    if mix:
        pairs = mix.items() if isinstance(mix, Mapping) else mix
        for i, (name, weight) in enumerate(pairs):
            member = request.mix.add()
            assign(member, "adapter", name, f"mix[{i}].")
            assign(member, "weight", weight, f"mix[{i}].")
        if mix_method not in _MIX_METHODS:
            raise ValueError(f"mix_method must be one of {', '.join(_MIX_METHODS)}, got {mix_method!r}")
        request.mix_method = _MIX_METHODS[mix_method]
    # Options of the merge methods (density, sign election) and of an ensemble (combine).
    if density is not None:
        assign(request, "density", density)
    if majority_sign_method is not None:
        if majority_sign_method not in _SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of {', '.join(_SIGN_METHODS)}")
        request.majority_sign_method = _SIGN_METHODS[majority_sign_method]
    if combine is not None:
        if combine not in _COMBINES:
            raise ValueError(f"combine must be one of {', '.join(_COMBINES)}")
        request.combine = _COMBINES[combine]
    return request


class Client:
    """A blocking client over one channel; safe to share between threads."""

    def __init__(self, target: str, api_key: str, *, timeout_s: float | None = None) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target, options=reconnect_options())
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

    def generate_stream(self, prompt: str | None = None, **kwargs) -> Iterator[GenerateResponse]:
        """Yields every GenerateResponse; the last carries finish_reason, usage and timing.

        Closing the iterator early (break, or garbage collection) cancels the call on the server.
        """
        request = build_request(prompt, **kwargs)
        call = self._stub.Generate(request, metadata=self._metadata, timeout=self._timeout_s)
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def generate(self, prompt: str | None = None, **kwargs) -> Iterator[str]:
        """Yields the completion's text pieces as they are produced."""
        for response in self.generate_stream(prompt, **kwargs):
            if response.text:
                yield response.text

    def complete(self, prompt: str | None = None, **kwargs) -> str:
        """The whole completion text."""
        return "".join(self.generate(prompt, **kwargs))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["Client", "GenerateResponse", "OpenLoRAError", "build_request"]
