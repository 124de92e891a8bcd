"""Action-anticipation metrics (numpy only), shared by teachers, baselines and students.

All values are percentages (0-100) except the counts ``n`` and ``unlabelled``:

- ``top1``, ``top5``: accuracy, the label among the k highest action scores;
- ``mean_top1_recall``, ``mean_top5_recall``: per-class top-k recall averaged over the
  classes present in the evaluated labels (EGTEA's class-mean accuracy; the EPIC
  challenges' "mean top-5 recall", RULSTM's ``topk_recall``);
- ``many_shot_top5_recall``: the same over the many-shot classes present (EK55; an action
  is many-shot when its verb or its noun is, as in RULSTM); None without many-shot lists;
- ``verb_top1`` ... ``noun_many_shot_top5_recall``: the same of verb and noun scores, a
  model's own verb/noun head or else the action probabilities summed over the action ->
  (verb, noun) map (RULSTM's ``marginalize``);
- ``unseen_<task>_mean_top5_recall``, ``tail_<task>_mean_top5_recall`` (task verb, noun,
  action): class-mean top-5 recall on the EK100 evaluation subsets (unseen participants;
  tail verbs for verbs, tail nouns for nouns, tail actions for actions), when given.

Unlabelled rows (label -1) are left out and counted in ``unlabelled``. Classes are ranked
by ``kdstore.ranking`` (exact ties towards the lower class index), the rule an EPIC JSON
export writes its scores in, so the official scorer computes these figures from the file.
Verb and noun marginals are the exact sums by default; ``marginals="rulstm"`` reproduces
RULSTM's ``get_marginal_indexes``/``marginalize`` (see :func:`marginalise`).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, DataError
from .ranking import label_ranks, topk_hits  # noqa: F401  (re-exported: the ranking rule lives in ranking.py)
from .tables import ClassTable, SegmentTable

TASKS = ("verb", "noun", "action")


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
        kind = "probs" if _all_probabilities(s) else "logits"
    if kind == "probs":
        return s
    if kind == "logits":
        return softmax(s)
    raise ValueError(f"kind must be 'auto', 'logits' or 'probs', found {kind!r}")


MARGINALS = ("exact", "rulstm")


def marginalise(probs: np.ndarray, index: np.ndarray, num: int, marginals: str = "exact") -> np.ndarray:
    """[N, num] sums of action probabilities ``probs [N, A]`` grouped by ``index [A]``.

    ``marginals="exact"``: a class no action maps to gets 0 (its probability under the
    model). ``"rulstm"``: as RULSTM's ``marginalize(probs, get_marginal_indexes(actions,
    mode))``: a class below the largest one an action maps to that no action uses gets the
    probability of action 0, and classes above that largest one are not scored at all
    (-inf here: they rank last and never enter a top-k).
    """
    if marginals not in MARGINALS:
        raise ValueError(f"marginals must be one of {MARGINALS}, found {marginals!r}")
    index = np.asarray(index)
    p = np.asarray(probs, np.float64)
    order = np.argsort(index, kind="stable")
    present, starts = np.unique(index[order], return_index=True)
    out = np.zeros((len(p), num))
    if len(p) and len(order):
        out[:, present] = np.add.reduceat(p[:, order], starts, axis=1)
    if marginals == "rulstm" and len(order):
        top = int(present.max())
        unused = np.setdiff1d(np.arange(top + 1), present)
        out[:, unused] = p[:, [0]]  # get_marginal_indexes: np.array([0]) for a class without actions
        out[:, top + 1 :] = -np.inf  # range(actions[mode].max() + 1): no column for them
    return out


def class_mean_recall(hits: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Mean over the classes present in ``labels`` (and in ``mask [C]``) of their hit rate, %."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return None
    num = int(labels.max()) + 1
    count = np.bincount(labels, minlength=num)
    hit = np.bincount(labels, weights=np.asarray(hits, np.float64), minlength=num)
    present = count > 0
    if mask is not None:
        present &= np.asarray(mask, bool)[:num]  # labels are class ids, so num <= len(mask)
    if not present.any():
        return None
    return float(100.0 * np.mean(hit[present] / count[present]))


def compute_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    classes: ClassTable,
    kind: str = "auto",
    verb_scores: np.ndarray | None = None,
    noun_scores: np.ndarray | None = None,
    subsets: dict[str, dict[str, np.ndarray]] | None = None,
    marginals: str = "exact",
) -> dict:
    """Accuracy and class-mean recall of action, verb and noun scores (see the module doc).

    ``scores [N, A]`` are action logits or probabilities (see ``as_probabilities``);
    ``labels [N]`` action ids, -1 for unlabelled rows (left out). ``verb_scores [N, V]``
    / ``noun_scores [N, N]``: a model's own heads, else marginalised. ``subsets`` maps a
    subset name (``unseen``, ``tail``) to a per-task [N] mask. ``marginals`` ("exact" or
    "rulstm") picks :func:`marginalise`'s rule for groups without their own heads. Raises DataError on no
    labelled row, a class-count mismatch, NaN or a label outside the class table.
    """
    labels = np.asarray(labels, dtype=np.int64)
    heads = {"verb": verb_scores, "noun": noun_scores}
    keep = _labelled_rows(scores, labels, classes, heads, marginals)
    if kind == "auto":
        kind = "probs" if _all_probabilities(scores) else "logits"
    y = {"action": labels[keep], "verb": classes.action_verb[labels[keep]], "noun": classes.action_noun[labels[keep]]}
    rank = _task_label_ranks(scores, keep, y, classes, heads, kind, marginals)
    out: dict = {"n": int(len(keep))}
    if len(keep) < len(labels):
        out["unlabelled"] = int(len(labels) - len(keep))
    for task in TASKS:
        out.update(_task_metrics(task, rank[task], y[task], classes, keep, subsets))
    return out


def _labelled_rows(scores, labels: np.ndarray, classes: ClassTable, heads: dict, marginals: str) -> np.ndarray:
    """The rows of the labelled samples, after checking ``compute_metrics``' inputs."""
    A = classes.num_actions
    if marginals not in MARGINALS:
        raise ConfigError(f"metrics: marginals must be one of {MARGINALS}, found {marginals!r}")
    if np.ndim(scores) != 2 or np.shape(scores)[1] != A:
        raise DataError(f"metrics: scores of shape {list(np.shape(scores))}, expected [N, {A}] (the class table has {A} actions)")
    if labels.shape != (len(scores),):
        raise DataError(f"metrics: {len(labels)} labels for {len(scores)} score rows")
    if len(labels) and (labels.max() >= A or labels.min() < -1):
        raise DataError(f"metrics: label outside 0..{A - 1} (found {labels.min()}..{labels.max()}; -1 marks unlabelled)")
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        raise DataError(f"metrics: no labelled samples to evaluate ({len(labels)} unlabelled left out)")
    nums = {"verb": classes.num_verbs, "noun": classes.num_nouns}
    for task, h in heads.items():
        if h is not None and np.shape(h) != (len(scores), nums[task]):
            raise DataError(f"metrics: {task} scores of shape {list(np.shape(h))}, expected [{len(scores)}, {nums[task]}]")
    for what, arr in (("", scores), *((f"{t} ", h) for t, h in heads.items() if h is not None)):
        bad = _first_nonfinite_row(arr)
        if bad is not None:
            raise DataError(f"metrics: row {bad} has NaN or inf {what}scores")
    return keep


