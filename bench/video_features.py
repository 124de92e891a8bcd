"""Video feature throughput: decode + preprocess, backbone, the whole build, LMDB import.

    python bench/video_features.py [--tiny] [--device cpu|cuda] [--backbone vit-small|vit-b16]

On synthetic videos it writes (moving shapes, 640x480 at 24 fps; ``--tiny``: 64x48) it
measures frames/s of decoding + preprocessing alone, of the backbone alone (random
weights) and of ``build_video_features``; then it imports a RULSTM-style LMDB of 100k
1024-d float32 frames (``--tiny``: 2k) and reports MB/s. Rows go to bench/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from bench.common import append_row, peak_rss_mib, timeit
from kdstore.annotations import ClassTable, SegmentTable
from kdstore.store import Store
from trainers.video.backbones import load_backbone
from trainers.video.decode import find_videos, iter_batches, prefetch
from trainers.video.extract import autocast_dtype, build_video_features, resolve_device

BENCH = "video_features"


def make_videos(folder: Path, n: int, seconds: float, fps: int, size: tuple[int, int]) -> None:
    """``n`` mpeg4 videos of moving coloured squares."""
    import av

    w, h = size
    folder.mkdir(parents=True, exist_ok=True)
    for v in range(n):
        with av.open(str(folder / f"v{v:02d}.mp4"), "w") as c:
            s = c.add_stream("mpeg4", rate=fps)
            s.width, s.height, s.pix_fmt, s.bit_rate = w, h, "yuv420p", 2_000_000
            for i in range(int(seconds * fps)):
                img = np.zeros((h, w, 3), np.uint8)
                img[..., 0] = (i * 3 + v * 40) % 256
                x, side = (i * 5) % max(1, w - h // 4), h // 4
                img[h // 3 : h // 3 + side, x : x + side] = (40, 220, 90)
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)


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


def run(tiny: bool = False, device: str | None = None, out_dir: Path | None = None, backbone: str | None = None) -> list[dict]:
    """Run every measurement and append one row each; returns the rows."""
    dev = resolve_device(device)
    name = backbone or ("vit-tiny" if tiny else "vit-small")
    n_videos, seconds, native, size = (2, 2.0, 24, (64, 48)) if tiny else (4, 15.0, 24, (640, 480))
    fps, batch, workers = 2.0, 32, 4
    lmdb_frames, dim = (2_000, 1024) if tiny else (100_000, 1024)
    rows = []
    base = {"tiny": tiny, "device": str(dev), "backbone": name}

    def row(stage: str, config: dict, result: dict) -> None:
        rows.append(append_row(BENCH, {**base, **config, "stage": stage}, {"stage": stage, **result, "peak_rss_mib": peak_rss_mib()}, out_dir))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_videos(tmp / "videos", n_videos, seconds, native, size)
        sources = find_videos(tmp / "videos")
        bb = load_backbone(name, random_init=True).to(dev)
        video_cfg = {"videos": n_videos, "seconds": seconds, "native_fps": native, "size": list(size), "fps": fps,
                     "batch": batch, "workers": workers}

        # decode + preprocess alone, in the background threads the build uses
        t0 = time.perf_counter()
        sampled = sum(len(t) for _, batches in prefetch(sources, lambda s: iter_batches(s, fps, bb.preprocess, batch), workers)
                      for _, t in batches)
        dt = time.perf_counter() - t0
        decoded = n_videos * seconds * native
        row("decode+preprocess", video_cfg, {"seconds": dt, "sampled_frames_per_s": sampled / dt, "decoded_frames_per_s": decoded / dt})

        # backbone alone on one batch
        amp = autocast_dtype("auto", dev)
        pixels = torch.randn(batch, 3, bb.preprocess.crop, bb.preprocess.crop, device=dev)  # [B, 3, S, S]

        def encode():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                bb(pixels)

        t = timeit(encode, repeat=3 if tiny else 5, warmup=1, sync=torch.cuda.synchronize if dev.type == "cuda" else None)
        row("backbone", {"batch": batch, "precision": str(amp)}, {**t, "frames_per_s": batch / t["median_s"]})

        # the whole build
        store = make_store(tmp / "s.zarr", [s.video for s in sources])
        report = build_video_features(store, sources, bb, "bench", fps=fps, batch_size=batch, workers=workers,
                                      device=str(dev), progress=False)
        row("build", video_cfg, {"seconds": report.seconds, "frames": report.frames, "frames_per_s": report.frames / report.seconds})

        # LMDB import
        from trainers.video.imports import import_lmdb

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
    args = p.parse_args()
    for r in run(tiny=args.tiny, device=args.device, backbone=args.backbone):
        shown = {k: r[k] for k in r if k.endswith(("per_s", "median_s", "seconds")) or k in ("stage",)}
        print(shown)


if __name__ == "__main__":
    main()
