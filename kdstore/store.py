"""The kdstore store: the manifest, the class and segment tables, and the entry points to its
groups (video features: ``kdstore.features``; prediction groups: ``kdstore.predictions``).

The logical layout is in ``kdstore.layout`` (see ``schemas/`` and docs/format.md). The
store knows nothing of models: it checks and keeps arrays.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .atomic import fsync, fsync_tree, link_message, os_errors
from .backend import Backend
from .errors import AccessError, DataError, MissingError, StoreFormatError
from .faults import crash_point
from .features import FeatureSet, VideoWriter
from .files import exchange
from .hdf5_backend import HDF5Backend
from .layout import check_name
from .lock import locked, store_lock_path
from .predictions import Predictions, write_predictions
from .provenance import provenance_entry
from .tables import ClassTable, SegmentTable, default_splits, segment_problems
from .zarr_backend import ZarrBackend

SCHEMA_VERSION = 2
#: Versions ``Store.open`` reads; version 1 stores are read as version 2 (``kdstore upgrade`` rewrites them).
READABLE_VERSIONS = (1, 2)
FORMAT = "kdstore"


def _backend_for(path: Path, backend: str | None) -> type[Backend]:
    if backend is None:
        backend = "hdf5" if path.suffix.lower() in (".h5", ".hdf5") else "zarr"
    if backend not in ("zarr", "hdf5"):
        raise StoreFormatError(f"{path}: unknown backend {backend!r} (zarr or hdf5)")
    return ZarrBackend if backend == "zarr" else HDF5Backend



def segments_fingerprint(seg: SegmentTable) -> str:
    """SHA-256 of everything a prediction group's meaning depends on: each segment's uid,
    own id, video, frames and labels, and the split names with each segment's membership.

    Rows are taken in uid order and splits in name order, so neither the table's row
    order nor the order of ``videos``/``splits`` changes it; the frame rate and the
    evaluation subsets are not part of it.
    """
    order = np.argsort(seg.uid, kind="stable")
    h = hashlib.sha256(b"kdstore segments v2\n")

    def part(tag: bytes, data: bytes) -> None:
        h.update(tag + len(data).to_bytes(8, "little") + data)

    part(b"uid", seg.uid[order].astype("<i8").tobytes())
    part(b"id", b"(uid)" if seg.ids is None else "\0".join(seg.ids[order]).encode())
    part(b"video", "\0".join(np.asarray(seg.videos, dtype=object)[seg.video[order]]).encode())
    for c in ("start_frame", "end_frame"):
        part(c.encode(), getattr(seg, c)[order].astype("<i8").tobytes())
    for c in ("verb", "noun", "action"):
        part(c.encode(), getattr(seg, c)[order].astype("<i4").tobytes())
    names = sorted(seg.splits)
    part(b"splits", "\0".join(names).encode())
    part(b"split_mask", np.packbits(seg.split_mask[order][:, [seg.splits.index(s) for s in names]]).tobytes())
    return h.hexdigest()


def uids_fingerprint(uids: np.ndarray) -> str:
    """The schema-1 fingerprint: SHA-256 of the sorted UIDs only."""
    return hashlib.sha256(np.sort(np.asarray(uids, np.int64)).astype("<i8").tobytes()).hexdigest()


def encode_ids(ids: Sequence[str]) -> np.ndarray:
    """[S, W] uint8: each id's UTF-8 bytes, NUL-padded to the longest (W)."""
    raw = [str(s).encode() for s in ids]
    bad = next((s for s in raw if not s or b"\0" in s), None)
    if bad is not None:
        raise DataError(f"segment id {bad!r}: ids must be non-empty and hold no NUL character")
    width = max((len(s) for s in raw), default=1)
    return np.array(raw, dtype=f"S{width}").view(np.uint8).reshape(len(raw), width)


