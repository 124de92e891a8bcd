"""Import existing per-frame features into ``video/<name>``.

- RULSTM LMDB feature sets (what AVT trains on): keys ``<video>_frame_<10-digit n>.jpg``,
  values raw float32 vectors; frame ``n`` is at ``n / native_fps`` seconds
  (kdstore/rulstm_lmdb.py).
- Per-video ``.npy``/``.npz`` arrays ``[n, D]`` in one folder, named by video id; frame
  ``i`` is at ``i / native_fps`` seconds.

An import streams one video at a time: its timestamps first, then only the features it
keeps, so its memory does not grow with the source. ``fps`` keeps the frames nearest a
regular grid and ``windows`` only those a student window can reach
(kdstore/selection.py). Each video is staged through the store's VideoWriter, so a
killed import resumes at the next video, from the same source and selection only. Before
committing, an import can check that every segment sees frames in its observed window.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.features import VideoWriter
from kdstore.provenance import provenance_entry
from kdstore.store import Store
from kdstore.tables import SegmentTable

from .rulstm_lmdb import RulstmLmdb
from .selection import Selection, WindowSpec
from .windows import ticks

DEFAULT_WINDOW_S = 10.0  # AVT observes 10 frames at 1 fps before the anticipation gap
BLOCK_ROWS = 4096  # feature rows read and written at a time


@dataclass
class ImportReport:
    """What an import did."""

    name: str
    videos: int  # videos imported by this run
    skipped: int  # videos staged by an earlier, interrupted run
    frames: int  # frames written by this run
    bytes_written: int  # feature bytes stored by this run
    seconds: float
    source_frames: int = 0  # frames in the source (all its videos)
    kept_frames: int = 0  # of those, the frames the selection kept


def _progress(total: int | None, description: str, show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=Console(stderr=True), disable=not show,
    )
    return bar, bar.add_task(description, total=total, info="")


# ---------------------------------------------------------------------------------------
# Segments: window starts per video, and the check of observed windows


class _Segments:
    """The segment table by video: start times for window selection, and the check that
    every segment sees a frame in ``[start - window, start]``, video by video."""

    def __init__(self, segments: SegmentTable, window: float):
        self.segments, self.window = segments, window
        self._starts = segments.start_seconds()  # [N]
        order = np.argsort(segments.video, kind="stable")
        bounds = np.searchsorted(segments.video[order], np.arange(len(segments.videos) + 1))
        self.rows = {v: order[bounds[i] : bounds[i + 1]] for i, v in enumerate(segments.videos)}
        self.problems: list[tuple[type, str]] = []
        self.seen: set[str] = set()

    def starts(self, video: str) -> np.ndarray:
        """[m] start seconds of ``video``'s segments (empty for a video without segments)."""
        return self._starts[self.rows.get(video, np.zeros(0, np.int64))]

    def check(self, video: str, ts: np.ndarray) -> None:
        """Note the segments of ``video`` that see no frame at ``ts`` [n] in their window."""
        self.seen.add(video)
        rows = self.rows.get(video, np.zeros(0, np.int64))
        seg, starts = self.segments, self._starts[rows]
        t = ticks(ts)  # [n] compared in integer microseconds, as the student's windows are
        last = np.searchsorted(t, ticks(starts), side="right") - 1  # [m] last frame at or before the start
        seen = (last >= 0) & (t[np.maximum(last, 0)] >= ticks(starts - self.window))
        self.problems += [
            (DataError, f"UID {seg.uid[r]} (video {video}): no frame in [{s - self.window:.2f} s, {s:.2f} s]")
            for r, s in zip(rows[~seen], starts[~seen])
        ]

    def finish(self, store: Store, name: str) -> None:
        """Check the stored videos a commit keeps; raise if any segment lacks frames
        (MissingError when its video has none at all), naming the UIDs and videos."""
        stored = store.video(name) if name in store.feature_sets() else None
        for video, rows in self.rows.items():
            if video in self.seen or not len(rows):
                continue
            if stored is not None and video in stored.videos:
                self.check(video, np.asarray(stored.frames(video)[1]))
            else:
                self.problems += [(MissingError, f"UID {self.segments.uid[r]} (video {video}): the video has no frames") for r in rows]
        if self.problems:
            more = f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
            listed = "; ".join(msg for _, msg in self.problems[:5])
            raise self.problems[0][0](f"video/{name}: {len(self.problems)} segment(s) lack frames: {listed}{more}")


# ---------------------------------------------------------------------------------------
# The import loop shared by both sources


def _describe(source: dict) -> str:
    return f"{source.get('format', 'an unrecorded source')} {source.get('path') or ''}".strip()


@dataclass
class _Origin:
    """Where the videos of a feature set come from: its sources, and each video's source index."""

    sources: list[dict]
    per_video: dict[str, int]
    index: int  # of this import's source

    def check(self, name: str, videos: Iterable[str]) -> None:
        """Refuse to replace a stored video of another source (``--append`` adds videos only)."""
        for video in videos:
            if self.per_video.get(video, self.index) != self.index:
                raise ConfigError(f"video/{name}: video {video!r} is already in the set from"
                                  f" {_describe(self.sources[self.per_video[video]])}: --append adds only new videos;"
                                  " pass --overwrite to replace the set")


