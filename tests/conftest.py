"""Session-wide real services for every test.

- `postgres_server_url`: the server `OPENLORA_TEST_DATABASE_URL` names, else an embedded PostgreSQL
  started for the session.
- `redis_url`: `OPENLORA_TEST_REDIS_URL`, else an embedded Redis started for the session.
- `database_url` (per test module): a fresh database with every migration applied, cloned from a
  template migrated once per session, dropped afterwards; tests never see each other's rows.
- `empty_database_url` (per test): a fresh database with no tables (for migration tests).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import psycopg
import pytest
from sqlalchemy.engine import make_url

import openlora  # noqa: F401  (first: it sets how gRPC handles fork before grpc is imported)


def _load_worker_test_support() -> None:
    """tests/worker/support.py as the module `worker_test_support`, once for every test package (their
    conftests take it from sys.modules: a test directory is not an importable package here)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "worker_test_support", Path(__file__).parent / "worker" / "support.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["worker_test_support"] = module
    spec.loader.exec_module(module)


_load_worker_test_support()


def _outside_pytest_tmp() -> Iterator[Path]:
    """A fresh directory that other users may enter (0755; the test creates it), outside pytest's basetemp,
    whose root a concurrent pytest run resets to 0700. Under root, PostgreSQL's user must reach what a
    test places there for it (a copy of the binaries)."""
    path = Path(tempfile.mkdtemp(prefix="openlora-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server_state_dir() -> Iterator[Path]:
    """A state directory for an embedded server (see `_outside_pytest_tmp`)."""
    yield from _outside_pytest_tmp()


def _with_database(server_url: str, database: str) -> str:
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


def _libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _create_database(server_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(_libpq_url(server_url), autocommit=True) as conn:
        suffix = f' TEMPLATE "{template}"' if template else ""
        conn.execute(f'CREATE DATABASE "{name}"{suffix}')
    return _with_database(server_url, name)


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(_libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    url = os.environ.get("OPENLORA_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from openlora.embedded import EmbeddedPostgres

    for state_dir in _outside_pytest_tmp():
        with EmbeddedPostgres(state_dir) as embedded_url:
            yield embedded_url


def xdist_worker_index() -> int | None:
    """This process's index among pytest-xdist's workers (`make test` runs two), None when run alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else None


def _redis_database_of_this_worker(url: str) -> str:
    """`url` with a logical database of this xdist worker's own (the URL's, plus the worker's index + 1,
    within Redis's default 16): tests read the hint stream and would see another worker's hints."""
    index = xdist_worker_index()
    if index is None:
        return url
    parsed = urlparse(url)
    base = int(parsed.path.lstrip("/") or 0)
    database = base + index + 1
    if database >= 16:
        raise pytest.UsageError(
            f"redis database {database} for xdist worker gw{index}: run at most {15 - base} workers"
        )
    return urlunparse(parsed._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("OPENLORA_TEST_REDIS_URL")
    if url:
        yield _redis_database_of_this_worker(url)
        return
    from openlora.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("embedded-redis")) as embedded_url:
        yield embedded_url


@pytest.fixture(scope="session")
def migrated_template_database(postgres_server_url: str) -> Iterator[str]:
    """Name of a database holding the migrated schema, used as the template of `database_url`."""
    from control_plane.db.migrate import upgrade

    name = f"openlora_tpl_{uuid.uuid4().hex[:12]}"
    upgrade(_create_database(postgres_server_url, name))
    yield name
    _drop_database(postgres_server_url, name)


@pytest.fixture(scope="module")
def database_url(postgres_server_url: str, migrated_template_database: str) -> Iterator[str]:
    name = f"openlora_t_{uuid.uuid4().hex[:12]}"
    url = _create_database(postgres_server_url, name, template=migrated_template_database)
    yield url
    _drop_database(postgres_server_url, name)


@pytest.fixture
def empty_database_url(postgres_server_url: str) -> Iterator[str]:
    name = f"openlora_e_{uuid.uuid4().hex[:12]}"
    url = _create_database(postgres_server_url, name)
    yield url
    _drop_database(postgres_server_url, name)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo model and its adapters, the files `openlora up` serves; written once per session
    (training it takes most of a minute) and only read by the tests."""
    from data_plane.demo import write_demo_model

    if xdist_worker_index() is None:
        out = tmp_path_factory.mktemp("demo-model")
        write_demo_model(out)
        return out
    # Under xdist the workers share one copy, written by the first to get here (the directory above each
    # worker's basetemp is the run's): training it twice at once on two cores took twice as long each.
    shared = tmp_path_factory.getbasetemp().parent
    out = shared / "demo-model"
    with open(shared / "demo-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        written = shared / "demo-model.complete"
        if not written.exists():
            shutil.rmtree(out, ignore_errors=True)
            write_demo_model(out)
            written.write_text("ok\n")
    return out
