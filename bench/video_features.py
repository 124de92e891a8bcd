"""Video feature throughput: decode + preprocess, backbone alone, the whole build, LMDB import.

    python bench/video_features.py [--tiny] [--device cpu|cuda] [--backbone vit-small|vit-b16]
        [--sizes 640x480,1920x1080] [--videos N[,N]] [--seconds S] [--gop S] [--workers W] [--batch B]

For each frame size it writes two synthetic H.264 videos with PyAV (moving shapes at 24 fps,
a keyframe every ``--gop`` seconds (1), 2 B-frames; ``--tiny``: 64x48) and lists them
``--videos`` times in all under other names (symlinks; one count per size, or one for all),
so that a long run needs few encoded seconds. Sampling
at 2 fps it measures, in sampled frames per second:

- ``decode+preprocess``: the build's data path alone (decoding workers, shared memory,
  pinned upload, preprocessing on the device) into a trivial encoder, with its CPU time
  per sampled frame (workers included);
- ``backbone``: the backbone alone on a batch already on the device (random weights);
- ``build``: the whole ``build_video_features`` command; ``ratio`` = build / backbone.

Then it imports a RULSTM-style LMDB of 100k 1024-d float32 frames (``--tiny``: 2k) and
reports MB/s. Rows go to bench/results/; each records the load average it ran under.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import resource
import tempfile
import time

import numpy as np
import torch

from bench.common import append_row, peak_rss_mib, timeit
from kdstore.tables import ClassTable, SegmentTable
from kdstore.store import Store
from trainers.video.backbones import load_backbone
from trainers.video.decode import VideoSource, find_videos
from trainers.device import autocast_dtype, resolve_device
from trainers.video.extract import DeviceBatches, build_video_features, decode_options, default_workers
from trainers.video.workers import DecodePool

BENCH = "video_features"
NATIVE_FPS, SAMPLE_FPS = 24, 2.0


def make_video(path: Path, seconds: float, fps: int, size: tuple[int, int], seed: int = 0, gop: int | None = None) -> None:
    """An H.264 video of a square moving over a changing background; a keyframe every ``gop``
    frames (default: every second)."""
    import av

    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "g": str(gop or fps), "bf": "2", "sc_threshold": "0"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (i * 3 + seed * 40) % 256
            x, side = (i * 5) % max(1, w - h // 4), max(1, h // 4)
            img[h // 3 : h // 3 + side, x : x + side] = (40, 220, 90)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_videos(folder: Path, videos: int, distinct: int, seconds: float, size: tuple[int, int], gop: float = 1.0) -> list[VideoSource]:
    """``distinct`` encoded videos, listed ``videos`` times in all under distinct names (symlinks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(distinct):
        make_video(folder / f"base{d}.mp4", seconds, NATIVE_FPS, size, seed=d, gop=max(1, round(gop * NATIVE_FPS)))
    for v in range(videos):
        (folder / f"v{v:04d}.mp4").symlink_to(folder / f"base{v % distinct}.mp4")
    return [s for s in find_videos(folder) if s.video.startswith("v")]


def make_store(path: Path, videos: list[str]) -> Store:
    classes = ClassTable(["a_b"], ["a"], ["b"], np.zeros(1, np.int32), np.zeros(1, np.int32))
    n = len(videos)
    z = np.zeros(n, np.int32)
    seg = SegmentTable(uid=np.arange(n), video=np.arange(n, dtype=np.int32), start_frame=np.full(n, 30),
                       end_frame=np.full(n, 60), verb=z, noun=z, action=z, split=np.zeros(n, np.int8),
                       videos=videos, splits=["train"], fps=30.0)
    return Store.create(path, classes, seg)


def make_lmdb(path: Path, frames: int, dim: int, videos: int) -> int:
    """A RULSTM-style LMDB of ``frames`` float32 vectors over ``videos`` videos; returns its bytes."""
    import lmdb

    per = frames // videos
    rng = np.random.default_rng(0)
    block = rng.standard_normal((per, dim)).astype(np.float32)
    env = lmdb.open(str(path), map_size=frames * (2 * dim * 4 + 4096) + (1 << 26))  # a 4 KiB value takes two pages
    with env.begin(write=True) as txn:
        for v in range(videos):
            for f in range(per):
                txn.put(f"P{v:02d}_01_frame_{f + 1:010d}.jpg".encode(), block[f].tobytes())
    env.close()
    return per * videos * dim * 4


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def decode_and_preprocess(sources: list[VideoSource], bb, dev: torch.device, batch: int, workers: int) -> dict:
    """The build's data path into an encoder that only averages the pixels: sampled frames/s,
    and CPU ms per sampled frame (workers included: a figure the machine's load hardly moves)."""
    options = decode_options(bb.preprocess, SAMPLE_FPS, 0.0, dev, workers)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    frames = 0
    with DecodePool(sources, options, workers, chunk=batch) as pool, torch.inference_mode():
        batches = DeviceBatches(lambda x: x.mean((2, 3)), bb.preprocess, dev, None, batch, pool.slot_bytes)  # [b, 3]
        for event in pool:
            batches.handle(event)
            frames += sum(len(t) for _, _, t in batches.ready())
        batches.flush()
        frames += sum(len(t) for _, _, t in batches.ready())
    if batches.failed:
        raise RuntimeError(batches.failed[0].message)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"seconds": dt, "frames": frames, "sampled_frames_per_s": frames / dt, "decoded_frames_per_s": batches.decoded / dt,
            "cpu_ms_per_frame": 1000 * cpu / frames, "decoded": batches.decoded, "notes": "; ".join(pool.notes)}


