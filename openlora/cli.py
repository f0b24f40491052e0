"""The `openlora` command line.

Each subcommand is registered by one small `_add_*` function (adding one is a few lines); the serving
commands (`up`, `worker`, `generate`, `demo-model`) come from `openlora.commands.serving.add_commands`.
Settings are resolved once here (flags, then `OPENLORA_*` environment, then the context file) into the
frozen dataclasses of `openlora.config`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import grpc

from control_plane.prediction.settings import add_predictor_flags
from openlora.admin_client import AdminClient, UploadRefused, adapter_files
from openlora.config import AdminSettings, ControlPlaneSettings, context_path, read_context
from openlora.grpc_limits import DEFAULT_MAX_CONNECTIONS
from openlora.log_level import LOG_LEVEL_HELP, configure_logging
from openlora.mix_rules import MIN_DENSITY, parse_mix
from openlora.setting_rules import number, whole_number

log = logging.getLogger("openlora.cli")
AdminHandler = Callable[[AdminClient, argparse.Namespace], int]
BROKEN_PIPE_EXIT_CODE = 128 + signal.SIGPIPE  # what a shell reports for a writer its reader left (141)
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # what a shell reports for a command stopped by Ctrl-C (130)
OPERATOR_ONLY = "only an operator admin key may do this"  # the control plane's PERMISSION_DENIED details
OPERATOR_KEY_HINT = (
    "hint: `openlora up` keeps the operator key in STATE_DIR/up-secrets.json (`admin_key`; "
    "STATE_DIR is .state by default): pass it with --api-key"
)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _rate(text: str) -> int:
    """A --royalty, --prompt or --completion value: a whole number of micro-units (`setting_rules`), at
    most what the request's int64 field carries (the control plane then checks its range, naming the
    field). Past int64 it was refused as the request was built, naming the request's field and not the
    flag."""
    try:
        return whole_number(text, minimum=0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _density(text: str) -> float:
    """--density of `mixes create`: a number in [MIN_DENSITY, 1] (`setting_rules`)."""
    try:
        return number(text, minimum=MIN_DENSITY, maximum=1.0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def money(micros: int) -> str:
    """Integer micro-units as a decimal with 6 places (exact, no float)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


# ------------------------------------------------------------------------------------- control plane


