"""A full disk or a file size limit: one clear line, nothing half-written, no signal."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from magnet_st.cli import main
from magnet_st.errors import InputError
from magnet_st.util.atomic import new_memmap


def test_memmaps_reserve_their_blocks_and_a_full_disk_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = os.posix_fallocate

    def spy(fd: int, offset: int, size: int) -> None:
        calls.append(size)
        real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    a = new_memmap(tmp_path / "ok.npy", np.float16, (1000, 112))
    a[:] = 1
    assert calls == [(tmp_path / "ok.npy").stat().st_size] and calls[0] >= 1000 * 112 * 2

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(InputError, match=r"no space left on the device of .* \(needs ~0\.0022 GB"):
        new_memmap(tmp_path / "big.partial.npy", np.float16, (10_000, 112))
    assert not (tmp_path / "big.partial.npy").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("err", "said"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/x.h5ad"),
            "no space left on device (/data/x.h5ad)",
        ),
        (OSError(errno.EFBIG, "File too large", "/data/x.npy"), "ulimit -f"),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/out"),
            "cannot write (/ro/out): Read-only",
        ),
        (FileExistsError(errno.EEXIST, "File exists", "/data/out"), "/data/out: a file is in"),
    ],
)
def test_write_errors_of_any_command_are_one_line(
    err: OSError, said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from magnet_st.cli import _features

    def fail(args: object) -> int:
        raise err

    monkeypatch.setattr(_features, "cmd_features", fail)
    assert main(["features", "ds"]) == 2
    out = capsys.readouterr().err.strip()
    assert said in out and "unexpected" not in out and "\n" not in out
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # a limit is an error, not a kill


def test_a_write_that_cannot_fit_is_refused_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    from magnet_st.util.atomic import check_free_space

    check_free_space(tmp_path / "new" / "folder", 1000)  # fits: nothing happens
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(InputError, match=r"no space left .*needs ~1\.5e-05 GB, 5e-06 GB free"):
        check_free_space(tmp_path / "out", 10_000)


def test_refusals_before_work_leave_no_folder(tmp_path: Path) -> None:
    from magnet_st.errors import ConfigError
    from magnet_st.prepare.build import prepare
    from magnet_st.read.specs import SlideSpec
    from magnet_st.train.config import TrainConfig
    from magnet_st.train.trainer import fit

    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile: is a file, where the output folder"):
        prepare([SlideSpec(name="s", path="nowhere")], tmp_path / "afile" / "ds")
    with pytest.raises(ConfigError, match="given twice"):  # roles checked before out is made
        fit(None, ["s"], ["s"], TrainConfig(features="x"), tmp_path / "t")  # type: ignore[arg-type]
    assert not (tmp_path / "t").exists()


def test_a_file_beyond_the_shells_size_limit_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    from magnet_st.util.atomic import check_free_space

    monkeypatch.setattr(resource, "getrlimit", lambda r: (65536, resource.RLIM_INFINITY))
    check_free_space(tmp_path, 10_000, largest_file=10_000)  # fits under 64 KB
    with pytest.raises(
        InputError, match=r"file of ~0\.3 MB .* file size limit \(0\.0655 MB; ulimit -f\)"
    ):
        check_free_space(tmp_path, 200_000, largest_file=200_000)
