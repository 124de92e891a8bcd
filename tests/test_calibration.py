"""A teacher's calibration: ECE by hand, temperature scaling recovering a known temperature,
the fit on out-of-fold training rows only, the stored temperature read back as KD targets."""

import numpy as np
import pytest
from typer.testing import CliRunner

from kdstore.calibration import calibrate, fit_rows, fit_temperature, nll, reliability
from kdstore.errors import DataError, MissingError
from kdstore.store import Store
from kdstore.predictions import TeacherTargets


def test_ece_by_hand():
    """Two classes; top-1 confidences 0.85 (right), 0.62 (wrong), 0.68 (right), 0.55 (right).
    Ten (lo, hi] bins: 0.85 in (0.8, 0.9], 0.62 and 0.68 in (0.6, 0.7], 0.55 in (0.5, 0.6]."""
    p = np.array([[0.85, 0.15], [0.38, 0.62], [0.68, 0.32], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    c = reliability(np.log(p), labels, bins=10)
    assert c["ece"] == pytest.approx(0.25 * 0.15 + 0.5 * abs(0.5 - 0.65) + 0.25 * 0.45)
    assert list(c["count"]) == [0, 0, 0, 0, 0, 1, 2, 0, 1, 0]
    assert c["accuracy"][6] == 0.5 and c["confidence"][6] == pytest.approx(0.65)
    # a temperature changes the confidences, not the predictions
    assert reliability(np.log(p), labels, bins=10, temperature=1e3)["ece"] == pytest.approx(abs(0.75 - 0.5), abs=1e-3)


def synthetic(n, A, T0, seed=0):
    """Labels drawn from softmax(z) and logits z * T0: the calibrating temperature is T0."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, A)) * 2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) < rng.random((n, 1))).sum(1).clip(max=A - 1)
    return z * T0, labels


@pytest.mark.parametrize("T0", [0.4, 1.0, 3.0])
def test_fit_recovers_a_known_temperature(T0):
    logits, labels = synthetic(20_000, 13, T0)
    T = fit_temperature(logits, labels)
    assert T == pytest.approx(T0, rel=0.05)
    # it minimises the NLL: nudging it either way costs
    assert nll(logits, labels, T) < min(nll(logits, labels, T * 1.05), nll(logits, labels, T / 1.05))
    assert reliability(logits, labels, temperature=T)["ece"] < 0.02


def test_fit_is_the_same_in_blocks(monkeypatch):
    import kdstore.calibration as cal

    logits, labels = synthetic(1000, 7, 2.0, seed=1)
    whole = fit_temperature(logits, labels)
    monkeypatch.setattr(cal, "BLOCK_ROWS", 37)
    assert fit_temperature(logits, labels) == pytest.approx(whole, rel=1e-9)


def test_fit_refuses_no_rows():
    with pytest.raises(DataError, match="no rows"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


@pytest.fixture
def store(tmp_path, synthetic_tables):
    """A teacher over every segment: its training1 rows calibrated at T = 2.5, its validation1
    rows (the evaluation split) far more overconfident, so a fit that read them would show it."""
    classes, seg = synthetic_tables
    s = Store.create(tmp_path / "s.zarr", classes, seg)
    rng = np.random.default_rng(0)
    A = classes.num_actions
    logits = rng.normal(size=(len(seg.uid), A)) * 2
    logits[np.arange(len(seg.uid)), seg.action] += 2.0  # some skill
    train, val = seg.rows_in("training1"), seg.rows_in("validation1")
    logits[train] *= 2.5
    logits[val] *= 40.0
    s.write_predictions("teacher", seg.uid, logits.astype(np.float32), topk=5, lse_temperatures=(1.0, 2.0),
                        config={"train_split": "training1", "eval_splits": ["validation1"], "folds": 5})
    return Store.open(s.path)


def test_calibrate_fits_only_out_of_fold_training_rows(store):
    seg, g = store.segments, store.group("teacher")
    rows, split = fit_rows(store, g)
    assert split == "training1" and set(rows) == set(seg.rows_in("training1", labelled=True))
    assert not set(rows) & set(seg.rows_in("validation1"))
    r = calibrate(store, "teacher", bins=10)
    logits = np.asarray(g.logits, np.float32)[g.row_of_segment[rows]]  # the stored values
    assert r["temperature"] == pytest.approx(fit_temperature(logits, seg.action[rows]), rel=1e-9)
    everything = seg.rows_in("training1") .tolist() + seg.rows_in("validation1").tolist()
    all_logits = np.asarray(g.logits, np.float32)[g.row_of_segment[everything]]
    assert abs(fit_temperature(all_logits, seg.action[everything]) - r["temperature"]) > 0.5  # it would show
    assert r["rows"] == len(rows) and r["split"] == "training1" and r["ece_after"] < r["ece_before"]
    assert r["nll_after"] <= r["nll_before"]
    # stored with the group, with a provenance record; the rest of the group is untouched
    again = Store.open(store.path).group("teacher")
    assert again.attrs["calibration"] == r and again.attrs["config"]["train_split"] == "training1"
    assert np.array_equal(np.asarray(again.logits), np.asarray(g.logits))
    assert Store.open(store.path).manifest["provenance"][-1]["action"] == "calibrate"


def test_calibrated_targets_divide_the_logits(store):
    calibrate(store, "teacher")
    g = Store.open(store.path).group("teacher")
    T = g.attrs["calibration"]["temperature"]
    rows = store.segments.rows_in("training1")[:9]
    raw = TeacherTargets(g, ("logits", "topk_values", "topk_indices", "lse"), temperature=2.0).gather(rows)
    cal = TeacherTargets(g, ("logits", "topk_values", "topk_indices", "lse"), temperature=2.0,
                         calibrated=True).gather(rows)
    np.testing.assert_allclose(cal["logits"], raw["logits"] / T, rtol=1e-6)
    np.testing.assert_allclose(cal["topk_values"], raw["topk_values"] / T, rtol=1e-6)
    assert np.array_equal(cal["topk_indices"], raw["topk_indices"])
    z = raw["logits"].astype(np.float64) / (2.0 * T)  # no stored column at 2 T: from the logits
    np.testing.assert_allclose(cal["lse"], np.log(np.exp(z).sum(1)), rtol=1e-5)


def test_calibrated_targets_need_a_fitted_temperature(store):
    with pytest.raises(MissingError, match="kdstore calibrate"):
        TeacherTargets(store.group("teacher"), ("logits",), calibrated=True)


def test_in_sample_or_unknown_training_predictions_are_refused(store, synthetic_tables):
    classes, seg = synthetic_tables
    logits = np.zeros((len(seg.uid), classes.num_actions), np.float32)
    store.write_predictions("insample", seg.uid, logits, topk=5, config={"train_split": "training1", "folds": 1})
    store.write_predictions("imported", seg.uid, logits, topk=5)
    with pytest.raises(DataError, match="in-sample"):
        calibrate(store, "insample")
    with pytest.raises(MissingError, match="no train_split"):
        calibrate(store, "imported")


def test_cli_and_report_section(store, tmp_path):
    from cli import app
    from kdstore.report import write_report

    out = CliRunner().invoke(app, ["calibrate", str(store.path), "-p", "teacher", "--bins", "10"])
    assert out.exit_code == 0, out.output
    assert "temperature" in out.output and "out-of-fold rows of training1" in out.output
    page = write_report(Store.open(store.path), tmp_path / "report").read_text()
    assert "teacher_calibration_oof.png" in page and (tmp_path / "report" / "teacher_calibration_oof.png").stat().st_size


def test_student_distils_towards_calibrated_targets(tmp_path, synthetic_tables, make_store):
    import torch

    from trainers.student.config import preset
    from trainers.student.data import StudentData

    classes, seg = synthetic_tables
    s = make_store(tmp_path / "k.zarr", classes, seg, teachers=())
    logits = np.random.default_rng(1).normal(size=(len(seg.uid), classes.num_actions)).astype(np.float32) * 5
    s.write_predictions("teacher", seg.uid, logits, topk=5, config={"train_split": "training1", "folds": 5})
    T = calibrate(s, "teacher")["temperature"]
    ids = np.arange(11)
    cfg = preset("egtea", num_frames=3, distill_mode="dkd")
    plain = StudentData(s, "feat", "training1", cfg, teacher="teacher").batch(ids)
    cal = StudentData(s, "feat", "training1", preset("egtea", num_frames=3, distill_mode="dkd", teacher_calibration=True),
                      teacher="teacher").batch(ids)
    assert T != pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(cal.teacher_logits, plain.teacher_logits / T)
