"""A listen address (`--listen`, `--http-listen`, OPENLORA_LISTEN) is HOST:PORT with a port in 0..65535,
refused naming its flag otherwise: gRPC took a port past 65535 modulo 65536 (`127.0.0.1:99999` served on
34463, `:-1` on 65535) and answered a malformed one with 'the port is in use'."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.config import ControlPlaneConfig
from openlora.cli import main
from openlora.config import ControlPlaneSettings

BAD = ["127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:0x10", "127.0.0.1: 80", ":50051", "x"]
GOOD = ["127.0.0.1:0", "0.0.0.0:65535", "[::1]:50051", "localhost:50051"]


@pytest.mark.parametrize("listen", BAD)
def test_control_plane_refuses_a_malformed_listen_naming_the_flag_and_variable(
    tmp_path: Path, listen
) -> None:
    flags = {"state_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"--listen \(OPENLORA_LISTEN\) must be HOST:PORT"):
        ControlPlaneSettings.resolve({**flags, "listen": listen}, {})
    with pytest.raises(ValueError, match=r"--listen \(OPENLORA_LISTEN\) must be HOST:PORT"):
        ControlPlaneSettings.resolve(flags, {"OPENLORA_LISTEN": listen})
    with pytest.raises(ValueError, match="listen must be HOST:PORT"):
        ControlPlaneConfig(
            database_url="postgresql://h/db", state_dir=tmp_path, worker_token="t" * 16, listen=listen
        )


@pytest.mark.parametrize("listen", GOOD)
def test_control_plane_takes_a_well_formed_listen(tmp_path: Path, listen) -> None:
    assert ControlPlaneSettings.resolve({"state_dir": str(tmp_path), "listen": listen}, {}).listen == listen


def _worker(tmp_path: Path, *extra: str) -> list[str]:
    return ["worker", "--model", str(tmp_path), "--control-plane", "cp:1", "--worker-token", "t" * 20, *extra]


@pytest.mark.parametrize("flag", ["--listen", "--http-listen"])
@pytest.mark.parametrize("listen", BAD)
def test_worker_refuses_a_malformed_listen_naming_the_flag_before_loading_anything(
    tmp_path: Path, capsys, flag, listen
) -> None:
    assert main(_worker(tmp_path, flag, listen), environ={}) == 2
    variable = "OPENLORA_" + flag.removeprefix("--").replace("-", "_").upper()
    assert f"error: {flag} ({variable}) must be HOST:PORT" in capsys.readouterr().err
