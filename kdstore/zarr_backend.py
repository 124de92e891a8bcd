"""The Zarr v3 backend: a directory hierarchy of raw single-chunk arrays.

An array is a single chunk whose chunk file (``<array>/c/0/0``) holds the raw little-endian
C-order bytes, so a reader can ``numpy.memmap`` it; group attributes are JSON in
``zarr.json``.

A group is committed in steps: the staged directory is complete and synced, then a journal
(``.staging/commit-<id>.json``) is written; from then on the commit is finished by this
writer or, after a crash, by the next writer (``recover``). The staged directory takes the
group's place in one step (Linux ``renameat2(RENAME_EXCHANGE)``), or by two renames where
the file system cannot exchange; the journal covers the gap between them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .atomic import fsync, fsync_tree, write_json
from .backend import ArraySource, Backend, Leftover, as_source, copy_blocks
from .errors import AccessError, MissingError, StoreFormatError
from .faults import crash_point
from .files import du, exchange, inode, mib, remove


def _zarr_dtype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iuf":
        return dtype.name
    raise StoreFormatError(f"dtype {dtype} cannot be stored (numeric and bool arrays only)")


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
        if inode(staged) == j["inode"]:  # not in place yet
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
            remove(old)
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
                remove(trash)

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
                out.append(Leftover(f"{j}: unreadable commit journal", functools.partial(remove, j)))
                continue
            journaled.add(staged)
            # between the two renames of a replacement: the group is gone until the commit is finished
            hides = group if not self.has(group) and (st / staged.replace("tmp-", "trash-", 1)).exists() else None
            out.append(Leftover(f"{self.path}: interrupted commit of {group}", functools.partial(self._finish, j), hides=hides))
        for d in sorted(st.glob("tmp-*")):
            if d.name not in journaled:
                out.append(Leftover(f"{d}: a group staged by a crashed writer ({mib(du(d))})", functools.partial(remove, d)))
        for d in sorted(st.glob("trash-*")):
            if d.name.replace("trash-", "tmp-") not in journaled:
                out.append(Leftover(f"{d}: a replaced group not yet removed ({mib(du(d))})", functools.partial(remove, d)))
        # half-written JSON files of atomic rewrites (the live tree and the staging folder, not partial builds)
        real = lambda d: d.is_dir() and not d.is_symlink()  # noqa: E731  (nothing is removed through a link)
        groups = [d for d in self.path.iterdir() if real(d) and not d.name.startswith(".")]
        dirs = [self.path, *([st] if real(st) else []), *groups, *(g for d in groups for g in d.iterdir() if real(g))]
        for d in dirs:
            for f in sorted(d.glob(".*.tmp")):
                out.append(Leftover(f"{f}: a half-written metadata file", functools.partial(remove, f)))
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
            copy_blocks(src, lambda i, block: f.write(np.ascontiguousarray(block, dtype=little).data), chunk)
