"""The package's layers hold (pyproject.toml's import-linter contract, the one source:
cli > api, bench > continual > analysis > trainers > engines > objectives, tasks > kernels, plugins)
and the linter's rule set is clean. Both tools are configured in pyproject.toml; these tests run them so that
the README's one test command (and CI) enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter)")
    env = {"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_import_layers_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_import_layers_catch_an_upward_import(tmp_path):
    """The contract is not vacuous: a kernel module that imports the loop breaks it."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "denser", copy / "denser", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    (copy / "denser" / "kernels" / "upward.py").write_text("from denser.trainers import Trainer  # noqa: F401\n")
    proc = _lint_imports(copy)
    assert proc.returncode != 0
    assert "denser.kernels.upward -> denser.trainers" in proc.stdout


def test_the_contract_name_states_its_layers():
    """The contract's name (what docs and messages quote) is its layer list, in order, top first."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    said = [[m.strip() for m in layer.split(",")] for layer in contract["name"].removeprefix("layers: ").split(" > ")]
    listed = [[m.strip(" ()").removeprefix("denser.") for m in layer.split("|")] for layer in contract["layers"]]
    assert said == listed
    assert listed.index(["trainers"]) < listed.index(["engines"]) < listed.index(["objectives", "tasks"])


def test_engines_may_not_import_the_loop(tmp_path):
    """The engines sit below trainers: an engine module that imports the loop breaks the contract."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "denser", copy / "denser", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    (copy / "denser" / "engines" / "upward.py").write_text("from denser.trainers.loop import Trainer  # noqa: F401\n")
    proc = _lint_imports(copy)
    assert proc.returncode != 0
    assert "denser.engines.upward -> denser.trainers.loop" in proc.stdout


def test_ruff_is_clean():
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    proc = subprocess.run([exe, "check", "denser", "tests", "bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
