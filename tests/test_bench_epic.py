"""bench/epic.py at a tiny size (synthetic EK100-layout data), so it cannot rot."""

import csv

from bench.epic import run


def test_epic_bench_tiny(tmp_path):
    rows = run(tiny=True, out_dir=tmp_path)
    stages = ["ingest", "info", "validate", "build-teacher", "evaluate-teacher", "evaluate-ngram2", "evaluate-ngram3", "export"]
    assert [r["stage"] for r in rows] == stages
    with open(tmp_path / "epic.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["stage"] for r in saved] == stages
    for r in saved:
        assert float(r["median_s"]) > 0 and float(r["peak_rss_mib"]) > 10 and float(r["cpu_s"]) > 0
        assert float(r["load_before"]) >= 0 and float(r["load_after"]) >= 0
    by_stage = {r["stage"]: r for r in saved}
    for stage in ("evaluate-teacher", "evaluate-ngram3"):
        assert 0 <= float(by_stage[stage]["mean_top5_recall"]) <= 100 and by_stage[stage]["unseen_action_mean_top5_recall"]
    assert int(by_stage["export"]["bytes"]) > 1000
