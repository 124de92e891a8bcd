"""kdstore.metrics against hand-computed examples."""

import numpy as np
import pytest

from kdstore.annotations import ClassTable
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
