"""The kdstore store: classes, segments, video features and per-UID predictions.

Logical layout (identical in both backends, see ``schemas/`` and docs/format.md)::

    /                   manifest (schema version, creation, provenance, segments_sha256)
    classes/            names (attrs), action_verb [A], action_noun [A], many-shot masks
    segments/           uid, video, start_frame, end_frame, verb, noun, action [S],
                        split_mask [S, P], id [S, W] (string-keyed datasets), subset_mask [S, Q]
    video/<name>/       features [F, D], timestamps [F], offsets [V+1]; attrs: videos, rate
    teacher/<name>/     uids [P], logits [P, A], topk_values/indices [P, K], lse [P, nT],
                        features [P, H], verb_logits, noun_logits; attrs: config, metrics

The store knows nothing of models: it checks and keeps arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import __version__
from .atomic import fsync, fsync_tree, link_message, os_errors, replacing, write_json
from .backend import Backend, Concatenated
from .files import exchange
from .hdf5_backend import HDF5Backend
from .errors import AccessError, ConfigError, DataError, MissingError, StoreFormatError
from .faults import crash_point
from .identity import check_same
from .lock import locked, store_lock_path
from .ranking import label_ranks, rank_order
from .tables import ClassTable, SegmentTable, default_splits
from .zarr_backend import ZarrBackend

SCHEMA_VERSION = 2
#: Versions ``Store.open`` reads; version 1 stores are read as version 2 (``kdstore upgrade`` rewrites them).
READABLE_VERSIONS = (1, 2)
FORMAT = "kdstore"
DEFAULT_LSE_TEMPERATURES = (1.0, 2.0, 4.0, 10.0)
# Predictions groups keep student predictions too: ``kind`` tells them apart.
PREDICTION_KINDS = ("teacher", "student", "baseline")
WRITE_BLOCK_ROWS = 2048  # rows of predictions checked, reduced and converted at a time
# Stored dtypes of a prediction group's arrays. Scores (logits, verb/noun heads) are float32
# (or float64, ``scores_dtype``): evaluate and export rank them, and float16 would tie distinct
# scores (EK100's 3-gram: 82 validation labels tied with the 5th-best class). The KD kernel
# reads float32 top-K values and LSE, taken from the stored logits. [CLS] features are
# regression targets, never ranked: float16. Groups written with float16 logits are read as they are.
PREDICTION_DTYPES = {"logits": np.float32, "verb_logits": np.float32, "noun_logits": np.float32, "features": np.float16}


def _backend_for(path: Path, backend: str | None) -> type[Backend]:
    if backend is None:
        backend = "hdf5" if path.suffix.lower() in (".h5", ".hdf5") else "zarr"
    if backend not in ("zarr", "hdf5"):
        raise StoreFormatError(f"{path}: unknown backend {backend!r} (zarr or hdf5)")
    return ZarrBackend if backend == "zarr" else HDF5Backend


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def provenance_entry(action: str, inputs: Iterable[str | Path] = (), **extra) -> dict:
    """One provenance record: what was done, by which command and package, from which files."""
    return {
        "action": action,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "package_version": __version__,
        "inputs": {str(p): file_sha256(p) for p in inputs},
        **extra,
    }


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

    def group(self, name: str) -> "Predictions":
        """The prediction group ``teacher/<name>``, of any kind."""
        _check_name(name)
        if not self.backend.has(f"teacher/{name}"):
            raise MissingError(f"{self.path}: no predictions named {name!r} (have: {', '.join(self.groups()) or 'none'})")
        return Predictions(self, name)

    def write_predictions(
        self, name: str, uids: Sequence[int | str] | np.ndarray, logits: np.ndarray, *,
        features: np.ndarray | None = None, verb_logits: np.ndarray | None = None,
        noun_logits: np.ndarray | None = None, topk: int = 50,
        lse_temperatures: Sequence[float] = DEFAULT_LSE_TEMPERATURES, kind: str = "teacher",
        config: dict | None = None, metrics: dict | None = None, log: list | None = None,
        overwrite: bool = False, provenance: dict | None = None, block_rows: int = WRITE_BLOCK_ROWS,
        scores_dtype: str = "float32",
    ) -> "Predictions":
        """Check and atomically write per-UID predictions as ``teacher/<name>``.

        ``uids`` are integer uids or the dataset's own ids (``P01_11_0``); rows are stored
        by uid.

        Only UIDs with a prediction are stored; any other segment is absent. The top-K
        logits, their class indices and the full log-sum-exp at each temperature in
        ``lse_temperatures`` are derived here, so top-K distillation reads K numbers a UID.
        Inputs are checked, reduced and converted ``block_rows`` rows at a time, so the
        memory this takes beyond its inputs is the top-K and LSE arrays plus a few
        [block_rows, classes] temporaries.

        ``scores_dtype`` ("float32" or "float64") is the dtype of the stored logits and
        verb/noun logits: float32 holds a network's scores exactly; a model that computes
        in float64 (the n-gram) keeps its ranking only in float64. Top-K values and LSE
        are float32 either way (what the KD kernel reads), taken from the stored logits.
        """
        dtypes = _prediction_dtypes(name, scores_dtype, kind)
        rows, uids, inputs = self._checked_prediction_inputs(
            name, uids, logits, verb_logits, noun_logits, features, dtypes, block_rows)
        A = self.classes.num_actions
        k = min(int(topk), A)
        if k < 1:
            raise DataError(f"predictions {name!r}: topk must be >= 1, found {topk}")
        order = np.argsort(rows, kind="stable")  # keep groups in segment-table order
        temps = [float(t) for t in lse_temperatures]
        vals, idx, lse = _topk_and_lse(inputs["logits"], order, k, temps, dtypes["logits"], block_rows)
        # top-K values and LSE are taken from the logits stored (float32: they agree to the bit)
        arrays = {"uids": uids[order], "logits": _Reordered(inputs["logits"], order, dtypes["logits"], block_rows),
                  "topk_values": vals, "topk_indices": idx, "lse": lse}
        for key in ("features", "verb_logits", "noun_logits"):
            if key in inputs:
                arrays[key] = _Reordered(inputs[key], order, dtypes[key], block_rows)
        attrs = self._prediction_attrs(kind, A, k, temps, config, metrics, log)
        self.backend.write_group(f"teacher/{name}", arrays, attrs, overwrite=overwrite,
                                 provenance=provenance or provenance_entry("write_predictions", group=f"teacher/{name}"))
        return Predictions(self, name)

    def _checked_prediction_inputs(
        self, name: str, uids, logits, verb_logits, noun_logits, features, dtypes: dict, block_rows: int,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(segment rows, uids, input arrays by key, logits first) of ``write_predictions``,
        checked: a valid name, known and distinct UIDs, each array's shape, finite values
        within the range of the dtype it is stored in."""
        _check_name(name)
        seg = self.segments
        rows = seg.row_of(np.asarray(uids).tolist())  # uids or the dataset's ids; MissingError names an unknown one
        uids = seg.uid[rows]
        logits = np.asarray(logits)
        if len(np.unique(rows)) != len(rows):
            r, c = np.unique(rows, return_counts=True)
            raise DataError(f"predictions {name!r}: {seg.describe(r[c > 1][0])} given more than once")
        if block_rows < 1:
            raise ConfigError(f"predictions {name!r}: block_rows must be >= 1, found {block_rows}")
        A = self.classes.num_actions
        expect = {"logits": (logits, A)}
        if verb_logits is not None:
            expect["verb_logits"] = (np.asarray(verb_logits), self.classes.num_verbs)
        if noun_logits is not None:
            expect["noun_logits"] = (np.asarray(noun_logits), self.classes.num_nouns)
        if features is not None:
            expect["features"] = (np.asarray(features), None)
        for key, (arr, width) in expect.items():
            _check_prediction_array(f"predictions {name!r}: {key}", arr, width, uids, A, dtypes[key], block_rows)
        return rows, uids, {key: arr for key, (arr, _) in expect.items()}

    def _prediction_attrs(self, kind: str, num_classes: int, k: int, temps: list[float], config: dict | None,
                          metrics: dict | None, log: list | None) -> dict:
        """The attributes of a prediction group."""
        return {
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "num_classes": num_classes,
            "topk": k,
            "lse_temperatures": temps,
            "segments_sha256": self.manifest["segments_sha256"],
            "config": config or {},
            "metrics": metrics or {},
            "log": log or [],
        }

    def delete_predictions(self, name: str) -> None:
        self.group(name)
        self.backend.delete_group(f"teacher/{name}")

    # -- video features -------------------------------------------------------------

    def feature_sets(self) -> list[str]:
        """Names of the complete ``video/<name>`` feature sets."""
        return self.backend.children("video")

    def video(self, name: str) -> "FeatureSet":
        _check_name(name)
        if not self.backend.has(f"video/{name}"):
            raise MissingError(f"{self.path}: no video features named {name!r} (have: {', '.join(self.feature_sets()) or 'none'})")
        return FeatureSet(self, name)

    def video_writer(
        self, name: str, dim: int, dtype: str = "float16", frame_rate: float | None = None, attrs: dict | None = None,
        settings: dict | None = None, restart: bool = False, replace: bool = False,
    ) -> "VideoWriter":
        """A resumable writer of per-video features into ``video/<name>``.

        ``settings`` (JSON-able, e.g. the encoder, or an import's source and frame selection)
        must equal those of a partial build being resumed, so that one group never mixes the
        features of two encoders or sources; ``restart`` discards a partial build first.
        The commit keeps the stored videos that were not staged again, or (``replace``) none.
        """
        _check_name(name)
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


