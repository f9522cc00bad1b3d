"""How well a detector finds known objects: points matched one to one within a radius."""

from __future__ import annotations

import numpy as np

__all__ = ["match_points", "detection_scores"]


def match_points(pred: np.ndarray, truth: np.ndarray, radius: float) -> np.ndarray:
    """For each predicted point, the index of the true point it matches, or -1: pairs closer
    than ``radius`` are matched one to one, nearest pairs first (greedy)."""
    from scipy.spatial import cKDTree

    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(pred), -1, dtype=np.int64)
    if not len(pred) or not len(truth):
        return out
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), radius, output_type="ndarray")
    taken = np.zeros(len(truth), bool)
    for k in np.argsort(pairs["v"], kind="stable"):
        i, j = int(pairs["i"][k]), int(pairs["j"][k])
        if out[i] < 0 and not taken[j]:
            out[i], taken[j] = j, True
    return out


def detection_scores(matches: np.ndarray, n_true: int) -> dict[str, float]:
    """Precision, recall and F1 from :func:`match_points`'s ``matches`` (one per
    prediction) and the number of true points."""
    matches = np.asarray(matches)
    hit, n_pred = int((matches >= 0).sum()), len(matches)
    precision = hit / n_pred if n_pred else 0.0
    recall = hit / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "matched": hit,
            "detected": n_pred, "true": n_true}  # fmt: skip
