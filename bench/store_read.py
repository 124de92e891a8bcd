"""Batched random window gathers from a warm store vs. a RAM ceiling and a per-sample reader.

A training batch of the video student is B windows of T frames (AVT: the T feature
frames before the anticipation point). This benchmark builds a store of random features
(Zarr and HDF5; fp16 and fp32), draws batches of windows with ``FeatureSet.frames_at`` at
random times around random segments, and times three ways of reading the same bytes:

- ``ceiling``: ``arr[idx]`` on an in-RAM copy of the features (numpy copying the bytes);
- ``store_<backend>``: ``FeatureSet.gather(idx)`` from the memory-mapped store
  (``store_<backend>_out`` into a preallocated batch, ``store_<backend>_window`` with
  ``frames_at`` included);
- ``per_sample_lmdb``: the AVT/RULSTM reader: an LMDB of one value per frame under keys
  ``<video>_frame_<10-digit>.jpg``, one read transaction per sample, one ``txn.get`` and
  ``np.frombuffer`` per frame, a Python list per sample, ``np.stack`` of the frames and
  of the samples (the DataLoader's collate).

All paths are checked to return identical arrays before they are timed. Results go to
``bench/results/store_read.csv`` (one row per dtype and path) with median/p20/p80
seconds, GB/s and the ratios store/ceiling (goal >= 0.5) and store/per-sample (goal >= 20).

    python bench/store_read.py            # 200k frames, D=1024 (a few GB in a temp dir)
    python bench/store_read.py --tiny     # 5k frames, D=64: a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import append_row, peak_rss_mib, timeit  # noqa: E402
from kdstore.tables import ClassTable, SegmentTable  # noqa: E402
from kdstore.features import FeatureSet  # noqa: E402
from kdstore.store import Store  # noqa: E402

BENCH = "store_read"
FULL = dict(frames=200_000, dim=1024, videos=200, batch=256, window=10, repeat=50, per_sample_repeat=9)
TINY = dict(frames=5_000, dim=64, videos=20, batch=256, window=10, repeat=5, per_sample_repeat=3)
RATE = 1.0  # feature frames a second (AVT samples 1 fps on EGTEA)
ANNOTATION_FPS = 24.0


def make_tables(n_videos: int, frames_per_video: np.ndarray, seed: int) -> tuple[ClassTable, SegmentTable]:
    """One action, ~1 segment every 8 s of video."""
    rng = np.random.default_rng(seed)
    classes = ClassTable(["Take_cup"], ["Take"], ["cup"], np.zeros(1, np.int32), np.zeros(1, np.int32))
    video, start = [], []
    for v, n in enumerate(frames_per_video):
        k = max(1, int(n / RATE / 8))
        video.append(np.full(k, v))
        start.append(np.sort(rng.uniform(0, n / RATE, k)))
    video, start = np.concatenate(video).astype(np.int32), (np.concatenate(start) * ANNOTATION_FPS).astype(np.int64)
    n = len(video)
    z = np.zeros(n, np.int32)
    segments = SegmentTable(
        uid=np.arange(n, dtype=np.int64), video=video, start_frame=start, end_frame=start + 48,
        verb=z, noun=z, action=z, split=np.zeros(n, np.int8),
        videos=[f"P{v:03d}-R01-Bench" for v in range(n_videos)], splits=["training1"], fps=ANNOTATION_FPS,
    )
    return classes, segments


def build(tmp: Path, cfg: dict, dtype: str, seed: int = 0) -> tuple[dict[str, Store], np.ndarray, FeatureSet]:
    """Stores of both backends with the same features; returns them, the RAM copy, one FeatureSet."""
    rng = np.random.default_rng(seed)
    per = np.full(cfg["videos"], cfg["frames"] // cfg["videos"])
    per[: cfg["frames"] - per.sum()] += 1
    classes, segments = make_tables(cfg["videos"], per, seed)
    stores = {}
    for backend, suffix in (("zarr", ".zarr"), ("hdf5", ".h5")):
        stores[backend] = Store.create(tmp / f"bench-{dtype}{suffix}", classes, segments)
    writers = {b: s.video_writer("rgb", cfg["dim"], dtype=dtype, frame_rate=RATE) for b, s in stores.items()}
    for v, n in enumerate(per):
        f = rng.standard_normal((n, cfg["dim"]), dtype=np.float32).astype(dtype)
        for w in writers.values():
            w.put(segments.videos[v], f, np.arange(n) / RATE)
    for w in writers.values():
        w.commit()
    stores = {b: Store.open(s.path) for b, s in stores.items()}
    fs = stores["zarr"].video("rgb")
    return stores, np.array(fs.features), fs


def window_batches(fs: FeatureSet, segments: SegmentTable, cfg: dict, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` batches of (video index [B], times [B, T]): windows ending near random segments."""
    rng = np.random.default_rng(seed)
    vidx_of_row = fs.video_index(segments.videos)[segments.video]
    out = []
    for _ in range(n):
        rows = rng.integers(0, len(segments), cfg["batch"])
        end = segments.start_seconds()[rows] - 1.0 + rng.uniform(-2.0, 2.0, len(rows))  # 1 s anticipation
        times = end[:, None] - np.arange(cfg["window"])[::-1] / RATE
        out.append((vidx_of_row[rows], times))
    return out