def _check_name(name: str) -> None:
    if not name or name.startswith((".", "_")) or "/" in name or name != name.strip():
        raise DataError(f"group name {name!r}: must be non-empty, without '/', not starting with '.' or '_'")


def segment_problems(classes: ClassTable, seg: SegmentTable) -> list[str]:
    """What is wrong with a segment table for these classes, one line per kind of problem
    naming its first segment: action ids out of range, labels that disagree with the class
    table, repeated UIDs or ids, segments that end before they start. A store refuses to be
    created with the first (``Store.create``); ``validate`` lists them all."""
    out = []
    bad = np.flatnonzero((seg.action < -1) | (seg.action >= classes.num_actions))
    if len(bad):
        out.append(f"{seg.describe(bad[0])}: unknown action id {seg.action[bad[0]]} (classes: 0..{classes.num_actions - 1}, -1: unlabelled)")
    known = (seg.action >= -1) & (seg.action < classes.num_actions)
    labelled, a = known & (seg.action >= 0), seg.action.clip(0, max(classes.num_actions - 1, 0))
    bad = np.flatnonzero(labelled & ((classes.action_verb[a] != seg.verb) | (classes.action_noun[a] != seg.noun)))
    bad = np.concatenate([bad, np.flatnonzero((seg.action == -1) & ((seg.verb != -1) | (seg.noun != -1)))])
    if len(bad):
        r = bad[0]
        out.append(f"{seg.describe(r)}: action {seg.action[r]} with verb {seg.verb[r]} noun {seg.noun[r]} disagrees with the class table")
    if len(np.unique(seg.uid)) != len(seg.uid):
        u, c = np.unique(seg.uid, return_counts=True)
        out.append(f"UID {u[c > 1][0]}: appears more than once in the segment table")
    if seg.ids is not None and len(set(seg.ids)) != len(seg.ids):
        dup = next(k for k, c in Counter(seg.ids).items() if c > 1)
        out.append(f"segment {dup}: appears more than once in the segment table")
    bad = np.flatnonzero(seg.end_frame < seg.start_frame)
    if len(bad):
        out.append(f"{seg.describe(bad[0])}: ends at frame {seg.end_frame[bad[0]]} before it starts at {seg.start_frame[bad[0]]}")
    return out


