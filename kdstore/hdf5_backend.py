"""The HDF5 backend: one file of contiguous, page-aligned datasets.

A contiguous dataset starts at a 4 KiB-aligned file offset, so a reader can
``numpy.memmap`` it; group attributes are JSON in an ``_attrs`` dataset.

The staged group, the link moves and the manifest update reach the file in one flush. A
replaced or deleted group moves to ``_trash`` and is never freed in place, so a reader's
memory map of it stays valid; the file is rewritten without dead groups (``compact``) when
they outweigh the live data, or by ``kdstore gc``. HDF5 rewrites its own metadata in
place, so a process that changes it holds an exclusive ``flock`` on the file and a reader a
shared one while it looks up keys (``_h5_file_lock``); array data is copied outside that
window, straight into space the staged datasets reserved.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import describe, fsync
from .backend import PAGE, ArraySource, Backend, Leftover, as_source, copy_blocks
from .errors import AccessError, KDStoreError, MissingError, StoreFormatError
from .faults import crash_point
from .files import mib

COMPACT_MIN_BYTES = 1 << 20  # dead HDF5 space below this is never worth a rewrite

METADATA_WAIT_S = 60.0  # how long an HDF5 reader or writer waits for another's metadata window


@contextmanager
def _h5_file_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold a ``flock`` on the HDF5 file at ``path``: shared to read its metadata, exclusive
    to change it. HDF5 updates metadata in place, so without it a reader can see a writer's
    half-flushed B-trees (a key reported missing that is there). The lock is taken on the
    inode found at ``path`` and the caller opens the same path at once; a compaction only
    renames a new file over it (``HDF5Backend._open`` then locks that one). Where the file
    system has no ``flock`` nothing is locked. Waits up to ``METADATA_WAIT_S`` seconds;
    yields the locked file's descriptor."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise MissingError(f"{path}: no such store") from None
    try:
        deadline = time.monotonic() + METADATA_WAIT_S
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    break  # no flock here (some network file systems)
                if time.monotonic() > deadline:
                    raise AccessError(f"{path}: another process has held the HDF5 file's metadata for "
                                      f"{METADATA_WAIT_S:.0f} s (a writer, or a program that opened it for writing)") from None
                time.sleep(0.005)
        yield fd
    finally:
        os.close(fd)  # releases the flock


def _h5py_file(path: Path, mode: str):
    """``h5py.File`` with page-aligned datasets and HDF5's own file lock off (``_h5_file_lock``
    takes the same ``flock``); failures to open as one-line store errors."""
    import h5py

    try:
        return h5py.File(path, mode, alignment_threshold=PAGE, alignment_interval=PAGE, locking=False)
    except OSError as e:
        first = str(e).splitlines()[0]
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in first:
            raise AccessError(f"{path}: cannot be written ({first})") from None
        if describe(path, e):  # a full disk
            raise AccessError(describe(path, e)) from None
        raise StoreFormatError(f"{path}: cannot open as HDF5 ({first})") from None


def _damage_is_format_error(method):
    """Report what h5py raises on a damaged file (bad metadata, undecodable attributes) as
    StoreFormatError naming the file and the call."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except KDStoreError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueError
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreFormatError(f"{self.path}: damaged HDF5 store, {method.__name__}({', '.join(map(repr, args))}) "
                                   f"failed ({what})") from None

    return wrapper