def build_lmdb(path: Path, fs: FeatureSet, features: np.ndarray) -> "object":
    """One LMDB value per frame, keyed like RULSTM/AVT: ``<video>_frame_<10-digit>.jpg``."""
    import lmdb

    # values over ~2 KB take whole overflow pages: reserve two pages a frame (address space only)
    pages = 2 + features[0].nbytes // 4096
    env = lmdb.open(str(path), map_size=len(features) * pages * 4096 + (256 << 20), subdir=True, lock=False,
                    readahead=False, meminit=False, map_async=True, writemap=True)
    with env.begin(write=True) as txn:
        for v, name in enumerate(fs.videos):
            lo, hi = fs.offsets[v], fs.offsets[v + 1]
            for j in range(hi - lo):
                txn.put(f"{name}_frame_{j + 1:010d}.jpg".encode(), features[lo + j].tobytes())
    env.sync()
    with env.begin() as txn:  # warm, like the store: read every value once
        for _ in txn.cursor().iternext(keys=False, values=True):
            pass
    return env


class PerSampleReader:
    """The AVT/RULSTM way: per sample, per frame ``txn.get`` + ``np.frombuffer``, then stack."""

    def __init__(self, env, fs: FeatureSet, dtype: np.dtype, dim: int):
        self.env, self.dtype, self.dim = env, np.dtype(dtype), dim
        counts = np.diff(fs.offsets)
        self.video_of = np.repeat(np.arange(len(fs.videos)), counts)  # global frame -> video
        self.local_of = np.arange(len(self.video_of)) - fs.offsets[self.video_of]  # -> frame in video
        self.names = fs.videos

    def sample(self, frames: np.ndarray) -> np.ndarray:
        feats = []
        with self.env.begin(buffers=False) as txn:
            for g in frames.tolist():
                key = f"{self.names[self.video_of[g]]}_frame_{self.local_of[g] + 1:010d}.jpg"
                feats.append(np.frombuffer(txn.get(key.encode()), dtype=self.dtype))
        return np.stack(feats)

    def batch(self, frame_idx: np.ndarray) -> np.ndarray:
        return np.stack([self.sample(row) for row in frame_idx])


