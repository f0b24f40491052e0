"""InferenceService.Generate over gRPC: GenerateRequest -> `GenerationService.generate` -> responses.

Thin by design: the generate path (authorise, validate, reserve the request id, artifacts, engine,
billing) lives in generation.py, shared with the OpenAI-compatible HTTP API; field checks in
validation.py. Every domain error becomes a status code in one place (`errors.status_for`); nothing a
caller can cause becomes INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from data_plane.server.errors import MissingCredentials, mix_member_not_found, names_unknown, status_for
from data_plane.server.generation import Chunk, GenerationService, WorkerState
from data_plane.server.metrics import WorkerMetrics
from data_plane.server.validation import RequestFieldError, check_request, requested_adapter_names
from openlora import bearer
from openlora.text_rules import bounded_status
from openlora.v1 import inference_pb2, inference_pb2_grpc

__all__ = ["InferenceServicer", "WorkerState", "status_for"]

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
}
_CACHE_TIERS = {
    "none": inference_pb2.CACHE_TIER_NONE,
    "device": inference_pb2.CACHE_TIER_DEVICE,
    "host": inference_pb2.CACHE_TIER_HOST,
    "disk": inference_pb2.CACHE_TIER_DISK,
    "remote": inference_pb2.CACHE_TIER_REMOTE,
}


STARTING = "the worker is starting (registering with the control plane); retry shortly or on another worker"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, service: GenerationService | None, metrics: WorkerMetrics, state: WorkerState) -> None:
        """`service` None: the worker listens but is still starting (every call UNAVAILABLE) until `serve`
        hands it the generation service."""
        self._service = service
        self._metrics = metrics
        self._state = state

    def serve(self, service: GenerationService) -> None:
        self._service = service

    async def Generate(self, request, context) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Streams one completion: a message per engine step, or one for all the steps made while the
        transport was busy with the previous message, or per --stream-interval tokens (the first token
        alone and at once); the last carries finish_reason, usage and timing."""
        service = self._service
        if service is None:
            self._metrics.requests.labels("UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, STARTING)
        self._state.enter()
        code = "OK"
        try:
            service.check_serving()
            api_key = _bearer_key(context)
            if request.adapter and request.adapter == service.base_model:
                request = _as_base_model(request)
            chunks = service.generate(
                api_key,
                requested_adapter_names(request),
                lambda: check_request(request, service.limits),
            )
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield _response(chunk)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            if not (request.adapter and names_unknown(str(error), request.adapter)):
                error = mix_member_not_found(error, [m.adapter for m in request.mix]) or error
            mapped = status_for(error)
            if mapped is None:
                log.exception("Generate failed")
                mapped = (grpc.StatusCode.INTERNAL, "internal error")
            code = mapped[0].name
            await context.abort(mapped[0], bounded_status(mapped[1]))
        finally:
            self._metrics.requests.labels(code).inc()
            self._state.leave()


def _as_base_model(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    """The request with `adapter` naming the base model read as the base model (""), as HTTP reads
    `model`: the control plane keeps the name from every adapter and mix."""
    plain = inference_pb2.GenerateRequest()
    plain.CopyFrom(request)
    plain.ClearField("adapter")
    return plain


def _response(chunk: Chunk) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(
        request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs
    )
    finish = chunk.finish
    if finish is not None:
        response.finish_reason = _FINISH_REASONS.get(finish.reason, 0)
        response.usage.prompt_tokens = finish.prompt_tokens
        response.usage.completion_tokens = finish.completion_tokens
        response.timing.queue_ms = finish.queue_ms
        response.timing.adapter_load_ms = finish.adapter_load_ms
        response.timing.ttft_ms = finish.ttft_ms
        response.timing.total_ms = finish.total_ms
        response.timing.cache_tier = _CACHE_TIERS[finish.cache_tier]
    return response


def _bearer_key(context) -> str:
    """The key of `authorization: Bearer <key>`; the scheme is case-insensitive, and the entry given twice
    is refused, as on the control plane."""
    try:
        key = bearer.bearer_token(context.invocation_metadata())
    except bearer.CredentialGivenTwice as error:
        raise RequestFieldError(bearer.AUTHORIZATION, str(error)) from None
    if not key:
        raise MissingCredentials()
    return key
