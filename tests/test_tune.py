"""tune-kd: the grid on held-out training videos, its choice, the final run, resume and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import ROOT, build_store, synthetic_annotations
from kdstore.errors import ConfigError, KDStoreError
from kdstore.faults import CRASH_ENV, EXIT_CODE
from kdstore.features import FeatureSet
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig
from kdstore.predictions import TeacherTargets
from trainers.student.data import StudentData
from trainers.student.tune import NO_KD, TuneConfig, make_cells, parse_grid, run_grid, setup, split_videos, tune_kd

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"num_frames": 4, "n_layer": 1, "n_head": 2, "inter_dim": 32, "epochs": 2, "batch_size": 16,
         "dropout": 0.1, "lr": 1e-2}
GRID = ["distill_reduction=rows", "distill=0.5,2", "temperature=2"]


@pytest.fixture(scope="module")
def tstore(tmp_path_factory) -> Path:
    """A store with frame features and an out-of-fold-style teacher on training1 and validation1."""
    root = tmp_path_factory.mktemp("tune")
    _, classes, segments = synthetic_annotations(root / "ann", SyntheticConfig(n_videos=24, n_recipes=2, seed=4))
    path = root / "store.zarr"
    store = build_store(path, classes, segments, features=(("feat", 16, "float16"),), teachers=())
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(segments), classes.num_actions)).astype(np.float32)
    logits[np.arange(len(segments)), segments.action] += 3.0
    store.write_predictions("teacher", segments.uid, logits, topk=10, kind="teacher",
                            config={"train_split": "training1", "folds": 3})
    store.write_predictions("insample", segments.uid, logits, topk=10, kind="teacher",
                            config={"train_split": "training1", "folds": 1})
    return path


def config(**kw) -> TuneConfig:
    return TuneConfig(**{"features": "feat", "teacher": "teacher", "grid": parse_grid(GRID), "overrides": SMALL,
                         "holdout": 0.25, "devices": ["cpu"], **kw})


def test_grid_reads_no_evaluation_row_and_chooses_on_held_out_videos(tstore, tmp_path, monkeypatch):
    store = Store.open(tstore)
    plan = setup(store, config())
    seg = store.segments
    assert [c.name for c in plan.cells] == [NO_KD, "distill_reduction=rows distill=0.5 temperature=2.0",
                                            "distill_reduction=rows distill=2.0 temperature=2.0"]
    train_videos = {seg.videos[v] for v in seg.video[seg.rows_in("training1")]}
    assert set(plan.fit_videos) | set(plan.held_videos) == train_videos and not set(plan.fit_videos) & set(plan.held_videos)
    assert len(plan.held_videos) == round(0.25 * len(train_videos))
    assert split_videos(store, "training1", 0.25, 0) == (plan.fit_videos, plan.held_videos)  # fixed by the seed

    frames, teacher_rows = [], []
    real_gather, real_targets = FeatureSet.gather, TeacherTargets.gather
    monkeypatch.setattr(FeatureSet, "gather", lambda self, idx, out=None: frames.append(np.array(idx)) or real_gather(self, idx, out))
    monkeypatch.setattr(TeacherTargets, "gather", lambda self, rows: teacher_rows.append(np.array(rows)) or real_targets(self, rows))
    table = run_grid(plan, tmp_path / "t")

    # the data actually read: frames of training windows only, teacher targets of fit rows only
    read = np.unique(np.concatenate([f.ravel() for f in frames]))
    windows = lambda split, videos=None: np.unique(StudentData(store, "feat", split, plan.cells[0].config, videos=videos).frame_idx)  # noqa: E731
    assert not np.isin(read, windows("validation1")).any()
    assert np.isin(read, windows("training1")).all()
    assert np.isin(windows("training1", plan.held_videos), read).all()  # the hold-out is scored
    fit_rows = StudentData(store, "feat", "training1", plan.cells[0].config, videos=plan.fit_videos).rows
    assert np.isin(np.concatenate(teacher_rows), fit_rows).all()
    assert [r["cell"] for r in table] == [c.name for c in plan.cells]
    held_rows = len(StudentData(store, "feat", "training1", plan.cells[0].config, videos=plan.held_videos))
    assert all(r["held_out_rows"] == held_rows for r in table)
    saved = json.loads((tmp_path / "t" / "grid.json").read_text())
    assert saved["cells"] == table and saved["metric"] == "mean_top1_recall"
    assert (tmp_path / "t" / "grid.csv").read_text().count("\n") == len(table) + 1


def test_tune_kd_end_to_end_and_the_cli(tstore, tmp_path):
    r = CliRunner().invoke(app, ["tune-kd", str(tstore), "-f", "feat", "-t", "teacher", "--out", str(tmp_path / "cli"),
                                 *sum((["--grid", g] for g in GRID), []), *sum((["--set", f"{k}={v}"] for k, v in SMALL.items()), []),
                                 "--holdout", "0.25", "--name", "tuned"])
    assert r.exit_code == 0, r.output
    chosen = json.loads((tmp_path / "cli" / "chosen.json").read_text())
    grid = json.loads((tmp_path / "cli" / "grid.json").read_text())["cells"]
    assert chosen["held_out"] == max(grid, key=lambda c: c["mean_top1_recall"])
    final = json.loads((tmp_path / "cli" / "final.json").read_text())
    assert final["cell"] == chosen["cell"] and final["eval_split"] == "validation1"
    group = Store.open(tstore).group("tuned")
    assert group.config["run_dir"] == str(tmp_path / "cli" / "final")
    assert group.metrics["validation1"]["mean_top1_recall"] == final["metrics"]["mean_top1_recall"]
    # the report finds the grid through the final run's directory and draws it beside the choice
    r = CliRunner().invoke(app, ["report", str(tstore), "--out", str(tmp_path / "rep"), "--teacher", "teacher"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "kd_grid.png" in page and f"Chosen: <b>{chosen['cell']}</b>" in page and "evaluated once on validation1" in page
    assert (tmp_path / "rep" / "kd_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_grid_resumes_without_retraining_finished_cells(tstore, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "cli.py"), "tune-kd", str(tstore), "-f", "feat", "-t", "teacher", "--out", str(out),
           *sum((["--grid", g] for g in GRID), []), *sum((["--set", f"{k}={v}"] for k, v in SMALL.items()), []),
           "--holdout", "0.25"]
    # killed after the first epoch of the second cell (each cell checkpoints every epoch)
    p = subprocess.run(cmd, env={**os.environ, CRASH_ENV: f"student.epoch:{SMALL['epochs'] + 1}"}, cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == EXIT_CODE, p.stderr
    plan = setup(Store.open(tstore), config())
    first, second = (out / "cells" / c.id for c in plan.cells[:2])
    assert (first / "result.json").exists() and not (second / "result.json").exists()
    assert len((second / "log.jsonl").read_text().splitlines()) == 1
    done = (first / "result.json").read_text(), (first / "last.safetensors").stat().st_mtime_ns
    resumed = run_grid(plan, out)
    assert ((first / "result.json").read_text(), (first / "last.safetensors").stat().st_mtime_ns) == done
    assert [json.loads(x)["epoch"] for x in (second / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert resumed == run_grid(plan, tmp_path / "uninterrupted")  # the trainer's exact resume


def test_cells_spread_over_processes_give_the_same_table(tstore, tmp_path):
    store = Store.open(tstore)
    plan = setup(store, config(overrides={**SMALL, "epochs": 1}))
    alone = run_grid(plan, tmp_path / "one")
    plan.cfg.devices = ["cpu", "cpu"]  # two spawned cell processes, one torch thread each here
    assert run_grid(plan, tmp_path / "two") == alone


@pytest.mark.parametrize("grid,match", [
    ([], "grid: empty"),
    (["distill="], "has no values"),
    (["distil=1,2"], "distil: unknown option"),
    (["distill_mode=bogus"], "grid cell 'distill_mode=bogus': .*distill_mode"),
    (["distill=abc"], "distill: "),
    (["distill=0"], "no cell distils"),
])
def test_refuses_an_empty_grid_or_an_unknown_setting_in_one_line(tstore, tmp_path, grid, match):
    r = CliRunner().invoke(app, ["tune-kd", str(tstore), "-f", "feat", "-t", "teacher", "--out", str(tmp_path / "o"),
                                 *sum((["--grid", g] for g in grid), [])])
    assert isinstance(r.exception, ConfigError), r.output
    assert len(str(r.exception).splitlines()) == 1
    with pytest.raises(ConfigError, match=match):
        make_cells(parse_grid(grid), "egtea", {})
    assert not (tmp_path / "o").exists()  # nothing written


def test_refuses_an_in_sample_teacher_and_an_unknown_metric(tstore, tmp_path):
    store = Store.open(tstore)
    with pytest.raises(ConfigError, match="teacher/insample: its 'training1' predictions are not out-of-fold"):
        tune_kd(store, config(teacher="insample"), tmp_path / "o")
    with pytest.raises(ConfigError, match="metric: 'top3'"):
        setup(store, config(metric="top3"))
    with pytest.raises(ConfigError, match="holdout"):
        setup(store, config(holdout=1.0))
    assert not (tmp_path / "o").exists()


def test_a_resume_with_another_hold_out_is_refused(tstore, tmp_path):
    store = Store.open(tstore)
    out = tmp_path / "o"
    plan = setup(store, config(grid=parse_grid(["distill=1"]), overrides={**SMALL, "epochs": 1}))
    run_grid(plan, out)
    with pytest.raises(KDStoreError, match="other settings \\(held_videos: saved"):
        run_grid(setup(store, config(grid=parse_grid(["distill=1"]), overrides={**SMALL, "epochs": 1}, holdout_seed=1)), out)


def test_a_moved_store_and_tuning_directory_resume(tstore, tmp_path):
    import shutil

    shutil.copytree(tstore, tmp_path / "a" / "store.zarr")
    cfg = config(grid=parse_grid(["distill=1"]), overrides={**SMALL, "epochs": 1})
    first = run_grid(setup(Store.open(tmp_path / "a" / "store.zarr"), cfg), tmp_path / "a" / "tune")
    shutil.move(tmp_path / "a", tmp_path / "b")
    logs = sorted((tmp_path / "b" / "tune" / "cells").glob("*/log.jsonl"))
    before = [p.stat().st_mtime_ns for p in logs]
    assert run_grid(setup(Store.open(tmp_path / "b" / "store.zarr"), cfg), tmp_path / "b" / "tune") == first
    assert [p.stat().st_mtime_ns for p in logs] == before  # nothing retrained
