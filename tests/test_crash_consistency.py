"""Every writer killed at its crash points (real ``kdstore`` CLI processes on tiny data).

For each writer an uninterrupted run on a copy of the starting state lists the crash
points it passes (``KDSTORE_CRASH_TRACE``) and gives the reference result. Then, for
each kill point, a fresh copy is stopped there (``KDSTORE_CRASH=point:N``: the process
exits at once, as under SIGKILL) and checked: the store validates, every group it held
before reads bit-identically (the group being written reads as before or as the
reference), and rerunning the same command completes to the reference result with no
leftovers. The cheap writers (no torch) are killed at every point; the torch writers at
``KDSTORE_CRASH_POINTS`` points spread over their run (default 3; ``all`` for every one).
The number of kill points tried is printed in the session summary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import SMALL, build_store, synthetic_annotations
from kdstore.tables import SegmentTable
from kdstore.faults import CRASH_ENV
from kdstore.store import Store
from kdstore.validate import leftovers, validate_store
from processes import CRASHED, cli, crash_points
from test_store import array_keys

SPREAD = os.environ.get(CRASH_ENV + "_POINTS", "3")  # KDSTORE_CRASH_POINTS
VOLATILE = {"created", "time", "command", "seconds", "samples_per_s", "work_dir"}


def stable(obj):
    """``obj`` without timings, timestamps and paths that differ between equal runs."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def store_state(path: Path, prefix: str = "") -> dict:
    """Arrays and attributes of the groups under ``prefix`` (all: ""), manifest without provenance."""
    s = Store.open(path)
    out = {k: np.array(s.backend.memmap(k)) for k in array_keys(s) if k.startswith(prefix)}
    groups = ["classes", "segments", *(f"video/{n}" for n in s.feature_sets()), *(f"teacher/{n}" for n in s.groups())]
    out |= {g + "@attrs": stable(s.backend.attrs(g)) for g in groups if g.startswith(prefix)}
    if not prefix:
        out["manifest"] = stable({k: v for k, v in s.manifest.items() if k != "provenance"})
    return out


def run_state(run: Path) -> dict:
    """A student run: checkpoint tensors and the log without timings."""
    from safetensors.numpy import load_file

    from trainers.student.train import read_log

    return {**load_file(run / "last.safetensors"), "log": stable(read_log(run))}


def assert_equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), (where, sorted(a.keys() ^ b.keys()))
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (where, k)
        else:
            assert a[k] == b[k], (where, k)


def copy(src: Path | None, dst: Path) -> Path:
    if src is not None:
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


def pick(points: list[str], cheap: bool) -> list[str]:
    if cheap or SPREAD == "all" or len(points) <= int(SPREAD):
        return points
    return [points[i] for i in sorted(set(np.linspace(0, len(points) - 1, int(SPREAD)).round().astype(int)))]


def part(state: dict, target: str, inside: bool) -> dict:
    return {k: v for k, v in state.items() if k.startswith(target) == inside}


def equal(a: dict, b: dict) -> bool:
    try:
        assert_equal(a, b, "")
    except AssertionError:
        return False
    return True


