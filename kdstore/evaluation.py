"""Metrics of a prediction group on a split: the one computation behind ``kdstore evaluate``,
``report``, the demo's table and the ``metrics`` a teacher build, a student prediction or a
written n-gram baseline stores with its group (``group_metrics``, from the scores as they are
stored, so a group's stored metrics are those ``evaluate`` prints).

Scores are read as stored (``kdstore.predictions.present_scores``), with the group's own verb/noun
heads where it has them and the EK100 subsets the store holds (``kdstore.metrics.epic_subsets``).
"""

from __future__ import annotations

import numpy as np

from .errors import DataError
from .metrics import TASKS, compute_metrics, epic_subsets, metric_columns
from .store import Store
from .predictions import present_scores


def labelled_rows(store: Store, split: str) -> tuple[np.ndarray, int]:
    """(labelled segment rows of ``split``, count of its unlabelled segments); DataError when
    none is labelled."""
    seg = store.segments
    rows, all_rows = seg.rows_in(split, labelled=True), seg.rows_in(split)
    if len(rows) == 0:
        raise DataError(f"{store.path}: no labelled segments in split {split!r} ({len(all_rows)} unlabelled)")
    return rows, int(len(all_rows) - len(rows))


def split_metrics(store: Store, scores: dict, kept: np.ndarray, rows: np.ndarray, split: str,
                  marginals: str = "exact") -> dict | None:
    """Metrics of ``scores`` (``logits`` [n, A], ``verb_logits``/``noun_logits`` or None) of the
    segment rows ``kept`` [n], those of the labelled ``rows`` of ``split`` predicted, with
    ``coverage`` (% of ``rows`` predicted); None when ``kept`` is empty."""
    if len(kept) == 0:
        return None
    seg = store.segments
    m = compute_metrics(scores["logits"], seg.action[kept], store.classes, verb_scores=scores.get("verb_logits"),
                        noun_scores=scores.get("noun_logits"), subsets=epic_subsets(seg, kept, split), marginals=marginals)
    return {**m, "coverage": float(100.0 * len(kept) / len(rows))}


def _group_metrics(store: Store, name: str, rows: np.ndarray, split: str, marginals: str = "exact") -> dict | None:
    """:func:`split_metrics` of group ``name``'s stored scores of those ``rows`` it predicts."""
    scores, kept = present_scores(store.group(name), rows)  # [n, A] (+ heads), [n]
    return split_metrics(store, scores, kept, rows, split, marginals)


def evaluate_group(store: Store, name: str, split: str | None = None, marginals: str = "exact") -> dict:
    """Metrics of ``teacher/<name>`` on the labelled segments of ``split`` it predicts
    (default: the store's evaluation split), with the EK100 subsets the store holds.

    Adds ``coverage`` (% of the split's labelled segments with a prediction) and
    ``unlabelled`` (segments of the split without a label, left out); DataError if no
    labelled segment has a prediction. ``marginals``: the verb/noun marginalisation of
    groups without their own heads (``kdstore.metrics.marginalise``).
    """
    split = split or store.default_splits()[1]
    rows, unlabelled = labelled_rows(store, split)
    m = _group_metrics(store, name, rows, split, marginals)
    if m is None:
        raise DataError(f"predictions {name!r}: none of the {len(rows)} labelled segments of split {split!r} has a prediction")
    return {**m, "unlabelled": unlabelled}


def group_metrics(store: Store, uids: np.ndarray, scores: dict, splits: dict[str, str]) -> dict:
    """The ``metrics`` to store with a group about to be written: ``uids`` [n] and ``scores``
    (``logits`` [n, A], optional ``verb_logits``/``noun_logits``) at the precision the group
    stores them, evaluated on each split of ``splits`` (key -> split) as :func:`evaluate_group`
    will evaluate the written group. A split without labelled segments gets ``{"unlabelled": n}``."""
    seg, metrics = store.segments, {}
    at = np.full(len(seg), -1, np.int64)  # segment row -> position in uids (-1: not predicted)
    at[seg.row_of(np.asarray(uids).tolist())] = np.arange(len(uids))
    for key, split in splits.items():
        rows = seg.rows_in(split, labelled=True)
        if len(rows) == 0:
            metrics[key] = {"unlabelled": int(len(seg.rows_in(split)))}
            continue
        kept = rows[at[rows] >= 0]
        picked = {k: None if v is None else v[at[kept]] for k, v in scores.items()}
        m = split_metrics(store, picked, kept, rows, split) or {"coverage": 0.0}
        metrics[key] = {**m, "unlabelled": int(len(seg.rows_in(split)) - len(rows))}
    return metrics


def metrics_table(store: Store, split: str | None = None, names: list[str] | None = None) -> list[dict]:
    """One row of metrics (``name``, ``kind``, :func:`evaluate_group`'s figures) per prediction
    group that predicts some labelled segment of ``split`` (default: the store's evaluation split)."""
    split = split or store.default_splits()[1]
    rows = store.segments.rows_in(split, labelled=True)
    table = []
    for name in names or store.groups():
        m = _group_metrics(store, name, rows, split) if len(rows) else None
        if m is not None:
            table.append({"name": name, "kind": store.group(name).kind, **m})
    return table


def table_columns(table: list[dict], dataset: str | None = None) -> list[tuple[str, str]]:
    """(key, header) of the dataset's metric columns that some row of ``table`` has."""
    return [(k, h) for k, h in metric_columns(dataset) if any(r.get(k) is not None for r in table)]


def format_table(table: list[dict], dataset: str | None = None) -> str:
    """The metrics table as fixed-width text (percentages)."""
    cols = table_columns(table, dataset)
    width = max([len(r["name"]) for r in table] + [10])
    head = f"{'model':<{width}}  {'kind':<8}" + "".join(f"  {h:>{max(len(h), 7)}}" for _, h in cols)
    lines = [head, "-" * len(head)]
    for r in table:
        cells = "".join(
            f"  {r[k]:>{max(len(h), 7)}.2f}" if r.get(k) is not None else f"  {'-':>{max(len(h), 7)}}" for k, h in cols
        )
        lines.append(f"{r['name']:<{width}}  {r['kind']:<8}{cells}")
    return "\n".join(lines)


def rich_table(named: dict[str, dict], title: str | None = None, dataset: str | None = None):
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