def _origin(store: Store, name: str, source: dict, mode: str) -> _Origin:
    """The sources of ``video/<name>`` after this import and the source index of each kept
    stored video. The set grows from another source only with ``mode="append"``; "overwrite"
    replaces it; "new" refuses a set of that name from another source."""
    if name not in store.feature_sets() or mode == "overwrite":
        return _Origin([source], {}, 0)
    attrs = store.video(name).attrs
    sources = attrs.get("sources") or [{"format": attrs.get("source", "an unrecorded source"), "path": attrs.get("path")}]
    per_video = attrs.get("video_sources") or {v: 0 for v in attrs["videos"]}
    if source in sources:
        return _Origin(sources, per_video, sources.index(source))
    if mode != "append":
        raise ConfigError(f"video/{name}: holds features from {_describe(sources[-1])}, this import reads"
                          f" {_describe(source)}: pass --overwrite to replace the set, or --append to add this"
                          " source's videos to it (recorded per video)")
    return _Origin([*sources, source], per_video, len(sources))


def _writer(store: Store, name: str, dim: int, dtype: str, selection: Selection, source: dict, attrs: dict,
            restart: bool, frame_rate: float | None, mode: str,
            videos: Callable[[], Iterable[str]]) -> tuple[VideoWriter, _Origin]:
    """A writer whose partial build resumes only for the same source, selection and mode."""
    if mode not in ("new", "append", "overwrite"):
        raise ConfigError(f"import mode {mode!r}: expected new, append or overwrite")
    if name in store.feature_sets() and mode != "overwrite":
        stored = store.video(name).attrs.get("selection") or Selection().to_json()
        if stored != selection.to_json():
            raise ConfigError(
                f"video/{name} holds frames selected by {stored}, this import selects {selection.to_json()}:"
                " import under another --name, or pass --overwrite to replace the set"
            )
    origin = _origin(store, name, source, mode)
    if len(origin.sources) > 1:  # a set of several sources: no video may change source (checked before staging)
        origin.check(name, videos())
    settings = {"source": source, "selection": selection.to_json(), "mode": mode}
    if selection.windows is not None:  # the windows follow the segment table
        settings["segments_sha256"] = store.manifest["segments_sha256"]
    writer = store.video_writer(name, dim, dtype, frame_rate=frame_rate, settings=settings, restart=restart,
                                replace=mode == "overwrite",
                                attrs={**attrs, "selection": selection.to_json(), "sources": origin.sources})
    return writer, origin


def _run(store: Store, writer: VideoWriter, origin: _Origin, videos: Iterator[tuple[str, np.ndarray, object]], read, *, selection: Selection,
         check: bool, window: float, total: int | None, unit: str, progress: bool, provenance: dict) -> ImportReport:
    """Select, stage and commit each ``(video, timestamps [n], handle)``; ``read(handle, keep)``
    yields the kept feature rows of a video in blocks."""
    t0 = time.perf_counter()
    segs = _Segments(store.segments, window)
    source_frames: dict[str, int] = {}
    videos_done = frames = skipped = kept = 0
    bar, task = _progress(total, f"video/{writer.name}", progress)
    with bar:
        for video, ts_all, handle in videos:
            keep = selection.mask(ts_all, segs.starts(video))  # [n] bool
            ts = ts_all[keep]
            source_frames[video] = len(ts_all)
            kept += len(ts)
            if writer.done(video):
                skipped += 1
            else:
                writer.put(video, read(handle, keep), ts)
                videos_done, frames = videos_done + 1, frames + len(ts)
            if check:
                segs.check(video, ts)
            rate = frames / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, advance=len(ts_all) if unit == "frames" else 1, info=f"{video}, {rate:.0f} frames/s")
    if check:
        segs.finish(store, writer.name)
    source = sum(source_frames.values())
    if writer.name in store.feature_sets() and not writer.replace:  # the counts of stored videos that the commit keeps
        source_frames = {**store.video(writer.name).attrs.get("source_frames", {}), **source_frames}
    writer.attrs["source_frames"] = source_frames
    writer.attrs["video_sources"] = {**origin.per_video, **{s.video: origin.index for s in writer.staged()}}
    writer.commit(provenance)
    return ImportReport(writer.name, videos_done, skipped, frames, frames * writer.dim * np.dtype(writer.dtype).itemsize,
                        time.perf_counter() - t0, source, kept)


def _selection(fps: float | None, windows: WindowSpec | None) -> Selection:
    return Selection(float(fps) if fps is not None else None, windows)


# ---------------------------------------------------------------------------------------
# RULSTM LMDB


