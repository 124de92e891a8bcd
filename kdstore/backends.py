"""Two on-disk backends for one logical layout: a Zarr v3 directory and an HDF5 file.

Both keep every array uncompressed and contiguous so that a reader can ``numpy.memmap``
it: in Zarr an array is a single chunk whose chunk file (``<array>/c/0/0``) holds the raw
little-endian C-order bytes; in HDF5 a contiguous dataset starts at a 4 KiB-aligned file
offset. Group attributes are JSON. A group is written under a staging name and made
visible by one rename (Zarr: a directory rename; HDF5: a link move), so a reader never
sees a half-written group.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .errors import KDStoreError, MissingError, StoreFormatError

PAGE = 4096
BLOCK_BYTES = 64 << 20  # rows are copied in blocks of about this size


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


class Backend:
    """Operations the store needs from a backend; paths are ``/``-joined group keys."""

    path: Path
    name: str

    def attrs(self, group: str) -> dict: ...
    def set_attrs(self, group: str, attrs: dict) -> None: ...
    def has(self, key: str) -> bool: ...
    def children(self, group: str) -> list[str]: ...
    def array_info(self, key: str) -> tuple[tuple[int, ...], np.dtype]: ...
    def memmap(self, key: str) -> np.ndarray: ...
    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False) -> None: ...
    def delete_group(self, group: str) -> None: ...
    def staging_dir(self) -> Path: ...


# ---------------------------------------------------------------------------------------
# Zarr v3


class ZarrBackend(Backend):
    """A Zarr v3 directory hierarchy written with raw single-chunk arrays."""

    name = "zarr"

    def __init__(self, path: Path):
        self.path = Path(path)

    @staticmethod
    def is_store(path: Path) -> bool:
        return (Path(path) / "zarr.json").is_file()

    @classmethod
    def create(cls, path: Path, attrs: dict) -> "ZarrBackend":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _write_json(path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
        return cls(path)

    def _meta(self, key: str) -> dict:
        f = self.path / key / "zarr.json"
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
        meta = self._meta(group)
        meta["attributes"] = attrs
        _write_json(self.path / group / "zarr.json", meta)

    def has(self, key: str) -> bool:
        return (self.path / key / "zarr.json").is_file()

    def children(self, group: str) -> list[str]:
        d = self.path / group
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
        chunk = self.path / key / "c" / "/".join("0" for _ in shape)
        n = int(np.prod(shape)) * dtype.itemsize
        if n == 0:
            return np.zeros(shape, dtype)
        found = chunk.stat().st_size if chunk.exists() else None
        if found != n:
            raise StoreFormatError(f"{chunk}: expected {n} bytes for {key} {shape} {dtype}, found {found}")
        return np.memmap(chunk, dtype=dtype, mode="r", shape=shape)

    def staging_dir(self) -> Path:
        return self.path / ".staging"

    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False) -> None:
        target = self.path / group
        if target.exists() and not overwrite:
            raise StoreFormatError(f"{self.path}: group {group!r} exists (pass overwrite to replace it)")
        tmp = self.staging_dir() / f"tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            _write_json(tmp / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
            for name, src in arrays.items():
                self._write_array(tmp / name, as_source(src))
            _fsync_tree(tmp)
            self._ensure_parents(group)
            if target.exists():
                trash = self.staging_dir() / f"trash-{uuid.uuid4().hex}"
                os.replace(target, trash)
                os.replace(tmp, target)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, target)
            _fsync_dir(target.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def delete_group(self, group: str) -> None:
        target = self.path / group
        if target.exists():
            trash = self.staging_dir() / f"trash-{uuid.uuid4().hex}"
            trash.parent.mkdir(exist_ok=True)
            os.replace(target, trash)  # invisible at once, then removed
            shutil.rmtree(trash)

    def _ensure_parents(self, group: str) -> None:
        parts = Path(group).parts[:-1]
        for i in range(1, len(parts) + 1):
            d = self.path.joinpath(*parts[:i])
            if not (d / "zarr.json").exists():
                d.mkdir(exist_ok=True)
                _write_json(d / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}})

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
        _write_json(d / "zarr.json", meta)
        if int(np.prod(shape)) == 0:
            return
        chunk = d / "c" / "/".join("0" for _ in shape)
        chunk.parent.mkdir(parents=True)
        out = np.memmap(chunk, dtype=dtype.newbyteorder("<"), mode="w+", shape=shape)
        _copy_blocks(src, out, chunk)
        out.flush()
        del out


# ---------------------------------------------------------------------------------------
# HDF5


def _damage_is_format_error(method):
    """Report what h5py raises on a damaged file (bad metadata, undecodable attributes) as StoreFormatError."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except KDStoreError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueError
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreFormatError(f"{self.path}: damaged HDF5 store, {method.__name__}({', '.join(map(repr, args))}) failed ({what})") from None

    return wrapper


