"""``evaluate --baseline ngram --split validationN`` fits on ``trainingN``, not on the store's first fold."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from cli import app
from kdstore.ingest import ingest
from kdstore.synthetic import SyntheticConfig, generate_annotations
from trainers.teacher.evaluate import evaluate_ngram


def test_ngram_fits_the_fold_of_the_split(tmp_path):
    d = generate_annotations(tmp_path / "ann", SyntheticConfig(n_videos=12))
    shutil.copy(d / "validation1.csv", d / "training2.csv")  # fold 2 swaps fold 1's halves:
    shutil.copy(d / "training1.csv", d / "validation2.csv")  # training1 holds validation2's segments
    s = ingest(d, tmp_path / "s.zarr", dataset="egtea")
    default = evaluate_ngram(s, split="validation2")
    assert default == evaluate_ngram(s, "training2", "validation2")
    assert default != evaluate_ngram(s, "training1", "validation2")
    res = CliRunner().invoke(app, ["evaluate", str(s.path), "--baseline", "ngram", "--split", "validation2", "--json"])
    assert res.exit_code == 0 and '"top1": ' + str(default["top1"]) in res.stdout


def test_out_of_fold_ngram_is_each_fold_fitted_without_its_videos(tmp_path):
    """``--folds``: each training row's scores are those of the n-gram fitted on the other folds'
    videos (built here through ngram_baseline on a split of those videos alone); evaluation rows
    keep the full n-gram's."""
    import dataclasses

    import numpy as np
    import pytest

    from kdstore.calibration import fit_rows
    from kdstore.errors import ConfigError
    from kdstore.predictions import present_logits
    from kdstore.store import Store
    from trainers.teacher.folds import assign_folds
    from trainers.teacher.ngram import ngram_baseline

    d = generate_annotations(tmp_path / "ann", SyntheticConfig(n_videos=12))
    s = ingest(d, tmp_path / "s.zarr", dataset="egtea")
    seg, A = s.segments, s.classes.num_actions
    m = evaluate_ngram(s, "training1", "validation1", order=2, write="oof", folds=3, seed=4)
    g = Store.open(s.path).group("oof")
    train, val = seg.rows_in("training1", labelled=True), seg.rows_in("validation1", labelled=True)
    folds = assign_folds(seg.video[train], 3, 4)
    stored, rows = present_logits(g, train)
    assert np.array_equal(rows, train)
    for k in range(3):
        keep = np.zeros(len(seg.uid), bool)
        keep[train[folds != k]] = True
        seg_k = dataclasses.replace(seg, split_mask=np.column_stack([seg.split_mask, keep]), splits=[*seg.splits, "fit"],
                                    _index={})
        expect = ngram_baseline(seg_k, A, "fit", train[folds == k], 2, split="training1")
        np.testing.assert_allclose(stored[folds == k], np.log(expect + 1e-12), rtol=0, atol=1e-12)
    np.testing.assert_allclose(present_logits(g, val)[0], np.log(ngram_baseline(seg, A, "training1", val, 2, split="validation1")
                                                                  + 1e-12), rtol=0, atol=1e-12)
    assert m == g.metrics["validation1"] and "training1 (out-of-fold)" in g.metrics
    assert np.array_equal(fit_rows(s, g)[0], train)  # read as a K-fold teacher's training rows
    for bad in ({"folds": 1, "write": "x"}, {"folds": 3}):
        with pytest.raises(ConfigError, match="--folds >= 2 and --write NAME"):
            evaluate_ngram(s, "training1", "validation1", **bad)
