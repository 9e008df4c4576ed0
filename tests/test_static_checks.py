"""ruff and mypy as part of the one test command: the Sans-I/O core is held to ``mypy --strict``
(see ``[tool.mypy]`` in pyproject.toml), everything else to the project's ruff rules; and the
README's configuration table against the settings it documents."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys

import pytest

from stream_server.settings import Settings
from tests.support import REPO


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    if shutil.which("ruff") is None and not (REPO / ".venv" / "bin" / "ruff").exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr


def test_the_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    """One row per flag, in the README's Configuration section, with the default the code has."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    rows = {flag: default.strip("`") for flag, default in re.findall(r"^\| `(--[a-z0-9-]+)` \| ([^|]*?) \|", section, re.MULTILINE)}
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        assert flag in rows, f"{flag} is not in the README's configuration table"
        default = field.default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(rows[flag]) == float(default), (flag, rows[flag], default)
        elif default == "":
            assert rows[flag] in ("(none)", ""), (flag, rows[flag])