def run(tiny: bool = False, device: str | None = None, out_dir: Path | None = None, backbone: str | None = None,
        sizes: list[tuple[int, int]] | None = None, videos: list[int] | None = None, seconds: float | None = None,
        gop: float = 1.0, workers: int | None = None, batch: int | None = None) -> list[dict]:
    """Run every measurement and append one row each; returns the rows."""
    dev = resolve_device(device)
    name = backbone or ("vit-tiny" if tiny else "vit-small")
    sizes = sizes or ([(64, 48)] if tiny else [(640, 480), (1920, 1080)])
    videos = videos or [4 if tiny else 16]
    videos = videos * len(sizes) if len(videos) == 1 else videos
    if len(videos) != len(sizes):
        raise SystemExit(f"--videos: one count, or one per size ({len(sizes)}), found {len(videos)}")
    seconds = seconds or (2.0 if tiny else 8.0)
    workers = default_workers() if workers is None else workers
    batch = batch or (8 if tiny else 32)
    lmdb_frames, dim = (2_000, 1024) if tiny else (100_000, 1024)
    rows = []
    base = {"tiny": tiny, "device": str(dev), "backbone": name}

    def row(stage: str, config: dict, result: dict) -> dict:
        result = {"stage": stage, **result, "peak_rss_mib": peak_rss_mib(), "load1": os.getloadavg()[0]}
        rows.append(append_row(BENCH, {**base, **config, "stage": stage}, result, out_dir))
        return result

    bb = load_backbone(name, random_init=True).to(dev)
    amp = autocast_dtype("auto", dev)
    pixels = torch.randn(batch, 3, bb.preprocess.crop, bb.preprocess.crop, device=dev)  # [B, 3, S, S]

    def encode():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            bb(pixels)

    t = timeit(encode, repeat=3 if tiny else 5, warmup=1, sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    alone = row("backbone", {"batch": batch, "precision": str(amp)}, {**t, "frames_per_s": batch / t["median_s"]})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, n in zip(sizes, videos):
            folder = tmp / f"{size[0]}x{size[1]}"
            distinct = min(n, 2)
            sources = make_videos(folder, n, distinct, seconds, size, gop)
            cfg = {"videos": n, "distinct": distinct, "seconds": seconds, "native_fps": NATIVE_FPS, "size": list(size),
                   "fps": SAMPLE_FPS, "batch": batch, "workers": workers, "codec": f"h264 veryfast, gop {gop:g} s, 2 b-frames"}
            row("decode+preprocess", cfg, decode_and_preprocess(sources, bb, dev, batch, workers))
            store = make_store(folder / "s.zarr", [s.video for s in sources])
            report = build_video_features(store, sources, bb, "bench", fps=SAMPLE_FPS, batch_size=batch, workers=workers,
                                          device=str(dev), progress=False)
            fps = report.frames / report.seconds
            row("build", cfg, {"seconds": report.seconds, "frames": report.frames, "frames_per_s": fps,
                               "ratio": fps / alone["frames_per_s"], "decoding": report.decoding})

        from kdstore.feature_import import import_lmdb

        store = make_store(tmp / "lmdb.zarr", ["x"])
        nbytes = make_lmdb(tmp / "rgb", lmdb_frames, dim, videos=20)
        for dtype in ("float16", "float32"):
            os.sync()  # write back earlier files first: each import is timed from the page cache alone
            r = import_lmdb(store, tmp / "rgb", f"rgb-{dtype}", native_fps=30, dtype=dtype, progress=False)
            row("lmdb-import", {"frames": lmdb_frames, "dim": dim, "dtype": dtype},
                {"seconds": r.seconds, "frames_per_s": r.frames / r.seconds, "mb_read_per_s": nbytes / 1e6 / r.seconds,
                 "mb_written_per_s": r.bytes_written / 1e6 / r.seconds})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--backbone", choices=["vit-tiny", "vit-small", "vit-b16"], default=None)
    p.add_argument("--sizes", default=None, help="frame sizes, e.g. 640x480,1920x1080")
    p.add_argument("--videos", default=None, help="videos listed per size (symlinks to two encoded ones): N or N,N,...")
    p.add_argument("--seconds", type=float, default=None, help="length of each video")
    p.add_argument("--gop", type=float, default=1.0, help="seconds between keyframes")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: the cores but one)")
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")] if args.sizes else None
    videos = [int(v) for v in args.videos.split(",")] if args.videos else None
    for r in run(tiny=args.tiny, device=args.device, backbone=args.backbone, sizes=sizes, videos=videos,
                 seconds=args.seconds, gop=args.gop, workers=args.workers, batch=args.batch):
        shown = {k: r[k] for k in r if k.endswith(("per_s", "median_s", "seconds", "per_frame")) or k in ("stage", "ratio", "load1", "decoding")}
        print(r["config"], shown)


if __name__ == "__main__":
    main()
