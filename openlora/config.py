"""Settings of the `openlora` command line, resolved once at the entry point into frozen dataclasses.

Order of resolution: flags, then `OPENLORA_*` environment variables, then the context file that
`openlora up` writes (`OPENLORA_CONTEXT`, default `$XDG_CONFIG_HOME/openlora/context.json`)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.config import DEFAULT_LISTEN, ControlPlaneConfig
from control_plane.prediction.demand import PredictorConfig
from control_plane.prediction.settings import resolve_interval_s, resolve_predictor_config
from openlora.grpc_limits import DEFAULT_MAX_CONNECTIONS
from openlora.listen import address_problem
from openlora.log_level import resolve_log_level
from openlora.safe_json import JsonFieldError, load_json
from openlora.setting_rules import given_text, whole_number
from openlora.text_rules import quoted

DEFAULT_STATE_DIR = Path(".state/control-plane")
WORKER_TOKEN_FILE = "worker_token"
MAX_CONTEXT_BYTES = 1 << 20


def context_path(environ: Mapping[str, str]) -> Path:
    if environ.get("OPENLORA_CONTEXT"):
        return Path(environ["OPENLORA_CONTEXT"])
    base = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "openlora" / "context.json"


def _load_context(environ: Mapping[str, str]) -> tuple[dict, str]:
    """(the context file's string entries, why it could not be read: "" when absent or readable)."""
    path = context_path(environ)
    try:
        data = load_json(path.read_bytes(), "context", max_bytes=MAX_CONTEXT_BYTES)
    except FileNotFoundError:
        return {}, ""
    except OSError as error:
        return {}, f"the context file {path} could not be read: {error.strerror}"
    except JsonFieldError as error:
        return {}, f"the context file {path} was ignored: it is {error.reason}"
    if not isinstance(data, dict):
        return {}, f"the context file {path} was ignored: it is not a JSON object"
    return {k: v for k, v in data.items() if isinstance(v, str)}, ""


def read_context(environ: Mapping[str, str]) -> dict:
    """The context file's string entries as a dict; {} when absent, unreadable or malformed (then
    `context_problem` says why, for the message that reports the missing setting)."""
    return _load_context(environ)[0]


def context_problem(environ: Mapping[str, str]) -> str:
    """Why the context file that exists could not be read, as a clause to add to a message ("" when it
    is absent or readable): a malformed file is otherwise ignored in silence."""
    problem = _load_context(environ)[1]
    return f" ({problem})" if problem else ""


def first_given(*candidates: tuple[str | None, str]) -> tuple[str | None, str]:
    """(the first non-empty value of the (value, where it comes from) pairs, where it came from), or
    (None, "") when none is given."""
    return next(((value, source) for value, source in candidates if value), (None, ""))


def target_problem(target: str) -> str | None:
    """Why a client's server address `target` is not HOST:PORT with a port in 1..65535, or None. gRPC
    calls a port past 65535 modulo 65536 (`127.0.0.1:99999` called 34463, where another server may
    answer) and an address without a port on 443 (`[::1]` too). gRPC's other forms (`unix:PATH`,
    `dns:///HOST:PORT`) pass: only a port written as digits is checked; an IPv6 address takes brackets."""
    host, colon, port = target.rpartition(":")
    numeric = port.isascii() and port.isdigit()
    digits = port.lstrip("0")  # int() refuses past 4,300 digits, with a message naming no setting
    in_range = numeric and len(digits) <= 5 and 1 <= int(digits or "0") <= 65535
    # An IPv6 address without a port: bracketed (`[::1]`), or bare (`::1`, whose last group reads as one).
    ipv6_without_port = target.endswith("]") or (
        not target.startswith(("[", "unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:"))
        and target.count(":") > 1
    )
    if not colon or ipv6_without_port or (numeric and not (host and in_range)):
        return f"must be HOST:PORT with a port in 1..65535, got {quoted(target)}"
    return None


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be sent as a Bearer credential, or None: gRPC metadata carries printable ASCII
    only, and grpc refused anything else with INTERNAL "Invalid metadata" (and a log line of its core) that
    named no setting. Never echoes the key."""
    for position, char in enumerate(key):
        if not " " <= char <= "~":
            return f"must be printable ASCII, as keys are; character {position + 1} is U+{ord(char):04X}"
    return None


def client_settings(
    target: tuple[str | None, str], api_key: tuple[str | None, str]
) -> tuple[str | None, str | None]:
    """(target, api key) as `first_given` picked them, each refused with a ValueError naming where it came
    from when it cannot be sent (`target_problem`, `api_key_problem`); a missing one stays None."""
    for (value, source), problem in ((target, target_problem), (api_key, api_key_problem)):
        if value and (why := problem(value)) is not None:
            raise ValueError(f"{source} {why}")
    return target[0], api_key[0]


def context_source(environ: Mapping[str, str], entry: str) -> str:
    """Where a setting read from the context file came from, for a message that refuses it."""
    return f"{entry} of the context file {context_path(environ)}"


def new_secret(prefix: str) -> str:
    """A random secret under a fixed prefix: a bare token_urlsafe starts with "-" one time in 64, and a
    command line then reads `--api-key -xyz` (or `--worker-token -xyz`) as a flag."""
    return prefix + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AdminSettings:
    """Where the admin commands connect and with which key."""

    admin_target: str
    api_key: str

    @classmethod
    def resolve(
        cls,
        target_flag: str | None,
        key_flag: str | None,
        environ: Mapping[str, str],
        context: Mapping[str, str],
    ) -> AdminSettings:
        target, key = client_settings(
            first_given(
                (target_flag, "--admin-target"),
                (environ.get("OPENLORA_ADMIN_TARGET"), "OPENLORA_ADMIN_TARGET"),
                (context.get("admin_target"), context_source(environ, "admin_target")),
            ),
            first_given(
                (key_flag, "--api-key"),
                (environ.get("OPENLORA_API_KEY"), "OPENLORA_API_KEY"),
                (environ.get("OPENLORA_ADMIN_KEY"), "OPENLORA_ADMIN_KEY"),
                (context.get("api_key"), context_source(environ, "api_key")),
            ),
        )
        if not target:
            raise ValueError(
                "no control plane address: pass --admin-target, set OPENLORA_ADMIN_TARGET, or run `openlora up`"
                + context_problem(environ)
            )
        if not key:
            raise ValueError(
                "no api key: pass --api-key, set OPENLORA_API_KEY, or run `openlora up`"
                + context_problem(environ)
            )
        return cls(target, key)


@dataclass(frozen=True)
class ControlPlaneSettings:
    """`openlora control-plane` before the embedded servers it may need are started."""

    listen: str
    database_url: str | None
    redis_url: str | None
    state_dir: Path
    worker_token: str | None
    admin_key: str | None
    migrate: bool
    migrate_only: bool
    metrics_port: int
    predictor_interval_s: float = 5.0
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.migrate_only and not self.migrate:
            raise ValueError("--migrate-only and --no-migrate contradict each other")
        if (problem := address_problem(self.listen)) is not None:
            raise ValueError(f"--listen (OPENLORA_LISTEN) {problem}")

    @classmethod
    def resolve(cls, flags: Mapping[str, object], environ: Mapping[str, str]) -> ControlPlaneSettings:
        def pick(flag: str, env: str) -> str | None:
            value = flags.get(flag)
            return str(value) if value not in (None, "") else (environ.get(env) or None)

        def whole(dest: str, flag: str, env: str, default: int, **bounds) -> int:
            text, source = given_text(flags, environ, dest, flag, env)
            if text is None:
                return default
            try:
                return whole_number(text, **bounds)
            except ValueError as error:
                raise ValueError(f"{source} {error}") from None

        return cls(
            listen=pick("listen", "OPENLORA_LISTEN") or DEFAULT_LISTEN,
            database_url=pick("database_url", "OPENLORA_DATABASE_URL"),
            redis_url=pick("redis_url", "OPENLORA_REDIS_URL"),
            state_dir=Path(pick("state_dir", "OPENLORA_STATE_DIR") or DEFAULT_STATE_DIR),
            worker_token=pick("worker_token", "OPENLORA_WORKER_TOKEN"),
            admin_key=pick("admin_key", "OPENLORA_ADMIN_KEY"),
            migrate=not flags.get("no_migrate"),
            migrate_only=bool(flags.get("migrate_only")),
            metrics_port=whole(
                "metrics_port", "--metrics-port", "OPENLORA_METRICS_PORT", 0, minimum=0, maximum=65535
            ),
            predictor_interval_s=resolve_interval_s(flags, environ),
            predictor=resolve_predictor_config(flags, environ),
            max_connections=whole(
                "max_connections",
                "--max-connections",
                "OPENLORA_MAX_CONNECTIONS",
                DEFAULT_MAX_CONNECTIONS,
                minimum=1,
            ),
            log_level=resolve_log_level(flags.get("log_level"), environ),
        )

    def worker_token_or_stored(self) -> str:
        """The configured worker token, else one generated once and kept in the state dir (0600)."""
        if self.worker_token:
            return self.worker_token
        path = self.state_dir / WORKER_TOKEN_FILE
        if path.exists():
            return path.read_text().strip()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        token = new_secret("wt_")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token

    def to_config(self, database_url: str, redis_url: str | None) -> ControlPlaneConfig:
        return ControlPlaneConfig(
            database_url=database_url,
            state_dir=self.state_dir,
            worker_token=self.worker_token_or_stored(),
            listen=self.listen,
            redis_url=redis_url,
            admin_key=self.admin_key,
            migrate=self.migrate,
            metrics_port=self.metrics_port,
            predictor_interval_s=self.predictor_interval_s,
            predictor=self.predictor,
            max_connections=self.max_connections,
        )
