"""Open-loop replay of a trace against a running worker over gRPC (`openlora.v1.InferenceService`), or
over HTTP through its OpenAI-compatible API (`--transport http`: streamed `POST /v1/completions`, SSE).

Every request is sent at its trace arrival time whether or not earlier ones have finished, with the
trace's `prompt_token_ids`, greedy sampling and its fixed `max_tokens`. Per request it records TTFT and
end-to-end latency (both from the scheduled arrival time, so a late client never hides queueing),
inter-token latencies (the gap between two streamed messages divided by the tokens of the later one),
tokens, the error code if any, and the server's `timing` (cache tier, queue time, adapter load time;
gRPC only: the OpenAI chunks carry no timing). Over HTTP a chunk does not say how many tokens it holds
(the worker puts what a lagging stream accumulated into one message), so each gap between two SSE chunks
is one inter-token sample, and the completion count comes from the last chunk's usage.

    python -m benchmarks.load --trace trace.jsonl --target 127.0.0.1:50051 --api-key KEY --out load.json
    python -m benchmarks.load --trace trace.jsonl --transport http --target http://127.0.0.1:8000/v1 \
        --base-model NAME --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.trace import TraceRequest, read_trace

PERCENTILES = (50, 90, 99)
# The error of an HTTP stream that ended without its last event (`data: [DONE]`).
INCOMPLETE_STREAM = "INCOMPLETE_STREAM"


@dataclass
class RequestRecord:
    index: int
    adapter: str
    scheduled_s: float
    max_tokens: int
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""
    # Lower-case tier name without the prefix ("device", "host", "disk", "remote", "none"); "" if unknown.
    cache_tier: str = ""
    server_ttft_ms: float | None = None
    queue_ms: float | None = None
    adapter_load_ms: float | None = None
    # gRPC status code name (e.g. "RESOURCE_EXHAUSTED") or exception type; None when it succeeded.
    error: str | None = None
    error_detail: str = ""
    # How late the client sent it compared with the trace (client overload shows here).
    send_lag_ms: float = 0.0


def percentiles(values: Sequence[float], points: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """{"p50": ..., ...} by linear interpolation between closest ranks; None for an empty sample."""
    if len(values) == 0:
        return {f"p{p}": None for p in points}
    array = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(array, p)) for p in points}


def summarize(records: Sequence[RequestRecord], started_s: float, finished_s: float) -> dict:
    """Aggregate figures of one replay; `started_s`/`finished_s` bound the measured window (seconds)."""
    ok = [r for r in records if r.error is None]
    duration_s = max(finished_s - started_s, 1e-9)
    tokens = sum(r.completion_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    by_tier: dict[str, dict] = {}
    for tier in sorted({r.cache_tier for r in ok}):
        tier_ttft = [r.ttft_ms for r in ok if r.cache_tier == tier and r.ttft_ms is not None]
        by_tier[tier or "unknown"] = {"requests": len(tier_ttft), "ttft_ms": percentiles(tier_ttft)}
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "duration_s": duration_s,
        "completion_tokens": tokens,
        "requested_tokens": sum(r.max_tokens for r in records),
        "tokens_per_s": tokens / duration_s,
        "requests_per_s": len(ok) / duration_s,
        "ttft_ms": percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itl_ms]),
        "e2e_ms": percentiles([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        "send_lag_ms": percentiles([r.send_lag_ms for r in records]),
        "by_cache_tier": by_tier,
        "distinct_adapters": len({r.adapter for r in records if r.adapter}),
    }


def _tier_name(value: int) -> str:
    from openlora.v1 import inference_pb2

    name = inference_pb2.CacheTier.Name(value) if value in inference_pb2.CacheTier.values() else str(value)
    return name.removeprefix("CACHE_TIER_").lower()


async def _send_one(
    stub, request: TraceRequest, record: RequestRecord, t0: float, run_tag: str, metadata
) -> None:
    import grpc

    from openlora.v1 import inference_pb2

    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
    scheduled = t0 + request.arrival_s
    record.send_lag_ms = (time.perf_counter() - scheduled) * 1000.0
    message = inference_pb2.GenerateRequest(
        request_id=f"{run_tag}-{request.index}",
        adapter=request.adapter,
        prompt_token_ids=list(request.prompt_token_ids),
        sampling=inference_pb2.SamplingParams(temperature=0.0, max_tokens=request.max_tokens),
    )
    last_s = None
    try:
        async for response in stub.Generate(message, metadata=metadata):
            now = time.perf_counter()
            count = len(response.token_ids)
            if count:
                if last_s is None:
                    record.ttft_ms = (now - scheduled) * 1000.0
                else:
                    record.itl_ms.extend([(now - last_s) * 1000.0 / count] * count)
                last_s = now
                record.completion_tokens += count
            if response.HasField("timing"):
                timing = response.timing
                record.cache_tier = _tier_name(timing.cache_tier)
                record.server_ttft_ms = timing.ttft_ms
                record.queue_ms = timing.queue_ms
                record.adapter_load_ms = timing.adapter_load_ms
            if response.HasField("usage"):
                record.prompt_tokens = response.usage.prompt_tokens
                record.completion_tokens = max(record.completion_tokens, response.usage.completion_tokens)
            if response.finish_reason:
                record.finish_reason = inference_pb2.FinishReason.Name(response.finish_reason)
        record.e2e_ms = (time.perf_counter() - scheduled) * 1000.0
    except grpc.aio.AioRpcError as e:
        record.error = e.code().name
        record.error_detail = e.details() or ""
    except Exception as e:  # a benchmark records every failure instead of stopping the replay
        record.error = type(e).__name__
        record.error_detail = str(e)


async def _send_one_http(
    address: tuple[str, int, str],
    api_key: str,
    request: TraceRequest,
    record: RequestRecord,
    t0: float,
    run_tag: str,
    base_model: str,
) -> None:
    """One streamed `POST /v1/completions` (the trace's token ids as the prompt, greedy, its max_tokens) on
    its own connection, read with a minimal HTTP/1.1 client: a general-purpose one (httpx) costs the
    client several times the CPU per chunk of gRPC's C core, and client and server share the machine."""
    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
    scheduled = t0 + request.arrival_s
    record.send_lag_ms = (time.perf_counter() - scheduled) * 1000.0
    host, port, prefix = address
    body = json.dumps(
        {
            "model": request.adapter or base_model,
            "prompt": list(request.prompt_token_ids),
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST {prefix}/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
        f"X-Request-Id: {run_tag}-{request.index}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    last_s = None
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head.encode() + body)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            detail = await reader.read(int(headers.get("content-length", "0")) or -1)
            record.error = f"HTTP_{status}"
            record.error_detail = detail[:200].decode(errors="replace")
            return
        buffered, done = b"", False
        while size := int((await reader.readline()).strip() or b"0", 16):  # chunked transfer coding
            buffered += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in buffered:
                event, _, buffered = buffered.partition(b"\n\n")
                done = done or event == b"data: [DONE]"
                if not event.startswith(b"data: {"):
                    continue
                chunk = json.loads(event[len(b"data: ") :])
                if "error" in chunk:
                    record.error = str(chunk["error"].get("code") or "error")
                    record.error_detail = str(chunk["error"].get("message", ""))
                    return
                now = time.perf_counter()
                if chunk["choices"]:
                    if last_s is None:
                        record.ttft_ms = (now - scheduled) * 1000.0
                    else:
                        record.itl_ms.append((now - last_s) * 1000.0)
                    last_s = now
                    record.completion_tokens += 1
                    record.finish_reason = chunk["choices"][0]["finish_reason"] or record.finish_reason
                if chunk.get("usage"):
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    record.completion_tokens = chunk["usage"]["completion_tokens"]
        if not done:
            # A connection closed between two chunks reads as the end of the stream (readline gives b""):
            # without the worker's last event the request failed, as a cut gRPC stream fails (UNAVAILABLE).
            record.error = INCOMPLETE_STREAM
            record.error_detail = (
                f"the stream ended after {record.completion_tokens} tokens without data: [DONE]"
            )
            return
        record.e2e_ms = (time.perf_counter() - scheduled) * 1000.0
    except Exception as e:  # a benchmark records every failure instead of stopping the replay
        record.error = type(e).__name__
        record.error_detail = str(e)
    finally:
        if writer is not None:
            writer.close()


async def replay_http(
    requests: Sequence[TraceRequest],
    base_url: str,
    api_key: str,
    base_model: str,
    *,
    run_tag: str | None = None,
    time_scale: float = 1.0,
) -> tuple[list[RequestRecord], float, float]:
    """`replay` through the OpenAI-compatible API at `base_url` (`http://HOST:PORT/v1`); a trace request
    without an adapter names `base_model`. One connection per request, as HTTP/1.1 streams need."""
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    address = (url.hostname or "127.0.0.1", url.port or 80, url.path.rstrip("/"))
    run_tag = run_tag or uuid.uuid4().hex[:12]
    scaled = [
        TraceRequest(r.index, r.arrival_s * time_scale, r.adapter, r.prompt_token_ids, r.max_tokens)
        for r in requests
    ]
    records = [RequestRecord(r.index, r.adapter, r.arrival_s, r.max_tokens) for r in scaled]
    t0 = time.perf_counter() + 0.05
    await asyncio.gather(
        *(
            _send_one_http(address, api_key, r, rec, t0, run_tag, base_model)
            for r, rec in zip(scaled, records, strict=True)
        )
    )
    return records, t0, time.perf_counter()


async def replay(
    requests: Sequence[TraceRequest],
    target: str,
    api_key: str,
    *,
    run_tag: str | None = None,
    time_scale: float = 1.0,
) -> tuple[list[RequestRecord], float, float]:
    """Sends every request at t0 + arrival_s * time_scale; returns (records, t0, time of the last finish)."""
    import grpc

    from openlora.v1 import inference_pb2_grpc

    run_tag = run_tag or uuid.uuid4().hex[:12]
    metadata = (("authorization", f"Bearer {api_key}"),)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        scaled = [
            TraceRequest(r.index, r.arrival_s * time_scale, r.adapter, r.prompt_token_ids, r.max_tokens)
            for r in requests
        ]
        records = [RequestRecord(r.index, r.adapter, r.arrival_s, r.max_tokens) for r in scaled]
        t0 = time.perf_counter() + 0.05
        await asyncio.gather(
            *(_send_one(stub, r, rec, t0, run_tag, metadata) for r, rec in zip(scaled, records, strict=True))
        )
        finished = time.perf_counter()
    return records, t0, finished


def run_load(
    requests: Sequence[TraceRequest],
    target: str,
    api_key: str,
    *,
    run_tag: str | None = None,
    time_scale: float = 1.0,
    transport: str = "grpc",
    base_model: str = "",
) -> dict:
    """Replays and summarizes; the result holds "summary" and per-request "records". With transport
    "http", `target` is the OpenAI-compatible base URL and `base_model` the name the base model goes by."""
    if transport == "http":
        coro = replay_http(requests, target, api_key, base_model, run_tag=run_tag, time_scale=time_scale)
    else:
        coro = replay(requests, target, api_key, run_tag=run_tag, time_scale=time_scale)
    records, t0, finished = asyncio.run(coro)
    return {"summary": summarize(records, t0, finished), "records": [asdict(r) for r in records]}


def format_summary(summary: dict) -> str:
    def row(label: str, values: dict) -> str:
        cells = "  ".join(f"{k} {v:9.1f}" if v is not None else f"{k}       n/a" for k, v in values.items())
        return f"  {label:<12}{cells}"

    lines = [
        f"  {summary['completed']}/{summary['requests']} ok, {summary['errors']} errors {summary['errors_by_code'] or ''}",
        f"  {summary['completion_tokens']} tokens in {summary['duration_s']:.2f} s = "
        f"{summary['tokens_per_s']:.1f} tokens/s, {summary['requests_per_s']:.2f} requests/s",
        row("ttft ms", summary["ttft_ms"]),
        row("itl ms", summary["itl_ms"]),
        row("e2e ms", summary["e2e_ms"]),
    ]
    for tier, figures in summary["by_cache_tier"].items():
        lines.append(row(f"ttft {tier}", figures["ttft_ms"]) + f"  ({figures['requests']} requests)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--target", default=os.environ.get("OPENLORA_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--api-key", default=os.environ.get("OPENLORA_API_KEY", ""))
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply arrival times (0 = all at once)"
    )
    parser.add_argument("--transport", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--base-model", default="", help="http: the `model` of requests without an adapter")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    requests = read_trace(args.trace).requests
    result = run_load(
        requests,
        args.target,
        args.api_key,
        time_scale=args.time_scale,
        transport=args.transport,
        base_model=args.base_model,
    )
    print(format_summary(result["summary"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
