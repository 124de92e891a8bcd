"""Writers at the edges: symbolic links, files that are not regular, full and read-only
file systems, re-imports from another source, and messages that keep their text."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import SUFFIXES, build_store
from fullfs import entries, fill, small_fs, unfill
from kdstore.errors import ConfigError, MissingError, StoreFormatError
from kdstore.store import Store
from kdstore.validate import leftovers, validate_store
from processes import cli
from test_errors import one_line, raised
from test_store import assert_same, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def tree(path) -> dict:
    """Every file under ``path`` with its bytes (what must not change)."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


# ---------------------------------------------------------------------------------------
# symbolic links


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_gc_never_removes_through_a_staging_link(tmp_path, synthetic_tables, suffix):
    s = build_store(tmp_path / f"st{suffix}", *synthetic_tables, features=(), teachers=())
    decoy = tmp_path / "decoy"
    for d in ("tmp-precious", "trash-precious", "video-f"):
        (decoy / d).mkdir(parents=True)
        (decoy / d / "keep.txt").write_text("mine")
    before = tree(decoy)
    staging = s.backend.staging_dir()
    shutil.rmtree(staging, ignore_errors=True)
    staging.symlink_to(decoy)
    msg = str(raised(["gc", s.path]))
    assert msg.startswith(f"{staging}: a symbolic link (to {decoy})")
    assert tree(decoy) == before
    assert any(p.startswith(f"{staging}: a symbolic link") for p in validate_store(s.path))
    assert leftovers(s.path) == []  # nothing is listed through the link either
    staging.unlink()
    assert Store.open(s.path).gc() == []


def test_a_group_linking_out_of_the_store_is_refused_by_every_writer(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "sl.zarr", *synthetic_tables, features=(), teachers=("teacher",), teacher_split=None)
    outside = tmp_path / "outside" / "ng"
    shutil.copytree(s.path / "teacher" / "teacher", outside)
    before = tree(outside.parent)
    link = s.path / "teacher" / "ng"
    link.symlink_to(outside)
    for args in (["evaluate", s.path, "--baseline", "ngram", "--order", 2, "--write", "ng", "--overwrite"], ["gc", s.path],
                 ["ensemble", s.path, "-p", "teacher", "-p", "ng", "--name", "e"]):
        assert str(raised(args)).startswith(f"{link}: a symbolic link (to {outside})"), args
    assert tree(outside.parent) == before
    assert [p for p in validate_store(s.path) if "symbolic link" in p] == [str(raised(["gc", s.path]))]
    link.unlink()
    assert validate_store(s.path) == []


