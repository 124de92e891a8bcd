"""bench/run_all.py gathers rows of several benchmarks into results.json and a markdown table."""

import json

from bench.run_all import run_all


def test_run_all_tiny(tmp_path):
    res = run_all(tiny=True, skip=("student_step", "video_features", "teacher_build"), out_dir=tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["benches"]) == {"store_read", "topk_kl"}
    for name, bench in res["benches"].items():
        assert bench["rows"] and not any("error" in r for r in bench["rows"]), name
    md = (tmp_path / "results.md").read_text()
    assert "### store_read" in md and "### topk_kl" in md and "median_s" in md
