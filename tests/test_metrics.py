"""kdstore.metrics against hand-computed examples."""

import numpy as np
import pytest

from bench.official_scores import rulstm_softmax, rulstm_topk_accuracy, rulstm_topk_recall
from kdstore.tables import ClassTable
from kdstore.errors import DataError
from kdstore.metrics import as_probabilities, compute_metrics, marginalise, topk_hits


def table(verbs, nouns, ms_verbs=None, ms_nouns=None) -> ClassTable:
    verbs, nouns = np.asarray(verbs, np.int32), np.asarray(nouns, np.int32)
    return ClassTable(
        action_names=[f"a{i}" for i in range(len(verbs))],
        verb_names=[f"v{i}" for i in range(verbs.max() + 1)],
        noun_names=[f"n{i}" for i in range(nouns.max() + 1)],
        action_verb=verbs, action_noun=nouns,
        many_shot_verbs=None if ms_verbs is None else np.asarray(ms_verbs, bool),
        many_shot_nouns=None if ms_nouns is None else np.asarray(ms_nouns, bool),
    )


# 4 actions: a0 = (v0, n0), a1 = (v0, n1), a2 = (v1, n0), a3 = (v1, n2)
CLASSES = table([0, 0, 1, 1], [0, 1, 0, 2])
PROBS = np.array([
    [0.05, 0.25, 0.30, 0.40],  # label 3: action right; verb v1 .70 right; noun n2 .40 > n0 .35 right
    [0.50, 0.10, 0.15, 0.25],  # label 1: action wrong (rank 4); verb v0 .60 right; noun n0 .65, label n1 wrong
    [0.40, 0.35, 0.15, 0.10],  # label 2: action wrong; verb v0 .75, label v1 wrong; noun n0 .55 right
    [0.05, 0.25, 0.30, 0.40],  # label 3 again: right
])
LABELS = np.array([3, 1, 2, 3])


def test_hand_computed_example():
    m = compute_metrics(PROBS, LABELS, CLASSES)
    assert m["n"] == 4
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(100.0)  # 4 classes: top-5 covers all
    # class-mean: a3 2/2, a1 0/1, a2 0/1 -> (100 + 0 + 0) / 3
    assert m["mean_top1_recall"] == pytest.approx(100 / 3)
    assert m["mean_top5_recall"] == pytest.approx(100.0)
    assert m["verb_top1"] == pytest.approx(75.0)  # rows 0, 1, 3
    assert m["noun_top1"] == pytest.approx(75.0)  # rows 0, 2, 3: row 2 is right through marginalisation
    assert m["verb_top5"] == m["noun_top5"] == pytest.approx(100.0)
    assert m["many_shot_top5_recall"] is None  # no many-shot lists


def test_logits_and_probabilities_agree():
    a = compute_metrics(PROBS, LABELS, CLASSES)
    b = compute_metrics(np.log(PROBS) + 3.0, LABELS, CLASSES)  # logits up to a constant
    assert a == pytest.approx(b)
    assert as_probabilities(np.log(PROBS)) == pytest.approx(PROBS)
    assert as_probabilities(PROBS, "probs") is not None


def test_marginalisation_sums_probabilities():
    verb = marginalise(PROBS, CLASSES.action_verb, 2)
    noun = marginalise(PROBS, CLASSES.action_noun, 3)
    assert verb[0] == pytest.approx([0.30, 0.70])
    assert noun[1] == pytest.approx([0.65, 0.10, 0.25])
    assert verb.sum(axis=1) == pytest.approx(1.0) and noun.sum(axis=1) == pytest.approx(1.0)


def test_top5_boundary_and_ties():
    classes = table(list(range(7)), list(range(7)))
    scores = np.tile(np.arange(7.0)[::-1], (2, 1))  # class 0 best ... class 6 worst
    m = compute_metrics(scores, np.array([4, 5]), classes)  # rank 5 is in the top 5, rank 6 is not
    assert (m["top1"], m["top5"]) == (0.0, 50.0)
    assert topk_hits(np.zeros((1, 7)), np.array([0]), 1).all()  # ties go to the lower class index
    assert not topk_hits(np.zeros((1, 7)), np.array([5]), 5).any()


def test_many_shot_recall_over_present_many_shot_actions():
    # verb 0 many-shot, noun 2 many-shot -> many-shot actions (RULSTM: verb OR noun): a0, a1 (v0), a3, a6 (n2)
    classes = table([0, 0, 1, 1, 2, 2, 2], [0, 1, 0, 2, 0, 1, 2], ms_verbs=[1, 0, 0], ms_nouns=[0, 0, 1])
    assert classes.many_shot_actions.tolist() == [True, True, False, True, False, False, True]
    scores = np.tile(np.arange(7.0)[::-1], (4, 1))  # ranks: a0 1st ... a6 7th
    labels = np.array([0, 6, 5, 2])  # many-shot present: a0 (hit), a6 (miss); a5, a2 not many-shot
    m = compute_metrics(scores, labels, classes)
    assert m["many_shot_top5_recall"] == pytest.approx(50.0)
    assert m["mean_top5_recall"] == pytest.approx(50.0)  # a0 1, a2 1, a5 0, a6 0


