"""Ensembles: the weighted average of several prediction groups, written as a new group.

The members' **probabilities** are averaged, ``p = sum_m w_m softmax(z_m)``, and the group
stores ``log p`` as its logits (``softmax(log p) = p``), so its top-K, log-sum-exps, metrics
and KD targets follow from the mixture. Probabilities rather than logits because the members
are models of different kinds and scales (a text teacher, students, an n-gram baseline's
log-probabilities): a mixture weighs each member's belief as a probability, while an average
of logits (a normalised geometric mean) lets the member with the largest logit scale decide
and gives a class that any member rules out near-zero mass. A mixture is also the usual
ensemble of classifiers, and its KD target at temperature T is ``p ** (1/T)`` renormalised.

``fit=True`` chooses the weights by maximum likelihood on the members' out-of-fold training
rows (``kdstore.calibration.fit_rows``: rows of the split the members were trained on, each
predicted by a model that never saw its video, less every evaluation row): the mean
log-likelihood of the mixture is concave in the weights, and EM (each weight becomes the mean
responsibility of its member) climbs to its maximum. A K-fold teacher and an n-gram written
with ``evaluate --baseline ngram --folds K`` are such members; a group whose training
predictions are in-sample is refused, since its fit would favour the member that memorised them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .calibration import fit_rows
from .errors import ConfigError, DataError
from .predictions import Predictions, TeacherTargets
from .provenance import provenance_entry
from .store import Store

AVERAGE = "probabilities"
# log p below this is stored as it: e**-60000 is 0 in every float format
LOG_FLOOR = -60000.0
EM_TOL = 1e-9  # largest weight change at which EM stops
EM_STEPS = 20000


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _log_mixture(log_p: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``log w_m + log_p[m]`` [M, ...], ``log sum_m w_m p[m]`` [...]) from the members' log-probabilities
    ``log_p [M, ...]`` and weights [M] summing to 1 (a weight may be 0: a fitted member that adds nothing)."""
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * (log_p.ndim - 1)))
    with np.errstate(divide="ignore"):
        joint = np.log(w) + log_p  # [M, ...]
    top = joint.max(axis=0)  # finite: every member with w > 0 gives a finite log-probability
    return joint, top + np.log(np.exp(joint - top).sum(axis=0))


