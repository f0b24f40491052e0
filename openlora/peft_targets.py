"""Which modules an `adapter_config.json` selects, by PEFT's own rule (peft.tuners.tuners_utils,
`check_target_module_exists`, 0.21).

PEFT builds LoRA layers only on the modules the config selects and ignores any other tensor the weights
file holds. OpenLoRA applies every tensor of the file, so an adapter whose file holds weights for modules
its config does not select (an edited or converted config) would be served differently from PEFT: the
validator refuses it instead, naming the config key that leaves the module out.

The rule, for a module named as PEFT names it (`model.layers.3.self_attn.q_proj`):
- `exclude_modules` (a regular expression matched in full, or a list of names matched whole or after a
  dot) removes it;
- `target_modules` as a string is a regular expression matched in full (`"all-linear"`: every projection);
  as a list, an entry matches the whole name or its end after a dot, and then `layers_to_transform` (an
  int or a list of ints, with `layers_pattern` naming the layer container) keeps only those layers;
  absent (`null`), PEFT's default for Llama, Mistral, Qwen2 and Qwen3 is `q_proj` and `v_proj`.

Config strings are regular expressions written by a tenant: they run in the `regex` engine under a time
budget, so a crafted one is refused instead of holding a control plane or worker thread for minutes.
"""

from __future__ import annotations

import time

from openlora.regex_limits import RegexRefused, compile_bounded
from openlora.safe_json import describe

DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's mapping for llama, mistral and qwen2
ALL_LINEAR = "all-linear"
MATCH_BUDGET_S = 0.5  # for all of one adapter's regular-expression matches together


class TargetError(ValueError):
    """The selection rule cannot be applied: `key` is the config key at fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class TargetRule:
    """A config's selection rule, checked and compiled once; `leaves_out(name)` names the config key that
    keeps module `name` from being a LoRA layer under PEFT, or None when PEFT selects it."""

    def __init__(self, config: dict) -> None:
        self._deadline = time.monotonic() + MATCH_BUDGET_S
        self._exclude = self._names_or_regex(config, "exclude_modules")
        targets = config.get("target_modules")
        self._targets = DEFAULT_TARGETS if targets is None else self._names_or_regex(config, "target_modules")
        if self._targets is None:  # [] or "": PEFT finds no target module and refuses the config
            raise TargetError("target_modules", f"{describe(targets)} selects no module")
        self._layers = _layer_indexes(config.get("layers_to_transform"))
        patterns = config.get("layers_pattern")
        if patterns is None or patterns == "" or patterns == []:
            self._layer_regexes = [self._compile("layers_pattern", r".*?\.[^.]*\.(?P<idx>\d+)\.")]
        else:
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise TargetError("layers_pattern", "must be a string or a list of strings")
            self._layer_regexes = [
                self._compile("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns
            ]

    def leaves_out(self, name: str) -> str | None:
        exclude = self._exclude
        if exclude is not None and self._matches("exclude_modules", exclude, name):
            return "exclude_modules"
        targets = self._targets
        if not isinstance(targets, tuple):  # a regular expression
            return None if self._fullmatch("target_modules", targets, name) else "target_modules"
        if name in targets:
            return None
        if not any(name.endswith(f".{t}") for t in targets):
            return "target_modules"
        if self._layers is None:
            return None
        for layer_regex in self._layer_regexes:
            found = self._match("layers_pattern", layer_regex, name)
            if found is not None:
                return None if int(found.group("idx")) in self._layers else "layers_to_transform"
        return "layers_pattern"

    # -- helpers -------------------------------------------------------------------------------------

    def _names_or_regex(self, config: dict, key: str):
        """A tuple of names, a compiled regular expression (a string), or None (absent or empty)."""
        value = config.get(key)
        if value is None or value == [] or value == "":
            return None
        if isinstance(value, str):
            if value.lower() == ALL_LINEAR and key == "target_modules":  # PEFT lowercases it
                return self._compile(key, ".*")
            return self._compile(key, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise TargetError(
            key, f"must be a list of module names or a regular expression, got {describe(value)}"
        )

    def _compile(self, key: str, pattern: str):
        try:
            return compile_bounded(pattern)
        except RegexRefused as refused:
            raise TargetError(key, str(refused)) from None

    def _matches(self, key: str, names_or_regex, name: str) -> bool:
        if isinstance(names_or_regex, tuple):
            return name in names_or_regex or any(name.endswith(f".{n}") for n in names_or_regex)
        return self._fullmatch(key, names_or_regex, name)

    def _fullmatch(self, key: str, compiled, name: str) -> bool:
        return self._timed(key, compiled.fullmatch, name) is not None

    def _match(self, key: str, compiled, name: str):
        return self._timed(key, compiled.match, name)

    def _timed(self, key: str, method, name: str):
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return method(name, timeout=remaining)
        except TimeoutError:
            raise TargetError(
                key, f"matching its regular expression took more than {MATCH_BUDGET_S:g} s: simplify it"
            ) from None


def _layer_indexes(value) -> frozenset[int] | None:
    """`layers_to_transform`: None (every layer), or the layer indexes (an int or a list of ints)."""
    if value is None or value == []:
        return None
    if isinstance(value, bool):
        raise TargetError("layers_to_transform", f"must be an int or a list of ints, got {describe(value)}")
    if isinstance(value, int):
        return frozenset((value,))
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return frozenset(value)
    raise TargetError("layers_to_transform", f"must be an int or a list of ints, got {describe(value)}")
