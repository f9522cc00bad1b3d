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
    (s,) = json.loads(capsys.readouterr().out)
    assert s["units_under_tissue"] == 10 and s["genes"] == 10 and s["unit_size_um"] == 2.0


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
    from magnet_st.losses import LossWeights

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
