"""Decode videos and frame folders, sample them at a fixed rate and preprocess the frames.

A video is a file PyAV can open (mp4, webm, mkv, ...) or a folder of JPEG frames named
``frame_0000000001.jpg`` as EPIC-KITCHENS ships them; its id is the file stem or the
folder name. Timestamps are seconds: a video file's from its first decoded frame (pts),
a frame folder's frame number / its native frame rate (the annotation convention).

Sampling at ``fps`` keeps, for each time ``k / fps``, the frame on screen at that time,
and only while the video lasts the whole sample period ``[k / fps, (k + 1) / fps)``; so a
video of duration ``d`` gives ``floor(d * fps)`` frames (if its own rate is at least ``fps``)
and one shorter than a period none.
``fps = 0`` keeps every frame.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.errors import ConfigError, DataError
from trainers.queues import put_until

if TYPE_CHECKING:
    import av

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_FILE = re.compile(r"^frame_(\d+)\.jpe?g$", re.IGNORECASE)
EPS = 1e-6  # seconds: slack when comparing frame times with sample times
# A container that declares more than this much video beyond the last decoded frame
# (seconds, or fraction of its duration, whichever is larger) was truncated.
TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAC = 0.5, 0.05

T = TypeVar("T")


@dataclass(frozen=True)
class VideoSource:
    """One video to decode: a file, or a folder of ``frame_<n>.jpg`` frames."""

    video: str  # video id: file stem or folder name
    path: Path
    is_folder: bool


def _frame_files(folder: Path) -> list[tuple[int, Path]]:
    """(frame number, path) of a folder's ``frame_<n>.jpg`` files, by frame number."""
    found = ((FRAME_FILE.match(p.name), p) for p in folder.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _source(path: Path) -> VideoSource | None:
    if path.is_dir():
        return VideoSource(path.name, path, True) if _frame_files(path) else None
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoSource(path.stem, path, False)
    return None


def find_videos(spec: str | Path) -> list[VideoSource]:
    """The videos named by ``spec``: a directory (video files and frame folders in it)
    or a text file listing one path a line (relative paths from the list's folder)."""
    spec = Path(spec)
    if spec.is_dir():
        sources = [s for p in sorted(spec.iterdir()) if not p.name.startswith(".") and (s := _source(p))]
        if not sources:
            raise ConfigError(f"{spec}: no video files ({', '.join(VIDEO_SUFFIXES)}) or frame folders in it")
    elif spec.is_file():
        sources = []
        for n, line in enumerate(spec.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            path = Path(line.strip())
            path = path if path.is_absolute() else spec.parent / path
            if not path.exists():
                raise ConfigError(f"{spec}, line {n}: {path} does not exist")
            source = _source(path)
            if source is None:
                raise ConfigError(f"{spec}, line {n}: {path} is neither a video file nor a folder of frame_<n>.jpg")
            sources.append(source)
        if not sources:
            raise ConfigError(f"{spec}: the video list is empty")
    else:
        raise ConfigError(f"{spec}: no such directory or video list")
    seen: dict[str, Path] = {}
    for s in sources:
        if seen.setdefault(s.video, s.path) != s.path:
            raise ConfigError(f"video id {s.video!r} given twice: {seen[s.video]} and {s.path}")
    return sources


# ---------------------------------------------------------------------------------------
# Sampling


def sample(frames: Iterable[tuple[float, float, T]], fps: float, where: Path) -> Iterator[tuple[float, T]]:
    """Sample ``(start, end, payload)`` frames (increasing starts) at ``fps``; see the module doc.

    Yields ``(start, payload)`` of each kept frame once, even where the video's own rate is
    below ``fps``. Raises DataError naming ``where`` if no frame is kept.
    """
    period = 1.0 / fps if fps > 0 else 0.0
    pending: deque[tuple[int, float, T]] = deque()  # (sample index, start, payload) awaiting a full period
    k, prev, last_start, kept = 0, None, None, 0
    for start, end, payload in frames:
        if fps <= 0:
            kept, prev = kept + 1, (start, end, payload)
            yield start, payload
            continue
        if prev is None:
            k = max(0, math.ceil((start - EPS) / period))  # no frame is on screen before the first
        else:
            while k * period + EPS < start:  # sample time k falls before this frame: prev is on screen
                if prev[0] != last_start:
                    pending.append((k, prev[0], prev[2]))
                    last_start = prev[0]
                k += 1
        while pending and (pending[0][0] + 1) * period <= start + EPS:  # the video reaches the period's end
            kept += 1
            yield pending.popleft()[1:]
        prev = (start, end, payload)
    if prev is None:
        raise DataError(f"{where}: no video frames could be decoded")
    if fps > 0:
        while k * period + EPS < prev[1]:  # the last frame shows until its end
            if prev[0] != last_start:
                pending.append((k, prev[0], prev[2]))
                last_start = prev[0]
            k += 1
        for i, start, payload in pending:
            if (i + 1) * period <= prev[1] + EPS:
                kept += 1
                yield start, payload
    if kept == 0:
        raise DataError(
            f"{where}: no frames at {fps:g} fps (the video lasts {prev[1]:.3f} s, less than one sample period of {period:.3f} s)"
        )


# ---------------------------------------------------------------------------------------
# Decoding


def _declared_duration(stream) -> float:
    """The video stream's own duration in seconds (0 if unknown): its header, else Matroska's
    DURATION tag. Not the container's, which spans audio too."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    h, _, rest = (stream.metadata.get("DURATION") or "").partition(":")
    m, _, sec = rest.partition(":")
    try:
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return 0.0


def _video_frames(path: Path) -> Iterator[tuple[float, float, av.VideoFrame]]:
    """(start, end, av.VideoFrame) of a video file in presentation order, from t = 0."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-parallel decoding inside FFmpeg
            tb = float(stream.time_base) if stream.time_base else 0.0
            step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
            t0, last, index = None, None, 0
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else index * step
                index += 1
                t0 = t if t0 is None else t0
                t -= t0
                if last is not None and t <= last:
                    continue  # repeated or out-of-order pts: keep the first
                duration = (frame.duration or 0) * tb or step or 0.0
                last = t
                yield t, t + duration, frame
            declared = _declared_duration(stream)
    except av.FFmpegError as e:
        raise DataError(f"{path}: cannot decode video ({e.strerror or type(e).__name__})") from None
    if last is not None and declared - (last + duration) > max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAC * declared):
        raise DataError(f"{path}: truncated video (frames end at {last + duration:.2f} s, the container declares {declared:.2f} s)")


def _folder_frames(path: Path, native_fps: float) -> Iterator[tuple[float, float, Path]]:
    """(start, end, jpg path) of a frame folder; frame ``n`` starts at ``n / native_fps``."""
    if not native_fps or native_fps <= 0:
        raise ConfigError(f"{path}: a frame folder needs its native frame rate (--native-fps)")
    for n, p in _frame_files(path):
        yield n / native_fps, (n + 1) / native_fps, p


def read_image(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB of an image file (Pillow if installed, else PyAV)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        import av

        try:
            with av.open(str(path)) as c:
                return next(c.decode(video=0)).to_ndarray(format="rgb24")
        except (av.FFmpegError, StopIteration) as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def iter_frames(source: VideoSource, fps: float, native_fps: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """(timestamp, [H, W, 3] uint8 RGB) of each sampled frame of ``source``."""
    if source.is_folder:
        for t, path in sample(_folder_frames(source.path, native_fps or 0.0), fps, source.path):
            yield t, read_image(path)
    else:
        for t, frame in sample(_video_frames(source.path), fps, source.path):
            yield t, frame.to_ndarray(format="rgb24")


def decode(source: VideoSource, fps: float, native_fps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All sampled frames of a video at once: ([n, H, W, 3] uint8, [n] seconds)."""
    times, frames = zip(*iter_frames(source, fps, native_fps))
    return np.stack(frames), np.asarray(times, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, center-crop a square, scale to [0, 1] and normalise."""

    crop: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """[n, H, W, 3] uint8 RGB -> [n, 3, crop, crop] float32."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [n, 3, H, W]
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 255)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[:, :, top : top + self.crop, left : left + self.crop]  # [n, 3, crop, crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std).view(1, 3, 1, 1) * 255
        return ((x - mean) / std).contiguous()

    def as_dict(self) -> dict:
        return {"crop": self.crop, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}


def iter_batches(
    source: VideoSource, fps: float, preprocess: Preprocess, batch_size: int, native_fps: float | None = None
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """([b, 3, S, S] float32, [b] seconds) batches of a video's sampled, preprocessed frames.

    Frames are preprocessed one at a time so that only a few full-size frames are held.
    """
    pixels: list[torch.Tensor] = []
    times: list[float] = []
    for t, frame in iter_frames(source, fps, native_fps):
        pixels.append(preprocess(frame[None])[0])  # [3, S, S]
        times.append(t)
        if len(pixels) == batch_size:
            yield torch.stack(pixels), np.asarray(times)
            pixels, times = [], []
    if pixels:
        yield torch.stack(pixels), np.asarray(times)


# ---------------------------------------------------------------------------------------
# Background decoding


def _produce(produce: Callable[[VideoSource], Iterable], source: VideoSource, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in produce(source):
            if not put_until(q, ("item", item), stop):
                return
        put_until(q, ("end", None), stop)
    except Exception as e:  # handed to the consumer, which decides what is fatal
        put_until(q, ("error", e), stop)


def _drain(q: queue.Queue) -> Iterator:
    while True:
        kind, item = q.get()
        if kind == "end":
            return
        if kind == "error":
            raise item
        yield item


def prefetch(
    sources: Iterable[VideoSource], produce: Callable[[VideoSource], Iterable[T]], workers: int, depth: int = 4
) -> Iterator[tuple[VideoSource, Iterator[T]]]:
    """Yield ``(source, items)`` in order while ``workers`` threads run ``produce`` ahead.

    Each video's items pass through a queue of ``depth`` entries, so at most ``workers + 1``
    videos are in flight. A video's error is raised when its items are read. ``workers = 0``
    produces in the calling thread.
    """
    if workers <= 0:
        for source in sources:
            yield source, iter(produce(source))
        return
    stop = threading.Event()
    it = iter(sources)
    in_flight: deque[tuple[VideoSource, queue.Queue]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:

        def submit() -> None:
            source = next(it, None)
            if source is not None:
                q: queue.Queue = queue.Queue(depth)
                pool.submit(_produce, produce, source, q, stop)
                in_flight.append((source, q))

        try:
            for _ in range(workers):
                submit()
            while in_flight:
                source, q = in_flight.popleft()
                submit()
                yield source, _drain(q)
        finally:
            stop.set()
