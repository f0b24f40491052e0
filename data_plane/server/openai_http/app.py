"""Routes of the OpenAI-compatible API: `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/completions`,
`POST /v1/chat/completions` (and `GET /metrics`), over the same `GenerationService` as gRPC.

A request is read in this order, as gRPC's: draining (503), `Authorization: Bearer <key>` (401), body
size (413), its Content-Encoding and Content-Type (415: uncompressed JSON, or no Content-Type at all) and
its arrival within BODY_TIMEOUT_S (408), then the body's parse: a body that is not a
request of its route (not JSON, a field of the wrong type or outside its range) is 400 at once, since the
names it holds cannot be read; then the key is authorised for the adapters `model` and `mix` name (401,
403, 404) before any other refusal of the body's fields (400) is answered;
`X-Request-Id` is the request id (409 when it is in flight or was billed). `model` is resolved by a
`ModelResolver` and `/v1/models` lists what a `ModelCatalog` returns, so that named mixes can be plugged
in without touching the routes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from data_plane.server.control_plane_client import Authorization, ControlPlaneClient, ControlPlaneError
from data_plane.server.errors import (
    MissingCredentials,
    ModelNotFound,
    mix_member_not_found,
    names_other_base_model,
    names_unknown,
)
from data_plane.server.generation import Chunk, GenerationService, WorkerState
from data_plane.server.metrics import WorkerMetrics
from data_plane.server.openai_http.chat_template import ChatTemplate, ChatTemplateError
from data_plane.server.openai_http.errors import HttpError, MixMemberNotFound, ModelPartNotFound, http_error
from data_plane.server.openai_http.openai_objects import Reply
from data_plane.server.openai_http.schemas import (
    MAX_BODY_BYTES,
    Body,
    BodyError,
    openai_field_error,
    parse_chat,
    parse_completion,
    to_generate_request,
)
from data_plane.server.openai_http.streaming import GenerationResponse
from data_plane.server.validation import RequestFieldError, ValidRequest, check_request
from openlora.names import ADAPTER_NAME_RULE, is_adapter_name

MAX_MODELS_PAGE = 1000
# A request's whole body must arrive within this long once its headers have (server.HEADER_TIMEOUT_S
# bounds the headers only): past it the answer is 408 and the connection is closed, before any key check
# reaches the control plane and with nothing billed.
BODY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModelCard:
    """One entry of /v1/models."""

    id: str
    owned_by: str
    parent: str | None  # the base model, for an adapter or a mix
    created: int = 0  # Unix seconds


# (model, base model name) -> the adapter name the request names ("" for the base model). A named mix
# is called like an adapter, so a resolver that knows mixes returns its name and Authorize resolves it.
ModelResolver = Callable[[str, str], str]
# (api key, its authorisation) -> the adapters and mixes the key may use (the base model is added).
ModelCatalog = Callable[[str, Authorization], Awaitable[list[ModelCard]]]


def resolve_model(model: str, base_model: str) -> str:
    """The default resolver: the base model's name, or an adapter's."""
    return "" if model == base_model else model


async def no_adapters(api_key: str, auth: Authorization) -> list[ModelCard]:
    """The default catalog: nothing beyond the base model."""
    return []


def control_plane_catalog(control_plane: ControlPlaneClient, base_model: str) -> ModelCatalog:
    """The catalog of the key's adapters and saved mixes on `base_model` as the control plane lists
    them (ListModels), each with its owner's tenant name and the base model as `parent`. One named as
    the base model is left out: `model` of that name is the base model."""

    async def catalog(api_key: str, auth: Authorization) -> list[ModelCard]:
        listed = await control_plane.list_models(api_key, base_model)
        return [
            ModelCard(m.name, m.owned_by, base_model, m.created_unix_s)
            for m in listed
            if m.name != base_model
        ]

    return catalog


@dataclass
class OpenAIApi:
    """What the routes need: the shared generate path and this worker's model."""

    service: GenerationService
    metrics: WorkerMetrics
    state: WorkerState
    chat_template: ChatTemplate | None
    resolve_model: ModelResolver = resolve_model
    list_models: ModelCatalog = no_adapters
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S
    created: int = 0  # when the base model was loaded (Unix seconds)