def _task_label_ranks(scores, keep: np.ndarray, y: dict, classes: ClassTable, heads: dict, kind: str,
                      marginals: str) -> dict[str, np.ndarray]:
    """Task -> the rank [len(keep)] of each kept row's label among that task's scores."""
    nums = {"verb": classes.num_verbs, "noun": classes.num_nouns}
    rank = {t: np.empty(len(keep), np.int64) for t in TASKS}
    # in row blocks: a [N, A] float64 copy of EK100's 67k x 3806 scores alone would be 2 GB
    for lo in range(0, len(keep), BLOCK_ROWS):
        idx, sl = keep[lo : lo + BLOCK_ROWS], slice(lo, lo + BLOCK_ROWS)
        probs = as_probabilities(np.asarray(scores[idx], np.float64), kind)  # [b, A]
        rank["action"][sl] = label_ranks(probs, y["action"][sl])
        for task, index in (("verb", classes.action_verb), ("noun", classes.action_noun)):
            h = heads[task]
            s = np.asarray(h[idx], np.float64) if h is not None else marginalise(probs, index, nums[task], marginals)  # [b, V|N]
            rank[task][sl] = label_ranks(s, y[task][sl])
    return rank


def _task_metrics(task: str, r: np.ndarray, y: np.ndarray, classes: ClassTable, keep: np.ndarray,
                  subsets: dict[str, dict[str, np.ndarray]] | None) -> dict:
    """One task's accuracies and class-mean recalls from its label ranks ``r`` and labels ``y``."""
    many = {"action": classes.many_shot_actions, "verb": classes.many_shot_verbs, "noun": classes.many_shot_nouns}[task]
    p = "" if task == "action" else f"{task}_"
    out = {f"{p}top1": float(100.0 * (r < 1).mean()), f"{p}top5": float(100.0 * (r < 5).mean())}
    if task == "action":
        out["mean_top1_recall"] = class_mean_recall(r < 1, y)
    out[f"{p}mean_top5_recall"] = class_mean_recall(r < 5, y)
    out[f"{p}many_shot_top5_recall"] = None if many is None else class_mean_recall(r < 5, y, many)
    for name, masks in (subsets or {}).items():
        if task in masks:
            m = np.asarray(masks[task], bool)[keep]
            out[f"{name}_{task}_mean_top5_recall"] = class_mean_recall((r < 5)[m], y[m])
    return out

