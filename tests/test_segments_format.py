"""The segment table's format (schema 2): the fingerprint that ties prediction groups to
their segments, schema-1 stores read transparently and upgraded, the frame-rate warning."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from kdstore.rulstm import load_annotations
from kdstore.tables import SegmentTable
from kdstore.hdf5_backend import HDF5Backend
from kdstore.zarr_backend import ZarrBackend
from kdstore.errors import StoreFormatError
from kdstore.ingest import ingest
from kdstore.provenance import provenance_entry
from kdstore.store import Store, segments_fingerprint, uids_fingerprint
from kdstore.synthetic import SyntheticConfig, generate_annotations
from kdstore.upgrade import upgrade_store
from kdstore.validate import store_warnings, validate_store

runner = CliRunner()


def copy_group(src: Store, dst: Store, name: str) -> None:
    """Copy teacher/<name> as a user would: the Zarr directory, or every HDF5 array and its attributes."""
    if isinstance(src.backend, ZarrBackend):
        (dst.path / "teacher").mkdir(exist_ok=True)
        if not (dst.path / "teacher" / "zarr.json").exists():
            shutil.copy(src.path / "teacher" / "zarr.json", dst.path / "teacher" / "zarr.json")
        shutil.copytree(src.path / "teacher" / name, dst.path / "teacher" / name)
    else:
        key = f"teacher/{name}"
        arrays = {k: np.asarray(src.backend.memmap(f"{key}/{k}")) for k in src.backend.children(key)}
        dst.backend.write_group(key, arrays, src.backend.attrs(key))


def edit_csv(path: Path, row: int, col: int, value: str) -> None:
    lines = path.read_text().splitlines()
    cells = lines[row].split(",")
    cells[col] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("change", ["labels", "splits", "nothing"])
def test_a_group_made_for_other_segments_is_refused(tmp_path, suffix, change):
    """Same UIDs, other labels or other split membership: the copied group is refused at
    open and reported by validate; copied into an identical store it is accepted."""
    from kdstore.evaluation import evaluate_group

    ann = generate_annotations(tmp_path / "a", SyntheticConfig(n_videos=6))
    src = ingest(ann, tmp_path / f"src{suffix}", fps=24.0)
    seg = src.segments
    src.write_predictions("t", seg.uid, np.random.default_rng(0).normal(size=(len(seg), src.classes.num_actions)))
    other = Path(shutil.copytree(ann, tmp_path / "b"))
    if change == "labels":  # another action, with its own verb and noun
        line = (other / "training1.csv").read_text().splitlines()[0].split(",")
        a = (int(line[6]) + 1) % src.classes.num_actions
        for col, value in ((4, src.classes.action_verb[a]), (5, src.classes.action_noun[a]), (6, a)):
            edit_csv(other / "training1.csv", 0, col, str(value))
    elif change == "splits":  # one segment moves from training1 to validation1
        lines = (other / "training1.csv").read_text().splitlines()
        (other / "training1.csv").write_text("\n".join(lines[1:]) + "\n")
        (other / "validation1.csv").write_text((other / "validation1.csv").read_text() + lines[0] + "\n")
    dst = ingest(other, tmp_path / f"dst{suffix}", fps=24.0)
    assert dst.segments.uid.tolist() == seg.uid.tolist()
    copy_group(src, dst, "t")
    dst = Store.open(dst.path)
    if change == "nothing":
        assert dst.manifest["segments_sha256"] == src.manifest["segments_sha256"]
        np.testing.assert_array_equal(dst.group("t").logits, src.group("t").logits)
        assert validate_store(dst.path) == []
        return
    assert dst.manifest["segments_sha256"] != src.manifest["segments_sha256"]
    with pytest.raises(StoreFormatError, match="predictions 't' were made for other segments"):
        dst.group("t")
    with pytest.raises(StoreFormatError, match="made for other segments"):
        evaluate_group(dst, "t", "validation1")
    assert any("teacher/t: made for other segments" in p for p in validate_store(dst.path))


def test_fingerprint_covers_meaning_not_order(synthetic_tables):
    _, seg = synthetic_tables
    base = segments_fingerprint(seg)

    def variant(**cols) -> SegmentTable:
        kw = {c: getattr(seg, c).copy() for c in SegmentTable.COLUMNS}
        extra = {k: cols.pop(k) for k in ("videos", "splits", "fps") if k in cols}
        kw.update(cols)
        return SegmentTable(**kw, **{"videos": seg.videos, "splits": seg.splits, "fps": seg.fps, **extra})

    perm = np.random.default_rng(0).permutation(len(seg))
    shuffled = variant(**{c: getattr(seg, c)[perm] for c in SegmentTable.COLUMNS})
    assert segments_fingerprint(shuffled) == base  # row order is not meaning
    swapped = variant(split_mask=seg.split_mask[:, ::-1], splits=seg.splits[::-1])
    assert segments_fingerprint(swapped) == base  # nor the order of the split names
    assert segments_fingerprint(variant(fps=30.0)) == base  # the frame rate is the store's, not the groups'
    changed = [
        variant(uid=np.where(np.arange(len(seg)) == 0, 10**9, seg.uid)),
        variant(action=np.where(np.arange(len(seg)) == 3, (seg.action + 1) % 5, seg.action)),
        variant(split_mask=seg.split_mask ^ (np.arange(len(seg)) == 2)[:, None]),
        variant(splits=["training1", "validation9"]),
        variant(start_frame=seg.start_frame + (np.arange(len(seg)) == 7)),
        variant(videos=[v + "x" for v in seg.videos]),
        SegmentTable(**{c: getattr(seg, c) for c in SegmentTable.COLUMNS}, videos=seg.videos, splits=seg.splits,
                     fps=seg.fps, ids=np.array([f"X{u}" for u in seg.uid], object)),
    ]
    prints = [segments_fingerprint(t) for t in changed]
    assert base not in prints and len(set(prints)) == len(prints)


# ---------------------------------------------------------------------------------------
# schema 1


def make_v1_store(path: Path, classes, seg: SegmentTable) -> Store:
    """A store as schema 1 wrote it: a split index a segment, uid-only fingerprint, no surface names."""
    backend = ZarrBackend if path.suffix == ".zarr" else HDF5Backend
    manifest = {"format": "kdstore", "schema_version": 1, "created": "2025-01-01T00:00:00+0000", "package_version": "0.1.0",
                "dataset": None, "segments_sha256": uids_fingerprint(seg.uid), "provenance": [provenance_entry("create")]}
    b = backend.create(path, manifest)
    b.write_group("classes", {"action_verb": classes.action_verb, "action_noun": classes.action_noun},
                  {"action_names": classes.action_names, "verb_names": classes.verb_names, "noun_names": classes.noun_names})
    cols = {c: getattr(seg, c) for c in SegmentTable.COLUMNS if c != "split_mask"}
    cols["split"] = seg.split_mask.argmax(axis=1).astype(np.int8)
    b.write_group("segments", cols, {"videos": seg.videos, "splits": seg.splits, "fps": seg.fps})
    return Store.open(path)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_schema1_store_is_read_and_upgraded(tmp_path, synthetic_tables, suffix):
    classes, seg = synthetic_tables
    s = make_v1_store(tmp_path / f"v1{suffix}", classes, seg)
    assert s.schema_version == 1
    np.testing.assert_array_equal(s.segments.split_mask, seg.split_mask)  # read as schema 2
    assert s.classes.surface_verbs == [classes.verb_names[v] for v in classes.action_verb]
    logits = np.random.default_rng(0).normal(size=(len(seg), classes.num_actions))
    s.write_predictions("t", seg.uid, logits)  # stamped with the schema-1 fingerprint
    foreign = {k: np.asarray(s.backend.memmap(f"teacher/t/{k}")) for k in s.backend.children("teacher/t")}
    s.backend.write_group("teacher/f", foreign, {**s.backend.attrs("teacher/t"), "segments_sha256": "0" * 64})
    assert validate_store(s.path) == [f"{s.path}: teacher/f: made for other segments (other uids, ids, labels or splits: segments_sha256 differs)"]
    assert any("schema version 1" in w for w in store_warnings(s.path))
    before = np.asarray(s.group("t").logits).copy()
    r = runner.invoke(app, ["upgrade", str(s.path)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # rich wraps long lines
    assert "re-stamped: t" in said and "left as they were): f" in said
    s = Store.open(s.path)
    assert s.schema_version == 2 and s.manifest["segments_sha256"] == segments_fingerprint(seg)
    np.testing.assert_array_equal(s.group("t").logits, before)
    assert validate_store(s.path) == [f"{s.path}: teacher/f: made for other segments (other uids, ids, labels or splits: segments_sha256 differs)"]
    assert store_warnings(s.path) == [] and s.manifest["provenance"][-1]["action"] == "upgrade"
    assert upgrade_store(s.path) == {"restamped": [], "foreign": []}  # already schema 2


def test_upgrade_killed_part_way_finishes_on_rerun(tmp_path, synthetic_tables):
    from kdstore.store import class_group, segment_group

    classes, seg = synthetic_tables
    s = make_v1_store(tmp_path / "v1.zarr", classes, seg)
    s.write_predictions("t", seg.uid, np.zeros((len(seg), classes.num_actions)))
    # the first steps of an upgrade, then a crash before the groups and the manifest are stamped
    s.backend.write_group("classes", *class_group(s.classes), overwrite=True)
    s.backend.write_group("segments", *segment_group(s.segments), overwrite=True)
    assert Store.open(s.path).schema_version == 1 and len(Store.open(s.path).segments) == len(seg)
    assert upgrade_store(s.path) == {"restamped": ["t"], "foreign": []}
    assert validate_store(s.path) == []


def test_upgrade_holds_the_writer_lock(tmp_path, synthetic_tables):
    """While another writer holds the store, an upgrade refuses (timeout 0) naming the
    holder, and leaves the store at schema 1."""
    import os

    from kdstore.lock import locked, store_lock_path
    from processes import cli

    s = make_v1_store(tmp_path / "v1.zarr", *synthetic_tables)
    with locked(store_lock_path(s.path), "test"):
        r = cli("upgrade", s.path, env={"KDSTORE_LOCK_TIMEOUT": "0"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and f"in use by pid {os.getpid()} (" in r.stderr
    assert Store.open(s.path).schema_version == 1
    assert cli("upgrade", s.path).returncode == 0 and Store.open(s.path).schema_version == 2


def test_frame_rate_warning(tmp_path, egtea_dir):
    classes, seg = load_annotations(egtea_dir, ["training1", "validation1"], fps=24.0)
    s = Store.create(tmp_path / "egtea24.zarr", classes, seg, dataset="egtea")
    [w] = store_warnings(s.path)
    assert "egtea frames count at 30 fps in its files, but the store was ingested at 24 fps" in w and "1.25x" in w
    r = runner.invoke(app, ["validate", str(s.path)])
    assert r.exit_code == 0 and "warning:" in r.output and "valid" in r.output
    assert store_warnings(ingest(egtea_dir, tmp_path / "egtea.zarr", ["training1"]).path) == []
