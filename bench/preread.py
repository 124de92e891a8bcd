"""Cold first epochs with and without ``preread`` on the disk as it is configured.

A windows store (``import-features --windows``, AVT's EK100 window) is built from an
EK100-shaped LMDB as in ``bench/epic_scale.py``; then, ``--trials`` times, the store is
evicted from the page cache and one shuffled epoch of student batches is read: plain
(``cold``: each gather faults its pages in) and after ``FeatureSet.preread`` (timed with the
epoch, ``cold-preread``), beside the file's single-stream sequential read. How much a
random gather costs depends on the block device's read-ahead, which each row records
(``read_ahead_kb``; the kernel's default is 128 KiB) and on its IOPS: ``--cgroup NAME`` runs
the epochs inside an existing cgroup-v1 blkio group, e.g. one throttled to a slow disk's
400 reads/s and 200 MB/s. Rows go to ``bench/results/preread.csv``.

    python bench/preread.py --tmp-dir DIR                  # 60 EK100 videos, every 30 fps frame
    echo 128 > /sys/block/vda/queue/read_ahead_kb          # then again: the kernel's default
    mkdir /sys/fs/cgroup/blkio/slow && echo "254:0 400" > /sys/fs/cgroup/blkio/slow/blkio.throttle.read_iops_device \\
      && echo "254:0 200000000" > /sys/fs/cgroup/blkio/slow/blkio.throttle.read_bps_device
    python bench/preread.py --tmp-dir DIR --cgroup slow    # the slow disk
    python bench/preread.py --tiny                         # 6 synthetic videos, D = 32: seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from bench import epic_scale as es  # noqa: E402
from bench.common import append_row, read_ahead_kb  # noqa: E402

BENCH = "preread"


def run(tiny: bool = False, tmp_dir: str | Path | None = None, out_dir: str | Path | None = None, trials: int = 3,
        videos: int = 60, cgroup: str | None = None) -> list[dict]:
    """Build the windows store, then ``trials`` pairs of cold epochs; returns the rows appended."""
    dim = 32 if tiny else 1024
    real = not tiny and (es.EK100 / "training.csv").is_file()
    names, lengths, segs = es.ek100_table(videos) if real else es.synthetic_table(6 if tiny else videos)
    rows = []
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="kdstore-preread-") as d:
        d = Path(d)
        lmdb, store = d / "rgb.lmdb", d / "ek.zarr"
        es.in_child("lmdb", {"path": str(lmdb), "videos": names, "lengths": lengths.tolist(), "step": 1, "dim": dim, "seed": 0})
        es.create_store(store, names, segs)
        es.in_child("import", {"store": str(store), "lmdb": str(lmdb), "name": "windows", "options": es.VARIANTS["windows"]})
        shutil.rmtree(lmdb)
        if cgroup:  # the epochs' children inherit the group
            Path(f"/sys/fs/cgroup/blkio/{cgroup}/tasks").write_text(str(os.getpid()))
        f = es.features_file(store, "windows")
        base = {"source": "ek100" if real else "synthetic", "videos": len(names), "dim": dim, "tiny": tiny,
                "file_bytes": f.stat().st_size, "read_ahead_kb": read_ahead_kb(f), "cgroup": cgroup,
                "load": os.getloadavg()[0]}
        for trial in range(trials):
            es.evict(store)
            seq = es.sequential_read(f)
            rows.append(append_row(BENCH, {**base, "stage": "sequential", "trial": trial},
                                   {"seconds": seq, "gb_per_s": f.stat().st_size / 1e9 / seq}, out_dir=out_dir))
            for cache in ("cold", "cold-preread"):
                es.evict(store)
                r = es.in_child("epoch", {"store": str(store), "name": "windows", "passes": ["cold"],
                                          "preread": cache == "cold-preread"})["cold"]
                rows.append(append_row(BENCH, {**base, "stage": "epoch", "cache": cache, "trial": trial},
                                       {"seconds": r["seconds"], "preread_s": r["preread_s"], "samples": r["samples"],
                                        "samples_per_s": r["samples"] / r["seconds"]}, out_dir=out_dir))
    return rows


def summary(rows: list[dict]) -> str:
    """One line per stage: medians over the trials."""
    import json

    c0 = json.loads(rows[0]["config"])
    out = [f"{c0['source']}: {c0['videos']} videos, windows file {c0['file_bytes'] / 1e9:.2f} GB, "
           f"read_ahead_kb {c0['read_ahead_kb']}, cgroup {c0['cgroup']}, load {c0['load']:.1f}"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        c = json.loads(r["config"])
        groups.setdefault(c.get("cache", c["stage"]), []).append(r)
    for name, rs in groups.items():
        secs = [float(r["seconds"]) for r in rs]
        extra = f", preread {statistics.median(float(r['preread_s']) for r in rs):.2f} s" if name == "cold-preread" else ""
        rate = f"{statistics.median(float(r['gb_per_s']) for r in rs):.2f} GB/s" if name == "sequential" else \
            f"{statistics.median(float(r['samples_per_s']) for r in rs):.0f} samples/s"
        out.append(f"{name:14} median {statistics.median(secs):.2f} s (of {', '.join(f'{s:.2f}' for s in secs)}), {rate}{extra}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="6 synthetic videos, D=32 (seconds)")
    ap.add_argument("--videos", type=int, default=60, help="the first N EK100 videos")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cgroup", default=None, help="an existing /sys/fs/cgroup/blkio group to run the epochs in")
    ap.add_argument("--tmp-dir", default=None, help="where the LMDB and the store are written")
    ap.add_argument("--out-dir", default=None, help="where preread.csv goes (default bench/results)")
    args = ap.parse_args(argv)
    rows = run(tiny=args.tiny, tmp_dir=args.tmp_dir, out_dir=args.out_dir, trials=args.trials, videos=args.videos,
               cgroup=args.cgroup)
    print(summary(rows))


if __name__ == "__main__":
    main()
