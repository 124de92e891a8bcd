"""Decode videos and frame folders and sample them at a fixed rate, as uint8 RGB frames.

A video is a file PyAV can open (mp4, webm, mkv, ...) or a folder of JPEG frames named
``frame_0000000001.jpg`` as EPIC-KITCHENS ships them; its id is the file stem or the
folder name. Timestamps are seconds: a video file's from its first frame (pts), a frame
folder's frame number / its native frame rate (the annotation convention).

Sampling at ``fps`` keeps, for each time ``k / fps``, the frame on screen at that time,
and only while the video lasts the whole sample period ``[k / fps, (k + 1) / fps)``; so a
video of duration ``d`` gives ``floor(d * fps)`` frames (if its own rate is at least ``fps``)
and one shorter than a period none.
``fps = 0`` keeps every frame.

Two readers give the same sampled frames. :func:`iter_frames` is the reference: it decodes
every frame and converts the kept ones to full-size RGB. :class:`SampledFrames` is what the
build's decoding workers run: it plans from the packets' timestamps which frames are kept
and decodes only the GOPs (keyframe to keyframe) that hold them, checking the plan against
what the decoder returns; it converts kept frames only, scales them in FFmpeg (swscale) to
the size the model's preprocessing resizes to, reads JPEGs at a reduced DCT scale, and can
use a hardware decoder. This module does not import torch: the workers do not need it.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

import numpy as np

from kdstore.errors import ConfigError, DataError

if TYPE_CHECKING:
    import av

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_FILE = re.compile(r"^frame_(\d+)\.jpe?g$", re.IGNORECASE)
EPS = 1e-6  # seconds: slack when comparing frame times with sample times
# A container that declares more than this much video beyond the last frame (seconds, or
# fraction of its duration, whichever is larger) was truncated.
TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAC = 0.5, 0.05
SCALER = "BILINEAR"  # swscale's bilinear widens its filter when shrinking: antialiased like torch's

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


def resized_size(height: int, width: int, resize: int, crop: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``resize``, each side at least ``crop``."""
    scale = resize / min(height, width)
    return max(crop, round(height * scale)), max(crop, round(width * scale))


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


def _seconds(pts: int, time_base: Fraction) -> float:
    return float(pts * time_base)


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


def _check_complete(path: Path, end: float, stream) -> None:
    """DataError if the container declares much more video than its frames reach (``end`` s)."""
    declared = _declared_duration(stream)
    if declared - end > max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAC * declared):
        raise DataError(f"{path}: truncated video (frames end at {end:.2f} s, the container declares {declared:.2f} s)")


def _video_stream(container, path: Path):
    """The container's first video stream; DataError (the container closed) if it has none."""
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: no video stream")
    return container.streams.video[0]


