"""The code style pyproject.toml declares holds: ruff's lint rules and its formatter,
on the package, the tests, the benchmarks and the examples."""

import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
PATHS = ["lora_jax", "tests", "benchmarks", "examples"]


def _ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module", autouse=True)
def ruff_installed():
    if _ruff("--version").returncode != 0:  # `--version` ignores the paths
        pytest.fail("ruff is not installed: `pip install -e '.[test]'` installs it.")


def test_lint():
    result = _ruff("check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_format():
    result = _ruff("format", "--check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
