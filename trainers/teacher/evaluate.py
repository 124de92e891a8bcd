"""``kdstore evaluate``: metrics of a stored prediction group, or of the n-gram baseline."""

from __future__ import annotations

import re

import numpy as np

from kdstore.errors import ConfigError, DataError
from kdstore.metrics import TASKS, compute_metrics, epic_subsets, metric_columns
from kdstore.predictions import present_scores
from kdstore.provenance import provenance_entry
from kdstore.store import Store

from .ngram import ngram_baseline


def evaluate_group(store: Store, name: str, split: str | None = None, marginals: str = "exact") -> dict:
    """Metrics of ``teacher/<name>`` on the labelled segments of ``split`` it predicts
    (default: the store's evaluation split), with the EK100 subsets the store holds.

    Adds ``coverage`` (% of the split's labelled segments with a prediction) and
    ``unlabelled`` (segments of the split without a label, left out); DataError if no
    labelled segment has a prediction. ``marginals``: the verb/noun marginalisation of
    groups without their own heads (``kdstore.metrics.marginalise``).
    """
    seg = store.segments
    split = split or store.default_splits()[1]
    rows, all_rows = seg.rows_in(split, labelled=True), seg.rows_in(split)
    if len(rows) == 0:
        raise DataError(f"{store.path}: no labelled segments in split {split!r} ({len(all_rows)} unlabelled)")
    scores, kept = present_scores(store.group(name), rows)  # [n, A] (+ heads), [n]
    if len(kept) == 0:
        raise DataError(f"predictions {name!r}: none of the {len(rows)} labelled segments of split {split!r} has a prediction")
    m = compute_metrics(scores["logits"], seg.action[kept], store.classes, verb_scores=scores["verb_logits"],
                        noun_scores=scores["noun_logits"], subsets=epic_subsets(seg, kept, split), marginals=marginals)
    return {**m, "coverage": float(100.0 * len(kept) / len(rows)), "unlabelled": int(len(all_rows) - len(rows))}


def evaluate_ngram(
    store: Store,
    train_split: str | None = None,
    split: str | None = None,
    order: int = 3,
    mode: str = "gappy",
    write: str | None = None,
    overwrite: bool = False,
    marginals: str = "exact",
) -> dict:
    """Metrics of the n-gram baseline fitted on ``train_split``'s labelled segments, on the
    labelled segments of ``split`` (defaults: the store's evaluation split, and the training
    split of the same fold: ``trainingN`` for ``validationN``).

    With ``write`` its log-probabilities for those segments are stored as a prediction
    group of kind "baseline", metrics included. ``marginals``: see ``kdstore.metrics.marginalise``;
    a group is written with the exact ones only (ConfigError with ``write``).
    """
    seg = store.segments
    split = split or store.default_splits()[1]
    train_split = train_split or _training_partner(store, split)
    rows, all_rows = seg.rows_in(split, labelled=True), seg.rows_in(split)
    if len(rows) == 0:
        raise DataError(f"{store.path}: no labelled segments in split {split!r} ({len(all_rows)} unlabelled)")
    if write and marginals != "exact":
        raise ConfigError(f"{store.path}: --marginals {marginals} is for comparing with published figures; write {write!r} without it")
    if write and write in store.groups() and not overwrite:
        raise DataError(f"{store.path}: predictions {write!r} already exist (pass overwrite to replace them)")
    probs = ngram_baseline(seg, store.classes.num_actions, train_split, rows, order, mode, split=split)  # [n, A]
    # the scores a written group stores (float64 log-probabilities: float32 would reorder
    # near-equal verb marginals), so that these metrics are those of `evaluate -p` and of an export
    logits = np.log(probs + 1e-12)  # [n, A]
    metrics = compute_metrics(logits, seg.action[rows], store.classes, kind="logits",
                              subsets=epic_subsets(seg, rows, split), marginals=marginals)
    metrics["unlabelled"] = int(len(all_rows) - len(rows))
    if write:
        config = {"model": f"interpolated {order}-gram (Witten-Bell, add-1 unigram)", "order": order,
                  "history": mode, "train_split": train_split}
        store.write_predictions(write, seg.uid[rows], logits, kind="baseline", config=config, scores_dtype="float64",
                                metrics={split: metrics}, overwrite=overwrite,
                                provenance=provenance_entry("ngram_baseline", group=f"teacher/{write}"))
    return metrics


def _training_partner(store: Store, split: str) -> str:
    """``trainingN`` for ``validationN`` when the store has it (EGTEA's three folds), else the
    store's default training split."""
    m = re.fullmatch(r"validation(\d*)", split)
    if m and f"training{m.group(1)}" in store.segments.splits:
        return f"training{m.group(1)}"
    return store.default_splits()[0]


def metrics_table(named: dict[str, dict], title: str | None = None, dataset: str | None = None):
    """A rich Table with one row of metrics per name (percentages, 2 decimals), in the
    columns the dataset reports (``kdstore.metrics.metric_columns``)."""
    from rich.table import Table

    cols = [(k, h) for k, h in metric_columns(dataset) if any(m.get(k) is not None for m in named.values())]
    cols += [(k, k) for k in ("n", "coverage", "unlabelled") if any(m.get(k) for m in named.values())]
    table = Table(title=title)
    table.add_column("model")
    for _, h in cols:
        table.add_column(h, justify="right")
    for name, m in named.items():
        table.add_row(name, *("-" if m.get(k) is None else str(m[k]) if isinstance(m[k], int) else f"{m[k]:.2f}" for k, _ in cols))
    return table


def metrics_grid(m: dict, title: str | None = None, dataset: str | None = None):
    """One model's EPIC metrics as a rich Table with a column per task (verb, noun,
    action) and a row per measure (EK55: top-1, top-5, mean top-5 recall, many-shot;
    EK100: overall, unseen, tail); None for datasets without per-task metrics."""
    from rich.table import Table

    cells: dict[str, dict[str, float]] = {}
    for key, header in metric_columns(dataset):
        task, _, what = header.partition(" ")
        if task in TASKS and m.get(key) is not None:
            cells.setdefault(what, {})[task] = m[key]
    if not cells:
        return None
    table = Table(title=title)
    table.add_column("%")
    for t in TASKS:
        table.add_column(t, justify="right")
    for what, row in cells.items():
        table.add_row(what, *("-" if row.get(t) is None else f"{row[t]:.2f}" for t in TASKS))
    return table
