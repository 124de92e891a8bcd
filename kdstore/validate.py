"""Check a store against the published format in ``schemas/`` and for internal consistency."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np

from .atomic import link_message
from .rulstm import DATASET_FPS
from .errors import KDStoreError
from .store import Store, read_segment_group, segments_fingerprint, uids_fingerprint
from .tables import segment_problems

# installed: kdstore/schemas (shipped with the package); source tree: schemas/ at the top
_HERE = Path(__file__).resolve().parent
SCHEMA_DIR = next((d for d in (_HERE / "schemas", _HERE.parent / "schemas") if (d / "layout.json").is_file()), _HERE / "schemas")
SCAN_ROWS = 1 << 16  # rows checked for NaN/inf per step, to bound memory on big arrays


def _schemas() -> tuple[dict, dict, dict]:
    load = lambda name: json.loads((SCHEMA_DIR / name).read_text())  # noqa: E731
    return load("manifest.schema.json"), load("groups.schema.json"), load("layout.json")


@dataclass
class _Check:
    """What every group checker shares: the store, the schemas and the problems found."""

    store: Store
    deep: bool
    manifest_schema: dict
    group_schema: dict
    layout: dict
    problems: list[str] = field(default_factory=list)
    sym: dict = field(default_factory=dict)  # shape symbols: A, V, N, S, nSplits, nSubsets

    @property
    def v1(self) -> bool:
        return self.store.schema_version == 1

    @property
    def seg_v1(self) -> bool:  # an upgrade killed part-way leaves a schema-2 segments group under a schema-1 manifest
        return self.v1 and not self.store.backend.has("segments/split_mask")

    def expect(self, cond: bool, msg: str) -> None:
        if not cond:
            self.problems.append(f"{self.store.path}: {msg}")

    def attrs(self, where: str, attrs: dict, schema: dict | str) -> None:
        if isinstance(schema, str):  # a "#/$defs/<group>" reference into groups.schema.json
            schema = {**self.group_schema, "$ref": schema}
        for err in jsonschema.Draft202012Validator(schema).iter_errors(attrs):
            loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
            self.problems.append(f"{self.store.path}: {where} attribute {loc}: {err.message}")

    def spec(self, group: str) -> dict:
        groups = self.layout["groups"]
        if (self.seg_v1 if group == "segments" else self.v1) and f"{group}@1" in groups:
            return groups[f"{group}@1"]
        return next(s for pat, s in groups.items() if fnmatch.fnmatch(group, pat))


def validate_store(path: str | Path, deep: bool = True) -> list[str]:
    """Problems found in the store at ``path`` (empty when valid).

    Checks that the store holds no symbolic links, the manifest and every group's
    attributes against the JSON Schemas, every array's dtype, shape and byte size against
    ``schemas/layout.json`` (a schema-1 store against its ``@1`` groups), and the content,
    one checker per group kind: ids in range and unique, labels that agree with the class
    table, split and subset membership, the segment fingerprint, prediction groups made for
    these segments, offsets and timestamps ordered, and (``deep``) no NaN/inf in features or
    logits. A path that is not a store raises StoreFormatError.
    """
    store = Store.open(path)
    c = _Check(store, deep, *_schemas())
    try:
        left = store.backend.leftovers()
    except KDStoreError as e:
        return [str(e)]
    c.problems += [link_message(link, inside=True) for link in store.backend.links()]
    for lo in left:
        if lo.hides:
            c.problems.append(f"{store.path}: {lo.hides}: missing until its interrupted commit is finished"
                              " (by the next writer, or kdstore gc)")
    c.attrs("manifest", store.manifest, c.manifest_schema)
    groups = ["classes", "segments", *(f"video/{n}" for n in store.feature_sets()), *(f"teacher/{n}" for n in store.groups())]
    arrays = {g: _check_layout(c, g) for g in groups}
    if c.problems:
        return c.problems  # content checks assume the layout is right
    try:
        classes, seg = store.classes, read_segment_group(store.backend)  # unchecked: _check_segments lists its problems
    except (KDStoreError, UnicodeDecodeError, ValueError) as e:
        return [f"{store.path}: segments or classes unreadable ({e})"]
    c.sym = {"A": classes.num_actions, "V": classes.num_verbs, "N": classes.num_nouns, "S": len(seg),
             "nSplits": len(seg.splits), "nSubsets": len(seg.subsets)}
    for g in groups:
        _check_axes(c, g, arrays[g])
    _check_classes(c, classes)
    _check_segments(c, classes, seg, arrays["segments"])
    for name in store.feature_sets():
        _check_video(c, name, arrays[f"video/{name}"])
    for name in store.groups():
        _check_predictions(c, name, arrays[f"teacher/{name}"], seg)
    return c.problems


def _check_layout(c: _Check, g: str) -> dict[str, np.ndarray]:
    """The arrays of group ``g`` whose layout is readable; its attributes, dtypes and ranks checked."""
    b, spec = c.store.backend, c.spec(g)
    c.attrs(g, b.attrs(g), spec["attrs"])
    out = {}
    for name, a in spec["arrays"].items():
        key = f"{g}/{name}"
        if not b.has(key):
            c.expect(bool(a.get("optional")), f"{key}: missing array")
            continue
        try:
            arr = b.memmap(key)
        except KDStoreError as e:
            c.problems.append(str(e))
            continue
        c.expect(arr.dtype.name in a["dtype"], f"{key}: dtype {arr.dtype.name}, expected one of {a['dtype']}")
        c.expect(arr.ndim == len(a["shape"]), f"{key}: {arr.ndim} dimensions, expected {a['shape']}")
        out[name] = arr
    return out


def _check_axes(c: _Check, g: str, arrays: dict[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        for axis, s in enumerate(c.spec(g)["arrays"][name]["shape"]):
            if s in c.sym:
                c.expect(arr.shape[axis] == c.sym[s], f"{g}/{name}: axis {axis} is {arr.shape[axis]}, expected {s}={c.sym[s]}")


def _check_classes(c: _Check, classes) -> None:
    A, V, N = c.sym["A"], c.sym["V"], c.sym["N"]
    c.expect(bool(((classes.action_verb >= 0) & (classes.action_verb < V)).all()), "classes/action_verb: verb id out of range")
    c.expect(bool(((classes.action_noun >= 0) & (classes.action_noun < N)).all()), "classes/action_noun: noun id out of range")
    c.expect(len(classes.surface_verbs) == A and len(classes.surface_nouns) == A,
             f"classes: {len(classes.surface_verbs)} surface verbs and {len(classes.surface_nouns)} nouns for {A} actions")


def _check_segments(c: _Check, classes, seg, arrays: dict[str, np.ndarray]) -> None:
    """The segment table: the problems a store refuses to create (``segment_problems``), the
    key and subset attributes, video indices, split and subset membership, the fingerprint."""
    for p in segment_problems(classes, seg):
        c.problems.append(f"{c.store.path}: segments: {p}")
    if not c.seg_v1:
        sa = c.store.backend.attrs("segments")
        has_id = "id" in arrays
        c.expect((sa["key"] == "id") == has_id,
                 f"segments: attribute key {sa['key']!r} but the id array is {'present' if has_id else 'absent'}")
        c.expect(bool(sa["subsets"]) == ("subset_mask" in arrays), "segments: attribute subsets and the subset_mask array disagree")
    c.expect(bool(((seg.video >= 0) & (seg.video < len(seg.videos))).all()), "segments/video: video index out of range")
    if c.seg_v1:
        split = np.asarray(c.store.backend.memmap("segments/split"))
        c.expect(bool(((split >= 0) & (split < len(seg.splits))).all()), "segments/split: split index out of range")
    else:
        orphan = np.flatnonzero(~seg.split_mask.any(axis=1))
        c.expect(len(orphan) == 0, f"segments/split_mask: {seg.describe(orphan[0]) if len(orphan) else ''} is in no split")
        c.expect(len(seg.subset_splits) == len(seg.subsets) and set(seg.subset_splits) <= set(seg.splits),
                 f"segments: subset_splits {seg.subset_splits} must name one split of {seg.splits} per subset")
        for q, (name, split) in enumerate(zip(seg.subsets, seg.subset_splits)):
            if split in seg.splits:
                out = np.flatnonzero(seg.subset_mask[:, q] & ~seg.in_split(split))
                c.expect(len(out) == 0, f"segments/subset_mask: {seg.describe(out[0]) if len(out) else ''} is in subset"
                                        f" {name!r} but not in its split {split!r}")
    fingerprint = uids_fingerprint(seg.uid) if c.v1 else segments_fingerprint(seg)
    c.expect(c.store.manifest.get("segments_sha256") == fingerprint, "manifest segments_sha256 does not match the segment table")


def _check_video(c: _Check, name: str, a: dict[str, np.ndarray]) -> None:
    """A feature set: offsets from 0 to the frame count, timestamps increasing within each video."""
    g = f"video/{name}"
    attrs = c.store.backend.attrs(g)
    off, ts, n = np.asarray(a["offsets"]), np.asarray(a["timestamps"]), len(a["features"])
    c.expect(len(off) == len(attrs["videos"]) + 1, f"{g}/offsets: {len(off)} entries for {len(attrs['videos'])} videos")
    c.expect(off[0] == 0 and off[-1] == n and bool((np.diff(off) > 0).all()), f"{g}/offsets: not increasing from 0 to {n}")
    c.expect(len(ts) == n, f"{g}/timestamps: {len(ts)} entries for {n} frames")
    inside = np.ones(max(len(ts) - 1, 0), bool)
    inside[off[1:-1] - 1] = False  # a video boundary may go back in time
    c.expect(bool((np.diff(ts)[inside] > 0).all()), f"{g}/timestamps: not increasing within a video")
    c.expect(attrs["dim"] == a["features"].shape[1], f"{g}: attribute dim {attrs['dim']}, features have {a['features'].shape[1]}")
    if "video_sources" in attrs:  # each video's source, by index into attribute sources
        per_video, n = attrs["video_sources"], len(attrs.get("sources", []))
        c.expect(sorted(per_video) == sorted(attrs["videos"]) and all(i < n for i in per_video.values()),
                 f"{g}: attribute video_sources does not give one of its {n} sources for each of its videos")
    if c.deep:
        videos = attrs["videos"]
        _scan_finite(a["features"], f"{g}/features", lambda i: f"video {videos[np.searchsorted(off, i, 'right') - 1]!r}",
                     c.problems, c.store.path)


def _check_predictions(c: _Check, name: str, a: dict[str, np.ndarray], seg) -> None:
    """A prediction group: made for these segments, UIDs unique and known, row counts, top-K and LSE widths."""
    g = f"teacher/{name}"
    attrs = c.store.backend.attrs(g)
    uids = np.asarray(a["uids"])
    P = len(uids)
    c.expect(c.store.made_for_segments(attrs["segments_sha256"]),
             f"{g}: made for other segments (other uids, ids, labels or splits: segments_sha256 differs)")
    c.expect(len(np.unique(uids)) == P, f"{g}/uids: duplicate UIDs")
    unknown = np.setdiff1d(uids, seg.uid)
    c.expect(len(unknown) == 0, f"{g}/uids: UID {unknown[:1].tolist()} not in segments")
    for key, arr in a.items():
        c.expect(arr.shape[0] == P, f"{g}/{key}: {arr.shape[0]} rows, expected P={P}")
    c.expect(a["topk_values"].shape[1] == attrs["topk"], f"{g}/topk_values: K={a['topk_values'].shape[1]}, attribute topk={attrs['topk']}")
    c.expect(a["lse"].shape[1] == len(attrs["lse_temperatures"]),
             f"{g}/lse: {a['lse'].shape[1]} columns for {len(attrs['lse_temperatures'])} temperatures")
    idx = np.asarray(a["topk_indices"])
    c.expect(bool(((idx >= 0) & (idx < c.sym["A"])).all()), f"{g}/topk_indices: class index out of range")
    if c.deep:
        for key in ("logits", "topk_values", "lse", "features", "verb_logits", "noun_logits"):
            if key in a:
                _scan_finite(a[key], f"{g}/{key}", lambda i: seg.describe(seg.row_of([int(uids[i])])[0]), c.problems,
                             c.store.path)


def store_warnings(path: str | Path) -> list[str]:
    """Things that are valid but likely wrong: a known dataset ingested at another frame
    rate than its files', a schema-1 store not yet upgraded."""
    store = Store.open(path)
    out = []
    dataset, fps = store.dataset, store.segments.fps
    if dataset in DATASET_FPS and abs(fps - DATASET_FPS[dataset]) > 1e-6:
        out.append(f"{store.path}: {dataset} frames count at {DATASET_FPS[dataset]:g} fps in its files, but the store was"
                   f" ingested at {fps:g} fps: every time derived from frames is off by {DATASET_FPS[dataset] / fps:.3g}x"
                   f" (re-ingest without --fps)")
    if store.schema_version == 1:
        out.append(f"{store.path}: schema version 1, read as version 2; `kdstore upgrade {store.path}` rewrites it")
    return out


def leftovers(path: str | Path) -> list[str]:
    """What crashed or interrupted writers left in the store at ``path``, a line each
    (``kdstore gc`` or the next writer removes them; partial feature builds only ``gc``)."""
    try:
        return [lo.what for lo in Store.open(path).backend.leftovers() if not lo.hides]
    except KDStoreError:  # a damaged store: validate_store reports it
        return []


def _scan_finite(arr: np.ndarray, key: str, name_row, problems: list[str], path: Path) -> None:
    for lo in range(0, len(arr), SCAN_ROWS):
        block = np.asarray(arr[lo : lo + SCAN_ROWS])
        ok = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not ok.all():
            row = lo + int(np.flatnonzero(~ok)[0])
            problems.append(f"{path}: {key}: {name_row(row)} (row {row}) has NaN or inf")
            return
