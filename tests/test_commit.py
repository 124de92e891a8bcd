"""Group commits under crashes and concurrency, on both backends, with real processes.

A writer is stopped at each of its crash points (``kdstore.faults``: deterministic, no
timing), then the store is checked: it validates or names the missing group, every group
reads as before or as after the write, the next writer finishes or removes what the
crashed one left, and ``validate``/``gc`` report and remove leftovers. Concurrent writers
are real processes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import kdstore.files as files
import kdstore.hdf5_backend as hdf5_backend
from conftest import SUFFIXES, build_store
from kdstore.errors import AccessError, DataError
from kdstore.lock import locked, store_lock_path
from kdstore.store import Store
from kdstore.validate import leftovers, validate_store
from processes import CRASHED, ROOT, cli, crash_points, script
from test_store import snapshot

OVERWRITE = """
import sys, numpy as np
import kdstore.files
kdstore.files.EXCHANGE = sys.argv[2] == "exchange"
from kdstore.store import Store
s = Store.open(sys.argv[1])
seg, A = s.segments, s.classes.num_actions
logits = np.random.default_rng(int(sys.argv[3])).normal(size=(len(seg), A)).astype(np.float32)
s.write_predictions("teacher", seg.uid, logits, topk=10, overwrite=True)
"""


@pytest.fixture(params=SUFFIXES)
def store(request, tmp_path, synthetic_tables) -> Store:
    return build_store(tmp_path / f"s{request.param}", *synthetic_tables)


def arrays(snap: dict, prefix: str) -> dict:
    return {k: v for k, v in snap.items() if k.startswith(prefix + "/") and isinstance(v, np.ndarray)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


def group_key(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if not k.startswith("teacher/teacher") and isinstance(v, np.ndarray)}


@pytest.mark.parametrize("suffix,mode", [(".zarr", "exchange"), (".zarr", "fallback"), (".h5", "link moves")])
def test_overwrite_killed_at_every_step(tmp_path, synthetic_tables, suffix, mode, monkeypatch):
    """A crash at any step of an overwrite never leaves the group missing while the
    store validates; the next writer finishes the commit or drops the staged group. Zarr
    swaps the group in one step, or by two renames where it cannot (fallback)."""
    monkeypatch.setattr(files, "EXCHANGE", mode == "exchange")
    src = Path(build_store(tmp_path / f"s{suffix}", *synthetic_tables).path)
    before = snapshot(src)
    ref, trace = copy_store(src, tmp_path / f"ref{src.suffix}"), tmp_path / "trace"
    assert script(OVERWRITE, ref, mode, 1, trace=trace).returncode == 0
    after = snapshot(ref)
    assert not same(arrays(before, "teacher/teacher"), arrays(after, "teacher/teacher"))
    points = crash_points(trace)
    assert len(points) >= (2 if src.suffix == ".h5" else 4)
    committed = False
    for i, point in enumerate(points):
        path = copy_store(src, tmp_path / f"k{i}{src.suffix}")
        r = script(OVERWRITE, path, mode, 1, crash=point)
        assert r.returncode == CRASHED, (point, r.stderr[-2000:])
        problems, s = validate_store(path), Store.open(path)
        if "teacher" not in s.groups():
            assert problems and "teacher/teacher: missing" in problems[0], (point, problems)
        else:
            assert problems == [], (point, problems)
            now = arrays(snapshot(path), "teacher/teacher")
            assert same(now, arrays(before, "teacher/teacher")) or same(now, arrays(after, "teacher/teacher")), point
        assert same(group_key(snapshot(path)), group_key(before)), point  # every other group as it was
        # the next writer (of another group) finishes or removes what was left
        committed |= point.startswith(("zarr.journal", "hdf5.committed"))  # the commit point is passed
        s.write_predictions("other", s.segments.uid[:3], np.zeros((3, s.classes.num_actions)))
        assert leftovers(path) == [] and validate_store(path) == [], point
        want = after if committed else before
        assert same(arrays(snapshot(path), "teacher/teacher"), arrays(want, "teacher/teacher")), point
        prov = [p.get("group") for p in Store.open(path).manifest["provenance"]]
        assert prov.count("teacher/teacher") == (2 if committed else 1), (point, prov)


def test_validate_reports_and_gc_removes_leftovers(store, tmp_path):
    """Leftovers of crashed writers are listed by ``validate`` (still valid) and removed by
    ``gc``; the next writer removes the routine ones but keeps a resumable partial build."""
    path = Path(store.path)
    feats = tmp_path / "npy"
    feats.mkdir()
    for i, v in enumerate(store.segments.videos):
        np.save(feats / f"{v}.npy", np.full((30, 16), i, np.float32))
    r = cli("import-features", path, feats, "--name", "imp", "--native-fps", 2, "--no-progress", crash="video.staged:3")
    assert r.returncode == CRASHED, r.stderr
    staged = "zarr.staged:1" if path.suffix == ".zarr" else "hdf5.staged:1"
    assert script(OVERWRITE, path, "exchange", 3, crash=staged).returncode == CRASHED
    r = cli("validate", path)
    assert r.returncode == 0 and f"{path}: valid" in r.stderr, r.stderr
    left = [line for line in r.stderr.splitlines() if line.startswith("leftover:")]
    assert len(left) == 2 and any("partial build of video/imp (3 videos staged" in x for x in left), left
    assert any("staged by a crashed writer" in x for x in left) and "kdstore gc" in r.stderr
    # the next writer removes the staged group, not the partial build
    Store.open(path).write_predictions("w", store.segments.uid[:2], np.zeros((2, store.classes.num_actions)))
    assert [x for x in leftovers(path) if "partial build" not in x] == []
    assert len(leftovers(path)) == 1
    r = cli("gc", path)
    assert r.returncode == 0 and "removed:" in r.stderr and "partial build of video/imp" in r.stderr, r.stderr
    assert leftovers(path) == [] and validate_store(path) == []
    r = cli("validate", path)
    assert r.returncode == 0 and "leftover" not in r.stderr
    assert not any(Store.open(path).backend.staging_dir().iterdir())
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            assert "_staging" not in f and "_trash" not in f
    # the import runs from scratch after gc
    assert cli("import-features", path, feats, "--name", "imp", "--native-fps", 2, "--no-progress").returncode == 0
    assert len(Store.open(path).video("imp").videos) == len(store.segments.videos)


def _import(store: Store, name: str, dim: int, frames: int, value: float) -> None:
    w = store.video_writer(name, dim, "float32", frame_rate=1.0)
    for i, v in enumerate(store.segments.videos):
        w.put(v, np.full((frames, dim), value + i, np.float32), np.arange(frames, dtype=np.float64))
    w.commit()


def test_hdf5_reimports_do_not_grow_the_file(tmp_path, synthetic_tables):
    """Re-importing a group keeps the file within about one extra copy, and a
    reader's memory map of a replaced group keeps its values."""
    store = build_store(tmp_path / "s.h5", *synthetic_tables, features=(), teachers=())
    path = Path(store.path)
    _import(store, "big", 128, 700, 0.0)
    one = path.stat().st_size
    copy = sum(int(np.prod(store.backend.array_info(f"video/big/{k}")[0])) * store.backend.array_info(f"video/big/{k}")[1].itemsize
               for k in ("features", "timestamps", "offsets"))
    assert copy > 4 << 20
    mapped = Store.open(path).video("big").features  # a reader holding the first version
    first = np.array(mapped[:50])
    sizes = []
    for k in range(1, 6):
        _import(Store.open(path), "big", 128, 700, 100.0 * k)
        sizes.append(path.stat().st_size)
        assert Store.open(path).video("big").features[0, 0] == 100.0 * k
    assert max(sizes) <= one + copy + (1 << 20), (one, copy, sizes)
    np.testing.assert_array_equal(mapped[:50], first)
    assert validate_store(path) == []
    # a crashed writer's staged group is dropped by the next writer and its space compacted by gc
    assert script(OVERWRITE.replace('"teacher"', '"t"').replace(", overwrite=True", ""), path, "exchange", 1,
                  crash="hdf5.staged:1").returncode == CRASHED
    with h5py.File(path, "r") as f:
        assert len(f["_staging"]) == 1
    Store.open(path).gc()
    with h5py.File(path, "r") as f:
        assert "_staging" not in f and "_trash" not in f
    assert path.stat().st_size <= one + (1 << 20)


