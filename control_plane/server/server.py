"""Starting and stopping the control plane's gRPC server (AdminService, WorkerService, health,
reflection on one port)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine

from control_plane.app import ControlPlane
from control_plane.artifacts.store import ArtifactStore
from control_plane.config import ControlPlaneConfig
from control_plane.db import migrate
from control_plane.db.engine import libpq_url, make_engine, make_sessionmaker
from control_plane.hints.publisher import HintPublisher
from control_plane.prediction.predictor import run_predictor_loop
from control_plane.server.admin_servicer import AdminServicer
from control_plane.server.interceptor import ErrorMappingInterceptor
from control_plane.server.worker_servicer import WorkerServicer
from openlora.grpc_decoding import RequestDecodingInterceptor
from openlora.grpc_limits import connection_cap, server_options
from openlora.listen import ListenError, bind
from openlora.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_KEY_FILE = "admin_key"
DATABASE_PING_INTERVAL_S = 2.0
DATABASE_PING_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 8 << 20
SERVICE_NAMES = (
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
)


@dataclass
class RunningControlPlane:
    """A started server. `admin_key` is the bootstrap key when this start created it (or it was
    configured), else None; `admin_key_path` is the 0600 file holding the generated one."""

    server: grpc.aio.Server
    port: int
    app: ControlPlane
    engine: Engine
    health: health.HealthServicer
    admin_key: str | None
    admin_key_path: Path
    # The prediction loop's thread (None: off) and its stop signal.
    predictor: threading.Thread | None = None
    _stop_predictor: threading.Event = field(default_factory=threading.Event)
    # The task that keeps health in step with the database (`_watch_database`).
    database_watch: asyncio.Task | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish within the grace period, then releases all."""
        if self.database_watch is not None:
            self.database_watch.cancel()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.app.config.grace_period_s if grace_s is None else grace_s)
        self._stop_predictor.set()
        if self.predictor is not None:
            await asyncio.to_thread(self.predictor.join)
        self.app.publisher.close()
        self.engine.dispose()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _database_answers(database_url: str) -> bool:
    """Whether the database answers a query within DATABASE_PING_TIMEOUT_S, on a connection of its own
    (a frozen server accepts TCP but never completes the handshake: libpq's connect_timeout ends it)."""
    try:
        timeout_s = int(DATABASE_PING_TIMEOUT_S)
        with psycopg.connect(
            libpq_url(database_url),
            connect_timeout=timeout_s,
            options=f"-c statement_timeout={timeout_s * 1000}",
            autocommit=True,
        ) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


async def _watch_database(health_servicer, database_url: str) -> None:
    """Health follows the database: NOT_SERVING while it does not answer (every call would wait for it
    and then fail UNAVAILABLE), SERVING again once it does. Checked every DATABASE_PING_INTERVAL_S; a check
    still running past its timeout counts as no answer."""
    serving = True
    pending: asyncio.Future | None = None
    while True:
        await asyncio.sleep(DATABASE_PING_INTERVAL_S)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(_database_answers, database_url))
        done, _ = await asyncio.wait({pending}, timeout=DATABASE_PING_TIMEOUT_S + 1)
        answers = bool(done) and pending.result()
        if done:
            pending = None
        if answers != serving:
            serving = answers
            if serving:
                log.info("the database answers again; health SERVING")
            else:
                log.error("the database does not answer; health NOT_SERVING until it does")
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, status)


def _write_admin_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    path.chmod(0o600)


def prepare(config: ControlPlaneConfig) -> tuple[ControlPlane, Engine, str | None, Path]:
    """The control plane's app over a migrated (or checked) database with its operator bootstrapped, not
    yet serving: (app, database engine, the admin key made now or given, the key file's path)."""
    if config.migrate:
        migrate.upgrade(config.database_url)
    else:
        migrate.ensure_schema_current(config.database_url)
    engine = make_engine(config.database_url)
    state_dir = Path(config.state_dir)
    app = ControlPlane(
        config,
        make_sessionmaker(engine),
        ArtifactStore(state_dir / "artifacts"),
        HintPublisher(config.redis_url),
    )
    bootstrap = app.bootstrap()
    app.republish_revocations()
    key_path = state_dir / ADMIN_KEY_FILE
    if bootstrap.new_admin_key is not None and config.admin_key is None:
        _write_admin_key(key_path, bootstrap.new_admin_key)
    return app, engine, bootstrap.new_admin_key or config.admin_key, key_path


async def serve(config: ControlPlaneConfig) -> RunningControlPlane:
    """Migrates (or checks the schema), bootstraps the operator, binds `config.listen` (port 0 picks a
    free one) and starts serving. Raises SchemaBehindError when told not to migrate and behind,
    SchemaAheadError when a newer version migrated the database."""
    if config.metrics_port:
        from control_plane.metrics_http import start_metrics_server

        start_metrics_server(config.metrics_port)
    app, engine, admin_key, key_path = await asyncio.to_thread(prepare, config)
    max_connections = connection_cap(config.max_connections, server="control plane")
    server = grpc.aio.server(
        interceptors=[RequestDecodingInterceptor(), ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *server_options(max_connections),
        ],
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(app), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server
    )
    try:
        port = bind(server, config.listen, "--listen (OPENLORA_LISTEN)")
    except ListenError:
        engine.dispose()
        raise
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "control plane listening on %s (port %d, at most %d connections)",
        config.listen,
        port,
        max_connections,
    )
    running = RunningControlPlane(server, port, app, engine, health_servicer, admin_key, key_path)
    running.database_watch = asyncio.get_running_loop().create_task(
        _watch_database(health_servicer, config.database_url), name="database-health"
    )
    if config.redis_url and config.predictor_interval_s > 0:
        running.predictor = threading.Thread(
            target=run_predictor_loop,
            args=(app.sessions, config.redis_url, config.predictor_interval_s, running._stop_predictor),
            kwargs={"config": config.predictor},
            name="predictor",
            daemon=True,
        )
        running.predictor.start()
    return running
