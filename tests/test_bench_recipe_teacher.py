"""bench/recipe_teacher.py at a tiny size (synthetic data, a recipe file written from its class names)."""

import csv
import json

import pytest

from bench.recipe_teacher import run


@pytest.mark.slow
def test_recipe_teacher_bench_tiny(tmp_path):
    rows = run(variants=("scratch", "recipe", "scratch-lm"), seeds=(0,), tiny=True, out_dir=tmp_path / "out",
               work_dir=tmp_path / "work")
    stages = [r["stage"] for r in rows]
    assert stages == ["ingest", "corpus", "build-teacher", "evaluate", "build-teacher", "evaluate", "pretrain-lm",
                      "build-teacher", "evaluate", "evaluate-2gram", "evaluate-3gram"]
    with open(tmp_path / "out" / "recipe_teacher.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["stage"] for r in saved] == stages
    for r in saved:
        assert float(r["median_s"]) > 0 and float(r["cpu_s"]) > 0 and float(r["peak_rss_mib"]) > 10
        if r["stage"].startswith("evaluate"):
            assert 0 <= float(r["top1"]) <= float(r["top5"]) <= 100
    assert (tmp_path / "work" / "recipes.txt").read_text().count("<v>") > 10
    recipe_build = json.loads(saved[4]["config"])["args"]
    assert "--corpus" in recipe_build and "--init-from" in json.loads(saved[7]["config"])["args"]
