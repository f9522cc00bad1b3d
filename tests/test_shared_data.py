"""Tests that need the real data skip without it (one line on how to get it), fail under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_her2st_test(data: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["MAGNET_ST_SHARED_DATA"] = str(data)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
        + ["tests/test_read.py::test_mpp_override"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("ci", [None, "true"])
def test_missing_her2st_data_skips_with_a_hint_or_fails_in_ci(
    tmp_path: Path, ci: str | None
) -> None:
    proc = _run_her2st_test(tmp_path, ci)
    out = proc.stdout + proc.stderr
    hint = f"her2st sections not found at {tmp_path / 'her2st'}: get the data/ folder of the "
    assert hint in out, out
    assert "github.com/almaan/her2st" in out and "MAGNET_ST_SHARED_DATA" in out
    if ci is None:
        assert proc.returncode == 0 and "1 skipped" in out, out
    else:
        assert proc.returncode == 1 and "CI is set" in out, out  # a setup error
        assert "1 error" in out or "1 failed" in out, out
