"""Build ``video/<name>``: decode, sample, preprocess and encode videos into a store.

Worker processes decode and sample the videos (:mod:`.workers`) and hand uint8 frames over
through shared memory; the main process uploads them through pinned buffers on a side CUDA
stream, resizes, crops and normalises them on the device and runs the backbone on batches
that may span videos, while the next frames upload and decode. Each finished video is staged
by the store's VideoWriter, so a crashed build resumes at the next unfinished video. Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` encodes
``videos[r::world]`` into the same writer directory and rank 0 commits once all are done.
A video that cannot be decoded is reported and skipped; the others are still committed.
"""

from __future__ import annotations

import os
import time
from collections import deque
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from kdstore.rulstm import guess_dataset
from kdstore.errors import ConfigError, DataError
from kdstore.provenance import provenance_entry
from kdstore.store import Store

from ..device import all_gather_json, autocast, autocast_dtype, distributed, resolve_device
from .backbones import Backbone
from .decode import DecodeOptions, VideoSource, find_videos
from .preprocess import Preprocess
from .workers import Chunk, DecodePool, Event, Failed, Finished, Restarted

AVT_FPS = {"egtea": 1.0, "ek55": 2.0}  # AVT's sampling rates per dataset


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
    decoders: dict[str, int] = field(default_factory=dict)  # videos per decoder ("software", "cuda")
    decoded: int = 0  # frames the decoders returned (sampled or not)
    notes: list[str] = field(default_factory=list)  # e.g. why a hardware decoder was not used

    @property
    def decoding(self) -> str:
        """One line: which decoders ran, how much was decoded, and why not in hardware if asked."""
        used = ", ".join(f"{k} for {v} video(s)" for k, v in sorted(self.decoders.items())) or "nothing decoded"
        return f"{used}; {self.decoded} frames decoded for {self.frames} kept" + "".join(f"; {n}" for n in self.notes)

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


# ---------------------------------------------------------------------------------------
# Frames to features on the device


@dataclass
class _Video:
    """One video's features as they come back, by the position of their first frame."""

    generation: int = 0  # bumped when the video restarts: rows of older generations are dropped
    features: dict[int, np.ndarray] = field(default_factory=dict)  # start -> [n, D]
    times: dict[int, np.ndarray] = field(default_factory=dict)  # start -> [n] seconds
    received: int = 0
    total: int | None = None  # known once its decoder finished


class DeviceBatches:
    """A :class:`DecodePool`'s events in (:meth:`handle`), per-video features out (:meth:`ready`),
    with the device kept busy.

    Each chunk is copied out of shared memory into a pinned staging buffer (its slot is free
    at once), uploaded on a side CUDA stream, preprocessed on the device
    (:meth:`Preprocess.on_device`) and cut into batches of ``batch_size`` rows, which may span
    videos. A full batch runs through ``encode`` while later chunks upload; its features come
    back through pinned memory and are read once its event has passed (at most ``in_flight``
    batches wait). On CPU the same steps run without pinning or streams.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess, device: torch.device,
                 amp: torch.dtype | None, batch_size: int, staging_bytes: int, staging: int = 4, in_flight: int = 3):
        self.encode, self.preprocess, self.device, self.amp = encode, preprocess, device, amp
        self.batch_size, self.in_flight = batch_size, in_flight
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(staging)]
        self.uploaded: list = [None] * staging  # CUDA event after which a staging buffer may be refilled
        self.turn = 0
        self.parts: list[torch.Tensor] = []  # preprocessed rows of the batch being filled
        self.rows: list[tuple[int, int, int, int]] = []  # (video, generation, start, n) of each part
        self.filled = 0
        self.launched: deque[tuple[object, torch.Tensor, list]] = deque()  # (event, host features, rows)
        self.videos: dict[int, _Video] = {}
        self.frames_in = self.decoded = 0  # frames received; frames the decoders returned
        self.decoders: dict[str, int] = {}  # videos per decoder
        self.failed: list[Failed] = []

    def add(self, chunk: Chunk) -> None:
        """Stage, upload and preprocess one chunk; run every batch it fills."""
        video = self.videos.setdefault(chunk.index, _Video())
        i, self.turn = self.turn, (self.turn + 1) % len(self.staging)
        if self.uploaded[i] is not None:
            self.uploaded[i].synchronize()  # its previous upload has left
        host = self.staging[i][: chunk.frames.nbytes]
        np.copyto(host.numpy(), chunk.frames.reshape(-1))
        chunk.release()
        frames = host.view(chunk.frames.shape)  # [n, h, w, 3] uint8
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                frames = frames.to(self.device, non_blocking=True)
                self.uploaded[i] = torch.cuda.Event()
                self.uploaded[i].record()
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.uploaded[i])
            frames.record_stream(compute)  # allocated on the copy stream, read on this one
        x = self.preprocess.on_device(frames, chunk.source_size)  # [n, 3, S, S]
        video.times[chunk.start] = chunk.times
        k, n = 0, len(chunk.times)
        while k < n:
            take = min(n - k, self.batch_size - self.filled)
            self.parts.append(x[k : k + take])
            self.rows.append((chunk.index, video.generation, chunk.start + k, take))
            self.filled += take
            k += take
            if self.filled == self.batch_size:
                self._launch()

    def handle(self, event: Event) -> None:
        """Take one event of a :class:`DecodePool`: frames, a finished, restarted or failed video."""
        if isinstance(event, Chunk):
            self.add(event)
            self.frames_in += len(event.times)
        elif isinstance(event, Finished):
            self.videos.setdefault(event.index, _Video()).total = event.frames
            self.decoders[event.decoder] = self.decoders.get(event.decoder, 0) + 1
            self.decoded += event.decoded
        elif isinstance(event, Restarted):  # what it sent so far is void
            self.videos[event.index] = _Video(generation=self.videos.setdefault(event.index, _Video()).generation + 1)
        elif isinstance(event, Failed):
            self.videos.pop(event.index, None)
            self.failed.append(event)

    def _launch(self) -> None:
        pixels = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]  # [b, 3, S, S]
        with autocast(self.device, self.amp):
            feats = self.encode(pixels).float()  # [b, D]
        if self.cuda:
            host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = feats, None
        self.launched.append((event, host, self.rows))
        self.parts, self.rows, self.filled = [], [], 0
        self._collect(block=False)

    def _collect(self, block: bool) -> None:
        """Read the features of launched batches that are done (all of them with ``block``)."""
        while self.launched:
            event = self.launched[0][0]
            if not (block or event is None or len(self.launched) > self.in_flight or event.query()):
                return
            event, host, rows = self.launched.popleft()
            if event is not None:
                event.synchronize()
            feats = host.numpy()  # [b, D]
            k = 0
            for index, generation, start, n in rows:
                video = self.videos.get(index)
                if video is not None and video.generation == generation:
                    video.features[start] = feats[k : k + n].copy()
                    video.received += n
                k += n

    def flush(self) -> None:
        """Run the last, partial batch and wait for every feature."""
        if self.parts:
            self._launch()
        self._collect(block=True)

    def ready(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(video index, [n, D] features, [n] seconds) of every video now complete."""
        self._collect(block=False)
        out = []
        for index, video in list(self.videos.items()):
            if video.total is not None and video.received == video.total:
                feats = np.concatenate([video.features[k] for k in sorted(video.features)])
                times = np.concatenate([video.times[k] for k in sorted(video.times)])
                out.append((index, feats, times))
                del self.videos[index]
        return out


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


