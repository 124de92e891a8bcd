"""RULSTM feature LMDBs, read one video at a time in bounded memory.

RULSTM (and AVT, which reads RULSTM's features) keeps one float32 vector per frame under
the key ``<video>_frame_<10-digit frame number>.jpg``, frames numbered from 1 at 30 fps.
The small releases hold only the frames their experiments sample (frame numbers with gaps),
the full ones every frame. Keys sort by video, then by frame, so one cursor pass visits a
video's frames in time order.

Reading is two passes per video: its keys (frame numbers, from the B-tree's leaf pages,
without touching the values), then only the values an import keeps. LMDB reads through a
memory map, and every page touched (with its neighbours, which the kernel maps along)
stays in the process's resident set while the map lives, so the environment is closed and
reopened after every ``remap_bytes`` of the file walked: the resident set stays bounded
whatever the size of the LMDB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kdstore.errors import ConfigError, DataError, DependencyError

INFIX = b"_frame_"
REMAP_BYTES = 128 << 20  # map at most this much of the LMDB before reopening it


@dataclass
class LmdbVideo:
    """One video's entries: its name, frame numbers [n] (increasing) and first key."""

    name: str
    numbers: np.ndarray
    first_key: bytes


def _parse_key(path: Path, key: bytes) -> tuple[bytes, int]:
    video, sep, rest = key.rpartition(INFIX)
    if not sep or not video or not rest.endswith(b".jpg") or not rest[:-4].isdigit():
        raise DataError(f"{path}: key {key[:80]!r} is not <video>_frame_<number>.jpg")
    return video, int(rest[:-4])


