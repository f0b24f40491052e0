"""One tenant's bodies never take the parsing threads, or the worker's memory, from the others: a tenant
reads at most MAX_BODIES_PER_TENANT bodies at once (the rest wait unread) and parses one at a time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from data_plane.server.openai_http import app as app_module

HELD = b'"user":"hold"'


def test_one_tenants_slow_bodies_neither_queue_another_tenant_nor_all_get_buffered(
    system, http_worker, monkeypatch
):
    """Tenant A sends 10 bodies whose parse does not end until released (as a 4 MiB body of a million
    values takes about a second each); tenant B's one-line completion is answered meanwhile, at most
    one of A's bodies is parsed at a time and at most MAX_BODIES_PER_TENANT of them have been read.
    Before, A's bodies were all read into memory and held both parsing threads, and B waited for them."""
    a_key, b_key = system.new_tenant()[2], system.new_tenant()[2]
    release = threading.Event()
    lock = threading.Lock()
    counts = {"parsing": 0, "most_parsing": 0, "read": 0}
    parse, read_body = app_module.parse_completion, app_module._read_body

    def held_parse(data, *args):
        if HELD not in data:
            return parse(data, *args)
        with lock:
            counts["parsing"] += 1
            counts["most_parsing"] = max(counts["most_parsing"], counts["parsing"])
        try:
            release.wait(30)
            return parse(data, *args)
        finally:
            with lock:
                counts["parsing"] -= 1

    async def counted_read(request, *args):
        data = await read_body(request, *args)
        if HELD in data:
            counts["read"] += 1
        return data

    monkeypatch.setattr(app_module, "parse_completion", held_parse)
    monkeypatch.setattr(app_module, "_read_body", counted_read)

    def complete(key: str, held: bool, timeout: float) -> int:
        body = '{"model":"tiny","prompt":"the quick brown fox","max_tokens":1' + (
            ',"user":"hold"}' if held else "}"
        )
        return httpx.post(
            f"{http_worker.base_url}/completions",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=timeout,
        ).status_code

    assert complete(a_key, False, 30) == 200 and complete(b_key, False, 30) == 200  # keys known
    with ThreadPoolExecutor(10) as pool:
        held = [pool.submit(complete, a_key, True, 60) for _ in range(10)]
        try:
            deadline = time.monotonic() + 20
            while counts["parsing"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # room for more of A's bodies to be read and parsed, were they let in
            assert counts["parsing"] >= 1
            assert complete(b_key, False, 10) == 200  # not behind A's parses
            assert counts["most_parsing"] == 1
            assert counts["read"] <= getattr(app_module, "MAX_BODIES_PER_TENANT", 4)
        finally:
            release.set()
        assert [f.result() for f in held] == [200] * 10
