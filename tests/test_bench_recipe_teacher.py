"""bench/recipe_teacher.py at a tiny size (synthetic data, a recipe file written from its class names)."""

import csv
import json

import pytest

from bench.recipe_teacher import METRICS, run, summary


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
    table = summary(rows, METRICS).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| scratch", "| recipe", "| scratch-lm", "| 2gram", "| 3gram"]
    assert table[2].split(" | ")[2] == f"{float(saved[3]['top1']):.2f}"


def test_summary_is_the_mean_and_half_range_over_seeds():
    rows = [{"stage": "evaluate", "config": json.dumps({"args": ["evaluate", "S", "-p", f"recipe_s{s}"]}), "top1": v}
            for s, v in ((0, 20.0), (1, 23.0))]
    assert summary(rows, ("top1",)).splitlines()[2] == "| recipe | 2 | 21.50 ± 1.50 |"
