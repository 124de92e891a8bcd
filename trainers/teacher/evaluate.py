"""``kdstore evaluate --baseline ngram``: metrics of the n-gram baseline (a stored group's are
``kdstore.evaluation``'s)."""

from __future__ import annotations

import re

import numpy as np

from kdstore.errors import ConfigError, DataError
from kdstore.evaluation import labelled_rows, split_metrics
from kdstore.provenance import provenance_entry
from kdstore.store import Store

from .folds import assign_folds
from .ngram import ngram_baseline, ngram_out_of_fold


def evaluate_ngram(
    store: Store,
    train_split: str | None = None,
    split: str | None = None,
    order: int = 3,
    mode: str = "gappy",
    write: str | None = None,
    overwrite: bool = False,
    marginals: str = "exact",
    folds: int = 0,
    seed: int = 0,
) -> dict:
    """Metrics of the n-gram baseline fitted on ``train_split``'s labelled segments, on the
    labelled segments of ``split`` (defaults: the store's evaluation split, and the training
    split of the same fold: ``trainingN`` for ``validationN``).

    With ``write`` its log-probabilities for those segments are stored as a prediction
    group of kind "baseline", metrics included. ``marginals``: see ``kdstore.metrics.marginalise``;
    a group is written with the exact ones only (ConfigError with ``write``). With ``folds`` >= 2
    the group also holds ``train_split``'s labelled rows, predicted out-of-fold (the folds of
    videos a teacher built with ``folds`` and ``seed`` holds out), so that its training rows can
    be read as a K-fold teacher's (``kdstore ensemble --fit``, calibration).
    """
    seg = store.segments
    split = split or store.default_splits()[1]
    train_split = train_split or _training_partner(store, split)
    rows, unlabelled = labelled_rows(store, split)
    if write and marginals != "exact":
        raise ConfigError(f"{store.path}: --marginals {marginals} is for comparing with published figures; write {write!r} without it")
    if folds and (folds < 2 or not write):
        raise ConfigError(f"{store.path}: --folds {folds}: out-of-fold training predictions need --folds >= 2 and --write NAME")
    if write and write in store.groups() and not overwrite:
        raise DataError(f"{store.path}: predictions {write!r} already exist (pass overwrite to replace them)")
    probs = ngram_baseline(seg, store.classes.num_actions, train_split, rows, order, mode, split=split)  # [n, A]
    # the scores a written group stores (float64 log-probabilities: float32 would reorder
    # near-equal verb marginals), so that these metrics are those of `evaluate -p` and of an export
    logits = _log_probs(probs)  # [n, A]
    metrics = {**split_metrics(store, {"logits": logits}, rows, rows, split, marginals), "unlabelled": unlabelled}
    if write:
        config = {"model": f"interpolated {order}-gram (Witten-Bell, add-1 unigram)", "order": order,
                  "history": mode, "train_split": train_split}
        stored = {split: metrics}
        if folds:
            train_rows, train_logits = _out_of_fold(store, train_split, rows, order, mode, folds, seed)
            stored[f"{train_split} (out-of-fold)"] = split_metrics(store, {"logits": train_logits}, train_rows, train_rows,
                                                                   train_split, marginals)
            rows, logits = np.concatenate([train_rows, rows]), np.concatenate([train_logits, logits])
            config |= {"folds": folds, "seed": seed, "eval_splits": [split]}
        store.write_predictions(write, seg.uid[rows], logits, kind="baseline", config=config, scores_dtype="float64",
                                metrics=stored, overwrite=overwrite,
                                provenance=provenance_entry("ngram_baseline", group=f"teacher/{write}"))
    return metrics


def _out_of_fold(store: Store, train_split: str, eval_rows: np.ndarray, order: int, mode: str, folds: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, log-probabilities [n, A]) of ``train_split``'s labelled rows outside ``eval_rows``, out-of-fold."""
    seg = store.segments
    rows = seg.rows_in(train_split, labelled=True)
    rows = rows[~np.isin(rows, eval_rows)]  # [n]
    probs = ngram_out_of_fold(seg, store.classes.num_actions, train_split, rows, assign_folds(seg.video[rows], folds, seed),
                              order, mode)  # [n, A]
    return rows, _log_probs(probs)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """``log(probs + 1e-12)``, in place: [n, A] float64 is 2 GB on EK100's training split."""
    probs += 1e-12
    return np.log(probs, out=probs)


def _training_partner(store: Store, split: str) -> str:
    """``trainingN`` for ``validationN`` when the store has it (EGTEA's three folds), else the
    store's default training split."""
    m = re.fullmatch(r"validation(\d*)", split)
    if m and f"training{m.group(1)}" in store.segments.splits:
        return f"training{m.group(1)}"
    return store.default_splits()[0]
