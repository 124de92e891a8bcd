"""Folds of a training split by whole videos: what a K-fold teacher and the out-of-fold n-gram
hold out, so that no prediction of a row comes from a model that saw the row's video."""

from __future__ import annotations

import numpy as np

from kdstore.errors import ConfigError


def assign_folds(videos: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[n] fold of each row: whole videos go to the fold with the fewest rows so far,
    largest videos first (ties in a seeded random order)."""
    uniq, counts = np.unique(videos, return_counts=True)
    if len(uniq) < k:
        raise ConfigError(f"{k} folds need at least {k} videos in the training split, found {len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes, fold_of = np.zeros(k, np.int64), {}
    for i in order:
        f = int(np.argmin(sizes))
        fold_of[uniq[i]] = f
        sizes[f] += counts[i]
    return np.array([fold_of[v] for v in videos], dtype=np.int64)
