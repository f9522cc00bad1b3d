"""The Python API: docs/api.md's worked example runs as written, and each function is the
command's."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/api.md has one worked example"
    return blocks[0]


def test_the_worked_example_runs(tmp_path: Path) -> None:
    """docs/api.md's example, run as it is: a cross-validation table with the baselines,
    a trained model, an image-only prediction as AnnData and a gene-map figure."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(_example(), str(DOC), "exec"), scope)
    finally:
        os.chdir(cwd)
    table, bins, fit = scope["table"], scope["bins"], scope["fit"]
    model = tmp_path / fit.model_path  # the example's paths are relative
    assert {"mean_profile", "ridge", "magnet"} <= set(table["model"])
    assert set(table["test_slide"]) == {"s0", "s1", "s2"}
    assert model.is_file() and len(fit.history) == 1
    assert bins.n_obs > 100 and bins.n_vars == 30
    assert bins.obsm["spatial"].shape == (bins.n_obs, 2)
    assert (tmp_path / "runs" / "gene_maps.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "pred" / "bins.h5ad").is_file()


def test_train_defaults_to_the_only_feature_set_and_names_several(tmp_path: Path) -> None:
    from magnet_st.errors import InputError
    from magnet_st.tl import _features

    ds = tmp_path / "ds"
    with pytest.raises(InputError, match="no feature sets; make one with ms.pp.features"):
        _features(ds, None)
    for key in ("a-1", "b-2"):
        (ds / "features" / key).mkdir(parents=True)
        (ds / "features" / key / "meta.json").write_text('{"format": "magnet-st-features"}')
    from magnet_st.features.store import FORMAT

    for key in ("a-1", "b-2"):
        (ds / "features" / key / "meta.json").write_text(f'{{"format": "{FORMAT}"}}')
    with pytest.raises(InputError, match=r"several feature sets \(a-1, b-2\); pass features=KEY"):
        _features(ds, None)
    (ds / "features" / "b-2" / "meta.json").unlink()
    assert _features(ds, None) == "a-1"
    assert _features(ds, "given") == "given"


def test_split_is_the_commands() -> None:
    from magnet_st.tl import split_slides

    assert split_slides(["a", "b", "c"], None, None) == (["a", "b"], ["c"])
    assert split_slides(["a", "b"], None, None) == (["a", "b"], [])
    assert split_slides(["a", "b", "c"], None, ["a"]) == (["b", "c"], ["a"])
    assert split_slides(["a", "b", "c"], ["b"], []) == (["b"], [])
