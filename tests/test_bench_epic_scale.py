"""bench/epic_scale.py in its tiny configuration: every stage runs, rows are well formed, the
windows stores give the full store's frames and the per-frame LMDB reader reads them too."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np

from bench import epic_scale
from conftest import ROOT


def test_tiny_run(tmp_path):
    rows = epic_scale.run(tiny=True, out_dir=tmp_path, tmp_dir=tmp_path)
    by = {}
    for r in rows:
        c = json.loads(r["config"])
        assert c["tiny"] and c["dim"] == 32 and c["source"] == "synthetic" and c["videos"] == 6
        key = (c["stage"], c.get("variant") or c.get("reader") or c.get("size"), c.get("cache") or c.get("size"), c.get("backend"))
        assert key not in by, key
        by[key] = r
    # two LMDB sizes, imported on both backends; the full and subsampled imports
    assert {k for k in by if k[0] == "import"} == {
        ("import", "full", "quarter", "zarr"), ("import", "full", "quarter", "h5"), ("import", "full", "all", "h5"),
        ("import", "full", "all", "zarr"), ("import", "windows", "all", "zarr"), ("import", "windows-range", "all", "zarr"),
        ("import", "fps1", "all", "zarr")}
    imports = {k[1]: by[k] for k in by if k[0] == "import" and k[2] == "all" and k[3] == "zarr"}
    assert float(imports["full"]["kept_fraction"]) == 1.0
    kept = {v: float(r["kept_fraction"]) for v, r in imports.items()}
    assert 0 < kept["fps1"] < kept["windows"] < kept["windows-range"] < 1
    for r in imports.values():
        assert float(r["staging_peak_rss_mib"]) > 0 and int(r["store_bytes"]) > 0 and float(r["mb_written_per_s"]) > 0
    # epochs from every store, cold and warm, against the sequential ceiling of the same file
    for v in ("full", "windows", "windows-range", "fps1"):
        for cache in ("cold", "warm", "cold-willneed", "cold-preread"):
            r = by[("epoch", v, cache, None)]
            assert r["samples"] == by[("epoch", "full", "cold", None)]["samples"]
            assert float(r["samples_per_s"]) > 0
        c = by[("ceiling", v, None, None)]
        assert float(c["gb_per_s"]) > 0 and 0 <= float(c["resident_after_evict"]) <= float(c["resident_after_read"]) <= 1
    for v in ("windows", "windows-range"):
        assert by[("epoch", v, "cold", None)]["same_frames_as_full"] is True
    # the per-sample LMDB readers on the same samples; the per-frame one reads the store's frames
    assert float(by[("reader", "per_frame", "cold", None)]["same_frames_as_store"]) == 1.0
    assert float(by[("reader", "avt_normal", "cold", None)]["same_frames_as_store"]) > 0.5
    assert int(by[("reader", "per_frame", "cold", None)]["samples"]) == int(by[("epoch", "full", "cold", None)]["samples"])
    assert int(by[("reader", "avt_normal", "cold", None)]["samples"]) == 64  # its first batch
    with open(tmp_path / "epic_scale.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert not list(tmp_path.glob("kdstore-epic-*"))  # the LMDBs and stores are gone
    md = epic_scale.markdown(rows)
    assert "epoch" in epic_scale.report(rows) and "| epoch from |" in md and "| per_frame | epoch | cold |" in md


def test_avt_normal_reader_reads_avt_s_frames(tmp_path):
    """AVT's normal read of one sample on a full 30 fps LMDB, against its formula worked by hand."""
    from kdstore.rulstm_lmdb import write_rulstm_lmdb

    import lmdb

    numbers = np.arange(1, 901)  # 30 s at 30 fps
    feats = np.arange(900, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # frame n holds n - 1
    write_rulstm_lmdb(tmp_path / "l", [("P01_01", numbers, feats)], map_size=1 << 26)
    env = lmdb.open(str(tmp_path / "l"), readonly=True, lock=False)
    got = epic_scale.AvtNormalReader(env, 4).sample("P01_01", 20.0, None)
    # window (9 s, 19 s]: frames 271..570; every 30th from the end: 300, 330, ..., 570
    np.testing.assert_array_equal(got[:, 0], np.arange(300, 571, 30) - 1)
    early = epic_scale.AvtNormalReader(env, 4).sample("P01_01", 5.0, None)  # window (-6 s, 4 s]: frames < 1 -> frame 1
    np.testing.assert_array_equal(early[:, 0], np.r_[np.zeros(6), np.arange(30, 121, 30) - 1])
    env.close()


def test_cli_help():
    out = subprocess.run([sys.executable, "bench/epic_scale.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "--step" in out.stdout and "--tiny" in out.stdout
