"""Test support shared by tests/worker and tests/e2e: a tiny Llama checkpoint with a real tokenizer and
PEFT adapters, an event loop in a thread for in-process servers, admin helpers, and servers started on
ports picked free (started again on others when a port was taken before it was bound)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc

from openlora.v1 import admin_pb2, admin_pb2_grpc

CORPUS = (
    "the quick brown fox jumps over the lazy dog. a tiny model serves many adapters at once. "
    "hello world, one two three four five six seven eight nine ten. "
) * 20
ADAPTER_NAMES = tuple(f"ad{i}" for i in range(8))


def write_tiny_model(out_dir: Path) -> Path:
    """A deterministic random Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer and no EOS
    (streams always run to max_tokens), plus eight PEFT adapters under out_dir/adapters/<name>/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS], trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper logits: greedy outputs far from ties
    model.save_pretrained(out_dir, safe_serialization=True)
    for i, name in enumerate(ADAPTER_NAMES):
        torch.manual_seed(100 + i)
        targets = ["q_proj", "v_proj", "down_proj"] if i % 2 else ["q_proj", "k_proj", "o_proj", "up_proj"]
        lora = LoraConfig(r=4 + 4 * (i % 2), lora_alpha=16, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(LlamaForCausalLM(config), lora)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.mul_(8.0)  # strong enough to change greedy outputs
        peft_model.save_pretrained(out_dir / "adapters" / name)
        (out_dir / "adapters" / name / "README.md").unlink(missing_ok=True)
    (out_dir / "model.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return out_dir


class LoopThread:
    """An asyncio loop in a daemon thread, so blocking tests can drive in-process async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Admin:
    """Blocking AdminService calls with one key."""

    def __init__(self, target: str, key: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self.stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self.metadata = (("authorization", f"Bearer {key}"),)

    def create_tenant(self, name: str) -> str:
        """Creates a tenant; returns its id."""
        return self.stub.CreateTenant(
            admin_pb2.CreateTenantRequest(name=name), metadata=self.metadata
        ).tenant.id

    def create_key(self, tenant: str, admin: bool = False) -> tuple[str, str]:
        scopes = [admin_pb2.SCOPE_INFER] + ([admin_pb2.SCOPE_ADMIN] if admin else [])
        response = self.stub.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=tenant, scopes=scopes), metadata=self.metadata
        )
        return response.key.id, response.secret

    def revoke_key(self, key_id: str) -> None:
        self.stub.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=self.metadata)

    def push(self, path: Path, name: str, tenant: str, base_model: str, public: bool = False) -> str:
        from openlora.commands.demo_setup import upload_messages

        visibility = admin_pb2.VISIBILITY_PUBLIC if public else admin_pb2.VISIBILITY_PRIVATE
        response = self.stub.UploadAdapter(
            upload_messages(path, tenant, base_model, name=name, visibility=visibility),
            metadata=self.metadata,
        )
        return response.adapter.sha256

    def delete(self, name: str, tenant: str) -> None:
        self.stub.DeleteAdapter(
            admin_pb2.DeleteAdapterRequest(name=name, tenant=tenant), metadata=self.metadata
        )

    def usage(self, tenant: str) -> admin_pb2.GetUsageResponse:
        return self.stub.GetUsage(admin_pb2.GetUsageRequest(tenant=tenant), metadata=self.metadata)

    def close(self) -> None:
        self._channel.close()


# What `openlora worker` and `openlora control-plane` say when their --listen port is taken, and how often a
# test starts a child again on another port picked free when it does.
PORT_TAKEN = "cannot listen on"
PORT_ATTEMPTS = 3


def start_retrying_taken_ports(start, log_path):
    """Calls `start()`, which picks a free port, starts a child logging to `log_path` on it and waits until
    it serves (RuntimeError when it does not); returns what start() returns. A port picked free can be taken
    before the child binds it (another process's server, an outgoing connection's ephemeral port): when the
    child's new log lines say so, it is started again on another, up to PORT_ATTEMPTS times; any other
    failure is raised at once."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        logged = log_path.stat().st_size if log_path.exists() else 0
        try:
            return start()
        except RuntimeError:
            taken = PORT_TAKEN in log_path.read_text(errors="replace")[logged:]
            if not taken or attempt == PORT_ATTEMPTS:
                raise


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a failure to listen says when the port was taken: the ListenError of `openlora worker` and
# `openlora control-plane`, and the system's message, which redis-server, PostgreSQL and `openlora up`'s
# own port check print.
PORT_TAKEN_SIGNS = (PORT_TAKEN, "Address already in use")


def says_port_taken(text: str) -> bool:
    """Whether `text` (an error's message, a server's output) says that a port to listen on was taken."""
    return any(sign in text for sign in PORT_TAKEN_SIGNS)


def retry_on_taken_port(start, attempts: int = PORT_ATTEMPTS):
    """Returns what `start()` returns; each call picks its ports free and starts something on them. A port
    picked free can be taken before it is bound (another process's server, an outgoing connection's
    ephemeral port): when start() fails saying so (a ListenError, or an error that carries a server's
    output saying so), it is called again, up to `attempts` times; any other failure is raised at once."""
    for _ in range(attempts - 1):
        try:
            return start()
        except Exception as error:
            if not says_port_taken(str(error)):
                raise
    return start()


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A redis-server of a test's own (no persistence; its files and its output in `workdir`) once it
    answers, and its port: `port` (a restart where its clients find it again), else one picked free, and
    another when that one was taken before the server bound it. RuntimeError, carrying its output, when
    it does not start."""
    if port is None:
        return retry_on_taken_port(lambda: start_redis(workdir, free_port()))
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the redis-server binary is required")
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "redis-server.log"
    logged = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if _redis_answers(process, port, timeout_s=10.0):
        return process, port
    process.kill()
    process.wait()
    output = log_path.read_bytes()[logged:].decode(errors="replace")
    raise RuntimeError(f"redis-server did not start on port {port}:\n{output}")


def _redis_answers(process: subprocess.Popen, port: int, timeout_s: float) -> bool:
    """Whether `process` answers on `port` within `timeout_s`: by its own process id, since another
    server that holds the port (a redis-server too) answers there while `process` fails to bind it. Each
    call is short and never retried: one that holds the port and never answers must not delay the start
    on another port past the moment `process` exits."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=0.25,
        socket_timeout=0.25,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.info("server")["process_id"] == process.pid:
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.05)
        return False
    finally:
        client.close()


def wait_health(target: str, want_serving: bool = True, timeout_s: float = 120.0, process=None) -> None:
    """Waits until the server at `target` reports SERVING (or stops doing so)."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if (status == health_pb2.HealthCheckResponse.SERVING) == want_serving:
                    return
            except grpc.RpcError:
                if not want_serving:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"{target} health did not become {'SERVING' if want_serving else 'not SERVING'}")
