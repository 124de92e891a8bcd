"""``kdstore upgrade``: rewrite a schema-1 store as schema 2 in place."""

from __future__ import annotations

from pathlib import Path

from .errors import StoreFormatError
from .faults import crash_point
from .provenance import provenance_entry
from .store import SCHEMA_VERSION, Store, class_group, segment_group, segments_fingerprint, uids_fingerprint


def upgrade_store(path: str | Path) -> dict:
    """Rewrite the ``classes`` and ``segments`` groups of a schema-1 store in the schema-2
    layout, re-stamp the prediction groups that matched the old (uid-only) fingerprint
    with the new one, and set the manifest's version last.

    Each step is idempotent and the store validates between steps (a schema-1 store
    accepts schema-2 groups), so an upgrade killed part-way is finished by running it
    again. Returns ``{"restamped": [...], "foreign": [...]}``: groups re-stamped, and
    groups that already belonged to other segments (left as they were). A schema-2 store
    is left untouched (both lists empty).
    """
    b = Store.open(path).backend
    with b.writing():  # one writer: nothing changes the store between reading and re-stamping
        store = Store.open(path)  # as the lock found it (another upgrade may have finished)
        if store.schema_version == SCHEMA_VERSION:
            return {"restamped": [], "foreign": []}
        if store.schema_version != 1:
            raise StoreFormatError(f"{store.path}: cannot upgrade schema version {store.schema_version}")
        classes, seg = store.classes, store.segments  # read in either layout
        old, new = store.manifest["segments_sha256"], segments_fingerprint(seg)
        if uids_fingerprint(seg.uid) != old and old != new:
            raise StoreFormatError(f"{store.path}: manifest segments_sha256 does not match its segments; validate the store first")
        if not b.has("segments/split_mask"):
            b.write_group("classes", *class_group(classes), overwrite=True)
            crash_point("upgrade.classes")
            b.write_group("segments", *segment_group(seg), overwrite=True)
            crash_point("upgrade.segments")
        restamped, foreign = [], []
        for name in b.children("teacher"):
            attrs = b.attrs(f"teacher/{name}")
            if attrs.get("segments_sha256") in (old, new):
                if attrs["segments_sha256"] != new:
                    b.set_attrs(f"teacher/{name}", {**attrs, "segments_sha256": new})
                    crash_point("upgrade.restamped")
                restamped.append(name)
            else:
                foreign.append(name)
        m = store.manifest
        m.update(schema_version=SCHEMA_VERSION, segments_sha256=new)
        m["provenance"] = [*m.get("provenance", []), provenance_entry("upgrade", from_version=1, to_version=SCHEMA_VERSION)]
        b.set_attrs("", m)
        return {"restamped": restamped, "foreign": foreign}
