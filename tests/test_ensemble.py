"""Ensembles of prediction groups (kdstore.ensemble, `kdstore ensemble`): values, refusals, and
the ensemble as a group like any other (evaluate, report, query, a KD teacher)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from conftest import build_store, synthetic_annotations
from kdstore.ensemble import write_ensemble
from kdstore.errors import ConfigError, DataError, MissingError, StoreFormatError
from kdstore.evaluation import evaluate_group, metrics_table
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def es(tmp_path) -> SimpleNamespace:
    """A store with three groups over every UID: two of kind teacher, one student."""
    _, classes, segments = synthetic_annotations(tmp_path / "ann", SyntheticConfig(n_videos=16))
    store = build_store(tmp_path / "store.zarr", classes, segments, teachers=(), features=(("feat", 16, "float16"),))
    rng = np.random.default_rng(0)
    onehot = np.eye(classes.num_actions, dtype=np.float32)[segments.action]
    logits = {n: (onehot * s + rng.normal(size=onehot.shape) * 2).astype(np.float32)
              for n, s in (("a", 3.0), ("b", 1.0), ("c", 2.0))}
    for n, z in logits.items():
        store.write_predictions(n, segments.uid, z, kind="student" if n == "c" else "teacher", topk=10 if n == "a" else 20,
                                lse_temperatures=(1.0, 10.0) if n == "a" else (2.0,))
    return SimpleNamespace(store=Store.open(tmp_path / "store.zarr"), path=tmp_path / "store.zarr", seg=segments,
                           classes=classes, logits=logits, tmp=tmp_path)


def stored_logits(store, name):
    """[N, A] float64 stored logits in segment-table order."""
    g = store.group(name)
    return np.asarray(g.logits, np.float64)[g.row_of_segment]


def test_ensemble_is_the_weighted_probability_mixture(es):
    g = write_ensemble(es.store, ["a", "b", "c"], "e", weights=[2, 1, 1])
    # independently: torch softmax of the members' stored (fp16) logits, mixed with weights 1/2, 1/4, 1/4
    probs = sum(w * torch.softmax(torch.from_numpy(stored_logits(es.store, n)), -1)
                for n, w in (("a", 0.5), ("b", 0.25), ("c", 0.25)))
    ens = torch.from_numpy(stored_logits(es.store, "e"))
    torch.testing.assert_close(ens, probs.log(), rtol=1e-3, atol=1e-3)  # log p, rounded to the stored fp16
    torch.testing.assert_close(ens.exp().sum(-1), torch.ones(len(ens), dtype=torch.float64), rtol=2e-3, atol=0)
    assert g.kind == "teacher" and g.topk == 20 and g.lse_temperatures == [1.0, 2.0, 10.0]
    assert g.config["ensemble"] == {"members": ["a", "b", "c"], "weights": [0.5, 0.25, 0.25], "average": "probabilities"}
    assert g.features is None
    # its own top-K and log-sum-exps, derived from its logits
    top = np.argsort(-np.asarray(g.logits, np.float32), axis=1, kind="stable")[:, :1]
    np.testing.assert_array_equal(np.asarray(g.topk_indices)[:, :1], top)
    np.testing.assert_allclose(np.asarray(g.lse)[:, 0], 0.0, atol=2e-3)  # log sum p = 0 at T = 1
    # the mixture is not the logit average
    logit_avg = torch.softmax(sum(w * torch.from_numpy(stored_logits(es.store, n))
                                  for n, w in (("a", 0.5), ("b", 0.25), ("c", 0.25))), -1)
    assert not torch.allclose(torch.softmax(ens, -1), logit_avg, atol=1e-2)


def test_equal_weights_and_kind(es):
    g = write_ensemble(es.store, ["a", "b"], "e")
    assert g.config["ensemble"]["weights"] == [0.5, 0.5] and g.kind == "teacher"
    assert write_ensemble(es.store, ["a", "c"], "mixed").kind == "teacher"
    es.store.write_predictions("c2", es.seg.uid, es.logits["b"], kind="student")
    assert write_ensemble(es.store, ["c", "c2"], "students").kind == "student"


def test_refusals(es, tmp_path):
    for members, weights, match in ((["a"], None, "at least two"), (["a", "a"], None, "given twice"),
                                    (["a", "b"], [1], "2 positive finite weights"),
                                    (["a", "b"], [1, -1], "positive"), (["a", "b"], [1, float("nan")], "finite")):
        with pytest.raises(ConfigError, match=match):
            write_ensemble(es.store, members, "e", weights=weights)
    with pytest.raises(MissingError, match="no predictions named 'zz'"):
        write_ensemble(es.store, ["a", "zz"], "e")
    # other segments: a group predicting fewer UIDs
    rows = es.seg.rows_in("training1")
    es.store.write_predictions("part", es.seg.uid[rows], es.logits["a"][rows])
    with pytest.raises(DataError, match=r"not the same segments \(UID \d+ is only in 'a'\)"):
        write_ensemble(es.store, ["a", "part"], "e")
    # a group made for another store's segments, and one over another class set
    _, classes, segments = synthetic_annotations(tmp_path / "ann2", SyntheticConfig(n_videos=8, seed=9))
    other = Store.create(tmp_path / "other.zarr", classes, segments)
    other.write_predictions("x", segments.uid, np.zeros((len(segments), classes.num_actions), np.float32))
    shutil.copytree(tmp_path / "other.zarr" / "teacher" / "x", es.path / "teacher" / "x")
    with pytest.raises(StoreFormatError, match="made for other segments"):
        write_ensemble(Store.open(es.path), ["a", "x"], "e")
    wide = Store.open(es.path)
    z = np.zeros((len(es.seg), es.classes.num_actions), np.float32)
    wide.write_predictions("w", es.seg.uid, z)
    attrs = json.loads((es.path / "teacher" / "w" / "zarr.json").read_text())
    attrs["attributes"]["num_classes"] += 1
    (es.path / "teacher" / "w" / "zarr.json").write_text(json.dumps(attrs))
    with pytest.raises(ConfigError, match=rf"teacher/w: {es.classes.num_actions + 1} classes"):
        write_ensemble(Store.open(es.path), ["a", "w"], "e")
    assert "e" not in Store.open(es.path).groups()  # nothing written by a refused call
    write_ensemble(es.store, ["a", "b"], "e")
    with pytest.raises(Exception, match="exist"):
        write_ensemble(es.store, ["a", "b"], "e")
    write_ensemble(es.store, ["a", "c"], "e", overwrite=True)


def test_ensemble_works_as_any_group(es):
    write_ensemble(es.store, ["a", "b", "c"], "e")
    m = evaluate_group(es.store, "e", "validation1")
    assert m["coverage"] == 100.0
    names = [r["name"] for r in metrics_table(es.store, "validation1")]
    assert "e" in names
    r = es.store.group("e").predict(int(es.seg.uid[0]), k=3)
    assert r["present"] and len(r["top"]) == 3 and abs(sum(t["prob"] for t in r["top"])) <= 1 + 1e-6


@pytest.mark.parametrize("mode", ["full", "topk", "topk_lse"])
def test_ensemble_as_a_kd_teacher(es, mode):
    from trainers.student.config import preset
    from trainers.student.train import read_log, train_student

    write_ensemble(es.store, ["a", "b"], "e")
    cfg = preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, epochs=1, batch_size=16, optimizer="adam",
                 lr=1e-3, distill_mode=mode, topk=10, temperature=2.0)
    train_student(Store.open(es.path), "feat", es.tmp / f"run-{mode}", cfg, teacher="e", eval_split=None, progress=False)
    log = read_log(es.tmp / f"run-{mode}")
    assert log[0]["train_distill"] > 0
    with pytest.raises(MissingError, match="teacher/e: stores no features"):
        train_student(Store.open(es.path), "feat", es.tmp / "feat-run", preset("egtea", distill_feat=1.0), teacher="e", progress=False)


def test_cli_ensemble_evaluate_query(es):
    runner = CliRunner()
    r = runner.invoke(app, ["ensemble", str(es.path), "-p", "a", "-p", "b", "-p", "c", "--weights", "2,1,1",
                            "--name", "e"])
    assert r.exit_code == 0, r.output
    assert "probability average of a 0.500, b 0.250, c 0.250" in " ".join(r.output.split())  # rich wraps lines
    r = runner.invoke(app, ["evaluate", str(es.path), "-p", "e", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["coverage"] == 100.0
    r = runner.invoke(app, ["query", str(es.path), str(int(es.seg.uid[0])), "-t", "e", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["predictions"] == "e"
    r = runner.invoke(app, ["ensemble", str(es.path), "-p", "a", "-p", "b", "--weights", "1,x", "--name", "f"])
    assert r.exit_code != 0 and "comma-separated numbers" in r.output


# --- weights fitted on out-of-fold training rows -------------------------------------------

OOF = {"train_split": "training1", "folds": 5, "eval_splits": ["validation1"]}


def test_em_reaches_the_likelihood_maximum():
    """EM's weights against a brute-force search of the (concave) mean log-likelihood."""
    from kdstore.ensemble import em_weights, mixture_nll

    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(6), size=(3, 400))[..., 0]  # [3, n] label probabilities of three members
    p[0] *= 1.8  # one member is better
    log_p = np.log(np.clip(p, 1e-9, 1))
    grid = [np.array([a, b, 1 - a - b]) for a in np.linspace(0, 1, 101) for b in np.linspace(0, 1, 101) if a + b <= 1 + 1e-12]
    nll = [float(-np.mean(np.log(np.clip(w, 0, None) @ np.exp(log_p)))) for w in grid]  # transcription of the objective
    w = em_weights(log_p)
    assert abs(w.sum() - 1) < 1e-12 and (w >= 0).all()
    assert mixture_nll(log_p, w) <= min(nll) + 1e-9
    np.testing.assert_allclose(w, grid[int(np.argmin(nll))], atol=0.011)
    # two members, one useless: its weight goes to 0, and the fit never loses to the better member alone
    two = np.stack([log_p[0], np.full(400, np.log(1e-6))])
    w2 = em_weights(two)
    assert w2[1] < 1e-3 and mixture_nll(two, w2) <= mixture_nll(two, np.array([1.0, 0.0])) + 1e-9


