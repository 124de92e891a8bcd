"""Import existing per-frame features into ``video/<name>``.

- RULSTM LMDB feature sets (what AVT trains on): keys ``<video>_frame_<10-digit n>.jpg``,
  values raw float32 vectors; frame ``n`` is at ``n / native_fps`` seconds.
- Per-video ``.npy``/``.npz`` arrays ``[n, D]`` in one folder, named by video id; frame
  ``i`` is at ``i / fps`` seconds.

Both stage each video through the store's VideoWriter (an interrupted import resumes) and
can check, before committing, that every segment sees frames in its observed window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kdstore.annotations import SegmentTable
from kdstore.errors import ConfigError, DataError, DependencyError, MissingError
from kdstore.store import Store, provenance_entry

DEFAULT_WINDOW_S = 10.0  # AVT observes 10 frames at 1 fps before the anticipation gap


@dataclass
class ImportReport:
    """What an import did."""

    name: str
    videos: int  # videos imported by this run
    skipped: int  # videos staged by an earlier, interrupted run
    frames: int
    bytes_written: int  # feature bytes stored by this run
    seconds: float


def _progress(total: int | None, description: str, show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=Console(stderr=True), disable=not show,
    )
    return bar, bar.add_task(description, total=total, info="")


# ---------------------------------------------------------------------------------------
# Segment check


def check_segments(segments: SegmentTable, times: dict[str, np.ndarray], name: str, window: float = DEFAULT_WINDOW_S) -> None:
    """Raise if a segment's video has no frames (MissingError) or no frame lies in its
    observed window ``[start - window, start]`` (DataError); names the UIDs and videos."""
    starts = segments.start_seconds()  # [N]
    problems: list[tuple[type, str]] = []
    for v, video in enumerate(segments.videos):
        rows = np.flatnonzero(segments.video == v)
        if not len(rows):
            continue
        ts = times.get(video)
        if ts is None or not len(ts):
            problems += [(MissingError, f"UID {segments.uid[r]} (video {video}): the video has no frames") for r in rows]
            continue
        last = np.searchsorted(ts, starts[rows] + 1e-9, side="right") - 1  # [n] last frame at or before the start
        seen = (last >= 0) & (ts[np.maximum(last, 0)] >= starts[rows] - window)
        problems += [
            (DataError, f"UID {segments.uid[r]} (video {video}): no frame in [{starts[r] - window:.2f} s, {starts[r]:.2f} s]")
            for r in rows[~seen]
        ]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        listed = "; ".join(msg for _, msg in problems[:5])
        raise problems[0][0](f"video/{name}: {len(problems)} segment(s) lack frames: {listed}{more}")


def _stored_times(store: Store, name: str, keep: set[str]) -> dict[str, np.ndarray]:
    """Timestamps of the videos already in ``video/<name>`` that a commit keeps."""
    if name not in store.feature_sets():
        return {}
    fs = store.video(name)
    return {v: fs.frames(v)[1] for v in fs.videos if v not in keep}


# ---------------------------------------------------------------------------------------
# RULSTM LMDB


def _open_lmdb(path: Path):
    try:
        import lmdb
    except ImportError:
        raise DependencyError("importing LMDB features needs lmdb: pip install 'kdstore[lmdb]'") from None
    if not path.exists():
        raise ConfigError(f"{path}: no such LMDB")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir(), readahead=True)
    except lmdb.Error as e:
        raise DataError(f"{path}: not a readable LMDB ({e})") from None


def _parse_key(path: Path, key: bytes) -> tuple[bytes, int]:
    video, sep, rest = key.rpartition(b"_frame_")
    if not sep or not video or not rest.endswith(b".jpg") or not rest[:-4].isdigit():
        raise DataError(f"{path}: key {key[:80]!r} is not <video>_frame_<number>.jpg")
    return video, int(rest[:-4])


def _lmdb_dim(path: Path) -> tuple[int, int]:
    """(feature dimension, number of entries), from the first LMDB entry."""
    env = _open_lmdb(path)
    try:
        with env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.first():
                raise DataError(f"{path}: the LMDB is empty")
            n = len(cursor.value())
            if n % 4 or not n:
                raise DataError(f"{path}: value of {cursor.key().decode(errors='replace')!r} has {n} bytes, not float32 features")
            return n // 4, env.stat()["entries"]
    finally:
        env.close()


def iter_lmdb(path: Path, dim: int, skip: set[str] = frozenset()) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(video, frame numbers [n] int64, features [n, dim] float32) per video, frame-sorted.

    Reads the cursor sequentially (keys sort by video, then frame); the features of
    videos in ``skip`` are not read (None).
    """
    env = _open_lmdb(path)
    skip_keys = {v.encode() for v in skip}
    current, frames, values, finished = None, [], [], set()

    def flush():
        numbers = np.asarray(frames, dtype=np.int64)  # [n]
        order = np.argsort(numbers, kind="stable")
        if current in skip_keys:
            return current.decode(), numbers[order], None
        feats = np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(frames), dim)  # [n, D]
        return current.decode(), numbers[order], feats[order]

    try:
        with env.begin(buffers=True) as txn:  # values are views into the map until joined
            for key, value in txn.cursor():
                key = bytes(key)
                video, frame = _parse_key(path, key)
                if video != current:
                    if current is not None:
                        yield flush()
                        finished.add(current)
                    if video in finished:
                        raise DataError(f"{path}: frames of video {video.decode()!r} are not contiguous in key order")
                    current, frames, values = video, [], []
                if len(value) != 4 * dim:
                    raise DataError(f"{path}: {key.decode()!r} holds {len(value) / 4:g} float32 features, the first key {dim}")
                frames.append(frame)
                if video not in skip_keys:
                    values.append(value)
            if current is not None:
                yield flush()
    finally:
        env.close()


