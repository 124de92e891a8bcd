"""Check a store against the published format in ``schemas/`` and for internal consistency."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import jsonschema
import numpy as np

from .rulstm import DATASET_FPS
from .errors import KDStoreError
from .store import Store, segments_fingerprint, uids_fingerprint

# installed: kdstore/schemas (shipped with the package); source tree: schemas/ at the top
_HERE = Path(__file__).resolve().parent
SCHEMA_DIR = next((d for d in (_HERE / "schemas", _HERE.parent / "schemas") if (d / "layout.json").is_file()), _HERE / "schemas")
SCAN_ROWS = 1 << 16  # rows checked for NaN/inf per step, to bound memory on big arrays


def _schemas() -> tuple[dict, dict, dict]:
    load = lambda name: json.loads((SCHEMA_DIR / name).read_text())  # noqa: E731
    return load("manifest.schema.json"), load("groups.schema.json"), load("layout.json")


def validate_store(path: str | Path, deep: bool = True) -> list[str]:
    """Problems found in the store at ``path`` (empty when valid).

    Checks the manifest and every group's attributes against the JSON Schemas, every
    array's dtype, shape and byte size against ``schemas/layout.json`` (a schema-1 store
    against its ``@1`` groups), and the content: ids in range and unique, labels that
    agree with the class table, split and subset membership, the segment fingerprint,
    prediction groups made for these segments, offsets and timestamps ordered, and
    (``deep``) no NaN/inf in features or logits. A path that is not a store raises
    StoreFormatError.
    """
    store = Store.open(path)
    b = store.backend
    manifest_schema, group_schema, layout = _schemas()
    problems: list[str] = []
    v1 = store.schema_version == 1
    # an upgrade killed part-way leaves a schema-2 segments group under a schema-1 manifest
    seg_v1 = v1 and not b.has("segments/split_mask")

    def check_attrs(where: str, attrs: dict, schema: dict | str) -> None:
        if isinstance(schema, str):  # a "#/$defs/<group>" reference into groups.schema.json
            schema = {**group_schema, "$ref": schema}
        for err in jsonschema.Draft202012Validator(schema).iter_errors(attrs):
            loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
            problems.append(f"{store.path}: {where} attribute {loc}: {err.message}")

    def spec_of(group: str) -> dict:
        if (seg_v1 if group == "segments" else v1) and f"{group}@1" in layout["groups"]:
            return layout["groups"][f"{group}@1"]
        return next(s for pat, s in layout["groups"].items() if fnmatch.fnmatch(group, pat))

    try:
        left = b.leftovers()
    except KDStoreError as e:
        return [str(e)]
    for lo in left:
        if lo.hides:
            problems.append(f"{store.path}: {lo.hides}: missing until its interrupted commit is finished"
                            " (by the next writer, or kdstore gc)")
    check_attrs("manifest", store.manifest, manifest_schema)
    groups = ["classes", "segments"] + [f"video/{n}" for n in store.feature_sets()] + [
        f"teacher/{n}" for n in store.predictions()
    ]
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for g in groups:
        spec = spec_of(g)
        check_attrs(g, b.attrs(g), spec["attrs"])
        arrays[g] = {}
        for name, a in spec["arrays"].items():
            key = f"{g}/{name}"
            if not b.has(key):
                if not a.get("optional"):
                    problems.append(f"{store.path}: {key}: missing array")
                continue
            try:
                arr = b.memmap(key)
            except KDStoreError as e:
                problems.append(str(e))
                continue
            if arr.dtype.name not in a["dtype"]:
                problems.append(f"{store.path}: {key}: dtype {arr.dtype.name}, expected one of {a['dtype']}")
            if arr.ndim != len(a["shape"]):
                problems.append(f"{store.path}: {key}: {arr.ndim} dimensions, expected {a['shape']}")
            arrays[g][name] = arr
    if problems:
        return problems  # content checks assume the layout is right
    try:
        classes, seg = store.classes, store.segments
    except (KDStoreError, UnicodeDecodeError, ValueError) as e:
        return [f"{store.path}: segments or classes unreadable ({e})"]
    sa = b.attrs("segments")
    sym = {"A": classes.num_actions, "V": classes.num_verbs, "N": classes.num_nouns, "S": len(seg),
           "nSplits": len(seg.splits), "nSubsets": len(seg.subsets)}

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(f"{store.path}: {msg}")

    for g in groups:
        for name, arr in arrays[g].items():
            for axis, s in enumerate(spec_of(g)["arrays"][name]["shape"]):
                if s in sym:
                    expect(arr.shape[axis] == sym[s], f"{g}/{name}: axis {axis} is {arr.shape[axis]}, expected {s}={sym[s]}")
    expect(bool(((classes.action_verb >= 0) & (classes.action_verb < sym["V"])).all()), "classes/action_verb: verb id out of range")
    expect(bool(((classes.action_noun >= 0) & (classes.action_noun < sym["N"])).all()), "classes/action_noun: noun id out of range")
    expect(len(classes.surface_verbs) == sym["A"] and len(classes.surface_nouns) == sym["A"],
           f"classes: {len(classes.surface_verbs)} surface verbs and {len(classes.surface_nouns)} nouns for {sym['A']} actions")
    expect(len(np.unique(seg.uid)) == len(seg.uid), "segments/uid: duplicate UIDs")
    if not seg_v1:
        expect((sa["key"] == "id") == ("id" in arrays["segments"]), f"segments: attribute key {sa['key']!r} but the id array is {'present' if 'id' in arrays['segments'] else 'absent'}")
        expect(bool(sa["subsets"]) == ("subset_mask" in arrays["segments"]), "segments: attribute subsets and the subset_mask array disagree")
    if seg.ids is not None:
        expect(len(set(seg.ids)) == len(seg.ids), "segments/id: duplicate ids")
    labelled = seg.action >= 0
    expect(bool(((seg.action >= -1) & (seg.action < sym["A"])).all()), "segments/action: action id out of range (-1 marks unlabelled)")
    if ((seg.action >= -1) & (seg.action < sym["A"])).all():
        a = seg.action.clip(0)
        agree = np.where(labelled, (classes.action_verb[a] == seg.verb) & (classes.action_noun[a] == seg.noun),
                         (seg.verb == -1) & (seg.noun == -1))
        bad = np.flatnonzero(~agree)
        expect(len(bad) == 0, f"segments: {seg.describe(bad[0]) if len(bad) else ''} has verb/noun labels that disagree with its action")
    expect(bool((seg.end_frame >= seg.start_frame).all()), "segments: a segment ends before it starts")
    expect(bool(((seg.video >= 0) & (seg.video < len(seg.videos))).all()), "segments/video: video index out of range")
    if seg_v1:
        split = np.asarray(b.memmap("segments/split"))
        expect(bool(((split >= 0) & (split < len(seg.splits))).all()), "segments/split: split index out of range")
    else:
        orphan = np.flatnonzero(~seg.split_mask.any(axis=1))
        expect(len(orphan) == 0, f"segments/split_mask: {seg.describe(orphan[0]) if len(orphan) else ''} is in no split")
        expect(len(seg.subset_splits) == len(seg.subsets) and set(seg.subset_splits) <= set(seg.splits),
               f"segments: subset_splits {seg.subset_splits} must name one split of {seg.splits} per subset")
        for q, (name, split) in enumerate(zip(seg.subsets, seg.subset_splits)):
            if split in seg.splits:
                out = np.flatnonzero(seg.subset_mask[:, q] & ~seg.in_split(split))
                expect(len(out) == 0, f"segments/subset_mask: {seg.describe(out[0]) if len(out) else ''} is in subset {name!r} but not in its split {split!r}")
    fingerprint = uids_fingerprint(seg.uid) if v1 else segments_fingerprint(seg)
    expect(store.manifest.get("segments_sha256") == fingerprint, "manifest segments_sha256 does not match the segment table")
    for name in store.feature_sets():
        g = f"video/{name}"
        a, attrs = arrays[g], b.attrs(g)
        off, ts = np.asarray(a["offsets"]), np.asarray(a["timestamps"])
        expect(len(off) == len(attrs["videos"]) + 1, f"{g}/offsets: {len(off)} entries for {len(attrs['videos'])} videos")
        expect(off[0] == 0 and off[-1] == len(a["features"]) and bool((np.diff(off) > 0).all()), f"{g}/offsets: not increasing from 0 to {len(a['features'])}")
        expect(len(ts) == len(a["features"]), f"{g}/timestamps: {len(ts)} entries for {len(a['features'])} frames")
        inside = np.ones(max(len(ts) - 1, 0), bool)
        inside[off[1:-1] - 1] = False  # a video boundary may go back in time
        expect(bool((np.diff(ts)[inside] > 0).all()), f"{g}/timestamps: not increasing within a video")
        expect(attrs["dim"] == a["features"].shape[1], f"{g}: attribute dim {attrs['dim']}, features have {a['features'].shape[1]}")
        if deep:
            _scan_finite(a["features"], f"{g}/features", lambda i, v=attrs["videos"], o=off: f"video {v[np.searchsorted(o, i, 'right') - 1]!r}", problems, store.path)
    for name in store.predictions():
        g = f"teacher/{name}"
        a, attrs = arrays[g], b.attrs(g)
        uids = np.asarray(a["uids"])
        P = len(uids)
        expect(store.made_for_segments(attrs["segments_sha256"]),
               f"{g}: made for other segments (other uids, ids, labels or splits: segments_sha256 differs)")
        expect(len(np.unique(uids)) == P, f"{g}/uids: duplicate UIDs")
        unknown = np.setdiff1d(uids, seg.uid)
        expect(len(unknown) == 0, f"{g}/uids: UID {unknown[:1].tolist()} not in segments")
        for key, arr in a.items():
            expect(arr.shape[0] == P, f"{g}/{key}: {arr.shape[0]} rows, expected P={P}")
        expect(a["topk_values"].shape[1] == attrs["topk"], f"{g}/topk_values: K={a['topk_values'].shape[1]}, attribute topk={attrs['topk']}")
        expect(a["lse"].shape[1] == len(attrs["lse_temperatures"]), f"{g}/lse: {a['lse'].shape[1]} columns for {len(attrs['lse_temperatures'])} temperatures")
        idx = np.asarray(a["topk_indices"])
        expect(bool(((idx >= 0) & (idx < sym["A"])).all()), f"{g}/topk_indices: class index out of range")
        if deep:
            for key in ("logits", "topk_values", "lse", "features", "verb_logits", "noun_logits"):
                if key in a:
                    _scan_finite(a[key], f"{g}/{key}", lambda i, u=uids: seg.describe(seg.row_of([int(u[i])])[0]), problems, store.path)
    return problems


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
