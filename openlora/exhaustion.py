"""Errors that say a process ran out of a resource (open files, memory, disk space, threads) rather than
that its input was bad or its code is wrong. Under a burst they are passing overload: both servers answer
them UNAVAILABLE with a message to retry, never INTERNAL, and never a refusal of the adapter being read.
"""

from __future__ import annotations

import errno
import os

# errno -> what ran out, in words for the caller's message.
_EXHAUSTED = {
    errno.EMFILE: "open files",
    errno.ENFILE: "open files",
    errno.ENOMEM: "memory",
    errno.ENOSPC: "disk space",
    errno.EDQUOT: "disk quota",
    errno.ENOBUFS: "buffer space",
}
# Libraries that wrap the OS error in a RuntimeError keep only its text (safetensors: "unable to open
# file <...>: Too many open files (24)"; threading: "can't start new thread"; torch's allocators:
# "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory").
_EXHAUSTED_TEXT = {os.strerror(code): what for code, what in _EXHAUSTED.items()} | {
    "can't start new thread": "threads",
    "out of memory": "memory",
    "can't allocate memory": "memory",
}


def exhausted_resource(error: BaseException) -> str | None:
    """What the process ran out of when `error`, or an error it was raised from, says so; else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return "memory"
        if isinstance(current, OSError) and current.errno in _EXHAUSTED:
            return _EXHAUSTED[current.errno]
        if isinstance(current, RuntimeError):
            text = str(current)
            for words, what in _EXHAUSTED_TEXT.items():
                if words in text:
                    return what
        current = current.__cause__
    return None
