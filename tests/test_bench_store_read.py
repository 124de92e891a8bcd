"""The store-read benchmark runs (tiny) and writes well-formed rows."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from bench import store_read

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"ceiling", "per_sample_lmdb"} | {f"store_{b}{s}" for b in ("zarr", "hdf5") for s in ("", "_out", "_window")}


def test_tiny_run(tmp_path):
    rows = store_read.run(tiny=True, out_dir=tmp_path, tmp_dir=tmp_path)
    assert len(rows) == 2 * len(PATHS)
    seen = set()
    for r in rows:
        cfg = json.loads(r["config"])
        assert cfg["tiny"] is True and cfg["dim"] == 64 and cfg["frames"] == 5000 and cfg["batch"] == 256
        seen.add((cfg["dtype"], cfg["path"]))
        p20, med, p80 = (float(r[k]) for k in ("p20_s", "median_s", "p80_s"))
        assert 0 < p20 <= med <= p80
        assert float(r["gbps"]) > 0 and float(r["vs_ceiling"]) > 0 and float(r["vs_per_sample"]) > 0
        if cfg["path"] == "ceiling":
            assert float(r["vs_ceiling"]) == 1.0
    assert seen == {(d, p) for d in ("float16", "float32") for p in PATHS}
    with open(tmp_path / "store_read.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and json.loads(written[0]["machine"])["cores"] >= 1
    assert not list(tmp_path.glob("kdstore-bench-*"))  # the temporary stores are gone
    assert "per_sample_lmdb" in store_read.report(rows)


def test_cli_help():
    out = subprocess.run([sys.executable, "bench/store_read.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "--tiny" in out.stdout