def ensemble_logits(logits: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``log(sum_m w_m softmax(z_m))`` [B, A] float64 from the members' logits [B, A] and weights summing to 1."""
    return _log_mixture(np.stack([_log_softmax(np.asarray(z, np.float64)) for z in logits]), weights)[1]  # [B, A]


def em_weights(log_p: np.ndarray) -> np.ndarray:
    """[M] mixture weights maximising ``mean_i log sum_m w_m p[m, i]`` over the simplex, from
    ``log_p [M, n]``: each member's log-probability of each row's label. EM from equal weights."""
    w = np.full(len(log_p), 1.0 / len(log_p))
    for _ in range(EM_STEPS):
        joint, mix = _log_mixture(log_p, w)  # [M, n], [n]
        new = np.exp(joint - mix).mean(axis=1)  # [M] mean responsibility
        done = np.abs(new - w).max() < EM_TOL
        w = new
        if done:
            break
    return w


def mixture_nll(log_p: np.ndarray, w: np.ndarray) -> float:
    """Mean negative log-likelihood of the mixture ``w`` of ``log_p [M, n]``."""
    return float(-np.mean(_log_mixture(log_p, w)[1]))


def label_log_probs(store: Store, groups: Sequence[Predictions], rows: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """[M, n] each group's log-probability of the action label of segment ``rows``."""
    labels = store.segments.action[rows]
    out = np.empty((len(groups), len(rows)))
    for m, g in enumerate(groups):
        reader = TeacherTargets(g, ("logits",), exact=True)
        for lo in range(0, len(rows), chunk):
            ls = _log_softmax(np.asarray(reader.gather(rows[lo : lo + chunk])["logits"], np.float64))  # [b, A]
            out[m, lo : lo + chunk] = ls[np.arange(len(ls)), labels[lo : lo + chunk]]
    return out


def fit_weights(store: Store, groups: Sequence[Predictions], name: str) -> dict:
    """The maximum-likelihood weights of the mixture of ``groups`` on their common out-of-fold
    training rows, with the split, the row count and the NLL of each member and of the mixture."""
    rows, splits = None, set()
    for g in groups:
        if int(g.config.get("folds") or 0) < 2 or not g.config.get("train_split"):
            raise ConfigError(f"ensemble {name!r}: teacher/{g.name} holds no out-of-fold training predictions (folds "
                              f"{g.config.get('folds')}); weights fitted on in-sample rows favour the member that memorised them")
        r, split = fit_rows(store, g)
        rows, splits = (r if rows is None else np.intersect1d(rows, r)), splits | {split}
    if len(splits) > 1:
        raise ConfigError(f"ensemble {name!r}: the members were trained on different splits {sorted(splits)}")
    if len(rows) == 0:
        raise DataError(f"ensemble {name!r}: no labelled training row that every member predicts out-of-fold")
    log_p = label_log_probs(store, groups, rows)  # [M, n]
    w = em_weights(log_p)
    return {"split": splits.pop(), "rows": int(len(rows)), "weights": w.tolist(), "nll": mixture_nll(log_p, w),
            "member_nll": [float(-v) for v in log_p.mean(axis=1)]}


def write_ensemble(store: Store, members: Sequence[str], name: str, weights: Sequence[float] | None = None,
                   overwrite: bool = False, chunk: int = 1024, fit: bool = False) -> Predictions:
    """Write the weighted probability average of prediction groups ``members`` as ``teacher/<name>``.

    ``weights`` (default equal) are normalised to sum to 1; ``fit`` fits them instead
    (``fit_weights``), and the config records the fit. The members must predict the same
    segments (same UIDs) over the store's classes; the group is of their common kind (``teacher``
    when they differ), with the largest member top-K and every member's log-sum-exp
    temperatures, and no features (the members' [CLS] spaces are not comparable).

    Raises:
        ConfigError: fewer than two members, a repeated member, bad weights, weights with
            ``fit``, or (with ``fit``) a member without out-of-fold training predictions.
        DataError: members that predict different segments.
        StoreFormatError / MissingError: a member made for other segments, or absent.
    """
    members = list(members)
    if fit and weights is not None:
        raise ConfigError(f"ensemble {name!r}: give weights or fit them, not both")
    if len(members) < 2:
        raise ConfigError(f"ensemble {name!r}: needs at least two prediction groups, got {members}")
    if len(set(members)) != len(members):
        raise ConfigError(f"ensemble {name!r}: a group is given twice in {members}")
    w = None if fit else _given_weights(weights, len(members), name)
    groups = _same_segments([store.group(m) for m in members], name)  # refuses groups made for other segments
    readers = [TeacherTargets(g, ("logits",), exact=True) for g in groups]  # refuses another class count
    record = fit_weights(store, groups, name) if fit else None
    if record:
        w = np.asarray(record["weights"])
    uids = groups[0].uids
    rows = store.segments.row_of(uids)  # [P]
    out = np.empty((len(rows), store.classes.num_actions), np.float32)  # [P, A]
    for lo in range(0, len(rows), chunk):
        gathered = [r.gather(rows[lo : lo + chunk])["logits"] for r in readers]  # M x [b, A]
        out[lo : lo + chunk] = np.maximum(ensemble_logits(gathered, w), LOG_FLOOR)
    kinds = {g.kind for g in groups}
    config = {"ensemble": {"members": members, "weights": w.tolist(), "average": AVERAGE,
                           **({"fit": {k: v for k, v in record.items() if k != "weights"}} if record else {})}}
    return store.write_predictions(
        name, uids, out, kind=kinds.pop() if len(kinds) == 1 else "teacher", config=config,
        topk=max(g.topk for g in groups), lse_temperatures=sorted({t for g in groups for t in g.lse_temperatures}),
        overwrite=overwrite, provenance=provenance_entry("ensemble", group=f"teacher/{name}", members=members),
    )


def _given_weights(weights: Sequence[float] | None, n: int, name: str) -> np.ndarray:
    """The ``n`` members' weights normalised to sum to 1 (default equal); ConfigError unless
    there is one positive finite weight per member."""
    w = np.ones(n) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ConfigError(f"ensemble {name!r}: expected {n} positive finite weights (one per group), got "
                          f"{list(weights) if weights is not None else None}")
    return w / w.sum()


def _same_segments(groups: list[Predictions], name: str) -> list[Predictions]:
    """``groups``, or a DataError naming a UID that only one of two members predicts."""
    uids = groups[0].uids
    for g in groups[1:]:
        if not np.array_equal(np.sort(g.uids), np.sort(uids)):
            only = np.setxor1d(g.uids, uids)[0]
            has = groups[0].name if only in uids else g.name
            raise DataError(f"ensemble {name!r}: {groups[0].name!r} predicts {len(uids)} UIDs and {g.name!r} {len(g.uids)}, "
                            f"not the same segments (UID {only} is only in {has!r})")
    return groups
