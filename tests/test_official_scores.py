"""``evaluate`` equals the official EPIC-KITCHENS-100 scorer on the file ``export`` writes.

Each group is exported as leaderboard JSON and the file is scored by
``bench/official_scores.py``'s transcription of the official scorer's ranking
(``np.argsort(scores)[::-1]``) and RULSTM's ``topk_recall``; every class-mean top-5 recall
(verb, noun, action x overall, unseen, tail) must match ``evaluate``'s. The teacher and
student scores are drawn with many exact ties, the case where the two rankings could differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.official_scores import KDSTORE_KEYS, run, score_export
from kdstore.ensemble import write_ensemble
from kdstore.ingest import ingest
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig, generate_epic100
from kdstore.validate import validate_store
from kdstore.evaluation import evaluate_group
from trainers.teacher.evaluate import evaluate_ngram

EK100_DIR = Path(__file__).parents[1].parent / "shared/data/ek100"


def assert_same_figures(ours: dict, official: dict) -> None:
    for key, ours_key in KDSTORE_KEYS.items():
        assert round(official[key], 4) == round(ours[ours_key], 4), (key, official[key], ours[ours_key])
        assert abs(official[key] - ours[ours_key]) < 1e-9, key


@pytest.fixture(scope="module")
def ek100(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    s = ingest(generate_epic100(tmp / "ann", SyntheticConfig(n_videos=24)), tmp / "s.zarr", dataset="ek100")
    seg, cls = s.segments, s.classes
    rows = seg.rows_in("validation")
    assert seg.labelled[rows].all() and len(rows) > 50
    evaluate_ngram(s, "training", "validation", order=3, write="ngram3")
    rng = np.random.default_rng(0)
    tied = lambda n: rng.integers(-3, 3, size=(len(rows), n)).astype(np.float32)  # noqa: E731  [n rows, n] many exact ties
    s.write_predictions("teacher", seg.uid[rows], tied(cls.num_actions), verb_logits=tied(cls.num_verbs),
                        noun_logits=tied(cls.num_nouns), features=rng.normal(size=(len(rows), 8)), kind="teacher")
    s.write_predictions("student", seg.uid[rows], np.round(rng.normal(size=(len(rows), cls.num_actions)), 1), kind="student")
    write_ensemble(s, ["teacher", "student", "ngram3"], "ensemble", weights=[1, 1, 2])
    return s


@pytest.mark.parametrize("group", ["teacher", "ngram3", "student", "ensemble"])
def test_exported_json_scores_as_evaluate(ek100, group, tmp_path):
    ours = evaluate_group(ek100, group, "validation")
    official = score_export(ek100, group, "validation", tmp_path / f"{group}.json")
    assert_same_figures(ours, official)
    assert ek100.group(group).logits.dtype == (np.float64 if group == "ngram3" else np.float32)


def test_ngram_metrics_are_those_of_its_group(ek100):
    """``evaluate --baseline ngram --write`` prints the figures of the group it writes."""
    printed = evaluate_ngram(ek100, "training", "validation", order=3)
    stored = evaluate_group(ek100, "ngram3", "validation")
    assert {k: printed[k] for k in KDSTORE_KEYS.values()} == {k: stored[k] for k in KDSTORE_KEYS.values()}
    assert ek100.group("ngram3").metrics["validation"]["mean_top5_recall"] == printed["mean_top5_recall"]


def test_float16_group_still_reads_and_scores_as_evaluate(ek100, tmp_path):
    """A group holding float16 logits (and heads) is valid, and its export still scores as
    ``evaluate`` ranks it: float16's many ties are moved apart in the file."""
    t = ek100.group("teacher")
    arrays = {k: np.asarray(getattr(t, k)) for k in ("uids", "topk_values", "topk_indices", "lse", "features")}
    rng = np.random.default_rng(1)
    for k in ("logits", "verb_logits", "noun_logits"):
        arrays[k] = (np.asarray(getattr(t, k)) + rng.normal(size=getattr(t, k).shape) * 1e-3).astype(np.float16)
    ek100.backend.write_group("teacher/half", arrays, dict(t.attrs))
    store = Store.open(ek100.path)
    assert store.group("half").logits.dtype == np.float16
    assert not validate_store(store.path)
    ours = evaluate_group(store, "half", "validation")
    assert_same_figures(ours, score_export(store, "half", "validation", tmp_path / "half.json"))
    store.delete_predictions("half")


def test_export_writes_the_float64_scores_apart_only_where_tied(ek100, tmp_path):
    from kdstore.metrics import softmax

    out = tmp_path / "student.json"
    score_export(ek100, "student", "validation", out)
    seg = ek100.segments
    row = seg.rows_in("validation")[0]
    entry = json.loads(out.read_text())["results"][str(seg.id_of(row))]
    g = ek100.group("student")
    p = softmax(np.asarray(g.logits[g.row_of_segment[row]], np.float64)[None])[0]  # [A]
    pairs = [f"{v},{n}" for v, n in zip(ek100.classes.action_verb.tolist(), ek100.classes.action_noun.tolist())]
    written = np.array(list(entry["action"].values()))
    assert (np.diff(written) < 0).all()  # strictly decreasing in the file
    want = np.array([p[pairs.index(k)] for k in entry["action"]])
    assert np.abs(written - want).max() <= 1e-15 and (written != want).any()  # ties moved by ulps


def test_bench_row(ek100, tmp_path):
    row = run(str(ek100.path), "teacher", "validation", out_dir=tmp_path)
    assert row["max_abs_gap"] < 1e-9 and (tmp_path / "official_scores.csv").exists()


@pytest.mark.skipif(not EK100_DIR.is_dir(), reason=f"real EK100 annotations not found at {EK100_DIR}")
def test_real_ek100_ngram_scores_as_evaluate(tmp_path):
    s = ingest(EK100_DIR, tmp_path / "ek100.zarr")
    printed = evaluate_ngram(s, "training", "validation", order=3, write="ngram3")
    official = score_export(s, "ngram3", "validation", tmp_path / "ngram3.json")
    assert_same_figures(printed, official)
    assert_same_figures(evaluate_group(s, "ngram3", "validation"), official)
