"""A teacher's calibration on its out-of-fold training predictions, and the temperature that fixes it.

The expected calibration error (ECE) of Guo et al., "On Calibration of Modern Neural Networks"
(ICML 2017): the top-1 confidences fall into ``bins`` equal-width bins (lo, hi], and the ECE is
the mean over bins of |accuracy - mean confidence|, weighted by the share of rows in each.
Temperature scaling (the same paper) divides the logits by one T > 0 fitted by minimising the
negative log-likelihood; it changes no prediction's ranking, only its confidence.

The fit reads only a teacher's out-of-fold training rows (``fit_rows``): rows of the split it
was trained on, each predicted by a fold model that never saw it, less any row of an
evaluation split. ``calibrate`` stores the result as the group's ``calibration`` attribute,
which KD reads (``StudentConfig.teacher_calibration``, kdstore.predictions) to distil towards
calibrated targets. numpy only: the store imports no torch.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError, MissingError
from .predictions import Predictions, present_logits
from .provenance import provenance_entry
from .store import Store

BINS = 15  # Guo et al.'s
BLOCK_ROWS = 4096  # rows per temporary of the sums: [BLOCK_ROWS, classes] float64
T_RANGE = (1e-3, 1e3)  # the search range of the fitted temperature


def _blocks(logits: np.ndarray, labels: np.ndarray, temperature: float):
    """(logits / T as float64 minus each row's max, labels) in row blocks."""
    for lo in range(0, len(logits), BLOCK_ROWS):
        z = np.asarray(logits[lo: lo + BLOCK_ROWS], dtype=np.float64) / temperature  # [b, A]
        yield z - z.max(1, keepdims=True), np.asarray(labels[lo: lo + BLOCK_ROWS])


def confidences(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 softmax confidence [n], whether the top-1 is the label [n]) of ``logits / temperature``."""
    conf, hit = [], []
    for z, y in _blocks(logits, labels, temperature):
        conf.append(1.0 / np.exp(z).sum(1))  # the max of z is 0: its probability is 1 / sum
        hit.append(z.argmax(1) == y)
    return (np.concatenate(conf), np.concatenate(hit)) if conf else (np.zeros(0), np.zeros(0, bool))


def reliability(logits: np.ndarray, labels: np.ndarray, bins: int = BINS, temperature: float = 1.0) -> dict:
    """Per-bin mean confidence, accuracy and count over (lo, hi] bins, their ``edges``, and the ``ece``."""
    if bins < 1:
        raise DataError(f"calibration: bins must be >= 1, got {bins}")
    conf, hit = confidences(logits, labels, temperature)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # (lo, hi] bins
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, conf, bins) / np.maximum(count, 1)
    acc = np.bincount(which, hit.astype(float), bins) / np.maximum(count, 1)
    ece = float((count / max(len(conf), 1) * np.abs(acc - mean_conf)).sum())
    return {"edges": np.linspace(0, 1, bins + 1), "confidence": mean_conf, "accuracy": acc, "count": count, "ece": ece}


def _nll_derivatives(logits: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float, float]:
    """Mean NLL of softmax(beta * logits) and its first two derivatives in beta (convex in beta)."""
    f = d1 = d2 = 0.0
    for z, y in _blocks(logits, labels, 1.0 / beta):  # z = beta * logits - its row max
        x = z / beta  # [b, A] logits - their row max
        p = np.exp(z)
        s = p.sum(1)
        p /= s[:, None]
        mean_x = (p * x).sum(1)  # [b] E_p[x]
        x_y = x[np.arange(len(y)), y]
        f += float((np.log(s) - z[np.arange(len(y)), y]).sum())
        d1 += float((mean_x - x_y).sum())
        d2 += float(((p * x * x).sum(1) - mean_x**2).sum())
    n = max(len(labels), 1)
    return f / n, d1 / n, d2 / n


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    return _nll_derivatives(logits, labels, 1.0 / temperature)[0]


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tol: float = 1e-8, max_iter: int = 100) -> float:
    """The T in T_RANGE minimising the mean NLL of softmax(logits / T): safeguarded Newton
    steps on beta = 1 / T, where the NLL is convex, bisecting its bracket when a step leaves it."""
    if len(labels) == 0:
        raise DataError("calibration: no rows to fit a temperature on")
    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]
    beta = 1.0
    for _ in range(max_iter):
        _, d1, d2 = _nll_derivatives(logits, labels, beta)
        if d1 > 0:
            hi = beta
        else:
            lo = beta
        step = beta - d1 / d2 if d2 > 0 else np.nan
        new = step if lo < step < hi else np.sqrt(lo * hi)
        if abs(new - beta) <= tol * beta:
            beta = new
            break
        beta = new
    return float(1.0 / beta)


def fit_rows(store: Store, group: Predictions) -> tuple[np.ndarray, str]:
    """(segment rows, split) the temperature of ``group`` is fitted on: the labelled rows of the
    split it was trained on that it predicts, less every row of an evaluation split (the
    store's, and those the group was evaluated on).

    Raises:
        MissingError: a group whose config names no training split (not built by build-teacher).
        DataError: a group whose training predictions are in-sample (folds 1), not out-of-fold.
    """
    cfg = group.config
    split = cfg.get("train_split")
    if not split:
        raise MissingError(f"teacher/{group.name}: its config names no train_split, so its out-of-fold "
                           "training predictions are unknown (groups written by build-teacher record it)")
    if int(cfg.get("folds", 2)) < 2:
        raise DataError(f"teacher/{group.name}: built with folds={cfg.get('folds')}, so its {split!r} predictions"
                        " are in-sample, not out-of-fold; rebuild it with folds >= 2 to calibrate it")
    seg = store.segments
    held_out = {store.default_splits()[1], *cfg.get("eval_splits", [])} - {split}
    evaluation = np.zeros(len(seg.uid), bool)
    for s in held_out:
        if s in seg.splits:
            evaluation[seg.rows_in(s)] = True
    rows = seg.rows_in(split, labelled=True)
    rows = rows[~evaluation[rows] & group.present[rows]]
    return rows, split


def oof_logits(store: Store, group: Predictions) -> tuple[np.ndarray, np.ndarray, str]:
    """(logits [n, A] at their stored precision, labels [n], split) of the rows ``fit_rows`` picks."""
    rows, split = fit_rows(store, group)
    parts = [present_logits(group, rows[lo: lo + BLOCK_ROWS])[0] for lo in range(0, len(rows), BLOCK_ROWS)]
    A = group.attrs["num_classes"]
    logits = np.concatenate(parts) if parts else np.zeros((0, A), np.float32)
    return logits, store.segments.action[rows], split


def calibrate(store: Store, name: str, bins: int = BINS) -> dict:
    """Fit ``teacher/<name>``'s temperature on its out-of-fold training rows, store it as the
    group's ``calibration`` attribute (with the ECE and NLL before and after) and return that."""
    group = store.group(name)
    logits, labels, split = oof_logits(store, group)
    if len(labels) == 0:
        raise DataError(f"teacher/{name}: no labelled out-of-fold row of split {split!r} to fit a temperature on")
    T = fit_temperature(logits, labels)
    result = {"temperature": T, "split": split, "rows": int(len(labels)), "bins": int(bins),
              "ece_before": reliability(logits, labels, bins)["ece"], "ece_after": reliability(logits, labels, bins, T)["ece"],
              "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, T)}
    with store.backend.writing():
        attrs = store.backend.attrs(group.key)
        store.backend.set_attrs(group.key, {**attrs, "calibration": result})
        store.add_provenance(provenance_entry("calibrate", group=group.key, temperature=T, split=split))
    return result