def kill_everywhere(tmp: Path, base: Path | None, args: Callable[[Path], list], result: Callable[[Path], dict],
                    target: str | None, cheap: bool, record_property, suffix: str = "",
                    view: Callable[[Path], dict] = store_state) -> None:
    """Run ``kdstore ARGS`` uninterrupted, then killed at each picked point and rerun (see the
    module doc). ``args(work)``/``result(work)``: the command and its result for a working copy
    ``work`` of ``base`` (None: the command makes it); ``target``: the group the command writes
    (None: the whole store); ``view(store)``: what must read as before or as after a kill."""
    suffix = base.suffix if base else suffix
    ref, trace = copy(base, tmp / f"ref{suffix}"), tmp / "trace"
    r = cli(*args(ref), trace=trace)
    assert r.returncode == 0, r.stderr[-3000:]
    want, points = result(ref), crash_points(trace)
    picked = pick(points, cheap)
    before = view(base) if base else None
    after = view(ref) if base else None
    for i, point in enumerate(picked):
        work = copy(base, tmp / f"k{i}{suffix}")
        r = cli(*args(work), crash=point)
        assert r.returncode == CRASHED, (point, r.returncode, r.stderr[-3000:])
        if base is None:
            assert not work.exists() or target == "run", point  # a new store appears whole or not at all
        else:
            assert validate_store(work) == [], point
            now = view(work)
            if target is None:  # the whole store was being replaced
                assert equal(now, before) or equal(now, after), point
            else:  # every other group as before, the target as before or as after
                assert_equal(part(now, target, False), part(before, target, False), point)
                mine = part(now, target, True)
                assert equal(mine, part(before, target, True)) or equal(mine, part(after, target, True)), point
        r = cli(*args(work))
        assert r.returncode == 0, (point, r.stderr[-3000:])
        assert_equal(result(work), want, point)
        if target != "run":
            assert validate_store(work) == [] and leftovers(work) == [], point
            assert not [p.name for p in work.parent.iterdir() if p.name.startswith(f".{work.name}.")], point
    print(f"{len(picked)} of {len(points)} kill points")
    record_property("kill_points", len(picked))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Annotations, a store with features and a teacher, per-video arrays, a student run."""
    from trainers.student.config import preset
    from trainers.student.train import train_student

    root = tmp_path_factory.mktemp("crash")
    ann, classes, segments = synthetic_annotations(root / "ann", SMALL)
    stores = {sfx: build_store(root / f"base{sfx}", classes, segments, teacher_split=None).path for sfx in (".zarr", ".h5")}
    npy = root / "npy"
    npy.mkdir()
    for i, v in enumerate(segments.videos[:4]):
        np.save(npy / f"{v}.npy", np.random.default_rng(i).normal(size=(20 + i, 16)).astype(np.float32))
    cfg = preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, batch_size=16, topk=5, epochs=1)
    train_student(Store.open(stores[".zarr"]), "feat", root / "run", cfg, teacher="teacher", progress=False, device="cpu")
    return root, ann, stores, npy


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_ingest(data, tmp_path, suffix, record_property):
    root, ann, stores, _ = data
    kill_everywhere(tmp_path, None, lambda p: ["ingest", ann, p, "--fps", 24], store_state, None, True, record_property,
                    suffix)


def test_ingest_overwrite(data, tmp_path, record_property):
    root, ann, stores, _ = data
    kill_everywhere(tmp_path, stores[".zarr"], lambda p: ["ingest", ann, p, "--fps", 24, "--split", "training1", "--overwrite"],
                    store_state, None, True, record_property)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_import_features(data, tmp_path, suffix, record_property):
    root, ann, stores, npy = data
    kill_everywhere(tmp_path, stores[suffix], lambda p: ["import-features", p, npy, "--name", "feat", "--native-fps", 2,
                                                         "--no-progress", "--overwrite"],
                    lambda p: store_state(p, "video/feat"), "video/feat", True, record_property)


def test_build_video_features(tmp_path, record_property):
    from test_video_features import VIDEOS, encode_video, tiny_store

    videos = tmp_path / "videos"
    videos.mkdir()
    for name, codec, fps, n in VIDEOS[:2]:
        encode_video(videos / name, codec, fps, n)
    base = tiny_store(tmp_path / "base.zarr", videos=("a", "b"), starts=(30, 40)).path
    args = ["--videos", videos, "--backbone", "vit-tiny", "--random-init", "--name", "v", "--fps", 2, "--dtype", "float32",
            "--workers", 0, "--no-progress", "--device", "cpu"]
    kill_everywhere(tmp_path, base, lambda p: ["build-video-features", p, *args], lambda p: store_state(p, "video/v"),
                    "video/v", False, record_property)


def test_build_teacher(data, tmp_path, record_property):
    root, ann, stores, _ = data
    args = ["--name", "bt", "--preset", "tiny", "--folds", 1, "--epochs", 2, "--pretrain-epochs", 1, "--single-task",
            "--set", "threads=1", "--topk", 5, "--overwrite"]
    kill_everywhere(tmp_path, stores[".h5"], lambda p: ["build-teacher", p, *args], lambda p: store_state(p, "teacher/bt"),
                    "teacher/bt", False, record_property)


def test_train_student(data, tmp_path, record_property):
    root, ann, stores, _ = data
    args = ["-f", "feat", "-t", "teacher", "--preset", "egtea", "--set", "num_frames=4", "--set", "n_layer=1", "--set",
            "n_head=2", "--set", "inter_dim=32", "--set", "batch_size=16", "--set", "topk=5", "--set", "epochs=3",
            "--device", "cpu"]
    kill_everywhere(tmp_path, None, lambda run: ["train-student", stores[".zarr"], "--run", run, *args], run_state, "run",
                    False, record_property)


def test_predict(data, tmp_path, record_property):
    root, ann, stores, _ = data
    kill_everywhere(tmp_path, stores[".zarr"], lambda p: ["predict", p, "--run", root / "run", "--name", "st", "--overwrite"],
                    lambda p: store_state(p, "teacher/st"), "teacher/st", False, record_property)


def read_view(path: Path) -> dict:
    """What readers see, whatever the layout: the segment and class tables as read, each
    prediction group's arrays, and whether it is taken as made for these segments."""
    s = Store.open(path)
    seg, cls = s.segments, s.classes
    out = {f"segments/{c}": getattr(seg, c) for c in SegmentTable.COLUMNS}
    out["segments@attrs"] = [seg.videos, seg.splits, seg.fps, seg.key_type, seg.subsets, seg.subset_splits]
    out |= {f"classes/{k}": getattr(cls, k) for k in ("action_verb", "action_noun")}
    out["classes@attrs"] = [cls.action_names, cls.verb_names, cls.noun_names, cls.surface_verbs, cls.surface_nouns]
    for name in s.groups():
        g = f"teacher/{name}"
        out |= {f"{g}/{k}": np.array(s.backend.memmap(f"{g}/{k}")) for k in s.backend.children(g)}
        out[f"{g}@ours"] = s.made_for_segments(s.backend.attrs(g)["segments_sha256"])
    return out


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_upgrade(data, tmp_path, suffix, record_property):
    """A schema-1 store with two prediction groups to re-stamp: killed anywhere, the store
    validates and reads as before; the rerun finishes the upgrade."""
    from test_segments_format import make_v1_store

    src = Store.open(data[2][suffix])
    base = make_v1_store(tmp_path / f"v1{suffix}", src.classes, src.segments)
    for i, name in enumerate(("a", "b")):
        base.write_predictions(name, src.segments.uid, np.random.default_rng(i).normal(size=(len(src.segments), src.classes.num_actions)))
    kill_everywhere(tmp_path, base.path, lambda p: ["upgrade", p], store_state, None, True, record_property, view=read_view)
    assert Store.open(tmp_path / f"ref{suffix}").schema_version == 2


