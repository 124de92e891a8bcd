"""An interpolated n-gram next-action baseline (numpy), over the teacher's histories.

Witten-Bell interpolation, recursively from the longest context down to an add-k
unigram::

    P_n(a | h) = (c(h, a) + T(h) P_{n-1}(a | h')) / (c(h) + T(h))

where ``h'`` drops the oldest action of ``h``, ``c`` counts training (history, action)
pairs and ``T(h)`` is the number of distinct actions seen after ``h``; an unseen
context falls back to ``P_{n-1}``. Contexts come from ``kdstore.histories.histories``
(left-padded with -1, so "start of the video" is a context too), exactly the teacher's
histories cut to the last ``order - 1`` actions. No parameter is fitted.
"""

from __future__ import annotations

import numpy as np

from kdstore.histories import histories
from kdstore.tables import SegmentTable
from kdstore.errors import DataError


class NGram:
    """Interpolated Witten-Bell n-gram over action ids (orders 1..``order``)."""

    def __init__(self, num_actions: int, order: int = 3, add_k: float = 1.0):
        if order < 1:
            raise DataError(f"n-gram order must be >= 1, found {order}")
        self.A, self.order, self.add_k = num_actions, order, add_k
        self.unigram = np.zeros(num_actions)  # [A] counts
        self.tables: list[dict[tuple, tuple[np.ndarray, np.ndarray]]] = []  # per context length 1..order-1

    def fit(self, contexts: np.ndarray, targets: np.ndarray) -> "NGram":
        """Count ``targets [n]`` after ``contexts [n, >= order-1]`` (oldest first, -1 padded)."""
        contexts, targets = np.asarray(contexts, np.int64), np.asarray(targets, np.int64)
        if len(targets) == 0:
            raise DataError("n-gram: no training examples")
        if targets.min() < 0 or targets.max() >= self.A:
            raise DataError(f"n-gram: target outside 0..{self.A - 1}")
        self.unigram = np.bincount(targets, minlength=self.A).astype(np.float64)
        self.tables = []
        for n in range(1, self.order):
            counts: dict[tuple, dict[int, int]] = {}
            for ctx, a in zip(map(tuple, contexts[:, contexts.shape[1] - n :]), targets):
                d = counts.setdefault(ctx, {})
                d[int(a)] = d.get(int(a), 0) + 1
            self.tables.append({c: (np.fromiter(d, np.int64), np.fromiter(d.values(), np.float64)) for c, d in counts.items()})
        return self

    def predict(self, contexts: np.ndarray) -> np.ndarray:
        """[m, A] next-action probabilities after each of ``contexts [m, >= order-1]``."""
        contexts = np.asarray(contexts, np.int64)
        base = (self.unigram + self.add_k) / (self.unigram.sum() + self.add_k * self.A)  # [A]
        out = np.empty((len(contexts), self.A))
        for i, row in enumerate(contexts):
            p = base.copy()
            for n, table in enumerate(self.tables, start=1):
                hit = table.get(tuple(row[len(row) - n :]))
                if hit is None:
                    break  # a longer context containing an unseen one is unseen too
                idx, cnt = hit
                total, types = cnt.sum(), len(idx)
                p *= types / (total + types)
                p[idx] += cnt / (total + types)
            out[i] = p
        return out


def ngram_baseline(
    segments: SegmentTable, num_actions: int, train_split: str, rows: np.ndarray, order: int = 3, mode: str = "gappy",
    extra: list[np.ndarray] | None = None, split: str | None = None,
) -> np.ndarray:
    """[len(rows), A] probabilities of an n-gram fitted on the (history, action) pairs of
    ``train_split``'s labelled segments (plus those of the ``extra`` action-id sequences,
    e.g. a corpus's). In gappy mode the histories of ``rows`` come from ``split``."""
    train = segments.rows_in(train_split, labelled=True)
    if len(train) == 0:
        raise DataError(f"split {train_split!r}: no labelled segments to fit the n-gram on")
    width = max(order - 1, 1)
    contexts, targets = [action_histories(segments, train, width, mode, train_split)], [segments.action[train]]
    for seq in extra or []:
        padded = np.concatenate([np.full(width, -1, np.int64), np.asarray(seq, np.int64)])
        contexts.append(np.stack([padded[j : j + width] for j in range(len(seq))]).reshape(len(seq), width))
        targets.append(np.asarray(seq, np.int64))
    model = NGram(num_actions, order).fit(np.concatenate(contexts), np.concatenate(targets))
    return model.predict(action_histories(segments, np.asarray(rows), width, mode, split))


def ngram_out_of_fold(
    segments: SegmentTable, num_actions: int, train_split: str, rows: np.ndarray, folds: np.ndarray, order: int = 3,
    mode: str = "gappy",
) -> np.ndarray:
    """[len(rows), A] probabilities of ``train_split``'s labelled ``rows``, each row's from the n-gram
    fitted on the rows of the other folds (``folds [n]``, whole videos): like a K-fold teacher's
    training predictions, none comes from a model that counted the row's video."""
    width = max(order - 1, 1)
    contexts, targets = action_histories(segments, rows, width, mode, train_split), segments.action[rows]  # [n, width], [n]
    out = np.empty((len(rows), num_actions))  # [n, A]
    for k in np.unique(folds):
        held = folds == k
        out[held] = NGram(num_actions, order).fit(contexts[~held], targets[~held]).predict(contexts[held])
    return out


def action_histories(
    segments: SegmentTable, rows: np.ndarray, hist_len: int, mode: str = "gappy", split: str | None = None
) -> np.ndarray:
    """[len(rows), hist_len] action ids of each row's history (from ``split`` in gappy
    mode), oldest first, -1 padded."""
    h = histories(segments, rows, hist_len, mode, split)  # segment rows, -1 padded
    return np.where(h >= 0, segments.action[h.clip(0)], -1)
