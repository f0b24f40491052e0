"""Supervision of `openlora up`'s children: each process it starts (worker, control plane, embedded
PostgreSQL and Redis) is a `Child` in its own session; `supervise` watches them and starts one that exits
again on the same address, data or state dir, after a backoff of its own that doubles from
RESTART_BACKOFF_MIN_S to RESTART_BACKOFF_MAX_S and falls back to the minimum once the child has run for
RESTART_BACKOFF_RESET_S. Only a child that exits with CONFIG_ERROR_EXIT_CODE (its flags refused: the same
command would be refused again) ends the supervision.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from openlora.embedded import EmbeddedPostgres, EmbeddedRedis, child_setup

log = logging.getLogger("openlora.up")

CONFIG_ERROR_EXIT_CODE = 2
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_BACKOFF_RESET_S = 60.0


class ChildExited(RuntimeError):
    pass


class Child:
    """One process started by `up`, in its own session so a terminal's Ctrl-C reaches `up` only and `up`
    stops the children in order."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.started_at = time.monotonic()
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
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
        return Child(self.name, self.argv, self.env, self.log_path)

    def tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""


class EmbeddedChild(Child):
    """An embedded server (EmbeddedPostgres, EmbeddedRedis) that `up` started, supervised as a Child is:
    `restart` starts it again on the same data dir and port, so that its clients find it where it was."""

    def __init__(
        self, name: str, server: EmbeddedPostgres | EmbeddedRedis, restart: Callable[[], Child]
    ) -> None:
        self.name = name
        self.server = server
        self.log_path = server.log_path
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
    try:
        server.start()
    except BaseException:
        server.stop()  # a server that started but could not create its database
        raise
    port = server.port  # read now: stopping the dead server clears it
    return EmbeddedChild("postgres", server, lambda: start_embedded_postgres(state_dir, port))


def start_embedded_redis(state_dir: Path, port: int | None = None) -> EmbeddedChild:
    """Embedded Redis on STATE_DIR/redis (on `port`, else a free one), restarted on its first port."""
    server = EmbeddedRedis(state_dir, port=port)
    server.start()
    port = server.port
    return EmbeddedChild("redis", server, lambda: start_embedded_redis(state_dir, port))


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


def supervise(children: list[Child], stop: threading.Event) -> int:
    """Watches the children until `stop`, restarting each one that exits in place in `children` (its own
    backoff, logged with its exit status; a restart that fails is tried again, for as long as it takes),
    unless it refused its configuration (exit CONFIG_ERROR_EXIT_CODE). Returns up's exit status: 0 on
    `stop`, 1 on a refused configuration."""
    backoffs = [Backoff() for _ in children]
    restart_at: list[float | None] = [None] * len(children)  # when a dead child is started again
    while not stop.is_set():
        now = time.monotonic()
        for index, child in enumerate(children):
            if restart_at[index] is None:
                if child.alive():
                    continue
                code = child.process.returncode
                if code == CONFIG_ERROR_EXIT_CODE:  # the same command would be refused again: do not loop
                    log.error(
                        "%s refused its configuration (exit %s); not restarting:\n%s",
                        child.name,
                        code,
                        child.tail(),
                    )
                    return 1
                ran_s = now - child.started_at
                delay_s = backoffs[index].next_delay_s(ran_s)
                restart_at[index] = now + delay_s
                log.error(
                    "%s exited (%s) after %.1fs; restarting it in %.1fs:\n%s",
                    child.name,
                    exit_status(code),
                    ran_s,
                    delay_s,
                    child.tail(),
                )
            elif now >= restart_at[index]:
                try:
                    children[index] = child.restarted()
                except Exception as error:  # one failed start must not end the supervision
                    delay_s = backoffs[index].next_delay_s(0.0)
                    restart_at[index] = time.monotonic() + delay_s
                    log.error(
                        "%s could not be restarted (%s); trying again in %.1fs", child.name, error, delay_s
                    )
                    continue
                restart_at[index] = None
                log.info("%s restarted (pid %d)", child.name, children[index].process.pid)
        pending_s = [at - time.monotonic() for at in restart_at if at is not None]
        stop.wait(max(0.0, min([0.5, *pending_s])))
    return 0
