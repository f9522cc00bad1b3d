"""features: cached encoder features per slide/level: shapes, cutting, resume, skip, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from magnet_st.cli import main
from magnet_st.data.dataset import Dataset
from magnet_st.errors import ConfigError, InputError
from magnet_st.features import extract as F
from magnet_st.features import jobs as J
from magnet_st.features.encoders import Preprocess, create_encoder
from magnet_st.features.extract import extract_features
from magnet_st.features.store import list_feature_sets, load_features
from magnet_st.prepare.build import prepare
from magnet_st.prepare.config import PrepareConfig
from magnet_st.read.specs import SlideSpec

ENC = "mobilenetv3_small_050"  # tiny (~200 tiles/s on one slow core), 224 px input
KEY = f"{ENC}-random"
FAST = {"device": "cpu", "batch_size": 16, "num_workers": 1, "progress": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_dataset(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features") / "ds"
    spec = SlideSpec(
        name="syn",
        path=str(synthetic_slide),
        image=str(synthetic_slide / "he_fullres.tif"),
        bin_size=8,
    )
    prepare([spec], out, PrepareConfig(n_genes=50), progress=False)
    return out


@pytest.fixture
def dataset(base_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared dataset (features are written into it)."""
    dest = tmp_path / "ds"
    shutil.copytree(base_dataset, dest)
    return dest


