"""The abstract base of the store's two on-disk backends (``ZarrBackend`` in
``zarr_backend.py``, ``HDF5Backend`` in ``hdf5_backend.py``): one logical layout, what each
backend must implement, and what they share.

Both keep every array uncompressed and contiguous so that a reader can ``numpy.memmap``
it. Group attributes are JSON.

Writes hold the store's writer lock (``kdstore.lock``); readers never take it. A group is
written under a staging name and committed together with its provenance record
(``write_group``), so a crash leaves the old group or the new one.

What a crashed writer leaves (staging, trash, interrupted commits, partial feature builds)
is listed by ``leftovers``; the next writer removes the routine ones, ``gc`` all of them.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from .atomic import link_message, os_errors
from .errors import AccessError, StoreFormatError
from .files import du, mib, remove
from .layout import STAGED_VIDEO_PREFIX
from .lock import held, held_elsewhere, locked, store_lock_path

PAGE = 4096
BLOCK_BYTES = 64 << 20  # rows are copied in blocks of about this size
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



def copy_blocks(src: ArraySource, write, where) -> None:
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



@dataclass
class Leftover:
    """Something a crashed or interrupted writer left behind."""

    what: str  # one line for people
    remove: Callable[[], object]  # finish or remove it; call with the store lock held
    routine: bool = True  # any writer removes it; False: resumable work or costly, only ``gc``
    hides: str | None = None  # a group that stays invisible until this is finished


class Backend(ABC):
    """Operations the store needs from a backend; paths are ``/``-joined group keys.

    A backend implements the abstract methods: reading attributes and arrays (as memory
    maps), the atomic group commit (``write_group``), deletion, and what its crashed
    writers leave (``_commit_leftovers``). The writer lock, the space check, link refusal
    and the listing of leftovers are shared here."""

    name: str

    def __init__(self, path: Path, lock_file: Path | None = None):
        self.path = Path(path)
        # a store being built under a temporary name is locked by its final name
        self.lock_file = Path(lock_file) if lock_file else store_lock_path(self.path)

    @staticmethod
    @abstractmethod
    def is_store(path: Path) -> bool:
        """Whether ``path`` holds a store of this backend."""

    @classmethod
    @abstractmethod
    def create(cls, path: Path, attrs: dict, lock_file: Path | None = None) -> "Backend":
        """A new, empty store at ``path`` whose manifest is ``attrs``."""

    @abstractmethod
    def attrs(self, group: str) -> dict:
        """The JSON attributes of ``group`` ("" is the manifest)."""

    @abstractmethod
    def set_attrs(self, group: str, attrs: dict) -> None:
        """Replace the attributes of ``group`` (under the writer lock)."""

    @abstractmethod
    def has(self, key: str) -> bool: ...

    @abstractmethod
    def children(self, group: str) -> list[str]:
        """The names of the visible groups and arrays under ``group``, sorted."""

    @abstractmethod
    def array_info(self, key: str) -> tuple[tuple[int, ...], np.dtype]: ...

    @abstractmethod
    def memmap(self, key: str) -> np.ndarray:
        """The array ``key``, memory-mapped read-only."""

    @abstractmethod
    def data_range(self, key: str) -> tuple[Path, int, int]:
        """(file, offset, bytes) of an array's data now."""

    @abstractmethod
    def delete_group(self, group: str) -> None: ...

    @abstractmethod
    def staging_dir(self) -> Path:
        """The folder where feature builds stage their videos."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise AccessError when the store's files cannot be written."""

    @abstractmethod
    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False,
                    provenance: dict | None = None) -> None:
        """Write ``group`` atomically, with ``provenance`` appended to the manifest in the same commit."""

    @abstractmethod
    def _commit_leftovers(self) -> list[Leftover]:
        """What crashed group commits of this backend left."""

    def check_space(self, sources: Iterable[ArraySource]) -> None:
        """Raise AccessError, before anything is written, when the store's file system lacks
        the room for arrays ``sources`` (HDF5 cannot be trusted to fail cleanly on a full disk)."""
        need = SPACE_MARGIN + sum((-(-int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize // PAGE) + 1) * PAGE for s in sources)
        free = shutil.disk_usage(self.path if self.path.is_dir() else self.path.parent).free
        if free < need:
            raise AccessError(f"{self.path}: no space left on the device for this write (it needs about {mib(need)},"
                              f" {mib(free)} is free): free space there (kdstore gc removes what crashed writers left) and rerun")

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
                out.append(Leftover(f"{p}: {what[m.group(1)]} left by a crashed writer ({mib(du(p))})",
                                    functools.partial(remove, p)))
        return out

    def _partial_builds(self) -> list[Leftover]:
        """Staged videos of feature builds whose writer is gone (resumed by rerunning the build)."""
        st = self.staging_dir()
        out = []
        for d in sorted(st.glob(STAGED_VIDEO_PREFIX + "*")) if st.is_dir() and not st.is_symlink() else []:
            lock = d.with_name(d.name.removesuffix(".lock") + ".lock")
            if held(lock):
                continue  # a live writer's
            if d.is_dir():
                videos = sum(1 for p in d.glob("*.json") if p.name != "writer.json")
                out.append(Leftover(f"{d}: partial build of video/{_built_name(d)} ({videos} videos staged, {mib(du(d))});"
                                    " rerun the build to resume it", functools.partial(_discard_build, d, lock),
                                    routine=False))
            elif d.suffix == ".lock" and not d.with_suffix("").exists():
                out.append(Leftover(f"{d}: lock of a finished feature build", functools.partial(remove, d)))
        return out


def _discard_build(d: Path, lock: Path) -> None:
    with locked(lock, f"video/{_built_name(d)}", timeout=0):
        remove(d)
        lock.unlink(missing_ok=True)


def _built_name(d: Path) -> str:
    """The feature set a staging folder ``video-<name>`` builds."""
    return d.name[len(STAGED_VIDEO_PREFIX):]
