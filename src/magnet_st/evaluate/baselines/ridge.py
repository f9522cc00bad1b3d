"""Ridge regression on PCA-reduced frozen features: the HEST-Benchmark linear probe, fed the
same features MagNet gets and with its penalty chosen by cross-validation."""

# Long module: one baseline: RidgeBaseline (~470 lines, ~50 of them the docstring on its HEST changes)
# and the closed-form ridge and CV helpers only it uses (_Sums, choose_alpha, x_blocks, tile_index).

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from magnet_st.data.dataset import Dataset
from magnet_st.data.levels import LEVELS
from magnet_st.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: the feature sets each level's input concatenates (``context=True``): a unit's own
#: features, then those of the spot tile and the region tile it lies in
SOURCES = {"bin": ("bin", "spot", "region"), "spot": ("spot", "region"), "region": ("region",)}
#: the ridge penalties tried, per training unit (see :class:`RidgeBaseline`)
ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 7))
#: the penalty when cross-validation is impossible (fewer than two groups of units)
FALLBACK_ALPHA = 1.0
_EXACT_SVD_COST = 2e10  # m * d * min(m, d) below which the PCA uses an exact SVD


class RidgeBaseline:
    """Ridge regression on frozen image features after PCA to 256 components.

    **HEST.** The HEST-Benchmark (Jaume et al., NeurIPS 2024 Datasets and Benchmarks,
    "HEST-1k") probes a frozen encoder linearly: each patch is embedded, the embeddings are
    standardised and reduced by PCA to 256 components, and a ridge model maps them to log1p
    expression, with a fixed penalty (``alpha = 100 / (n_features * n_genes)``).

    **What this class does.** One model per level. A unit's input is what MagNet's frozen
    branches see (``context=True``, the default): a bin's own features, those of its spot
    tile and those of its region tile (``Dataset.membership``); a spot tile's own and its
    region tile's (``obs["region"]`` of the spot level, else the region of most of its bins);
    a region tile's own. ``context=False`` gives each level its own features only.

    **What was changed, and why.**

    - *Near-constant dimensions are dropped before scaling.* Encoders have dimensions that
      hardly vary over the training patches (about 140 of EfficientNet-Lite0's 3,840 per
      tile). Standardising divides them by a tiny standard deviation, so a test patch that
      moves them at all gets values of 1e3-1e4 after scaling; through the PCA and the ridge
      these became absurd predictions. Here the features are centred, every dimension whose
      standard deviation (on the PCA sample of training units) is below ``drop_tol`` (1e-2)
      times the median standard deviation is dropped, the rest are standardised, then PCA
      keeps ``min(n_components, units, dimensions)`` components.
    - *The penalty is chosen on the validation slides* of the fold protocol
      (:mod:`magnet_st.evaluate.cv`), like every model's choices: fitted on the training slides, each
      alpha of the grid scored on the validation slides; with ``refit`` the model is then
      fitted again on training + validation slides with the alpha chosen. Without
      validation slides it is cross-validated on the training slides only, as HEST's
      later tuning did (HEST PR #140: a per-encoder alpha moved UNI2-h's PCC from 0.408 to
      0.434). ``alpha`` is a penalty per training unit: the objective is the mean squared
      error plus ``alpha * |w|^2`` (scikit-learn's ``Ridge(alpha=alpha * n_units)``), so the
      same value means the same shrinkage at every level and slide size. The grid is
      ``alphas`` (1e-2 ... 1e4). Folds: leave one training slide out when there are two or
      more, otherwise ``cv_blocks`` contiguous blocks of the one slide cut along x (by the x
      of each unit's region tile when the input has context, so that no tile's features are
      on both sides). Score: mean PCC-gene on the held-out units (genes constant there are
      left out), averaged over folds; the largest alpha wins ties; if no PCC can be computed
      the lowest MSE decides. The fits come in closed form from per-fold sums (X'X, X'Y ...)
      of the projected features and one eigendecomposition per fold, so the search reads the
      data once. Given ``alpha``, it is used as is and nothing is cross-validated.

    Other simplifications: the centring, scaling and PCA are fitted on at most
    ``pca_sample`` training units (a seeded random subset, for bounded memory on 660k-bin
    slides), the PCA by randomized SVD when that subset is large; the PCA and the dropped
    dimensions come from all training slides, also those held out while choosing alpha (no
    targets are involved); the CV scores are those of unclipped predictions, while
    :meth:`predict` clips at 0 (log1p is never negative). The ridge solution itself is exact
    over all training units, with an unpenalised intercept. Fitting streams ``chunk`` units
    at a time; the spot and region parts of a bin's input are projected once per tile.
    """

    name = "ridge"
    filename = "model.npz"
    report_filename = "ridge_cv.json"

    def __init__(
        self,
        features: str,
        n_components: int = 256,
        alpha: float | None = None,
        *,
        alphas: tuple[float, ...] | list[float] = ALPHAS,
        context: bool = True,
        drop_tol: float = 1e-2,
        cv_blocks: int = 3,
        pca_sample: int = 10_000,
        seed: int = 0,
        chunk: int = 8192,
    ):
        if n_components < 1 or (alpha is not None and alpha < 0):
            raise ConfigError("ridge: n_components must be >= 1 and alpha >= 0")
        if not len(alphas) or min(alphas) < 0:
            raise ConfigError("ridge: alphas must be a non-empty list of values >= 0")
        if not 0 <= drop_tol < 1 or cv_blocks < 2 or pca_sample < 2 or chunk < 1:
            raise ConfigError(
                "ridge: need 0 <= drop_tol < 1, cv_blocks >= 2, pca_sample >= 2, chunk >= 1"
            )
        self.features = features
        self.n_components = n_components
        self.alpha = None if alpha is None else float(alpha)
        self.alphas = tuple(float(a) for a in alphas)
        self.context = bool(context)
        self.drop_tol = float(drop_tol)
        self.cv_blocks = int(cv_blocks)
        self.pca_sample = int(pca_sample)
        self.seed = seed
        self.chunk = int(chunk)
        self.params: dict[str, dict[str, np.ndarray]] = {}

    # -- inputs ---------------------------------------------------------------------------------
    def _features(self, ds: Dataset, slide: str, level: str) -> np.ndarray:
        from magnet_st.features.store import load_features

        return load_features(ds.path, self.features, slide, level, mmap=True)

    def sources(self, level: str) -> tuple[str, ...]:
        """The feature sets concatenated into ``level``'s input."""
        return SOURCES[level] if self.context else (level,)

    def _inputs(
        self, ds: Dataset, slide: str, level: str
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per source: its features (memory-mapped) and, for a context source, the row of
        each unit's tile (``None`` for the unit's own features)."""
        out = []
        for src in self.sources(level):
            f = self._features(ds, slide, src)
            out.append((f, None if src == level else tile_index(ds, slide, level, src)))
        return out

    # -- fitting --------------------------------------------------------------------------------
    def fit(
        self,
        ds: Dataset,
        slides: list[str],
        genes: list[str],
        val: list[str] | None = None,
        refit: bool = False,
    ) -> RidgeBaseline:
        """Fit one PCA + ridge per level on ``slides``, the penalty chosen on ``val`` (each
        alpha fitted on ``slides``, scored on ``val``; without ``val``, cross-validated on
        ``slides``); with ``refit``, fitted again on ``slides`` + ``val`` with the alpha
        chosen. Targets are log1p counts of ``genes``. No other slide is read.

        With ``val``, each coarse level's predictions also come from the source that scores
        the higher PCC-gene there (ties: its own model): the level's own ridge, or the sum
        of the bin predictions over each tile (as MagNet chooses; :meth:`predict`); a refit
        keeps the choice."""
        slides = list(dict.fromkeys(slides))
        val = [s for s in dict.fromkeys(val or []) if s not in slides]
        if not slides:
            raise ConfigError("ridge: no training slides")
        for lv in LEVELS:
            self.params[lv] = self._fit_level(ds, slides, genes, lv, held=val)
        coarse = self._choose_coarse(ds, val, genes) if val else {}
        for lv in LEVELS:
            p = self.params[lv]
            if refit and val:
                choice = {k: v for k, v in p.items() if k.startswith("cv_")}
                p = self._fit_level(ds, slides + val, genes, lv, alpha=float(p["alpha"]))
                p.update(choice)
                p["refit"] = np.array(True)
            if lv in coarse:
                p["coarse_from"] = np.array(coarse[lv])
            self.params[lv] = p
        return self

    def _choose_coarse(self, ds: Dataset, val: list[str], genes: list[str]) -> dict[str, str]:
        """Per coarse level, ``"head"`` (the level's own ridge) or ``"bins"`` (the summed bin
        predictions), by the mean PCC-gene over the validation slides."""
        from magnet_st.predict.modelfile import choose_coarse, coarse_scores

        coarse = [lv for lv in LEVELS if lv != "bin"]
        per_slide = []
        for slide in val:
            truth = {
                lv: np.log1p(ds.counts(slide, lv, genes).toarray().astype(np.float64))
                for lv in coarse
            }
            member = {lv: ds.membership(slide, lv) for lv in coarse}
            per_slide.append(coarse_scores(self.predict(ds, slide, raw=True), truth, member))
        return choose_coarse(per_slide)[0]

    # Long: three phases on one level's params `p`: standardise + PCA on a seeded sample, per-group
    # sums (X'X, X'Y) streamed over training and validation slides, alpha choice and solve; the CV
    # record at the end needs held, by_slide and stats from phase two.
    def _fit_level(
        self,
        ds: Dataset,
        slides: list[str],
        genes: list[str],
        lv: str,
        held: list[str] | None = None,
        alpha: float | None = None,
    ) -> dict:
        """One level's PCA + ridge on ``slides``; the penalty: ``alpha`` if given, else
        :attr:`alpha` if set, else chosen on the ``held`` slides, else cross-validated over
        ``slides``."""
        rng = np.random.default_rng([self.seed, LEVELS.index(lv)])
        inputs = {s: self._inputs(ds, s, lv) for s in slides}
        sizes = [ds.level(s, lv).n_obs for s in slides]
        n = sum(sizes)
        if n == 0:
            raise InputError(ds.path, f"ridge: no {lv} units in the training slides")
        # the sample for the centring, scaling and PCA: a seeded subset of the training units
        take = min(n, self.pca_sample)
        pick = np.sort(rng.choice(n, size=take, replace=False))
        offsets = np.cumsum([0, *sizes])
        rows = {
            s: pick[(pick >= o) & (pick < o + m)] - o
            for s, o, m in zip(slides, offsets[:-1], sizes, strict=True)
        }
        held = list(held or [])
        fixed = self.alpha if alpha is None else alpha
        n_src = len(self.sources(lv))
        blocks = []  # per source: mean and std of every dimension on the sample
        for b in range(n_src):
            blocks.append(
                _mean_std(np.concatenate([_gather(*inputs[s][b], rows[s]) for s in slides]))
            )
        std = np.concatenate([sd for _, sd in blocks])
        keep = (std > self.drop_tol * np.median(std)) & (std > 0)
        if not keep.any():
            raise InputError(ds.path, f"ridge: every {lv} feature dimension is constant")
        dims = [len(m) for m, _ in blocks]
        weight = self._block_weights(ds, lv, dims)
        p = {
            "keep": keep,
            "dims": np.array(dims, dtype=np.int64),
            "mean": np.concatenate([m for m, _ in blocks])[keep],
            "scale": std[keep] / weight[keep],
        }
        z = np.empty((take, int(keep.sum())), dtype=np.float32)
        for b in range(n_src):
            x = np.concatenate([_gather(*inputs[s][b], rows[s]) for s in slides])
            z[:, self._cols(p, b)] = self._standardise(p, b, x)
        del x
        z -= z.mean(0)  # already centred up to rounding
        p["components"] = _pca(z, self.n_components, self.seed)
        del z
        # sums of the projected features and log1p targets, per group of units
        by_slide = len(slides) >= 2 or bool(held) or fixed is not None
        stats: dict[object, _Sums] = {}
        held_stats: list[_Sums] = []
        for s in [*slides, *(held if fixed is None else [])]:
            if s in held:  # a validation slide: its sums score the penalties, fit nothing
                y_all = ds.counts(s, lv, genes).tocsr()
                part = None
                for a, x in self._project_slide(p, self._inputs(ds, s, lv), ds.level(s, lv).n_obs):
                    y = np.log1p(y_all[a : a + len(x)].toarray().astype(np.float64))
                    if part is None:
                        part = _Sums(x.shape[1], y.shape[1])
                    part.add(x, y)
                if part is not None:
                    held_stats.append(part)
                continue
            gid = None if by_slide else self._blocks(ds, s, lv)
            y_all = ds.counts(s, lv, genes).tocsr()
            for a, x in self._project_slide(p, inputs[s], ds.level(s, lv).n_obs):
                y = np.log1p(y_all[a : a + len(x)].toarray().astype(np.float64))
                if gid is None:
                    stats.setdefault(s, _Sums(x.shape[1], y.shape[1])).add(x, y)
                    continue
                g = gid[a : a + len(x)]
                for k in np.unique(g):
                    sel = g == k
                    stats.setdefault(int(k), _Sums(x.shape[1], y.shape[1])).add(x[sel], y[sel])
        total = _Sums.total(stats.values())
        if fixed is not None:
            alpha, cv = fixed, None
        else:
            alpha, cv = choose_alpha(list(stats.values()), self.alphas, held=held_stats or None)
            if cv is None:
                log.warning(
                    "ridge %s: fewer than two groups of training units to cross-validate "
                    "alpha; using %g",
                    lv,
                    FALLBACK_ALPHA,
                )
                alpha = FALLBACK_ALPHA
        w, b0 = total.solve(alpha)
        p["coef"] = np.vstack([w, b0[None]])
        p["alpha"] = np.array(alpha)
        p["n_train"] = np.array(total.n)
        if cv is not None:
            p["cv_alphas"] = np.array(self.alphas)
            p["cv_pcc_gene"] = cv["pcc_gene"]
            p["cv_mse"] = cv["mse"]
            p["cv_groups"] = np.array(
                f"validation slides {', '.join(held)}"
                if held_stats
                else "slides"
                if by_slide
                else f"{len(stats)} x-blocks of {slides[0]}"
            )
            log.info(
                "ridge %s: alpha %g chosen by cross-validation over %s (PCC-gene %s)",
                lv,
                alpha,
                p["cv_groups"],
                ", ".join(
                    f"{a:g}: {v:.4f}" for a, v in zip(self.alphas, cv["pcc_gene"], strict=True)
                ),
            )
        log.info(
            "ridge %s: %d of %d feature dimensions kept (near-constant dropped), %d components",
            lv,
            int(keep.sum()),
            len(keep),
            len(p["components"]),
        )
        return p

    def _block_weights(self, ds: Dataset, lv: str, dims: list[int]) -> np.ndarray:
        """A weight per input dimension that gives every block of the input the same total
        variance after standardising (the total kept): a block is one source's features,
        or one part of them where the feature set lists parts (dense features: each map
        and window, ``meta["encoder"]["dense"]["blocks"]``). Without it one PCA and one
        penalty over a 1,280-d and a 112-d block let the large block swamp the small one.
        Blocks of equal width get weight 1 (nothing changes)."""
        from magnet_st.features.store import feature_set_meta

        try:
            meta = feature_set_meta(ds.path, self.features)
        except InputError:  # features given another way (tests): one block per source
            meta = {}
        listed = (meta.get("encoder") or {}).get("dense")
        widths: list[int] = []
        for src, dim in zip(self.sources(lv), dims, strict=True):
            parts = [int(w) for _, w in ((listed or {}).get("blocks") or {}).get(src, [])]
            widths += parts if sum(parts) == dim else [dim]
        w = np.asarray(widths, dtype=np.float64)
        factor = np.sqrt(w.sum() / (len(w) * w))
        return np.repeat(factor, widths)

    def _blocks(self, ds: Dataset, slide: str, lv: str) -> np.ndarray:
        """Contiguous blocks along x of one slide's units, for cross-validation."""
        if self.context and lv != "region":
            key = ds.positions_px(slide, "region")[:, 0][tile_index(ds, slide, lv, "region")]
        else:
            key = ds.positions_px(slide, lv)[:, 0]
        return x_blocks(key, self.cv_blocks)

    @staticmethod
    def _cols(p: dict, b: int) -> slice:
        """The columns of source ``b``'s kept dimensions in the standardised input."""
        edges = np.concatenate([[0], np.cumsum(p["dims"])])
        kept = np.concatenate([[0], np.cumsum(p["keep"])])
        return slice(int(kept[edges[b]]), int(kept[edges[b + 1]]))

    def _standardise(self, p: dict, b: int, x: np.ndarray) -> np.ndarray:
        edges = np.concatenate([[0], np.cumsum(p["dims"])])
        keep = p["keep"][edges[b] : edges[b + 1]]
        cols = self._cols(p, b)
        x = np.asarray(x, dtype=np.float32)[:, keep]
        x -= p["mean"][cols].astype(np.float32)
        x /= p["scale"][cols].astype(np.float32)
        return x

    def _project(self, p: dict, b: int, x: np.ndarray) -> np.ndarray:
        comps = np.asarray(p["components"][:, self._cols(p, b)], dtype=np.float32)
        return (self._standardise(p, b, x) @ comps.T).astype(np.float64)

    def _project_slide(
        self, p: dict, inputs: list[tuple[np.ndarray, np.ndarray | None]], n: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Chunks ``(start, projected inputs)`` of a slide's units, in order. A context
        source is projected once per tile, then gathered."""
        tiles = []
        for b, (f, idx) in enumerate(inputs):
            if idx is None:
                continue
            proj = np.concatenate(
                [self._project(p, b, f[a : a + self.chunk]) for a in range(0, len(f), self.chunk)]
                or [np.zeros((0, len(p["components"])))]
            )
            tiles.append((proj, idx))
        own = [b for b, (_, idx) in enumerate(inputs) if idx is None][0]
        f = inputs[own][0]
        for a in range(0, n, self.chunk):
            x = self._project(p, own, f[a : a + self.chunk])
            for proj, idx in tiles:
                x += proj[idx[a : a + self.chunk]]
            yield a, x

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, ds: Dataset, slide: str, raw: bool = False) -> dict[str, np.ndarray]:
        """log1p predictions per level for every unit of ``slide``: each coarse level from
        its own ridge or from the summed bin predictions, as chosen on the validation slides
        (``raw``: every level from its own ridge)."""
        if not self.params:
            raise ConfigError("ridge: predict before fit")
        out = {}
        for lv, p in self.params.items():
            k = p["coef"].shape[1]
            parts = [
                x @ p["coef"][:-1] + p["coef"][-1]
                for _, x in self._project_slide(
                    p, self._inputs(ds, slide, lv), ds.level(slide, lv).n_obs
                )
            ]
            pred = np.concatenate(parts) if parts else np.zeros((0, k))
            out[lv] = np.maximum(pred, 0.0).astype(np.float32)  # log1p is never negative
        return out if raw else self.compose(ds, slide, out)

    def compose(self, ds: Dataset, slide: str, raw: dict[str, np.ndarray]) -> dict:
        """What the model predicts from every level's own ridge (``predict(raw=True)``):
        each coarse level from its ridge or from the summed bins, as chosen."""
        from magnet_st.predict.modelfile import aggregate_bins

        out = dict(raw)
        for lv, src in self.coarse_from.items():
            if src == "bins" and "bin" in out:
                out[lv] = aggregate_bins(out["bin"], ds.membership(slide, lv), len(out[lv]))
        return out

    @property
    def coarse_from(self) -> dict[str, str]:
        """Per coarse level, where its predictions come from (``"head"`` unless chosen)."""
        return {
            lv: str(p["coarse_from"]) if "coarse_from" in p else "head"
            for lv, p in self.params.items()
            if lv != "bin"
        }

    def report(self) -> dict:
        """Per level: the alpha used, how it was chosen, the CV scores, the dimensions kept."""
        out = {"features": self.features, "context": self.context, "levels": {}}
        for lv, p in self.params.items():
            r = {
                "sources": list(self.sources(lv)),
                "alpha": float(p["alpha"]) if "alpha" in p else self.alpha,
                "alpha_chosen_by": "given"
                if self.alpha is not None
                else "cv"
                if "cv_alphas" in p
                else "fallback: too few units to cross-validate",
                "n_train": int(p["n_train"]) if "n_train" in p else None,
                "refit_on_validation_slides": bool(p.get("refit", False)),
                "coarse_from": str(p["coarse_from"]) if "coarse_from" in p else None,
                "dims": int(len(p["keep"])) if "keep" in p else None,
                "dims_kept": int(p["keep"].sum()) if "keep" in p else None,
                "components": int(len(p["components"])),
            }
            if "cv_alphas" in p:
                r["cv"] = {
                    "groups": str(p["cv_groups"]),
                    "score": "mean PCC-gene on held-out units (MSE shown too)",
                    "alphas": [float(a) for a in p["cv_alphas"]],
                    "pcc_gene": [None if np.isnan(v) else float(v) for v in p["cv_pcc_gene"]],
                    "mse": [None if np.isnan(v) else float(v) for v in p["cv_mse"]],
                }
            out["levels"][lv] = r
        return out

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the fitted model as a plain ``.npz`` (no pickled objects): per level its
        preprocessing, components, coefficients, alpha and CV scores."""
        from magnet_st.util.atomic import atomic_path

        arrays = {f"{lv}/{k}": v for lv, p in self.params.items() for k, v in p.items()}
        meta = {
            "features": self.features,
            "n_components": self.n_components,
            "alpha": self.alpha,
            "alphas": list(self.alphas),
            "context": self.context,
            "drop_tol": self.drop_tol,
            "cv_blocks": self.cv_blocks,
            "pca_sample": self.pca_sample,
            "seed": self.seed,
            "chunk": self.chunk,
        }
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RidgeBaseline:
        with np.load(path, allow_pickle=False) as z:
            try:
                meta = json.loads(str(z["__meta__"]))
            except (KeyError, ValueError):
                raise InputError(path, "not a ridge model of this version") from None
            model = cls(meta.pop("features"), **meta)
            for key in z.files:
                if key == "__meta__":
                    continue
                lv, name = key.split("/")
                model.params.setdefault(lv, {})[name] = z[key]
        return model


# -- helpers --------------------------------------------------------------------------------------
def tile_index(ds: Dataset, slide: str, level: str, tile: str) -> np.ndarray:
    """For each unit of ``level``, the row of the ``tile`` level's tile it lies in
    (bin -> spot or region: ``Dataset.membership``; spot -> region: the spot level's
    ``obs["region"]``, the region holding the tile's centre, else that of most of its bins)."""
    if level == "bin":
        return np.asarray(ds.membership(slide, tile), dtype=np.int64)
    if (level, tile) != ("spot", "region"):
        raise ValueError(f"no {tile} tile for a {level} unit")
    obs = ds.level(slide, "spot").obs
    if "region" in obs:
        return obs["region"].to_numpy().astype(np.int64)
    spot = np.asarray(ds.membership(slide, "spot"), dtype=np.int64)
    region = np.asarray(ds.membership(slide, "region"), dtype=np.int64)
    n_region = int(region.max()) + 1 if len(region) else 1
    pairs, count = np.unique(spot * n_region + region, return_counts=True)
    s, r = np.divmod(pairs, n_region)
    order = np.lexsort((-count, s))  # per spot tile, its most frequent region first
    first = order[np.r_[True, s[order][1:] != s[order][:-1]]]
    out = np.full(len(obs), -1, dtype=np.int64)
    out[s[first]] = r[first]
    if (out < 0).any():
        raise InputError(ds.path, f"slide {slide}: spot tiles without bins")
    return out


def x_blocks(key: np.ndarray, k: int) -> np.ndarray:
    """Block ids 0..(at most k-1) of units cut into ``k`` contiguous, about equally large
    groups by ``key`` (their x); units with equal keys stay together."""
    n = len(key)
    order = np.argsort(key, kind="stable")
    sk = key[order]
    cuts = []
    for j in range(1, k):
        c = round(j * n / k)
        if 0 < c < n:
            cuts.append(int(np.searchsorted(sk, sk[c - 1], side="right")))
    cuts = sorted({c for c in cuts if 0 < c < n})
    ids = np.empty(n, dtype=np.int64)
    ids[order] = np.searchsorted(np.array(cuts, dtype=np.int64), np.arange(n), side="right")
    return ids


def _gather(f: np.ndarray, idx: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a slide's units of one source (own features or their tiles')."""
    return np.asarray(f[rows if idx is None else idx[rows]], dtype=np.float32)


def _mean_std(x: np.ndarray, step: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (float64, two passes over row chunks)."""
    n = len(x)
    mean = sum(x[a : a + step].sum(0, dtype=np.float64) for a in range(0, n, step)) / n
    ss = sum(((x[a : a + step].astype(np.float64) - mean) ** 2).sum(0) for a in range(0, n, step))
    return mean, np.sqrt(ss / n)


def _pca(z: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Top principal axes (rows) of centred ``z``: exact SVD when cheap, else randomized."""
    m, d = z.shape
    k = min(n_components, m, d)
    if m * d * min(m, d) <= _EXACT_SVD_COST or k >= 0.5 * min(m, d):
        _, _, vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)
    else:
        from sklearn.utils.extmath import randomized_svd

        _, _, vt = randomized_svd(z, k, n_oversamples=10, n_iter=4, random_state=seed)
    return vt[:k].astype(np.float32)


class _Sums:
    """Sufficient statistics of a linear regression over a group of units."""

    def __init__(self, k: int, g: int):
        self.n = 0
        self.sx, self.sy, self.syy = np.zeros(k), np.zeros(g), np.zeros(g)
        self.sxx, self.sxy = np.zeros((k, k)), np.zeros((k, g))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.syy += (y * y).sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y

    @classmethod
    def total(cls, parts) -> _Sums:
        parts = list(parts)
        out = cls(len(parts[0].sx), len(parts[0].sy))
        for p in parts:
            out.n += p.n
            for name in ("sx", "sy", "syy", "sxx", "sxy"):
                setattr(out, name, getattr(out, name) + getattr(p, name))
        return out

    def minus(self, other: _Sums) -> _Sums:
        out = _Sums(len(self.sx), len(self.sy))
        out.n = self.n - other.n
        for name in ("sx", "sy", "syy", "sxx", "sxy"):
            setattr(out, name, getattr(self, name) - getattr(other, name))
        return out

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Means of x and y, and the centred X'X, X'Y and per-gene sum of squares of y."""
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx - self.n * np.outer(mx, mx)
        cxy = self.sxy - self.n * np.outer(mx, my)
        cyy = self.syy - self.n * my**2
        return mx, my, cxx, cxy, cyy

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Weights and intercept of the ridge fit with penalty ``alpha`` per unit."""
        mx, my, cxx, cxy, _ = self.centred()
        w = np.linalg.solve(cxx + alpha * self.n * np.eye(len(mx)), cxy)
        return w, my - mx @ w


def choose_alpha(
    groups: list[_Sums], alphas: tuple[float, ...], held: list[_Sums] | None = None
) -> tuple[float, dict | None]:
    """The penalty (per unit) with the best mean held-out PCC-gene: fitted on all ``groups``
    and scored on each of ``held`` (validation slides), or without ``held`` leaving each
    group out in turn; ``(alpha, {"pcc_gene": ..., "mse": ...})`` or ``(nan, None)`` with
    too few usable units."""
    groups = [g for g in groups if g.n >= 2]
    if held is not None:
        held = [h for h in held if h.n >= 2]
        if not groups or not held:
            return float("nan"), None
        total = _Sums.total(groups)
        splits = [(total, h) for h in held]
    else:
        if len(groups) < 2:
            return float("nan"), None
        total = _Sums.total(groups)
        splits = [(total.minus(g), g) for g in groups]
    pcc = np.full((len(splits), len(alphas)), np.nan)
    mse = np.full((len(splits), len(alphas)), np.nan)
    for i, (fit, held) in enumerate(splits):
        mx, my, cxx, cxy, _ = fit.centred()
        lam, v = np.linalg.eigh(cxx)
        proj = v.T @ cxy
        hx, hy, hxx, hxy, hyy = held.centred()
        for j, a in enumerate(alphas):
            w = v @ (proj / np.maximum(lam + a * fit.n, 1e-12)[:, None])
            b = my - mx @ w
            var_p = np.einsum("kg,kg->g", hxx @ w, w)  # centred sums over the held-out units
            cov = np.einsum("kg,kg->g", hxy, w)
            bias = hx @ w + b - hy  # mean prediction minus mean truth, per gene
            mse[i, j] = np.mean((var_p - 2 * cov + hyy) / held.n + bias**2)
            ok = hyy > 1e-12 * held.n  # genes not constant in the held-out units
            if ok.any():  # a constant prediction has PCC 0
                r = cov[ok] / np.sqrt(np.maximum(var_p[ok], 1e-300) * hyy[ok])
                pcc[i, j] = np.mean(np.where(var_p[ok] > 1e-12 * held.n, r, 0.0))
    with np.errstate(all="ignore"):
        score_pcc = np.nanmean(pcc, axis=0) if np.isfinite(pcc).any() else pcc[0]
    score_mse = mse.mean(0)
    if np.isfinite(score_pcc).any():
        best = np.nanmax(score_pcc)
        j = max(i for i, s in enumerate(score_pcc) if np.isfinite(s) and s >= best - 1e-12)
    else:
        j = int(np.argmin(score_mse))
    return float(alphas[j]), {"pcc_gene": score_pcc, "mse": score_mse}
