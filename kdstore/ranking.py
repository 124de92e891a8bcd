"""The one ranking rule of scores, shared by ``evaluate``, ``report``, ``export`` and the store.

Classes are ranked by decreasing score; **exact ties go to the lower class index** (a
constant score vector ranks 0, 1, 2, ...). Scores are compared exactly as given, so the
rule only decides between bit-identical values.

The official EPIC-KITCHENS scorer (``evaluate_anticipation_json_ek100.py``) and RULSTM's
``topk_accuracy`` rank with ``np.argsort(scores)[::-1]``, whose order between equal scores
depends on numpy's sort (unstable introsort, SIMD sorts on some CPUs). A file we export
therefore has no equal scores among the classes it lists: :func:`strictly_decreasing` moves
each tied score up by the fewest float64 steps (ulps) that put it above the next one in
:func:`rank_order`, so any sort of the file's numbers gives this module's ranking, and the
scorer's top-k of the file is ours.
"""

from __future__ import annotations

import numpy as np


def label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] 0-based rank of ``labels [N]`` in the rows of ``scores [N, C]``: the number of
    classes scoring higher, plus those scoring the same with a lower index."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    own = scores[np.arange(len(scores)), labels][:, None]  # [N, 1]
    rank = (scores > own).sum(axis=1)  # [N]
    tied = np.flatnonzero((scores == own).sum(axis=1) > 1)  # rows where another class scores the same
    for i in tied:
        rank[i] += int((scores[i, : labels[i]] == own[i, 0]).sum())
    return rank


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[N] bool: whether each label is among its row's ``k`` best classes."""
    return label_ranks(scores, labels) < k


def rank_order(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """[N, k] int64: the ``k`` best classes of each row of ``scores [N, C]``, best first
    (all ``C`` without ``k``); ``rank_order(s)[i, label_ranks(s, y)[i]] == y[i]``."""
    x = np.asarray(scores)
    n, c = x.shape
    k = c if k is None else min(int(k), c)
    if k < c:
        idx = np.argpartition(-x, k - 1, axis=1)[:, :k]  # [N, k] the k best, up to ties at the k-th
        kth = np.take_along_axis(x, idx, axis=1).min(axis=1)  # [N]
        tied = np.flatnonzero((x >= kth[:, None]).sum(axis=1) > k)  # argpartition's pick among equals is arbitrary
        if len(tied):
            idx[tied] = np.argsort(-x[tied], axis=1, kind="stable")[:, :k]
    else:
        idx = np.broadcast_to(np.arange(c), (n, c))
    vals = np.take_along_axis(x, idx, axis=1)  # [N, k]
    order = np.lexsort((idx, -vals), axis=1)  # by decreasing score, then increasing class index
    return np.take_along_axis(idx, order, axis=1).astype(np.int64, copy=False)


def strictly_decreasing(values: np.ndarray) -> np.ndarray:
    """float64 ``values [N, k]``, each row non-increasing (scores in :func:`rank_order`),
    made strictly decreasing: a value equal to (or below) the one after it is raised to the
    next float64 above that one. Changes only tied values, by a few ulps."""
    v = np.array(values, dtype=np.float64)  # [N, k]
    for j in range(v.shape[1] - 2, -1, -1):
        v[:, j] = np.maximum(v[:, j], np.nextafter(v[:, j + 1], np.inf))
    return v


def ranked_scores(scores: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(classes [N, k], scores [N, k] float64): each row's ``k`` best classes in
    :func:`rank_order` and their scores made :func:`strictly_decreasing`, as an export
    writes them so that every reader's sort ranks them in this module's order."""
    x = np.asarray(scores, dtype=np.float64)
    idx = rank_order(x, k)
    return idx, strictly_decreasing(np.take_along_axis(x, idx, axis=1))