def test_bad_input():
    with pytest.raises(DataError, match="expected \\[N, 4\\]"):
        compute_metrics(np.zeros((2, 3)), np.array([0, 1]), CLASSES)
    with pytest.raises(DataError, match="no labelled samples"):
        compute_metrics(np.zeros((0, 4)), np.zeros(0, int), CLASSES)
    with pytest.raises(DataError, match=r"no labelled samples to evaluate \(2 unlabelled left out\)"):
        compute_metrics(np.zeros((2, 4)), np.array([-1, -1]), CLASSES)
    with pytest.raises(DataError, match="NaN"):
        compute_metrics(np.array([[np.nan, 0, 0, 0]]), np.array([0]), CLASSES)
    with pytest.raises(DataError, match="label outside"):
        compute_metrics(np.zeros((1, 4)), np.array([4]), CLASSES)
    with pytest.raises(DataError, match="label outside"):
        compute_metrics(np.zeros((1, 4)), np.array([-2]), CLASSES)
    with pytest.raises(DataError, match="labels for"):
        compute_metrics(np.zeros((2, 4)), np.array([0]), CLASSES)


# ---------------------------------------------------------------------------------------
# RULSTM's formulas, re-implemented as written in fpv-iplab/rulstm RULSTM/utils.py and main.py
# (softmax, topk_accuracy and topk_recall: the transcription in bench/official_scores.py)


def rulstm_mean_topk_recall_meter(scores, labels, num_classes, k=5):
    """``MeanTopKRecallMeter``: accumulate per-class true positives, average the recalls of the classes seen."""
    tps, nums = np.zeros(num_classes), np.zeros(num_classes)
    tp = (np.argsort(scores, axis=1)[:, -k:] == labels.reshape(-1, 1)).max(1)
    for lab in np.unique(labels):
        tps[lab] += tp[labels == lab].sum()
        nums[lab] += (labels == lab).sum()
    with np.errstate(invalid="ignore"):  # 0/0 for the classes never seen, dropped by the mask
        return (tps / nums)[nums > 0].mean() * 100


def rulstm_marginal_indexes(action_part, num):
    """``get_marginal_indexes``: the actions of each verb (noun); ``[0]`` for one with none."""
    return [np.flatnonzero(action_part == v) if (action_part == v).any() else np.array([0]) for v in range(num)]


def rulstm_marginalize(probs, indexes):
    return np.array([probs[:, ilist].sum(1) for ilist in indexes]).T


def rulstm_many_shot_actions(many_verbs, many_nouns, a_to_vn):
    """``get_many_shot``: an action is many-shot if its verb or its noun is."""
    return [a for a, (v, n) in a_to_vn.items() if v in many_verbs or n in many_nouns]


@pytest.fixture
def rulstm_case():
    """60 actions over 7 verbs and 11 nouns (each used by some action), 400 scored segments, no ties."""
    rng = np.random.default_rng(3)
    pairs = [(v, n) for v in range(7) for n in range(11)]
    pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), 60, replace=False))]
    verbs, nouns = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    assert set(verbs) == set(range(7)) and set(nouns) == set(range(11))
    classes = table(verbs, nouns, ms_verbs=[1, 0, 1, 0, 0, 0, 0], ms_nouns=[0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0])
    logits = rng.normal(size=(400, 60)) * 2
    labels = rng.choice(60, size=400, p=rng.dirichlet(np.ones(60) * 0.5))
    return classes, logits, labels


def test_ek55_metrics_match_rulstm(rulstm_case):
    classes, logits, labels = rulstm_case
    m = compute_metrics(logits, labels, classes)
    probs = rulstm_softmax(logits)
    verb = rulstm_marginalize(probs, rulstm_marginal_indexes(classes.action_verb, 7))
    noun = rulstm_marginalize(probs, rulstm_marginal_indexes(classes.action_noun, 11))
    y = {"verb": classes.action_verb[labels], "noun": classes.action_noun[labels], "action": labels}
    scores = {"verb": verb, "noun": noun, "action": logits}  # RULSTM ranks the raw action scores
    a_to_vn = {a: (int(v), int(n)) for a, (v, n) in enumerate(zip(classes.action_verb, classes.action_noun))}
    many = {"verb": np.flatnonzero(classes.many_shot_verbs), "noun": np.flatnonzero(classes.many_shot_nouns),
            "action": rulstm_many_shot_actions(set(np.flatnonzero(classes.many_shot_verbs)),
                                               set(np.flatnonzero(classes.many_shot_nouns)), a_to_vn)}
    assert np.flatnonzero(classes.many_shot_actions).tolist() == many["action"]
    for task in ("verb", "noun", "action"):
        p = "" if task == "action" else f"{task}_"
        top1, top5 = rulstm_topk_accuracy(scores[task], y[task], (1, 5))
        assert m[f"{p}top1"] == pytest.approx(100 * top1) and m[f"{p}top5"] == pytest.approx(100 * top5)
        assert m[f"{p}mean_top5_recall"] == pytest.approx(100 * rulstm_topk_recall(scores[task], y[task], 5))
        assert m[f"{p}mean_top5_recall"] == pytest.approx(
            rulstm_mean_topk_recall_meter(scores[task], y[task], scores[task].shape[1]))
        assert m[f"{p}many_shot_top5_recall"] == pytest.approx(100 * rulstm_topk_recall(scores[task], y[task], 5, many[task]))


