"""torchfile: model, checkpoint and weights files are read safely, with one clear line."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from magnet_st.cli import main
from magnet_st.errors import InputError
from magnet_st.util import torchfile


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["random bytes"] = tmp_path / "random.pt"
    files["random bytes"].write_bytes(bytes(range(256)) * 40)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(64, 64)}, good)
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(good.read_bytes()[:3000])
    files["a pickled object"] = tmp_path / "object.pt"
    torch.save({"w": torch.ones(2), "path": Path("/etc")}, files["a pickled object"])
    files["a plain pickle"] = tmp_path / "plain.pkl"
    files["a plain pickle"].write_bytes(pickle.dumps({"x": print}))
    return files


def test_bad_torch_files_are_one_line_without_torchs_unsafe_advice(tmp_path: Path) -> None:
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as info:
            torchfile.load(path, "model file")
        msg = str(info.value)
        assert str(path) in msg and "cannot read model file" in msg, what
        assert "weights_only" not in msg and "\n" not in msg, (what, msg)
    with pytest.raises(InputError, match="model file not found"):
        torchfile.load(tmp_path / "none.pt", "model file")
    assert torchfile.load(tmp_path / "good.pt", "x")["w"].shape == (64, 64)


def test_commands_given_a_bad_file_say_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_files(tmp_path)["a pickled object"]
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 100, 150)).save(img)
    runs = {
        "predict": ["predict", "--model", str(bad), "--image", str(img), "--out",
                    str(tmp_path / "p")],
    }  # fmt: skip
    for name, argv in runs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert str(bad) in err and "cannot read" in err, (name, err)
        assert "unexpected" not in err and "weights_only" not in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    # encoder weights, and a checkpoint to resume training from: the same, before any work
    from magnet_st.features.encoders import create_encoder
    from magnet_st.train.config import TrainConfig
    from magnet_st.train.trainer import fit

    with pytest.raises(InputError, match="cannot read weights") as info:
        create_encoder("resnet18", weights=bad)
    assert "weights_only" not in str(info.value)
    with pytest.raises(InputError, match="cannot read checkpoint to resume from"):
        fit(None, ["s"], [], TrainConfig(features="x"), tmp_path / "t", resume=bad)  # type: ignore[arg-type]
    good = tmp_path / "good.pt"
    with pytest.raises(InputError, match="not a training checkpoint"):
        fit(None, ["s"], [], TrainConfig(features="x"), tmp_path / "t", resume=good)  # type: ignore[arg-type]
    assert not (tmp_path / "t").exists()


class _Truncated(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        raise InputError("/data/slide.tif", "truncated image: tile 3 of 12 cannot be decoded")


def test_an_error_in_a_dataloader_worker_reaches_the_user_as_its_own_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from magnet_st.cli import _features
    from magnet_st.errors import from_worker

    def run(args: object) -> int:
        for _ in torch.utils.data.DataLoader(_Truncated(), num_workers=1):
            pass
        return 0

    with pytest.raises(Exception) as info:
        run(None)
    assert "Traceback" in str(info.value)  # what torch hands over: the worker's traceback
    ours = from_worker(info.value)
    assert str(ours) == "/data/slide.tif: truncated image: tile 3 of 12 cannot be decoded"
    assert from_worker(RuntimeError("Caught ValueError in DataLoader worker process 0")) is None
    monkeypatch.setattr(_features, "cmd_features", run)
    assert main(["features", "ds"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"magnet features: error: {ours}"
