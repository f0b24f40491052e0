"""The predictor's settings as flags and `OPENLORA_*` variables of `openlora control-plane` and `openlora up`.

One table (`PREDICTOR_FLAGS`) gives each `PredictorConfig` field its flag, variable, help and allowed range,
so both commands offer the same names and refuse the same values. A value resolves flag, then environment,
then the `PredictorConfig` default; a bad one raises `ValueError` naming the flag (and the variable when it
came from there). The defaults fit real traffic of adapters called about once an hour.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, fields

from control_plane.prediction.demand import PredictorConfig
from openlora.setting_rules import given_text, number, range_text, whole_number

ENV_PREFIX = "OPENLORA_"
DEFAULT_INTERVAL_S = 5.0
INTERVAL_FLAG = "--predictor-interval-s"
MAX_INTERVAL_S = 86400.0
# The usage history the predictor may keep: ten years (a horizon before year 1 failed every pass).
MAX_HISTORY_S = 10 * 365 * 86400.0
_DEFAULTS = {f.name: f.default for f in fields(PredictorConfig)}


@dataclass(frozen=True)
class PredictorFlag:
    """One predictor setting: `field` of PredictorConfig, its flag and its range."""

    field: str
    flag: str
    help: str
    minimum: float
    minimum_allowed: bool = True  # False: the minimum itself is refused
    maximum: float | None = None
    maximum_allowed: bool = True
    integer: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def default(self) -> float:
        return _DEFAULTS[self.field]

    def range_text(self) -> str:
        return range_text(self.minimum, self.maximum, self.minimum_allowed, self.maximum_allowed)

    def parse(self, text: str, source: str) -> float | int:
        """`text` as this setting's value (`openlora.setting_rules`); `source` names where it came from in
        an error."""
        try:
            if self.integer:
                return whole_number(text, minimum=int(self.minimum))
            return number(
                text,
                self.minimum,
                self.maximum,
                minimum_allowed=self.minimum_allowed,
                maximum_allowed=self.maximum_allowed,
            )
        except ValueError as error:
            raise ValueError(f"{source} {error}") from None


PREDICTOR_FLAGS: tuple[PredictorFlag, ...] = (
    PredictorFlag(
        "rate_time_constant_s",
        "--predictor-rate-window-s",
        "time constant of each adapter's request-rate average (EWMA), seconds",
        0.0,
        minimum_allowed=False,
    ),
    PredictorFlag(
        "lead_s", "--predictor-lead-s", "prewarm at least this many seconds before a predicted call", 0.0
    ),
    PredictorFlag(
        "lead_gap_share",
        "--predictor-lead-share",
        "prewarm this share of a periodic adapter's period ahead, when longer than --predictor-lead-s",
        0.0,
        maximum=1.0,
        maximum_allowed=False,
    ),
    PredictorFlag(
        "max_lead_s", "--predictor-max-lead-s", "never prewarm more than this many seconds ahead", 0.0
    ),
    PredictorFlag(
        "min_gaps",
        "--predictor-min-gaps",
        "gaps between calls an adapter needs before its period is trusted",
        2,
        integer=True,
    ),
    PredictorFlag(
        "periodic_tolerance",
        "--predictor-periodic-tolerance",
        "a gap within this share of a whole number of periods is on the period",
        0.0,
        minimum_allowed=False,
        maximum=0.5,
        maximum_allowed=False,
    ),
    PredictorFlag(
        "periodic_min_share",
        "--predictor-periodic-min-share",
        "an adapter is periodic when at least this share of its gaps are on the period",
        0.0,
        minimum_allowed=False,
        maximum=1.0,
    ),
    PredictorFlag(
        "significance",
        "--predictor-significance",
        "a period or a burst is acted on only when calls at random times, at the adapter's usual pace, "
        "would show it with at most this probability (1 = no such check)",
        0.0,
        minimum_allowed=False,
        maximum=1.0,
    ),
    PredictorFlag(
        "resident_rate_per_s",
        "--predictor-hot-rate-per-s",
        "hot: an adapter called at least this often (calls/s, averaged) stays resident and gets no hints",
        0.0,
        minimum_allowed=False,
    ),
    PredictorFlag(
        "burst_gap_factor",
        "--predictor-burst-gap-factor",
        "a burst lasts while the last call is within this many of its typical gaps",
        0.0,
        minimum_allowed=False,
    ),
    PredictorFlag(
        "demote_below_per_s",
        "--predictor-cold-rate-per-s",
        "cold: an adapter called less often than this (calls/s, averaged) is demoted; 0 = never",
        0.0,
    ),
    PredictorFlag(
        "history_s",
        "--predictor-history-s",
        "usage history the predictor keeps per adapter, seconds",
        0.0,
        minimum_allowed=False,
        maximum=MAX_HISTORY_S,
    ),
)


def add_predictor_flags(parser: argparse.ArgumentParser) -> None:
    """Adds `--predictor-interval-s` and every PREDICTOR_FLAGS entry to `parser` (values as text: they are
    checked by `resolve_predictor_config`, so flags and variables get the same checks and messages)."""
    parser.add_argument(
        INTERVAL_FLAG,
        help=f"seconds between prewarm predictions, 0 = off, at most {MAX_INTERVAL_S:g} "
        f"(OPENLORA_PREDICTOR_INTERVAL_S; default {DEFAULT_INTERVAL_S:g})",
    )
    for setting in PREDICTOR_FLAGS:
        parser.add_argument(setting.flag, help=f"{setting.help} ({setting.env}; default {setting.default:g})")


def resolve_interval_s(flags: Mapping[str, object], environ: Mapping[str, str]) -> float:
    """`--predictor-interval-s`, else OPENLORA_PREDICTOR_INTERVAL_S, else 5 s; 0 turns prediction off."""
    # At most a day between passes (a wait past threading.TIMEOUT_MAX killed the predictor's thread).
    interval = PredictorFlag("", INTERVAL_FLAG, "", 0.0, maximum=MAX_INTERVAL_S)
    text, source = given_text(flags, environ, interval.dest, INTERVAL_FLAG, interval.env)
    return DEFAULT_INTERVAL_S if text is None else float(interval.parse(text, source))


def resolve_predictor_config(flags: Mapping[str, object], environ: Mapping[str, str]) -> PredictorConfig:
    """The PredictorConfig of these flags (argparse dests) and environment; ValueError names the flag."""
    values: dict[str, float | int] = {}
    sources: dict[str, str] = {}
    for setting in PREDICTOR_FLAGS:
        text, source = given_text(flags, environ, setting.dest, setting.flag, setting.env)
        if text is not None:
            values[setting.field] = setting.parse(text, source)
            sources[setting.field] = source

    def value(name: str) -> float:
        return values.get(name, _DEFAULTS[name])

    def source(name: str) -> str:
        return sources.get(name) or next(s.flag for s in PREDICTOR_FLAGS if s.field == name)

    if value("max_lead_s") < value("lead_s"):
        raise ValueError(
            f"{source('max_lead_s')} ({value('max_lead_s'):g}) must be >= {source('lead_s')} "
            f"({value('lead_s'):g})"
        )
    if value("demote_below_per_s") >= value("resident_rate_per_s"):
        raise ValueError(
            f"{source('demote_below_per_s')} ({value('demote_below_per_s'):g}) must be below "
            f"{source('resident_rate_per_s')} ({value('resident_rate_per_s'):g})"
        )
    return PredictorConfig(**values)


def explicit_flags(flags: Mapping[str, object]) -> list[str]:
    """The predictor flags given in `flags` (argparse dests) as argv, to hand on to a child process."""
    argv = []
    for dest, flag in [("predictor_interval_s", INTERVAL_FLAG), *((s.dest, s.flag) for s in PREDICTOR_FLAGS)]:
        if flags.get(dest) not in (None, ""):
            argv.append(f"{flag}={flags[dest]}")
    return argv
