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
