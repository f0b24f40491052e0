"""docker-compose.yml wires the real processes: official images with health checks, and commands the CLI
accepts. `docker compose config` validates the file where the compose client is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from openlora.cli import build_parser

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_databases_use_official_images_with_health_checks_and_a_postgres_volume(compose: dict) -> None:
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert "pgdata" in compose["volumes"]


@pytest.mark.parametrize("service", ["control-plane", "worker", "worker-gpu", "model-init"])
def test_every_openlora_service_command_is_accepted_by_the_cli(compose: dict, service: str) -> None:
    command = compose["services"][service]["command"]
    args = build_parser().parse_args(command)  # argparse exits (SystemExit) on an unknown flag
    assert args.command == command[0]


def test_every_long_running_service_restarts_and_the_one_shot_job_does_not(compose: dict) -> None:
    """A control plane started while PostgreSQL was down (or one that crashed) exits; with no restart
    policy it stayed down until someone restarted it."""
    services = compose["services"]
    for name, service in services.items():
        expected = None if name == "model-init" else "unless-stopped"
        assert service.get("restart") == expected, name


def test_processes_reach_each_other_by_service_name(compose: dict) -> None:
    services = compose["services"]
    env = services["control-plane"]["environment"]
    assert "@postgres:5432/" in env["OPENLORA_DATABASE_URL"]
    assert env["OPENLORA_REDIS_URL"].startswith("redis://redis:6379")
    worker_command = services["worker"]["command"]
    assert worker_command[worker_command.index("--control-plane") + 1] == "control-plane:50051"
    assert services["worker"]["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
    assert services["control-plane"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_gpu_worker_is_behind_a_profile_and_reserves_a_gpu(compose: dict) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "profiles" not in compose["services"]["worker"]


def _compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_client() is None, reason="no docker compose client installed")
def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        [*_compose_client(), "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
