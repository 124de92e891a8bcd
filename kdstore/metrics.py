"""Action-anticipation metrics (numpy only), shared by teachers, baselines and students.

All values are percentages (0-100) except ``n``:

- ``top1``, ``top5``: accuracy, the label among the k highest scores;
- ``mean_top1_recall``, ``mean_top5_recall``: per-class top-k recall averaged over the
  classes present in the evaluated labels (EGTEA's class-mean accuracy);
- ``many_shot_top5_recall``: the same restricted to the many-shot actions present (EK55:
  verb and noun both many-shot); ``None`` where the class table has no many-shot lists;
- ``verb_top1`` ... ``noun_top5``: accuracies of verb and noun scores obtained by summing
  the action probabilities over the action -> (verb, noun) map.

Ties between scores are broken towards the lower class index (a stable sort), so a
constant score vector predicts class 0, 1, 2, ...
"""

from __future__ import annotations

import numpy as np

from .annotations import ClassTable
from .errors import DataError


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    x = np.asarray(scores, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def as_probabilities(scores: np.ndarray, kind: str = "auto") -> np.ndarray:
    """[N, A] probabilities from logits or probabilities.

    ``kind="auto"`` takes rows that are non-negative and sum to 1 (to 1e-4) as
    probabilities and anything else as logits.
    """
    s = np.asarray(scores, dtype=np.float64)
    if kind == "auto":
        kind = "probs" if (s >= 0).all() and np.allclose(s.sum(axis=1), 1.0, atol=1e-4) else "logits"
    if kind == "probs":
        return s
    if kind == "logits":
        return softmax(s)
    raise ValueError(f"kind must be 'auto', 'logits' or 'probs', found {kind!r}")


def marginalise(probs: np.ndarray, index: np.ndarray, num: int) -> np.ndarray:
    """[N, num] sums of action probabilities ``probs [N, A]`` grouped by ``index [A]``."""
    onehot = np.zeros((probs.shape[1], num))  # [A, num]
    onehot[np.arange(probs.shape[1]), index] = 1.0
    return probs @ onehot  # [N, num]


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[N] bool: whether each label is among its row's ``k`` highest scores."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
    return (top == labels[:, None]).any(axis=1)


def class_mean_recall(hits: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Mean over the classes present in ``labels`` (and in ``mask [A]``) of their hit rate, %."""
    present = np.unique(labels)
    if mask is not None:
        present = present[mask[present]]
    if len(present) == 0:
        return None
    recalls = [hits[labels == c].mean() for c in present]
    return float(100.0 * np.mean(recalls))


def compute_metrics(scores: np.ndarray, labels: np.ndarray, classes: ClassTable, kind: str = "auto") -> dict:
    """Accuracy, class-mean recall and verb/noun accuracies of action ``scores [N, A]``.

    ``scores`` are logits or probabilities (see ``as_probabilities``); ``labels [N]`` are
    action ids. Raises DataError on empty input, a class-count mismatch, NaN or a label
    outside the class table.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    A = classes.num_actions
    if scores.ndim != 2 or scores.shape[1] != A:
        raise DataError(f"metrics: scores of shape {list(scores.shape)}, expected [N, {A}] (the class table has {A} actions)")
    if labels.shape != (len(scores),):
        raise DataError(f"metrics: {len(labels)} labels for {len(scores)} score rows")
    if len(scores) == 0:
        raise DataError("metrics: no samples to evaluate")
    if not np.isfinite(scores).all():
        raise DataError(f"metrics: row {int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])} has NaN or inf scores")
    if labels.min() < 0 or labels.max() >= A:
        raise DataError(f"metrics: label outside 0..{A - 1} (found {labels.min()}..{labels.max()})")
    probs = as_probabilities(scores, kind)  # [N, A]
    hits = {k: topk_hits(probs, labels, k) for k in (1, 5)}
    out = {
        "n": int(len(labels)),
        "top1": float(100.0 * hits[1].mean()),
        "top5": float(100.0 * hits[5].mean()),
        "mean_top1_recall": class_mean_recall(hits[1], labels),
        "mean_top5_recall": class_mean_recall(hits[5], labels),
        "many_shot_top5_recall": None,
    }
    many = classes.many_shot_actions
    if many is not None:
        out["many_shot_top5_recall"] = class_mean_recall(hits[5], labels, many)
    for part, index, num in (("verb", classes.action_verb, classes.num_verbs), ("noun", classes.action_noun, classes.num_nouns)):
        p = marginalise(probs, index, num)  # [N, num]
        y = index[labels]
        for k in (1, 5):
            out[f"{part}_top{k}"] = float(100.0 * topk_hits(p, y, k).mean())
    return out


METRIC_COLUMNS = (
    "top1", "top5", "mean_top1_recall", "mean_top5_recall", "many_shot_top5_recall",
    "verb_top1", "verb_top5", "noun_top1", "noun_top5", "n",
)