class HDF5Backend(Backend):
    """One HDF5 file; contiguous page-aligned datasets, JSON attributes in ``_attrs``."""

    name = "hdf5"
    ATTRS = "_attrs"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offsets: dict[str, int] = {}

    @staticmethod
    def is_store(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(8) == b"\x89HDF\r\n\x1a\n"
        except (IsADirectoryError, FileNotFoundError):
            return False

    def _open(self, mode: str = "r"):
        import h5py

        try:
            return h5py.File(self.path, mode, alignment_threshold=PAGE, alignment_interval=PAGE)
        except OSError as e:
            raise StoreFormatError(f"{self.path}: cannot open as HDF5 ({str(e).splitlines()[0]})") from None

    @classmethod
    def create(cls, path: Path, attrs: dict) -> "HDF5Backend":
        b = cls(path)
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
        with self._open("r+") as f:
            _h5_set_attrs(f[group] if group else f, attrs)

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
        size = self.path.stat().st_size
        if offset + n > size:
            raise StoreFormatError(f"{self.path}: {key} needs bytes {offset}..{offset + n}, file has {size} (truncated)")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def staging_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".staging")

    def write_group(self, group: str, arrays: dict, attrs: dict, overwrite: bool = False) -> None:
        tmp = f"_staging/{uuid.uuid4().hex}"
        with self._open("r+") as f:
            if group in f and not overwrite:
                raise StoreFormatError(f"{self.path}: group {group!r} exists (pass overwrite to replace it)")
            g = f.create_group(tmp)
            try:
                _h5_set_attrs(g, attrs)
                for name, src in arrays.items():
                    src = as_source(src)
                    ds = g.create_dataset(name, shape=src.shape, dtype=src.dtype)  # contiguous, uncompressed
                    if ds.size:
                        _copy_blocks(src, ds, f"{self.path}:{group}/{name}")
            except BaseException:
                del f[tmp]  # a failed write leaves no staging group behind
                raise
            f.flush()
            if group in f:
                del f[group]
            parent = group.rsplit("/", 1)[0] if "/" in group else ""
            if parent and parent not in f:
                f.create_group(parent)
            f.move(tmp, group)
            f.flush()

    def delete_group(self, group: str) -> None:
        with self._open("r+") as f:
            if group in f:
                del f[group]

    def discard_staging(self) -> None:
        """Drop groups left by a writer that crashed before its commit."""
        with self._open("r+") as f:
            if "_staging" in f:
                del f["_staging"]


def _h5_set_attrs(g, attrs: dict) -> None:
    import h5py

    if HDF5Backend.ATTRS in g:
        del g[HDF5Backend.ATTRS]
    # a dataset, not an attribute: HDF5 attributes are capped at 64 KiB
    g.create_dataset(HDF5Backend.ATTRS, data=json.dumps(attrs), dtype=h5py.string_dtype())


def _copy_blocks(src: ArraySource, out, where) -> None:
    i = 0
    for block in src.blocks():
        block = np.asarray(block)
        if block.shape[1:] != tuple(src.shape[1:]):
            raise StoreFormatError(f"{where}: block of shape {block.shape} does not fit {tuple(src.shape)}")
        out[i : i + len(block)] = block
        i += len(block)
    if i != src.shape[0]:
        raise StoreFormatError(f"{where}: expected {src.shape[0]} rows, got {i}")


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
