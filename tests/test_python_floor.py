"""The declared Python floor is true: `requires-python`, ruff's `target-version` and the running interpreter
agree, every project file parses with the floor's grammar, and no standard-library name newer than the
floor is used (a table of the usual suspects; the grammar check covers syntax such as PEP 695)."""

from __future__ import annotations

import ast
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

# Standard-library names and the Python version that added them. Not exhaustive: the ones code written
# on a newer interpreter reaches for most often.
_NAME_ADDED_IN: dict[tuple[str, str], tuple[int, int]] = {
    ("datetime", "UTC"): (3, 11),
    ("asyncio", "TaskGroup"): (3, 11),
    ("asyncio", "timeout"): (3, 11),
    ("enum", "StrEnum"): (3, 11),
    ("hashlib", "file_digest"): (3, 11),
    ("typing", "Self"): (3, 11),
    ("typing", "Never"): (3, 11),
    ("typing", "LiteralString"): (3, 11),
    ("typing", "assert_never"): (3, 11),
    ("itertools", "batched"): (3, 12),
    ("typing", "override"): (3, 12),
    ("typing", "TypeAliasType"): (3, 12),
    ("math", "sumprod"): (3, 12),
    ("collections.abc", "Buffer"): (3, 12),
    ("os.path", "splitroot"): (3, 12),
    ("asyncio", "eager_task_factory"): (3, 12),
    ("copy", "replace"): (3, 13),
    ("os", "process_cpu_count"): (3, 13),
    ("warnings", "deprecated"): (3, 13),
    ("typing", "TypeIs"): (3, 13),
    ("typing", "ReadOnly"): (3, 13),
}
_MODULE_ADDED_IN = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}
_NOT_PROJECT = {".venv", ".git", ".state", "node_modules", "build", "dist"}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((_repo_root() / "pyproject.toml").read_text())


def python_floor() -> tuple[int, int]:
    """(major, minor) of `requires-python = ">=X.Y"`."""
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", _pyproject()["project"]["requires-python"].strip())
    assert match, "requires-python must be a plain '>=X.Y' floor"
    return int(match[1]), int(match[2])


def _project_files() -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(_repo_root()):
        subdirs[:] = [d for d in subdirs if d not in _NOT_PROJECT and not d.startswith(".")]
        files += [Path(directory) / name for name in names if name.endswith(".py")]
    return sorted(files)


def newer_names(tree: ast.AST, floor: tuple[int, int]) -> list[str]:
    """`module.name` uses (imports and attribute access on an imported module) newer than `floor`."""
    aliases: dict[str, str] = {}  # local name -> module
    found = []

    def check(module: str, name: str | None) -> None:
        added = _MODULE_ADDED_IN.get(module) if name is None else _NAME_ADDED_IN.get((module, name))
        if added and added > floor:
            found.append(f"{module}.{name}" if name else module)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(alias.name, None)
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            check(node.module, None)
            for alias in node.names:
                check(node.module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = ast.unparse(node.value)
            if base in aliases:
                check(aliases[base], node.attr)
    return found


def test_declared_floor_matches_ruff_target_and_the_running_interpreter() -> None:
    floor = python_floor()
    assert _pyproject()["tool"]["ruff"]["target-version"] == f"py{floor[0]}{floor[1]}"
    assert sys.version_info[:2] >= floor, f"running {sys.version_info[:2]} below the declared floor {floor}"


def test_every_project_file_parses_with_the_floor_grammar() -> None:
    floor = python_floor()
    files = _project_files()
    assert len(files) > 100
    failures = []
    for path in files:
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=floor)
        except SyntaxError as e:
            failures.append(f"{path.relative_to(_repo_root())}:{e.lineno}: {e.msg}")
    assert failures == []


def test_no_project_file_uses_a_standard_library_name_newer_than_the_floor() -> None:
    floor = python_floor()
    found = {}
    for path in _project_files():
        names = newer_names(ast.parse(path.read_text()), floor)
        if names:
            found[str(path.relative_to(_repo_root()))] = names
    assert found == {}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import itertools\nitertools.batched(x, 2)", ["itertools.batched"]),
        ("from typing import override", ["typing.override"]),
        ("import os.path as p\np.splitroot('/a')", ["os.path.splitroot"]),
        ("from datetime import UTC", []),
        ("import itertools\nitertools.pairwise(x)", []),
    ],
)
def test_newer_name_check_flags_only_names_above_a_3_11_floor(source: str, expected: list[str]) -> None:
    assert newer_names(ast.parse(source), (3, 11)) == expected
