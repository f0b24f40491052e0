"""The log level of the long-running commands (`worker`, `control-plane`, `up`): --log-level or
OPENLORA_LOG_LEVEL, one of Python's named levels."""

from __future__ import annotations

import logging
from collections.abc import Mapping

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_HELP = "DEBUG, INFO, WARNING, ERROR or CRITICAL (OPENLORA_LOG_LEVEL; default INFO)"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def resolve_log_level(flag: str | None, environ: Mapping[str, str]) -> str:
    """The flag's level, else OPENLORA_LOG_LEVEL's, else INFO, in any case and spacing; ValueError names
    both and the levels taken."""
    given = flag if flag not in (None, "") else environ.get("OPENLORA_LOG_LEVEL") or "INFO"
    level = given.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(
            f"--log-level (OPENLORA_LOG_LEVEL) must be one of {', '.join(LOG_LEVELS)}, got {given!r}"
        )
    return level


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
