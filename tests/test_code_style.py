"""The project's style as two tests, so that CI (which runs the suite) enforces it: `ruff check`
with ruff.toml, and `lint-imports` with .importlinter (the layers of docs/architecture.md). Both
tools are in the `test` extra: a missing one fails here instead of skipping the check."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

INSTALL = 'pip install -e ".[test]"'


def run_in_repo(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed for {sys.executable}: {INSTALL}", pytrace=False)
    result = run_in_repo([sys.executable, "-m", "ruff", "check", "--no-cache", "."])
    assert result.returncode == 0, f"ruff check (ruff.toml):\n{result.stdout}{result.stderr}"


def test_imports_keep_the_layers():
    # The script of this interpreter's environment, else the one on PATH.
    lint_imports = (shutil.which("lint-imports", path=str(Path(sys.executable).parent))
                    or shutil.which("lint-imports"))
    if lint_imports is None:
        pytest.fail(f"lint-imports (import-linter) is not installed for {sys.executable}: "
                    f"{INSTALL}", pytrace=False)
    # lint-imports puts its working directory first on sys.path: it reads this checkout's tsld_ds.
    result = run_in_repo([lint_imports, "--no-cache", "--no-logo"])
    assert result.returncode == 0, f"lint-imports (.importlinter):\n{result.stdout}{result.stderr}"
