"""Benchmark: kdstore's figures against transcriptions of the reference scorers.

    python bench/official_scores.py STORE GROUP [--split validation] [--json FILE]

Exports ``teacher/GROUP`` as the EPIC-KITCHENS-100 leaderboard JSON, scores that file with
a transcription of the official scorer (epic-kitchens/C3-Action-Anticipation,
``evaluate_anticipation_json_ek100.py``: ``read_array_from_dict``, ``_scores_array_to_ranks``,
``_scores_dict_to_ranks``, ``compute_anticipation_metrics``) with RULSTM's ``topk_recall``
(fpv-iplab/rulstm, ``RULSTM/utils.py``) as the class-mean, and appends a row to
``bench/results/official_scores.csv`` with both sets of figures and their largest gap.

The functions below are written from the reference code, not from kdstore: they read only
the exported file and the annotation labels, and rank with ``np.argsort(...)[::-1]`` as the
references do. ``rulstm_*`` transcribe RULSTM's marginals and metrics for EK55.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, machine  # noqa: E402

ACTION_VERB_MULTIPLIER = 1000  # the official scorer's action id: verb * 1000 + noun
TASKS = ("verb", "noun", "action")
SUBSETS = ("overall", "unseen", "tail")


# -- the official EK100 scorer ---------------------------------------------------------------

def official_ranks(results: dict, ids: list[str]) -> dict[str, np.ndarray]:
    """Per task, [n, C] classes best first for the segments ``ids``: verb and noun score dicts
    become arrays indexed by class (``read_array_from_dict``) ranked by
    ``argsort(axis=-1)[:, ::-1]``; each action dict, in the file's key order, is ranked by
    ``class_ids[np.argsort(score_array)[::-1]]`` (``_scores_dict_to_ranks``)."""
    def array(d: dict) -> np.ndarray:
        a = np.zeros(len(d))
        for key in d:
            a[int(key)] = d[key]
        return a

    ranks = {t: np.array([array(results[i][t]) for i in ids]).argsort(axis=-1)[:, ::-1] for t in ("verb", "noun")}
    action = []
    for i in ids:
        entries = {}
        for key, score in results[i]["action"].items():
            v, n = key.split(",")
            entries[int(v) * ACTION_VERB_MULTIPLIER + int(n)] = score
        class_ids = np.array(list(entries.keys()))
        scores = np.array([entries[c] for c in class_ids])
        action.append(class_ids[np.argsort(scores)[::-1]])
    ranks["action"] = np.array(action)
    return ranks


def rulstm_topk_recall_of_ranks(rankings: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """RULSTM's ``topk_recall`` (mean over the classes in ``labels`` of ``topk_accuracy``
    restricted to that class), given the rankings its ``scores.argsort()[:, ::-1]`` makes."""
    recalls = 0
    classes = np.unique(labels)
    for c in classes:
        idx = labels == c
        tp = rankings[idx][:, :k] == labels[idx].reshape(-1, 1)
        recalls += tp[:, :k].max(1).mean()
    return recalls / len(classes)


def official_ek100(results: dict, ids: list[str], verb: np.ndarray, noun: np.ndarray, unseen: np.ndarray,
                   tail_verb: np.ndarray, tail_noun: np.ndarray) -> dict[str, float]:
    """``compute_anticipation_metrics`` x 100: ``<subset>_<task>_mt5r`` for the segments ``ids``
    with labels ``verb``/``noun`` and masks ``unseen``, ``tail_verb`` (the segment's verb is a
    tail verb), ``tail_noun``; tail actions are ``tail_verb | tail_noun`` as in the scorer."""
    ranks = official_ranks(results, ids)
    labels = {"verb": verb, "noun": noun, "action": verb * ACTION_VERB_MULTIPLIER + noun}
    masks = {"overall": {t: np.ones(len(ids), bool) for t in TASKS}, "unseen": {t: unseen for t in TASKS},
             "tail": {"verb": tail_verb, "noun": tail_noun, "action": tail_verb | tail_noun}}
    return {f"{s}_{t}_mt5r": 100 * rulstm_topk_recall_of_ranks(ranks[t][masks[s][t]], labels[t][masks[s][t]])
            for s in SUBSETS for t in TASKS}


# -- RULSTM (EK55) ---------------------------------------------------------------------------

def rulstm_marginal_indexes(action_class: np.ndarray) -> list[np.ndarray]:
    """``get_marginal_indexes(actions, mode)`` with ``action_class [A]`` the verb (or noun)
    column of ``actions.csv`` indexed by action id: the actions of each class
    ``0..max``, ``[0]`` for a class no action has."""
    out = []
    for v in range(action_class.max() + 1):
        vals = np.flatnonzero(action_class == v)
        out.append(vals if len(vals) > 0 else np.array([0]))
    return out


def rulstm_marginalize(probs: np.ndarray, indexes: list[np.ndarray]) -> np.ndarray:
    return np.array([probs[:, ilist].sum(1) for ilist in indexes]).T


def rulstm_softmax(x: np.ndarray) -> np.ndarray:
    e_x = np.exp(x - np.max(x, 1).reshape(-1, 1))
    return e_x / e_x.sum(axis=1).reshape(-1, 1)


def rulstm_topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks, selected_class=None) -> list[float]:
    if selected_class is not None:
        idx = labels == selected_class
        scores, labels = scores[idx], labels[idx]
    rankings = scores.argsort()[:, ::-1]
    tp = rankings[:, : np.max(ks)] == labels.reshape(-1, 1)
    return [tp[:, :k].max(1).mean() for k in ks]


def rulstm_topk_recall(scores: np.ndarray, labels: np.ndarray, k: int = 5, classes=None) -> float:
    unique = np.unique(labels)
    classes = unique if classes is None else np.intersect1d(classes, unique)
    return sum(rulstm_topk_accuracy(scores, labels, ks=(k,), selected_class=c)[0] for c in classes) / len(classes)


def rulstm_ek55(action_logits: np.ndarray, action_verb: np.ndarray, action_noun: np.ndarray, labels: np.ndarray,
                many_shot_verbs: np.ndarray, many_shot_nouns: np.ndarray) -> dict[str, float]:
    """RULSTM's EK55 validation figures x 100 (``main.py``'s ``get_scores`` + ``validation``):
    verb/noun from the marginalised softmax of the action scores; many-shot classes are
    ``many_shot_verbs``/``many_shot_nouns`` ids, and an action is many-shot when its verb or noun is."""
    probs = rulstm_softmax(action_logits)
    verb_scores = rulstm_marginalize(probs, rulstm_marginal_indexes(action_verb))
    noun_scores = rulstm_marginalize(probs, rulstm_marginal_indexes(action_noun))
    y = {"verb": action_verb[labels], "noun": action_noun[labels], "action": labels}
    scores = {"verb": verb_scores, "noun": noun_scores, "action": action_logits}
    many_actions = np.flatnonzero(np.isin(action_verb, many_shot_verbs) | np.isin(action_noun, many_shot_nouns))
    many = {"verb": many_shot_verbs, "noun": many_shot_nouns, "action": many_actions}
    out = {}
    for t in TASKS:
        p = "" if t == "action" else f"{t}_"
        top1, top5 = rulstm_topk_accuracy(scores[t], y[t], ks=(1, 5))
        out |= {f"{p}top1": 100 * top1, f"{p}top5": 100 * top5,
                f"{p}mean_top5_recall": 100 * rulstm_topk_recall(scores[t], y[t], k=5),
                f"{p}many_shot_top5_recall": 100 * rulstm_topk_recall(scores[t], y[t], k=5, classes=many[t])}
    return out


# -- the run ---------------------------------------------------------------------------------

KDSTORE_KEYS = {f"{s}_{t}_mt5r": f"{'' if s == 'overall' else s + '_'}{'' if t == 'action' and s == 'overall' else t + '_'}mean_top5_recall"
                for s in SUBSETS for t in TASKS}


def score_export(store, group: str, split: str, out: Path) -> dict[str, float]:
    """Export ``teacher/<group>`` for ``split`` to ``out`` and score the file officially."""
    from kdstore.inspect import export_predictions

    export_predictions(store, group, out, fmt="epic", split=split)
    seg = store.segments
    rows = seg.rows_in(split, labelled=True)
    ids = [str(seg.id_of(r)) for r in rows]
    member = lambda name: seg.in_subset(f"{split}_{name}")[rows]  # noqa: E731
    with open(out) as f:
        results = json.load(f)["results"]
    return official_ek100(results, ids, seg.verb[rows].astype(np.int64), seg.noun[rows].astype(np.int64),
                          member("unseen_participants"), member("tail_verbs"), member("tail_nouns"))


def run(store_path: str, group: str, split: str = "validation", out_dir: Path = RESULTS_DIR) -> dict:
    from kdstore.store import Store
    from kdstore.evaluation import evaluate_group

    store = Store.open(store_path)
    ours = evaluate_group(store, group, split)
    with tempfile.TemporaryDirectory() as tmp:
        official = score_export(store, group, split, Path(tmp) / "export.json")
    gap = max(abs(official[k] - ours[v]) for k, v in KDSTORE_KEYS.items())
    row = {**machine(), "store": str(store_path), "group": group, "split": split,
           "logits_dtype": store.group(group).logits.dtype.name, "max_abs_gap": gap,
           **{f"official_{k}": v for k, v in official.items()},
           **{f"kdstore_{k}": ours[v] for k, v in KDSTORE_KEYS.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "official_scores.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("group")
    ap.add_argument("--split", default="validation")
    args = ap.parse_args()
    print(json.dumps(run(args.store, args.group, args.split), indent=1))


if __name__ == "__main__":
    main()
