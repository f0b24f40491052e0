"""`openlora up`: the whole system on one machine, as separate processes so that signals and crashes
stay per process.

Before anything starts, `up` takes an exclusive lock on STATE_DIR/up.lock for its lifetime (a second `up`
on the same state dir is refused, naming the first one's pid) and checks that its fixed ports are free.
Order of start: embedded Postgres and Redis (unless URLs are given) -> control plane -> demo model
(written once into the state dir) -> worker -> demo tenant, key and adapters -> the demo model's price
(only when no --model is given; `openlora.commands.demo_setup`) -> the context file, the operator key
line and the `ready` line. Order of stop (Ctrl-C, SIGTERM, or a child refusing its configuration): worker
(drains), control plane, embedded Redis, embedded Postgres.

STATE_DIR/up-secrets.json (0600) keeps what every start reuses: the operator (admin) key, printed by the
first start that gets to the ready line only (later ones say where it is kept), the worker token, and the
demo tenant's key (reused while it still authenticates, so restarts do not pile up valid keys).

`up` supervises every process it started (`openlora.commands.supervise`): the worker, the control plane,
and the embedded Postgres and Redis when it started them. One that exits on its own (an engine that cannot
go on exits non-zero, or it was killed) is started again on the same address, data or state dir and
secrets, so the others find it where it was, after a backoff of its own; each exit is logged with its
status (and, when the child could not listen on an address `up` gave it, with the flag of `up` that moves
it). This holds while `up` starts too: a worker whose port was taken between up's check and its bind
(another program's outgoing connection can hold any port of the ephemeral range) is started again while
`up` waits for it to serve. The rest of the system stays up meanwhile (a worker whose control plane is away serves its cached
keys and spools usage). A restart that fails is tried again, the delay doubling up to the cap, for as long
as `up` runs; only a child that exits with supervise.CONFIG_ERROR_EXIT_CODE (its flags refused: the same command
would be refused again) stops `up`, with exit status 1.

Metrics: `--metrics-port` (OPENLORA_METRICS_PORT) is the worker's /metrics and `--admin-metrics-port`
(OPENLORA_ADMIN_METRICS_PORT) the control plane's, each handed to its child as a flag; the children do not
see OPENLORA_METRICS_PORT, which both would read (and the second to bind would fail).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openlora.commands.demo_setup import (
    create_demo_mixes,
    ensure_demo_model,
    ensure_tenant,
    own_adapter_names,
    push_adapters,
    set_demo_price,
)
from openlora.commands.supervise import (
    Child,
    ChildExited,
    StopFlag,
    Supervisor,
    start_embedded_postgres,
    start_embedded_redis,
)
from openlora.config import new_secret
from openlora.embedded import free_port as _free_port
from openlora.grpc_reconnect import reconnect_options
from openlora.log_level import configure_logging

log = logging.getLogger("openlora.up")

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
SECRETS_FILE = "up-secrets.json"
LOCK_FILE = "up.lock"


@dataclass(frozen=True)
class UpConfig:
    state_dir: Path
    model_dir: Path | None
    database_url: str | None
    redis_url: str | None
    host: str
    port: int
    admin_port: int
    device: str
    tenant: str
    context_path: Path
    drain_grace_s: float = 30.0
    worker_args: tuple[str, ...] = ()
    quantize: str = "none"  # the worker's --quantize
    quantize_lm_head: bool = False
    http_port: int = 0  # the worker's OpenAI-compatible API (0: any free port)
    control_plane_args: tuple[str, ...] = ()  # the predictor's flags, handed to `openlora control-plane`
    metrics_port: int = 0  # the worker's /metrics (0: off)
    admin_metrics_port: int = 0  # the control plane's /metrics (0: off)
    log_level: str = "INFO"  # up's own, the control plane's and the worker's


METRICS_HOST = "0.0.0.0"  # where the children serve /metrics


@dataclass(frozen=True)
class Listener:
    """A fixed port of `up` (0: any free one, or off for metrics): what it is for and the flag of `up`
    that moves it, with its variable (`make run` passes no flags)."""

    port: int
    host: str
    purpose: str
    flag: str

    def taken_line(self, port: int | None = None) -> str:
        """The line `up` logs when a child could not listen on this listener's address."""
        return f"port {port or self.port} ({self.purpose}) cannot be used; choose another with {self.flag}"


