"""What an adapter or saved-mix name may be, shared by the control plane (which registers names) and the
worker (which refuses a request naming something no name can be, before it goes to Authorize)."""

from __future__ import annotations

import re

# Not "." or ".." (a path segment every HTTP client and URL library folds away: `/v1/models/..` cannot be
# asked for) and no leading "-" (every command line would read the name as an option).
ADAPTER_NAME = re.compile(r"^(?!\.\.?\Z)(?!-)[A-Za-z0-9_.-]{1,128}\Z")
ADAPTER_NAME_RULE = 'must be 1..128 characters of [A-Za-z0-9_.-], not "." or "..", not starting with "-"'


def is_adapter_name(name: str) -> bool:
    return ADAPTER_NAME.fullmatch(name) is not None
