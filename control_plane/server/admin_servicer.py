"""AdminService: each RPC converts the request, calls one ControlPlane method in a thread, converts back."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from control_plane.app import ControlPlane
from control_plane.errors import DeadlineExceeded, InvalidArgument
from control_plane.server import convert, mix_convert
from control_plane.server.auth import bearer_token
from openlora.v1 import admin_pb2, admin_pb2_grpc

# An upload stream that sends no message for this long is ended: an idle stream would otherwise keep its
# partial files (up to the maximum adapter size) and its tenant's upload slot for as long as it stays open.
UPLOAD_IDLE_TIMEOUT_S = 30.0
# And a whole upload may take UPLOAD_BASE_S plus its declared bytes at UPLOAD_MIN_BYTES_PER_S (512 MiB: 35
# minutes), so that a client trickling a byte now and then cannot hold its slot and files for ever either.
UPLOAD_BASE_S = 60.0
UPLOAD_MIN_BYTES_PER_S = 256 << 10
# Past UPLOAD_BASE_S an upload must also keep up an average of UPLOAD_MIN_PROGRESS_BYTES_PER_S since then
# (or have sent all it declared): a client declaring 512 MiB and trickling a byte every 20 s held its slot
# for the 35 minutes of the limit above, and a few such clients every slot.
UPLOAD_MIN_PROGRESS_BYTES_PER_S = 64 << 10
# How long the end of an upload's stream waits for the call's cancellation before it counts as a close.
END_OF_STREAM_GRACE_S = 0.05


def upload_time_limit_s(declared_bytes: int) -> float:
    return UPLOAD_BASE_S + declared_bytes / UPLOAD_MIN_BYTES_PER_S


def _check_progress(received: int, declared: int, elapsed_s: float) -> None:
    """DeadlineExceeded when an upload past UPLOAD_BASE_S has averaged less than the minimum rate since."""
    owed = (elapsed_s - UPLOAD_BASE_S) * UPLOAD_MIN_PROGRESS_BYTES_PER_S
    if elapsed_s > UPLOAD_BASE_S and received < min(declared, owed):
        raise DeadlineExceeded(
            f"the upload sent {received} bytes in {elapsed_s:.0f} s, slower than "
            f"{UPLOAD_MIN_PROGRESS_BYTES_PER_S >> 10} KiB/s after its first {UPLOAD_BASE_S:g} s; the upload "
            "was ended and its partial files removed"
        )


async def _next_upload_message(messages, deadline: float | None = None, limit_s: float = 0.0):
    """The stream's next message, None at its end; DeadlineExceeded when none came within the idle limit,
    or the upload's `deadline` (loop time, allowed `limit_s` in all) passed."""
    loop = asyncio.get_running_loop()
    idle_s = UPLOAD_IDLE_TIMEOUT_S
    timeout_s = idle_s if deadline is None else min(idle_s, deadline - loop.time())
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            return await messages.__anext__()
    except StopAsyncIteration:
        return None
    except TimeoutError:
        if deadline is not None and loop.time() >= deadline:
            raise DeadlineExceeded(
                f"the upload took more than {limit_s:.0f} s, the most one of its size may take ({UPLOAD_BASE_S:g} "
                f"s plus its bytes at {UPLOAD_MIN_BYTES_PER_S >> 10} KiB/s); the upload was ended and its partial "
                "files removed"
            ) from None
        raise DeadlineExceeded(
            f"no upload message arrived for {idle_s:g} s, the most an upload may stay idle; the upload "
            "was ended and its partial files removed: send the adapter again without pausing"
        ) from None


