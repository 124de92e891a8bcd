"""Check a store against the published format in ``schemas/`` and for internal consistency."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import jsonschema
import numpy as np

from .errors import KDStoreError
from .store import Store, segments_fingerprint

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
    array's dtype, shape and byte size against ``schemas/layout.json``, and the content:
    ids in range, UIDs unique and known, offsets and timestamps ordered, and (``deep``)
    no NaN/inf in features or logits. A path that is not a store raises StoreFormatError.
    """
    store = Store.open(path)
    b = store.backend
    manifest_schema, group_schema, layout = _schemas()
    problems: list[str] = []

    def check_attrs(where: str, attrs: dict, schema: dict | str) -> None:
        if isinstance(schema, str):  # a "#/$defs/<group>" reference into groups.schema.json
            schema = {**group_schema, "$ref": schema}
        for err in jsonschema.Draft202012Validator(schema).iter_errors(attrs):
            loc = "/".join(str(p) for p in err.absolute_path) or "(root)"
            problems.append(f"{store.path}: {where} attribute {loc}: {err.message}")

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
        spec = next(s for pat, s in layout["groups"].items() if fnmatch.fnmatch(g, pat))
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
    except KDStoreError as e:
        return [str(e)]
    sym = {"A": classes.num_actions, "V": classes.num_verbs, "N": classes.num_nouns, "S": len(seg)}

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(f"{store.path}: {msg}")

    for g in groups:
        for name, arr in arrays[g].items():
            spec = next(s for pat, s in layout["groups"].items() if fnmatch.fnmatch(g, pat))["arrays"][name]
            for axis, s in enumerate(spec["shape"]):
                if s in sym:
                    expect(arr.shape[axis] == sym[s], f"{g}/{name}: axis {axis} is {arr.shape[axis]}, expected {s}={sym[s]}")
    expect(bool(((classes.action_verb >= 0) & (classes.action_verb < sym["V"])).all()), "classes/action_verb: verb id out of range")
    expect(bool(((classes.action_noun >= 0) & (classes.action_noun < sym["N"])).all()), "classes/action_noun: noun id out of range")
    expect(len(np.unique(seg.uid)) == len(seg.uid), "segments/uid: duplicate UIDs")
    expect(bool(((seg.action >= 0) & (seg.action < sym["A"])).all()), "segments/action: action id out of range")
    expect(bool((seg.end_frame >= seg.start_frame).all()), "segments: a segment ends before it starts")
    expect(bool(((seg.video >= 0) & (seg.video < len(seg.videos))).all()), "segments/video: video index out of range")
    expect(bool(((seg.split >= 0) & (seg.split < len(seg.splits))).all()), "segments/split: split index out of range")
    expect(store.manifest.get("segments_sha256") == segments_fingerprint(seg.uid), "manifest segments_sha256 does not match segments/uid")
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
        expect(attrs["segments_sha256"] == store.manifest.get("segments_sha256"), f"{g}: made for other segments (segments_sha256 differs)")
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
                    _scan_finite(a[key], f"{g}/{key}", lambda i, u=uids: f"UID {u[i]}", problems, store.path)
    return problems


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