def _add_control_plane(subparsers) -> None:
    p = subparsers.add_parser("control-plane", help="run the control plane (AdminService + WorkerService)")
    p.add_argument("--listen", help="host:port (OPENLORA_LISTEN; default 127.0.0.1:50051)")
    p.add_argument("--database-url", help="PostgreSQL URL (OPENLORA_DATABASE_URL; default: embedded)")
    p.add_argument("--redis-url", help="Redis URL for hints (OPENLORA_REDIS_URL; default: embedded)")
    p.add_argument("--state-dir", help="artifacts, keys, embedded data (OPENLORA_STATE_DIR)")
    p.add_argument("--worker-token", help="token workers present (OPENLORA_WORKER_TOKEN; default: stored)")
    p.add_argument("--admin-key", help="bootstrap admin key (OPENLORA_ADMIN_KEY; default: generated)")
    # Numbers as text: `ControlPlaneSettings.resolve` reads flag and variable by one rule (setting_rules).
    p.add_argument("--metrics-port", help="Prometheus port, 0 = off (OPENLORA_METRICS_PORT)")
    p.add_argument(
        "--max-connections",
        help=f"gRPC connections held at once (OPENLORA_MAX_CONNECTIONS; default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument("--log-level", help=LOG_LEVEL_HELP)
    add_predictor_flags(p)
    p.add_argument("--no-migrate", action="store_true", help="refuse to start if the schema is behind")
    p.add_argument("--migrate-only", action="store_true", help="apply pending migrations and exit")
    p.set_defaults(func=_run_control_plane, kind="control-plane")


async def _serve_until_signal(
    settings: ControlPlaneSettings, database_url: str, redis_url: str | None
) -> int:
    from control_plane.server.server import serve
    from openlora.gc_tuning import settle_heap

    running = await serve(settings.to_config(database_url, redis_url))
    settle_heap()
    if running.admin_key and not settings.admin_key:
        print(
            f"bootstrap admin key (shown once; kept in {running.admin_key_path}): {running.admin_key}",
            flush=True,
        )
    print(f"control plane serving on {settings.listen.rsplit(':', 1)[0]}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight calls")
    await running.stop()
    return 0


def _run_control_plane(settings: ControlPlaneSettings) -> int:
    from control_plane.db.engine import DatabaseUnusable, check_database_url, database_unusable
    from control_plane.db.migrate import SchemaAheadError, SchemaBehindError, upgrade
    from openlora.listen import ListenError

    configure_logging(settings.log_level)
    # SIGTERM unwinds like Ctrl-C while the embedded servers start, so they are stopped too.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.ExitStack() as embedded:
        embedded.callback(signal.signal, signal.SIGTERM, previous)
        database_url, redis_url = settings.database_url, settings.redis_url
        if not database_url:
            from openlora.embedded import EmbeddedPostgres

            database_url = embedded.enter_context(EmbeddedPostgres(settings.state_dir / "embedded"))
        try:
            if settings.database_url:
                check_database_url(settings.database_url)
            if settings.migrate_only:
                upgrade(database_url)
                print("migrations applied")
                return 0
            if not redis_url:
                from openlora.embedded import EmbeddedRedis

                redis_url = embedded.enter_context(EmbeddedRedis(settings.state_dir / "embedded"))
            return asyncio.run(_serve_until_signal(settings, database_url, redis_url))
        except DatabaseUnusable as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except (SchemaBehindError, SchemaAheadError) as e:  # starting again cannot help
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ListenError as e:  # one line, not a traceback; a supervisor tries again later
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        except Exception as e:
            unusable = database_unusable(e, database_url)
            if unusable is None:
                raise
            print(f"error: {unusable}", file=sys.stderr)  # one line: `up` restarts us on exit 1
            return unusable.exit_code


# ------------------------------------------------------------------------------------- admin commands


def _admin_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--admin-target", help="control plane host:port (OPENLORA_ADMIN_TARGET, context)")
    parent.add_argument("--api-key", help="admin api key (OPENLORA_API_KEY, OPENLORA_ADMIN_KEY, context)")
    return parent


def _admin_command(subparsers, name: str, handler: AdminHandler, help: str):
    p = subparsers.add_parser(name, parents=[_admin_parent()], help=help)
    p.set_defaults(func=handler, kind="admin")
    return p


def _add_tenants(subparsers) -> None:
    tenants = subparsers.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True
    )
    p = _admin_command(tenants, "create", _tenants_create, "create a tenant (operator key)")
    p.add_argument("name")


def _tenants_create(client: AdminClient, args: argparse.Namespace) -> int:
    tenant = client.create_tenant(args.name)
    print_table(["ID", "NAME"], [[tenant.id, tenant.name]])
    return 0


def _add_keys(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="manage api keys").add_subparsers(dest="action", required=True)
    p = _admin_command(keys, "create", _keys_create, "create an api key (the secret is shown once)")
    p.add_argument("--tenant", default="", help="tenant name; default: the key's own tenant")
    p.add_argument("--admin", action="store_true", help="admin scope (also may infer)")
    p = _admin_command(keys, "revoke", _keys_revoke, "revoke an api key by id, prefix or the whole key")
    p.add_argument("key_id")


def _keys_create(client: AdminClient, args: argparse.Namespace) -> int:
    created = client.create_api_key(args.tenant, admin=args.admin)
    print_table(
        ["ID", "TENANT", "PREFIX", "ADMIN"],
        [[created.key.id, created.key.tenant, created.key.prefix, args.admin]],
    )
    print(f"secret (shown once): {created.secret}")
    return 0


def _keys_revoke(client: AdminClient, args: argparse.Namespace) -> int:
    key = client.revoke_api_key(args.key_id)
    print(f"revoked {key.prefix} ({key.id}) of tenant {key.tenant}")
    return 0


