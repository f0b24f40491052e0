"""A worker out of a resource under a burst (open files, memory, threads) answers UNAVAILABLE with a message
to retry, whatever layer met it (artifact download, adapter read, the engine accepting a request): never
INTERNAL, and never a refusal of the adapter it was reading. A fault of its own stays INTERNAL."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import grpc
import pytest
import torch

from data_plane.adapters import peft_reader
from data_plane.engine.async_engine import AsyncEngine
from data_plane.engine.errors import AdapterLoadError, StepFailed
from data_plane.server.errors import status_for
from tests.engine import conftest as engine_fixtures
from tests.engine.conftest import greedy, make_engine

tiny_llama = engine_fixtures.tiny_llama

EMFILE = OSError(errno.EMFILE, "Too many open files")
# What safetensors raises when it cannot open a file: the OS error survives only as text.
SAFETENSORS_EMFILE = RuntimeError(
    "unable to open file </state/artifacts/ab/adapter_model.safetensors> in read-only mode: "
    "Too many open files (24)"
)


def _step_failed(cause: BaseException) -> StepFailed:
    error = StepFailed("the engine failed to accept this request")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "resource"),
    [
        (EMFILE, "open files"),
        (SAFETENSORS_EMFILE, "open files"),
        (_step_failed(EMFILE), "open files"),
        (_step_failed(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")), "memory"),
        (MemoryError(), "memory"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk space"),
    ],
)
def test_a_worker_out_of_a_resource_answers_unavailable_to_retry(error, resource):
    code, message = status_for(error)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert resource in message and "retry" in message


def test_a_fault_of_the_worker_itself_stays_internal():
    assert status_for(ValueError("a bug")) is None  # the servicer answers INTERNAL and logs it
    assert status_for(OSError(errno.EIO, "Input/output error")) is None
    code, _ = status_for(_step_failed(KeyError("slot")))
    assert code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("error", "raised"), [(EMFILE, OSError), (OSError(errno.ENOENT, "No such file"), AdapterLoadError)]
)
def test_an_adapter_read_out_of_open_files_is_not_a_refusal_of_the_adapter(monkeypatch, error, raised):
    def unreadable(*args, **kwargs):
        raise error

    monkeypatch.setattr(peft_reader, "validate_adapter_dir", unreadable)
    with pytest.raises(raised) as caught:
        peft_reader.read_peft_adapter(Path("adapter"), None, 16, torch.float32)
    if raised is OSError:
        assert caught.value is error  # passed on as is: the server answers it UNAVAILABLE


def test_a_request_the_engine_could_not_accept_for_lack_of_files_is_unavailable(tiny_llama, monkeypatch):
    """The engine thread's own checks of a request meet EMFILE: the request fails alone with StepFailed
    caused by it, which the server answers UNAVAILABLE (retry), not INTERNAL."""
    engine = make_engine(tiny_llama)
    real_add = engine.add_request

    def add_request(request):
        if request.request_id == "starved":
            raise OSError(errno.EMFILE, "Too many open files")
        return real_add(request)

    monkeypatch.setattr(engine, "add_request", add_request)

    async def main():
        running = AsyncEngine(engine=engine)
        await running.start()
        try:
            with pytest.raises(StepFailed) as failed:
                async for _ in running.generate(greedy("starved", [1, 2, 3])):
                    pass
            served = [out async for out in running.generate(greedy("fine", [1, 2, 3]))]
        finally:
            await running.stop()
        return failed.value, served

    failed, served = asyncio.run(main())
    code, message = status_for(failed)
    assert code == grpc.StatusCode.UNAVAILABLE and "open files" in message
    assert served[-1].finished
