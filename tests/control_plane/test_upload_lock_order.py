"""Uploads and deletes that change which content a tenant's adapters serve lock those contents in one
order, whatever another upload of the same name committed meanwhile: one tenant swapping the contents
of two adapters, with a retried push of one of them in flight, never deadlocks (PostgreSQL then aborted
one of the uploads, answered UNAVAILABLE)."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import text

BASE = "tiny-llama"


def _advisory_lock_waiters(cp) -> int:
    with cp.running.app.sessions.begin() as s:
        return s.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )


def _wait_for_waiters(cp, num_waiters: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _advisory_lock_waiters(cp) < num_waiters:
        assert time.monotonic() < deadline, "no upload ever waited for a lock"
        time.sleep(0.05)


def test_an_upload_whose_name_was_replaced_while_it_waited_never_deadlocks_a_swap(cp, adapters_root) -> None:
    """A (content hi) is replaced by lo while a second push of A (hi, the content it saw) waits; then B
    (lo) is replaced by hi. The second push of A found A serving lo once it got its locks and took lo's
    lock after hi's, while B's upload held lo and waited for hi: a deadlock."""
    tenant = f"swap{uuid.uuid4().hex[:8]}"
    with cp.admin() as admin:
        admin.create_tenant(tenant)
        shas = {
            d: admin.upload_adapter(adapters_root / d, f"probe-{d}", BASE, tenant=tenant).adapter.sha256
            for d in ("a", "b")
        }
        lo, hi = sorted(shas, key=shas.get)  # fixture directories by the order their contents lock in
        admin.upload_adapter(adapters_root / hi, "A", BASE, tenant=tenant)
        admin.upload_adapter(adapters_root / lo, "B", BASE, tenant=tenant)

    results: dict[str, object] = {}
    threads: dict[str, threading.Thread] = {}

    def push(label: str, name: str, directory: str) -> None:
        def run() -> None:
            try:
                with cp.admin() as admin:
                    results[label] = admin.upload_adapter(
                        adapters_root / directory, name, BASE, tenant=tenant
                    )
            except Exception as error:  # the outcome is asserted below
                results[label] = error

        threads[label] = threading.Thread(target=run)
        threads[label].start()

    first_published = threading.Event()

    def hook(stage: str, plan, sha256: str) -> None:
        if stage != "published" or plan.header.tenant != tenant:
            return
        if plan.header.name == "A" and sha256 == shas[lo]:  # the replacement of A, holding both contents
            first_published.set()
            _wait_for_waiters(cp, 1)  # the second push of A waits for it
        elif plan.header.name == "A" and sha256 == shas[hi]:  # the second push of A, past its first locks
            push("B", "B", hi)
            _wait_for_waiters(cp, 1)  # B's replacement waits for this push

    app = cp.running.app
    app.upload_stage_hook = hook
    try:
        push("A1", "A", lo)
        assert first_published.wait(30)
        push("A2", "A", hi)
        deadline = time.monotonic() + 60
        while len(results) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        app.upload_stage_hook = None
    for thread in threads.values():
        thread.join(60)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert set(results) == {"A1", "A2", "B"}
    with cp.admin() as admin:
        assert admin.get_adapter("A", tenant=tenant).sha256 == shas[hi]
        assert admin.get_adapter("B", tenant=tenant).sha256 == shas[hi]