def _cannot_decode(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot decode video ({getattr(e, 'strerror', None) or type(e).__name__})")


def _open_software(path: Path, threads: int = 0):
    """A container whose first video stream decodes frame-parallel on ``threads`` (0: FFmpeg's choice)."""
    import av

    container = av.open(str(path))
    stream = _video_stream(container, path)
    stream.thread_type = "AUTO"  # frame- and slice-parallel decoding inside FFmpeg
    stream.thread_count = threads
    return container


def _video_frames(path: Path, open_video=_open_software) -> Iterator[tuple[float, float, av.VideoFrame]]:
    """(start, end, av.VideoFrame) of every frame of a video file in presentation order, from t = 0."""
    import av

    try:
        with open_video(path) as container:
            stream = _video_stream(container, path)
            tb = stream.time_base or Fraction(0)
            step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
            t0, last, index = None, None, 0
            for frame in container.decode(stream):
                t = _seconds(frame.pts, tb) if frame.pts is not None else index * step
                index += 1
                t0 = t if t0 is None else t0
                t -= t0
                if last is not None and t <= last:
                    continue  # repeated or out-of-order pts: keep the first
                duration = _seconds(frame.duration or 0, tb) or step
                last = t
                yield t, t + duration, frame
            if last is not None:
                _check_complete(path, last + duration, stream)
    except av.FFmpegError as e:
        raise _cannot_decode(path, e) from None


def _folder_frames(path: Path, native_fps: float) -> Iterator[tuple[float, float, Path]]:
    """(start, end, jpg path) of a frame folder; frame ``n`` starts at ``n / native_fps``."""
    if not native_fps or native_fps <= 0:
        raise ConfigError(f"{path}: a frame folder needs its native frame rate (--native-fps)")
    for n, p in _frame_files(path):
        yield n / native_fps, (n + 1) / native_fps, p


def _load_image(path: Path, resize: int = 0, crop: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """([h, w, 3] uint8 RGB, its full (height, width)) of an image file (Pillow if installed,
    else PyAV). With ``resize``, a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps it at least :func:`resized_size`."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        import av

        try:
            with av.open(str(path)) as c:
                image = next(c.decode(video=0)).to_ndarray(format="rgb24")
                return image, image.shape[:2]
        except (av.FFmpegError, StopIteration) as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None
    try:
        with Image.open(path) as im:
            full = (im.height, im.width)
            if resize:
                h, w = resized_size(*full, resize, crop)
                im.draft("RGB", (w, h))
            return np.array(im.convert("RGB")), full  # a writable copy, as torch.from_numpy wants
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def read_image(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB of an image file, full size."""
    return _load_image(path)[0]


def iter_frames(source: VideoSource, fps: float, native_fps: float | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """(timestamp, [H, W, 3] uint8 RGB) of each sampled frame of ``source``: the reference
    reader (every frame decoded, the kept ones converted at full size)."""
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
# The build's reader: planned GOPs, scaled frames, hardware decoding


RESTART = "restart"  # SampledFrames' marker: the frames yielded before it are void


@dataclass(frozen=True)
class DecodeOptions:
    """How :class:`SampledFrames` decodes; JSON-serialisable (handed to worker processes)."""

    fps: float
    native_fps: float = 0.0  # frame folders' frame rate
    resize: int = 0  # scale frames down so that the shorter side is ``resize`` (0: full size)
    crop: int = 0  # neither side below ``crop`` after scaling (the model's crop)
    skip: bool = True  # decode only the GOPs that hold sampled frames
    hwaccel: str | None = None  # an FFmpeg hardware device type ("cuda"); None: software
    hw_device: str | None = None  # the device's index
    threads: int = 0  # FFmpeg decoding threads per video (0: FFmpeg's choice)


def probe_hwaccel(device_type: str, device: str | None = None) -> str | None:
    """None if FFmpeg opens an H.264 decoder on ``device_type``, else why not (one line)."""
    import av

    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available
    except ImportError:
        return f"PyAV {av.__version__} has no hardware decoding"
    if device_type not in hwdevices_available():
        return f"this FFmpeg has no {device_type} decoding ({', '.join(hwdevices_available()) or 'none'})"
    try:
        HWAccel(device_type, device=device).create(av.codec.Codec("h264", "r"))
    except (av.FFmpegError, ValueError, RuntimeError) as e:
        return f"{device_type} device unavailable ({getattr(e, 'strerror', None) or e})"
    return None


class _PlanMismatch(Exception):
    """The decoder's frames disagree with the plan made from the packets."""


class SampledFrames:
    """``(t, [h, w, 3] uint8 RGB)`` of each sampled frame of ``source``, decoded as ``options`` say.

    Frames and times equal :func:`iter_frames`'s, except that frames are scaled down in FFmpeg
    (``options.resize``) or read at a reduced JPEG scale. If a GOP plan does not match the
    decoder's frames it yields :data:`RESTART` and then every sampled frame again from a full
    decode. While iterating: ``source_size`` (the last frame's (height, width) before
    scaling), ``decoder`` ("software" or the hardware device type) and ``decoded`` (frames
    the decoder returned).
    """

    def __init__(self, source: VideoSource, options: DecodeOptions):
        self.source, self.options = source, options
        self.source_size: tuple[int, int] = (0, 0)
        self.decoder = "software"
        self.decoded = 0
        self._scaler = None

    def __iter__(self) -> Iterator[tuple[float, np.ndarray] | str]:
        if self.source.is_folder:
            yield from self._folder()
            return
        import av

        o = self.options
        try:
            planned = self._plan() if o.skip and o.fps > 0 else None
            if planned is not None:
                try:
                    yield from self._decode_planned(*planned)
                    return
                except _PlanMismatch:
                    yield RESTART
            for t, frame in sample(self._counted(_video_frames(self.source.path, self._open)), o.fps, self.source.path):
                yield t, self._convert(frame)
        except av.FFmpegError as e:
            raise _cannot_decode(self.source.path, e) from None

    def _folder(self) -> Iterator[tuple[float, np.ndarray]]:
        o = self.options
        for t, path in sample(_folder_frames(self.source.path, o.native_fps), o.fps, self.source.path):
            image, self.source_size = _load_image(path, o.resize, o.crop)
            self.decoded += 1
            yield t, image

    def _counted(self, frames: Iterable[T]) -> Iterator[T]:
        for item in frames:
            self.decoded += 1
            yield item

    def _open(self, path: Path):
        """The container, on the hardware decoder if one is set and takes this stream."""
        import av

        o = self.options
        if o.hwaccel:
            from av.codec.hwaccel import HWAccel

            try:
                container = av.open(str(path), hwaccel=HWAccel(o.hwaccel, device=o.hw_device, allow_software_fallback=True))
            except av.InvalidDataError:
                raise
            except av.FFmpegError:
                pass  # the device refused this stream: software below
            else:
                if _video_stream(container, path).codec_context.is_hwaccel:
                    self.decoder = o.hwaccel
                    return container
                container.close()
        self.decoder = "software"
        return _open_software(path, o.threads)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        """Kept frames only: RGB, scaled down to the model's resize in swscale if asked."""
        o = self.options
        self.source_size = full = (frame.height, frame.width)
        if o.resize:
            h, w = resized_size(*full, o.resize, o.crop)
            if h <= full[0] and w <= full[1] and (h, w) != full:
                if self._scaler is None:
                    from av.video.reformatter import VideoReformatter

                    self._scaler = VideoReformatter()  # keeps its swscale context between frames
                return self._scaler.reformat(frame, width=w, height=h, format="rgb24", interpolation=SCALER).to_ndarray()
        return frame.to_ndarray(format="rgb24")

    def _plan(self) -> tuple[dict[int, float], set[int], np.ndarray, np.ndarray] | None:
        """From the packets alone: (kept pts -> time, every frame's pts, [packets] which to feed
        the decoder, [packets] which hold a kept frame, in demux order); None if some packet
        has no pts."""
        import av

        path = self.source.path
        pts, dur, key, shown = [], [], [], []
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            tb = stream.time_base or Fraction(0)
            step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
            for p in container.demux(stream):
                if p.size == 0:
                    continue  # the demuxer's final empty packet
                if p.pts is None:
                    return None
                pts.append(p.pts)
                dur.append(p.duration or 0)
                key.append(p.is_keyframe)
                shown.append(not getattr(p, "is_discard", False))
            first: dict[int, int] = {}  # pts -> duration of its first packet (repeated pts: the first)
            for p, d, s in zip(pts, dur, shown):
                if s:
                    first.setdefault(p, d)
            order = sorted(first)
            t0 = _seconds(order[0], tb) if order else 0.0
            frames = [(_seconds(p, tb) - t0, _seconds(p, tb) - t0 + (_seconds(first[p], tb) or step), p) for p in order]
            if frames:
                _check_complete(path, frames[-1][1], stream)
            kept = {p: t for t, p in sample(frames, self.options.fps, path)}
        pts_a = np.asarray(pts)
        keep = np.fromiter((p in kept for p in pts), bool, len(pts)) & np.asarray(shown)
        gop = np.cumsum(key)  # GOP of each packet: a keyframe starts one
        starts = np.flatnonzero(np.r_[True, gop[1:] != gop[:-1]])
        ends = np.r_[starts[1:], len(pts)]
        feed = np.zeros(len(pts), bool)
        for g, (a, b) in enumerate(zip(starts, ends)):
            hit = np.flatnonzero(keep[a:b])
            if len(hit):
                feed[a : a + hit[-1] + 1] = True  # the GOP up to its last kept frame in decode order
                if g and (pts_a[a + hit] < pts_a[a]).any():  # shown before its keyframe: an open GOP
                    feed[starts[g - 1] : a] = True  # may reference the GOP before
        return kept, set(order), feed, keep

    def _decode_planned(self, kept: dict[int, float], known: set[int], feed: np.ndarray,
                        keep: np.ndarray) -> Iterator[tuple[float, np.ndarray]]:
        """Decode the fed packets, flushing the decoder before each skipped stretch; raise
        _PlanMismatch unless the decoder returns exactly the planned frames. A single-threaded
        software decoder also drops the fed frames that are neither kept nor referenced
        (``skip_frame``, set per packet: with frame threads it would reach the wrong frame)."""
        emitted, last = set(), -math.inf

        def take(frames) -> Iterator[tuple[float, np.ndarray]]:
            nonlocal last
            for f in frames:
                self.decoded += 1
                if f.pts not in known:
                    raise _PlanMismatch(f"frame pts {f.pts} is not a packet's")
                if f.pts in kept and f.pts not in emitted:
                    t = kept[f.pts]
                    if t <= last or f.is_corrupt:
                        raise _PlanMismatch(f"frame at {t:.3f} s out of order or corrupt")
                    emitted.add(f.pts)
                    last = t
                    yield t, self._convert(f)

        path = self.source.path
        with self._open(path) as container:
            stream = _video_stream(container, path)
            codec = stream.codec_context
            drop_unreferenced = self.options.threads == 1 and self.decoder == "software"
            i, fed = 0, False
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if i >= len(feed):
                    raise _PlanMismatch("more packets than planned")
                if feed[i]:
                    if drop_unreferenced:
                        codec.skip_frame = "DEFAULT" if keep[i] else "NONREF"
                    yield from take(stream.decode(packet))
                    fed = True
                elif fed:  # drain the frames still in the decoder, then restart it at the next keyframe
                    yield from take(stream.decode(None))
                    codec.flush_buffers()
                    fed = False
                i += 1
            if fed:
                yield from take(stream.decode(None))
        if len(emitted) != len(kept):
            raise _PlanMismatch(f"{len(kept) - len(emitted)} planned frames not decoded")
