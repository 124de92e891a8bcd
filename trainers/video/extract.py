"""Build ``video/<name>``: decode, sample, preprocess and encode videos into a store.

Decoding and preprocessing run in background threads while the backbone encodes batches.
Each finished video is staged by the store's VideoWriter, so a crashed build resumes at
the next unfinished video. Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` encodes
``videos[r::world]`` into the same writer directory and rank 0 commits once all are done.
A video that cannot be decoded is reported and skipped; the others are still committed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.annotations import guess_dataset
from kdstore.errors import ConfigError, DataError
from kdstore.store import Store, provenance_entry

from .backbones import Backbone
from .decode import VideoSource, find_videos, iter_batches, prefetch

AVT_FPS = {"egtea": 1.0, "ek55": 2.0}  # AVT's sampling rates per dataset
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BuildReport:
    """What a build did, summed over all ranks."""

    name: str
    videos: int = 0  # videos encoded by this run
    skipped: int = 0  # videos staged by an earlier, interrupted run
    frames: int = 0
    seconds: float = 0.0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    committed: bool = False
    rank: int = 0  # this process's rank; only rank 0 commits

    def raise_for_bad(self) -> None:
        """Raise one DataError listing every bad video, if there were any."""
        if self.bad:
            kept = f"the other {self.videos + self.skipped} are in video/{self.name}" if self.committed else "nothing was committed"
            reasons = "; ".join(msg for _, msg in self.bad)
            raise DataError(f"{len(self.bad)} bad video(s) skipped ({kept}): {reasons}")


def default_fps(store: Store) -> float:
    """AVT's sampling rate for the store's dataset (EGTEA 1 fps, EK55 2 fps)."""
    dataset = store.manifest.get("dataset") or guess_dataset(store.classes)
    if dataset not in AVT_FPS:
        raise ConfigError(f"{store.path}: unknown dataset {dataset!r}; pass the sampling rate (--fps)")
    return AVT_FPS[dataset]


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto``: CUDA when available; under torchrun CUDA ranks use ``cuda:LOCAL_RANK``."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 (or fp16) on CUDA and fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


# ---------------------------------------------------------------------------------------
# torch.distributed


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), owned


def _all_gather_json(obj, device: torch.device) -> list:
    """Every rank's JSON-serialisable ``obj``, as bytes in tensors (no pickle)."""
    import torch.distributed as dist

    comm = device if device.type == "cuda" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=comm)  # [n]
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=comm))
    n = max(int(s) for s in sizes)
    bufs = [torch.zeros(n, dtype=torch.uint8, device=comm) for _ in sizes]
    dist.all_gather(bufs, F.pad(data, (0, n - len(data))))
    return [json.loads(bytes(b[: int(s)].tolist())) for b, s in zip(bufs, sizes)]


# ---------------------------------------------------------------------------------------
# Build


def _progress(show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not show,
    )


def _weight_files(weights: str | None) -> list[Path]:
    if not weights:
        return []
    p = Path(weights)
    return sorted(q for q in p.iterdir() if q.suffix in (".safetensors", ".bin")) if p.is_dir() else [p]


def build_video_features(
    store: Store | str | Path,
    videos: str | Path | Sequence[VideoSource],
    backbone: Backbone,
    name: str,
    *,
    fps: float | None = None,
    native_fps: float | None = None,
    batch_size: int = 32,
    workers: int = 2,
    device: str | None = None,
    precision: str = "auto",
    dtype: str = "float16",
    progress: bool = True,
    on_video: Callable[[str], None] | None = None,
) -> BuildReport:
    """Encode ``videos`` with ``backbone`` into ``video/<name>`` of ``store``.

    ``fps``: sampling rate (0: every frame; default AVT's rate for the store's dataset).
    ``native_fps``: frame-folder rate (default the store's segments.fps). ``on_video`` is
    called with each video id once it is staged. Returns a report; bad videos are in
    ``report.bad`` (see :meth:`BuildReport.raise_for_bad`).
    """
    t_start = time.perf_counter()
    store = store if isinstance(store, Store) else Store.open(store)
    fps = default_fps(store) if fps is None else float(fps)
    if fps < 0:
        raise ConfigError(f"--fps must be >= 0 (0 keeps every frame), found {fps}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, found {batch_size}")
    native_fps = float(native_fps or store.segments.fps)
    sources = find_videos(videos) if isinstance(videos, (str, Path)) else list(videos)
    dev = resolve_device(device)
    amp = autocast_dtype(precision, dev)
    rank, world, owned = _init_distributed(dev)
    try:
        settings = {**backbone.info, "sample_fps": fps, "native_fps": native_fps}
        writer = store.video_writer(name, backbone.dim, dtype, frame_rate=fps or None,
                                    attrs={**settings, "source": "build-video-features"}, settings=settings)
        mine = sources[rank::world]
        todo = [s for s in mine if not writer.done(s.video)]
        backbone.to(dev)
        pin = dev.type == "cuda"

        def produce(source: VideoSource):
            for pixels, times in iter_batches(source, fps, backbone.preprocess, batch_size, native_fps):
                yield (pixels.pin_memory() if pin else pixels), times  # [b, 3, S, S], [b]

        local = {"videos": 0, "frames": 0, "bad": []}
        with _progress(progress and rank == 0) as bar:
            task = bar.add_task(f"video/{name}", total=len(todo), info="")
            t0, frames = time.perf_counter(), 0
            for source, batches in prefetch(todo, produce, workers):
                feats, stamps = [], []
                try:
                    for pixels, times in batches:
                        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                            out = backbone(pixels.to(dev, non_blocking=True))  # [b, D]
                        feats.append(out.float().cpu().numpy())
                        stamps.append(times)
                        frames += len(times)
                        bar.update(task, info=f"{frames} frames, {frames / (time.perf_counter() - t0):.1f} frames/s")
                except DataError as e:  # a bad video: report it at the end, store nothing for it
                    local["bad"].append([str(source.path), str(e)])
                else:
                    writer.put(source.video, np.concatenate(feats), np.concatenate(stamps))  # [n, D], [n]
                    local["videos"] += 1
                    local["frames"] += sum(len(t) for t in stamps)
                    if on_video is not None:
                        on_video(source.video)
                bar.advance(task)
        local["skipped"] = len(mine) - len(todo)
        ranks = _all_gather_json(local, dev) if world > 1 else [local]
        report = BuildReport(
            name,
            rank=rank,
            videos=sum(r["videos"] for r in ranks),
            skipped=sum(r["skipped"] for r in ranks),
            frames=sum(r["frames"] for r in ranks),
            bad=sorted((p, m) for r in ranks for p, m in r["bad"]),
        )
        if rank == 0 and writer.staged():
            prov = provenance_entry(
                "build_video_features", _weight_files(backbone.info["weights"]), group=f"video/{name}",
                backbone=backbone.name, sample_fps=fps, videos=report.videos + report.skipped,
                bad=[p for p, _ in report.bad], world_size=world,
            )
            writer.commit(provenance=prov)
            report.committed = True
        if world > 1:
            torch.distributed.barrier()  # no rank exits (and is reaped by torchrun) before the commit
    finally:
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()
    report.seconds = time.perf_counter() - t_start
    return report
