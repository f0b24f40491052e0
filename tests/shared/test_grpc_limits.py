"""The gRPC servers' connection cap follows the process's open-file limit: raised within the hard limit
to hold the cap plus a reserve, and where the hard limit is lower, the cap shrinks to fit (a default
`ulimit -n` of 1024 must not let 4,096 connections take the descriptors the database needs)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from openlora.grpc_limits import DEFAULT_MAX_CONNECTIONS, FD_RESERVE, MIN_CONNECTIONS


def _cap_under_limit(soft: int, hard: int, max_connections: int, other: int = 0) -> tuple[int, int]:
    """(cap, soft limit afterwards) computed in a fresh process started with these limits."""
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from openlora.grpc_limits import connection_cap\n"
        f"cap = connection_cap({max_connections}, {other})\n"
        "print(json.dumps([cap, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cap, after = json.loads(out.strip().splitlines()[-1])
    return cap, after


def test_the_soft_limit_is_raised_to_hold_the_cap_and_the_reserve():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # a process may not raise its own hard limit
    wanted = 1000
    assert hard == resource.RLIM_INFINITY or hard >= wanted + FD_RESERVE  # this machine allows the test
    cap, soft = _cap_under_limit(256, hard, wanted)
    assert (cap, soft) == (wanted, wanted + FD_RESERVE)


def test_a_low_hard_limit_lowers_the_cap_and_keeps_the_reserve():
    cap, soft = _cap_under_limit(1024, 1024, DEFAULT_MAX_CONNECTIONS)
    assert (cap, soft) == (1024 - FD_RESERVE, 1024)
    # another listener's connections (the HTTP API's) share what the reserve leaves, in proportion
    cap, _ = _cap_under_limit(1024, 1024, DEFAULT_MAX_CONNECTIONS, other=300)
    assert cap == (1024 - FD_RESERVE) * 4096 // 4396 == 477
    cap, _ = _cap_under_limit(530, 530, DEFAULT_MAX_CONNECTIONS, other=DEFAULT_MAX_CONNECTIONS)
    assert cap == MIN_CONNECTIONS  # 9 by the share: never fewer than the minimum
