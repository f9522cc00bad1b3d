"""lock: a second run on the same dataset or output folder is refused with one line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from magnet_st.cli import main
from magnet_st.errors import InputError
from magnet_st.util.lock import hold, lock_path

HOLDER = """
import sys, time
from magnet_st.util.lock import hold
with hold(sys.argv[1], "magnet features"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_held_folder_is_refused_and_kill_9_releases_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        said = rf"another magnet-st run .*'magnet features', process {proc.pid}"
        with pytest.raises(InputError, match=said), hold(ds, "magnet prepare"):
            pass
        # through the command line: one line, exit 2, nothing written into the folder
        assert main(["features", str(ds), "--encoder", "resnet18"]) == 2
        err = capsys.readouterr().err.strip()
        assert "another magnet-st run is working on this folder" in err and "\n" not in err
        assert list(ds.iterdir()) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # released by the kill; re-entrant within a process
    with hold(ds, "magnet prepare"), hold(ds / ".." / "ds", "magnet features"):
        pass
    assert lock_path(ds) == lock_path(tmp_path / "ds" / ".")
