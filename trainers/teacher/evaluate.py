"""``kdstore evaluate``: metrics of a stored prediction group, or of the n-gram baseline."""

from __future__ import annotations

import numpy as np

from kdstore.errors import DataError
from kdstore.metrics import compute_metrics
from kdstore.store import Store, provenance_entry
from kdstore.targets import present_logits

from .ngram import ngram_baseline


def evaluate_group(store: Store, name: str, split: str) -> dict:
    """Metrics of ``teacher/<name>`` on the segments of ``split`` it predicts.

    Adds ``coverage`` (% of the split's segments with a prediction); DataError if none.
    """
    seg = store.segments
    rows = seg.rows_in(split)
    if len(rows) == 0:
        raise DataError(f"{store.path}: no segments in split {split!r}")
    logits, kept = present_logits(store.teacher(name), rows)  # [n, A], [n]
    if len(kept) == 0:
        raise DataError(f"predictions {name!r}: none of the {len(rows)} segments of split {split!r} has a prediction")
    return {**compute_metrics(logits, seg.action[kept], store.classes), "coverage": float(100.0 * len(kept) / len(rows))}


def evaluate_ngram(
    store: Store,
    train_split: str,
    split: str,
    order: int = 3,
    mode: str = "gappy",
    write: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Metrics of the n-gram baseline fitted on ``train_split``, on ``split``.

    With ``write`` its log-probabilities for ``split`` are stored as a prediction group
    of kind "baseline", metrics included.
    """
    seg = store.segments
    rows = seg.rows_in(split)
    if len(rows) == 0:
        raise DataError(f"{store.path}: no segments in split {split!r}")
    if write and write in store.predictions() and not overwrite:
        raise DataError(f"{store.path}: predictions {write!r} already exist (pass overwrite to replace them)")
    probs = ngram_baseline(seg, store.classes.num_actions, train_split, rows, order, mode)  # [n, A]
    metrics = compute_metrics(probs, seg.action[rows], store.classes, kind="probs")
    if write:
        config = {"model": f"interpolated {order}-gram (Witten-Bell, add-1 unigram)", "order": order,
                  "history": mode, "train_split": train_split}
        store.write_predictions(write, seg.uid[rows], np.log(probs + 1e-12), kind="baseline", config=config,
                                metrics={split: metrics}, overwrite=overwrite,
                                provenance=provenance_entry("ngram_baseline", group=f"teacher/{write}"))
    return metrics


def metrics_table(named: dict[str, dict], title: str | None = None):
    """A rich Table with one row of metrics per name (percentages, 2 decimals)."""
    from rich.table import Table

    from kdstore.metrics import METRIC_COLUMNS

    cols = [c for c in METRIC_COLUMNS if any(m.get(c) is not None for m in named.values())]
    table = Table(title=title)
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in named.items():
        table.add_row(name, *("-" if m.get(c) is None else str(m[c]) if c == "n" else f"{m[c]:.2f}" for c in cols))
    return table
