"""Supervision of `openlora up`'s children: each process it starts (worker, control plane, embedded
PostgreSQL and Redis) is a `Child` in its own session; `supervise` watches them and starts one that exits
again on the same address, data or state dir, after a backoff of its own that doubles from
RESTART_BACKOFF_MIN_S to RESTART_BACKOFF_MAX_S and falls back to the minimum once the child has run for
RESTART_BACKOFF_RESET_S. Only a child that exits with CONFIG_ERROR_EXIT_CODE (its flags refused: the same
command would be refused again) ends the supervision.

`Supervisor.check` is one pass of that watch; `up` runs it while it waits for its children to serve, so a
child that exits while starting (a port taken between up's check and the child's bind) is started again
just as one that exits later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from openlora.embedded import EmbeddedPostgres, EmbeddedRedis, child_setup
from openlora.listen import failed_address

log = logging.getLogger("openlora.up")

CONFIG_ERROR_EXIT_CODE = 2
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_BACKOFF_RESET_S = 60.0


class ChildExited(RuntimeError):
    pass


class StopFlag:
    """A stop request that a signal handler may set. `threading.Event.set` takes a lock that the interrupted
    main thread may be holding (inside `Event.wait`, between taking its lock and sleeping): the handler then
    waits for that lock for ever and `up` never stops. `set` here takes no lock; `wait` sleeps in `poll` on
    a pipe that `set` writes to, so a stop ends the wait at once. The pipe is never closed: a handler may run
    until the process ends, and a closed descriptor's number may by then name another file."""

    def __init__(self) -> None:
        self._set = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._poll = select.poll()  # not select.select: any descriptor number (select refuses 1024 and up)
        self._poll.register(self._wake_read, select.POLLIN)

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(OSError):  # a full pipe has woken the waiter already
            os.write(self._wake_write, b"\0")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float) -> bool:
        if not self._set:
            self._poll.poll(max(0.0, timeout_s) * 1000)
        return self._set


class ConfigRefused(ChildExited):
    """A child exited with CONFIG_ERROR_EXIT_CODE: the same command would be refused again."""


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Child:
    """One process started by `up`, in its own session so a terminal's Ctrl-C reaches `up` only and `up`
    stops the children in order.

    Its output is appended to `log_path`; `tail` shows only what this process wrote. `listen_hints` maps an
    address the child was told to listen on to the line `up` logs when the child could not listen there
    (what the address is for and which flag of `up` moves it)."""

    log_offset: int = 0
    listen_hints: Mapping[str, str] = MappingProxyType({})

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        listen_hints: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.listen_hints = dict(listen_hints or {})
        self.started_at = time.monotonic()
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        _end_last_line(log_path, self._log)
        self.log_offset = os.fstat(self._log.fileno()).st_size  # earlier runs' lines end here
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # the kernel sends SIGTERM to the child if `up` itself dies without cleaning up
            preexec_fn=child_setup(None, None, signal.SIGTERM),
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def restarted(self) -> Child:
        """A new process of the same command, environment and log, once this one has exited."""
        self.stop(0)
        return Child(self.name, self.argv, self.env, self.log_path, self.listen_hints)

    def output(self) -> str:
        """What this process wrote to its log (not the earlier runs' lines above it)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, num_lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-num_lines:])

    def listen_hint(self) -> str | None:
        """The line for the address this process could not listen on, when its output names one of
        `listen_hints`."""
        address = failed_address(self.output())
        return self.listen_hints.get(address) if address is not None else None


def _end_last_line(path: Path, log) -> None:
    """Ends the log's last line when an earlier run left it open (a process's last words at exit, such
    as a library's report printed without a newline), so that this run's first line starts a line."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            unended = f.read(1) != b"\n"
    except OSError:  # empty (a seek before the start) or unreadable: nothing to end
        return
    if unended:
        log.write(b"\n")
        log.flush()


class EmbeddedChild(Child):
    """An embedded server (EmbeddedPostgres, EmbeddedRedis) that `up` started, supervised as a Child is:
    `restart` starts it again on the same data dir and port, so that its clients find it where it was."""

    def __init__(
        self,
        name: str,
        server: EmbeddedPostgres | EmbeddedRedis,
        restart: Callable[[], Child],
        log_offset: int = 0,
    ) -> None:
        self.name = name
        self.server = server
        self.log_path = server.log_path
        self.log_offset = log_offset
        self.started_at = time.monotonic()
        self.process = server.process
        self._restart = restart

    def stop(self, timeout_s: float) -> int | None:
        self.server.stop()  # with the server's own clean-shutdown signal and timeout
        return self.process.returncode

    def restarted(self) -> Child:
        self.server.stop()
        return self._restart()


