"""The registry: one place names variants and baselines; the CLI, training and the
baselines take them from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from magnet_st import registry


def test_a_registered_variant_reaches_the_cli_training_and_the_model() -> None:
    from magnet_st.cli import _train_config, build_parser
    from magnet_st.model.magnet import MagNetConfig
    from magnet_st.train.config import TrainConfig

    registry.register_variant("narrow", "a test variant", width=48, epochs=3)
    try:
        args = build_parser().parse_args(["train", "ds", "out", "--variant", "narrow"])
        cfg = _train_config(args)
        assert (cfg.variant, cfg.width, cfg.epochs) == ("narrow", 48, 3)
        assert TrainConfig.for_variant("narrow", width=64).width == 64  # given wins
        MagNetConfig(n_genes=3, variant="narrow", bin_feature_dim=4, spot_feature_dim=4,
                     region_feature_dim=4, width=48)  # fmt: skip
        with pytest.raises(ValueError, match="registered already"):
            registry.register_variant("narrow", "again")
    finally:
        registry.VARIANTS.pop("narrow")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "ds", "out", "--variant", "narrow"])


def test_help_shows_the_registry_without_torch() -> None:
    code = (
        "import sys; from magnet_st.cli import build_parser; "
        "h = build_parser()._subparsers._group_actions[0].choices['cv'].format_help(); "
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH'); print(h)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("NOTORCH")
    text = " ".join(out.stdout.split())
    for b in registry.BASELINES.values():
        assert f"{b.name} ({b.description.split()[0]}" in text
    assert "--variant paper: 1024" in text  # the paper's preset width, beside the default


def test_baselines_are_built_from_the_registry() -> None:
    from magnet_st.evaluate.baselines import BASELINE_NAMES, create_baseline
    from magnet_st.evaluate.baselines.paper import NEURAL_BASELINES

    assert tuple(registry.BASELINES) == BASELINE_NAMES
    assert set(NEURAL_BASELINES) == set(registry.BASELINES) - {"ridge"}
    for name in NEURAL_BASELINES:
        assert type(create_baseline(name, "key")) is NEURAL_BASELINES[name]
    assert type(create_baseline("ridge", "key")).__name__ == "RidgeBaseline"