def import_lmdb(
    store: Store | str | Path,
    path: str | Path,
    name: str,
    *,
    native_fps: float | None = None,
    dtype: str = "float16",
    check: bool = False,
    window: float = DEFAULT_WINDOW_S,
    progress: bool = True,
) -> ImportReport:
    """Import a RULSTM LMDB as ``video/<name>``; frame ``n`` is at ``n / native_fps`` s
    (default the store's segments.fps). ``check``: verify segment windows before committing."""
    t0 = time.perf_counter()
    store = store if isinstance(store, Store) else Store.open(store)
    path = Path(path)
    native_fps = float(native_fps or store.segments.fps)
    if native_fps <= 0:
        raise ConfigError(f"--native-fps must be positive, found {native_fps}")
    dim, entries = _lmdb_dim(path)
    writer = store.video_writer(name, dim, dtype, attrs={"source": "rulstm-lmdb", "native_fps": native_fps, "path": str(path)})
    done = {s.video for s in writer.staged()}
    times: dict[str, np.ndarray] = {}
    videos = frames = 0
    bar, task = _progress(entries, f"video/{name}", progress)
    with bar:
        for vid, numbers, feats in iter_lmdb(path, dim, skip=done):
            times[vid] = numbers / native_fps  # [n] seconds
            if feats is not None:
                writer.put(vid, feats, times[vid])
                videos, frames = videos + 1, frames + len(feats)
            bar.update(task, advance=len(numbers), info=f"{vid}, {frames / (time.perf_counter() - t0):.0f} frames/s")
    if check:
        check_segments(store.segments, {**_stored_times(store, name, set(times)), **times}, name, window)
    writer.commit(provenance_entry("import_features", group=f"video/{name}", format="lmdb", source=str(path), native_fps=native_fps))
    return ImportReport(name, videos, len(done & set(times)), frames, frames * dim * np.dtype(dtype).itemsize, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# Per-video .npy / .npz


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "features" in keys or len(keys) == 1:
                    return z["features" if "features" in keys else keys[0]]
                raise DataError(f"{path}: expected one array or one named 'features', found {keys}")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the array ({str(e).splitlines()[0]})") from None


def import_arrays(
    store: Store | str | Path,
    folder: str | Path,
    name: str,
    *,
    fps: float,
    dtype: str = "float16",
    check: bool = False,
    window: float = DEFAULT_WINDOW_S,
    progress: bool = True,
) -> ImportReport:
    """Import one ``<video>.npy``/``<video>.npz`` ``[n, D]`` array per video from ``folder``
    as ``video/<name>``; frame ``i`` is at ``i / fps`` seconds."""
    t0 = time.perf_counter()
    store = store if isinstance(store, Store) else Store.open(store)
    folder = Path(folder)
    if not fps or fps <= 0:
        raise ConfigError("importing arrays needs their frame rate (--fps > 0)")
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
    writer = store.video_writer(name, first.shape[1], dtype, frame_rate=float(fps), attrs={"source": "arrays", "path": str(folder)})
    times: dict[str, np.ndarray] = {}
    videos = frames = skipped = 0
    bar, task = _progress(len(files), f"video/{name}", progress)
    with bar:
        for p in files:
            if writer.done(p.stem):
                n = len(_load_array(p))
                skipped += 1
            else:
                feats = _load_array(p)
                if feats.ndim != 2:
                    raise DataError(f"{p}: expected a [frames, D] array, found shape {list(feats.shape)}")
                n = len(feats)
                writer.put(p.stem, feats, np.arange(n) / fps)
                videos, frames = videos + 1, frames + n
            times[p.stem] = np.arange(n) / fps  # [n] seconds
            bar.advance(task)
    if check:
        check_segments(store.segments, {**_stored_times(store, name, set(times)), **times}, name, window)
    writer.commit(provenance_entry("import_features", group=f"video/{name}", format="arrays", source=str(folder), fps=fps))
    return ImportReport(name, videos, skipped, frames, frames * writer.dim * np.dtype(dtype).itemsize, time.perf_counter() - t0)
