"""`openlora up` on one state dir across starts: the operator key is shown once and does operator work,
the demo key stays the same from one start to the next (a new one only once it is revoked), a restart
seeds nothing again (an adapter the tenant deleted and a price the operator set stay so), and a second
`up` on a state dir in use is refused; a port in use is refused before anything starts. Every refusal is
one line, with no traceback."""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openlora.commands.demo_setup import (
    DEMO_COMPLETION_MICROS_PER_MILLION_TOKENS,
    DEMO_PROMPT_MICROS_PER_MILLION_TOKENS,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        OPENLORA_CONTEXT=str(tmp_path / "context.json"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    for name in ("OPENLORA_TARGET", "OPENLORA_ADMIN_TARGET", "OPENLORA_API_KEY", "OPENLORA_ADMIN_KEY"):
        env.pop(name, None)
    return env


def _up_argv(state_dir: Path, database_url: str, redis_url: str, ports: dict[str, str] | None = None):
    ports = {"--port": "0", "--admin-port": "0", "--http-port": "0", **(ports or {})}
    return [
        sys.executable, "-m", "openlora.cli", "up",
        "--state-dir", str(state_dir),
        "--database-url", database_url,
        "--redis-url", redis_url,
        *[part for flag, port in ports.items() for part in (flag, port)],
        "--drain-grace-s", "2",
        "--worker-arg=--num-kv-blocks=64", "--worker-arg=--max-lora-rank=16",
    ]  # fmt: skip


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openlora.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


def _price(database_url: str, base_model: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT prompt_micros_per_million_tokens, completion_micros_per_million_tokens FROM price "
            "WHERE base_model = %s",
            (base_model,),
        ).fetchone()
    assert row is not None
    return tuple(row)


class _Up:
    """One `up` until its ready line: `lines` is its stdout up to it, `fields` the ready line's."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO_ROOT
            )
        self.lines = self._read_until_ready(timeout_s=180)
        self.fields = dict(part.split("=", 1) for part in self.lines[-1].split()[1:])

    def _read_until_ready(self, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        buffer = b""
        while time.monotonic() < deadline and self.process.poll() is None:
            if select.select([self.process.stdout], [], [], 0.5)[0]:
                buffer += os.read(self.process.stdout.fileno(), 4096)
                lines = buffer.decode(errors="replace").splitlines()
                for i, line in enumerate(lines):
                    if line.startswith("ready "):
                        return lines[: i + 1]
        self.kill()
        stderr = self.stderr_path.read_text(errors="replace")[-2000:]
        raise AssertionError(f"no ready line (exit {self.process.poll()}): {buffer.decode()}\n{stderr}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(120) == 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.mark.slow
def test_restarts_keep_the_demo_key_and_show_the_operator_key_once(
    database_url, redis_url, e2e_model_dir, tmp_path
):
    state_dir = tmp_path / "state"
    shutil.copytree(e2e_model_dir, state_dir / "demo-model")
    (state_dir / "demo-model" / ".complete").write_text("ok\n")
    env = _env(tmp_path)
    argv = _up_argv(state_dir, database_url, redis_url)

    secrets_path = state_dir.resolve() / "up-secrets.json"

    first = _Up(argv, env, tmp_path / "first.stderr")
    try:
        (operator_line,) = [line for line in first.lines if line.startswith("operator key")]
        operator_key = operator_line.split()[1].removeprefix("key=")
        assert operator_line == f"operator key={operator_key} (shown once; kept in {secrets_path})"
        assert oct(secrets_path.stat().st_mode & 0o777) == "0o600"

        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f"error: another openlora up (pid {first.process.pid}) is using {state_dir.resolve()}"
        ]

        created = _cli(env, "tenants", "create", "acme", "--api-key", operator_key)
        assert created.returncode == 0, created.stderr
        assert "acme" in created.stdout
        denied = _cli(env, "tenants", "create", "acme2", "--api-key", first.fields["key"])
        assert denied.returncode != 0 and "PERMISSION_DENIED" in denied.stderr
        # What the operator and the tenant change after the first start must survive the next one.
        removed = _cli(env, "adapters", "rm", "ad0", "--api-key", first.fields["key"])
        assert removed.returncode == 0, removed.stderr
        priced = _cli(
            env,
            "prices",
            "set",
            "demo-model",
            "--prompt",
            "5",
            "--completion",
            "7",
            "--api-key",
            operator_key,
        )
        assert priced.returncode == 0, priced.stderr
        price_before = _price(database_url, "demo-model")
        first.stop()
    finally:
        first.kill()
    # The stop is said to have ended, not only to have begun (Ctrl-C returned to the prompt without a word).
    assert "stopped: worker, control plane" in first.stderr_path.read_text()
    # The hint names the `openlora` the user can run from here (make run does not put .venv/bin on PATH).
    (hint,) = [line for line in first.stderr_path.read_text().splitlines() if " generate --adapter " in line]
    command = shlex.split(hint)[0]
    assert (REPO_ROOT / command).is_file() if os.sep in command else shutil.which(command, path=env["PATH"])

    again = _Up(argv, env, tmp_path / "again.stderr")
    try:
        assert again.fields["key"] == first.fields["key"]
        # a restart seeds nothing again: the deleted adapter stays deleted, the price stays the operator's
        listed = _cli(env, "adapters", "list", "--api-key", again.fields["key"])
        assert listed.returncode == 0, listed.stderr
        assert "ad1" in listed.stdout and "ad0" not in listed.stdout
        assert _price(database_url, "demo-model") == price_before
        assert f"operator key: kept in {secrets_path} (admin_key)" in again.lines
        assert operator_key not in "\n".join(again.lines)
        prefix = "_".join(again.fields["key"].split("_")[:2])  # olk_<12 hex>
        revoked = _cli(env, "keys", "revoke", prefix, "--api-key", operator_key)
        assert revoked.returncode == 0, revoked.stderr
        again.stop()
    finally:
        again.kill()

    # A state dir written before `up` recorded what it seeded: it must not seed again either.
    secrets = json.loads(secrets_path.read_text())
    secrets.pop("seeded_tenants_by_database")
    secrets.pop("priced_models_by_database")
    secrets_path.write_text(json.dumps(secrets))
    after_revoke = _Up(argv, env, tmp_path / "after-revoke.stderr")
    try:
        assert after_revoke.fields["key"] != first.fields["key"]
        listed = _cli(env, "adapters", "list", "--api-key", after_revoke.fields["key"])
        assert "ad1" in listed.stdout and "ad0" not in listed.stdout
        assert _price(database_url, "demo-model") == price_before
        after_revoke.stop()
    finally:
        after_revoke.kill()


@pytest.mark.slow
def test_a_start_on_another_database_prices_the_demo_model_there_too(
    database_url, empty_database_url, redis_url, e2e_model_dir, tmp_path
):
    """A price lives in the database: the state dir's record that it priced the demo model must not keep
    a start on a fresh database (the README's "Against an existing PostgreSQL") from pricing it there,
    else its invoices show amounts of 0 while the tenant, adapters and mixes were seeded. So does an api
    key: back on the first database, the start prints that database's key again (each switch minted one,
    and the one left behind stayed valid)."""
    state_dir = tmp_path / "state"
    shutil.copytree(e2e_model_dir, state_dir / "demo-model")
    (state_dir / "demo-model" / ".complete").write_text("ok\n")
    env = _env(tmp_path)
    demo_price = (DEMO_PROMPT_MICROS_PER_MILLION_TOKENS, DEMO_COMPLETION_MICROS_PER_MILLION_TOKENS)
    keys = []
    for url in (database_url, empty_database_url, database_url):
        up = _Up(_up_argv(state_dir, url, redis_url), env, tmp_path / "up.stderr")
        try:
            assert _price(url, "demo-model") == demo_price
            keys.append(up.fields["key"])
            up.stop()
        finally:
            up.kill()
    assert keys[2] == keys[0] != keys[1]


@pytest.mark.slow
def test_a_first_start_on_another_database_that_stopped_before_seeding_is_seeded_by_the_next(
    database_url, empty_database_url, redis_url, e2e_model_dir, tmp_path
):
    """The state dir recorded the tenants it seeded in one list for every database: once it had seeded
    `demo` in one, a first start on another that stopped after making the tenant there but before its
    seeding was done (Ctrl-C, an upload refused) left that tenant with no adapters, mixes or price on
    every later start, where the same stop on the first database was seeded by the next start."""
    state_dir = tmp_path / "state"
    shutil.copytree(e2e_model_dir, state_dir / "demo-model")
    (state_dir / "demo-model" / ".complete").write_text("ok\n")
    env = _env(tmp_path)
    first = _Up(_up_argv(state_dir, database_url, redis_url), env, tmp_path / "first.stderr")
    try:
        first.stop()
    finally:
        first.kill()

    # An adapter the control plane refuses, pushed after the others: this start makes the tenant on the
    # second database, then stops before its seeding is done.
    refused = state_dir / "demo-model" / "adapters" / "zz"
    shutil.copytree(state_dir / "demo-model" / "adapters" / "ad0", refused)
    (refused / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    argv = _up_argv(state_dir, empty_database_url, redis_url)
    stopped = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert "ready " not in stopped.stdout
    shutil.rmtree(refused)

    again = _Up(argv, env, tmp_path / "again.stderr")
    try:
        assert _price(empty_database_url, "demo-model") == (
            DEMO_PROMPT_MICROS_PER_MILLION_TOKENS,
            DEMO_COMPLETION_MICROS_PER_MILLION_TOKENS,
        )
        listed = _cli(env, "adapters", "list", "--api-key", again.fields["key"])
        assert listed.returncode == 0, listed.stderr
        assert "ad0" in listed.stdout and "zz" not in listed.stdout
        again.stop()
    finally:
        again.kill()


@pytest.mark.parametrize(
    ("flag", "variable", "purpose"),
    [
        ("--admin-port", "OPENLORA_ADMIN_PORT", "the control plane's admin API"),
        ("--port", "OPENLORA_PORT", "the worker's gRPC inference API"),
        ("--http-port", "OPENLORA_HTTP_PORT", "the OpenAI-compatible HTTP API"),
    ],
)
def test_a_busy_port_is_refused_in_one_line_naming_it_and_its_flag(
    database_url, redis_url, tmp_path, flag, variable, purpose
):
    """The line names the variable too: `make run`, the README's way to start, passes no flags."""
    state_dir = tmp_path / "state"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = _up_argv(state_dir, database_url, redis_url, {flag: str(port)})
        result = subprocess.run(
            argv, env=_env(tmp_path), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"error: port {port} on 127.0.0.1 ({purpose}) cannot be used: Address already in use"
    )
    assert f"choose another with {flag} PORT (or {variable}=PORT, as `make run` takes it;" in line
    assert not (state_dir / "logs").exists()  # nothing was started


def test_a_port_held_by_a_leftover_openlora_process_is_named_with_its_pid(database_url, redis_url, tmp_path):
    """After `up` was killed (kill -9), its worker drains its streams for up to the grace and holds its port;
    the next `up` said only "choose another port". It now names the process and what it is doing."""
    listener = (
        "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
        " print(s.getsockname()[1], flush=True); time.sleep(60)"
    )
    # A command line like a worker's started by `up` (python -m openlora.cli worker ...).
    leftover = subprocess.Popen(
        [sys.executable, "-c", listener, "openlora.cli", "worker"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(leftover.stdout.readline())
        argv = _up_argv(tmp_path / "state", database_url, redis_url, {"--port": str(port)})
        result = subprocess.run(
            argv, env=_env(tmp_path), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
    finally:
        leftover.kill()
        leftover.wait()
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert f"is held by openlora worker (pid {leftover.pid})" in line and "--port" in line


def test_a_port_held_by_a_running_up_says_to_stop_that_up(database_url, redis_url, tmp_path):
    """Two clones on the default ports: the second `up` told to wait for a worker to finish draining,
    which a worker of a running `up` never does. It now names that `up` and its state dir."""
    listener = (
        "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
        " print(s.getsockname()[1], flush=True); time.sleep(60)"
    )
    # A parent whose command line is `up`'s, and its worker-like child holding the port.
    parent_code = (
        "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', sys.argv[1], 'openlora.cli',"
        " 'worker'], stdout=subprocess.PIPE, text=True); print(c.stdout.readline().strip(), flush=True);"
        " c.wait()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, listener, "openlora.cli", "up", "--state-dir=first"],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        port = int(parent.stdout.readline())
        argv = _up_argv(tmp_path / "state", database_url, redis_url, {"--port": str(port)})
        result = subprocess.run(
            argv, env=_env(tmp_path), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    # Its flag's form with "=", relative to its working directory.
    assert f"of a running `openlora up` (pid {parent.pid}, state dir {tmp_path / 'first'})" in line
    assert "stop that one (Ctrl-C), or choose another port with --port" in line
    assert "finishing its streams" not in line


def _up_refusal(tmp_path: Path, state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_up_argv(state_dir, "postgresql://postgres@127.0.0.1:1/unused", "redis://127.0.0.1:1/0")],
        env=_env(tmp_path), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip


def test_a_state_dir_that_is_a_file_is_one_line_naming_the_flag(tmp_path):
    state_dir = tmp_path / "afile"
    state_dir.write_text("not a directory")
    result = _up_refusal(tmp_path, state_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: --state-dir" in result.stderr and "File exists" in result.stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [('{"admin_key": "op_x",', "is not valid JSON"), ('{"admin_key": "op_x"}', "must be an object holding")],
)
def test_a_damaged_secrets_file_is_one_line_naming_it_before_anything_starts(tmp_path, content, words):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "up-secrets.json").write_text(content)
    result = _up_refusal(tmp_path, state_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "up-secrets.json" in result.stderr and words in result.stderr
    assert not (state_dir / "logs").exists()  # nothing was started


def test_demo_model_into_a_file_is_one_line(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    result = _cli(_env(tmp_path), "demo-model", str(target))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
