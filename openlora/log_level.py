"""The log level of the long-running commands (`worker`, `control-plane`, `up`): --log-level or
OPENLORA_LOG_LEVEL, one of Python's named levels."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from openlora.setting_rules import choice

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_HELP = "DEBUG, INFO, WARNING, ERROR or CRITICAL (OPENLORA_LOG_LEVEL; default INFO)"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def resolve_log_level(flag: str | None, environ: Mapping[str, str]) -> str:
    """The flag's level, else OPENLORA_LOG_LEVEL's (unless empty), else INFO, in any ASCII case
    (`setting_rules.choice`); ValueError names both and the levels taken."""
    given = flag if flag is not None else environ.get("OPENLORA_LOG_LEVEL") or "INFO"
    try:
        return choice(given, LOG_LEVELS)
    except ValueError as error:
        raise ValueError(f"--log-level (OPENLORA_LOG_LEVEL) {error}") from None


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