def _check_finite(arr: np.ndarray, uids: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim))))[0])
        raise DataError(f"{what}: UID {uids[row]} has NaN or inf")


_FP16_MAX = float(np.finfo(np.float16).max)


def _check_range(arr: np.ndarray, uids: np.ndarray, what: str, dtype) -> None:
    top = float(np.finfo(dtype).max)
    if arr.size and arr.dtype.kind in "fiu" and np.abs(arr).max() > top:
        row = int(np.flatnonzero((np.abs(arr) > top).any(axis=1))[0])
        raise DataError(f"{what}: UID {uids[row]} has a value beyond the {np.dtype(dtype).name} range (|x| > {top:g}) it is stored in")


class _Reordered:
    """``array[order]`` cast to ``dtype`` as an ArraySource, gathered ``block_rows`` rows at a time."""

    def __init__(self, array: np.ndarray, order: np.ndarray, dtype, block_rows: int):
        self.array, self.order, self.dtype, self.block_rows = array, order, np.dtype(dtype), block_rows
        self.shape = (len(order), *array.shape[1:])

    def blocks(self):
        for lo in range(0, len(self.order), self.block_rows):
            yield self.array[self.order[lo : lo + self.block_rows]].astype(self.dtype)


def _prediction_dtypes(name: str, scores_dtype: str, kind: str) -> dict:
    """The stored dtype of each prediction array, after checking ``scores_dtype`` and ``kind``."""
    if scores_dtype not in ("float32", "float64"):
        raise DataError(f"predictions {name!r}: scores_dtype must be 'float32' or 'float64', found {scores_dtype!r}")
    dtypes = {**PREDICTION_DTYPES, "logits": np.dtype(scores_dtype), "verb_logits": np.dtype(scores_dtype),
              "noun_logits": np.dtype(scores_dtype)}
    if kind not in PREDICTION_KINDS:
        raise DataError(f"predictions {name!r}: kind must be one of {PREDICTION_KINDS}, found {kind!r}")
    return dtypes