def test_fitted_weights_read_only_out_of_fold_training_rows(es):
    train = es.seg.rows_in("training1")
    for n in ("a", "b"):
        es.store.write_predictions(f"{n}-oof", es.seg.uid, es.logits[n], config=OOF)
    g = write_ensemble(es.store, ["a-oof", "b-oof"], "fit", fit=True)
    fit = g.config["ensemble"]["fit"]
    assert fit["split"] == "training1" and fit["rows"] == len(es.seg.rows_in("training1", labelled=True))
    w = g.config["ensemble"]["weights"]
    assert w[0] > w[1] and abs(sum(w) - 1) < 1e-12  # member a (signal 3) is the better one
    assert fit["nll"] <= min(fit["member_nll"]) + 1e-9
    # the evaluation split's predictions do not move the weights
    noisy = es.logits["b"].copy()
    noisy[es.seg.rows_in("validation1")] = np.random.default_rng(1).normal(size=noisy[es.seg.rows_in("validation1")].shape)
    es.store.write_predictions("b-oof", es.seg.uid, noisy.astype(np.float32), config=OOF, overwrite=True)
    again = write_ensemble(es.store, ["a-oof", "b-oof"], "fit2", fit=True)
    assert again.config["ensemble"]["weights"] == w
    # ... the training rows do
    noisy[train] = es.logits["a"][train] * 2
    es.store.write_predictions("b-oof", es.seg.uid, noisy.astype(np.float32), config=OOF, overwrite=True)
    assert write_ensemble(es.store, ["a-oof", "b-oof"], "fit3", fit=True).config["ensemble"]["weights"] != w


