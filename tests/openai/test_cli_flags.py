"""`--http-listen` / OPENLORA_HTTP_LISTEN reach the worker's config; a malformed one is refused."""

from __future__ import annotations

import argparse

import pytest

from openlora.commands.serving import add_commands, worker_config_from_args


def _config(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return worker_config_from_args(parser.parse_args(argv))


def _worker(tmp_path, *extra: str) -> list[str]:
    return ["worker", "--model", str(tmp_path), "--control-plane", "cp:1", "--worker-token", "t" * 20, *extra]


def test_http_listen_flag_and_environment(tmp_path, monkeypatch):
    assert _config(_worker(tmp_path)).http_listen == ""  # off unless asked for
    assert _config(_worker(tmp_path, "--http-listen", "0.0.0.0:8000")).http_listen == "0.0.0.0:8000"
    monkeypatch.setenv("OPENLORA_HTTP_LISTEN", "127.0.0.1:8123")
    assert _config(_worker(tmp_path)).http_listen == "127.0.0.1:8123"
    assert _config(_worker(tmp_path, "--http-listen", "[::1]:9000")).http_listen == "[::1]:9000"


@pytest.mark.parametrize("value", ["8000", "localhost", "host:port", "host:70000"])
def test_a_malformed_http_listen_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="http_listen must be HOST:PORT"):
        _config(_worker(tmp_path, "--http-listen", value))