def _add_adapters(subparsers) -> None:
    adapters = subparsers.add_parser("adapters", help="manage adapters").add_subparsers(
        dest="action", required=True
    )
    p = _admin_command(adapters, "push", _adapters_push, "upload a PEFT LoRA directory")
    p.add_argument("dir")
    p.add_argument("--name", required=True)
    p.add_argument("--public", action="store_true", help="any tenant may use it")
    p.add_argument("--base-model", default="", help="default: the only registered base model")
    p.add_argument("--tenant", default="", help="owning tenant (operator key); default: the key's tenant")
    p.add_argument("--royalty", type=_rate, default=0, help="micro-units per million completion tokens")
    p.add_argument(
        "--keep-warm",
        action="store_true",
        help="keep it in the workers' host memory once loaded: not evicted while the keep-warm copies "
        "stored before it hold less than half of that tier",
    )
    p = _admin_command(adapters, "list", _adapters_list, "list adapters")
    p.add_argument(
        "--tenant", default="", help="tenant name (another tenant's: operator key); default: the key's own"
    )
    p.add_argument("--public", action="store_true", help="include other tenants' public adapters")
    p = _admin_command(adapters, "rm", _adapters_rm, "delete an adapter")
    p.add_argument("name")
    p.add_argument(
        "--tenant", default="", help="tenant name (another tenant's: operator key); default: the key's own"
    )


def _adapter_rows(adapters) -> list[list[object]]:
    return [
        [
            a.name,
            a.tenant,
            "public" if a.visibility == 2 else "private",
            a.base_model,
            a.rank,
            a.sha256[:12],
            a.size_bytes,
            money(a.royalty_micros_per_million_tokens),
            "yes" if a.keep_warm else "no",
        ]
        for a in adapters
    ]


# ROYALTY/M: what a million completion tokens through the adapter pay its owner, in the prices' units.
_ADAPTER_HEADERS = [
    "NAME",
    "TENANT",
    "VISIBILITY",
    "BASE MODEL",
    "RANK",
    "SHA256",
    "BYTES",
    "ROYALTY/M",
    "KEEP WARM",
]


def _own_adapter(client: AdminClient, name: str, tenant: str) -> object | None:
    """The adapter of that name the push would replace (the tenant's own, READY), or None."""
    try:
        return client.get_adapter(name, tenant)
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return None  # no such adapter, or a name the upload itself will refuse naming its field
        raise


def _adapters_push(client: AdminClient, args: argparse.Namespace) -> int:
    adapter_files(args.dir)  # a directory that cannot be sent is said before any call
    previous = _own_adapter(client, args.name, args.tenant or "")
    response = client.upload_adapter(
        args.dir,
        name=args.name,
        base_model=args.base_model,
        public=args.public,
        tenant=args.tenant,
        royalty_micros_per_million_tokens=args.royalty,
        keep_warm=args.keep_warm,
    )
    print_table(_ADAPTER_HEADERS, _adapter_rows([response.adapter]))
    if (
        previous is not None
        and previous.tenant == response.adapter.tenant  # not another tenant's public adapter of that name
        and previous.sha256 != response.adapter.sha256
    ):
        print(f"replaced {response.adapter.name}: it served content {previous.sha256[:12]} until now")
    elif response.deduplicated:
        print("identical content was already stored")
    return 0


def _adapters_list(client: AdminClient, args: argparse.Namespace) -> int:
    print_table(
        _ADAPTER_HEADERS, _adapter_rows(client.list_adapters(args.tenant, include_public=args.public))
    )
    return 0


def _adapters_rm(client: AdminClient, args: argparse.Namespace) -> int:
    adapter = client.delete_adapter(args.name, args.tenant)
    print(f"deleted {adapter.name} ({adapter.id})")
    return 0


MIX_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ensemble")


