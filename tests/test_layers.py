"""Imports point down the pipeline (docs/design.md, "Layout"): the import-linter contract in
pyproject.toml, which the README's test command runs as `lint-imports`. These tests check the
contract itself: every part of magnet_st has a layer, the source keeps it, and an upward import
(one inside a function too) breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "magnet_st"


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "pipeline"]
    assert contract["type"] == "layers" and contract["containers"] == ["magnet_st"]
    return contract["layers"]


def _lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the project's contract over the package under `src`."""
    script = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [sys.executable, "-c", script, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,
    )


def test_every_part_of_the_package_is_a_layer() -> None:
    parts = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")}
    parts.discard("__init__")  # the container itself
    assert parts == set(_layers()), parts ^ set(_layers())


def test_the_source_keeps_the_contract() -> None:
    run = _lint_imports(ROOT / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(SRC, tmp_path / "magnet_st", ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "magnet_st" / "model" / "losses.py").open("a") as f:
        f.write("\n\ndef _upward():\n    from magnet_st.train import fit\n\n    return fit\n")
    run = _lint_imports(tmp_path)
    assert run.returncode != 0
    assert "magnet_st.model.losses -> magnet_st.train" in run.stdout
