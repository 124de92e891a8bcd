"""The collapse guard: a teacher whose fit on its own training rows is not clearly above the
class prior is flagged (warned, recorded in its group, shown by ``evaluate``); a healthy one is not."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import annotation_store as new_store
from typer.testing import CliRunner

from kdstore.store import Store
from trainers.teacher.build import CollapsedTeacherWarning, build_teacher
from trainers.teacher.folds import assign_folds
from trainers.teacher.config import preset
from trainers.teacher.fit_check import fit_check, group_fit_warning, ngram_top1, prior_top1
from trainers.teacher.ngram import NGram, action_histories

SPLITS = dict(train_split="training1", eval_splits=("validation1",), show_progress=False)


def test_prior_and_bigram_yardsticks_by_hand():
    train = np.array([2, 2, 2, 1, 0])
    assert prior_top1(train, np.array([2, 1, 2, 2])) == 75.0  # class 2, the most frequent
    assert prior_top1(train, np.array([0, 1])) == 0.0


def test_scores_of_the_prior_are_flagged_and_the_bigrams_are_not(teacher_ann):
    """On the synthetic histories (whose next action depends on the last one), scores equal to the
    training log prior for every row are flagged; the bigram's own log-probabilities are not."""
    store = new_store(teacher_ann.parent / "fc.zarr", teacher_ann)
    seg, A = store.segments, store.classes.num_actions
    rows = seg.rows_in("training1", labelled=True)
    log_prior = np.log(np.bincount(seg.action[rows], minlength=A) + 1.0)  # [A]
    prior_scores = np.broadcast_to(log_prior, (len(rows), A))  # [n, A]: one ranking for every row
    flat = fit_check(prior_scores, seg, A, "training1", rows)
    assert flat["collapsed"] and flat["top1"] == flat["prior_top1"] < flat["bigram_top1"]
    bigram = NGram(A, 2).fit(action_histories(seg, rows, 1, "gappy", "training1"), seg.action[rows])
    scores = np.log(bigram.predict(action_histories(seg, rows, 1, "gappy", "training1")))
    good = fit_check(scores, seg, A, "training1", rows)
    assert not good["collapsed"] and good["top1"] == pytest.approx(good["bigram_top1"])
    assert good["bigram_top1"] == round(ngram_top1(seg, A, rows, "training1", rows, "training1", block=7), 2)  # blocks change nothing
    assert good["bar"] == pytest.approx(good["prior_top1"] + 0.5 * (good["bigram_top1"] - good["prior_top1"]), abs=0.01)
    # out-of-fold scores meet an out-of-fold bigram: fitted without each fold's videos, scored on them
    folds = assign_folds(seg.video[rows], 2, 0)
    oof = fit_check(scores, seg, A, "training1", rows, folds)
    by_hand = sum(ngram_top1(seg, A, rows[folds != k], "training1", rows[folds == k], "training1") * (folds == k).sum()
                  for k in (0, 1)) / len(rows)
    assert oof["predictions"] == "out-of-fold" and oof["bigram_top1"] == round(by_hand, 2) < good["bigram_top1"]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, teacher_ann):
    """One real tiny-BERT build that barely moved from its initialisation (lr 1e-6, one epoch) and
    one trained as the tiny preset trains, on the same synthetic store."""
    store = new_store(tmp_path_factory.mktemp("fc") / "s.zarr", teacher_ann)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flat = build_teacher(store, "flat", preset("tiny", folds=1, epochs=1, lr=1e-6, threads=1), **SPLITS)
    with warnings.catch_warnings(record=True) as caught_ok:
        warnings.simplefilter("always")
        good = build_teacher(store, "good", preset("tiny", folds=1, epochs=6, threads=1), **SPLITS)
    return store, flat, good, caught, caught_ok


def test_a_collapsed_teacher_is_flagged_recorded_and_shown(two_teachers):
    store, flat, good, caught, caught_ok = two_teachers
    assert flat.fit_check["collapsed"] and flat.fit_check["predictions"] == "in-sample"
    assert any(issubclass(w.category, CollapsedTeacherWarning) and "teacher/flat" in str(w.message) for w in caught)
    assert Store.open(store.path).group("flat").config["fit_check"] == flat.fit_check  # in the group's attributes
    assert "teacher/flat barely fits" in group_fit_warning(store, "flat")
    from cli import app

    res = CliRunner().invoke(app, ["evaluate", str(store.path), "-p", "flat", "--json"])
    assert res.exit_code == 0 and "teacher/flat barely fits its own training rows" in res.stderr
    json.loads(res.stdout)  # the JSON stays clean


