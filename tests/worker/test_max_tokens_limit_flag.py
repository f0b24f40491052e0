"""`--max-tokens-limit` below the default max_tokens (128) lowers the default with it; a worker given
`--max-tokens-limit 64` refused to start with `default_max_tokens must be in [1, max_tokens_limit]`,
naming a setting no flag sets. A limit below 1 is refused naming the flag."""

from __future__ import annotations

from pathlib import Path

from data_plane.server.config import WorkerConfig
from tests.refused_flags import assert_refused_before_start


def _config(**fields) -> WorkerConfig:
    return WorkerConfig(
        model_dir=Path("m"), control_plane_target="cp:1", worker_token="t", state_dir=Path("s"), **fields
    )


def test_a_limit_below_the_default_lowers_the_default():
    assert _config(max_tokens_limit=64).effective_default_max_tokens == 64
    assert _config(max_tokens_limit=1).effective_default_max_tokens == 1
    assert _config().effective_default_max_tokens == 128


def test_a_limit_below_one_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys):
    assert_refused_before_start(
        "worker",
        tmp_path,
        monkeypatch,
        capsys,
        ["--max-tokens-limit", "0"],
        {},
        "argument --max-tokens-limit: must be a whole number in [1, 2^63-1], written in ASCII digits, got '0'",
        ["OPENLORA_MAX_TOKENS_LIMIT"],
    )