@pytest.mark.parametrize("fmt", ["epic", "jsonl"])
def test_export(data, tmp_path, fmt, record_property):
    """A killed export leaves the file it replaces as it was; the rerun writes the whole file."""
    store = data[2][".zarr"]
    args = lambda out: ["export", store, "teacher", out, "--format", fmt, *(["--split", "validation1"] if fmt == "epic" else [])]  # noqa: E731
    ref, trace = tmp_path / "ref.out", tmp_path / "trace"
    r = cli(*args(ref), trace=trace)
    assert r.returncode == 0, r.stderr[-3000:]
    points = crash_points(trace)  # one a segment written
    picked = [points[0], points[len(points) // 2], points[-1]]
    for i, point in enumerate(picked):
        work = tmp_path / f"k{i}.out"
        work.write_text("earlier export\n")
        r = cli(*args(work), crash=point)
        assert r.returncode == CRASHED and work.read_text() == "earlier export\n", point
        assert cli(*args(work)).returncode == 0 and work.read_bytes() == ref.read_bytes(), point
    print(f"{len(picked)} kill points")
    record_property("kill_points", len(picked))


# ---------------------------------------------------------------------------------------
# a full disk at several points of each cheap writer, and links out of the store


def full_everywhere(tmp: Path, base: Path | None, args: Callable[[Path], list], result: Callable[[Path], dict],
                    target: str | None, suffix: str = "", levels: int = 4) -> None:
    """Run ``kdstore ARGS`` on a small file system, then on one filled so that only a part
    of the space the command needs is free (``levels`` parts between none and all): it
    succeeds or ends in one line saying the disk is full; the store validates and reads as
    before or as the reference; freed, the rerun completes to the reference, no leftovers."""
    from fullfs import entries, fill, free_bytes, small_fs, unfill

    suffix = base.suffix if base else suffix
    with small_fs(tmp / "fs", mib=64) as fs:
        ref = copy(base, fs / f"ref{suffix}")
        free = free_bytes(fs)
        r = cli(*args(ref))
        assert r.returncode == 0, r.stderr[-3000:]
        need, want = free - free_bytes(fs), result(ref)
        before, after = (store_state(base), store_state(ref)) if base else (None, None)
        shutil.rmtree(ref) if ref.is_dir() else ref.unlink()
        for leave in np.linspace(0, need, levels + 2)[1:-1].astype(int):
            work = copy(base, fs / f"w{suffix}")
            fill(fs, leave)
            r = cli(*args(work))
            unfill(fs)
            if r.returncode != 0:
                lines = [line for line in r.stderr.splitlines() if line.strip()]
                assert r.returncode == 2 and len(lines) == 1 and "no space left on the device" in lines[0], (leave, r.stderr[-3000:])
            if base is None:
                assert r.returncode == 0 or not work.exists(), leave
            else:
                assert validate_store(work) == [], leave
                now = store_state(work)
                assert_equal(part(now, target, False), part(before, target, False), str(leave))
                mine = part(now, target, True)
                assert equal(mine, part(before, target, True)) or equal(mine, part(after, target, True)), leave
            r = cli(*args(work))
            assert r.returncode == 0, (leave, r.stderr[-3000:])
            assert_equal(result(work), want, str(leave))
            assert validate_store(work) == [] and leftovers(work) == [], leave
            shutil.rmtree(work) if work.is_dir() else work.unlink()
            assert not [e for e in entries(fs) if e.endswith(".tmp") or "-" in e.split("/")[0]], entries(fs)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_ingest_on_a_full_disk(data, tmp_path, suffix):
    root, ann, stores, _ = data
    full_everywhere(tmp_path, None, lambda p: ["ingest", ann, p, "--fps", 24], store_state, None, suffix)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_import_features_on_a_full_disk(data, tmp_path, suffix):
    root, ann, stores, npy = data
    full_everywhere(tmp_path, stores[suffix], lambda p: ["import-features", p, npy, "--name", "feat", "--native-fps", 2,
                                                         "--no-progress", "--overwrite"],
                    lambda p: store_state(p, "video/feat"), "video/feat")


def test_predict_on_a_full_disk(data, tmp_path):
    root, ann, stores, _ = data
    full_everywhere(tmp_path, stores[".zarr"], lambda p: ["predict", p, "--run", root / "run", "--name", "st", "--overwrite"],
                    lambda p: store_state(p, "teacher/st"), "teacher/st", levels=2)


LINKED = {  # a writer of the store at p, refused before it writes when the store holds a link
    "ingest-overwrite": lambda d, p: ["ingest", d[1], p, "--fps", 24, "--overwrite"],
    "import-features": lambda d, p: ["import-features", p, d[3], "--name", "feat2", "--native-fps", 2, "--no-progress"],
    "evaluate-write": lambda d, p: ["evaluate", p, "--baseline", "ngram", "--order", 2, "--write", "ng", "--overwrite"],
    "predict": lambda d, p: ["predict", p, "--run", d[0] / "run", "--name", "st", "--overwrite"],
    "build-teacher": lambda d, p: ["build-teacher", p, "--name", "bt", "--preset", "tiny", "--folds", 1, "--epochs", 50],
    "upgrade": lambda d, p: ["upgrade", p],
    "gc": lambda d, p: ["gc", p],
}


@pytest.mark.parametrize("where", ["staging", "group"])
@pytest.mark.parametrize("writer", list(LINKED))
def test_writers_refuse_links_out_of_the_store(data, tmp_path, writer, where):
    """A store whose staging folder, or one of whose groups, is a link out of it: every
    writer refuses in one line naming the link, before it writes; nothing outside changes."""
    work = copy(data[2][".zarr"], tmp_path / "s.zarr")
    outside = tmp_path / "outside"
    if where == "staging":
        for d in ("tmp-precious", "trash-precious", "video-feat2"):
            (outside / d).mkdir(parents=True)
            (outside / d / "keep").write_text("mine")
        link = work / ".staging"
        shutil.rmtree(link, ignore_errors=True)
    else:
        shutil.copytree(work / "teacher" / "teacher", outside)
        link = work / "teacher" / "ng"
    link.symlink_to(outside)
    before, files = store_state(work), {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    r = cli(*LINKED[writer](data, work))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and lines == [lines[0]] and lines[0].startswith(f"error: {link}: a symbolic link (to {outside})"), r.stderr[-3000:]
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == files
    assert link.is_symlink() and not Path(f"{work}.teacher-work").exists()
    assert_equal(store_state(work), before, writer)
