"""Summaries and exports of a store for people and other tools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import replacing
from .errors import ConfigError, DataError
from .faults import crash_point
from .store import Store


def _nbytes(store: Store, group: str) -> int:
    total = 0
    for key in store.backend.children(group):
        shape, dtype = store.backend.array_info(f"{group}/{key}")
        total += int(np.prod(shape)) * dtype.itemsize
    return total


def _kept(fs) -> dict | None:
    """Frames kept of the source's (an import with ``--fps``/``--windows``), when every video's count is known."""
    source = fs.attrs.get("source_frames") or {}
    if not fs.videos or any(v not in source for v in fs.videos):
        return None
    total = int(sum(source[v] for v in fs.videos))
    return {"source_frames": total, "fraction": len(fs) / total if total else None}


def summary(store: Store) -> dict:
    """Counts, arrays, sizes, feature sets and prediction groups of a store."""
    seg, cls = store.segments, store.classes
    m = store.manifest
    several = {k: sum(len(w) > 1 for w in cls.surface_names(k).values()) for k in ("verb", "noun")}
    unused = {"verbs": int(cls.num_verbs - len(np.unique(cls.action_verb))), "nouns": int(cls.num_nouns - len(np.unique(cls.action_noun)))}
    out = {
        "path": str(store.path),
        "backend": store.backend.name,
        "schema_version": m["schema_version"],
        "created": m["created"],
        "dataset": m.get("dataset"),
        "classes": {"actions": cls.num_actions, "verbs": cls.num_verbs, "nouns": cls.num_nouns,
                    "many_shot": cls.many_shot_verbs is not None,
                    "several_names": {"verbs": several["verb"], "nouns": several["noun"]},
                    "without_action": unused},
        "segments": {"total": len(seg), "videos": len(seg.videos), "fps": seg.fps, "key": seg.key_type,
                     "labelled": int(seg.labelled.sum()),
                     "splits": {s: int(seg.in_split(s).sum()) for s in seg.splits},
                     "unlabelled": {s: int((seg.in_split(s) & ~seg.labelled).sum()) for s in seg.splits},
                     "subsets": {s: int(seg.in_subset(s).sum()) for s in seg.subsets}},
        "video": {},
        "predictions": {},
    }
    for name in store.feature_sets():
        fs = store.video(name)
        out["video"][name] = {
            "frames": len(fs), "dim": fs.dim, "dtype": fs.features.dtype.name, "videos": len(fs.videos),
            "frame_rate": fs.frame_rate, "backbone": fs.attrs.get("backbone"),
            "bytes": _nbytes(store, f"video/{name}"),
            "segments_without_features": int((fs.video_index(seg.videos)[seg.video] < 0).sum()),
            "selection": fs.attrs.get("selection"),
            "kept": _kept(fs),
        }
    for name in store.groups():
        p = store.group(name)
        out["predictions"][name] = {
            "kind": p.kind, "uids": len(p), "topk": p.topk, "scores_dtype": p.logits.dtype.name,
            "features": None if p.features is None else p.features.shape[1],
            "metrics": p.metrics, "bytes": _nbytes(store, f"teacher/{name}"),
        }
    return out


def export_predictions(store: Store, name: str, out: str | Path, fmt: str | None = None, k: int = 5, **epic) -> Path:
    """Write a prediction group to JSONL (one segment a line, top-``k``, keyed by the
    dataset's id), NPZ (all arrays, with ``ids`` for string-keyed datasets) or the EPIC
    leaderboard JSON (``fmt="epic"``, options ``epic`` of ``submission.epic_entries``).
    The file appears whole or not at all."""
    out = Path(out)
    fmt = fmt or out.suffix.lstrip(".").lower()
    if fmt not in ("npz", "jsonl", "epic"):
        raise DataError(f"{out}: unknown export format {fmt!r} (jsonl, npz or epic)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: the folder {out.parent} does not exist")
    p = store.group(name)
    if fmt == "npz":
        arrays = {"uids": p.uids, "logits": np.asarray(p.logits), "topk_values": np.asarray(p.topk_values),
                  "topk_indices": np.asarray(p.topk_indices)}
        if store.segments.ids is not None:
            arrays["ids"] = np.array(p.ids(), dtype=str)
        for key in ("features", "verb_logits", "noun_logits"):
            if getattr(p, key) is not None:
                arrays[key] = np.asarray(getattr(p, key))
        with replacing(out, "wb") as f:
            np.savez(f, **arrays)
    elif fmt == "jsonl":
        with replacing(out) as f:
            for key in p.ids():
                f.write(json.dumps(p.predict(key, k=k)) + "\n")
                crash_point("export.segment")
    else:
        from .submission import write_epic_submission

        write_epic_submission(store, name, out, **epic)
    return out