def build_app(api: OpenAIApi, metrics: bool = False) -> Starlette:
    """The Starlette app of the API (serve it with `HttpServer`). `metrics`: also serve GET /metrics, which
    needs no key and names the adapters running and waiting (private ones too), for a listener that only
    the operator's network reaches."""
    routes = [
        Route("/v1/models", _models, methods=["GET"]),
        Route("/v1/models/{model:path}", _model, methods=["GET"]),
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/chat/completions", _chat_completions, methods=["POST"]),
    ]
    if metrics:
        routes.append(Route("/metrics", _metrics, methods=["GET"]))
    app = Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal_error},
    )
    app.router.redirect_slashes = False  # `/v1/completions/` is a 404 naming it, not a redirect
    app.state.api = api
    # The threads bodies are parsed on; anyio binds a limiter to the loop that first waits on it, the app's.
    app.state.parse_limiter = anyio.CapacityLimiter(_PARSE_THREADS)
    app.state.body_gates = _BodyGates(MAX_BODIES_PER_TENANT, MAX_PARSES_PER_TENANT)
    return app


class _BodyGates:
    """Per tenant: at most `reading` requests read and parse their bodies at once (the tenant's others
    wait with their bodies unread, in the socket, not in memory), and at most `parsing` of them are
    parsed at once, so that one tenant never holds every parsing thread. Without them one tenant's
    flood of 4 MiB bodies was buffered whole in front of the two parsing threads (150 of them took the
    worker from 1.1 to 2.9 GB), and every other tenant's request queued behind all of its parses (13 s
    for a one-line completion behind 30 of them)."""

    def __init__(self, reading: int, parsing: int) -> None:
        self._reading = reading
        self._parsing = parsing
        self._gates: dict[str, tuple[anyio.Semaphore, anyio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, tenant_id: str):
        """The tenant's turn to read a body; yields its parse gate (hold it while parsing)."""
        entry = self._gates.get(tenant_id)
        if entry is None:
            entry = (anyio.Semaphore(self._reading), anyio.Semaphore(self._parsing), [0])
            self._gates[tenant_id] = entry
        reading, parsing, users = entry
        users[0] += 1
        try:
            async with reading:
                yield parsing
        finally:
            users[0] -= 1
            if not users[0]:
                del self._gates[tenant_id]


async def _completions(request: Request):
    return await _generation(request, chat=False)


async def _chat_completions(request: Request):
    return await _generation(request, chat=True)


async def _generation(request: Request, chat: bool):
    api: OpenAIApi = request.app.state.api
    request_id = ""
    try:
        api.service.check_serving()
        api_key = _bearer_key(request)
        # before the body: a stranger's is never read or parsed
        tenant_id = await api.service.authenticate(api_key)
        request_id = _request_id(request)
    except Exception as error:
        # The body is left unread: the connection closes, so its bytes are never read as a next request.
        return _refused(api, http_error(error), {"Connection": "close"})
    async with request.app.state.body_gates.turn(tenant_id) as parse_gate:
        return await _generation_body(request, api, chat, api_key, request_id, parse_gate)


async def _generation_body(
    request: Request, api: OpenAIApi, chat: bool, api_key: str, request_id: str, parse_gate: anyio.Semaphore
):
    """`_generation` from the body on, within its tenant's turn to read and parse a body (the response
    it returns runs after the turn)."""
    unsupported = _unsupported_body(request.headers)
    if unsupported is not None:
        failure = HttpError(415, unsupported, None, "invalid_argument")
        return _refused(api, failure, {"Connection": "close"})  # the body is left unread
    try:
        data = await _read_body(request, api.max_body_bytes, api.body_timeout_s)
    except _TooLarge as refusal:
        failure = HttpError(
            413, f"the body is larger than {api.max_body_bytes} bytes", None, "invalid_argument"
        )
        # A client waiting for `100 Continue` sends no body after a final answer, or sends it anyway:
        # kept open, the connection would read its next request as the refused body's bytes.
        awaited = request.headers.get("expect", "").lower() == "100-continue"
        return _refused(api, failure, {"Connection": "close"} if refusal.unread and awaited else None)
    except _TooSlow:
        failure = HttpError(
            408, f"the body did not arrive within {api.body_timeout_s:g} s", None, "deadline_exceeded"
        )
        return _refused(api, failure, {"Connection": "close"})
    except ClientDisconnect:  # the client left mid-body: no answer reaches it, and no fault of the worker's
        api.metrics.requests.labels("CANCELLED").inc()
        return Response(status_code=499)
    except Exception as error:
        return _refused(api, http_error(error))

    body: Body | None = None
    refused: BodyError | None = None
    try:
        # Off the event loop (the gRPC server shares it), a few bodies at a time.
        parse = parse_chat if chat else parse_completion
        limit = api.service.limits.max_tokens_limit
        async with parse_gate:
            body = await anyio.to_thread.run_sync(parse, data, limit, limiter=request.app.state.parse_limiter)
    except BodyError as error:
        refused = error
    # The names to authorise, as gRPC's requested_adapter_names: the adapter `model` names, the mix's (a
    # name no adapter can have is left out, and refused by check_request naming its field).
    if body is not None and body.mix:  # a member is resolved as `model` is: the base model's name is the base
        mix = tuple((api.resolve_model(name, api.service.base_model), weight) for name, weight in body.mix)
        body = dataclasses.replace(body, mix=mix)
    adapter = api.resolve_model(body.model, api.service.base_model) if body else ""
    mentioned = ([adapter] if adapter else []) + (list(body.adapter_names) if body else [])
    names = tuple(dict.fromkeys(name for name in mentioned if is_adapter_name(name)))

    def check() -> ValidRequest:
        if refused is not None or body is None:
            raise refused or BodyError(None, "the body is not valid")
        prompt = _render_chat(api.chat_template, body) if chat else body.prompt
        generate_request = to_generate_request(body, prompt, request_id, adapter)
        try:
            valid = check_request(generate_request, api.service.limits)
        except BodyError:
            raise
        except RequestFieldError as error:
            _raise_if_unknown_name(error, body)
            raise openai_field_error(error, chat) from None
        if body.max_tokens is not None:  # OpenAI's contract: refused when the prompt leaves no room for it
            valid = dataclasses.replace(valid, max_tokens_field=body.max_tokens_name)
        # The template wrote the special tokens (BOS) of a chat: the tokenizer adds none.
        return dataclasses.replace(valid, add_special_tokens=False) if chat else valid

    api.state.enter()

    def done(code: str) -> None:
        api.metrics.requests.labels(code).inc()
        api.state.leave()

    tokenizer = api.service.tokenizer
    return GenerationResponse(
        lambda: _named_by_body(
            api.service.generate(api_key, names, check, whole=not (body and body.stream)), body, adapter
        ),
        Reply(chat=chat, model=body.model if body else ""),
        stream=bool(body and body.stream),
        include_usage=bool(body and body.include_usage),
        logprobs=bool(body and body.logprobs),
        spell_token=(
            # A special token (the end token) spelled as its text, as vLLM and OpenAI spell it.
            (lambda t: (tokenizer.decode([t], skip_special_tokens=False), tokenizer.token_bytes(t)))
            if tokenizer is not None
            else (lambda t: (str(t), str(t).encode()))
        ),
        on_done=done,
        request_id=request_id,
    )


async def _named_by_body(
    chunks: AsyncIterator[Chunk], body: Body | None, adapter: str
) -> AsyncIterator[Chunk]:
    """`chunks`, with the control plane's NOT_FOUND for a name the body sent raised as the body names it:
    ModelNotFound for `model`, MixMemberNotFound for `mix[i].adapter`, ModelPartNotFound for an adapter
    of the saved mix `model` names (each answered param null, in the control plane's words); and its
    FAILED_PRECONDITION for an adapter made for another base model naming the field that sent it,
    `mix[i].adapter` or `model`."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        except ControlPlaneError as error:
            if body is not None and error.code == grpc.StatusCode.FAILED_PRECONDITION:
                # a mix member made for another base model, named as the body names it
                member = mix_member_not_found(error, [name for name, _ in body.mix])
                if member is None and names_other_base_model(error.message, adapter):
                    member = ControlPlaneError(error.code, error.message, "adapter")  # `model`
                raise member or error from None
            if error.code != grpc.StatusCode.NOT_FOUND or body is None:
                raise
            if names_unknown(error.message, adapter):
                raise ModelNotFound(body.model) from None
            for index, (name, _) in enumerate(body.mix):
                if names_unknown(error.message, name):
                    raise MixMemberNotFound(index, name) from None
            if body.model:  # the body named no such adapter: one the saved mix `model` resolved to
                raise ModelPartNotFound(body.model, error.message) from None
            raise


def _raise_if_unknown_name(error: RequestFieldError, body: Body) -> None:
    """A `model` or mix member that no adapter's name can spell (`org/model`, `gpt-4o:latest`) is an
    unknown model, 404 as for any name nobody may use, not a 400 about the name's characters."""
    if error.reason != ADAPTER_NAME_RULE:
        return
    if error.field == "adapter":
        raise ModelNotFound(body.model) from None
    member = re.fullmatch(r"mix\[(\d+)\]\.adapter", error.field)
    if member is not None:
        index = int(member[1])
        raise MixMemberNotFound(index, body.mix[index][0]) from None


def _refused(api: OpenAIApi, failure: HttpError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A call answered before it reached the generate path, counted as gRPC counts it."""
    api.metrics.requests.labels(failure.code.upper()).inc()
    return failure.response(headers)


async def _cards(request: Request, api: OpenAIApi) -> list[ModelCard]:
    """Every model the request's key may use: the base model first, then its adapters and mixes by id."""
    api.service.check_serving()
    api_key = _bearer_key(request)
    auth = await api.service.authorize(api_key, ())
    base = api.service.base_model
    cards = [ModelCard(base, "openlora", None, api.created)]
    return cards + sorted(await api.list_models(api_key, auth), key=lambda c: c.id)


def _model_object(card: ModelCard) -> dict:
    return {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
        "parent": card.parent,
    }


async def _models(request: Request):
    """The base model and every adapter and mix the key may use, in pages as OpenAI's lists are
    (`limit`, `after`; `has_more`, `first_id`, `last_id`). Without `limit` the page holds every model
    after `after`: OpenAI's /v1/models is not paged, and its official clients (`models.list()`, a
    `SyncPage`) never ask for a next page, so a default page size cut their listing short without a word."""
    api: OpenAIApi = request.app.state.api
    try:
        cards = await _cards(request, api)
        limit = _query_int(request, "limit", None, 1, MAX_MODELS_PAGE)
        after = _query_param(request, "after")
    except Exception as error:
        return http_error(error).response()
    if after is not None:
        if not after:
            return HttpError(400, "after must name a model id", "after", "invalid_argument").response()
        # A keyset cursor: the models listed after that id (the base model first, the rest by id), whether
        # or not it still exists (a model deleted or hidden between two pages cut the listing short).
        cards = cards[1:] if after == cards[0].id else [c for c in cards[1:] if c.id > after]
    if limit is None:
        limit = len(cards)
    page = cards[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": [_model_object(c) for c in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(cards) > limit,
        }
    )


async def _model(request: Request):
    """GET /v1/models/{model} (OpenAI's `models.retrieve`): the model object, or 404 `model_not_found` for
    an id the key may not use (another tenant's private adapter looks the same as none)."""
    api: OpenAIApi = request.app.state.api
    model = request.path_params["model"]
    try:
        cards = await _cards(request, api)
    except Exception as error:
        return http_error(error).response()
    for card in cards:
        if card.id == model:
            return JSONResponse(_model_object(card))
    return http_error(ModelNotFound(model)).response()


async def _metrics(request: Request):
    api: OpenAIApi = request.app.state.api
    return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _not_found(request: Request, exc) -> JSONResponse:
    path = request.url.path
    message = f"no route {path}"
    # A client whose base URL left out /v1 (`OpenAI(base_url="http://host:8000")`) asks for /completions.
    if not path.startswith("/v1/") and any(
        route.matches({**request.scope, "path": "/v1" + path})[0] is not Match.NONE
        for route in request.app.router.routes
    ):
        message += f"; the API's routes are under /v1 (/v1{path}): end the client's base URL with /v1"
    return HttpError(404, message, None, "not_found").response()


async def _internal_error(request: Request, exc) -> JSONResponse:
    """An exception no route handled: OpenAI's error body with 500 (Starlette's server-error middleware
    still logs the traceback), never a plain-text page."""
    return HttpError(500, "internal error", None, "internal").response()


async def _not_allowed(request: Request, exc) -> JSONResponse:
    """405 with the route's `Allow` header (RFC 9110 requires it; Starlette's exception carries it)."""
    allow = {  # Starlette joins a set of methods: sorted here, so the header is the same on every run
        k: ", ".join(sorted({m.strip() for m in v.split(",") if m.strip()}))
        for k, v in (getattr(exc, "headers", None) or {}).items()
        if k.lower() == "allow"
    }
    return HttpError(
        405, f"{request.method} is not allowed on {request.url.path}", None, "not_allowed"
    ).response(allow)


class _TooLarge(Exception):
    def __init__(self, unread: bool) -> None:
        super().__init__()
        self.unread = unread  # refused by its declared length, before any of it was read


class _TooSlow(Exception):
    pass


_PARSE_THREADS = 2  # bodies parsed at once, off the event loop
MAX_BODIES_PER_TENANT = 4  # bodies one tenant's requests read and parse at once
MAX_PARSES_PER_TENANT = 1  # of them parsed at once: one tenant never holds every parsing thread


def _unsupported_body(headers) -> str | None:
    """Why a body cannot be read as this API's JSON, from its headers alone (a 415), or None."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # read as JSON, a compressed body was "not UTF-8 text"
        return f"Content-Encoding {encoding[:100]!r} is not supported: send the body uncompressed"
    media_type = headers.get("content-type")
    if media_type is not None and not is_json_media_type(media_type):
        return f"Content-Type {media_type[:100]!r} is not supported: send the body as application/json"
    return None


def is_json_media_type(value: str) -> bool:
    """True for a Content-Type of JSON: `application/json` or a `+json` subtype (`application/merge-patch+json`),
    any case, its parameters (`charset=utf-8`) ignored. A form (what `curl -d` sends by default) or text is
    not: a body is read as JSON only when its sender said it was, as OpenAI's API and FastAPI-based servers
    read it."""
    media = value.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or (subtype.endswith("+json") and len(subtype) > 5))


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, refused (without reading it) when its declared length is over `max_bytes`, or when it
    has not all arrived within `timeout_s` (a client that declares a length and stops held the
    connection, and the call, forever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _TooLarge(unread=True)
    data = bytearray()
    with anyio.move_on_after(timeout_s) as deadline:
        async for part in request.stream():
            data += part
            if len(data) > max_bytes:
                raise _TooLarge(unread=False)
    if deadline.cancelled_caught:
        raise _TooSlow()
    return bytes(data)


def _bearer_key(request: Request) -> str:
    """The key of `Authorization: Bearer <key>` (the scheme case-insensitive). A request that names two
    keys, or frames its body two ways (Content-Length and Transfer-Encoding, which a proxy in front may
    read otherwise than this server: request smuggling), is refused."""
    if len(request.headers.getlist("authorization")) > 1:
        raise BodyError(None, "the Authorization header is given more than once")
    if "transfer-encoding" in request.headers and "content-length" in request.headers:
        raise BodyError(None, "a request may carry Content-Length or Transfer-Encoding, not both")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MissingCredentials()
    return token.strip()


def _request_id(request: Request) -> str:
    """`X-Request-Id` as the text its bytes spell in UTF-8 (as gRPC carries a request id), so that one id
    is one idempotency key over both protocols and is echoed as sent (the ASGI server hands header values
    over decoded as latin-1: "ñ" became "Ã±", a second key). Given twice, or not UTF-8, it is refused: a
    proxy in front may read the other copy."""
    values = request.headers.getlist("x-request-id")
    if len(values) > 1:
        raise BodyError("X-Request-Id", "is given more than once")
    if not values:
        return ""
    try:
        return values[0].encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BodyError("X-Request-Id", "must be UTF-8 text") from None


def _render_chat(template: ChatTemplate | None, body: Body) -> str:
    if template is None:
        raise BodyError(
            "messages",
            "cannot be used: this model has no chat template; use /v1/completions with a prompt (a list of "
            "token ids where the model has no tokenizer either)",
        )
    try:
        return template.render(
            list(body.messages), add_generation_prompt=True, variables=dict(body.template_kwargs)
        )
    except ChatTemplateError as error:
        raise BodyError(error.field, str(error)) from None


def _query_param(request: Request, name: str) -> str | None:
    """A query parameter's value (None when absent). Given twice it is refused, as a body's duplicate key
    is: `?limit=1&limit=2` was served with the last, silently. A value whose percent-escapes do not spell
    UTF-8 is refused: decoded with replacement (as Starlette does), `?after=%ff` read as U+FFFD and listed
    an empty page."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise BodyError(name, "is given more than once")
    if not values:
        return None
    if "\ufffd" in values[0]:
        raw = request.scope.get("query_string", b"").decode("latin-1")
        for key, value in urllib.parse.parse_qsl(raw, keep_blank_values=True, encoding="latin-1"):
            if key.encode("latin-1").decode("utf-8", "replace") != name:
                continue
            try:
                value.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise BodyError(name, "must be UTF-8 text (percent-escapes of UTF-8 bytes)") from None
    return values[0]


def _query_int(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    text = _query_param(request, name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:  # int() takes "²" and "١"
        raise BodyError(name, f"must be an integer in [{lo}, {hi}]")
    return int(text)