def test_a_healthy_teacher_is_not_flagged(two_teachers):
    store, flat, good, caught, caught_ok = two_teachers
    check = good.fit_check
    assert not check["collapsed"] and check["top1"] >= check["bar"] > check["prior_top1"]
    assert not any(issubclass(w.category, CollapsedTeacherWarning) for w in caught_ok)
    assert group_fit_warning(store, "good") is None and group_fit_warning(store, "absent") is None
    from cli import app

    res = CliRunner().invoke(app, ["evaluate", str(store.path), "-p", "good"])
    assert res.exit_code == 0 and "barely fits" not in res.output


def test_bench_teacher_fit_tiny(tmp_path):
    """bench/teacher_fit.py scores the training and eval rows as the steps go by, beside the yardsticks."""
    from bench.teacher_fit import main

    rows = main(["--tiny", "--out-dir", str(tmp_path)])
    assert len(rows) >= 2 and rows[-1]["step"] == rows[-1]["steps"]
    assert all(0 <= float(r["train_top1"]) <= 100 and float(r["bigram_train"]) > float(r["prior_train"]) for r in rows)
    assert (tmp_path / "teacher_fit.csv").read_text().count("\n") == len(rows) + 1


EK55_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/ek55"  # ../shared/data from the repo root


def test_epic_preset_is_ek100_cpu_with_mean_pooling_and_a_vocabulary_for_ek55():
    epic, ek100 = preset("epic-cpu").to_dict(), preset("ek100-cpu").to_dict()
    assert {k for k in epic if epic[k] != ek100[k]} == {"pooling", "vocab_size"}
    assert (epic["pooling"], epic["vocab_size"], epic["hist_len"], epic["topk"]) == ("mean", 1024, 5, 50)


@pytest.mark.skipif(not EK55_DIR.exists(), reason=f"real EK55 annotations not found at {EK55_DIR}")
def test_epic_preset_keeps_every_ek55_history_word_whole(tmp_path):
    """EK55 names its actions by 721 surface words; ek100-cpu's 512-token vocabulary spells the
    rarer ones out in characters, epic-cpu's keeps each a single token."""
    from kdstore.rulstm import load_annotations
    from trainers.teacher.build import plan_build

    store = Store.create(tmp_path / "ek55.zarr", *load_annotations(EK55_DIR, ["training", "validation"], fps=30.0))
    pieces = {}
    for name in ("ek100-cpu", "epic-cpu"):
        plan = plan_build(store, preset(name), "training", ("validation",), work_dir=tmp_path / name)
        tok = plan.tokenizer()
        words = {w for t in plan.texts[5][: plan.n_train] for w in t.replace("<v>", " ").replace("<a>", " ").split()}
        pieces[name] = sum(len(tok.tokenize(w)) > len(tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(w))
                           for w in words)
    assert pieces["ek100-cpu"] > 200 and pieces["epic-cpu"] == 0


def test_train_student_warns_about_a_collapsed_teacher(two_teachers, tmp_path):
    """The warning comes before training (here the store has no features, which fails next)."""
    from cli import app

    store = two_teachers[0]
    for name, warned in (("flat", True), ("good", False)):
        res = CliRunner().invoke(app, ["train-student", str(store.path), "--features", "none", "--run",
                                       str(tmp_path / name), "--teacher", name])
        assert res.exit_code != 0 and ("teacher/flat barely fits" in res.stderr) == warned, res.output


def test_cli_build_teacher_prints_the_collapse_warning_once(tmp_path, teacher_ann):
    from cli import app

    store = new_store(tmp_path / "s.zarr", teacher_ann)
    res = CliRunner().invoke(app, ["build-teacher", str(store.path), "--name", "flat", "--preset", "tiny", "--folds", "1",
                                   "--epochs", "1", "--lr", "1e-6", "--set", "threads=1"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("teacher/flat barely fits its own training rows") == 1
    assert Store.open(store.path).group("flat").config["fit_check"]["collapsed"]