def _cores_per_rank() -> int:
    """This machine's cores shared by the ranks on it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers() -> int:
    """Decoding processes per rank: its cores but one, which feeds the device."""
    return max(1, _cores_per_rank() - 1)


def decode_options(preprocess: Preprocess, fps: float, native_fps: float, device: torch.device, workers: int, *,
                   scale_in_decoder: bool = True, decode_all: bool = False, hwaccel: str = "auto") -> DecodeOptions:
    """How the workers decode for ``preprocess`` on ``device``. ``hwaccel``: ``auto`` (CUDA's
    decoder when encoding on CUDA), ``none`` or an FFmpeg device type."""
    if hwaccel == "auto":
        hwaccel = "cuda" if device.type == "cuda" else "none"
    return DecodeOptions(
        fps=fps, native_fps=native_fps, resize=preprocess.resize if scale_in_decoder else 0, crop=preprocess.crop,
        skip=not decode_all, hwaccel=None if hwaccel == "none" else hwaccel,
        hw_device=str(device.index) if hwaccel == "cuda" and device.index is not None else None,
        # FFmpeg threads share the cores left over; with one, the decoder also drops unreferenced frames
        threads=max(1, _cores_per_rank() // (workers + 1)) if workers > 0 else 0,
    )


def build_video_features(
    store: Store,
    videos: str | Path | Sequence[VideoSource],
    backbone: Backbone,
    name: str,
    *,
    fps: float | None = None,
    native_fps: float | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str | None = None,
    precision: str = "auto",
    dtype: str = "float16",
    scale_in_decoder: bool = True,
    decode_all: bool = False,
    hwaccel: str = "auto",
    progress: bool = True,
    on_video: Callable[[str], None] | None = None,
) -> BuildReport:
    """Encode ``videos`` with ``backbone`` into ``video/<name>`` of ``store``.

    ``fps``: sampling rate (0: every frame; default AVT's rate for the store's dataset).
    ``native_fps``: frame-folder rate (default the store's segments.fps). ``workers``:
    decoding processes (default :func:`default_workers`; 0 decodes in this process).
    ``scale_in_decoder``: FFmpeg scales frames to the backbone's resize before they reach
    the device (recorded in the feature set: features differ slightly from full-size frames).
    ``decode_all``: decode every frame, not only the GOPs that hold sampled ones (same output).
    ``hwaccel``: see :func:`decode_options`. ``on_video`` is called with each video id once
    it is staged. Returns a report; bad videos are in ``report.bad`` (see
    :meth:`BuildReport.raise_for_bad`).
    """
    t_start = time.perf_counter()
    fps, workers = _checked_rates(store, fps, batch_size, workers)
    native_fps = float(native_fps or store.segments.fps)
    sources = find_videos(videos) if isinstance(videos, (str, Path)) else list(videos)
    dev = resolve_device(device)
    amp = autocast_dtype(precision, dev)
    options = decode_options(backbone.preprocess, fps, native_fps, dev, workers, scale_in_decoder=scale_in_decoder,
                             decode_all=decode_all, hwaccel=hwaccel)
    with distributed(dev) as (rank, world):
        settings = {**backbone.info, "sample_fps": fps, "native_fps": native_fps, "scaled_in_decoder": scale_in_decoder}
        writer = store.video_writer(name, backbone.dim, dtype, frame_rate=fps or None,
                                    attrs={**settings, "source": "build-video-features"}, settings=settings)
        mine = sources[rank::world]
        todo = [s for s in mine if not writer.done(s.video)]
        encoder = _Encoder(backbone, options, dev, amp, batch_size, workers)
        local = encoder.run(todo, writer, f"video/{name}", progress and rank == 0, on_video)
        local["skipped"] = len(mine) - len(todo)
        report = _report(name, rank, all_gather_json(local, dev) if world > 1 else [local])
        if rank == 0 and writer.staged():
            _commit(writer, report, backbone, fps, world)
    report.seconds = time.perf_counter() - t_start
    return report


def _checked_rates(store: Store, fps: float | None, batch_size: int, workers: int | None) -> tuple[float, int]:
    """(sampling rate, decoding processes) with their defaults; ConfigError for a bad value."""
    fps = default_fps(store) if fps is None else float(fps)
    if fps < 0:
        raise ConfigError(f"--fps must be >= 0 (0 keeps every frame), found {fps}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, found {batch_size}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 decodes in the main process), found {workers}")
    return fps, workers


@dataclass
class _Encoder:
    """One rank's encoding: decode its videos in worker processes, encode them on the device."""

    backbone: Backbone
    options: DecodeOptions
    device: torch.device
    amp: torch.dtype | None
    batch_size: int
    workers: int

    def run(self, todo: list[VideoSource], writer, label: str, show: bool,
            on_video: Callable[[str], None] | None) -> dict:
        """Stage every video of ``todo`` that decodes; this rank's counts (JSON, for the report)."""
        staged = staged_frames = 0
        with DecodePool(todo, self.options, self.workers, chunk=self.batch_size) as pool, _progress(show) as bar:
            self.backbone.to(self.device)  # while the workers start
            task = bar.add_task(label, total=len(todo), info="")
            t0 = time.perf_counter()
            with torch.inference_mode():
                batches = DeviceBatches(self.backbone, self.backbone.preprocess, self.device, self.amp, self.batch_size,
                                        pool.slot_bytes)
                for event in chain(pool, [None]):  # None: the end, flush the last batch
                    if event is None:
                        batches.flush()
                    else:
                        batches.handle(event)
                    for index, feats, stamps in batches.ready():
                        writer.put(todo[index].video, feats, stamps)  # [n, D], [n]
                        staged, staged_frames = staged + 1, staged_frames + len(stamps)
                        if on_video is not None:
                            on_video(todo[index].video)
                    rate = batches.frames_in / (time.perf_counter() - t0)
                    bar.update(task, completed=staged + len(batches.failed), info=f"{batches.frames_in} frames, {rate:.1f} frames/s")
        return {"videos": staged, "frames": staged_frames, "decoders": batches.decoders, "decoded": batches.decoded,
                "notes": pool.notes, "bad": [[str(todo[f.index].path), f.message] for f in batches.failed]}


def _report(name: str, rank: int, ranks: list[dict]) -> BuildReport:
    """The build's report from every rank's counts."""
    report = BuildReport(
        name,
        rank=rank,
        videos=sum(r["videos"] for r in ranks),
        skipped=sum(r["skipped"] for r in ranks),
        frames=sum(r["frames"] for r in ranks),
        bad=sorted((p, m) for r in ranks for p, m in r["bad"]),
        decoded=sum(r["decoded"] for r in ranks),
        notes=sorted({n for r in ranks for n in r["notes"]}),
    )
    for r in ranks:
        for k, v in r["decoders"].items():
            report.decoders[k] = report.decoders.get(k, 0) + v
    return report


def _commit(writer, report: BuildReport, backbone: Backbone, fps: float, world: int) -> None:
    """Commit the staged videos with their provenance (rank 0, once every rank is done)."""
    prov = provenance_entry(
        "build_video_features", _weight_files(backbone.info["weights"]), group=f"video/{report.name}",
        backbone=backbone.name, sample_fps=fps, videos=report.videos + report.skipped,
        bad=[p for p, _ in report.bad], world_size=world, decoding=report.decoding,
    )
    writer.commit(provenance=prov)
    report.committed = True
