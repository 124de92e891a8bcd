"""bench/teacher_mixture.py at a tiny size: a real 2-fold tiny teacher, out-of-fold n-grams, fitted mixtures."""

import csv

import pytest

from bench.teacher_mixture import main


@pytest.mark.slow
def test_teacher_mixture_bench_tiny(tmp_path, capsys):
    main(["--tiny", "--out-dir", str(tmp_path)])
    with open(tmp_path / "teacher_mixture.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["teacher", "ngram2", "ngram3", "mix2", "mix23"]
    for name in ("mix2", "mix23"):
        w = [float(x) for x in rows[name]["weights"].split()]
        assert len(w) == (2 if name == "mix2" else 3) and abs(sum(w) - 1) < 1e-3 and float(rows[name]["oof_nll"]) > 0
    for r in rows.values():
        assert 0 <= float(r["top1"]) <= float(r["top5"]) <= 100
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| group | top1 |") and "| mix23 |" in out