def _check_prediction_array(what: str, arr: np.ndarray, width: int | None, uids: np.ndarray, num_actions: int,
                            dtype, block_rows: int) -> None:
    """Raise DataError unless ``arr`` is [len(uids), width] (width None: any) with finite values
    that ``dtype`` holds, checked ``block_rows`` rows at a time."""
    if arr.ndim != 2 or arr.shape[0] != len(uids) or (width is not None and arr.shape[1] != width):
        want = f"[{len(uids)}, {width if width is not None else 'H'}]"
        raise DataError(f"{what} has shape {list(arr.shape)}, expected {want} (store has {num_actions} actions)")
    for lo in range(0, len(arr), block_rows):
        sl = slice(lo, lo + block_rows)
        _check_finite(arr[sl], uids[sl], what)
        # a larger finite value would be read back as inf
        _check_range(arr[sl], uids[sl], what, dtype)


def _topk_and_lse(logits: np.ndarray, order: np.ndarray, k: int, temps: list[float], dtype,
                  block_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` values [N, k] float32 and class indices [N, k] int32 of ``logits[order]`` cast
    to ``dtype`` (as stored), ranked as evaluate and export rank, and its log-sum-exp at each
    temperature [N, len(temps)] float32."""
    vals, idx = np.empty((len(order), k), np.float32), np.empty((len(order), k), np.int32)
    lse = np.empty((len(order), len(temps)), np.float32)
    # row blocks: every temporary is [block_rows, A], whatever the number of rows
    for lo in range(0, len(order), block_rows):
        x = logits[order[lo : lo + block_rows]].astype(dtype)  # [b, A], as stored
        bi = rank_order(x, k)  # [b, k] the ranking rule of evaluate and export
        idx[lo : lo + len(x)], vals[lo : lo + len(x)] = bi, np.take_along_axis(x, bi, axis=1)  # values to float32
        for j, t in enumerate(temps):
            lse[lo : lo + len(x), j] = _logsumexp(x / t)
    return vals, idx, lse


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


# ---------------------------------------------------------------------------------------
# Readers


class Predictions:
    """A ``teacher/<name>`` group: per-UID logits, top-K, LSE and features, memory-mapped."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.key = f"teacher/{name}"
        self.attrs = store.backend.attrs(self.key)
        if not store.made_for_segments(self.attrs.get("segments_sha256")):
            raise StoreFormatError(
                f"{store.path}: predictions {name!r} were made for other segments (other uids, ids, labels or splits:"
                f" segments sha256 {str(self.attrs.get('segments_sha256'))[:12]}, store {store.manifest.get('segments_sha256', '')[:12]})"
            )
        self.uids = np.array(self._array("uids"))
        # segment row -> prediction row (-1: absent), for vectorised gathers by segment row
        seg_uid = store.segments.uid
        order = np.argsort(self.uids)
        pos = np.searchsorted(self.uids, seg_uid, sorter=order).clip(0, max(len(self.uids) - 1, 0))
        hit = (self.uids[order[pos]] == seg_uid) if len(self.uids) else np.zeros(len(seg_uid), bool)
        self.row_of_segment = np.where(hit, order[pos] if len(self.uids) else -1, -1).astype(np.int64)

    def _array(self, key: str) -> np.ndarray:
        return self.store.backend.memmap(f"{self.key}/{key}")

    def _optional(self, key: str) -> np.ndarray | None:
        return self._array(key) if self.store.backend.has(f"{self.key}/{key}") else None

    kind = property(lambda self: self.attrs["kind"])
    config = property(lambda self: self.attrs.get("config", {}))
    metrics = property(lambda self: self.attrs.get("metrics", {}))
    topk = property(lambda self: self.attrs["topk"])
    lse_temperatures = property(lambda self: self.attrs["lse_temperatures"])
    logits = property(lambda self: self._array("logits"))  # [P, A] fp32 or fp64 (an fp16 group is read as stored)
    topk_values = property(lambda self: self._array("topk_values"))  # [P, K] fp32
    topk_indices = property(lambda self: self._array("topk_indices"))  # [P, K] int32
    lse = property(lambda self: self._array("lse"))  # [P, nT] fp32
    features = property(lambda self: self._optional("features"))  # [P, H] fp16
    verb_logits = property(lambda self: self._optional("verb_logits"))
    noun_logits = property(lambda self: self._optional("noun_logits"))

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def segment_rows(self) -> np.ndarray:
        """[P] the segment-table row of each prediction row."""
        return self.store.segments.row_of(self.uids.tolist())

    def ids(self) -> list:
        """The dataset's own id of each prediction row (narration ids, or the uids)."""
        return self.store.segments.ids_of(self.segment_rows)

    @property
    def present(self) -> np.ndarray:
        """[N] bool over the store's segments: which have a prediction."""
        return self.row_of_segment >= 0

    def lse_column(self, temperature: float) -> int:
        for i, t in enumerate(self.lse_temperatures):
            if abs(t - temperature) < 1e-9:
                return i
        raise MissingError(
            f"predictions {self.name!r}: no log-sum-exp stored at T={temperature} (have {self.lse_temperatures});"
            " rewrite the group with that temperature in lse_temperatures"
        )

    def predict(self, key: int | str, k: int = 5) -> dict:
        """The top-``k`` actions for one segment (its dataset id, e.g. ``"P01_11_0"``, or its
        uid) with names and probabilities, and the true label (None for an unlabelled one)."""
        if int(k) < 1:
            raise DataError(f"top-k: k must be >= 1, found {k}")
        seg = self.store.segments
        row = int(seg.row_of([key])[0])
        prow = int(self.row_of_segment[row])
        cls = self.store.classes
        true = int(seg.action[row])
        result = {
            "id": seg.id_of(row),
            "predictions": self.name,
            "kind": self.kind,
            "splits": seg.splits_of(row),
            "video": seg.videos[seg.video[row]],
            "true": {"action": true, "name": cls.action_names[true]} if true >= 0 else None,
            "present": prow >= 0,
        }
        if prow < 0:
            return result
        logits = self.logits[prow].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = rank_order(p[None], k)[0]
        result["top"] = [{"action": int(a), "name": cls.action_names[a], "prob": float(p[a])} for a in top]
        if true >= 0:
            result["true"]["prob"] = float(p[true])
            result["true"]["rank"] = int(label_ranks(p[None], [true])[0]) + 1
        feats = self.features
        if feats is not None:
            result["feature_norm"] = float(np.linalg.norm(feats[prow].astype(np.float32)))
        return result


class FeatureSet:
    """A ``video/<name>`` group: per-frame features of all videos, contiguous, memory-mapped."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.key = f"video/{name}"
        self.attrs = store.backend.attrs(self.key)
        self.videos: list[str] = self.attrs["videos"]
        self.offsets = np.array(store.backend.memmap(f"{self.key}/offsets"))  # [V+1]
        self.features = store.backend.memmap(f"{self.key}/features")  # [F, D]
        self.timestamps = np.array(store.backend.memmap(f"{self.key}/timestamps"))  # [F] seconds
        self._video_index = {v: i for i, v in enumerate(self.videos)}
        # one sorted key over all frames so that frame lookups are one searchsorted call
        counts = np.diff(self.offsets)
        # (timestamps may be negative: shift them so that every video's keys stay in its own band)
        self._t0 = min(0.0, float(self.timestamps.min(initial=0.0)))
        span = self.timestamps.max(initial=0.0) - self._t0
        self._stride = float(2 ** np.ceil(np.log2(max(span, 1.0) + 2)))
        self._key = (self.timestamps - self._t0) + np.repeat(np.arange(len(self.videos)), counts) * self._stride

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
        """[B, T] global frame indices: the last frame at or before each time.

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
        key = (np.asarray(times, dtype=np.float64) - self._t0) + (video_idx * self._stride)[:, None]  # [B, T]
        idx = np.searchsorted(self._key, key, side="right") - 1  # [B, T]
        lo, hi = self.offsets[video_idx][:, None], self.offsets[video_idx + 1][:, None] - 1
        return np.clip(idx, lo, hi)

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


# ---------------------------------------------------------------------------------------
# Resumable feature writer


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

    def __init__(self, store: Store, name: str, dim: int, dtype: np.dtype, frame_rate: float | None, attrs: dict,
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
        self.dir = store.backend.staging_dir() / f"video-{name}"
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
