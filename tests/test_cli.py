"""The ``magnet`` command line: help texts, info output, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from magnet_st.cli import build_parser, main


def _subcommands() -> dict[str, object]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


def test_every_option_of_every_command_has_help() -> None:
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, f"magnet {name} {action.dest}"


def test_help_shows_defaults() -> None:
    text = _subcommands()["synth"].format_help()
    assert "(default: 0.2738)" in text and "(default: 2 8 16)" in text


def test_info_her2st(her2st_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(her2st_root), "--section", "C2"]) == 0
    out = capsys.readouterr().out
    assert "C2  (legacy_st)" in out
    assert "units under tissue   187" in out
    assert "genes                15,706" in out
    assert "9,274 x 9,911 px" in out


def test_info_json_hd_toy(hd_toy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json", str(hd_toy)]) == 0
    cap = capsys.readouterr()
    (s,) = json.loads(cap.out)
    assert s["units_under_tissue"] == 10 and s["genes"] == 10 and s["unit_size_um"] == 2.0
    # its counts are all zero: info says so; prepare refuses it with one line, writing nothing
    assert "have zero counts" in cap.err


def test_a_slide_without_counts_is_refused_by_prepare(
    hd_toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = tmp_path / "ds"
    assert main(["prepare", str(ds), str(hd_toy), "--bin-size", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 10 units have zero counts" in err[0]
    assert not (ds / "slides").exists() and not (ds / "manifest.json").exists()


def test_info_finds_the_image_of_a_synth_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["synth", str(run), "--size-mm", "0.2", "--bin-sizes", "16", "--genes", "20"]
    assert main([*args, "--no-mtx", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "none given" not in out
    assert f"{run.resolve() / 'he_fullres.tif'} (found in the run folder" in out


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "magnet_st", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"magnet info: error: {tmp_path / 'missing'}: not found"
    assert "Traceback" not in proc.stderr


def test_prepare_cli_her2st(
    her2st_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"name,path,section\nC5,{her2st_root},C5\nC6,{her2st_root},C6\n")
    ds = tmp_path / "ds"
    args = ["prepare", str(ds), "--samples", str(sheet), "--n-genes", "100", "--quiet"]
    assert main(args) == 0
    assert "2 slides prepared" in capsys.readouterr().out
    m = json.loads((ds / "manifest.json").read_text())
    assert sorted(m["slides"]) == ["C5", "C6"] and m["panel"]["n_genes"] == 100
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out
    # commands refused on their arguments leave no output folder behind
    out = tmp_path / "cv"
    assert main(["cv", str(ds), str(out), "--only-folds", "7", "--quiet"]) == 2
    assert "no fold [7]" in capsys.readouterr().err and not out.exists()
    figs = tmp_path / "figs"
    assert main(["plot", str(ds), "--out", str(figs), "--formats", "xyz"]) == 2
    assert "--formats: unknown ['xyz']" in capsys.readouterr().err and not figs.exists()
    assert "--n-genes" in _rejected(["plot", "x", "--out", str(figs), "--n-genes", "0"], capsys)


def test_cli_reference_in_docs_is_current() -> None:
    """docs/cli.md is the --help of every command; regenerate with scripts/cli_docs.py."""
    from magnet_st.cli import build_parser, cli_reference

    doc = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    text = cli_reference()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"## magnet {name}" in text
    assert "--grid-origin-um" in text and "--n-genes" in text
    assert doc.read_text() == text, "docs/cli.md is stale: run python scripts/cli_docs.py"


def test_loss_weight_option_sets_weights_and_rejects_bad_ones() -> None:
    from dataclasses import asdict

    from magnet_st.cli import _LOSS_DEFAULTS, _train_config
    from magnet_st.errors import ConfigError
    from magnet_st.model.losses import LossWeights

    assert asdict(LossWeights()) == _LOSS_DEFAULTS  # '--help' shows the true defaults
    parser = build_parser()
    args = parser.parse_args(
        ["train", "ds", "out", "--loss-weight", "context_mse=0.2", "--loss-weight", "pcc=0"]
    )
    cfg = _train_config(args)
    assert cfg.loss_weights == {**_LOSS_DEFAULTS, "context_mse": 0.2, "pcc": 0.0}
    for bad in ["ctx=1", "pcc", "pcc=abc", "pcc=-1"]:
        with pytest.raises(ConfigError, match="--loss-weight"):
            _train_config(parser.parse_args(["train", "ds", "out", "--loss-weight", bad]))


def test_unexpected_error_is_one_line_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from magnet_st.cli import _inputs

    def boom(args: object) -> int:
        raise RuntimeError("boom\n  second line")

    monkeypatch.setattr(_inputs, "cmd_info", boom)
    assert main(["info", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "magnet info: unexpected error: RuntimeError: boom second line "
        "(run with -v for the traceback)"
    ]
    assert "Traceback" not in err
    for argv in (["-v", "info", "somewhere"], ["info", "somewhere", "-v"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "in boom" in err
        assert (
            err.splitlines()[-1] == "magnet info: unexpected error: RuntimeError: boom second line"
        )


def _rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_devices_is_a_positive_integer_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (
        ["train", "ds", "out"],
        ["cv", "ds", "out"],
        ["benchmark", "ds", "out"],
        ["features", "ds"],
    ):
        for bad in ("two", "0", "-1", "1.5"):
            err = _rejected([*command, "--devices", bad], capsys)
            assert "argument --devices: must be an integer >= 1 or 'auto', got" in err
            assert "Traceback" not in err
        assert build_parser().parse_args([*command, "--devices", "auto"]).devices == "auto"
        assert build_parser().parse_args([*command, "--devices", "2"]).devices == 2
        assert build_parser().parse_args(command).devices == 1


def test_devices_reach_the_train_config() -> None:
    from magnet_st.cli import _train_config

    parser = build_parser()
    assert (
        _train_config(parser.parse_args(["train", "d", "o", "--devices", "auto"])).devices == "auto"
    )
    assert _train_config(parser.parse_args(["train", "d", "o", "--devices", "3"])).devices == 3


def test_bin_weights_reach_the_train_config() -> None:
    from magnet_st.cli import _train_config

    parser = build_parser()
    args = ["train", "d", "o", "--bin-encoder", "resnet50", "--bin-weights", "r50.pth"]
    cfg = _train_config(parser.parse_args(args))
    assert (cfg.bin_encoder, cfg.bin_weights) == ("resnet50", "r50.pth")
    assert _train_config(parser.parse_args(["train", "d", "o"])).bin_weights is None


def test_k_and_folds_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["train", "ds", "out"], ["cv", "ds", "out"], ["prepare", "ds"]):
        assert "argument --k: must be at least 1, got 0" in _rejected([*argv, "--k", "0"], capsys)
        assert "argument --k: must be an integer" in _rejected([*argv, "--k", "x"], capsys)
    for argv in (["cv", "ds", "out"], ["benchmark", "ds", "out"]):
        err = _rejected([*argv, "--scheme", "kfold", "--folds", "1"], capsys)
        assert "argument --folds: must be at least 2, got 1" in err
        assert build_parser().parse_args([*argv, "--folds", "2"]).folds == 2
    assert build_parser().parse_args(["train", "ds", "out", "--k", "1"]).k == 1


def test_missing_resume_checkpoint_is_named_before_the_dataset_is_read(tmp_path: Path) -> None:
    """A mistyped --resume fails at once, naming the file, with no torch import or data load."""
    ckpt = tmp_path / "missing.ckpt"
    argv = ["train", str(tmp_path / "no-dataset"), str(tmp_path / "out"), "--resume", str(ckpt)]
    code = (
        "import sys; from magnet_st.cli import main; rc = main(sys.argv[1:]); "
        "sys.exit(99 if 'torch' in sys.modules else rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"magnet train: error: {ckpt}: ") and "not found" in line
    assert "no-dataset" not in line
    assert not (tmp_path / "out").exists()


def test_parser_imports_no_heavy_library() -> None:
    """'magnet --help' stays instant: neither importing the CLI nor building its parser
    imports torch (or lightning, timm, scanpy, anndata, pandas)."""
    code = (
        "import sys, magnet_st.cli; magnet_st.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'lightning', 'timm', 'scanpy', 'anndata', 'pandas') "
        "if m in sys.modules]; sys.exit(', '.join(heavy) or None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"imported: {proc.stderr}"


def test_package_attributes_load_lazily() -> None:
    import magnet_st as ms

    assert callable(ms.read.visium_hd)
    assert ms.Slide.__name__ == "Slide" and ms.SlideImage.__name__ == "SlideImage"
    assert callable(ms.open_image)
    assert {"read", "Slide", "InputError"} <= set(dir(ms))
    with pytest.raises(AttributeError):
        ms.no_such_thing  # noqa: B018


def test_demo_encoder_default_matches_the_demo() -> None:
    from magnet_st.cli import _DEMO_ENCODER
    from magnet_st.demo import DEMO_ENCODER

    assert _DEMO_ENCODER == DEMO_ENCODER  # '--help' shows the true default


def test_third_party_deprecation_warnings_are_silenced(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from magnet_st.cli import _silence_third_party_warnings

    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _silence_third_party_warnings()
        for module in ("lightning.pytorch.trainer", "anndata._core", "timm.models", "scanpy"):
            for category in (FutureWarning, DeprecationWarning):
                warnings.warn_explicit("old", category, "x.py", 1, module=module)
        # torch_geometric's import-time torch.jit.script call warns in torch's name
        jit = "`torch.jit.script` is deprecated. Please switch to `torch.compile`."
        warnings.warn_explicit(jit, FutureWarning, "x.py", 1, module="torch.jit._script")
        warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="magnet_st.evaluate.cv")
        warnings.warn_explicit("user", UserWarning, "x.py", 1, module="lightning.pytorch")
        warnings.warn_explicit("other", FutureWarning, "x.py", 1, module="timmy")
    assert sorted(str(w.message) for w in caught) == ["other", "ours", "user"]


def test_explicit_options_win_over_the_paper_variant_presets() -> None:
    from dataclasses import fields

    from magnet_st.cli import _train_config, build_parser
    from magnet_st.registry import TRAIN_DEFAULTS
    from magnet_st.train.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert {k: defaults[k] for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS  # '--help' is true
    parse = lambda *a: _train_config(build_parser().parse_args(["train", "ds", "out", *a]))  # noqa: E731
    cfg = parse("--variant", "paper", "--epochs", "30", "--width", "256")
    assert (cfg.epochs, cfg.width) == (30, 256)  # given explicitly, even at the default values
    assert (cfg.optimizer, cfg.context_tokens, cfg.bin_encoder) == ("sgd", 1, "resnet50")
    cfg = parse("--variant", "paper")
    assert (cfg.epochs, cfg.width, cfg.consistency) == (51, 1024, "paper")
    assert cfg.pcc_axis == "unit" and parse().pcc_axis == "gene"  # measured default
    assert parse("--variant", "paper", "--pcc-axis", "gene").pcc_axis == "gene"
    cfg = parse("--pcc-axis", "gene", "--consistency", "aggregate")
    assert (cfg.epochs, cfg.width, cfg.bin_encoder) == (30, 256, "frozen")
    assert (cfg.pcc_axis, cfg.consistency) == ("gene", "aggregate")
    assert cfg.deterministic is True and parse("--nondeterministic").deterministic is False
    assert (parse().batch_bins, parse().block) == (256, 2)
    assert (parse("--block", "3").batch_bins, parse("--block", "3").block) == (None, 3)
    # loss weights merge one by one: defaults, the variant's (paper: no context MSE), given
    assert parse().loss_weights["context_mse"] == 0.75
    paper = parse("--variant", "paper", "--loss-weight", "pcc=0.2").loss_weights
    assert (paper["context_mse"], paper["pcc"], paper["mse"]) == (0.0, 0.2, 0.75)
    given = parse("--variant", "paper", "--loss-weight", "context_mse=0.5").loss_weights
    assert given["context_mse"] == 0.5
    cfg = parse("--dropout", "0.3", "--weight-decay", "0.01")
    assert (cfg.dropout, cfg.weight_decay) == (0.3, 0.01)
    assert (parse().dropout, parse().weight_decay) == (0.1, 1e-4)
    for bad in (["--dropout", "1"], ["--weight-decay", "-1"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_cv_slides_option_selects_slides() -> None:
    from magnet_st.cli import build_parser

    args = build_parser().parse_args(["cv", "ds", "out", "--slides", "a", "b"])
    assert args.slides == ["a", "b"]
    assert build_parser().parse_args(["cv", "ds", "out"]).slides is None
    assert build_parser().parse_args(["benchmark", "ds", "out", "--slides", "c"]).slides == ["c"]


def test_legacy_st_pitch_and_filled_genes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from legacy_files import array_grid, write_section

    root = tmp_path / "st"
    write_section(root, "M1", ["a", "b", "c"], array_grid(8, 8, True), pitch_um=100, mpp=(0.5, 0.5))
    write_section(root, "M2", ["b", "c"], array_grid(8, 8, True), pitch_um=100, mpp=(0.5, 0.5))
    assert main(["info", str(root), "--section", "M1"]) == 0
    assert "microns per pixel    0.5000   (from 100 um array pitch (checkerboard" in (
        capsys.readouterr().out
    )
    assert main(["info", str(root), "--section", "M1", "--spot-pitch", "200"]) == 0
    assert "microns per pixel    1.0000   (from given 200 um array pitch" in capsys.readouterr().out
    args = ["prepare", str(tmp_path / "ds"), str(root), "--panel", "mean", "--n-genes", "3"]
    assert main([*args, "--quiet"]) == 0
    assert "slide M2: 1 panel genes not listed in its counts, filled with zeros" in (
        capsys.readouterr().out
    )
