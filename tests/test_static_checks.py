"""ruff and mypy as part of the one test command: the Sans-I/O core is held to ``mypy --strict``
(see ``[tool.mypy]`` in pyproject.toml), everything else to the project's ruff rules."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

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