def listeners(config: UpConfig) -> dict[str, Listener]:
    """up's listeners by name: admin, inference, http, metrics, admin_metrics."""
    return {
        "admin": Listener(
            config.admin_port,
            config.host,
            "the control plane's admin API",
            "--admin-port PORT (or OPENLORA_ADMIN_PORT=PORT, as `make run` takes it; 0: any free port)",
        ),
        "inference": Listener(
            config.port,
            config.host,
            "the worker's gRPC inference API",
            "--port PORT (or OPENLORA_PORT=PORT, as `make run` takes it; 0: any free ports, for it and the HTTP "
            "API)",
        ),
        "http": Listener(
            config.http_port,
            config.host,
            "the OpenAI-compatible HTTP API",
            "--http-port PORT (or OPENLORA_HTTP_PORT=PORT, as `make run` takes it; 0: any free port)",
        ),
        "metrics": Listener(
            config.metrics_port,
            METRICS_HOST,
            "the worker's /metrics",
            "--metrics-port PORT (OPENLORA_METRICS_PORT; 0: off)",
        ),
        "admin_metrics": Listener(
            config.admin_metrics_port,
            METRICS_HOST,
            "the control plane's /metrics",
            "--admin-metrics-port PORT (OPENLORA_ADMIN_METRICS_PORT; 0: off)",
        ),
    }


class StartRefused(RuntimeError):
    """`up` cannot start here (its state dir is in use, a port is taken); the message is one line that
    says what to do."""


def _wait_serving(target: str, supervisor: Supervisor, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Waits for `target`'s health to be SERVING while the supervisor restarts a child that exits, as it
    does once `up` is ready; ConfigRefused (a child refused its flags) and TimeoutError end the wait."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target, options=reconnect_options()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            supervisor.check()
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} did not become SERVING within {timeout_s:.0f}s")


def lock_state_dir(state_dir: Path) -> int:
    """Takes an exclusive lock on STATE_DIR/up.lock and writes this pid into it; returns the open file,
    which holds the lock until it is closed or this process ends (however it ends: the kernel drops it).
    StartRefused names the pid of the `up` that holds it."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartRefused(f"another openlora up (pid {holder}) is using {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _port_error(host: str, port: int) -> str | None:
    """Why nothing could listen on host:port now (strerror), or None when it could."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        return error.strerror
    with socket.socket(family, kind, proto) as probe:
        # As servers do: a port whose old connections linger in TIME_WAIT (a restart) is free to listen on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return error.strerror or errno.errorcode.get(error.errno, str(error))
    return None


def check_ports(config: UpConfig) -> None:
    """StartRefused, naming the port, what it is for and the flag that moves it, when a fixed port of
    `up` (0 is any free port) is taken or given twice: checked before any child starts."""
    seen: dict[int, str] = {}
    for listener in listeners(config).values():
        port, purpose, flag = listener.port, listener.purpose, listener.flag
        if not port:
            continue
        if port in seen:
            raise StartRefused(
                f"port {port} is given for both {seen[port]} and {purpose}: choose another with {flag}"
            )
        seen[port] = purpose
        reason = _port_error(listener.host, port)
        if reason is not None:
            leftover = _leftover_openlora(port)
            running_up = _running_up_of(leftover[1]) if leftover is not None else None
            if running_up is not None:
                raise StartRefused(
                    f"port {port} on {listener.host} ({purpose}) is held by {leftover[0]} of a running "
                    f"`openlora up` ({running_up}): stop that one (Ctrl-C), or choose another port with {flag}"
                )
            if leftover is not None:
                raise StartRefused(
                    f"port {port} on {listener.host} ({purpose}) is held by {leftover[0]}: a process an earlier "
                    f"`openlora up` started, still finishing its streams (a worker drains for up to "
                    f"{config.drain_grace_s:g} s after its `up` was killed); wait for it to exit, or choose "
                    f"another port with {flag}"
                )
            raise StartRefused(
                f"port {port} on {listener.host} ({purpose}) cannot be used: {reason}; "
                f"choose another with {flag}"
            )


def _running_up_of(pid: int) -> str | None:
    """'pid M, state dir D' of the live `openlora up` that started process `pid`, or None."""
    import psutil

    try:
        parent = psutil.Process(pid).parent()
        argv = parent.cmdline() if parent is not None else []
    except (psutil.Error, OSError):
        return None
    if "up" not in argv or not ("openlora.cli" in argv or any(Path(a).name == "openlora" for a in argv)):
        return None
    return f"pid {parent.pid}, state dir {_state_dir_of(parent, argv)}"