WRITE_ONE = """
import os, sys, time, numpy as np
from kdstore.store import Store
gate = sys.argv[3]
while not os.path.exists(gate):  # start together
    time.sleep(0.001)
s = Store.open(sys.argv[1])
i, seg = int(sys.argv[2]), s.segments
s.write_predictions(f"g{i}", seg.uid[: 5 + i], np.full((5 + i, s.classes.num_actions), i, np.float32), topk=3)
"""


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_concurrent_writers_keep_every_group_and_provenance(tmp_path, synthetic_tables, suffix):
    """30 processes writing groups at once: 30 groups, 30 provenance entries."""
    store = build_store(tmp_path / f"s{suffix}", *synthetic_tables, features=(), teachers=())
    gate = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_ONE, str(store.path), str(i), str(gate)], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(30)]
    gate.touch()
    errors = [p.stderr.read() for p in procs if p.wait(timeout=300) != 0]
    assert not errors, errors[0]
    s = Store.open(store.path)
    assert s.groups() == sorted(f"g{i}" for i in range(30))
    groups = [p.get("group") for p in s.manifest["provenance"]]
    assert sorted(g for g in groups if g) == sorted(f"teacher/g{i}" for i in range(30))
    for i in range(30):
        assert len(s.group(f"g{i}")) == 5 + i and (s.group(f"g{i}").logits == i).all()
    assert validate_store(store.path) == [] and leftovers(store.path) == []