def import_lmdb(
    store: Store,
    path: str | Path,
    name: str,
    *,
    native_fps: float | None = None,
    dtype: str = "float16",
    fps: float | None = None,
    windows: WindowSpec | None = None,
    check: bool = False,
    window: float = DEFAULT_WINDOW_S,
    restart: bool = False,
    progress: bool = True,
    mode: str = "new",
) -> ImportReport:
    """Import a RULSTM LMDB as ``video/<name>``; frame ``n`` is at ``n / native_fps`` s
    (default the store's segments.fps). ``fps``/``windows``: keep only the frames nearest
    a grid / that student windows reach. ``check``: verify segment windows before committing.
    ``restart``: discard a partial import instead of resuming it. ``mode``: "new" refuses a
    stored set of that name from another source; "append" adds this source's videos to it
    (recorded per video in the attribute ``video_sources``); "overwrite" replaces it."""
    native_fps = float(native_fps or store.segments.fps)
    if native_fps <= 0:
        raise ConfigError(f"--native-fps must be positive, found {native_fps}")
    selection = _selection(fps, windows)
    with RulstmLmdb(path) as src:
        source = {"format": "lmdb", **src.identity(), "native_fps": native_fps}
        writer, origin = _writer(store, name, src.dim, dtype, selection, source, restart=restart, frame_rate=selection.fps, mode=mode,
                                 videos=lambda: [v.name for v in src.videos()],
                         attrs={"source": "rulstm-lmdb", "native_fps": native_fps, "path": str(path)})
        videos = ((v.name, v.numbers / native_fps, v) for v in src.videos())
        return _run(store, writer, origin, videos, lambda v, keep: src.read(v, keep, BLOCK_ROWS), selection=selection, check=check,
                    window=window, total=src.entries, unit="frames", progress=progress,
                    provenance=provenance_entry("import_features", group=f"video/{name}", format="lmdb", source=str(path),
                                                native_fps=native_fps, selection=selection.to_json()))


# ---------------------------------------------------------------------------------------
# Per-video .npy / .npz


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "features" not in keys and len(keys) != 1:
                    raise DataError(f"{path}: expected one array or one named 'features', found {keys}")
                arr = z["features" if "features" in keys else keys[0]]
        else:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the array ({str(e).splitlines()[0]})") from None
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{path}: holds {arr.dtype} values, expected numbers (float or integer features)")
    return arr


def _array_rows(feats: np.ndarray, keep: np.ndarray) -> Iterator[np.ndarray]:
    """The kept rows of one video's array, in blocks (a memory-mapped .npy is read block by block)."""
    for i in range(0, len(feats), BLOCK_ROWS):
        yield np.asarray(feats[i : i + BLOCK_ROWS][keep[i : i + BLOCK_ROWS]])


def import_arrays(
    store: Store,
    folder: str | Path,
    name: str,
    *,
    native_fps: float,
    dtype: str = "float16",
    fps: float | None = None,
    windows: WindowSpec | None = None,
    check: bool = False,
    window: float = DEFAULT_WINDOW_S,
    restart: bool = False,
    progress: bool = True,
    mode: str = "new",
) -> ImportReport:
    """Import one ``<video>.npy``/``<video>.npz`` ``[n, D]`` array per video from ``folder``
    as ``video/<name>``; frame ``i`` is at ``i / native_fps`` seconds. The other options
    are :func:`import_lmdb`'s."""
    folder = Path(folder)
    if not native_fps or native_fps <= 0:
        raise ConfigError("importing arrays needs their frame rate (--native-fps > 0)")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of .npy/.npz arrays")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise ConfigError(f"{folder}: no .npy or .npz files in it")
    seen: dict[str, Path] = {}
    for p in files:
        if seen.setdefault(p.stem, p) != p:
            raise ConfigError(f"video id {p.stem!r} given twice: {seen[p.stem]} and {p}")
    first = _load_array(files[0])
    if first.ndim != 2:
        raise DataError(f"{files[0]}: expected a [frames, D] array, found shape {list(first.shape)}")
    selection = _selection(fps, windows)
    listing = hashlib.sha256()  # the files, their sizes and times: a changed folder is another source
    for p in files:
        st = p.stat()
        listing.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    source = {"format": "arrays", "path": str(folder.resolve()), "files_sha256": listing.hexdigest(), "native_fps": float(native_fps)}
    writer, origin = _writer(store, name, first.shape[1], dtype, selection, source, restart=restart, mode=mode,
                             videos=lambda: [p.stem for p in files],
                     frame_rate=selection.fps or float(native_fps),
                     attrs={"source": "arrays", "native_fps": float(native_fps), "path": str(folder)})

    def videos():
        for p in files:
            feats = _load_array(p)
            if feats.ndim != 2:
                raise DataError(f"{p}: expected a [frames, D] array, found shape {list(feats.shape)}")
            yield p.stem, np.arange(len(feats)) / native_fps, feats

    return _run(store, writer, origin, videos(), _array_rows, selection=selection, check=check,
                window=window, total=len(files), unit="videos", progress=progress,
                provenance=provenance_entry("import_features", group=f"video/{name}", format="arrays", source=str(folder),
                                            native_fps=native_fps, selection=selection.to_json()))