class HDF5Backend(Backend):
    """One HDF5 file; contiguous page-aligned datasets, JSON attributes in ``_attrs``."""

    name = "hdf5"
    ATTRS = "_attrs"
    STAGING, TRASH = "_staging", "_trash"  # hidden groups: uncommitted writes, replaced groups

    @staticmethod
    def is_store(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(8) == b"\x89HDF\r\n\x1a\n"
        except (IsADirectoryError, FileNotFoundError):
            return False

    @contextmanager
    def _open(self, mode: str = "r", path: Path | None = None):
        """The file, read-only under a shared metadata lock, or for writing under an exclusive
        one (``_h5_file_lock``; a new file, mode "w", is not visible to readers yet)."""
        path = Path(path or self.path)
        while True:
            with contextlib.ExitStack() as stack:
                fd = None if mode == "w" else stack.enter_context(_h5_file_lock(path, exclusive=mode != "r"))
                f = stack.enter_context(_h5py_file(path, mode))
                if fd is not None and os.fstat(fd).st_ino != os.fstat(f.id.get_vfd_handle()).st_ino:
                    continue  # a compaction renamed a new file over the locked one: lock that one
                yield f
                return

    @classmethod
    def create(cls, path: Path, attrs: dict, lock_file: Path | None = None) -> "HDF5Backend":
        b = cls(path, lock_file)
        with b._open("w") as f:
            _h5_set_attrs(f, attrs)
        return b

    @_damage_is_format_error
    def attrs(self, group: str) -> dict:
        with self._open() as f:
            if group and group not in f:
                raise MissingError(f"{self.path}: no {group!r} in the store")
            g = f[group] if group else f
            if self.ATTRS not in g:
                return {}
            return json.loads(g[self.ATTRS][()].decode() if isinstance(g[self.ATTRS][()], bytes) else g[self.ATTRS][()])

    def set_attrs(self, group: str, attrs: dict) -> None:
        with self.writing(), self._open("r+") as f:
            _h5_set_attrs(f[group] if group else f, attrs, trash=f"{self.TRASH}/{uuid.uuid4().hex}-attrs")

    @_damage_is_format_error
    def has(self, key: str) -> bool:
        with self._open() as f:
            return key in f

    @_damage_is_format_error
    def children(self, group: str) -> list[str]:
        with self._open() as f:
            g = f.get(group) if group else f
            if g is None:
                return []
            return sorted(k for k in g.keys() if not k.startswith("_"))

    @_damage_is_format_error
    def array_info(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        with self._open() as f:
            if key not in f:
                raise MissingError(f"{self.path}: no {key!r} in the store")
            ds = f[key]
            return ds.shape, ds.dtype

    @_damage_is_format_error
    def memmap(self, key: str) -> np.ndarray:
        with self._open() as f:
            if key not in f:
                raise MissingError(f"{self.path}: no {key!r} in the store")
            ds = f[key]
            shape, dtype = ds.shape, ds.dtype
            if ds.size == 0:
                return np.zeros(shape, dtype)
            if ds.chunks is not None or ds.compression is not None:
                raise StoreFormatError(f"{self.path}: {key} is chunked or compressed, expected a contiguous dataset")
            offset = ds.id.get_offset()
            if offset is None:
                raise StoreFormatError(f"{self.path}: {key} has no data written")
            n = int(np.prod(shape)) * dtype.itemsize
            fd = f.id.get_vfd_handle()  # map the file the offset was read from, even if since replaced
            size = os.fstat(fd).st_size
            if offset + n > size:
                raise StoreFormatError(f"{self.path}: {key} needs bytes {offset}..{offset + n}, file has {size} (truncated)")
            with os.fdopen(os.dup(fd), "rb") as fh:
                return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape)

    @_damage_is_format_error
    def data_range(self, key: str) -> tuple[Path, int, int]:
        with self._open() as f:
            if key not in f:
                raise MissingError(f"{self.path}: no {key!r} in the store")
            ds = f[key]
            return self.path, ds.id.get_offset() or 0, ds.size * ds.dtype.itemsize

    def staging_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".staging")

    def check_writable(self) -> None:
        for p in (self.path, self.path.parent):  # the parent holds the staging folder and compactions
            if p.exists() and not os.access(p, os.W_OK):
                raise AccessError(f"{self.path}: cannot be written ({p} is read-only)")

    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False,
                    provenance: dict | None = None) -> None:
        cid = uuid.uuid4().hex
        tmp = f"{self.STAGING}/{cid}"
        with self.writing():
            sources = {name: as_source(src) for name, src in arrays.items()}
            self.check_space(sources.values())
            with self._open("r+") as f:  # metadata only: the staged datasets reserve their space
                if group in f and not overwrite:
                    raise StoreFormatError(f"{self.path}: group {group!r} exists (pass overwrite to replace it)")
                g = f.create_group(tmp)
                try:
                    _h5_set_attrs(g, attrs)
                    offsets = {name: _reserve(g, name, src) for name, src in sources.items()}
                except BaseException:
                    self._unstage(f, cid)  # a failed write leaves no staging group behind
                    raise
            try:  # the rows go straight into the reserved space, outside the metadata lock
                with open(self.path, "r+b") as out:  # plain writes, not a memmap (see ZarrBackend._write_array)
                    for name, src in sources.items():
                        if int(np.prod(src.shape)):
                            out.seek(offsets[name])
                            copy_blocks(src, lambda i, block, dt=src.dtype: out.write(np.ascontiguousarray(block, dtype=dt).data),
                                         f"{self.path}:{group}/{name}")
            except BaseException:
                self._drop_staged(cid)  # a failed write leaves no staging group behind
                raise
            fsync(self.path)
            crash_point("hdf5.staged")
            with self._open("r+") as f:
                # the commit: nothing below reaches the file before the last flush
                if provenance is not None:
                    m = json.loads(f[self.ATTRS][()])
                    m["provenance"] = [*m.get("provenance", []), provenance]
                    _h5_set_attrs(f, m, trash=f"{self.TRASH}/{cid}-attrs")
                if group in f:
                    f.move(group, f"{self.TRASH}/{cid}")  # kept until a compaction: readers may map it
                parent = group.rsplit("/", 1)[0] if "/" in group else ""
                if parent and parent not in f:
                    f.create_group(parent)
                f.move(tmp, group)
                if not len(f[self.STAGING]):
                    del f[self.STAGING]
                f.flush()
            fsync(self.path)
            crash_point("hdf5.committed")
            live, size = self._live_bytes(), self.path.stat().st_size
            if size - live > max(live, COMPACT_MIN_BYTES):  # dead groups outweigh the live data
                self.compact()

    def delete_group(self, group: str) -> None:
        with self.writing():
            with self._open("r+") as f:
                if group in f:
                    f.move(group, f"{self.TRASH}/{uuid.uuid4().hex}")
                    f.flush()
            fsync(self.path)

    def compact(self) -> str:
        """Rewrite the file with only its live groups (no ``_trash``, no ``_staging``), then
        rename it into place; readers that hold the old file keep reading it."""
        with self.writing():
            before = self.path.stat().st_size
            real = Path(os.path.realpath(self.path))  # a store reached through a link is compacted where it is
            tmp = real.with_name(f".{real.name}.compact-{uuid.uuid4().hex}")
            need, free = self._live_bytes() + COMPACT_MIN_BYTES, shutil.disk_usage(real.parent).free
            if free < need:
                raise AccessError(f"{self.path}: compacting needs about {mib(need)} free beside it, {mib(free)} is:"
                                  " free space there and rerun kdstore gc")
            try:
                with self._open() as src, self._open("w", tmp) as dst:
                    for key in src.keys():
                        if key not in (self.STAGING, self.TRASH):
                            src.copy(src[key], dst, key)
                fsync(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a failed compaction leaves nothing that holds space
                raise
            crash_point("hdf5.compacted")
            os.replace(tmp, real)
            fsync(real.parent)
            return f"{self.path}: compacted from {mib(before)} to {mib(self.path.stat().st_size)}"

    @_damage_is_format_error
    def _live_bytes(self) -> int:
        """Bytes of array data reachable outside ``_trash`` and ``_staging``."""
        import h5py

        total = 0

        def add(name: str, obj) -> None:
            nonlocal total
            if isinstance(obj, h5py.Dataset) and not name.startswith((self.STAGING + "/", self.TRASH + "/")):
                total += obj.id.get_storage_size()

        with self._open() as f:
            f.visititems(add)
        return total

    def _commit_leftovers(self) -> list[Leftover]:
        if not self.path.is_file():
            return []
        with self._open() as f:
            staged = sorted(f[self.STAGING].keys()) if self.STAGING in f else []
        out = [Leftover(f"{self.path}: group {self.STAGING}/{s} staged by a crashed writer",
                        functools.partial(self._drop_staged, s)) for s in staged]
        dead = self.path.stat().st_size - self._live_bytes()
        if dead > COMPACT_MIN_BYTES:
            out.append(Leftover(f"{self.path}: {mib(dead)} of replaced, deleted or unfinished groups (gc compacts the file)",
                                lambda: self.compact() and None, routine=False))
        return out

    def gc(self) -> list[str]:
        with self.writing(recover=False):
            done = super().gc()
            with self._open() as f:
                dead = self.TRASH in f or self.STAGING in f
            return done + [self.compact()] if dead else done

    def _drop_staged(self, name: str) -> None:
        with self._open("r+") as f:
            self._unstage(f, name)

    def _unstage(self, f, name: str) -> None:
        """Delete ``_staging/<name>`` from the open file ``f``, and ``_staging`` once empty."""
        del f[f"{self.STAGING}/{name}"]
        if not len(f[self.STAGING]):
            del f[self.STAGING]



def _reserve(g, name: str, src: ArraySource) -> int | None:
    """Create ``g/name`` as a contiguous dataset whose page-aligned space is allocated now
    and never filled (the rows are written into it directly); its file offset."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    ds = g.create_dataset(name, shape=src.shape, dtype=src.dtype, dcpl=dcpl)
    return ds.id.get_offset()


def _h5_set_attrs(g, attrs: dict, trash: str | None = None) -> None:
    """Store ``attrs`` as the JSON dataset ``_attrs`` of ``g``; an existing one moves to
    ``trash`` (in a live file nothing is freed in place: a reader may be reading it)."""
    import h5py

    if HDF5Backend.ATTRS in g and trash:
        g.file.move(g[HDF5Backend.ATTRS].name, trash)
    elif HDF5Backend.ATTRS in g:
        del g[HDF5Backend.ATTRS]
    # a dataset, not an attribute: HDF5 attributes are capped at 64 KiB
    g.create_dataset(HDF5Backend.ATTRS, data=json.dumps(attrs), dtype=h5py.string_dtype())