def _mix_members(text: str) -> list[tuple[str, float]]:
    """`--mix` of `mixes create`: `openlora.mix_rules.parse_mix`, its refusal argparse's."""
    try:
        return parse_mix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_mixes(subparsers) -> None:
    mixes = subparsers.add_parser("mixes", help="manage saved mixes").add_subparsers(
        dest="action", required=True
    )
    p = _admin_command(mixes, "create", _mixes_create, "save a mix of adapters under a name")
    p.add_argument("name")
    p.add_argument("--mix", type=_mix_members, required=True, help="members, e.g. a=0.6,b=0.4")
    p.add_argument("--method", default="linear", choices=MIX_METHODS)
    p.add_argument(
        "--density",
        type=_density,
        default=None,
        help=f"kept fraction in [{MIN_DENSITY:g}, 1] (ties, dare, prune)",
    )
    p.add_argument(
        "--majority-sign-method", default=None, choices=["total", "frequency"], help="ties, dare_ties"
    )
    p.add_argument("--combine", default=None, choices=["probs", "logprobs"], help="ensemble (default probs)")
    p.add_argument("--description", default="")
    p.add_argument("--tenant", default="", help="owning tenant (operator key); default: the key's tenant")
    p = _admin_command(mixes, "list", _mixes_list, "list saved mixes")
    p.add_argument(
        "--tenant", default="", help="tenant name (another tenant's: operator key); default: the key's own"
    )
    p = _admin_command(mixes, "rm", _mixes_rm, "delete a saved mix")
    p.add_argument("name")
    p.add_argument(
        "--tenant", default="", help="tenant name (another tenant's: operator key); default: the key's own"
    )


def _mix_rows(mixes) -> list[list[object]]:
    from openlora.v1 import inference_pb2

    def word(enum, value: int, prefix: str) -> str:  # MIX_METHOD_DARE_TIES -> dare_ties
        return enum.Name(value).removeprefix(prefix).lower()

    rows = []
    for m in mixes:
        method = word(inference_pb2.MixMethod, m.method, "MIX_METHOD_")
        members = ",".join(f"{a.adapter}={a.weight:g}" for a in m.members)
        options = []  # what the mix was saved with besides its method: every option `mixes create` takes
        if m.HasField("density"):
            options.append(f"density={m.density:g}")
        if m.majority_sign_method:
            sign = word(inference_pb2.MajoritySignMethod, m.majority_sign_method, "MAJORITY_SIGN_METHOD_")
            options.append(f"majority-sign={sign}")
        if m.combine:
            options.append(f"combine={word(inference_pb2.EnsembleCombine, m.combine, 'ENSEMBLE_COMBINE_')}")
        rows.append([m.name, m.tenant, method, ",".join(options) or "-", members])
    return rows


_MIX_HEADERS = ["NAME", "TENANT", "METHOD", "OPTIONS", "MEMBERS"]


def _mixes_create(client: AdminClient, args: argparse.Namespace) -> int:
    mix = client.create_mix(
        args.name,
        args.mix,
        method=args.method,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
        combine=args.combine,
        tenant=args.tenant,
        description=args.description,
    )
    print_table(_MIX_HEADERS, _mix_rows([mix]))
    return 0


def _mixes_list(client: AdminClient, args: argparse.Namespace) -> int:
    print_table(_MIX_HEADERS, _mix_rows(client.list_mixes(args.tenant)))
    return 0


def _mixes_rm(client: AdminClient, args: argparse.Namespace) -> int:
    mix = client.delete_mix(args.name, args.tenant)
    print(f"deleted mix {mix.name} ({mix.id})")
    return 0


def _add_usage(subparsers) -> None:
    p = _admin_command(subparsers, "usage", _usage, "usage per adapter")
    p.add_argument(
        "--tenant", default="", help="tenant name (another tenant's: operator key); default: the key's own"
    )