def test_ingest_overwrite_never_replaces_a_link(tmp_path, synthetic_dir, synthetic_tables):
    real = build_store(tmp_path / "real.zarr", *synthetic_tables, features=(), teachers=())
    before = snapshot(real.path)
    link = tmp_path / "link.zarr"
    link.symlink_to(real.path)
    assert str(raised(["ingest", synthetic_dir, link, "--fps", 24, "--overwrite"])).startswith(f"{link}: a symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(real.path)
    assert_same(before, snapshot(real.path))


def test_exports_replace_only_regular_files(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, features=(), teachers=("teacher",), teacher_split=None)
    fifo, folder, target, link = tmp_path / "fifo", tmp_path / "folder", tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    os.mkfifo(fifo)
    folder.mkdir()
    target.write_text("precious\n")
    link.symlink_to(target)
    cases = {fifo: "is a named pipe, not a regular file", folder: "is a folder, not a regular file",
             link: f"a symbolic link (to {target})"}
    dev = tmp_path / "full"  # a device node, as /dev/full is (root may make one)
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        cases[dev] = "is a character device, not a regular file"
    except OSError:
        pass
    for out, why in cases.items():
        mode = os.lstat(out).st_mode
        assert str(raised(["export", s.path, "teacher", out, "--format", "jsonl"])).startswith(f"{out}: {why}")
        assert os.lstat(out).st_mode == mode, out
    assert target.read_text() == "precious\n" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_only_places_are_one_line(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, features=(), teachers=("teacher",), teacher_split=None)
    with small_fs(tmp_path / "ro", mib=1, read_only=True) as ro:
        for args in (["export", s.path, "teacher", ro / "t.jsonl", "--format", "jsonl"], ["export", s.path, "teacher", ro / "t.npz"],
                     ["report", s.path, "--out", ro / "report"]):
            assert "read-only file system" in one_line(cli(*args)), args
    assert "cannot be written (No such file or directory)" in str(raised(["export", s.path, "teacher", "/proc/t.jsonl"]))


# ---------------------------------------------------------------------------------------
# full file systems


@pytest.fixture(scope="module")
def full_data(tmp_path_factory):
    """Annotations, stores of both backends with a teacher, and per-video arrays to import."""
    from conftest import SMALL, synthetic_annotations

    root = tmp_path_factory.mktemp("full")
    ann, classes, segments = synthetic_annotations(root / "ann", SMALL)
    stores = {sfx: build_store(root / f"base{sfx}", classes, segments, features=(), teacher_split=None).path for sfx in SUFFIXES}
    npy = root / "npy"
    npy.mkdir()
    for i, v in enumerate(segments.videos):
        np.save(npy / f"{v}.npy", np.random.default_rng(i).normal(size=(400, 64)).astype(np.float32))
    return ann, stores, npy


WRITERS = {  # name: (backend, command for a store at p, the group it writes or None)
    "ingest": (".zarr", lambda d, p: ["ingest", d["ann"], p.with_name("new.zarr"), "--fps", 24], None),
    "ingest-h5": (".h5", lambda d, p: ["ingest", d["ann"], p.with_name("new.h5"), "--fps", 24], None),
    "import-features": (".zarr", lambda d, p: ["import-features", p, d["npy"], "--name", "f", "--native-fps", 2, "--no-progress"], "video/f"),
    "import-features-h5": (".h5", lambda d, p: ["import-features", p, d["npy"], "--name", "f", "--native-fps", 2, "--no-progress"], "video/f"),
    "evaluate-write": (".zarr", lambda d, p: ["evaluate", p, "--baseline", "ngram", "--order", 2, "--write", "ng"], "teacher/ng"),
    "evaluate-write-h5": (".h5", lambda d, p: ["evaluate", p, "--baseline", "ngram", "--order", 2, "--write", "ng"], "teacher/ng"),
    "ensemble": (".zarr", lambda d, p: ["ensemble", p, "-p", "teacher", "-p", "teacher", "--name", "e"], None),
    "export": (".zarr", lambda d, p: ["export", p, "teacher", p.with_name("t.jsonl"), "--format", "jsonl"], None),
    "report": (".zarr", lambda d, p: ["report", p, "--out", p.with_name("report")], None),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_on_a_full_disk_says_so_in_one_line(full_data, tmp_path, writer):
    """On a full file system each writer ends in one line naming the path and what to do;
    the store stays valid and as it was, and the same command succeeds once there is space."""
    ann, stores, npy = full_data
    suffix, args, _ = WRITERS[writer]
    with small_fs(tmp_path / "fs", mib=48) as fs:
        path = fs / f"s{suffix}"
        shutil.copytree(stores[suffix], path) if suffix == ".zarr" else shutil.copy2(stores[suffix], path)
        if writer == "ensemble":
            s = Store.open(path)
            s.write_predictions("t2", s.segments.uid, np.zeros((len(s.segments), s.classes.num_actions), np.float32), topk=10)
            args = lambda d, p: ["ensemble", p, "-p", "teacher", "-p", "t2", "--name", "e"]  # noqa: E731
        before = snapshot(path)
        fill(fs, leave=16 << 10)
        msg = one_line(cli(*args({"ann": ann, "npy": npy}, path)))
        assert "no space left on the device" in msg and "free space there" in msg, msg
        unfill(fs)
        assert validate_store(path) == []
        assert all("partial build of video/f" in lo for lo in leftovers(path)), leftovers(path)  # resumable
        assert_same(before, snapshot(path))
        assert not [e for e in entries(fs) if e.endswith(".tmp") or ".creating-" in e or ".compact-" in e], entries(fs)
        r = cli(*args({"ann": ann, "npy": npy}, path))
        assert r.returncode == 0, r.stderr[-3000:]
        assert validate_store(path) == [] and leftovers(path) == []


def _dead_hdf5(path, synthetic_tables):
    """An HDF5 store with a replaced group (dead space a compaction frees) and no auto-compaction."""
    s = build_store(path, *synthetic_tables, features=(("feat", 256, "float32"),), teachers=())
    seg, A = s.segments, s.classes.num_actions
    for seed in (0, 1):
        s.write_predictions("t", seg.uid, np.random.default_rng(seed).normal(size=(len(seg), A)).astype(np.float32),
                            features=np.zeros((len(seg), 4096), np.float32), topk=5, overwrite=True)
    return Store.open(path)


def test_hdf5_gc_on_a_full_disk_frees_space_first_and_says_what_a_compaction_needs(tmp_path, synthetic_tables):
    with small_fs(tmp_path / "fs", mib=24) as fs:
        s = _dead_hdf5(fs / "s.h5", synthetic_tables)
        assert any("gc compacts the file" in lo for lo in leftovers(s.path))
        stale = fs / f".s.h5.compact-{'0' * 32}"  # a compaction killed part-way
        stale.write_bytes(b"\0" * (s.path.stat().st_size))
        staged = s.backend.staging_dir() / "video-old"  # a partial build given up on
        staged.mkdir(parents=True)
        (staged / "writer.json").write_text("{}")
        (staged / "x.feat.npy").write_bytes(b"\0" * (4 << 20))
        fill(fs, leave=64 << 10)
        done = Store.open(s.path).gc()  # the leftovers go first, so the compaction then fits
        assert [d.split(":")[0] for d in done] == [str(stale), str(staged), str(s.path)] and "compacts" in done[-1], done
        assert validate_store(s.path) == [] and leftovers(s.path) == []
        assert sorted(entries(fs)) == ["s.h5", "s.h5.lock", "s.h5.staging"]

        unfill(fs)
        s = _dead_hdf5(fs / "s2.h5", synthetic_tables)
        fill(fs, leave=64 << 10)
        for _ in range(2):  # each retry says the same and leaves nothing behind
            msg = one_line(cli("gc", s.path))
            assert msg.startswith(f"error: {s.path}: compacting needs about ") and "rerun kdstore gc" in msg, msg
            assert not [e for e in entries(fs) if ".compact-" in e]
        unfill(fs)
        assert "compacts the file" in Store.open(s.path).gc()[-1] and leftovers(s.path) == []


# ---------------------------------------------------------------------------------------
# re-imports


def _arrays(folder, videos, value, dim=8):
    folder.mkdir()
    for v in videos:
        np.save(folder / f"{v}.npy", np.full((6, dim), value, np.float32))
    return folder


def test_a_reimport_from_another_source_is_refused_unless_asked_for(tmp_path, synthetic_tables):
    from kdstore.feature_import import import_arrays

    s = build_store(tmp_path / "mg.zarr", *synthetic_tables, features=(), teachers=())
    videos = s.segments.videos
    a = _arrays(tmp_path / "A", videos[:6], 1.0)
    b = _arrays(tmp_path / "B", [*videos[:5], videos[6]], 2.0)
    c = _arrays(tmp_path / "C", videos[7:9], 3.0)
    run = lambda src, **kw: import_arrays(s, src, "f", native_fps=1.0, progress=False, **kw)  # noqa: E731
    run(a)
    before = snapshot(s.path)
    msg = str(raised(["import-features", s.path, b, "--name", "f", "--native-fps", 1, "--no-progress"]))
    assert msg.startswith(f"video/f: holds features from arrays {a.resolve()}, this import reads arrays {b.resolve()}")
    assert "--overwrite" in msg and "--append" in msg
    with pytest.raises(ConfigError, match=rf"video {videos[0]!r} is already in the set from arrays {a.resolve()}"):
        run(b, mode="append")
    assert_same(before, snapshot(s.path))
    run(a)  # the same source again is no mix
    run(c, mode="append")
    fs = Store.open(s.path).video("f")
    assert fs.videos == sorted([*videos[:6], *videos[7:9]])
    assert [x["path"] for x in fs.attrs["sources"]] == [str(a.resolve()), str(c.resolve())]
    assert fs.attrs["video_sources"] == {**{v: 0 for v in videos[:6]}, **{v: 1 for v in videos[7:9]}}
    assert (fs.frames(videos[7])[0] == 3).all() and (fs.frames(videos[0])[0] == 1).all()
    assert CliRunner().invoke(app, ["import-features", str(s.path), str(b), "--name", "f", "--native-fps", "1", "--no-progress",
                                    "--overwrite"]).exit_code == 0
    fs = Store.open(s.path).video("f")
    assert fs.videos == sorted([*videos[:5], videos[6]]) and (fs.frames(videos[0])[0] == 2).all()
    assert [x["path"] for x in fs.attrs["sources"]] == [str(b.resolve())]
    assert validate_store(s.path) == []


# ---------------------------------------------------------------------------------------
# messages and bad options


def test_messages_keep_their_square_brackets(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, features=(), teachers=("t1", "t2"), teacher_split=None)
    line = one_line(cli("ensemble", s.path, "-p", "t1", "-p", "t2", "--name", "e", "--weights", "nan,1"))
    assert line.endswith("got [nan, 1.0]"), line
    wide = _arrays(tmp_path / "wide", s.segments.videos[:1], 1.0, dim=8)
    np.save(wide / "extra.npy", np.ones((6, 9), np.float32))  # another width
    line = one_line(cli("import-features", s.path, wide, "--name", "w", "--native-fps", 1, "--no-progress"))
    assert "features of shape [6, 9], expected [n, 8]" in line, line


def test_bad_inputs_are_one_line_errors(tmp_path, synthetic_dir, synthetic_tables):
    import torch

    s = build_store(tmp_path / "s.zarr", *synthetic_tables, teachers=("teacher",))
    strings = tmp_path / "strings"
    strings.mkdir()
    np.save(strings / f"{s.segments.videos[0]}.npy", np.array([["a", "b"], ["c", "d"]]))
    assert "holds <U1 values, expected numbers" in str(raised(["import-features", s.path, strings, "--name", "x", "--native-fps", 1]))
    windows = ["import-features", s.path, strings, "--name", "x", "--native-fps", 1, "--windows"]
    assert "--window-fps must be positive, found 0" in str(raised([*windows, "--tau-a", 1, "--window-fps", 0]))
    assert "--tau-a must be positive" in str(raised([*windows, "--tau-a", -1, "--window-fps", 1]))
    assert "a file, expected an annotation folder" in str(raised(["ingest", synthetic_dir / "actions.csv", tmp_path / "n.zarr"]))
    student = ["train-student", s.path, "-f", "feat", "-t", "teacher", "--run", tmp_path / "run"]
    assert "expected cpu, cuda or cuda:N" in str(raised([*student, "--device", "tpu"]))
    if not torch.cuda.is_available():
        assert "CUDA is not available here" in str(raised([*student, "--device", "cuda"]))
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(app, ["query", str(s.path), str(s.segments.uid[0]), "-t", ""])
    assert r.exit_code == 2 and "give a prediction group name" in r.output
    chunk = s.path / "video" / "feat" / "timestamps" / "c" / "0"
    chunk.unlink()
    with pytest.raises(StoreFormatError, match=f"{chunk}: missing chunk file of video/feat/timestamps"):
        Store.open(s.path).video("feat").timestamps


def test_sampler_and_data_refuse_out_of_range_arguments(tmp_path, synthetic_tables):
    from trainers.student.config import preset
    from trainers.student.data import StudentData, WindowBatchSampler

    with pytest.raises(ConfigError, match="batch_size must be >= 1, found 0"):
        WindowBatchSampler(10, batch_size=0)
    with pytest.raises(ConfigError, match="rank 2 is not one of the 2 ranks"):
        WindowBatchSampler(10, batch_size=2, rank=2, world=2)
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, teachers=("teacher",))
    data = StudentData(s, "feat", "training1", preset("egtea", num_frames=4), teacher="teacher")
    with pytest.raises(MissingError, match=f"sample {len(data)}: out of range"):
        data[len(data)]
    assert len(data[len(data) - 1].action) == 1


def test_a_checkpoint_whose_vocab_lacks_unk_is_a_config_error(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from trainers.teacher.tokenizer import load_tokenizer

    ckpt = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32)).save_pretrained(ckpt)
    (ckpt / "vocab.txt").write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "take", "cup", "open", "fridge"]) + "\n")
    with pytest.raises(ConfigError, match=f"{ckpt}: the WordPiece vocabulary has no unknown token '\\[UNK\\]'"):
        load_tokenizer(ckpt)
