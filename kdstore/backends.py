"""Two on-disk backends for one logical layout: a Zarr v3 directory and an HDF5 file.

Both keep every array uncompressed and contiguous so that a reader can ``numpy.memmap``
it: in Zarr an array is a single chunk whose chunk file (``<array>/c/0/0``) holds the raw
little-endian C-order bytes; in HDF5 a contiguous dataset starts at a 4 KiB-aligned file
offset. Group attributes are JSON.

Writes hold the store's writer lock (``kdstore.lock``); readers never take it. A group is
written under a staging name and committed together with its provenance record:

- Zarr: the staged directory is complete and synced, then a journal
  (``.staging/commit-<id>.json``) is written; from then on the commit is finished by this
  writer or, after a crash, by the next writer (``recover``). The staged directory takes the
  group's place in one step (Linux ``renameat2(RENAME_EXCHANGE)``), or by two renames where
  the file system cannot exchange; the journal covers the gap between them.
- HDF5: the staged group, the link moves and the manifest update reach the file in one
  flush. A replaced or deleted group moves to ``_trash`` and is never freed in place, so a
  reader's memory map of it stays valid; the file is rewritten without dead groups
  (``compact``) when they outweigh the live data, or by ``kdstore gc``. HDF5 rewrites its
  own metadata in place, so a process that changes it holds an exclusive ``flock`` on the
  file and a reader a shared one while it looks up keys (``_h5_file_lock``); array data is
  copied outside that window, straight into space the staged datasets reserved.

What a crashed writer leaves (staging, trash, interrupted commits, partial feature builds)
is listed by ``leftovers``; the next writer removes the routine ones, ``gc`` all of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from .atomic import describe, fsync, fsync_tree, link_message, os_errors, write_json
from .errors import AccessError, KDStoreError, MissingError, StoreFormatError
from .faults import crash_point
from .lock import held, held_elsewhere, locked, store_lock_path

PAGE = 4096
BLOCK_BYTES = 64 << 20  # rows are copied in blocks of about this size
COMPACT_MIN_BYTES = 1 << 20  # dead HDF5 space below this is never worth a rewrite
SPACE_MARGIN = 256 << 10  # metadata a group's write needs beyond its arrays' pages


class ArraySource(Protocol):
    """Anything with a shape and dtype that yields consecutive row blocks."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def blocks(self) -> Iterator[np.ndarray]: ...


