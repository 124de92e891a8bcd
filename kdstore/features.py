"""Video feature sets (``video/<name>``): the memory-mapped reader (:class:`FeatureSet`) and
the resumable writer that stages per-video features and commits them as one contiguous
group (:class:`VideoWriter`). ``Store.video`` and ``Store.video_writer`` are the entry points.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .atomic import replacing, write_json
from .backend import Concatenated
from .errors import DataError, MissingError, StoreFormatError
from .faults import crash_point
from .identity import check_same
from .layout import STAGED_VIDEO_PREFIX
from .lock import locked
from .provenance import provenance_entry
from .windows import FrameIndex

_FP16_MAX = float(np.finfo(np.float16).max)


class FeatureSet:
    """A ``video/<name>`` group: per-frame features of all videos, contiguous, memory-mapped."""

    def __init__(self, store, name: str):
        self.store, self.name = store, name  # an open Store
        self.key = f"video/{name}"
        self.attrs = store.backend.attrs(self.key)
        self.videos: list[str] = self.attrs["videos"]
        self.offsets = np.array(store.backend.memmap(f"{self.key}/offsets"))  # [V+1]
        self.features = store.backend.memmap(f"{self.key}/features")  # [F, D]
        self.timestamps = np.array(store.backend.memmap(f"{self.key}/timestamps"))  # [F] seconds
        self._video_index = {v: i for i, v in enumerate(self.videos)}
        self._frames = FrameIndex(self.offsets, self.timestamps)

    dim = property(lambda self: self.features.shape[1])
    frame_rate = property(lambda self: self.attrs.get("frame_rate"))

    def __len__(self) -> int:
        return len(self.features)

    def preread(self, block: int = 8 << 20, streams: int = 4) -> int:
        """Read the features' bytes once into the operating system's page cache (nothing is
        kept in this process): on a cold disk, an epoch that then gathers from the cache beats
        one whose random gathers each wait for the disk, when the windows reach much of the
        set. ``streams`` threads each read one contiguous part of the file. Returns the bytes
        read."""
        from concurrent.futures import ThreadPoolExecutor

        path, offset, n = self.store.backend.data_range(f"{self.key}/features")
        bounds = np.linspace(0, n, streams + 1).astype(np.int64)  # [streams + 1] part boundaries

        def part(fd: int, lo: int, hi: int) -> int:
            buf = memoryview(bytearray(block))
            done = lo
            while done < hi:
                got = os.preadv(fd, [buf[: min(block, hi - done)]], offset + done)
                if not got:
                    raise StoreFormatError(f"{path}: video/{self.name} features end at byte {offset + done}, "
                                           f"expected {offset + n}")
                done += got
            return done - lo

        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead
            with ThreadPoolExecutor(streams) as pool:
                return sum(pool.map(lambda k: part(fd, int(bounds[k]), int(bounds[k + 1])), range(streams)))
        finally:
            os.close(fd)

    def video_index(self, names: Iterable[str]) -> np.ndarray:
        """Index of each video name in this feature set (-1 where it has no features)."""
        return np.array([self._video_index.get(v, -1) for v in names], dtype=np.int64)

    def frames(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, D], timestamps [n]) of one video."""
        i = self._video_index.get(video)
        if i is None:
            raise MissingError(f"video/{self.name}: no features for video {video!r}")
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.features[lo:hi], self.timestamps[lo:hi]

    def frames_at(self, video_idx: np.ndarray, times: np.ndarray) -> np.ndarray:
        """[B, T] global frame indices: the last frame at or before each time, compared in
        integer microseconds (:mod:`kdstore.windows`).

        Times before a video's first frame map to that first frame (AVT pads a window
        that starts before the video by repeating its first frame).
        """
        video_idx = np.asarray(video_idx, dtype=np.int64)  # [B]
        bad = (video_idx < 0) | (video_idx >= len(self.videos))
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise MissingError(
                f"video/{self.name}: batch row {b} asks for video index {video_idx[b]}, a video without features"
                " (video_index gives -1 for videos that are not in this feature set)"
            )
        return self._frames.frames_at(video_idx, times)

    def gather(self, frame_idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[B, T, D] features of a batch of windows in one vectorised gather."""
        frame_idx = np.asarray(frame_idx)
        shape = (*frame_idx.shape, self.dim)
        if out is None:
            return self.features[frame_idx.reshape(-1)].reshape(shape)
        flat = frame_idx.reshape(-1)
        n = len(self.features)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            bad = flat[(flat < -n) | (flat >= n)][0]
            raise IndexError(f"video/{self.name}: frame index {bad} is out of bounds for {n} frames")
        # mode="raise" would copy through a temporary buffer (twice as slow); the indices are
        # checked above, and "wrap" maps negative ones the way "raise" does
        np.take(self.features, flat, axis=0, out=out.reshape(-1, self.dim), mode="wrap")
        return out



@dataclass
class _Staged:
    video: str
    frames: int


class VideoWriter:
    """Stage per-video features beside the store, then commit them as one contiguous group.

    ``put`` writes each video to its own ``.npy`` file atomically, so a crashed build
    resumes at the next video without ``done`` ones; ``commit`` concatenates them (and
    any videos already in ``video/<name>`` that were not replaced) and swaps the group in.
    Several processes may ``put`` different videos into one writer directory at once.
    """

    def __init__(self, store, name: str, dim: int, dtype: np.dtype, frame_rate: float | None, attrs: dict,
                 settings: dict, restart: bool = False, replace: bool = False):
        if dtype not in (np.float16, np.float32):
            raise DataError(f"video/{name}: dtype must be float16 or float32, found {dtype}")
        self.store, self.name, self.dim, self.dtype = store, name, int(dim), dtype
        self.frame_rate, self.attrs, self.replace = frame_rate, attrs, replace
        if name in store.feature_sets() and not replace:
            existing = store.video(name)
            if existing.dim != self.dim:
                raise DataError(f"video/{name}: feature dimension {self.dim} differs from the stored {existing.dim}")
        store.check_writable()
        self.dir = store.backend.staging_dir() / f"{STAGED_VIDEO_PREFIX}{name}"
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        # one build of a name at a time; under torchrun rank 0 holds it for the ranks that share the folder
        self._lock, self._holds_lock = contextlib.ExitStack(), os.environ.get("RANK", "0") == "0"
        if self._holds_lock:
            self._lock.enter_context(locked(self._lock_file, f"{store.path}: video/{name}", timeout=1))
        meta = json.loads(json.dumps({"dim": self.dim, "dtype": dtype.name, "frame_rate": frame_rate, "settings": settings}))
        meta_file = self.dir / "writer.json"
        # Staged files without writer.json are what a killed deletion of the directory left:
        # nothing tells what they were staged from, so none is reused. (A directory holding
        # nothing else yet is one that another rank of this build is creating.)
        if self.dir.exists() and (restart or (not meta_file.exists() and any(
                not p.name.startswith(("writer.json", ".writer.json.")) for p in self.dir.iterdir()))):
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta_file.exists():
            check_same(json.loads(meta_file.read_text()), meta, f"{self.dir}: a partial build with other settings is staged",
                       hint="rerun with those settings to resume it, or discard it (import-features --restart, or remove that folder)")
        else:
            write_json(meta_file, meta)

    @property
    def _lock_file(self) -> Path:
        return self.dir.with_name(self.dir.name + ".lock")

    def _stem(self, video: str) -> Path:
        return self.dir / hashlib.sha1(video.encode()).hexdigest()[:20]

    def _complete(self, stem: Path) -> _Staged | None:
        """The record of a completely staged video: its JSON and both arrays, at full size."""
        try:
            d = json.loads(stem.with_suffix(".json").read_text())
            feats = np.load(stem.with_name(stem.name + ".feat.npy"), mmap_mode="r", allow_pickle=False)
            ts = np.load(stem.with_name(stem.name + ".ts.npy"), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError):  # missing, truncated or half-deleted
            return None
        n = d.get("frames")
        if feats.shape != (n, self.dim) or feats.dtype != self.dtype or ts.shape != (n,):
            return None
        return _Staged(d["video"], n)

    def done(self, video: str) -> bool:
        """Whether ``video`` is completely staged (by this or an earlier, crashed run)."""
        return self._complete(self._stem(video)) is not None

    def put(self, video: str, features: np.ndarray | Iterable[np.ndarray], timestamps: np.ndarray) -> None:
        """Stage one video's features with their timestamps in seconds.

        ``features`` is an ``[n, D]`` array or an iterable of ``[b, D]`` row blocks that add
        up to ``n = len(timestamps)`` rows; blocks are written as they come, so a long video
        never has to be in memory at once.
        """
        timestamps = np.asarray(timestamps, dtype=np.float64)
        n = len(timestamps)
        if isinstance(features, np.ndarray):
            if features.ndim != 2 or features.shape[1] != self.dim:
                raise DataError(f"video/{self.name}, video {video!r}: features of shape {list(features.shape)}, expected [n, {self.dim}]")
            if len(features) == 0:
                raise DataError(f"video/{self.name}, video {video!r}: no frames")
            if timestamps.shape != (len(features),):
                raise DataError(f"video/{self.name}, video {video!r}: {len(timestamps)} timestamps for {len(features)} frames")
            features = [features]
        if timestamps.ndim != 1 or n == 0:
            raise DataError(f"video/{self.name}, video {video!r}: no frames")
        if not np.isfinite(timestamps).all() or (np.diff(timestamps) <= 0).any():
            raise DataError(f"video/{self.name}, video {video!r}: timestamps must be finite and increasing")
        stem = self._stem(video)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n, self.dim)}
        with replacing(stem.with_name(stem.name + ".feat.npy"), "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            row = 0
            for block in features:
                block = np.asarray(block)
                if block.ndim != 2 or block.shape[1] != self.dim:
                    raise DataError(f"video/{self.name}, video {video!r}: features of shape {list(block.shape)}, expected [n, {self.dim}]")
                if row + len(block) > n:
                    raise DataError(f"video/{self.name}, video {video!r}: {n} timestamps for more than {n} frames")
                self._check_block(video, block, timestamps[row : row + len(block)], row)
                f.write(np.ascontiguousarray(block, dtype=self.dtype).data)
                row += len(block)
            if row != n:
                raise DataError(f"video/{self.name}, video {video!r}: {n} timestamps for {row} frames")
        crash_point("video.put")
        with replacing(stem.with_name(stem.name + ".ts.npy"), "wb") as f:
            np.save(f, timestamps, allow_pickle=False)
        crash_point("video.put")
        write_json(stem.with_suffix(".json"), {"video": video, "frames": n})
        crash_point("video.staged")

    def _check_block(self, video: str, block: np.ndarray, timestamps: np.ndarray, first: int) -> None:
        if not np.isfinite(block).all():
            bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise DataError(f"video/{self.name}, video {video!r}: frame {first + bad} (t={timestamps[bad]:.3f}s) has NaN or inf")
        if self.dtype == np.float16 and len(block) and np.abs(block).max() > _FP16_MAX:  # would be stored as inf
            bad = int(np.flatnonzero((np.abs(block) > _FP16_MAX).any(axis=1))[0])
            raise DataError(
                f"video/{self.name}, video {video!r}: frame {first + bad} (t={timestamps[bad]:.3f}s) has a value beyond"
                f" the float16 range (|x| > {_FP16_MAX:g}); store float32 features or rescale them"
            )

    def staged(self) -> list[_Staged]:
        """The completely staged videos, by name."""
        out = [self._complete(p.with_suffix("")) for p in self.dir.glob("*.json") if p.name != "writer.json"]
        return sorted((s for s in out if s is not None), key=lambda s: s.video)

    def commit(self, provenance: dict | None = None) -> FeatureSet:
        """Write every staged video (plus untouched stored ones) as ``video/<name>``."""
        staged = {s.video: s for s in self.staged()}
        if not staged:
            raise DataError(f"video/{self.name}: nothing to commit (no video was staged)")
        # (video, features, timestamps): stored videos as memmap slices, staged ones as files
        items: list[tuple[str, np.ndarray | Path, np.ndarray | Path]] = []
        if self.name in self.store.feature_sets() and not self.replace:
            old = self.store.video(self.name)
            items = [(v, *old.frames(v)) for v in old.videos if v not in staged]
        for v in staged:
            stem = self._stem(v)
            items.append((v, stem.with_name(stem.name + ".feat.npy"), stem.with_name(stem.name + ".ts.npy")))
        items.sort(key=lambda x: x[0])
        counts = [len(f) if isinstance(f, np.ndarray) else staged[v].frames for v, f, _ in items]
        feats = Concatenated([f for _, f, _ in items], (int(sum(counts)), self.dim), self.dtype)
        ts = np.concatenate([t if isinstance(t, np.ndarray) else np.load(t, allow_pickle=False) for _, _, t in items])
        attrs = {
            **self.attrs,
            "videos": [v for v, _, _ in items],
            "frame_rate": self.frame_rate,
            "dim": self.dim,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        arrays = {"features": feats, "timestamps": ts, "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
        self.store.backend.write_group(f"video/{self.name}", arrays, attrs, overwrite=True,
                                       provenance=provenance or provenance_entry("write_video_features", group=f"video/{self.name}"))
        crash_point("video.committed")
        shutil.rmtree(self.dir)
        if self._holds_lock:
            self._lock_file.unlink(missing_ok=True)
        self._lock.close()
        return self.store.video(self.name)
