"""The collapse guard: is a teacher's fit on its own training rows clearly above the class prior?

A teacher that never left the class prior ranks every row alike; used as a KD target it
teaches the student nothing but the label frequencies. The check compares the teacher's
top-1 on the training split's rows (its out-of-fold or in-sample predictions, what a student
distils, before any prior correction) with two yardsticks on the same rows:

- the class prior's top-1: the share of the training split's most frequent action;
- the bigram's top-1: an interpolated 2-gram fitted on the same rows, in-sample for in-sample
  predictions and out-of-fold (the same folds of videos) for out-of-fold ones.

The teacher is flagged when it recovers less than half of the bigram's lift over the prior,
``top1 < prior + 0.5 * max(0, bigram - prior)``: the bigram says how much of the next action
the last one alone gives away, so the bar scales with what the dataset lets any model learn.
"""

from __future__ import annotations

import numpy as np

from kdstore.tables import SegmentTable

from .ngram import NGram, action_histories

LIFT_SHARE = 0.5  # of the bigram's lift over the prior a teacher must recover


def prior_top1(train_labels: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 % on ``labels`` of always predicting ``train_labels``' most frequent class."""
    top = np.bincount(train_labels).argmax()
    return float(100.0 * np.mean(labels == top))


def ngram_top1(segments: SegmentTable, num_actions: int, train_rows: np.ndarray, train_split: str, rows: np.ndarray,
               split: str, order: int = 2, block: int = 2048) -> float:
    """Top-1 % on ``rows`` (histories from ``split``) of the interpolated n-gram fitted on
    ``train_rows`` (histories from ``train_split``), predicted ``block`` rows at a time (bounded
    memory on EK100's 3,806 classes)."""
    return 100.0 * _ngram_hits(segments, num_actions, train_rows, train_split, rows, split, order, block) / max(1, len(rows))


def _ngram_hits(segments, num_actions, train_rows, train_split, rows, split, order=2, block=2048) -> int:
    width = max(order - 1, 1)
    model = NGram(num_actions, order).fit(action_histories(segments, train_rows, width, "gappy", train_split),
                                          segments.action[train_rows])
    ctx = action_histories(segments, rows, width, "gappy", split)  # [n, width]
    hits = 0
    for lo in range(0, len(rows), block):
        pred = model.predict(ctx[lo : lo + block]).argmax(1)  # [b]
        hits += int((pred == segments.action[rows[lo : lo + block]]).sum())
    return hits


def fit_check(scores: np.ndarray, segments: SegmentTable, num_actions: int, train_split: str, rows: np.ndarray,
              folds: np.ndarray | None = None) -> dict:
    """The guard's record for a teacher's ``scores [n, A]`` on ``train_split``'s labelled ``rows``:
    its top-1, the yardsticks, the bar and ``collapsed``. With ``folds [n]`` (the scores are
    out-of-fold) the bigram is out-of-fold too: fitted without fold k, scored on fold k."""
    labels = segments.action[rows]
    top1 = float(100.0 * np.mean(scores.argmax(1) == labels))
    prior = prior_top1(labels, labels)
    if folds is None:
        bigram = ngram_top1(segments, num_actions, rows, train_split, rows, train_split)
    else:
        hits = sum(_ngram_hits(segments, num_actions, rows[folds != k], train_split, rows[folds == k], train_split)
                   for k in np.unique(folds))
        bigram = 100.0 * hits / len(rows)
    bar = prior + LIFT_SHARE * max(0.0, bigram - prior)
    return {"split": train_split, "predictions": "in-sample" if folds is None else "out-of-fold", "top1": round(top1, 2),
            "prior_top1": round(prior, 2), "bigram_top1": round(bigram, 2), "bar": round(bar, 2),
            "collapsed": bool(top1 < bar)}


def fit_warning(record: dict | None, name: str) -> str | None:
    """A one-line warning for a collapsed teacher's record (None if it is healthy or unchecked)."""
    if not record or not record.get("collapsed"):
        return None
    return (f"teacher/{name} barely fits its own training rows: top-1 {record['top1']:.2f}% on {record['split']}"
            f" ({record['predictions']}) against the class prior's {record['prior_top1']:.2f}% and the bigram's"
            f" {record['bigram_top1']:.2f}% (bar {record['bar']:.2f}%); as a KD target it teaches little beyond"
            " the label frequencies")


def group_fit_warning(store, name: str) -> str | None:
    """``fit_warning`` of prediction group ``name``'s recorded ``fit_check`` (None for a healthy
    teacher, a group without the record: students, baselines, older builds, or no such group,
    which the caller's own read reports)."""
    if name not in store.groups():
        return None
    return fit_warning((store.group(name).config or {}).get("fit_check"), name)