def run(tiny: bool = False, out_dir: str | Path | None = None, tmp_dir: str | Path | None = None) -> list[dict]:
    """Build, check and time every path for fp16 and fp32; return the rows written."""
    cfg = dict(TINY if tiny else FULL)
    rows: list[dict] = []
    for dtype in ("float16", "float32"):
        with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="kdstore-bench-") as d:
            d = Path(d)
            t0 = time.perf_counter()
            stores, ram, fs = build(d, cfg, dtype)
            build_s = time.perf_counter() - t0
            segments = stores["zarr"].segments
            t0 = time.perf_counter()
            env = build_lmdb(d / "frames.lmdb", fs, ram)
            lmdb_s = time.perf_counter() - t0
            reader = PerSampleReader(env, fs, dtype, cfg["dim"])
            sets = {b: s.video("rgb") for b, s in stores.items()}
            for s in sets.values():  # warm: touch one element of every page of the store's features
                float(s.features.reshape(-1)[:: max(1, 4096 // ram.itemsize)].astype(np.float64).sum())
            batches = window_batches(fs, segments, cfg, 16, seed=1)
            idx_batches = [fs.frames_at(v, t) for v, t in batches]
            shape = (cfg["batch"], cfg["window"], cfg["dim"])
            nbytes = int(np.prod(shape)) * ram.itemsize

            # the paths must agree before they are timed
            for idx in idx_batches[:3]:
                want = ram[idx]
                assert want.shape == shape
                np.testing.assert_array_equal(reader.batch(idx), want)
                for s in sets.values():
                    np.testing.assert_array_equal(s.gather(idx), want)

            def cycling(fn):
                state = {"i": 0}

                def step():
                    state["i"] = (state["i"] + 1) % len(idx_batches)
                    return fn(state["i"])

                return step

            out = np.empty(shape, ram.dtype)
            paths = {"ceiling": cycling(lambda i: ram[idx_batches[i]])}
            for b, s in sets.items():
                paths[f"store_{b}"] = cycling(lambda i, s=s: s.gather(idx_batches[i]))
                paths[f"store_{b}_out"] = cycling(lambda i, s=s: s.gather(idx_batches[i], out=out))
                paths[f"store_{b}_window"] = cycling(lambda i, s=s: s.gather(s.frames_at(*batches[i])))
            paths["per_sample_lmdb"] = cycling(lambda i: reader.batch(idx_batches[i]))

            timings = {}
            for name, fn in paths.items():
                repeat = cfg["per_sample_repeat"] if name == "per_sample_lmdb" else cfg["repeat"]
                timings[name] = timeit(fn, repeat=repeat, warmup=2 if name == "per_sample_lmdb" else 3)
            env.close()

            for name, t in timings.items():
                config = {
                    "path": name, "dtype": dtype, "frames": cfg["frames"], "dim": cfg["dim"], "videos": cfg["videos"],
                    "batch": cfg["batch"], "window": cfg["window"], "tiny": tiny,
                }
                result = {
                    **t,
                    "gbps": nbytes / t["median_s"] / 1e9,
                    "batch_mib": nbytes / 2**20,
                    "vs_ceiling": timings["ceiling"]["median_s"] / t["median_s"],
                    "vs_per_sample": timings["per_sample_lmdb"]["median_s"] / t["median_s"],
                    "build_s": build_s,
                    "lmdb_build_s": lmdb_s,
                    "peak_rss_mib": peak_rss_mib(),
                }
                rows.append(append_row(BENCH, config, result, out_dir=out_dir))
    return rows


def report(rows: list[dict]) -> str:
    import json

    lines = [f"{'dtype':8} {'path':22} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8} {'GB/s':>7} {'/ceiling':>9} {'/per-sample':>11}"]
    for r in rows:
        c = json.loads(r["config"])
        lines.append(
            f"{c['dtype']:8} {c['path']:22} {float(r['median_s']) * 1e3:10.3f} {float(r['p20_s']) * 1e3:8.3f}"
            f" {float(r['p80_s']) * 1e3:8.3f} {float(r['gbps']):7.2f} {float(r['vs_ceiling']):9.2f} {float(r['vs_per_sample']):11.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="5k frames, D=64 (a few seconds)")
    ap.add_argument("--out-dir", default=None, help="where store_read.csv goes (default bench/results)")
    ap.add_argument("--tmp-dir", default=None, help="where the stores are built (default the system temp dir)")
    args = ap.parse_args(argv)
    rows = run(tiny=args.tiny, out_dir=args.out_dir, tmp_dir=args.tmp_dir)
    print(report(rows))


if __name__ == "__main__":
    main()
