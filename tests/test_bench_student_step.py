"""bench/student_step.py in its tiny configuration: rows, CSV, and the same losses on every data path."""

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

    variants = ("host", "resident", "memory", "memory+compiled", "resident+compiled")
    rows = run(tiny=True, device="cpu", out_dir=tmp_path, steps=6, variants=variants, backend="aot_eager")
    assert [r["variant"] for r in rows] == list(variants)
    rate = {r["variant"]: float(r["samples_per_s"]) for r in rows}
    assert all(v > 0 for v in rate.values())
    for r in rows:
        memory = "memory+compiled" if r["variant"].endswith("+compiled") else "memory"
        assert float(r["ratio"]) == pytest.approx(rate[r["variant"]] / rate[memory], rel=1e-4)
        assert float(r["gain"]) == pytest.approx(rate[r["variant"]] / rate["host"], rel=1e-4)
        # the variants of a step train the same model on the same batches: identical losses on CPU
        assert float(r["max_loss_diff"]) == 0.0
        cfg = json.loads(r["config"])
        assert cfg["tiny"] and cfg["device"] == "cpu" and cfg["steps"] == 6 and cfg["variant"] == r["variant"]
        assert cfg["dim"] == 32 and cfg["dtype"] == "float16" and cfg["preset"] == "egtea"
        assert cfg["compile"] == ("reduce-overhead" if "+" in r["variant"] else "off")
        assert float(r["seconds"]) > 0 and float(r["median_step_s"]) > 0
    with open(tmp_path / "student_step.csv") as f:
        saved = list(csv.DictReader(f))
    assert [s["variant"] for s in saved] == list(variants)
    assert saved[0]["samples_per_s"] == rows[0]["samples_per_s"]


def test_sweep_pads_the_classes_of_ek55(tmp_path):
    from bench.student_step import sweep

    rows = sweep(presets=("ek55",), batch_sizes=(8, 16), tiny=True, device="cpu", out_dir=tmp_path, steps=2,
                 variants=("resident", "memory"))
    configs = [json.loads(r["config"]) for r in rows]
    assert [(c["batch_size"], c["variant"]) for c in configs] == [(8, "resident"), (8, "memory"), (16, "resident"),
                                                                 (16, "memory")]
    assert all(c["num_actions"] == 2513 and c["distill_mode"] == "topk" for c in configs)
    assert all(float(r["max_loss_diff"]) == 0.0 and r["gain"] == "" for r in rows)


def test_runs_as_a_script(tmp_path):
    p = subprocess.run([sys.executable, "bench/student_step.py", "--tiny", "--steps", "2", "--device", "cpu",
                        "--variants", "host,resident,memory", "--out-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ratio to memory" in p.stdout and "samples/s" in p.stdout
    assert (tmp_path / "student_step.csv").is_file()
