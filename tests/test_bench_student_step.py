"""bench/student_step.py in its tiny configuration: rows, CSV and the same losses for both data paths."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_rows_and_csv(tmp_path):
    from bench.student_step import run

    rows = run(tiny=True, device="cpu", out_dir=tmp_path, steps=6)
    assert [r["variant"] for r in rows] == ["store", "memory"]
    rate = {r["variant"]: float(r["samples_per_s"]) for r in rows}
    assert all(v > 0 for v in rate.values())
    for r in rows:
        assert float(r["ratio"]) == pytest.approx(rate["store"] / rate["memory"], rel=1e-4)
        # both variants train the same model on the same batches: identical losses on CPU
        assert float(r["max_loss_diff"]) == 0.0
        cfg = json.loads(r["config"])
        assert cfg["tiny"] and cfg["device"] == "cpu" and cfg["steps"] == 6 and cfg["variant"] == r["variant"]
        assert cfg["dim"] == 32 and cfg["dtype"] == "float16"
        assert float(r["wait_s"]) >= 0 and float(r["seconds"]) > 0
    with open(tmp_path / "student_step.csv") as f:
        saved = list(csv.DictReader(f))
    assert [s["variant"] for s in saved] == ["store", "memory"]
    assert saved[0]["samples_per_s"] == rows[0]["samples_per_s"]


def test_runs_as_a_script(tmp_path):
    p = subprocess.run([sys.executable, "bench/student_step.py", "--tiny", "--steps", "2", "--device", "cpu",
                        "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ratio" in p.stdout and "samples/s" in p.stdout
    assert (tmp_path / "student_step.csv").is_file()