def start_embedded_postgres(state_dir: Path, port: int | None = None) -> EmbeddedChild:
    """Embedded Postgres on STATE_DIR/postgres (on `port`, else a free one), restarted on its first port."""
    server = EmbeddedPostgres(state_dir, port=port)
    log_offset = _log_size(server.log_path)
    try:
        server.start()
    except BaseException:
        server.stop()  # a server that started but could not create its database
        raise
    port = server.port  # read now: stopping the dead server clears it
    return EmbeddedChild("postgres", server, lambda: start_embedded_postgres(state_dir, port), log_offset)


def start_embedded_redis(state_dir: Path, port: int | None = None) -> EmbeddedChild:
    """Embedded Redis on STATE_DIR/redis (on `port`, else a free one), restarted on its first port."""
    server = EmbeddedRedis(state_dir, port=port)
    log_offset = _log_size(server.log_path)
    server.start()
    port = server.port
    return EmbeddedChild("redis", server, lambda: start_embedded_redis(state_dir, port), log_offset)


def exit_status(code: int | None) -> str:
    """How a child ended, for the log: `exit 1`, `signal SIGKILL`."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit {code}"


class Backoff:
    """Restart delays: doubling from RESTART_BACKOFF_MIN_S up to RESTART_BACKOFF_MAX_S, back to the
    minimum after a run of RESTART_BACKOFF_RESET_S."""

    def __init__(self) -> None:
        self.delay_s = RESTART_BACKOFF_MIN_S

    def next_delay_s(self, ran_s: float) -> float:
        if ran_s >= RESTART_BACKOFF_RESET_S:
            self.delay_s = RESTART_BACKOFF_MIN_S
        delay_s = self.delay_s
        self.delay_s = min(self.delay_s * 2, RESTART_BACKOFF_MAX_S)
        return delay_s


class Supervisor:
    """Restarts the children of `up` that exit, each after its own backoff (logged with its exit status);
    a restart that fails is tried again. `children` is the caller's list, in which a restarted child
    replaces the one that exited; `up` adds to it while it starts."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._backoffs: dict[str, Backoff] = {}
        self._restart_at: dict[str, float] = {}  # child name -> when it is started again

    def check(self) -> float:
        """One pass over the children; returns the seconds until the next restart is due (inf: none).
        Raises ConfigRefused when a child refused its configuration (exit CONFIG_ERROR_EXIT_CODE)."""
        now = time.monotonic()
        for index, child in enumerate(self.children):
            restart_at = self._restart_at.get(child.name)
            if restart_at is None:
                if not child.alive():
                    self._schedule_restart(child, now)
            elif now >= restart_at:
                self._restart(index, child)
        return min((at - time.monotonic() for at in self._restart_at.values()), default=float("inf"))

    def run(self, stop: StopFlag | threading.Event) -> int:
        """Checks the children until `stop`. Returns up's exit status: 0 on `stop`, 1 on a refused
        configuration."""
        while not stop.is_set():
            try:
                wait_s = self.check()
            except ConfigRefused:
                return 1
            stop.wait(max(0.0, min(0.5, wait_s)))
        return 0

    def _schedule_restart(self, child: Child, now: float) -> None:
        code = child.process.returncode
        if code == CONFIG_ERROR_EXIT_CODE:  # the same command would be refused again: do not loop
            log.error(
                "%s refused its configuration (exit %s); not restarting:\n%s", child.name, code, child.tail()
            )
            raise ConfigRefused(f"{child.name} refused its configuration (exit {code})")
        ran_s = now - child.started_at
        delay_s = self._backoffs.setdefault(child.name, Backoff()).next_delay_s(ran_s)
        self._restart_at[child.name] = now + delay_s
        hint = child.listen_hint()
        log.error(
            "%s exited (%s) after %.1fs; restarting it in %.1fs%s:\n%s",
            child.name,
            exit_status(code),
            ran_s,
            delay_s,
            f"; {hint}" if hint else "",
            child.tail(),
        )

    def _restart(self, index: int, child: Child) -> None:
        try:
            self.children[index] = child.restarted()
        except Exception as error:  # one failed start must not end the supervision
            delay_s = self._backoffs[child.name].next_delay_s(0.0)
            self._restart_at[child.name] = time.monotonic() + delay_s
            log.error("%s could not be restarted (%s); trying again in %.1fs", child.name, error, delay_s)
            return
        del self._restart_at[child.name]
        log.info("%s restarted (pid %d)", child.name, self.children[index].process.pid)


def supervise(children: list[Child], stop: StopFlag | threading.Event) -> int:
    """Watches the children until `stop`, restarting each one that exits in place in `children` (its own
    backoff, logged with its exit status; a restart that fails is tried again, for as long as it takes),
    unless it refused its configuration (exit CONFIG_ERROR_EXIT_CODE). Returns up's exit status: 0 on
    `stop`, 1 on a refused configuration."""
    return Supervisor(children).run(stop)
