"""Verb/noun marginals: exact sums by default, RULSTM's ``get_marginal_indexes`` +
``marginalize`` with ``--marginals rulstm``, checked against ``bench/official_scores.py``'s
transcription of RULSTM's code on EK55-shaped data (classes that no action uses)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.official_scores import rulstm_ek55, rulstm_marginal_indexes, rulstm_marginalize
from cli import app
from kdstore.errors import ConfigError
from kdstore.ingest import ingest
from kdstore.metrics import marginalise, softmax
from test_epic import ek55_line
from kdstore.evaluation import evaluate_group
from trainers.teacher.evaluate import evaluate_ngram

EK55_DIR = Path(__file__).parents[1].parent / "shared/data/ek55"
V, N = 9, 12
UNUSED_VERBS, UNUSED_NOUNS = (2, 5), (0, 3, 7)  # below the largest used class: RULSTM gives them action 0's probability


def write_ek55_shaped(d: Path, seed: int = 0) -> Path:
    """RULSTM's data/ek55 layout: 40 actions over verbs 0..8 and nouns 0..11 with some of
    each unused, 400 training and 300 validation segments, test sets, many-shot lists."""
    rng = np.random.default_rng(seed)
    verbs = [v for v in range(V) if v not in UNUSED_VERBS]
    nouns = [n for n in range(N) if n not in UNUSED_NOUNS]
    pairs = sorted({(int(rng.choice(verbs)), int(rng.choice(nouns))) for _ in range(200)})[:40]
    pairs += [(v, int(rng.choice(nouns))) for v in verbs if v not in {p[0] for p in pairs}]
    pairs += [(int(rng.choice(verbs)), n) for n in nouns if n not in {p[1] for p in pairs}]
    d.mkdir(parents=True)
    (d / "actions.csv").write_text("id,action,verb,noun\n" + "".join(f"{a}, v{v}_n{n},{v},{n}\n" for a, (v, n) in enumerate(pairs)))
    uid = 0
    for split, count, videos in (("training", 400, ("P01_01", "P01_02", "P02_01")), ("validation", 300, ("P03_01", "P03_02"))):
        lines = []
        for i in range(count):
            a = int(rng.integers(len(pairs)))
            lines.append(ek55_line(uid, videos[i % len(videos)], 10 * i, 10 * i + 8, pairs[a][0], pairs[a][1], a))
            uid += 1
        (d / f"{split}.csv").write_text("".join(lines))
        (d / f"{split}_videos.csv").write_text("".join(f"{v}\n" for v in videos))
    (d / "test_seen.csv").write_text(ek55_line(uid, "P01_09", 1, 30))
    (d / "test_unseen.csv").write_text(ek55_line(uid + 1, "P09_01", 1, 30))
    (d / "EPIC_many_shot_verbs.csv").write_text("verb_class,verb\n" + "".join(f"{v},v{v}\n" for v in verbs[:3]))
    (d / "EPIC_many_shot_nouns.csv").write_text("noun_class,noun\n" + "".join(f"{n},n{n}\n" for n in nouns[:4]))
    return d


@pytest.fixture(scope="module")
def ek55(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("marginals")
    s = ingest(write_ek55_shaped(tmp / "ek55"), tmp / "ek55.zarr", dataset="ek55")
    seg, A = s.segments, s.classes.num_actions
    rows = seg.rows_in("validation")
    logits = np.random.default_rng(1).normal(size=(len(rows), A)) * 2
    logits[:, 0] += 2.5  # action 0 likely: RULSTM's unused classes then climb into the top 5
    s.write_predictions("model", seg.uid[rows], logits, kind="student")
    return s


def reference(store, name: str) -> dict:
    seg, c = store.segments, store.classes
    g = store.group(name)
    rows = seg.rows_in("validation", labelled=True)
    logits = np.asarray(g.logits, np.float64)[g.row_of_segment[rows]]
    return rulstm_ek55(logits, c.action_verb.astype(np.int64), c.action_noun.astype(np.int64), seg.action[rows].astype(np.int64),
                       np.flatnonzero(c.many_shot_verbs), np.flatnonzero(c.many_shot_nouns))


def test_the_shape_has_unused_classes(ek55):
    c = ek55.classes
    assert (c.num_verbs, c.num_nouns) == (V, N)
    assert np.setdiff1d(np.arange(V), c.action_verb).tolist() == list(UNUSED_VERBS)
    assert np.setdiff1d(np.arange(N), c.action_noun).tolist() == list(UNUSED_NOUNS)


def test_rulstm_marginals_equal_rulstm_code(ek55):
    c = ek55.classes
    probs = softmax(np.asarray(ek55.group("model").logits, np.float64))
    for index, num in ((c.action_verb, V), (c.action_noun, N)):
        want = rulstm_marginalize(probs, rulstm_marginal_indexes(index.astype(np.int64)))
        np.testing.assert_allclose(marginalise(probs, index, num, "rulstm"), want, rtol=0, atol=1e-12)
        exact = marginalise(probs, index, num)
        unused = np.setdiff1d(np.arange(num), index)
        assert (exact[:, unused] == 0).all() and np.allclose(exact.sum(1), 1)
        np.testing.assert_array_equal(want[:, unused], probs[:, [0] * len(unused)])


def test_evaluate_rulstm_reproduces_rulstm_figures(ek55):
    ours = evaluate_group(ek55, "model", "validation", marginals="rulstm")
    want = reference(ek55, "model")
    assert max(abs(ours[k] - v) for k, v in want.items()) < 1e-6
    exact = evaluate_group(ek55, "model", "validation")
    assert exact["verb_top5"] > ours["verb_top5"] and exact["noun_top5"] > ours["noun_top5"]  # unused classes took top-5 places
    assert all(exact[k] == ours[k] for k in ("top1", "top5", "mean_top5_recall"))  # actions are not marginalised


def test_ngram_and_cli_option(ek55):
    evaluate_ngram(ek55, "training", "validation", order=2, write="ng2")
    printed = evaluate_ngram(ek55, "training", "validation", order=2, marginals="rulstm")
    # (not against RULSTM's code: this tiny n-gram ties scores exactly, which RULSTM's argsort orders as numpy's sort happens to)
    stored = evaluate_group(ek55, "ng2", "validation", marginals="rulstm")
    assert all(printed[k] == stored[k] for k in reference(ek55, "model"))
    with pytest.raises(ConfigError, match="--marginals rulstm"):
        evaluate_ngram(ek55, "training", "validation", write="ng", marginals="rulstm")
    res = CliRunner().invoke(app, ["evaluate", str(ek55.path), "-p", "model", "--marginals", "rulstm", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verb_top5"] == evaluate_group(ek55, "model", "validation", marginals="rulstm")["verb_top5"]
    res = CliRunner().invoke(app, ["evaluate", str(ek55.path), "-p", "model", "--marginals", "avt"])
    assert res.exit_code != 0 and "'exact' or 'rulstm'" in res.output


def test_classes_above_the_largest_used_one_are_not_scored():
    """RULSTM's marginal has max+1 columns: a larger class never enters a top-k."""
    probs = np.array([[0.5, 0.3, 0.2]])
    m = marginalise(probs, np.array([0, 2, 0]), 5, "rulstm")  # classes 0..2 scored, 3 and 4 beyond
    np.testing.assert_array_equal(m, [[0.7, 0.5, 0.3, -np.inf, -np.inf]])  # class 1 unused: action 0's 0.5


@pytest.mark.skipif(not EK55_DIR.is_dir(), reason=f"real EK55 annotations not found at {EK55_DIR}")
def test_real_ek55_ngram_rulstm(tmp_path):
    s = ingest(EK55_DIR, tmp_path / "ek55.zarr")
    evaluate_ngram(s, "training", "validation", write="ngram3")
    ours = evaluate_group(s, "ngram3", "validation", marginals="rulstm")
    want = reference(s, "ngram3")
    assert max(abs(ours[k] - v) for k, v in want.items()) < 1e-6
    assert evaluate_group(s, "ngram3", "validation")["verb_top5"] > ours["verb_top5"]


def test_unknown_marginals_is_a_config_error(ek55):
    from kdstore.metrics import compute_metrics

    seg = ek55.segments
    rows = seg.rows_in("validation")
    with pytest.raises(ConfigError, match="marginals must be one of"):
        compute_metrics(np.zeros((len(rows), ek55.classes.num_actions)), seg.action[rows], ek55.classes, marginals="avt")