async def _check_stream_was_closed(context) -> None:
    """Returns when the upload's stream ended because the client closed its side (the upload is whole),
    raises when it ended because the call did: a client that cancels, or whose deadline passes, before
    closing its side ends the request stream as a close does, and grpc cancels this handler only a moment
    later (within a few ms, from its poller thread). So the stream's end is taken as a close only after
    END_OF_STREAM_GRACE_S without that cancellation (CancelledError from the sleep) or a passed deadline."""
    await asyncio.sleep(END_OF_STREAM_GRACE_S)
    if context.cancelled():
        raise asyncio.CancelledError
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(
            "the call's deadline passed before the upload stream was closed; nothing was stored"
        )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: ControlPlane) -> None:
        self.app = app

    async def CreateTenant(self, request, context):
        tenant = await asyncio.to_thread(self.app.create_tenant, bearer_token(context), request.name)
        return admin_pb2.CreateTenantResponse(tenant=convert.tenant_to_proto(tenant))

    async def CreateApiKey(self, request, context):
        scopes = convert.scopes_from_proto(request.scopes)
        key, tenant, secret = await asyncio.to_thread(
            self.app.create_api_key, bearer_token(context), request.tenant, scopes
        )
        return admin_pb2.CreateApiKeyResponse(key=convert.key_to_proto(key, tenant), secret=secret)

    async def RevokeApiKey(self, request, context):
        key, tenant = await asyncio.to_thread(self.app.revoke_api_key, bearer_token(context), request.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=convert.key_to_proto(key, tenant))

    async def UploadAdapter(self, request_iterator, context):
        """Header first, then chunks written to a temporary directory as they arrive; validated, published
        and registered only once the stream ended whole. A tenant has at most
        MAX_UPLOADS_IN_FLIGHT_PER_TENANT uploads open at once (RESOURCE_EXHAUSTED past it); a stream that
        sends nothing for UPLOAD_IDLE_TIMEOUT_S, or runs past `upload_time_limit_s` of its declared size,
        is ended with DEADLINE_EXCEEDED, its files removed."""
        messages = request_iterator.__aiter__()
        first = await _next_upload_message(messages)
        if first is None:
            raise InvalidArgument("the stream is empty; send a header first", field="header")
        if not first.HasField("header"):
            raise InvalidArgument("the first message must be the header", field="header")
        header = convert.upload_header_from_proto(first.header)
        plan = await asyncio.to_thread(self.app.prepare_upload, bearer_token(context), header)
        upload = self.app.begin_upload(plan)
        declared = sum(entry.size_bytes for entry in header.files)
        limit_s = upload_time_limit_s(declared)
        started = asyncio.get_running_loop().time()
        deadline = started + limit_s
        received = 0
        try:
            while (message := await _next_upload_message(messages, deadline, limit_s)) is not None:
                if not message.HasField("chunk"):
                    raise InvalidArgument("only the first message may be a header", field="header")
                chunk = message.chunk
                upload.write(chunk.filename, chunk.offset, chunk.data)
                received += len(chunk.data)
                _check_progress(received, declared, asyncio.get_running_loop().time() - started)
            await _check_stream_was_closed(context)
            cancelled = threading.Event()
            completing = asyncio.ensure_future(
                asyncio.to_thread(self.app.complete_upload, plan, upload, abandoned=cancelled.is_set)
            )
            try:
                result = await asyncio.shield(completing)
            except asyncio.CancelledError:
                # The client went away while the files are validated and published on a thread, which runs
                # on: it stores nothing unless it had already got to its commit, and the files and the slot
                # are released (below) only once it is done with them.
                cancelled.set()
                with contextlib.suppress(Exception):
                    await completing
                raise
        finally:
            # Every exit (done, refused, failed, cancelled by the client, idle) frees the files and the slot.
            self.app.end_upload(plan, upload)
        return admin_pb2.UploadAdapterResponse(
            adapter=convert.adapter_to_proto(result.adapter), deduplicated=result.deduplicated
        )

    async def GetAdapter(self, request, context):
        owned = await asyncio.to_thread(
            self.app.get_adapter, bearer_token(context), request.name, request.tenant
        )
        return admin_pb2.GetAdapterResponse(adapter=convert.adapter_to_proto(owned))

    async def ListAdapters(self, request, context):
        page = await asyncio.to_thread(
            self.app.list_adapters,
            bearer_token(context),
            request.tenant,
            request.page_size,
            request.page_token,
            request.include_public,
        )
        return admin_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_to_proto(a) for a in page.adapters],
            next_page_token=page.next_page_token,
        )

    async def DeleteAdapter(self, request, context):
        owned = await asyncio.to_thread(
            self.app.delete_adapter, bearer_token(context), request.name, request.tenant
        )
        return admin_pb2.DeleteAdapterResponse(adapter=convert.adapter_to_proto(owned))

    async def ListWorkers(self, request, context):
        found = await asyncio.to_thread(self.app.list_workers, bearer_token(context))
        return admin_pb2.ListWorkersResponse(workers=[convert.worker_to_proto(w) for w in found])

    async def GetUsage(self, request, context):
        start = convert.from_timestamp(request.start, "start") if request.HasField("start") else None
        end = convert.from_timestamp(request.end, "end") if request.HasField("end") else None
        summary = await asyncio.to_thread(
            self.app.get_usage, bearer_token(context), request.tenant, start, end
        )
        return convert.usage_to_proto(summary)

    async def GetInvoice(self, request, context):
        invoice = await asyncio.to_thread(
            self.app.get_invoice, bearer_token(context), request.tenant, request.period
        )
        return admin_pb2.GetInvoiceResponse(invoice=convert.invoice_to_proto(invoice))

    async def SetPrice(self, request, context):
        await asyncio.to_thread(
            self.app.set_price,
            bearer_token(context),
            request.base_model,
            request.prompt_micros_per_million_tokens,
            request.completion_micros_per_million_tokens,
        )
        return admin_pb2.SetPriceResponse()

    async def CreateMix(self, request, context):
        spec = mix_convert.mix_spec_from_proto(request)
        owned = await asyncio.to_thread(self.app.create_mix, bearer_token(context), request.tenant, spec)
        return admin_pb2.CreateMixResponse(mix=mix_convert.mix_to_proto(owned))

    async def ListMixes(self, request, context):
        found = await asyncio.to_thread(self.app.list_mixes, bearer_token(context), request.tenant)
        return admin_pb2.ListMixesResponse(mixes=[mix_convert.mix_to_proto(m) for m in found])

    async def DeleteMix(self, request, context):
        owned = await asyncio.to_thread(
            self.app.delete_mix, bearer_token(context), request.name, request.tenant
        )
        return admin_pb2.DeleteMixResponse(mix=mix_convert.mix_to_proto(owned))