def _state_dir_of(process, argv: list[str]) -> str:
    """The state dir an `up` process runs on, as its flag, then its OPENLORA_STATE_DIR, then the default
    give it, against its working directory."""
    import psutil

    state_dir = None
    for i, arg in enumerate(argv):
        if arg == "--state-dir" and i + 1 < len(argv):
            state_dir = argv[i + 1]
        elif arg.startswith("--state-dir="):
            state_dir = arg.split("=", 1)[1]
    try:
        if state_dir is None:
            state_dir = process.environ().get("OPENLORA_STATE_DIR") or ".state"
        return str(Path(process.cwd()) / state_dir)
    except (psutil.Error, OSError):
        return state_dir or ".state"


def _leftover_openlora(port: int) -> tuple[str, int] | None:
    """('openlora worker (pid N)', N) when a process of ours (an `openlora` command line) listens on
    `port`; None when another program does, or it cannot be told."""
    import psutil

    try:
        pids = {
            c.pid
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        }
        for pid in sorted(pids):
            argv = psutil.Process(pid).cmdline()
            words = [Path(a).name for a in argv]
            if "openlora" in words or "openlora.cli" in argv:
                role = next((w for w in argv if w in ("worker", "control-plane")), "process")
                return f"openlora {role} (pid {pid})", pid
    except (psutil.Error, OSError):
        return None
    return None


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _enabled(hints: dict[str, str]) -> dict[str, str]:
    """`hints` without the addresses on port 0 (a listener that is off)."""
    return {address: line for address, line in hints.items() if _port_of(address)}


def _load_secrets(state_dir: Path) -> dict:
    """The secrets of this state dir, made once and kept: `admin_key` (the operator's), `worker_token`,
    and as starts add them `admin_key_shown` (once a ready start printed it) and, per database
    (`_per_database`, `_seeded_tenants`), `demo_keys` (by tenant), `priced_models` and `seeded_tenants`."""
    path = state_dir / SECRETS_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{_shown_path(path)} is not valid JSON ({e}): restore it from a backup"
            ) from None
        keys = ("admin_key", "worker_token")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in keys):
            raise ValueError(
                f"{_shown_path(path)} must be an object holding the strings {' and '.join(keys)}: "
                "restore it from a backup"
            )
        return data
    data = {"admin_key": new_secret("op_"), "worker_token": new_secret("wt_")}
    _save_secrets(state_dir, data)
    return data


def _per_database(keys: dict, name: str, database_url: str | None, empty: list | dict) -> list | dict:
    """What this state dir recorded under `name` for the database of `database_url` (None: the embedded
    one), kept in `keys[name + "_by_database"]`, to update in place (`empty` when nothing yet). Prices and
    api keys live in a database, so a start on another one (`--database-url`) has records of its own there;
    a record from before they were kept per database (`keys[name]`) counts for the database of this start.
    Used for `priced_models` (the demo models priced there) and `demo_keys` (the demo key by tenant: kept
    per state dir alone, each switch of database minted a key, and the one left behind stayed valid)."""
    by_database = keys.setdefault(f"{name}_by_database", {})
    database = _database_identity(database_url)
    if name in keys:
        by_database.setdefault(database, keys.pop(name))
    return by_database.setdefault(database, empty)


def _seeded_tenants(keys: dict, database_url: str | None) -> list:
    """The tenants this state dir seeded in the database of `database_url`, to update in place. A tenant
    lives in a database, so a start on another one seeds its tenant there unless it did so before (one
    list for all databases let a first start on a new database that stopped before its seeding was done,
    the tenant made, leave that tenant without adapters, mixes or price for good). A record from before
    it was kept per database (`keys["seeded_tenants"]`) counts in each database for the tenants with a
    demo key there (the start that seeded a tenant saved its key with it); a database without any record
    counts the tenants an earlier start made a demo key for there."""
    by_database = keys.setdefault("seeded_tenants_by_database", {})
    demo_keys = keys.get("demo_keys_by_database", {})
    if "seeded_tenants" in keys:
        seeded_anywhere = dict.fromkeys(keys.pop("seeded_tenants"))
        for database, tenant_keys in demo_keys.items():
            by_database.setdefault(database, [t for t in seeded_anywhere if t in tenant_keys])
    database = _database_identity(database_url)
    return by_database.setdefault(database, list(demo_keys.get(database, {})))


def _database_identity(database_url: str | None) -> str:
    """`database_url` without its driver, user and password, or `embedded`."""
    if not database_url:
        return "embedded"
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    return f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"