def test_a_second_writer_waits_or_refuses_naming_the_holder(store, tmp_path):
    """While a writer holds the store, another one refuses at once (timeout 0) with
    the holder's pid and command, or waits and goes on when the lock is released."""
    feats = tmp_path / "npy"
    feats.mkdir()
    for v in store.segments.videos:
        np.save(feats / f"{v}.npy", np.ones((4, 8), np.float32))
    args = ["import-features", store.path, feats, "--name", "f2", "--native-fps", 1, "--no-progress"]
    with locked(store_lock_path(store.path), "test"):
        r = cli(*args, env={"KDSTORE_LOCK_TIMEOUT": "0"})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"in use by pid {os.getpid()} (" in r.stderr and "since" in r.stderr
        # readers never wait
        for cmd in (["info", store.path], ["validate", store.path], ["query", store.path, store.segments.uid[0]]):
            assert cli(*cmd, env={"KDSTORE_LOCK_TIMEOUT": "0"}).returncode == 0, cmd
        env = {**os.environ, "PYTHONPATH": str(ROOT), "KDSTORE_LOCK_TIMEOUT": "120"}
        waiting = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], env=env,
                                   stderr=subprocess.PIPE, text=True)
        line = waiting.stderr.readline()  # printed once it found the lock taken
        assert f"waiting for pid {os.getpid()}" in line, line
    assert waiting.wait(timeout=120) == 0, waiting.stderr.read()
    assert "f2" in Store.open(store.path).feature_sets()


HOLD_OPEN = """
import sys, h5py
with h5py.File(sys.argv[1], "r+") as f:  # a writer's open file, HDF5 file lock included
    print("open", flush=True)
    sys.stdin.read()
"""


