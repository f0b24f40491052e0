"""The serving subcommands' argument handling (no servers)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from openlora.commands.serving import _parse_mix, add_commands, worker_config_from_args

from .conftest import ADMIN_KEY, BASE_MODEL, PUBLISHER, WORKER_TOKEN


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_mix_flag_parses_names_and_weights():
    assert _parse_mix("a=0.5, b=0.25") == [("a", 0.5), ("b", 0.25)]
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=WEIGHT"):
        _parse_mix("a")
    with pytest.raises(argparse.ArgumentTypeError, match="mix weight of 'a' must be a number"):
        _parse_mix("a=x")
    # `=W` is the base model (an ensemble member), as `mixes create` reads it; generate refused it
    assert _parse_mix("uppercase=1,=3") == [("uppercase", 1.0), ("", 3.0)]


def test_worker_flags_build_one_frozen_config(tmp_path):
    args = _parse(
        ["worker", "--model", str(tmp_path), "--control-plane", "cp:1", "--worker-token", "t" * 20,
         "--max-waiting", "7", "--auth-cache-ttl-s", "2", "--num-kv-blocks", "64"]
    )  # fmt: skip
    config = worker_config_from_args(args)
    assert (config.control_plane_target, config.max_waiting, config.auth_cache_ttl_s) == ("cp:1", 7, 2.0)
    assert config.engine.num_kv_blocks == 64
    assert config.base_model_name == Path(tmp_path).name
    with pytest.raises(AttributeError):
        config.max_waiting = 1  # type: ignore[misc]


def test_worker_environment_is_the_fallback_for_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_WORKER_TOKEN", "from-env-" + "x" * 10)
    monkeypatch.setenv("OPENLORA_CONTROL_PLANE", "cp:2")
    monkeypatch.setenv("OPENLORA_MAX_WAITING", "9")
    config = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), "--max-waiting", "3"]))
    assert config.worker_token.startswith("from-env-")
    assert config.control_plane_target == "cp:2"
    assert config.max_waiting == 3


_TARGET = ["--control-plane", "cp:1", "--worker-token", "t" * 20]


@pytest.mark.parametrize(
    ("word", "expected"),
    [("1", True), ("on", True), ("TRUE", True), ("off", False), ("no", False), ("", False)],
)
def test_http_metrics_variable_reads_yes_and_no_words(tmp_path, monkeypatch, word, expected):
    """Words "off" and "no" turned the unauthenticated /metrics on: anything but "", "0", "false" read as yes."""
    monkeypatch.setenv("OPENLORA_HTTP_METRICS", word)
    config = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *_TARGET]))
    assert config.http_metrics is expected


def test_http_metrics_variable_of_another_word_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_HTTP_METRICS", "maybe")
    with pytest.raises(ValueError, match=r"OPENLORA_HTTP_METRICS \(for --http-metrics\) must be one of"):
        worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *_TARGET]))


def test_auth_cache_ttl_over_ten_seconds_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        _parse(["worker", "--model", str(tmp_path), *_TARGET, "--auth-cache-ttl-s", "11"])
    assert exited.value.code == 2
    assert "argument --auth-cache-ttl-s: must be a number in [0, 10]" in capsys.readouterr().err


def test_request_id_reservation_is_a_flag_with_its_variable_as_the_fallback(tmp_path, monkeypatch):
    default = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *_TARGET]))
    assert default.request_id_reservation_s == 30.0
    monkeypatch.setenv("OPENLORA_REQUEST_ID_RESERVATION_S", "5")
    from_env = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *_TARGET]))
    assert from_env.request_id_reservation_s == 5.0
    argv = ["worker", "--model", str(tmp_path), *_TARGET, "--request-id-reservation-s", "2.5"]
    assert worker_config_from_args(_parse(argv)).request_id_reservation_s == 2.5


@pytest.mark.parametrize("seconds", ["0.5", "3601"])
def test_request_id_reservation_outside_one_second_to_an_hour_is_refused(tmp_path, capsys, seconds):
    with pytest.raises(SystemExit) as exited:
        _parse(["worker", "--model", str(tmp_path), *_TARGET, "--request-id-reservation-s", seconds])
    assert exited.value.code == 2
    assert "argument --request-id-reservation-s: must be a number in [1, 3600]" in capsys.readouterr().err


def test_generate_without_target_or_key_explains_what_to_do(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", "hello"],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert "openlora up" in result.stderr
    assert "context file" not in result.stderr  # absent: nothing to say about it


@pytest.mark.parametrize(("content", "why"), [("{bad", "not valid JSON"), ("[1]", "not a JSON object")])
def test_a_malformed_context_file_is_named_where_its_settings_are_missing(tmp_path, content, why):
    """A context file that cannot be read was ignored in silence: the message said only to run `up`."""
    context = tmp_path / "context.json"
    context.write_text(content)
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(context), "HOME": str(tmp_path)}
    for command in (["generate", "hello"], ["adapters", "list"]):
        result = subprocess.run(
            [sys.executable, "-m", "openlora.cli", *command],
            env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert f"the context file {context} was ignored: it is {why}" in result.stderr


def test_a_refused_generate_prints_nothing_to_stdout_and_the_status_to_stderr(system, tmp_path):
    """Nothing was streamed: stdout stays empty (it printed an empty line), the refusal goes to stderr."""
    _, _, key = system.new_tenant()
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", "--target", system.target, "--api-key", key,
         "--adapter", "no-such-adapter", "hello"],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: NOT_FOUND")


def _admin_flags(system) -> list[str]:
    return ["--admin-target", system.control_plane.target, "--api-key", ADMIN_KEY]


def test_output_into_a_reader_that_stops_early_ends_quietly(system, tmp_path):
    """`openlora adapters list | head -2`: the reader leaves, the writer ends without a traceback."""
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "openlora.cli", "adapters", "list", "--public", *_admin_flags(system)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    process.stdout.close()  # the reader is gone before anything is written
    stderr = process.stderr.read().decode()
    assert process.wait(60) == 141, stderr
    assert stderr == ""


def test_adapters_push_keep_warm_marks_the_adapter_keep_warm(system):
    from openlora.admin_client import AdminClient
    from openlora.cli import main

    directory = str(system.model_dir / "adapters" / "ad0")
    for name, flags in (("cli-warm", ["--keep-warm"]), ("cli-plain", [])):
        argv = ["adapters", "push", directory, "--name", name, "--tenant", PUBLISHER, *flags]
        assert main([*argv, *_admin_flags(system)], environ={}) == 0
    with AdminClient(system.control_plane.target, ADMIN_KEY) as admin:
        assert admin.get_adapter("cli-warm", PUBLISHER).keep_warm
        assert not admin.get_adapter("cli-plain", PUBLISHER).keep_warm


def test_an_operator_only_command_with_a_tenant_key_says_where_up_keeps_the_operator_key(system, capsys):
    from openlora.cli import main

    _, _, key = system.new_tenant(admin=True)
    argv = ["tenants", "create", "someone", "--admin-target", system.control_plane.target, "--api-key", key]
    assert main(argv, environ={}) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: PERMISSION_DENIED: only an operator admin key may do this"
    assert "up-secrets.json" in err[1] and "admin_key" in err[1]


def test_mixes_create_help_gives_the_density_range_the_server_enforces():
    from openlora.cli import build_parser
    from openlora.mix_rules import MIN_DENSITY, density_problem

    mixes = build_parser()._subparsers._group_actions[0].choices["mixes"]
    create = mixes._subparsers._group_actions[0].choices["create"]
    assert f"[{MIN_DENSITY:g}, 1]" in " ".join(create.format_help().split())
    assert density_problem(MIN_DENSITY) is None and density_problem(MIN_DENSITY / 2) is not None


def test_up_flags_fall_back_to_their_environment_variables(tmp_path, monkeypatch):
    from openlora.commands.serving import up_config_from_args

    environ = {
        "OPENLORA_HOST": "127.0.0.2",
        "OPENLORA_PORT": "6001",
        "OPENLORA_ADMIN_PORT": "6002",
        "OPENLORA_HTTP_PORT": "6003",
        "OPENLORA_METRICS_PORT": "6004",
        "OPENLORA_ADMIN_METRICS_PORT": "6005",
        "OPENLORA_TENANT": "acme",
    }
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    config = up_config_from_args(_parse(["up", "--state-dir", str(tmp_path)]), environ)
    assert (config.host, config.port, config.admin_port, config.http_port) == ("127.0.0.2", 6001, 6002, 6003)
    assert (config.metrics_port, config.admin_metrics_port, config.tenant) == (6004, 6005, "acme")
    flagged = up_config_from_args(_parse(["up", "--state-dir", str(tmp_path), "--port", "7001"]), environ)
    assert flagged.port == 7001
    with pytest.raises(SystemExit):  # argparse's refusal, naming --metrics-port
        _parse(["up", "--metrics-port", "70000"])


def _run_cli(argv: list[str], env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OPENLORA_CONTEXT": str(tmp_path / "none.json")}
    return subprocess.run(
        [sys.executable, "-m", "openlora.cli", *argv],
        env={**env, **env_extra}, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("variable", "argv", "flag"),
    [
        ("OPENLORA_MAX_WAITING", ["worker", "--model", "m", "--control-plane", "cp:1"], "--max-waiting"),
        ("OPENLORA_DRAIN_GRACE_S", ["worker", "--model", "m", "--control-plane", "cp:1"], "--drain-grace-s"),
        ("OPENLORA_PORT", ["up"], "--port"),
        ("OPENLORA_METRICS_PORT", ["control-plane", "--no-migrate"], "--metrics-port"),
    ],
)
def test_a_malformed_number_in_the_environment_is_refused_in_one_line_naming_its_flag(
    variable, argv, flag, tmp_path
):
    result = _run_cli(argv, {variable: "abc"}, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert flag in result.stderr and "'abc'" in result.stderr


def test_a_malformed_number_for_one_command_leaves_the_others_usable(tmp_path):
    """Every command's defaults are read when the parser is built: a bad worker variable stopped them all."""
    result = _run_cli(["generate", "--help"], {"OPENLORA_MAX_WAITING": "abc", "OPENLORA_PORT": "x"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_the_control_plane_refuses_says_so_in_one_line_and_exits_2(system, tmp_path):
    """A wrong --worker-token: a 40-line traceback and exit 1 (which a supervisor restarts for ever)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "worker", "--model", str(system.model_dir),
         "--control-plane", system.control_plane.target, "--worker-token", "wt_" + "wrong" * 4,
         "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "worker")],
        env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: the control plane refused this worker: unknown worker token" in result.stderr
    assert "hint: --worker-token (OPENLORA_WORKER_TOKEN)" in result.stderr


def _generate_cli(args: list[str], tmp_path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", *args], input=stdin,
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip


def test_generate_mix_method_without_a_mix_is_refused_not_ignored(system, tmp_path):
    _, _, key = system.new_tenant()
    result = _generate_cli(
        ["--target", system.target, "--api-key", key, "--mix-method", "ties", "hello"], tmp_path
    )
    assert result.returncode == 2 and "--mix-method applies only to a --mix" in result.stderr


def test_generate_from_stdin_drops_the_newline_echo_adds(system, tmp_path):
    """`echo "prompt" | openlora generate -` gives the answer of "prompt", not of "prompt\\n"."""
    _, _, key = system.new_tenant()
    flags = ["--target", system.target, "--api-key", key, "--max-tokens", "6", "--verbose"]
    piped = _generate_cli([*flags, "-"], tmp_path, stdin="one two three\n")
    given = _generate_cli([*flags, "one two three"], tmp_path)
    assert piped.returncode == given.returncode == 0
    assert piped.stdout == given.stdout
    prompt_tokens = [line.split("prompt_tokens=")[1].split()[0] for line in (piped.stderr, given.stderr)]
    assert prompt_tokens[0] == prompt_tokens[1]


def test_a_negative_seed_is_its_twos_complement_as_over_http(system, tmp_path):
    """`--seed -1` was refused as 'sampling.seed: -1 does not fit the field' while the HTTP API takes
    OpenAI's int64 seeds; both now mean the same uint64 seed."""
    _, _, key = system.new_tenant()
    flags = ["--target", system.target, "--api-key", key, "--max-tokens", "8", "--temperature", "1.5"]
    negative = _generate_cli([*flags, "--seed", "-1", "one two three"], tmp_path)
    unsigned = _generate_cli([*flags, "--seed", str((1 << 64) - 1), "one two three"], tmp_path)
    assert negative.returncode == unsigned.returncode == 0, negative.stderr
    assert negative.stdout == unsigned.stdout
    too_low = _generate_cli([*flags, "--seed", str(-(1 << 63) - 1), "one two three"], tmp_path)
    assert too_low.returncode == 2 and "--seed" in too_low.stderr and "Traceback" not in too_low.stderr


@pytest.mark.parametrize(("flag", "value"), [("--top-k", "99999999999"), ("--max-tokens", "99999999999")])
def test_a_flag_value_the_request_cannot_hold_is_refused_naming_the_flag(flag, value, tmp_path):
    """It was named by the request's field (`sampling.top_k: ... does not fit the field`), which the user
    never typed; refused before anything is sent, so no server is needed."""
    result = _generate_cli(["--target", "127.0.0.1:1", "--api-key", "k" * 20, flag, value, "hello"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {flag}: {value} does not fit"), result.stderr


def test_generate_against_an_address_nobody_answers_says_what_to_check(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _generate_cli(["--target", f"127.0.0.1:{port}", "--api-key", "k" * 20, "hello"], tmp_path)
    assert result.returncode == 1
    assert "error: UNAVAILABLE" in result.stderr and "hint: nothing answers at that address" in result.stderr


@pytest.mark.parametrize("command", [["generate", "--target"], ["adapters", "list", "--admin-target"]])
def test_a_command_sent_to_an_http_api_address_says_it_is_not_grpc(tmp_path, command):
    """`--target` (or `--admin-target`) given the OpenAI API's address (`openai=` on the ready line) was told
    "nothing answers at that address: is `openlora up` running?", while an HTTP server answered there."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"PATH": "/usr/bin:/bin", "OPENLORA_CONTEXT": str(tmp_path / "missing.json"), "HOME": str(tmp_path)}
    try:
        target = f"127.0.0.1:{server.server_address[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "openlora.cli", *command, target, "--api-key", "k" * 20]
            + (["hello"] if command[0] == "generate" else []),
            env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert "error: UNAVAILABLE" in result.stderr
    assert "hint: that address answers, but not in gRPC: it is an HTTP/1.x server" in result.stderr
    assert "inference=" in result.stderr and "admin=" in result.stderr
    assert "nothing answers" not in result.stderr


def test_a_command_sent_to_the_other_services_address_says_which_address_to_use(system, tmp_path, capsys):
    """`generate` against the control plane's address, or an admin command against a worker's, answered
    only `UNIMPLEMENTED: Method not found!`: it now says which address each kind of command takes."""
    from openlora.cli import main

    result = _generate_cli(["--target", system.control_plane.target, "--api-key", ADMIN_KEY, "hi"], tmp_path)
    assert result.returncode == 1 and "error: UNIMPLEMENTED" in result.stderr
    assert "hint: that address serves another openlora service" in result.stderr
    code = main(["adapters", "list", "--admin-target", system.target, "--api-key", ADMIN_KEY], environ={})
    err = capsys.readouterr().err
    assert code == 1 and "error: UNIMPLEMENTED" in err
    assert "go to the control plane (--admin-target" in err


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("OPENLORA_LOG_LEVEL", "bogus", "--log-level (OPENLORA_LOG_LEVEL) must be one of DEBUG, INFO"),
        ("OPENLORA_DTYPE", "float64", "--dtype (OPENLORA_DTYPE) must be auto or one of"),
    ],
)
def test_a_worker_setting_refused_as_the_engine_is_built_is_named_by_its_flag_and_variable(
    tmp_path, variable, value, named
):
    """These were refused under the engine's own names ("max_num_seqs must be positive", "Unknown level:
    'BOGUS'"), which name no flag or variable the operator could look for."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), variable: value}
    argv = [
        "worker",
        "--model",
        str(tmp_path / "model"),
        "--control-plane",
        "127.0.0.1:1",
        "--worker-token",
        "t",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", *argv], env=env, capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {named}")


@pytest.mark.parametrize(
    "given, missing",
    [
        (["--worker-token", "t"], "--control-plane (or OPENLORA_CONTROL_PLANE, else OPENLORA_ADMIN_TARGET)"),
        (["--control-plane", "127.0.0.1:1"], "--worker-token (or OPENLORA_WORKER_TOKEN)"),
    ],
)
def test_a_worker_without_its_control_plane_or_token_names_the_flag_and_variable_once(
    tmp_path, given, missing
):
    """These were said by the config's field names: "control_plane_target is required (flag
    --control-plane or OPENLORA_CONTROL_PLANE)", and "--worker-token (OPENLORA_WORKER_TOKEN) is required
    (flag --worker-token or OPENLORA_WORKER_TOKEN)" once the field was reworded to its flag."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    argv = ["worker", "--model", str(tmp_path / "model"), *given]
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", *argv], env=env, capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {missing} is required")
    flag = missing.split()[0]
    assert line.count(flag) == 1 and "control_plane_target" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_drain_grace_that_is_not_a_finite_number_of_seconds_is_refused_by_worker_and_up(
    tmp_path, monkeypatch, capsys, value
):
    """NaN was taken: the worker's drain timed out at once (every stream cut, as with 0), and `up` started
    its databases before the worker refused -1."""
    with pytest.raises(SystemExit):
        _parse(["worker", "--model", str(tmp_path), *_TARGET, "--drain-grace-s", value])
    assert "argument --drain-grace-s: must be a number >= 0" in capsys.readouterr().err
    monkeypatch.setenv("OPENLORA_DRAIN_GRACE_S", value)
    with pytest.raises(SystemExit):
        _parse(["up", "--state-dir", str(tmp_path)])
    assert "OPENLORA_DRAIN_GRACE_S must be a number >= 0" in capsys.readouterr().err


def _no_file_may_grow() -> None:
    """In the child: any write to a file fails (EFBIG), as every write does on a full disk."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_worker_whose_state_dir_cannot_be_written_says_so_in_one_line(tmp_path):
    """A full disk under the state dir stops the worker at its start with one line naming the state dir
    and why (status 1: a supervisor starts it again, once there may be room), not a traceback."""
    state_dir = tmp_path / "state"
    # No .pyc written under the file size limit: CPython writes one cut short and the next import fails.
    env = {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "OPENLORA_CONTEXT": str(tmp_path / "none.json"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "worker", "--model", str(tmp_path / "m"),
         "--control-plane", "127.0.0.1:1", "--worker-token", "t" * 32, "--state-dir", str(state_dir)],
        env=env, capture_output=True, text=True, timeout=60, preexec_fn=_no_file_may_grow,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(state_dir) in lines[0], result.stderr


def _files_may_hold_16_bytes() -> None:
    """In the child: the pid file (a few bytes) can be written, the worker id (32 hex digits) cannot."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_worker_that_cannot_record_its_registration_says_so_in_one_line(system, tmp_path):
    """The disk fills between the state dir's lock and the registration: the worker id the control plane
    gave cannot be recorded. One line naming the state dir, status 1, and no temporary file left holding
    the space the next start needs (it was a traceback, with the partial file left behind)."""
    state_dir = tmp_path / "state"
    # No .pyc written under the file size limit: CPython writes one cut short and the next import fails.
    env = {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "OPENLORA_CONTEXT": str(tmp_path / "none.json"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "worker", "--model", str(system.model_dir),
         "--model-name", BASE_MODEL, "--control-plane", system.control_plane.target,
         "--worker-token", WORKER_TOKEN, "--state-dir", str(state_dir), "--listen", "127.0.0.1:0",
         "--num-kv-blocks", "64", "--max-lora-rank", "16"],
        env=env, capture_output=True, text=True, timeout=120, preexec_fn=_files_may_hold_16_bytes,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the state directory ") and str(state_dir) in last, result.stderr
    assert sorted(p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")) == []


_TARGET_FLAGS = {
    "generate": ("--target", "OPENLORA_TARGET"),
    "adapters": ("--admin-target", "OPENLORA_ADMIN_TARGET"),
}


@pytest.mark.parametrize("command", [["generate", "hello"], ["adapters", "list"]])
def test_a_server_address_grpc_would_misread_is_refused_naming_where_it_came_from(tmp_path, command):
    """gRPC calls a port past 65535 modulo 65536 (`127.0.0.1:99999` called 34463, where another server may
    answer) and an address without a port on 443; the command went there and said "nothing answers"."""
    flag, variable = _TARGET_FLAGS[command[0]]
    for address in ("127.0.0.1:99999", "localhost", "127.0.0.1:0", "[::1]", "::1"):
        result = _run_cli([*command, flag, address, "--api-key", "k" * 20], {}, tmp_path)
        assert result.returncode == 2
        assert result.stderr == f"error: {flag} must be HOST:PORT with a port in 1..65535, got {address!r}\n"
    # Past the 4,300 digits int() reads: the same refusal, not int()'s own message naming no setting.
    result = _run_cli([*command, flag, "127.0.0.1:" + "1" * 5000, "--api-key", "k" * 20], {}, tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {flag} must be HOST:PORT")
    result = _run_cli([*command, "--api-key", "k" * 20], {variable: "127.0.0.1:65536"}, tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {variable} must be HOST:PORT")
    # gRPC's other forms are gRPC's to read (its refusal or its connection error, not this check's).
    for address in (f"unix:{tmp_path / 'nothing.sock'}", "dns:///127.0.0.1:1", "[::1]:1"):
        result = _run_cli([*command, flag, address, "--api-key", "k" * 20], {}, tmp_path)
        assert result.returncode != 0 and "must be HOST:PORT" not in result.stderr, result.stderr
        assert "invalid literal" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    context = tmp_path / "context.json"
    context.write_text(
        json.dumps({"target": "127.0.0.1:70000", "admin_target": "127.0.0.1:70000", "api_key": "k" * 20})
    )
    result = _run_cli(command, {"OPENLORA_CONTEXT": str(context)}, tmp_path)
    entry = "target" if command[0] == "generate" else "admin_target"
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {entry} of the context file {context} must be HOST:PORT")


@pytest.mark.parametrize("command", [["generate", "hello"], ["adapters", "list"]])
def test_an_api_key_grpc_metadata_cannot_carry_is_refused_naming_where_it_came_from(tmp_path, command):
    """A key with a character outside printable ASCII (a paste gone wrong, a damaged context file) got
    grpc core's log line and `INTERNAL: Invalid metadata`, naming no setting."""
    flag = _TARGET_FLAGS[command[0]][0]
    result = _run_cli([*command, flag, "127.0.0.1:1", "--api-key", "olk_sécret"], {}, tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: --api-key must be printable ASCII, as keys are; character 6 is U+00E9\n"
    context = tmp_path / "context.json"
    context.write_text(
        json.dumps({"target": "127.0.0.1:1", "admin_target": "127.0.0.1:1", "api_key": "olk_\n"})
    )
    result = _run_cli(command, {"OPENLORA_CONTEXT": str(context)}, tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: api_key of the context file {context} must be printable ASCII, as keys are; "
        "character 5 is U+000A\n"
    )


@pytest.mark.parametrize(
    "command", [["adapters", "list"], ["tenants", "create", "acme"], ["usage"], ["mixes", "list"]]
)
def test_ctrl_c_during_an_admin_call_ends_quietly_with_status_130(tmp_path, command):
    """Ctrl-C while an admin command waited for its answer printed a traceback through grpc's internals."""
    import signal
    import socket

    with socket.socket() as listener:  # takes the connection and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "OPENLORA_CONTEXT": str(tmp_path / "none.json"),
        }
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, "-m", "openlora.cli", *command, "--admin-target", target, "--api-key", "k" * 20],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        listener.settimeout(60)
        connection, _ = listener.accept()  # the command is in its call now
        with connection:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (out, err) == ("", "")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["tenants", "create", b"\xff"], "name"),
        (["adapters", "list", "--tenant", b"t\xff"], "--tenant"),
        (["mixes", "create", "m", "--mix", b"\xff=1"], "--mix"),
        (["generate", "--adapter", b"\xff", "hello"], "--adapter"),
        (["generate", "--stop", b"a\xff", "hello"], "--stop"),
    ],
)
def test_an_argument_that_is_not_utf8_is_refused_naming_it(tmp_path, argv, named):
    """Bytes that are not UTF-8 in an argument (a file name pasted from another system's listing) were
    refused as "'utf-8' codec can't encode character '\\udcff' in position 0", naming no argument."""
    flag = "--target" if argv[0] == "generate" else "--admin-target"
    result = _run_cli([*argv, flag, "127.0.0.1:1", "--api-key", "k" * 20], {}, tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {named} is not UTF-8 text\n"


def test_a_prompt_on_stdin_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    """It was named `--prompt` (a flag generate does not have) and echoed whole, escapes and all."""
    result = subprocess.run(
        [sys.executable, "-m", "openlora.cli", "generate", "--target", "127.0.0.1:1", "--api-key", "k" * 20, "-"],
        input=b"one two" * 1000 + b"\xff",
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OPENLORA_CONTEXT": str(tmp_path / "none.json")},
        capture_output=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == b"error: prompt: stdin is not UTF-8 text\n"