class InMemory:
    """An in-memory array as an ArraySource."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        self.shape, self.dtype = self.array.shape, self.array.dtype

    def blocks(self) -> Iterator[np.ndarray]:
        rows = max(1, BLOCK_BYTES // max(1, self.array[:1].nbytes))
        for i in range(0, len(self.array), rows):
            yield self.array[i : i + rows]


class Concatenated:
    """Row-wise concatenation of arrays and ``.npy`` files, one part in memory at a time."""

    def __init__(self, parts: list[np.ndarray | Path], shape: tuple[int, ...], dtype: np.dtype):
        self.parts, self.shape, self.dtype = parts, shape, np.dtype(dtype)

    def blocks(self) -> Iterator[np.ndarray]:
        for p in self.parts:
            part = p if isinstance(p, np.ndarray) else np.load(p, mmap_mode="r", allow_pickle=False)
            yield np.asarray(part, dtype=self.dtype)


def as_source(a: np.ndarray | ArraySource) -> ArraySource:
    return InMemory(a) if isinstance(a, np.ndarray) else a


def _zarr_dtype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iuf":
        return dtype.name
    raise StoreFormatError(f"dtype {dtype} cannot be stored (numeric and bool arrays only)")


@dataclass
class Leftover:
    """Something a crashed or interrupted writer left behind."""

    what: str  # one line for people
    remove: Callable[[], object]  # finish or remove it; call with the store lock held
    routine: bool = True  # any writer removes it; False: resumable work or costly, only ``gc``
    hides: str | None = None  # a group that stays invisible until this is finished


class Backend:
    """Operations the store needs from a backend; paths are ``/``-joined group keys."""

    name: str

    def __init__(self, path: Path, lock_file: Path | None = None):
        self.path = Path(path)
        # a store being built under a temporary name is locked by its final name
        self.lock_file = Path(lock_file) if lock_file else store_lock_path(self.path)

    def attrs(self, group: str) -> dict: ...
    def set_attrs(self, group: str, attrs: dict) -> None: ...
    def has(self, key: str) -> bool: ...
    def children(self, group: str) -> list[str]: ...
    def array_info(self, key: str) -> tuple[tuple[int, ...], np.dtype]: ...
    def memmap(self, key: str) -> np.ndarray: ...
    def data_range(self, key: str) -> tuple[Path, int, int]: ...  # (file, offset, bytes) of an array's data now
    def delete_group(self, group: str) -> None: ...
    def staging_dir(self) -> Path: ...
    def check_writable(self) -> None: ...

    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False,
                    provenance: dict | None = None) -> None:
        """Write ``group`` atomically, with ``provenance`` appended to the manifest in the same commit."""

    def check_space(self, sources: Iterable[ArraySource]) -> None:
        """Raise AccessError, before anything is written, when the store's file system lacks
        the room for arrays ``sources`` (HDF5 cannot be trusted to fail cleanly on a full disk)."""
        need = SPACE_MARGIN + sum((-(-int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize // PAGE) + 1) * PAGE for s in sources)
        free = shutil.disk_usage(self.path if self.path.is_dir() else self.path.parent).free
        if free < need:
            raise AccessError(f"{self.path}: no space left on the device for this write (it needs about {_mib(need)},"
                              f" {_mib(free)} is free): free space there (kdstore gc removes what crashed writers left) and rerun")

    def add_provenance(self, entry: dict) -> None:
        """Append a record to the manifest's provenance (read-modify-write under the lock)."""
        with self.writing():
            m = self.attrs("")
            m["provenance"] = [*m.get("provenance", []), entry]
            self.set_attrs("", m)

    # -- the writer lock and what crashed writers leave ------------------------------

    @contextmanager
    def writing(self, recover: bool = True) -> Iterator[None]:
        """Hold the store's writer lock. The outermost hold checks that the store can be
        written and (``recover``) removes the routine leftovers of crashed writers first."""
        with os_errors(self.path), locked(self.lock_file, str(self.path)) as outer:
            if outer:
                self.check_writable()
                self.refuse_links()
                if recover:
                    self.recover()
            yield

    def links(self) -> list[Path]:
        """Symbolic links inside the store and its staging folder (the store's own path may be one)."""
        found: set[Path] = set()
        for root in (self.path, self.staging_dir()):
            if root != self.path and root.is_symlink():
                found.add(root)
                continue
            for dirpath, dirs, files in os.walk(root):
                found.update(Path(dirpath, n) for n in dirs + files if os.path.islink(os.path.join(dirpath, n)))
        return sorted(found)

    def refuse_links(self) -> None:
        """Raise AccessError naming a symbolic link inside the store: no writer follows one out of it."""
        links = self.links()
        if links:
            more = f" ({len(links) - 1} more: kdstore validate lists them)" if len(links) > 1 else ""
            raise AccessError(link_message(links[0], inside=True) + more)

    def leftovers(self) -> list[Leftover]:
        """What crashed or interrupted writers left, the costly compaction last. While another
        process holds the store lock, only partial feature builds are listed (a live writer's
        staging is not left over)."""
        if held_elsewhere(self.lock_file):
            return self._partial_builds()
        return self._sibling_leftovers() + self._partial_builds() + self._commit_leftovers()

    def recover(self, everything: bool = False) -> list[str]:
        """Finish or remove the leftovers (the routine ones, or ``everything``); call with the lock held."""
        done = []
        for lo in self.leftovers():
            if lo.routine or everything:
                lo.remove()
                done.append(lo.what)
        return done

    def gc(self) -> list[str]:
        """Remove every leftover, partial feature builds included; what was done, a line each."""
        with self.writing(recover=False):
            return self.recover(everything=True)

    def _commit_leftovers(self) -> list[Leftover]:
        return []

    def _sibling_leftovers(self) -> list[Leftover]:
        """Temporary siblings of a crashed create, replace or compaction: ``.<name>.<what>-<id>``."""
        what = {"creating": "a store being created", "replaced": "a replaced store", "compact": "a compaction"}
        out = []
        for path in [self.path] + ([Path(os.path.realpath(self.path))] if self.path.is_symlink() else []):
            out += self._siblings_of(path, what)  # compactions sit beside the real file
        return out

    @staticmethod
    def _siblings_of(path: Path, what: dict) -> list[Leftover]:
        pattern = re.compile(rf"\.{re.escape(path.name)}\.(creating|replaced|compact)-[0-9a-f]{{32}}")
        out = []
        for p in sorted(path.parent.glob(f".{path.name}.*")):
            m = pattern.fullmatch(p.name)
            if m:
                out.append(Leftover(f"{p}: {what[m.group(1)]} left by a crashed writer ({_mib(_du(p))})",
                                    functools.partial(_remove, p)))
        return out

    def _partial_builds(self) -> list[Leftover]:
        """Staged videos of feature builds whose writer is gone (resumed by rerunning the build)."""
        st = self.staging_dir()
        out = []
        for d in sorted(st.glob("video-*")) if st.is_dir() and not st.is_symlink() else []:
            lock = d.with_name(d.name.removesuffix(".lock") + ".lock")
            if held(lock):
                continue  # a live writer's
            if d.is_dir():
                videos = sum(1 for p in d.glob("*.json") if p.name != "writer.json")
                out.append(Leftover(f"{d}: partial build of video/{d.name[6:]} ({videos} videos staged, {_mib(_du(d))});"
                                    " rerun the build to resume it", functools.partial(_discard_build, d, lock),
                                    routine=False))
            elif d.suffix == ".lock" and not d.with_suffix("").exists():
                out.append(Leftover(f"{d}: lock of a finished feature build", functools.partial(_remove, d)))
        return out


