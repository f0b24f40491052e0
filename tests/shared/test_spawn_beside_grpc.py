"""Spawning a child (with preexec_fn, a real fork) in a process that runs gRPC servers and channels must
not kill the child before it execs: every OpenLoRA process that starts children (`openlora up`, the embedded
servers, the test harness) also holds gRPC channels. grpcio's fork handlers made a few percent of such
spawns die with "epoll_wait: Bad file descriptor"; importing openlora turns them off before grpc loads."""

from __future__ import annotations

import subprocess
import sys

_SPAWN_BESIDE_GRPC = """
import {first}
import subprocess
from concurrent import futures

import grpc

server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{{port}}")
grpc.channel_ready_future(channel).result(timeout=10)
failed = 0
for _ in range({spawns}):
    child = subprocess.run(["/bin/true"], preexec_fn=lambda: None, capture_output=True)
    failed += child.returncode != 0
print(failed)
"""


def _failed_spawns(first_import: str, spawns: int) -> int:
    code = _SPAWN_BESIDE_GRPC.format(first=first_import, spawns=spawns)
    env = {"PATH": "/usr/bin:/bin"}  # no GRPC_ENABLE_FORK_SUPPORT from this process
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_children_spawned_beside_live_grpc_all_start():
    assert _failed_spawns("openlora", 300) == 0


def test_importing_openlora_keeps_an_operators_explicit_fork_setting():
    code = "import os; os.environ['GRPC_ENABLE_FORK_SUPPORT'] = 'true'; import openlora; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "true"