class RulstmLmdb:
    """A RULSTM LMDB of ``dim``-d float32 features, opened read-only."""

    def __init__(self, path: str | Path, remap_bytes: int = REMAP_BYTES):
        try:
            import lmdb
        except ImportError:
            raise DependencyError("importing LMDB features needs lmdb: pip install 'kdstore[lmdb]'") from None
        self._lmdb = lmdb
        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError(f"{self.path}: no such LMDB")
        self.remap_bytes = int(remap_bytes)
        self.env = self._open()
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.first():
                raise DataError(f"{self.path}: the LMDB is empty")
            n = len(cursor.value())
            if n % 4 or not n:
                raise DataError(f"{self.path}: value of {cursor.key().decode(errors='replace')!r} has {n} bytes, not float32 features")
        self.dim = n // 4
        self.entries = self.env.stat()["entries"]
        per_entry = max(1, self.data_file.stat().st_size // max(1, self.entries))  # file bytes an entry spans
        self._remap_entries, self._walked = max(1, self.remap_bytes // per_entry), 0

    def _open(self):
        try:
            return self._lmdb.open(str(self.path), readonly=True, lock=False, subdir=self.path.is_dir(), readahead=True)
        except self._lmdb.Error as e:
            raise DataError(f"{self.path}: not a readable LMDB ({e})") from None

    def _walk(self, key: bytes | None, values: bool) -> Iterator[tuple[bytes, memoryview | None]]:
        """(key, value) of every entry from ``key`` (None: the first) on, in key order.

        The map is dropped and reopened after every ``remap_bytes`` of the file walked past,
        over all walks (touching one page maps its neighbours too, so the walked span is what
        counts). With ``values``, keys and values are views into the map, valid until the
        next step.
        """
        while True:
            if self._walked >= self._remap_entries:
                self.env.close()
                self.env, self._walked = self._open(), 0
            with self.env.begin(buffers=values) as txn:
                cursor = txn.cursor()
                if not (cursor.first() if key is None else cursor.set_key(key)):
                    return
                while self._walked < self._remap_entries:
                    self._walked += 1
                    yield cursor.key(), cursor.value() if values else None
                    if not cursor.next():
                        return
                key = bytes(cursor.key())

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "RulstmLmdb":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def data_file(self) -> Path:
        return self.path / "data.mdb" if self.path.is_dir() else self.path

    def identity(self) -> dict:
        """What tells this LMDB from another one: its path, size, modification time, entries."""
        st = os.stat(self.data_file)
        return {"path": str(self.path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "entries": self.entries}

    def videos(self) -> Iterator[LmdbVideo]:
        """Every video in key order, with its frame numbers; no feature is read."""
        finished: set[bytes] = set()
        key = None
        while True:
            video = prefix = first = None
            numbers, key_next = [], None
            walk = self._walk(key, values=False)
            for k, _ in walk:
                if video is None:
                    video = _parse_key(self.path, k)[0]
                    if video in finished:
                        raise DataError(f"{self.path}: frames of video {video.decode()!r} are not contiguous in key order")
                    prefix, first = video + INFIX, k
                if k.startswith(prefix) and k.endswith(b".jpg") and k[len(prefix):-4].isdigit():
                    numbers.append(int(k[len(prefix):-4]))
                    continue
                if _parse_key(self.path, k)[0] == video:  # e.g. <video>_frame_<a>_frame_<b>.jpg
                    raise DataError(f"{self.path}: key {k[:80]!r} is not <video>_frame_<number>.jpg")
                key_next = k  # the next video's first key
                break
            walk.close()  # ends its read transaction
            if video is None:
                return
            numbers = np.asarray(numbers, dtype=np.int64)  # [n]
            if (np.diff(numbers) <= 0).any():
                i = int(np.flatnonzero(np.diff(numbers) <= 0)[0])
                raise DataError(
                    f"{self.path}: video {video.decode()!r}: frame {numbers[i + 1]} follows frame {numbers[i]} in key"
                    " order (frame numbers must be zero-padded to one width, each once)"
                )
            finished.add(video)
            yield LmdbVideo(video.decode(), numbers, first)
            if key_next is None:
                return
            key = key_next

    def read(self, video: LmdbVideo, keep: np.ndarray, block_rows: int = 4096) -> Iterator[np.ndarray]:
        """The features of ``video``'s entries where ``keep`` [n] is True, in order, as float32
        ``[b, dim]`` blocks. Each block reuses one buffer: use it before asking for the next."""
        keep = np.asarray(keep, bool)
        buf = np.empty((min(block_rows, max(1, int(keep.sum()))), self.dim), np.float32)
        filled, walk = 0, self._walk(video.first_key, values=True)
        for i, wanted in enumerate(keep.tolist()):
            entry = next(walk, None)
            if entry is None:
                raise DataError(f"{self.path}: video {video.name!r} ends after {i} of {len(keep)} entries (is the LMDB being written?)")
            if not wanted:
                continue
            key, value = entry
            if len(value) != 4 * self.dim:
                raise DataError(f"{self.path}: {bytes(key).decode(errors='replace')!r} holds {len(value) / 4:g} float32 features,"
                                f" the first key {self.dim}")
            buf[filled] = np.frombuffer(value, np.float32)
            filled += 1
            if filled == len(buf):
                yield buf
                filled = 0
        walk.close()
        if filled:
            yield buf[:filled]


def frame_key(video: str, number: int) -> bytes:
    """RULSTM's key of one frame: ``<video>_frame_<10-digit number>.jpg``."""
    return f"{video}_frame_{number:010d}.jpg".encode()


def write_rulstm_lmdb(path: str | Path, videos, map_size: int = 1 << 40, txn_bytes: int = 256 << 20) -> int:
    """Write ``(video, frame numbers [n], features [n, D])`` items as a RULSTM LMDB of
    float32 values (for tests, benchmarks, and handing features to RULSTM/AVT code);
    commits every ``txn_bytes``. Returns the number of entries written."""
    try:
        import lmdb
    except ImportError:
        raise DependencyError("writing LMDB features needs lmdb: pip install 'kdstore[lmdb]'") from None
    env = lmdb.open(str(path), map_size=map_size, subdir=True, lock=False, sync=False)
    entries = 0
    try:
        txn, pending = env.begin(write=True), 0
        for video, numbers, feats in videos:
            feats = np.ascontiguousarray(feats, dtype=np.float32)
            for number, row in zip(np.asarray(numbers).tolist(), feats):
                txn.put(frame_key(video, number), row.data)
                pending += row.nbytes
                entries += 1
                if pending >= txn_bytes:
                    txn.commit()
                    txn, pending = env.begin(write=True), 0
        txn.commit()
        env.sync(True)
    finally:
        env.close()
    return entries