def _discard_build(d: Path, lock: Path) -> None:
    with locked(lock, f"video/{d.name[6:]}", timeout=0):
        _remove(d)
        lock.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Zarr v3


class ZarrBackend(Backend):
    """A Zarr v3 directory hierarchy written with raw single-chunk arrays."""

    name = "zarr"

    @staticmethod
    def is_store(path: Path) -> bool:
        return (Path(path) / "zarr.json").is_file()

    @classmethod
    def create(cls, path: Path, attrs: dict, lock_file: Path | None = None) -> "ZarrBackend":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
        return cls(path, lock_file)

    def _dir(self, key: str) -> Path:
        """The directory of ``key``; keys that would leave the store are refused."""
        parts = key.split("/") if key else []
        if any(p in ("", ".", "..") or "\\" in p for p in parts) or key.startswith("/"):
            raise StoreFormatError(f"{self.path}: {key!r} is not a key inside the store")
        return self.path.joinpath(*parts)

    def _meta(self, key: str) -> dict:
        f = self._dir(key) / "zarr.json"
        try:
            meta = json.loads(f.read_text())
        except FileNotFoundError:
            raise MissingError(f"{self.path}: no {key or 'root'!r} in the store") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreFormatError(f"{f}: metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("attributes", {}), dict):
            raise StoreFormatError(f"{f}: metadata is not a Zarr v3 JSON object")
        return meta

    def attrs(self, group: str) -> dict:
        return self._meta(group).get("attributes", {})

    def set_attrs(self, group: str, attrs: dict) -> None:
        with self.writing():
            meta = self._meta(group)
            meta["attributes"] = attrs
            write_json(self._dir(group) / "zarr.json", meta)

    def has(self, key: str) -> bool:
        return (self._dir(key) / "zarr.json").is_file()

    def children(self, group: str) -> list[str]:
        d = self._dir(group)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file())

    def array_info(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        meta = self._meta(key)
        if meta.get("node_type") != "array":
            raise StoreFormatError(f"{self.path / key}: expected an array, found {meta.get('node_type')!r}")
        try:
            codecs = [c["name"] for c in meta.get("codecs", [])]
            endian = (meta["codecs"][0].get("configuration") or {}).get("endian", "little") if codecs else None
            one_chunk = list(meta["chunk_grid"]["configuration"]["chunk_shape"]) == [max(1, n) for n in meta["shape"]]
            shape, dtype = tuple(int(n) for n in meta["shape"]), np.dtype(meta["data_type"]).newbyteorder("<")
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise StoreFormatError(f"{self.path / key}: incomplete array metadata ({type(e).__name__}: {e})") from None
        if codecs != ["bytes"] or endian != "little" or not one_chunk:
            raise StoreFormatError(
                f"{self.path / key}: expected one uncompressed little-endian chunk (codecs ['bytes']), found codecs {codecs}"
            )
        return shape, dtype

    def memmap(self, key: str) -> np.ndarray:
        shape, dtype = self.array_info(key)
        chunk = self._dir(key) / "c" / "/".join("0" for _ in shape)
        n = int(np.prod(shape)) * dtype.itemsize
        if n == 0:
            return np.zeros(shape, dtype)
        if not chunk.is_file():
            raise StoreFormatError(f"{chunk}: missing chunk file of {key} {shape} {dtype} (expected {n} bytes)")
        found = chunk.stat().st_size
        if found != n:
            raise StoreFormatError(f"{chunk}: expected {n} bytes for {key} {shape} {dtype}, found {found}")
        return np.memmap(chunk, dtype=dtype, mode="r", shape=shape)

    def data_range(self, key: str) -> tuple[Path, int, int]:
        shape, dtype = self.array_info(key)
        return self._dir(key) / "c" / "/".join("0" for _ in shape), 0, int(np.prod(shape)) * dtype.itemsize

    def staging_dir(self) -> Path:
        return self.path / ".staging"

    def check_writable(self) -> None:
        for d in (self.path, self.staging_dir(), self.path / "teacher", self.path / "video"):
            if d.is_dir() and not os.access(d, os.W_OK):
                raise AccessError(f"{self.path}: cannot be written ({d} is read-only)")

    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False,
                    provenance: dict | None = None) -> None:
        target = self._dir(group)
        with self.writing():
            if target.exists() and not overwrite:
                raise StoreFormatError(f"{self.path}: group {group!r} exists (pass overwrite to replace it)")
            arrays = {name: as_source(src) for name, src in arrays.items()}
            self.check_space(arrays.values())
            cid = uuid.uuid4().hex
            tmp = self.staging_dir() / f"tmp-{cid}"
            tmp.mkdir(parents=True)
            journal = self.staging_dir() / f"commit-{cid}.json"
            try:
                write_json(tmp / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
                for name, src in arrays.items():
                    self._write_array(tmp / name, src)
                fsync_tree(tmp)
                crash_point("zarr.staged")
                # the commit point: from here on the group is committed, by us or by the next writer
                write_json(journal, {"group": group, "staged": tmp.name, "inode": tmp.stat().st_ino,
                                     "provenance": provenance})
            finally:
                if not journal.exists() and tmp.exists():
                    shutil.rmtree(tmp)
            crash_point("zarr.journal")
            self._finish(journal)

    def _finish(self, journal: Path) -> None:
        """Carry out a journaled commit from wherever it stopped: swap, provenance, cleanup."""
        j = json.loads(journal.read_text())
        staged, target = self.staging_dir() / j["staged"], self._dir(j["group"])
        trash = self.staging_dir() / ("trash-" + j["staged"].removeprefix("tmp-"))
        if _inode(staged) == j["inode"]:  # not in place yet
            self._ensure_parents(j["group"])
            if not target.exists():
                os.replace(staged, target)
            elif not exchange(staged, target):  # two renames; a crash between them is finished by the journal
                os.replace(target, trash)
                crash_point("zarr.trashed")
                os.replace(staged, target)
            fsync(target.parent)
            crash_point("zarr.swapped")
        if j.get("provenance") is not None:
            m = self.attrs("")
            if j["provenance"] not in m.get("provenance", []):
                m["provenance"] = [*m.get("provenance", []), j["provenance"]]
                self.set_attrs("", m)
                crash_point("zarr.provenance")
        for old in (staged, trash):  # the replaced group, if any
            _remove(old)
        journal.unlink()
        fsync(self.staging_dir())

    def delete_group(self, group: str) -> None:
        target = self._dir(group)
        with self.writing():
            if target.exists():
                trash = self.staging_dir() / f"trash-{uuid.uuid4().hex}"
                trash.parent.mkdir(exist_ok=True)
                os.replace(target, trash)  # invisible at once, then removed
                crash_point("zarr.deleted")
                _remove(trash)

    def _commit_leftovers(self) -> list[Leftover]:
        st = self.staging_dir()
        if not self.path.is_dir() or st.is_symlink():  # nothing is listed, or removed, through a link
            return []
        out, journaled = [], set()
        for j in sorted(st.glob("commit-*.json")):
            try:
                info = json.loads(j.read_text())
                group, staged = info["group"], info["staged"]
            except (OSError, ValueError, KeyError, TypeError):
                out.append(Leftover(f"{j}: unreadable commit journal", functools.partial(_remove, j)))
                continue
            journaled.add(staged)
            # between the two renames of a replacement: the group is gone until the commit is finished
            hides = group if not self.has(group) and (st / staged.replace("tmp-", "trash-", 1)).exists() else None
            out.append(Leftover(f"{self.path}: interrupted commit of {group}", functools.partial(self._finish, j), hides=hides))
        for d in sorted(st.glob("tmp-*")):
            if d.name not in journaled:
                out.append(Leftover(f"{d}: a group staged by a crashed writer ({_mib(_du(d))})", functools.partial(_remove, d)))
        for d in sorted(st.glob("trash-*")):
            if d.name.replace("trash-", "tmp-") not in journaled:
                out.append(Leftover(f"{d}: a replaced group not yet removed ({_mib(_du(d))})", functools.partial(_remove, d)))
        # half-written JSON files of atomic rewrites (the live tree and the staging folder, not partial builds)
        real = lambda d: d.is_dir() and not d.is_symlink()  # noqa: E731  (nothing is removed through a link)
        groups = [d for d in self.path.iterdir() if real(d) and not d.name.startswith(".")]
        dirs = [self.path, *([st] if real(st) else []), *groups, *(g for d in groups for g in d.iterdir() if real(g))]
        for d in dirs:
            for f in sorted(d.glob(".*.tmp")):
                out.append(Leftover(f"{f}: a half-written metadata file", functools.partial(_remove, f)))
        return out

    def _ensure_parents(self, group: str) -> None:
        parts = Path(group).parts[:-1]
        for i in range(1, len(parts) + 1):
            d = self.path.joinpath(*parts[:i])
            if not (d / "zarr.json").exists():
                d.mkdir(exist_ok=True)
                write_json(d / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}})

    @staticmethod
    def _write_array(d: Path, src: ArraySource) -> None:
        dtype = np.dtype(src.dtype)
        shape = tuple(int(n) for n in src.shape)
        codec = {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
        meta = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(shape),
            "data_type": _zarr_dtype(dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n) for n in shape]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": False if dtype == np.bool_ else 0,
            "codecs": [codec],
            "attributes": {},
        }
        d.mkdir(parents=True)
        write_json(d / "zarr.json", meta)
        if int(np.prod(shape)) == 0:
            return
        chunk = d / "c" / "/".join("0" for _ in shape)
        chunk.parent.mkdir(parents=True)
        # plain writes, not a memmap: dirty pages of a written map count towards the writer's
        # resident set, so a memmap commit of a large group grows with the group
        little = dtype.newbyteorder("<")
        with open(chunk, "wb") as f:
            _copy_blocks(src, lambda i, block: f.write(np.ascontiguousarray(block, dtype=little).data), chunk)


