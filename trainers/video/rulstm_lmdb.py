"""RULSTM feature LMDBs, read one video at a time in bounded memory.

RULSTM (and AVT, which reads RULSTM's features) keeps one float32 vector per frame under
the key ``<video>_frame_<10-digit frame number>.jpg``, frames numbered from 1 at 30 fps.
The small releases hold only the frames their experiments sample (frame numbers with gaps),
the full ones every frame. Keys sort by video, then by frame, so one cursor pass visits a
video's frames in time order.

Reading is two passes per video: its keys (frame numbers, from the B-tree's leaf pages,
without touching the values), then only the values an import keeps. LMDB reads through a
memory map, and every page touched stays in the process's resident set while the map
lives, so the environment is closed and reopened after every ``remap_bytes`` read: the
resident set stays bounded whatever the size of the LMDB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kdstore.errors import ConfigError, DataError, DependencyError

INFIX = b"_frame_"
REMAP_BYTES = 256 << 20  # map at most this much of the LMDB before reopening it
KEY_BYTES = 64  # rough leaf-page bytes a key scan touches per key


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
        self._mapped = 0
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

    def _open(self):
        try:
            return self._lmdb.open(str(self.path), readonly=True, lock=False, subdir=self.path.is_dir(), readahead=True)
        except self._lmdb.Error as e:
            raise DataError(f"{self.path}: not a readable LMDB ({e})") from None

    def _touched(self, nbytes: int) -> None:
        """Count mapped bytes read; past ``remap_bytes``, drop the map (and its resident pages)."""
        self._mapped += nbytes
        if self._mapped > self.remap_bytes:
            self.env.close()
            self.env, self._mapped = self._open(), 0

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
            with self.env.begin() as txn:
                cursor = txn.cursor()
                if not (cursor.first() if key is None else cursor.set_key(key)):
                    return
                first = cursor.key()
                video, number = _parse_key(self.path, first)
                if video in finished:
                    raise DataError(f"{self.path}: frames of video {video.decode()!r} are not contiguous in key order")
                prefix, numbers, key = video + INFIX, [], None
                for k in cursor.iternext(keys=True, values=False):
                    if k.startswith(prefix) and k.endswith(b".jpg") and k[len(prefix):-4].isdigit():
                        numbers.append(int(k[len(prefix):-4]))
                        continue
                    if _parse_key(self.path, k)[0] == video:  # e.g. <video>_frame_<a>_frame_<b>.jpg
                        raise DataError(f"{self.path}: key {k[:80]!r} is not <video>_frame_<number>.jpg")
                    key = k  # the next video's first key
                    break
            numbers = np.asarray(numbers, dtype=np.int64)  # [n]
            if (np.diff(numbers) <= 0).any():
                i = int(np.flatnonzero(np.diff(numbers) <= 0)[0])
                raise DataError(
                    f"{self.path}: video {video.decode()!r}: frame {numbers[i + 1]} follows frame {numbers[i]} in key"
                    " order (frame numbers must be zero-padded to one width, each once)"
                )
            finished.add(video)
            self._touched(len(numbers) * KEY_BYTES)
            yield LmdbVideo(video.decode(), numbers, first)
            if key is None:
                return

    def read(self, video: LmdbVideo, keep: np.ndarray, block_rows: int = 16384) -> Iterator[np.ndarray]:
        """The features of ``video``'s entries where ``keep`` [n] is True, in order, as float32
        ``[b, dim]`` blocks. Each block reuses one buffer: use it before asking for the next."""
        n, dim = len(video.numbers), self.dim
        keep = np.asarray(keep, bool)
        buf = np.empty((min(block_rows, max(1, int(keep.sum()))), dim), np.float32)
        key, i = video.first_key, 0
        while i < n:
            filled = 0
            with self.env.begin(buffers=True) as txn:  # values are views into the map until copied
                cursor = txn.cursor()
                if not cursor.set_key(key):
                    raise DataError(f"{self.path}: key {key[:80]!r} disappeared while reading (is the LMDB being written?)")
                while True:
                    if keep[i]:
                        value = cursor.value()
                        if len(value) != 4 * dim:
                            k = bytes(cursor.key()).decode(errors="replace")
                            raise DataError(f"{self.path}: {k!r} holds {len(value) / 4:g} float32 features, the first key {dim}")
                        buf[filled] = np.frombuffer(value, np.float32)
                        filled += 1
                    i += 1
                    if i == n:
                        break
                    if not cursor.next():
                        raise DataError(f"{self.path}: video {video.name!r} ends after {i} of {n} entries (is the LMDB being written?)")
                    if filled == len(buf):
                        key = bytes(cursor.key())
                        break
            if filled:
                yield buf[:filled]
            self._touched(filled * 4 * dim)


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