def decode_ids(arr: np.ndarray) -> np.ndarray:
    """[S] str (object array) from ``encode_ids``'s [S, W] uint8."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return np.array([b.decode() for b in arr.view(f"S{arr.shape[1]}").ravel()], dtype=object)



class Store:
    """A kdstore store on disk (Zarr directory or HDF5 file)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.path = backend.path
        self._classes: ClassTable | None = None
        self._segments: SegmentTable | None = None

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing store; raises StoreFormatError if ``path`` is not one."""
        path = Path(path)
        if not path.exists():
            raise StoreFormatError(f"{path}: no such store")
        if ZarrBackend.is_store(path):
            backend: Backend = ZarrBackend(path)
        elif HDF5Backend.is_store(path):
            backend = HDF5Backend(path)
        else:
            found = "a directory without zarr.json" if path.is_dir() else "a file that is not HDF5"
            raise StoreFormatError(f"{path}: not a kdstore store (found {found})")
        manifest = backend.attrs("")
        if manifest.get("format") != FORMAT:
            raise StoreFormatError(f"{path}: not a kdstore store (manifest format {manifest.get('format')!r})")
        if manifest.get("schema_version") not in READABLE_VERSIONS:
            raise StoreFormatError(
                f"{path}: schema version {manifest.get('schema_version')}, this kdstore reads"
                f" {' and '.join(map(str, READABLE_VERSIONS))}"
            )
        return cls(backend)

    @classmethod
    def create(
        cls,
        path: str | Path,
        classes: ClassTable,
        segments: SegmentTable,
        backend: str | None = None,
        overwrite: bool = False,
        provenance: dict | None = None,
        dataset: str | None = None,
    ) -> "Store":
        """Create a store holding the class table and the segment table.

        The store is built under a temporary sibling name and renamed into place (an
        existing store is swapped out in one step where the file system allows), so a
        crash never leaves a half-made store at ``path``.
        """
        path = Path(path)
        problems = segment_problems(classes, segments)  # before anything on disk is touched
        if problems:
            raise DataError(problems[0])
        kind = _backend_for(path, backend)
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "package_version": __version__,
            "dataset": dataset,
            "segments_sha256": segments_fingerprint(segments),
            "provenance": [provenance or provenance_entry("create")],
        }
        lock = store_lock_path(path)
        with os_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with locked(lock, str(path)):
                if path.is_symlink():  # replacing it would replace the link, not the store
                    raise AccessError(link_message(path))
                old = Store.open(path).backend if path.exists() else None
                if old is not None and not overwrite:
                    raise StoreFormatError(f"{path}: already exists (pass overwrite to replace it)")
                if old is not None:
                    old.refuse_links()
                for lo in kind(path)._sibling_leftovers():  # of crashed creates: we hold the lock, their writers are gone
                    lo.remove()
                tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
                try:
                    b = kind.create(tmp, manifest, lock_file=lock)
                    b.write_group("classes", *class_group(classes))
                    b.write_group("segments", *segment_group(segments))
                    fsync_tree(tmp) if tmp.is_dir() else fsync(tmp)
                except BaseException:
                    shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)  # a failed build holds no space
                    raise
                crash_point("create.built")
                _swap_in(tmp, path, old)
        return cls(kind(path))

    # -- metadata --------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        return self.backend.attrs("")

    def add_provenance(self, entry: dict) -> None:
        """Append a provenance record to the manifest (under the store's writer lock)."""
        self.backend.add_provenance(entry)

    def check_writable(self) -> None:
        """Raise AccessError now if this store cannot be written (read-only, or its writer
        lock cannot be had), before a long computation whose result it is to hold."""
        with self.backend.writing():
            pass

    def gc(self) -> list[str]:
        """Remove what crashed writers left (partial feature builds too) and compact an HDF5
        file's dead space; returns what was done, one line each."""
        return self.backend.gc()

    @property
    def schema_version(self) -> int:
        return self.manifest["schema_version"]

    def made_for_segments(self, fingerprint: str | None) -> bool:
        """Whether a group stamped with ``fingerprint`` was made for this store's segments.
        A schema-1 store also accepts the schema-2 stamp of an upgrade killed part-way."""
        ours = self.manifest.get("segments_sha256")
        return fingerprint == ours or (self.schema_version == 1 and fingerprint == segments_fingerprint(self.segments))

    @property
    def dataset(self) -> str | None:
        """The dataset the store was ingested from (egtea, ek55, ek100), if known."""
        return self.manifest.get("dataset")

    @property
    def classes(self) -> ClassTable:
        if self._classes is None:
            b = self.backend
            a = b.attrs("classes")
            ms = b.has("classes/many_shot_verbs")
            self._classes = ClassTable(
                action_names=a["action_names"],
                verb_names=a["verb_names"],
                noun_names=a["noun_names"],
                action_verb=np.array(b.memmap("classes/action_verb")),
                action_noun=np.array(b.memmap("classes/action_noun")),
                many_shot_verbs=np.array(b.memmap("classes/many_shot_verbs")) if ms else None,
                many_shot_nouns=np.array(b.memmap("classes/many_shot_nouns")) if ms else None,
                surface_verbs=a.get("surface_verbs"),  # absent in schema 1: the display names
                surface_nouns=a.get("surface_nouns"),
            )
        return self._classes

    @property
    def segments(self) -> SegmentTable:
        if self._segments is None:
            seg = read_segment_group(self.backend)
            problems = segment_problems(self.classes, seg)
            if problems:  # a damaged table stops here, not as an IndexError later
                raise DataError(f"{self.path}: {problems[0]}")
            self._segments = seg
        return self._segments

    def default_splits(self) -> tuple[str, str]:
        """The (training, evaluation) splits commands use when given none (``default_splits``)."""
        return default_splits(self.segments)

    # -- predictions (teachers, students) -------------------------------------------

    def groups(self, kind: str | None = None) -> list[str]:
        """Names of the complete prediction groups, of one kind (teacher, student, baseline, ensemble) or all."""
        names = self.backend.children("teacher")
        if kind is None:
            return names
        return [n for n in names if self.backend.attrs(f"teacher/{n}").get("kind") == kind]

    def group(self, name: str) -> Predictions:
        """The prediction group ``teacher/<name>``, of any kind."""
        check_name(name)
        if not self.backend.has(f"teacher/{name}"):
            raise MissingError(f"{self.path}: no predictions named {name!r} (have: {', '.join(self.groups()) or 'none'})")
        return Predictions(self, name)

    def write_predictions(self, name: str, uids: Sequence[int | str] | np.ndarray, logits: np.ndarray,
                          **options) -> Predictions:
        """Check and atomically write per-UID predictions as ``teacher/<name>``; the options
        and what is derived from the logits: ``kdstore.predictions.write_predictions``."""
        return write_predictions(self, name, uids, logits, **options)

    def delete_predictions(self, name: str) -> None:
        self.group(name)
        self.backend.delete_group(f"teacher/{name}")

    # -- video features -------------------------------------------------------------

    def feature_sets(self) -> list[str]:
        """Names of the complete ``video/<name>`` feature sets."""
        return self.backend.children("video")

    def video(self, name: str) -> FeatureSet:
        check_name(name)
        if not self.backend.has(f"video/{name}"):
            raise MissingError(f"{self.path}: no video features named {name!r} (have: {', '.join(self.feature_sets()) or 'none'})")
        return FeatureSet(self, name)

    def video_writer(
        self, name: str, dim: int, dtype: str = "float16", frame_rate: float | None = None, attrs: dict | None = None,
        settings: dict | None = None, restart: bool = False, replace: bool = False,
    ) -> VideoWriter:
        """A resumable writer of per-video features into ``video/<name>``.

        ``settings`` (JSON-able, e.g. the encoder, or an import's source and frame selection)
        must equal those of a partial build being resumed, so that one group never mixes the
        features of two encoders or sources; ``restart`` discards a partial build first.
        The commit keeps the stored videos that were not staged again, or (``replace``) none.
        """
        check_name(name)
        return VideoWriter(self, name, dim, np.dtype(dtype), frame_rate, attrs or {}, settings or {}, restart, replace)




def _swap_in(tmp: Path, path: Path, old: Backend | None) -> None:
    """Put the store built at ``tmp`` in place of ``path`` (holding the store ``old``, or nothing)."""
    if old is None:
        os.rename(tmp, path)
    else:
        aside = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex}")
        if exchange(tmp, path):
            os.rename(tmp, aside)
        else:  # a crash between the renames leaves no store at path: ingest runs again
            os.rename(path, aside)
            crash_point("create.aside")
            os.rename(tmp, path)
        crash_point("create.swapped")
        for lo in old._partial_builds():  # staged features of the replaced store (HDF5: beside it)
            lo.remove()
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
    fsync(path.parent)