def test_fit_refusals(es):
    es.store.write_predictions("a-oof", es.seg.uid, es.logits["a"], config=OOF)
    es.store.write_predictions("b-in", es.seg.uid, es.logits["b"], config={**OOF, "folds": 1})
    es.store.write_predictions("b-2", es.seg.uid, es.logits["b"], config={**OOF, "train_split": "validation1", "eval_splits": []})
    with pytest.raises(ConfigError, match=r"teacher/b-in holds no out-of-fold training predictions \(folds 1\)"):
        write_ensemble(es.store, ["a-oof", "b-in"], "e", fit=True)
    with pytest.raises(ConfigError, match="teacher/a holds no out-of-fold"):
        write_ensemble(es.store, ["a-oof", "a"], "e", fit=True)
    with pytest.raises(ConfigError, match="trained on different splits"):
        write_ensemble(es.store, ["a-oof", "b-2"], "e", fit=True)
    with pytest.raises(ConfigError, match="weights or fit them, not both"):
        write_ensemble(es.store, ["a-oof", "b-in"], "e", weights=[1, 1], fit=True)
    assert "e" not in Store.open(es.path).groups()


def test_cli_ensemble_fit(es):
    for n in ("a", "b"):
        es.store.write_predictions(f"{n}-oof", es.seg.uid, es.logits[n], config=OOF)
    r = CliRunner().invoke(app, ["ensemble", str(es.path), "-p", "a-oof", "-p", "b-oof", "--fit", "--name", "e"])
    assert r.exit_code == 0, r.output
    n = len(es.seg.rows_in("training1", labelled=True))
    assert f"weights fitted on {n} out-of-fold rows of training1" in " ".join(r.output.split())
