"""Ensembles: the weighted average of several prediction groups, written as a new group.

The members' **probabilities** are averaged, ``p = sum_m w_m softmax(z_m)``, and the group
stores ``log p`` as its logits (``softmax(log p) = p``), so its top-K, log-sum-exps, metrics
and KD targets follow from the mixture. Probabilities rather than logits because the members
are models of different kinds and scales (a text teacher, students, an n-gram baseline's
log-probabilities): a mixture weighs each member's belief as a probability, while an average
of logits (a normalised geometric mean) lets the member with the largest logit scale decide
and gives a class that any member rules out near-zero mass. A mixture is also the usual
ensemble of classifiers, and its KD target at temperature T is ``p ** (1/T)`` renormalised.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ConfigError, DataError
from .predictions import Predictions, TeacherTargets
from .provenance import provenance_entry
from .store import Store

AVERAGE = "probabilities"
# log p below this is stored as it: e**-60000 is 0 in every float format
LOG_FLOOR = -60000.0


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ensemble_logits(logits: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``log(sum_m w_m softmax(z_m))`` [B, A] float64 from the members' logits [B, A] and weights summing to 1."""
    stacked = np.stack([np.log(w) + _log_softmax(np.asarray(z, np.float64)) for z, w in zip(logits, weights)])  # [M, B, A]
    m = stacked.max(axis=0)  # [B, A], finite: every member's log-softmax is finite
    return m + np.log(np.exp(stacked - m).sum(axis=0))


def write_ensemble(store: Store, members: Sequence[str], name: str, weights: Sequence[float] | None = None,
                   overwrite: bool = False, chunk: int = 1024) -> Predictions:
    """Write the weighted probability average of prediction groups ``members`` as ``teacher/<name>``.

    ``weights`` (default equal) are normalised to sum to 1. The members must predict the same
    segments (same UIDs) over the store's classes; the group is of their common kind (``teacher``
    when they differ), with the largest member top-K and every member's log-sum-exp
    temperatures, and no features (the members' [CLS] spaces are not comparable).

    Raises:
        ConfigError: fewer than two members, a repeated member, or bad weights.
        DataError: members that predict different segments.
        StoreFormatError / MissingError: a member made for other segments, or absent.
    """
    members = list(members)
    if len(members) < 2:
        raise ConfigError(f"ensemble {name!r}: needs at least two prediction groups, got {members}")
    if len(set(members)) != len(members):
        raise ConfigError(f"ensemble {name!r}: a group is given twice in {members}")
    w = np.ones(len(members)) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != (len(members),) or not np.isfinite(w).all() or (w <= 0).any():
        raise ConfigError(f"ensemble {name!r}: expected {len(members)} positive finite weights (one per group), got "
                          f"{list(weights) if weights is not None else None}")
    w = w / w.sum()
    groups = [store.group(m) for m in members]  # refuses groups made for other segments
    readers = [TeacherTargets(g, ("logits",), exact=True) for g in groups]  # refuses another class count
    uids = groups[0].uids
    for g in groups[1:]:
        if not np.array_equal(np.sort(g.uids), np.sort(uids)):
            only = np.setxor1d(g.uids, uids)[0]
            has = groups[0].name if only in uids else g.name
            raise DataError(f"ensemble {name!r}: {groups[0].name!r} predicts {len(uids)} UIDs and {g.name!r} {len(g.uids)}, "
                            f"not the same segments (UID {only} is only in {has!r})")
    rows = store.segments.row_of(uids)  # [P]
    out = np.empty((len(rows), store.classes.num_actions), np.float32)  # [P, A]
    for lo in range(0, len(rows), chunk):
        gathered = [r.gather(rows[lo : lo + chunk])["logits"] for r in readers]  # M x [b, A]
        out[lo : lo + chunk] = np.maximum(ensemble_logits(gathered, w), LOG_FLOOR)
    kinds = {g.kind for g in groups}
    config = {"ensemble": {"members": members, "weights": w.tolist(), "average": AVERAGE}}
    return store.write_predictions(
        name, uids, out, kind=kinds.pop() if len(kinds) == 1 else "teacher", config=config,
        topk=max(g.topk for g in groups), lse_temperatures=sorted({t for g in groups for t in g.lse_temperatures}),
        overwrite=overwrite, provenance=provenance_entry("ensemble", group=f"teacher/{name}", members=members),
    )