@pytest.fixture(scope="module")
def reference(base_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Features of an uninterrupted default run, and its result."""
    ds = tmp_path_factory.mktemp("ref") / "ds"
    shutil.copytree(base_dataset, ds)
    result = extract_features(ds, ENC, **FAST)
    arrays = {lv: load_features(ds, ENC, "syn", lv) for lv in ("spot", "region")}
    return {"path": ds, "result": result, "arrays": arrays}


def test_shapes_dtypes_layout_and_meta(reference: dict) -> None:
    ds, result = reference["path"], reference["result"]
    d = Dataset(ds)
    assert result["key"] == KEY
    assert [(j["level"], j["status"]) for j in result["jobs"]] == [
        ("spot", "done"),
        ("region", "done"),
    ]
    for level in ("spot", "region"):
        a = reference["arrays"][level]
        assert a.dtype == np.float16 and a.shape == (d.level("syn", level).n_obs, 1024)
        assert np.isfinite(a).all() and a.std() > 0
        assert (ds / "features" / KEY / "syn" / f"{level}.npy").is_file()
    files = sorted(p.name for p in (ds / "features" / KEY / "syn").iterdir())
    assert files == ["region.json", "region.npy", "spot.json", "spot.npy"]  # no partials
    meta = json.loads((ds / "features" / KEY / "meta.json").read_text())
    assert meta["encoder"]["name"] == ENC and meta["encoder"]["weights_checksum"] == "random-init"
    assert meta["feature_dim"] == 1024 and meta["dtype"] == "float16"
    assert meta["input_size"] == [224, 224] and meta["interpolation"] == "bicubic"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["levels"]["spot"] == {"patch_um": 56.0, "patch_px": 224, "working_mpp": 0.25}
    assert meta["levels"]["region"]["patch_um"] == 128.0
    spot = meta["slides"]["syn"]["spot"]
    mpp = d.slide_meta("syn")["microns_per_pixel"]
    assert spot["native_px"] == round(56 / mpp) == spot["read_px"]
    assert spot["rows"] == d.level("syn", "spot").n_obs and spot["complete"]
    assert {"torch", "timm", "numpy", "magnet-st"} <= set(meta["packages"])
    sets = list_feature_sets(ds)
    assert [s["key"] for s in sets] == [KEY]
    # by key or by encoder name
    np.testing.assert_array_equal(
        load_features(ds, KEY, "syn", "spot"), reference["arrays"]["spot"]
    )


def test_deterministic_and_reader_independent(
    reference: dict, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run, reading in the main process and resampling there, gives the same bits;
    each slide's image is let go once its last level is done (a JPEG is held decoded)."""
    from magnet_st.data.dataset import Dataset

    released, real = [], Dataset.release_image

    def release(self, slide):
        released.append((slide, slide in self._images))
        real(self, slide)
        assert slide not in self._images

    monkeypatch.setattr(Dataset, "release_image", release)
    extract_features(dataset, ENC, **{**FAST, "num_workers": 0, "batch_size": 16})
    assert released == [("syn", True)]
    for level in ("spot", "region"):
        np.testing.assert_array_equal(
            load_features(dataset, ENC, "syn", level), reference["arrays"][level]
        )


def test_features_match_direct_patch_reads(reference: dict) -> None:
    """Tiles cut at native resolution and resampled in torch ~ tiles read to size by PIL."""
    ds = Dataset(reference["path"])
    enc = create_encoder(ENC)
    image = ds.image("syn")
    mpp = ds.slide_meta("syn")["microns_per_pixel"]
    grey = Preprocess((224, 224), (0.0,) * 3, (1 / 255,) * 3, "bilinear")  # grey levels
    for level in ("spot", "region"):
        centers = ds.positions_px("syn", level)[:12]
        span = ds.patch_um(level) / mpp
        direct = torch.from_numpy(
            np.stack(
                [
                    image.read_region(x - span / 2, y - span / 2, span, span, (224, 224))
                    for x, y in centers
                ]
            )
        )
        # the pixels the encoder sees: the same place (a 1 px shift is worse) and scale
        native = round(span)
        batches = J._TileBatches(image, centers, native, native, mpp, ds.patch_um(level), 12, 0)
        diff = (grey(batches[0]) - grey(direct)).abs().mean().item()
        assert diff < 5.0  # grey levels; sub-pixel offset and filter differences only
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            batches.centers = centers + [dx, dy]
            assert (grey(batches[0]) - grey(direct)).abs().mean().item() > diff
        # and the stored features are those of the directly read tiles
        got = reference["arrays"][level][:12].astype(np.float32)
        want = enc.encode(direct).numpy()
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.99, cos


def test_resume_after_interruption(
    reference: dict, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = J._encode_batch

    def crashing(encoder, batch):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if Ctrl-C'd during the 4th batch
        calls["n"] += 1
        return real(encoder, batch)

    monkeypatch.setattr(J, "_encode_batch", crashing)
    opts = {**FAST, "batch_size": 8, "flush_every": 2}
    with pytest.raises(KeyboardInterrupt):
        extract_features(dataset, ENC, **opts)
    folder = dataset / "features" / KEY / "syn"
    assert (folder / "spot.partial.npy").is_file() and not (folder / "spot.npy").exists()
    progress = json.loads((folder / "spot.progress.json").read_text())
    assert progress["rows_done"] == 24  # saved on the interrupt, not only every 2 batches
    with pytest.raises(InputError, match="interrupted run.*magnet features"):
        load_features(dataset, ENC, "syn", "spot")

    counted = {"rows": 0}

    def counting(encoder, batch):
        counted["rows"] += len(batch)
        return real(encoder, batch)

    monkeypatch.setattr(J, "_encode_batch", counting)
    result = extract_features(dataset, ENC, **opts)
    n_spot = reference["arrays"]["spot"].shape[0]
    n_region = reference["arrays"]["region"].shape[0]
    spot, region = result["jobs"]
    assert spot["status"] == "resumed" and spot["processed_rows"] == n_spot - 24
    assert region["status"] == "done" and region["processed_rows"] == n_region
    assert counted["rows"] == n_spot - 24 + n_region  # only the remainder was encoded
    for level in ("spot", "region"):  # other batch sizes and thread counts: not bit-exact
        np.testing.assert_allclose(
            load_features(dataset, ENC, "syn", level).astype(np.float32),
            reference["arrays"][level].astype(np.float32),
            rtol=1e-2,
            atol=2e-3,
        )
    assert sorted(p.name for p in folder.iterdir()) == [
        "region.json",
        "region.npy",
        "spot.json",
        "spot.npy",
    ]


def test_skip_when_complete_and_overwrite(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = extract_features(dataset, ENC, levels=["region"], **FAST)
    npy = dataset / "features" / KEY / "syn" / "region.npy"
    mtime = npy.stat().st_mtime_ns
    calls = {"n": 0}
    real = J._encode_batch

    def counting(encoder, batch):
        calls["n"] += 1
        return real(encoder, batch)

    monkeypatch.setattr(J, "_encode_batch", counting)
    again = extract_features(dataset, ENC, levels=["region"], **FAST)
    assert [j["status"] for j in again["jobs"]] == ["skipped"] and calls["n"] == 0
    assert npy.stat().st_mtime_ns == mtime
    redo = extract_features(dataset, ENC, levels=["region"], overwrite=True, **FAST)
    assert [j["status"] for j in redo["jobs"]] == ["done"] and calls["n"] > 0
    assert first["jobs"][0]["rows"] == redo["jobs"][0]["rows"]
    # a truncated array is not complete: it is recomputed
    np.save(npy, np.zeros((3, 1024), np.float16))
    fixed = extract_features(dataset, ENC, levels=["region"], **FAST)
    assert [j["status"] for j in fixed["jobs"]] == ["done"]
    assert load_features(dataset, ENC, "syn", "region").shape[0] == first["jobs"][0]["rows"]


def _mtimes(root: Path) -> dict[str, int]:
    return {str(q.relative_to(root)): q.stat().st_mtime_ns for q in sorted(root.rglob("*"))}


def test_rerun_with_nothing_to_do_touches_no_file(reference: dict, tmp_path: Path) -> None:
    """Make-style workflows see nothing changed: not even meta.json is rewritten."""
    ds = tmp_path / "ds"
    shutil.copytree(reference["path"], ds)
    before = _mtimes(ds)
    argv = ["features", str(ds), "--encoder", ENC, "--device", "cpu", "--quiet"]
    assert main([*argv, "--mode", "patches", "--batch-size", "16", "--workers", "1"]) == 0
    assert _mtimes(ds) == before
    result = extract_features(ds, ENC, levels=["spot"], **FAST)
    assert [j["status"] for j in result["jobs"]] == ["skipped"]
    assert result["meta"]["slides"]["syn"]["spot"]["complete"]
    assert _mtimes(ds) == before


def test_bin_level_on_request(dataset: Path) -> None:
    # 32 px input (a preprocessing override through encoder_kwargs) keeps ~2300 bins quick
    small = {"pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
    result = extract_features(
        dataset, ENC, levels=["bin"], encoder_kwargs=small, **{**FAST, "batch_size": 256}
    )
    key = result["key"]
    assert key.startswith(f"{KEY}-k") and result["encoder"]["input_size"] == [32, 32]
    d = Dataset(dataset)
    a = load_features(dataset, key, "syn", "bin")
    assert a.shape == (d.level("syn", "bin").n_obs, 1024) and a.dtype == np.float16
    bins = result["meta"]["slides"]["syn"]["bin"]
    assert bins["native_px"] == round(28 / d.slide_meta("syn")["microns_per_pixel"])
    with pytest.raises(InputError, match=r"no complete spot features.*run 'magnet features"):
        load_features(dataset, key, "syn", "spot")  # other levels were not run


def test_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run 'magnet features .* --encoder resnet50' first"):
        load_features(dataset, "resnet50", "syn", "spot")
    with pytest.raises(ConfigError, match="unknown encoder"):
        extract_features(dataset, "resnet5o", **FAST)
    with pytest.raises(InputError, match="weights file not found"):
        extract_features(dataset, "resnet18", weights=tmp_path / "none.pth", **FAST)
    wrong = tmp_path / "wrong.pth"
    torch.save(create_encoder(ENC).model.state_dict(), wrong)
    with pytest.raises(InputError, match=r"wrong.pth: weights do not fit.*missing keys"):
        extract_features(dataset, "resnet18", weights=wrong, **FAST)
    with pytest.raises(InputError, match="not a dataset"):
        extract_features(tmp_path, ENC, **FAST)
    with pytest.raises(InputError, match="dataset folder not found"):
        extract_features(tmp_path / "missing", ENC, **FAST)
    with pytest.raises(ConfigError, match="levels"):
        extract_features(dataset, ENC, levels=["tile"], **FAST)
    with pytest.raises(ConfigError, match="slides"):
        extract_features(dataset, ENC, slides=["nope"], **FAST)
    assert not (dataset / "features").exists() or not any((dataset / "features").iterdir())


def test_check_float16_names_slide_level_and_peak() -> None:
    ok = np.array([[65504.0, -1.5], [0.0, 3.0]], np.float32)
    out = F.check_float16(ok, "a", "spot")
    assert out.dtype == np.float16 and np.isfinite(out).all()
    for big in (65505.0, 7e4, -1e9):
        bad = ok.copy()
        bad[1, 1] = big
        with pytest.raises(
            ConfigError, match=rf"slide a, level spot: .*{re.escape(f'{abs(big):g}')}.*65504"
        ):
            F.check_float16(bad, "a", "spot")
    bad = ok.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ConfigError, match="slide b, level region: features contain NaN"):
        F.check_float16(bad, "b", "region")


def test_float16_overflow_is_an_error_and_writes_nothing(
    dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = J._encode_batch
    calls = {"n": 0}

    def overflowing(encoder, batch):
        pending = real(encoder, batch)
        calls["n"] += 1
        if calls["n"] == 3:  # the third batch of the spot level holds one huge value
            pending.host = pending.host.clone()
            pending.host[1, 5] = -7.0e4
        return pending

    monkeypatch.setattr(J, "_encode_batch", overflowing)
    with pytest.raises(ConfigError, match=r"slide syn, level spot: .*70000.*65504"):
        extract_features(dataset, ENC, levels=["spot"], **{**FAST, "batch_size": 8})
    folder = dataset / "features" / KEY / "syn"
    assert sorted(p.name for p in folder.iterdir()) == []  # no final, partial or record file
    with pytest.raises(InputError):
        load_features(dataset, ENC, "syn", "spot")
    # imported features are checked before any is written
    n = {lv: Dataset(dataset).level("syn", lv).n_obs for lv in ("spot", "region")}
    arrays = {("syn", lv): np.zeros((n[lv], 4), np.float32) for lv in ("spot", "region")}
    arrays[("syn", "region")][0, 0] = 1e5
    with pytest.raises(ConfigError, match=r"slide syn, level region: .*100000"):
        F.import_features(dataset, "outside", arrays)
    assert not list((dataset / "features").glob("outside*/syn/*.npy"))


def test_two_weight_files_are_two_feature_sets(dataset: Path, tmp_path: Path) -> None:
    paths = []
    for seed in (1, 2):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            sd = create_encoder(ENC, encoder_kwargs={"drop_rate": 0.0}).model.state_dict()
        sd = {k: v + 0.01 * seed if v.is_floating_point() else v for k, v in sd.items()}
        paths.append(tmp_path / f"w{seed}.pth")
        torch.save(sd, paths[-1])
    keys = [
        extract_features(dataset, ENC, levels=["region"], weights=p, **FAST)["key"] for p in paths
    ]
    assert len(set(keys)) == 2 and all(k.startswith(f"{ENC}-") for k in keys)
    a, b = (load_features(dataset, k, "syn", "region") for k in keys)
    assert not np.array_equal(a, b)
    with pytest.raises(InputError, match="several feature sets"):
        load_features(dataset, ENC, "syn", "region")


def test_multi_device_split_runs_disjoint_jobs(dataset: Path, reference: dict) -> None:
    """The one-process-per-GPU path, exercised with two CPU processes."""
    ds = Dataset(dataset)
    enc = create_encoder(ENC)
    jobs = [J._plan_job(ds, "syn", lv, enc.input_size)[0] for lv in ("spot", "region")]
    assert sorted(sum(J._assign(jobs, 2), [])) == [("syn", "region"), ("syn", "spot")]
    root = dataset / "features" / KEY
    root.mkdir(parents=True)
    opts = {"batch_size": 16, "num_workers": 0, "flush_every": 20, "progress": False}
    args = {"name": ENC, "weights": None, "pretrained": False, "encoder_kwargs": None}
    results = J._run_multi(["cpu", "cpu"], jobs, dataset, args, KEY, opts)
    assert sorted(r["level"] for r in results) == ["region", "spot"]
    for level in ("spot", "region"):  # other processes, other thread counts: float noise
        np.testing.assert_allclose(
            np.load(root / "syn" / f"{level}.npy").astype(np.float32),
            reference["arrays"][level].astype(np.float32),
            rtol=1e-2,
            atol=1e-4,
        )


def test_cli(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["features", str(dataset), "--encoder", ENC, "--device", "cpu", "--quiet"]
    argv += ["--mode", "patches"]
    assert main([*argv, "--levels", "region", "--batch-size", "8", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "syn/region" in out and f"features/{KEY}: 1 slide/levels encoded" in out
    assert main([*argv, "--levels", "region", "--devices", "2"]) == 0  # one device on CPU
    assert "1 already complete" in capsys.readouterr().out
    assert main(["features", str(tmp_path / "nope"), "--encoder", ENC]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main([*argv, "--encoder-kwargs", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_her2st_spot_features(her2st_root: Path, tmp_path: Path) -> None:
    from magnet_st import read

    specs = read.specs_from_paths([her2st_root])[:1]
    prepare(specs, tmp_path / "ds", PrepareConfig(n_genes=50), progress=False)
    result = extract_features(
        tmp_path / "ds", "resnet18", levels=["spot"], device="cpu", progress=False
    )
    (job,) = result["jobs"]
    d = Dataset(tmp_path / "ds")
    a = load_features(tmp_path / "ds", "resnet18", specs[0].name, "spot")
    assert a.shape == (d.level(specs[0].name, "spot").n_obs, 512) == (job["rows"], 512)
    assert np.isfinite(a).all() and a.std() > 0
    spot = result["meta"]["slides"][specs[0].name]["spot"]
    assert spot["native_px"] == round(d.patch_um("spot") / spot["microns_per_pixel"])
