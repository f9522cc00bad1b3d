"""Baselines that run through the same datasets, folds, gene panels and metrics as MagNet.

The mean-profile baseline (each gene's training mean) and the ridge probe are built into
every cross-validation (:mod:`magnet_st.evaluate.cv`). The models here are chosen by name
(:data:`BASELINE_NAMES`, :func:`create_baseline`, :func:`load_baseline`), fitted on a
fold's training slides (the neural ones early-stopped on its validation slide) and scored
on its test slides by ``magnet cv --baselines`` and ``magnet benchmark``:

- ``ridge``: the HEST linear probe (PCA 256 + ridge) on the frozen features MagNet gets (a
  unit's own, its spot tile's and its region tile's), near-constant dimensions dropped,
  alpha chosen on the validation slides (cross-validated on the training slides
  without one), :mod:`.ridge`;
- ``stnet``, ``histogene``, ``his2st``, ``bleep``, ``egn``: the MagNet paper's neural
  baselines on frozen features, :mod:`.paper` (the training loop they share: :mod:`.neural`).

All predict log1p expression at every level (bins, spot tiles, region tiles), one model
per level.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from magnet_st.errors import ConfigError, InputError
from magnet_st.evaluate.baselines.ridge import RidgeBaseline
from magnet_st.registry import BASELINES

__all__ = ["BASELINE_NAMES", "RidgeBaseline", "create_baseline", "load_baseline"]

BASELINE_NAMES = tuple(BASELINES)  # the registry's (magnet_st.registry)


def create_baseline(name: str, features: str, **settings: Any):
    """A baseline by name, reading the feature set ``features``; ``settings`` go to its
    constructor (ridge: ``n_components``, ``alpha`` (``None``: cross-validated), ``context``
    ...; neural: :class:`.neural.BaselineConfig`)."""
    if name not in BASELINE_NAMES:
        raise ConfigError(f"unknown baseline {name!r}; available: {list(BASELINE_NAMES)}")
    module, attr = BASELINES[name].target.split(":")
    return getattr(importlib.import_module(module), attr)(features, **settings)


def load_baseline(path: str | Path):
    """A fitted baseline from its file (``model.npz``: ridge; ``model.pt``: neural)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "baseline file not found")
    if path.suffix == ".npz":
        return RidgeBaseline.load(path)
    from magnet_st.evaluate.baselines.neural import NeuralBaseline

    return NeuralBaseline.load(path)