# ---------------------------------------------------------------------------------------
# HDF5


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
                            _copy_blocks(src, lambda i, block, dt=src.dtype: out.write(np.ascontiguousarray(block, dtype=dt).data),
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
                raise AccessError(f"{self.path}: compacting needs about {_mib(need)} free beside it, {_mib(free)} is:"
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
            return f"{self.path}: compacted from {_mib(before)} to {_mib(self.path.stat().st_size)}"

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
            out.append(Leftover(f"{self.path}: {_mib(dead)} of replaced, deleted or unfinished groups (gc compacts the file)",
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


def _copy_blocks(src: ArraySource, write, where) -> None:
    """Hand ``src``'s row blocks in order to ``write(first_row, block)``, checking their shapes."""
    i = 0
    for block in src.blocks():
        block = np.asarray(block)
        if block.shape[1:] != tuple(src.shape[1:]):
            raise StoreFormatError(f"{where}: block of shape {block.shape} does not fit {tuple(src.shape)}")
        write(i, block)
        i += len(block)
    if i != src.shape[0]:
        raise StoreFormatError(f"{where}: expected {src.shape[0]} rows, got {i}")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _du(path: Path) -> int:
    """Bytes under ``path`` (a file or a directory tree)."""
    if not path.is_dir():
        return path.stat().st_size if path.exists() else 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _remove(path: Path) -> None:
    """Remove a file or a folder tree; a link is removed itself, never what it points to."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


EXCHANGE = True  # False: commit by two renames, as on file systems without RENAME_EXCHANGE (tests)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).
    False, with nothing changed, where the system or the file system cannot."""
    fn = _renameat2() if EXCHANGE else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