def _save_secrets(state_dir: Path, data: dict) -> None:
    """Replaces STATE_DIR/up-secrets.json at once, never readable by others (0600 from its creation)."""
    path = state_dir / SECRETS_FILE
    partial = path.with_name(f".{SECRETS_FILE}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _shown_path(path: Path) -> str:
    """`path` relative to the current directory when it lies under it (`.state/up-secrets.json`)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _context_prefix(written: Path) -> str:
    """`OPENLORA_CONTEXT=FILE ` when the CLI, run from this shell's environment, would not read the
    context file this start wrote (`up --context FILE`); else nothing."""
    from openlora.config import context_path

    if Path(written).absolute() == context_path(os.environ).absolute():
        return ""
    return f"OPENLORA_CONTEXT={shlex.quote(_shown_path(Path(written).absolute()))} "


def cli_command() -> str:
    """How the operator runs this `openlora` from the current directory: `openlora` when PATH finds this
    one, else its path (relative when under the current directory: `.venv/bin/openlora`)."""
    script = Path(sys.argv[0])
    if script.name != "openlora" or not script.is_file():  # `python -m openlora.cli`: the venv's script
        script = Path(sys.executable).parent / "openlora"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m openlora.cli"
    on_path = shutil.which("openlora")
    if on_path is not None and os.path.samefile(on_path, script):
        return "openlora"
    shown = _shown_path(script.absolute())
    return shlex.quote(shown if os.sep in shown else f".{os.sep}{shown}")


def run_up(config: UpConfig) -> int:
    configure_logging(config.log_level)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(
            f"error: --state-dir {_shown_path(config.state_dir)}: {e.strerror}", file=sys.stderr, flush=True
        )
        return 2
    try:
        lock_fd = lock_state_dir(config.state_dir)  # held until `up` returns
        try:
            check_ports(config)
            return _run_locked(config)
        finally:
            os.close(lock_fd)
    except StartRefused as refused:
        print(f"error: {refused}", file=sys.stderr, flush=True)
        return 1


def _run_locked(config: UpConfig) -> int:
    stop = StopFlag()  # set by the signal handler: it must take no lock (StopFlag's docstring)
    serving = threading.Event()  # read by the handler (is_set takes no lock), set by this thread only

    def on_signal(*_) -> None:
        stop.set()
        if not serving.is_set():  # still starting: unwind at once (the finally stops what started)
            raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    children: list[Child] = []  # in the order of stop: worker, control plane, Redis, Postgres
    supervisor = Supervisor(children)
    exit_code = 0
    try:
        keys = _load_secrets(config.state_dir)  # first: a damaged file stops `up` before anything starts
        database_url = config.database_url
        redis_url = config.redis_url
        if not database_url:
            postgres = start_embedded_postgres(config.state_dir / "postgres")
            children.insert(0, postgres)
            database_url = postgres.server.url
        if not redis_url:
            redis = start_embedded_redis(config.state_dir / "redis")
            children.insert(0, redis)
            redis_url = redis.server.url
        admin_target = f"{config.host}:{config.admin_port or _free_port(config.host)}"
        inference_target = f"{config.host}:{config.port or _free_port(config.host)}"
        http_listen = f"{config.host}:{config.http_port or _free_port(config.host)}"
        openai_url = f"http://{http_listen}/v1"
        logs = config.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        env = dict(
            os.environ, OPENLORA_ADMIN_KEY=keys["admin_key"], OPENLORA_WORKER_TOKEN=keys["worker_token"]
        )
        env.pop("OPENLORA_CONTEXT", None)
        env.pop("OPENLORA_METRICS_PORT", None)  # both children read it: each gets its own port as a flag
        ports = listeners(config)
        metrics_address = f"{METRICS_HOST}:{config.metrics_port}"
        admin_metrics_address = f"{METRICS_HOST}:{config.admin_metrics_port}"
        control_plane = Child(
            "control plane",
            [
                sys.executable, "-m", "openlora.cli", "control-plane",
                "--listen", admin_target,
                "--database-url", database_url,
                "--redis-url", redis_url,
                "--state-dir", str(config.state_dir / "control-plane"),
                "--metrics-port", str(config.admin_metrics_port),
                "--log-level", config.log_level,
                *config.control_plane_args,
            ],
            env,
            logs / "control-plane.log",
            _enabled({
                admin_target: ports["admin"].taken_line(_port_of(admin_target)),
                admin_metrics_address: ports["admin_metrics"].taken_line(),
            }),
        )  # fmt: skip
        children.insert(0, control_plane)
        model_dir = config.model_dir or ensure_demo_model(config.state_dir)
        _wait_serving(admin_target, supervisor)
        worker = Child(
            "worker",
            [
                sys.executable, "-m", "openlora.cli", "worker",
                "--listen", inference_target,
                "--http-listen", http_listen,
                "--control-plane", admin_target,
                "--model", str(model_dir),
                "--state-dir", str(config.state_dir / "worker"),
                "--redis-url", redis_url,
                "--device", config.device,
                "--drain-grace-s", str(config.drain_grace_s),
                "--quantize", config.quantize,
                *(["--quantize-lm-head"] if config.quantize_lm_head else []),
                "--metrics-port", str(config.metrics_port),
                "--log-level", config.log_level,
                *config.worker_args,
            ],
            env,
            logs / "worker.log",
            _enabled({
                inference_target: ports["inference"].taken_line(_port_of(inference_target)),
                http_listen: ports["http"].taken_line(_port_of(http_listen)),
                metrics_address: ports["metrics"].taken_line(),
            }),
        )  # fmt: skip
        children.insert(0, worker)  # stopped first
        _wait_serving(inference_target, supervisor)
        demo_keys = _per_database(keys, "demo_keys", config.database_url, {})
        seeded = _seeded_tenants(keys, config.database_url)
        api_key, created = ensure_tenant(
            admin_target, keys["admin_key"], config.tenant, kept_key=demo_keys.get(config.tenant)
        )
        demo_keys[config.tenant] = api_key
        if created or config.tenant not in seeded:
            # Only the start that creates the tenant seeds it (or one after a start that stopped before
            # seeding was done): a later start must not undo what the operator and the tenant changed
            # since (a restart brought deleted adapters and mixes back and repriced the month's usage).
            adapter_names = push_adapters(
                admin_target, keys["admin_key"], config.tenant, model_dir / "adapters", model_dir.name
            )
            if config.model_dir is None:
                priced = _per_database(keys, "priced_models", config.database_url, [])
                if model_dir.name not in priced:  # a price is the model's, not the tenant's: set it once
                    set_demo_price(admin_target, keys["admin_key"], model_dir.name)
                    priced.append(model_dir.name)
                create_demo_mixes(admin_target, keys["admin_key"], config.tenant)
            if config.tenant not in seeded:
                seeded.append(config.tenant)
            _save_secrets(config.state_dir, keys)
        else:
            adapter_names = own_adapter_names(admin_target, api_key, config.tenant, model_dir.name)
        from openlora.commands.serving import write_context

        write_context(
            config.context_path,
            {"target": inference_target, "admin_target": admin_target, "api_key": api_key,
             "tenant": config.tenant, "adapters": adapter_names, "openai_base_url": openai_url},
        )  # fmt: skip
        secrets_shown = _shown_path(config.state_dir / SECRETS_FILE)
        if keys.get("admin_key_shown"):
            operator_line = f"operator key: kept in {secrets_shown} (admin_key)"
        else:  # shown once: on the first start that gets this far
            operator_line = f"operator key={keys['admin_key']} (shown once; kept in {secrets_shown})"
            keys["admin_key_shown"] = True
        _save_secrets(config.state_dir, keys)
        serving.set()
        print(operator_line, flush=True)
        print(
            f"ready inference={inference_target} admin={admin_target} openai={openai_url} key={api_key}",
            flush=True,
        )
        if adapter_names:
            print(
                f"adapters: {', '.join(adapter_names)}; in another terminal try:\n"
                f"  {_context_prefix(config.context_path)}{cli_command()} generate --adapter "
                f'{adapter_names[0]} "the quick fox =>"',
                file=sys.stderr,
                flush=True,
            )
        exit_code = supervisor.run(stop)
    except (ChildExited, TimeoutError, grpc.RpcError, OSError) as error:
        log.error("openlora up failed: %s", error)
        exit_code = 1
    except KeyboardInterrupt:
        log.info("interrupted while starting")
    finally:
        serving.set()  # a second signal during the stop must not interrupt the stop
        if stop.is_set() and any(child.name == "worker" for child in children):
            log.info(
                "stopping: streams in flight get up to %g s to finish, then everything started here stops",
                config.drain_grace_s,
            )
        for child in children:
            timeout_s = config.drain_grace_s + 10 if child.name == "worker" else STOP_TIMEOUT_S
            child.stop(timeout_s)
        if children:  # the user who pressed Ctrl-C sees the stop end, not only begin
            log.info("stopped: %s", ", ".join(child.name for child in children))
    return exit_code