def test_hdf5_reader_waits_for_a_program_writing_the_file_then_names_it(tmp_path, synthetic_tables, monkeypatch):
    """Another program with the HDF5 file open for writing may change its metadata at any
    time: a reader waits for it, and after ``METADATA_WAIT_S`` stops naming the file."""

    store = build_store(tmp_path / "s.h5", *synthetic_tables)
    monkeypatch.setattr(hdf5_backend, "METADATA_WAIT_S", 0.5)
    p = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(store.path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "open"
        with pytest.raises(AccessError, match=rf"{re.escape(str(store.path))}: another process has held .* metadata"):
            Store.open(store.path)
    finally:
        p.communicate("", timeout=30)
    s = Store.open(store.path)
    assert s.group("teacher").logits.shape[0] > 0 and len(s.video("feat")) > 0


WRITE_MANY = """
import sys, numpy as np
from kdstore.store import Store
s = Store.open(sys.argv[1])
seg = s.segments
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    s.write_predictions(f"w{i}", seg.uid[:7], np.full((7, s.classes.num_actions), i, np.float32), topk=3)
"""


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_readers_see_whole_commits_while_a_writer_commits(tmp_path, synthetic_tables, suffix):
    """Readers opening the store in a loop while another process commits 80 groups never
    see a key go missing or a group half there (HDF5 rewrites metadata in place)."""
    store = build_store(tmp_path / f"s{suffix}", *synthetic_tables, features=(), teachers=())
    uid = Store.open(store.path).segments.uid
    w = subprocess.Popen([sys.executable, "-c", WRITE_MANY, str(store.path), "80"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert w.stdout.readline().strip() == "ready"
    reads = 0
    while w.poll() is None or reads == 0:
        s = Store.open(store.path)
        np.testing.assert_array_equal(s.segments.uid, uid)
        for name in s.groups():
            t = s.group(name)
            assert len(t) == 7 and (t.logits == int(name[1:])).all(), name
        reads += 1
    assert w.returncode == 0, w.stderr.read()
    assert Store.open(store.path).groups() == sorted(f"w{i}" for i in range(80)) and reads > 1


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_killed_ingest_blocks_nothing(tmp_path, synthetic_dir, suffix, monkeypatch):
    """A killed ingest leaves nothing that stops ``ingest`` or ``ingest --overwrite``
    (every crash point of ingest is in test_crash_consistency)."""
    path = tmp_path / f"s{suffix}"
    assert cli("ingest", synthetic_dir, path, "--fps", 24, crash="create.built:1").returncode == CRASHED
    assert not path.exists()  # the store appears whole or not at all
    assert cli("ingest", synthetic_dir, path, "--fps", 24).returncode == 0
    no_exchange = "import sys, runpy, kdstore.files as f; f.EXCHANGE = False; sys.argv = ['kdstore', *sys.argv[1:]]; "
    no_exchange += f"runpy.run_path({str(ROOT / 'cli.py')!r}, run_name='__main__')"
    for point in ("create.aside:1", "create.swapped:1"):  # overwrite: between the two renames, after the swap
        r = script(no_exchange, "ingest", synthetic_dir, path, "--fps", 24, "--overwrite", crash=point)
        assert r.returncode == CRASHED, r.stderr
        r = cli("ingest", synthetic_dir, path, "--fps", 24, *(["--overwrite"] if path.exists() else []))
        assert r.returncode == 0, r.stderr
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], point
        assert validate_store(path) == [] and leftovers(path) == []


def test_read_side_group_names_are_checked(tmp_path, synthetic_tables):
    """A group name cannot reach outside the store, on either backend."""
    other = build_store(tmp_path / "other.zarr", *synthetic_tables, features=(), teachers=("s1",))
    for suffix in SUFFIXES:
        s = build_store(tmp_path / "d" / f"s{suffix}", *synthetic_tables, features=(), teachers=("t",))
        uid = s.segments.uid[0]
        bad = "../../other.zarr/teacher/s1"
        for args in (["query", s.path, uid, "-t", bad], ["export", s.path, bad, tmp_path / "x.jsonl"]):
            r = cli(*args)
            assert r.returncode == 2 and "group name '../../other.zarr/teacher/s1'" in r.stderr, (suffix, r.stderr)
        with pytest.raises(DataError, match="group name"):
            s.group(bad)
        with pytest.raises(DataError, match="group name"):
            s.video("../feat")
    assert other.group("s1")