def _usage(client: AdminClient, args: argparse.Namespace) -> int:
    usage = client.get_usage(args.tenant)
    rows = [
        [r.adapter or "(base model)", r.adapter_tenant, r.requests, r.prompt_tokens, r.completion_tokens]
        for r in usage.rows
    ]
    rows.append(["TOTAL", "", usage.total_requests, usage.total_prompt_tokens, usage.total_completion_tokens])
    print_table(["ADAPTER", "OWNER", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS"], rows)
    return 0


def _add_invoice(subparsers) -> None:
    p = _admin_command(subparsers, "invoice", _invoice, "a tenant's invoice for a month")
    p.add_argument(
        "--tenant", default="", help="tenant name (another tenant's: operator key); default: the key's own"
    )
    p.add_argument("--period", required=True, help="YYYY-MM (UTC)")


def _invoice(client: AdminClient, args: argparse.Namespace) -> int:
    invoice = client.get_invoice(args.period, args.tenant)
    rows = [
        [
            line.kind,
            line.base_model,
            line.adapter or ("" if line.mix else "(base model)"),
            line.adapter_owner,
            line.request_kind,
            line.mix,
            line.prompt_tokens,
            line.completion_tokens,
            money(line.amount_micros),
        ]
        for line in invoice.lines
    ]
    print(f"invoice {invoice.tenant} {invoice.period}")
    print_table(
        [
            "KIND",
            "BASE MODEL",
            "ADAPTER",
            "OWNER",
            "REQUEST KIND",
            "MIX",
            "PROMPT TOKENS",
            "COMPLETION TOKENS",
            "AMOUNT",
        ],
        rows,
    )
    print_table(
        ["CHARGES", "EARNINGS", "NET"],
        [[money(invoice.charges_micros), money(invoice.earnings_micros), money(invoice.net_micros)]],
    )
    return 0


def _add_prices(subparsers) -> None:
    prices = subparsers.add_parser("prices", help="manage prices").add_subparsers(
        dest="action", required=True
    )
    p = _admin_command(prices, "set", _prices_set, "set a base model's price (operator key)")
    p.add_argument("base_model")
    p.add_argument("--prompt", type=_rate, required=True, help="micro-units per million prompt tokens")
    p.add_argument(
        "--completion", type=_rate, required=True, help="micro-units per million completion tokens"
    )


def _prices_set(client: AdminClient, args: argparse.Namespace) -> int:
    client.set_price(args.base_model, args.prompt, args.completion)
    print(
        f"price of {args.base_model}: prompt {money(args.prompt)}, completion {money(args.completion)} per M tokens"
    )
    # A price may be set before any worker serves its model, so it is not refused; but a misspelled name
    # would bill nothing silently.
    served = sorted({worker.base_model for worker in client.list_workers()})
    if args.base_model not in served:
        print(
            f"note: no worker has registered base model {args.base_model!r} (registered: "
            f"{', '.join(served) or 'none'}); the price applies once one serves it",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------- entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openlora", description="Serve thousands of LoRA adapters on one GPU."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_control_plane,
        _add_tenants,
        _add_keys,
        _add_adapters,
        _add_mixes,
        _add_usage,
        _add_invoice,
        _add_prices,
    ):
        add(subparsers)
    from openlora.commands.serving import add_commands

    add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Runs one command; returns its exit status. Output piped into a reader that stops early
    (`openlora adapters list | head -2`) ends quietly with BROKEN_PIPE_EXIT_CODE; Ctrl-C during a call
    ends quietly with INTERRUPTED_EXIT_CODE (it printed a traceback of grpc's internals)."""
    try:
        code = _run(argv, environ)
        sys.stdout.flush()  # here, so that a closed pipe is seen now and not at interpreter exit
        return code
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT_CODE
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush finds nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT_CODE


def context_key_hint(environ: Mapping[str, str]) -> str:
    """The hint for an UNAUTHENTICATED answer to the context file's key: revoked, or another system's."""
    return (
        f"hint: the api key comes from the context file {context_path(environ)}: it was revoked or belongs to "
        "another system; restarting `openlora up` gives its tenant a new key (and rewrites that file), or "
        "pass --api-key / OPENLORA_API_KEY"
    )


ADMIN_KEY_OVER_CONTEXT_NOTE = (
    "note: OPENLORA_ADMIN_KEY is set, so this command runs with the operator key, not the context file's key "
    "(its own tenant's adapters, usage and mixes are the operator's); unset it, or pass --api-key / "
    "OPENLORA_API_KEY, to act as the context file's tenant"
)


def _admin_key_over_context(
    key_flag: str | None, environ: Mapping[str, str], context: Mapping[str, str]
) -> bool:
    """Whether an exported OPENLORA_ADMIN_KEY is sent where the context file names another key: an operator
    who also ran `up` in that shell saw the operator tenant's (empty) lists without a word of why."""
    admin_key = environ.get("OPENLORA_ADMIN_KEY")
    own_key = context.get("api_key")
    return bool(
        not key_flag
        and not environ.get("OPENLORA_API_KEY")
        and admin_key
        and own_key
        and own_key != admin_key
    )


UNREACHABLE_HINT = (
    "hint: nothing answers at that address: is `openlora up` (or the server named by the flags, "
    "OPENLORA_* variables or the context file) running?"
)


# gRPC's words for a server that answered, but not in HTTP/2: an HTTP/1.x server (grpc core goes on with
# "Trying to connect an http1.x server" when the answer parses as HTTP/1.1).
_NOT_HTTP2 = "Failed parsing HTTP/2"
HTTP_API_HINT = (
    "hint: that address answers, but not in gRPC: it is an HTTP/1.x server, such as the OpenAI-compatible API "
    "(`up` prints it as openai=, for HTTP clients); `generate` goes to a worker's gRPC address (--target, "
    "OPENLORA_TARGET; `up` prints it as inference=), admin commands to the control plane's (--admin-target, "
    "OPENLORA_ADMIN_TARGET; `up` prints it as admin=)"
)


WRONG_SERVICE_HINT = (
    "hint: that address serves another openlora service: admin commands (adapters, tenants, keys, usage, "
    "...) go to the control plane (--admin-target, OPENLORA_ADMIN_TARGET; `up` prints it as admin=), "
    "`generate` to a worker (--target, OPENLORA_TARGET; `up` prints it as inference=)"
)


def address_hint(code: grpc.StatusCode, details: str | None) -> str | None:
    """What to check when a call found no server of its kind at its address (none, an HTTP/1.x one, the
    other openlora service), or None."""
    details = details or ""
    if code == grpc.StatusCode.UNAVAILABLE and _NOT_HTTP2 in details:
        return HTTP_API_HINT  # something answers there: not "nothing answers"
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        return UNREACHABLE_HINT
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return WRONG_SERVICE_HINT
    return None


def _not_utf8(value: object) -> bool:
    """Whether `value` (or a string in it) holds bytes that are not UTF-8, as Python holds such bytes of
    the command line: lone surrogates."""
    if isinstance(value, str):
        return not value.isascii() and any("\udc80" <= char <= "\udcff" for char in value)
    if isinstance(value, list | tuple):
        return any(_not_utf8(item) for item in value)
    return False


PATH_ARGUMENTS = frozenset({"dir"})  # a file name may be any bytes: it goes to the file system as given


def undecodable_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The flag (or positional name) of the command's first text argument that is not UTF-8, or None. The
    wire carries UTF-8 only: such text was refused as "'utf-8' codec can't encode character '\\udcff'",
    naming no argument."""
    while True:  # down to the parser of the subcommand given (`adapters` -> `push`)
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        parser = sub.choices[getattr(args, sub.dest)]
    for action in parser._actions:
        if action.dest not in PATH_ARGUMENTS and _not_utf8(getattr(args, action.dest, None)):
            return max(action.option_strings, key=len) if action.option_strings else action.dest
    return None


def _run(argv: list[str] | None, environ: Mapping[str, str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    kind = getattr(args, "kind", None)
    sends_text = kind == "admin" or args.command == "generate"
    if sends_text and (argument := undecodable_argument(parser, args)) is not None:
        print(f"error: {argument} is not UTF-8 text", file=sys.stderr)
        return 2
    try:
        if kind == "control-plane":
            return args.func(ControlPlaneSettings.resolve(vars(args), environ))
        if kind == "admin":
            context = read_context(environ)
            settings = AdminSettings.resolve(args.admin_target, args.api_key, environ, context)
            if _admin_key_over_context(args.api_key, environ, context):
                print(ADMIN_KEY_OVER_CONTEXT_NOTE, file=sys.stderr)
            with AdminClient(settings.admin_target, settings.api_key) as client:
                try:
                    return args.func(client, args)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED and settings.api_key == context.get(
                        "api_key"
                    ):
                        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
                        print(context_key_hint(environ), file=sys.stderr)
                        return 1
                    raise
        return args.func(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        if e.code() == grpc.StatusCode.PERMISSION_DENIED and e.details() == OPERATOR_ONLY:
            print(OPERATOR_KEY_HINT, file=sys.stderr)
        hint = address_hint(e.code(), e.details())
        if hint is not None:
            print(hint, file=sys.stderr)
        return 1
    except (ValueError, UploadRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