def class_group(classes: ClassTable) -> tuple[dict, dict]:
    """(arrays, attrs) of the ``classes`` group."""
    arrays = {"action_verb": classes.action_verb, "action_noun": classes.action_noun}
    if classes.many_shot_verbs is not None:
        arrays |= {"many_shot_verbs": classes.many_shot_verbs, "many_shot_nouns": classes.many_shot_nouns}
    attrs = {"action_names": classes.action_names, "verb_names": classes.verb_names, "noun_names": classes.noun_names,
             "surface_verbs": classes.surface_verbs, "surface_nouns": classes.surface_nouns}
    return arrays, attrs


def segment_group(seg: SegmentTable) -> tuple[dict, dict]:
    """(arrays, attrs) of the ``segments`` group (schema 2)."""
    arrays = {c: getattr(seg, c) for c in SegmentTable.COLUMNS}
    if seg.ids is not None:
        arrays["id"] = encode_ids(seg.ids)
    if seg.subsets:
        arrays["subset_mask"] = seg.subset_mask
    attrs = {"videos": seg.videos, "splits": seg.splits, "fps": seg.fps, "key": seg.key_type,
             "subsets": seg.subsets, "subset_splits": seg.subset_splits}
    return arrays, attrs


def read_segment_group(b: Backend) -> SegmentTable:
    """The segment table of a store; a schema-1 group (one ``split`` index a segment) is
    read as a split mask."""
    a = b.attrs("segments")
    load = lambda name: np.array(b.memmap(f"segments/{name}"))  # noqa: E731
    cols = {c: load(c) for c in SegmentTable.COLUMNS if c != "split_mask"}
    if b.has("segments/split_mask"):
        cols["split_mask"] = load("split_mask")
    else:  # schema 1
        cols["split"] = load("split")
    return SegmentTable(
        **cols, videos=a["videos"], splits=a["splits"], fps=a["fps"],
        ids=decode_ids(load("id")) if a.get("key") == "id" else None,
        subset_mask=load("subset_mask") if b.has("segments/subset_mask") else None,
        subsets=a.get("subsets", []), subset_splits=a.get("subset_splits", []),
    )