def test_ek100_metrics_match_rulstm(rulstm_case):
    classes, logits, labels = rulstm_case
    rng = np.random.default_rng(4)
    unseen = rng.random(400) < 0.3
    tail = {t: rng.random(400) < 0.25 for t in ("verb", "noun", "action")}
    m = compute_metrics(logits, labels, classes, subsets={"unseen": {t: unseen for t in tail}, "tail": tail})
    probs = rulstm_softmax(logits)
    scores = {"verb": rulstm_marginalize(probs, rulstm_marginal_indexes(classes.action_verb, 7)),
              "noun": rulstm_marginalize(probs, rulstm_marginal_indexes(classes.action_noun, 11)), "action": logits}
    y = {"verb": classes.action_verb[labels], "noun": classes.action_noun[labels], "action": labels}
    for task in ("verb", "noun", "action"):
        overall = "mean_top5_recall" if task == "action" else f"{task}_mean_top5_recall"
        assert m[overall] == pytest.approx(100 * rulstm_topk_recall(scores[task], y[task], 5))
        assert m[f"unseen_{task}_mean_top5_recall"] == pytest.approx(100 * rulstm_topk_recall(scores[task][unseen], y[task][unseen], 5))
        t = tail[task]
        assert m[f"tail_{task}_mean_top5_recall"] == pytest.approx(100 * rulstm_topk_recall(scores[task][t], y[task][t], 5))


def test_heads_replace_marginalisation_and_unlabelled_rows_are_left_out(rulstm_case):
    classes, logits, labels = rulstm_case
    rng = np.random.default_rng(5)
    verb_head = rng.normal(size=(400, 7))
    m = compute_metrics(logits, labels, classes, verb_scores=verb_head)
    y = classes.action_verb[labels]
    assert m["verb_top1"] == pytest.approx(100 * rulstm_topk_accuracy(verb_head, y, (1,))[0])
    assert m["verb_mean_top5_recall"] == pytest.approx(100 * rulstm_topk_recall(verb_head, y, 5))
    masked = labels.copy()
    masked[::3] = -1  # unlabelled: left out, counted
    m2 = compute_metrics(logits, masked, classes)
    keep = masked >= 0
    assert m2["n"] == keep.sum() and m2["unlabelled"] == (~keep).sum()
    assert m2["top1"] == pytest.approx(compute_metrics(logits[keep], labels[keep], classes)["top1"])
    with pytest.raises(DataError, match=r"verb scores of shape \[400, 6\], expected \[400, 7\]"):
        compute_metrics(logits, labels, classes, verb_scores=verb_head[:, :6])


def test_subsets_by_hand():
    classes = table(list(range(7)), list(range(7)))  # action c is verb c, noun c
    scores = np.tile(np.arange(7.0)[::-1], (5, 1))  # class c ranks c-th (0-based): top-5 holds 0..4
    labels = np.array([0, 5, 6, 4, 5])  # top-5 hits: yes, no, no, yes, no
    unseen = np.array([False, True, False, True, True])
    tail = {"action": np.array([True, True, True, False, False]), "verb": np.array([False, False, False, True, False])}
    m = compute_metrics(scores, labels, classes, subsets={"unseen": {"action": unseen, "verb": unseen}, "tail": tail})
    assert m["mean_top5_recall"] == pytest.approx(50.0)  # classes 0: 1/1, 4: 1/1, 5: 0/2, 6: 0/1
    assert m["unseen_action_mean_top5_recall"] == pytest.approx(50.0)  # 5: 0/2, 4: 1/1
    assert m["tail_action_mean_top5_recall"] == pytest.approx(100 / 3)  # 0: 1/1, 5: 0/1, 6: 0/1
    assert m["tail_verb_mean_top5_recall"] == pytest.approx(100.0) and m["unseen_verb_mean_top5_recall"] == pytest.approx(50.0)
    assert "tail_noun_mean_top5_recall" not in m and "unseen_noun_mean_top5_recall" not in m  # no list given


def test_class_mean_recall_by_hand():
    from kdstore.metrics import class_mean_recall, label_ranks

    labels = np.array([2, 2, 2, 0, 5])
    hits = np.array([1, 0, 0, 1, 0], bool)
    assert class_mean_recall(hits, labels) == pytest.approx(100 * (1 / 3 + 1 + 0) / 3)
    assert class_mean_recall(hits, labels, np.array([1, 0, 0, 0, 0, 1], bool)) == pytest.approx(50.0)
    assert class_mean_recall(hits, labels, np.zeros(6, bool)) is None
    assert label_ranks(np.array([[0.1, 0.5, 0.5, 0.2]]), np.array([2])).tolist() == [1]  # tie: class 1 first
