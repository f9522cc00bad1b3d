"""Ridge regression on PCA-reduced frozen features (the HEST-Benchmark protocol)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from magnet_st.dataset import Dataset
from magnet_st.errors import ConfigError, InputError

log = logging.getLogger(__name__)

LEVELS = ("bin", "spot", "region")


class RidgeBaseline:
    """Ridge regression on frozen image features, after PCA to 256 components.

    The HEST-Benchmark protocol (Jaume et al., NeurIPS 2024 Datasets and Benchmarks: "HEST-1k"):
    a frozen encoder embeds each patch, the embeddings are reduced by PCA to 256
    components, and a linear ridge model maps them to log1p expression. Here one model per
    level (bins from their bin-patch features, spot and region tiles from theirs), each
    fitted on the fold's training and validation slides.

    Simplifications: features are standardised before the PCA; the PCA is fitted on at most
    ``pca_sample`` training units (a random subset, for bounded memory on 660k-bin slides);
    the ridge solution is exact, from streamed sums (X'X + alpha I)^-1 X'Y over all training
    units, with an intercept. ``alpha`` is fixed (default 1.0, in units of the standardised
    components' sums of squares), not tuned per fold.
    """

    name = "ridge"

    def __init__(
        self,
        features: str,
        n_components: int = 256,
        alpha: float = 1.0,
        pca_sample: int = 100_000,
        seed: int = 0,
        chunk: int = 50_000,
    ):
        if n_components < 1 or alpha < 0:
            raise ConfigError("ridge: n_components must be >= 1 and alpha >= 0")
        self.features = features
        self.n_components = n_components
        self.alpha = alpha
        self.pca_sample = pca_sample
        self.seed = seed
        self.chunk = chunk
        self.params: dict[str, dict[str, np.ndarray]] = {}

    def _features(self, ds: Dataset, slide: str, level: str) -> np.ndarray:
        from magnet_st.features import load_features

        return load_features(ds.path, self.features, slide, level, mmap=True)

    def _project(self, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - p["mean"]) / p["scale"]
        return z @ p["components"].T

    filename = "model.npz"

    def fit(
        self, ds: Dataset, slides: list[str], genes: list[str], val: list[str] | None = None
    ) -> RidgeBaseline:
        """Fit one PCA + ridge per level on ``slides`` and ``val`` (nothing to tune on a
        held-out slide: alpha is fixed); targets are log1p counts of ``genes``."""
        slides = list(slides) + list(val or [])
        rng = np.random.default_rng(self.seed)
        for lv in LEVELS:
            feats = [self._features(ds, s, lv) for s in slides]
            n = sum(len(f) for f in feats)
            if n == 0:
                raise InputError(ds.path, f"ridge: no {lv} units in the training slides")
            dim = feats[0].shape[1]
            # standardisation from streamed sums, PCA on a bounded random subset
            s1, s2 = np.zeros(dim), np.zeros(dim)
            for f in feats:
                for a in range(0, len(f), self.chunk):
                    x = np.asarray(f[a : a + self.chunk], dtype=np.float64)
                    s1 += x.sum(0)
                    s2 += (x * x).sum(0)
            mean = s1 / n
            scale = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
            scale[scale == 0] = 1.0
            take = min(n, self.pca_sample)
            pick = np.sort(rng.choice(n, size=take, replace=False))
            offsets = np.cumsum([0] + [len(f) for f in feats])
            sample = np.concatenate(
                [
                    np.asarray(f[pick[(pick >= o) & (pick < o + len(f))] - o], dtype=np.float64)
                    for f, o in zip(feats, offsets[:-1], strict=True)
                ]
            )
            k = min(self.n_components, take, dim)
            z = (sample - mean) / scale
            _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
            p = {"mean": mean, "scale": scale, "components": vt[:k]}
            # ridge with intercept from streamed sums of the projected features
            xtx, xty = np.zeros((k + 1, k + 1)), np.zeros((k + 1, len(genes)))
            for s, f in zip(slides, feats, strict=True):
                y_all = ds.counts(s, lv, genes).tocsr()
                for a in range(0, len(f), self.chunk):
                    x = self._project(p, f[a : a + self.chunk])
                    x = np.hstack([x, np.ones((len(x), 1))])
                    y = np.log1p(y_all[a : a + self.chunk].toarray().astype(np.float64))
                    xtx += x.T @ x
                    xty += x.T @ y
            reg = self.alpha * np.eye(k + 1)
            reg[-1, -1] = 0.0  # the intercept is not penalised
            p["coef"] = np.linalg.solve(xtx + reg, xty)
            self.params[lv] = p
        return self

    def predict(self, ds: Dataset, slide: str) -> dict[str, np.ndarray]:
        """log1p predictions per level for every unit of ``slide``."""
        if not self.params:
            raise ConfigError("ridge: predict before fit")
        out = {}
        for lv, p in self.params.items():
            f = self._features(ds, slide, lv)
            parts = []
            for a in range(0, len(f), self.chunk):
                x = self._project(p, f[a : a + self.chunk])
                parts.append(x @ p["coef"][:-1] + p["coef"][-1])
            pred = np.concatenate(parts) if parts else np.zeros((0, p["coef"].shape[1]))
            out[lv] = np.maximum(pred, 0.0).astype(np.float32)  # log1p is never negative
        return out

    def save(self, path: str | Path) -> None:
        """Write the fitted model as a plain ``.npz`` (no pickled objects)."""
        from magnet_st.atomic import atomic_path

        arrays = {f"{lv}/{k}": v for lv, p in self.params.items() for k, v in p.items()}
        meta = np.array(
            [self.features, str(self.n_components), str(self.alpha), str(self.seed)], dtype=str
        )
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, __meta__=meta, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> RidgeBaseline:
        with np.load(path, allow_pickle=False) as z:
            features, n_components, alpha, seed = (str(v) for v in z["__meta__"])
            model = cls(features, int(n_components), float(alpha), seed=int(seed))
            for key in z.files:
                if key == "__meta__":
                    continue
                lv, name = key.split("/")
                model.params.setdefault(lv, {})[name] = z[key]
        return model
