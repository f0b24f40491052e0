"""OpenLoRA: serve thousands of LoRA adapters on one resident base model."""

import os

# gRPC's fork handlers break subprocess.Popen in a process that holds gRPC channels or servers: with
# preexec_fn (a real fork), the child's post-fork handler restarts gRPC's poller on an epoll descriptor that
# close_fds has closed, and the child dies before it can exec ("epoll_wait: Bad file descriptor"; grpcio
# issue 43055, a few percent of spawns here). OpenLoRA forks only to exec (embedded servers, `openlora up`'s
# children), never to run gRPC in a forked child, so the handlers are turned off before grpc is imported.
# Every entry point imports this package first; an operator's explicit setting is kept.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