BLOCK_ROWS = 2048


def _first_nonfinite_row(arr: np.ndarray) -> int | None:
    for lo in range(0, len(arr), BLOCK_ROWS):
        ok = np.isfinite(np.asarray(arr[lo : lo + BLOCK_ROWS])).all(axis=1)
        if not ok.all():
            return lo + int(np.flatnonzero(~ok)[0])
    return None


def _all_probabilities(scores: np.ndarray) -> bool:
    """Whether every row is non-negative and sums to 1 (to 1e-4): ``as_probabilities``'s "auto"."""
    for lo in range(0, len(scores), BLOCK_ROWS):
        block = np.asarray(scores[lo : lo + BLOCK_ROWS], np.float64)
        if not ((block >= 0).all() and np.allclose(block.sum(axis=1), 1.0, atol=1e-4)):
            return False
    return True


def epic_subsets(segments: SegmentTable, rows: np.ndarray, split: str) -> dict[str, dict[str, np.ndarray]]:
    """The EK100 evaluation subsets of ``rows`` of ``split``, from the store's id lists:
    ``unseen`` (``<split>_unseen_participants``, every task) and ``tail``
    (``<split>_tail_verbs`` for verbs, ``_tail_nouns`` for nouns, ``_tail_actions`` for
    actions); subsets whose id list was not ingested are absent."""
    have = set(segments.subsets)
    out: dict[str, dict[str, np.ndarray]] = {}
    if f"{split}_unseen_participants" in have:
        m = segments.in_subset(f"{split}_unseen_participants")[rows]
        out["unseen"] = {t: m for t in TASKS}
    tail = {t: f"{split}_tail_{t}s" for t in TASKS}
    if any(s in have for s in tail.values()):
        out["tail"] = {t: segments.in_subset(s)[rows] for t, s in tail.items() if s in have}
    return out


#: Columns shown for a generic (EGTEA-style) store: action metrics.
GENERIC_COLUMNS = (
    ("top1", "top-1"), ("top5", "top-5"), ("mean_top1_recall", "class-mean top-1 recall"),
    ("mean_top5_recall", "class-mean top-5 recall"), ("many_shot_top5_recall", "many-shot top-5 recall"),
)
#: EK55 (RULSTM's validation table): top-1/top-5 accuracy, mean top-5 recall (all classes
#: and many-shot) of verbs, nouns and actions.
EK55_COLUMNS = tuple(
    (f"{'' if t == 'action' else t + '_'}{k}", f"{t} {h}") for t in TASKS
    for k, h in (("top1", "top-1"), ("top5", "top-5"), ("mean_top5_recall", "mean top-5 recall"),
                 ("many_shot_top5_recall", "many-shot mean top-5 recall"))
)
#: EK100 (the anticipation challenge): class-mean top-5 recall, overall / unseen / tail.
EK100_COLUMNS = tuple(
    (f"{s}{'' if t == 'action' and not s else t + '_'}mean_top5_recall", f"{t} {h}")
    for s, h in (("", "overall"), ("unseen_", "unseen"), ("tail_", "tail")) for t in TASKS
)
METRIC_COLUMNS = tuple(k for k, _ in GENERIC_COLUMNS) + (
    "verb_top1", "verb_top5", "noun_top1", "noun_top5", "n",
)


def metric_columns(dataset: str | None) -> tuple[tuple[str, str], ...]:
    """(metric key, header) of the metrics a dataset's results are reported with."""
    return {"ek55": EK55_COLUMNS, "ek100": EK100_COLUMNS}.get(dataset or "", GENERIC_COLUMNS)
