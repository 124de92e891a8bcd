"""The store on both backends: one shared test class, subclassed per backend.

Like zarr-python's ``StoreTests``: every test in :class:`StoreTests` runs once against a
Zarr v3 directory (:class:`TestZarr`) and once against an HDF5 file (:class:`TestHDF5`).
Stores are real files on disk; their bytes are also read back with zarr-python and h5py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdstore.tables import ClassTable, SegmentTable
from kdstore.errors import ConfigError, DataError, KDStoreError, MissingError, StoreFormatError
from kdstore.predictions import PREDICTION_DTYPES, TeacherTargets
from kdstore.store import Store

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# helpers


def array_keys(store: Store) -> list[str]:
    """Every array key of a store, from its logical layout."""
    b = store.backend
    keys = [f"classes/{k}" for k in ("action_verb", "action_noun", "many_shot_verbs", "many_shot_nouns")]
    keys += [f"segments/{c}" for c in (*SegmentTable.COLUMNS, "id", "subset_mask")]
    for name in store.feature_sets():
        keys += [f"video/{name}/{k}" for k in ("features", "timestamps", "offsets")]
    for name in store.groups():
        keys += [
            f"teacher/{name}/{k}"
            for k in ("uids", "logits", "topk_values", "topk_indices", "lse", "features", "verb_logits", "noun_logits")
        ]
    return [k for k in keys if b.has(k)]


def snapshot(path: Path) -> dict:
    """Everything a reader can see in a store: groups, attributes and array values."""
    store = Store.open(path)
    snap = {"manifest": store.manifest, "features": store.feature_sets(), "predictions": store.groups()}
    for key in array_keys(store):
        snap[key] = np.array(store.backend.memmap(key))
    for group in ["classes", "segments", *(f"video/{n}" for n in snap["features"]), *(f"teacher/{n}" for n in snap["predictions"])]:
        snap[group + "@attrs"] = store.backend.attrs(group)
    return snap


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def topk_ref(logits: np.ndarray, k: int) -> np.ndarray:
    """[P, k] largest values of each row, descending."""
    return -np.sort(-logits, axis=1)[:, :k]


def _size(path: Path) -> int:
    """Bytes of a store on disk (a file or a directory tree)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


# ---------------------------------------------------------------------------------------
# random stores (hypothesis draws the structure, a seeded generator the values)

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC:/_ é", min_size=1, max_size=12)


@st.composite
def random_tables(draw) -> tuple[ClassTable, SegmentTable]:
    V, N = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    A = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    many = draw(st.booleans())
    classes = ClassTable(
        action_names=draw(st.lists(NAME, min_size=A, max_size=A)),
        verb_names=draw(st.lists(NAME, min_size=V, max_size=V)),
        noun_names=draw(st.lists(NAME, min_size=N, max_size=N)),
        action_verb=rng.integers(0, V, A).astype(np.int32),
        action_noun=rng.integers(0, N, A).astype(np.int32),
        many_shot_verbs=rng.random(V) < 0.5 if many else None,
        many_shot_nouns=rng.random(N) < 0.5 if many else None,
    )
    n = draw(st.integers(1, 30))
    videos = sorted(set(draw(st.lists(st.text(alphabet="PRS0123-_", min_size=1, max_size=8), min_size=1, max_size=4))))
    splits = draw(st.lists(st.sampled_from(["training1", "validation1", "test"]), min_size=1, max_size=3, unique=True))
    uids = draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n, unique=True))
    action = rng.integers(0, A, n).astype(np.int32)
    start = rng.integers(0, 10**6, n)
    segments = SegmentTable(
        uid=np.array(uids, np.int64),
        video=rng.integers(0, len(videos), n).astype(np.int32),
        start_frame=start.astype(np.int64),
        end_frame=(start + rng.integers(0, 500, n)).astype(np.int64),
        verb=classes.action_verb[action],
        noun=classes.action_noun[action],
        action=action,
        split=rng.integers(0, len(splits), n).astype(np.int8),
        videos=videos,
        splits=splits,
        fps=draw(st.sampled_from([24.0, 60.0, 29.97, 1.5])),
    )
    return classes, segments


@st.composite
def random_features(draw, videos: list[str]) -> dict:
    """``{name: (dtype, dim, {video: (features, timestamps)})}``."""
    out = {}
    for name in draw(st.lists(st.sampled_from(["rgb", "obj", "flow"]), max_size=2, unique=True)):
        dtype = draw(st.sampled_from(["float16", "float32"]))
        dim = draw(st.integers(1, 16))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        chosen = draw(st.lists(st.sampled_from(videos), min_size=1, unique=True))
        per = {}
        for v in chosen:
            n = draw(st.integers(1, 6))
            ts = np.cumsum(rng.uniform(0.01, 3.0, n)) + rng.uniform(-1.0, 50.0)
            per[v] = ((rng.normal(size=(n, dim)) * 10 ** rng.uniform(-3, 3)).astype(np.float32), ts)
        out[name] = (dtype, dim, per)
    return out


@st.composite
def random_predictions(draw, classes: ClassTable, segments: SegmentTable) -> dict:
    """``{name: kwargs of write_predictions}`` over random subsets of the UIDs."""
    out = {}
    A = classes.num_actions
    for name in draw(st.lists(st.sampled_from(["t0", "t1", "student"]), max_size=2, unique=True)):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        keep = np.array(draw(st.lists(st.booleans(), min_size=len(segments), max_size=len(segments))), bool)
        uids = rng.permutation(segments.uid[keep])  # any order: the store sorts them
        P = len(uids)
        kw = {
            "uids": uids,
            "logits": (rng.normal(size=(P, A)) * draw(st.sampled_from([0.1, 3.0, 100.0]))).astype(np.float32),
            "topk": draw(st.integers(1, A + 2)),
            "lse_temperatures": draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 10.0]), min_size=1, max_size=3, unique=True)),
            "kind": "student" if name == "student" else "teacher",
            "config": {"name": name, "seed": int(rng.integers(100))},
        }
        if draw(st.booleans()):
            kw["features"] = rng.normal(size=(P, draw(st.integers(1, 8)))).astype(np.float32)
        if draw(st.booleans()):
            kw["verb_logits"] = rng.normal(size=(P, classes.num_verbs)).astype(np.float32)
            kw["noun_logits"] = rng.normal(size=(P, classes.num_nouns)).astype(np.float32)
        out[name] = kw
    return out


@st.composite
def random_store_content(draw):
    classes, segments = draw(random_tables())
    return classes, segments, draw(random_features(segments.videos)), draw(random_predictions(classes, segments))


# ---------------------------------------------------------------------------------------
# the kill-a-writer children (run as subprocesses, SIGKILLed by the test)

CHILD_PREDICTIONS = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from kdstore.store import Store
    store = Store.open(sys.argv[1])
    seg, A, H = store.segments, store.classes.num_actions, int(sys.argv[3])
    i = 0
    while True:  # write group after group until killed
        rng = np.random.default_rng(i)
        logits = rng.normal(size=(len(seg), A)).astype(np.float32)
        store.write_predictions(f"k{i}", seg.uid, logits, features=np.full((len(seg), H), i, np.float16))
        print(f"k{i}", flush=True)
        i += 1
    """
)

CHILD_VIDEOS = textwrap.dedent(
    """
    import sys, time, numpy as np
    sys.path.insert(0, sys.argv[2])
    from kdstore.store import Store
    store = Store.open(sys.argv[1])
    videos = store.segments.videos
    w = store.video_writer("new", 8, dtype="float32", frame_rate=1.0)
    for i, v in enumerate(videos):  # one video every 50 ms, until killed
        w.put(v, np.full((20 + i, 8), i, np.float32), np.arange(20.0 + i))
        print(v, flush=True)
        time.sleep(0.05)
    time.sleep(60)
    """
)


def run_and_kill(script: str, args: list[str], lines: int, until=None, extra_delay: float = 0.0) -> list[str]:
    """Run ``script``; SIGKILL it once it printed ``lines`` lines and ``until()`` holds.

    ``until`` (polled every millisecond) lets a test kill the child while it is
    half-way through a write; without it the child dies ``extra_delay`` s after the lines.
    """
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    try:
        deadline = time.monotonic() + 30
        while len(out) < lines:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"child exited early: {proc.wait()} {proc.stderr.read()}")
            out.append(line.strip())
            assert time.monotonic() < deadline, "child too slow"
        if until is not None:
            while not until():
                assert proc.poll() is None, f"child exited: {proc.stderr.read()}"
                assert time.monotonic() < deadline, "the awaited state never came"
                time.sleep(0.001)
        time.sleep(extra_delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return out


# ---------------------------------------------------------------------------------------
# the shared tests


@pytest.fixture(scope="class")
def template(request, tmp_path_factory, make_synthetic, make_store) -> Path:
    """One store per backend class, built once (fsyncs make building slow); tests get copies."""
    suffix = request.cls.suffix
    d = tmp_path_factory.mktemp(f"template{suffix.replace('.', '_')}")
    _, classes, segments = make_synthetic(d / "annotations")
    return Path(make_store(d / f"store{suffix}", classes, segments, teachers=("teacher", "other")).path)



class StoreTests:
    """Tests every backend must pass; subclasses set ``suffix`` (and the raw readers)."""

    suffix: str

    # backend-specific pieces -------------------------------------------------------

    def raw(self, path: Path, key: str) -> np.ndarray:
        """The array at ``key`` read by the backend's own library."""
        raise NotImplementedError

    def raw_attrs(self, path: Path, group: str) -> dict:
        raise NotImplementedError

    def truncate(self, path: Path) -> None:
        """Damage the store the way an interrupted copy would."""
        raise NotImplementedError

    def foreign_store(self, path: Path) -> None:
        """Write a valid Zarr/HDF5 container at ``path`` that is not a kdstore store."""
        raise NotImplementedError

    # fixtures ----------------------------------------------------------------------

    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        return tmp_path / f"store{self.suffix}"

    @pytest.fixture
    def store(self, path, template, synthetic_tables) -> Store:
        """A fresh copy of the template: features ``feat`` (D=16), teachers ``teacher``/``other``."""
        (shutil.copytree if template.is_dir() else shutil.copyfile)(template, path)
        s = Store.open(path)
        assert s.segments.uid.tolist() == synthetic_tables[1].uid.tolist()
        return s

    # round trip --------------------------------------------------------------------

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors])
    @given(content=random_store_content())
    def test_round_trip(self, content):
        classes, segments, features, predictions = content
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"s{self.suffix}"
            s = Store.create(path, classes, segments)
            for name, (dtype, dim, per) in features.items():
                w = s.video_writer(name, dim, dtype=dtype, frame_rate=2.0, attrs={"extractor": name})
                for v, (f, t) in per.items():
                    w.put(v, f, t)
                w.commit()
            for name, kw in predictions.items():
                s.write_predictions(name, **kw)

            s = Store.open(path)
            assert s.backend.name == ("hdf5" if self.suffix == ".h5" else "zarr")
            c = s.classes
            for k in ("action_names", "verb_names", "noun_names"):
                assert getattr(c, k) == getattr(classes, k)
                assert self.raw_attrs(path, "classes")[k] == getattr(classes, k)
            for k in ("action_verb", "action_noun", "many_shot_verbs", "many_shot_nouns"):
                want, got = getattr(classes, k), getattr(c, k)
                assert (want is None) == (got is None)
                if want is not None:
                    np.testing.assert_array_equal(got, want)
            seg = s.segments
            for col in SegmentTable.COLUMNS:
                np.testing.assert_array_equal(getattr(seg, col), getattr(segments, col))
                assert getattr(seg, col).dtype == getattr(segments, col).dtype
            assert (seg.videos, seg.splits, seg.fps) == (segments.videos, segments.splits, segments.fps)

            assert s.feature_sets() == sorted(features)
            for name, (dtype, dim, per) in features.items():
                fs = s.video(name)
                assert fs.videos == sorted(per) and fs.dim == dim and fs.features.dtype == np.dtype(dtype)
                assert fs.attrs["extractor"] == name and fs.frame_rate == 2.0
                for v, (f, t) in per.items():
                    got_f, got_t = fs.frames(v)
                    np.testing.assert_array_equal(got_f, f.astype(dtype))
                    np.testing.assert_array_equal(got_t, t)
                    # frames_at at the exact timestamps finds exactly those frames
                    idx = fs.frames_at(fs.video_index([v]), t[None, :])
                    np.testing.assert_array_equal(fs.gather(idx)[0], f.astype(dtype))

            assert s.groups() == sorted(predictions)
            for name, kw in predictions.items():
                p = s.group(name)
                assert p.kind == kw["kind"] and p.config == kw["config"]
                rows = segments.row_of(kw["uids"])
                order = np.argsort(rows)
                np.testing.assert_array_equal(p.uids, kw["uids"][order])  # segment-table order
                logits = kw["logits"][order]
                np.testing.assert_array_equal(p.logits, logits.astype(np.float32))
                k = min(kw["topk"], classes.num_actions)
                assert p.topk == k and p.topk_values.shape == (len(logits), k)
                np.testing.assert_array_equal(p.topk_values, topk_ref(logits, k))
                np.testing.assert_array_equal(np.take_along_axis(logits, np.asarray(p.topk_indices, np.int64), 1), p.topk_values)
                for i, t in enumerate(kw["lse_temperatures"]):
                    np.testing.assert_allclose(p.lse[:, i], logsumexp(logits.astype(np.float64) / t), rtol=1e-5, atol=1e-4)
                for key in ("features", "verb_logits", "noun_logits"):
                    if key in kw:
                        np.testing.assert_array_equal(getattr(p, key), kw[key][order].astype(PREDICTION_DTYPES[key]))
                    else:
                        assert getattr(p, key) is None
                np.testing.assert_array_equal(p.present, np.isin(segments.uid, kw["uids"]))
                targets = TeacherTargets(p, ("topk_values", "topk_indices", "lse"), temperature=kw["lse_temperatures"][0])
                g = targets.gather(np.arange(len(segments)))
                np.testing.assert_array_equal(g["present"], p.present)

            # the backend's own library reads the same values
            for key in array_keys(s):
                mm = s.backend.memmap(key)
                got = self.raw(path, key)
                assert got.shape == mm.shape and got.dtype == mm.dtype, key
                np.testing.assert_array_equal(got, mm, err_msg=key)

    def test_raw_readers_see_groups_and_attrs(self, store, path):
        assert self.raw_attrs(path, "")["format"] == "kdstore"
        assert self.raw_attrs(path, "segments")["videos"] == store.segments.videos
        assert self.raw_attrs(path, "teacher/teacher")["num_classes"] == store.classes.num_actions
        np.testing.assert_array_equal(self.raw(path, "video/feat/features"), store.video("feat").features)

    # reads -------------------------------------------------------------------------

    def test_gather_equals_plain_reads(self, store, path):
        fs, seg = store.video("feat"), store.segments
        rng = np.random.default_rng(1)
        rows = rng.integers(0, len(seg), 64)
        end = seg.start_seconds()[rows] + rng.uniform(-3, 3, len(rows))
        times = end[:, None] - np.arange(10)[::-1] * 0.5  # [B, T], some before the video starts
        idx = fs.frames_at(fs.video_index(seg.videos[v] for v in seg.video[rows]), times)
        plain = self.raw(path, "video/feat/features")
        np.testing.assert_array_equal(fs.gather(idx), plain[idx])
        out = np.empty((*idx.shape, fs.dim), fs.features.dtype)
        assert fs.gather(idx, out=out) is out
        np.testing.assert_array_equal(out, plain[idx])
        neg = idx - len(plain)  # negative indices count from the end, as in numpy
        np.testing.assert_array_equal(fs.gather(neg, out=np.empty_like(out)), plain[idx])
        for bad in (len(plain), -len(plain) - 1):
            with pytest.raises(IndexError):
                fs.gather(np.array([[0, bad]]), out=np.empty((1, 2, fs.dim), out.dtype))
            with pytest.raises(IndexError):
                fs.gather(np.array([[0, bad]]))
        # brute force: the last frame at or before t, the first frame if t is before it
        ts_all = self.raw(path, "video/feat/timestamps")
        offsets = self.raw(path, "video/feat/offsets")
        for b, r in enumerate(rows):
            v = fs.videos.index(seg.videos[seg.video[r]])
            lo, hi = offsets[v], offsets[v + 1]
            for t_i, t in enumerate(times[b]):
                j = lo + max(0, np.searchsorted(ts_all[lo:hi], t, side="right") - 1)
                assert idx[b, t_i] == j

    def test_frames_at_missing_video(self, store):
        fs = store.video("feat")
        assert fs.video_index(["no-such-video", fs.videos[0]]).tolist() == [-1, 0]
        with pytest.raises(MissingError, match="batch row 1.*video index -1"):
            fs.frames_at(fs.video_index([fs.videos[0], "no-such-video"]), np.zeros((2, 3)))
        with pytest.raises(MissingError, match="no features for video 'nope'"):
            fs.frames("nope")

    def test_targets_match_logits_and_mask_absent(self, store, synthetic_tables):
        _, seg = synthetic_tables
        p = store.group("teacher")
        rng = np.random.default_rng(0)  # the same draws as build_store's first teacher
        train = seg.rows_in("training1")
        logits = rng.normal(size=(len(train), store.classes.num_actions)).astype(np.float32) * 3
        rows = np.random.default_rng(5).integers(0, len(seg), 100)
        g = TeacherTargets(p, ("topk_values", "topk_indices", "lse"), temperature=2.0).gather(rows)
        in_train = np.isin(rows, train)
        np.testing.assert_array_equal(g["present"], in_train)
        assert (~in_train).any() and in_train.any()
        pos = np.searchsorted(train, rows[in_train])
        np.testing.assert_array_equal(g["topk_values"][in_train], topk_ref(logits[pos], 10))
        np.testing.assert_array_equal(np.take_along_axis(logits[pos], g["topk_indices"][in_train].astype(np.int64), 1), g["topk_values"][in_train])
        np.testing.assert_allclose(g["lse"][in_train], logsumexp(logits[pos] / 2.0), rtol=1e-5)
        # absent rows are zeros, not someone else's prediction
        assert not g["topk_values"][~in_train].any() and not g["topk_indices"][~in_train].any() and not g["lse"][~in_train].any()
        # the same from plain reads of the stored arrays
        raw_uids = self.raw(Path(store.path), "teacher/teacher/uids")
        raw_vals = self.raw(Path(store.path), "teacher/teacher/topk_values")
        for b in np.flatnonzero(in_train):
            np.testing.assert_array_equal(g["topk_values"][b], raw_vals[np.flatnonzero(raw_uids == seg.uid[rows[b]])[0]])
        with pytest.raises(MissingError, match="T=3"):
            TeacherTargets(p, ("topk_values", "topk_indices", "lse"), temperature=3.0).gather(rows)

    def test_empty_predictions(self, store):
        p = store.write_predictions("none", [], np.zeros((0, store.classes.num_actions)))
        assert len(p) == 0 and not p.present.any()
        g = TeacherTargets(p, ("topk_values", "topk_indices", "lse"), temperature=1.0).gather(np.arange(5))
        assert not g["present"].any() and g["topk_values"].shape == (5, p.topk) and not g["lse"].any()
        assert Store.open(store.path).group("none").predict(int(store.segments.uid[0]))["present"] is False

    def test_predict(self, store):
        seg, cls = store.segments, store.classes
        p = store.group("teacher")
        uid = int(seg.uid[seg.rows_in("training1")[3]])
        r = p.predict(uid, k=5)
        assert r["present"] and r["id"] == uid and r["splits"] == ["training1"] and r["kind"] == "teacher"
        row = seg.row_of([uid])[0]
        assert r["video"] == seg.videos[seg.video[row]]
        assert r["true"]["action"] == seg.action[row] and r["true"]["name"] == cls.action_names[seg.action[row]]
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
        logits = p.logits[p.row_of_segment[row]].astype(np.float64)
        soft = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert [t["action"] for t in r["top"]] == np.argsort(-soft, kind="stable")[:5].tolist()
        assert r["true"]["rank"] == 1 + int((soft > soft[seg.action[row]]).sum())
        assert r["true"]["prob"] == pytest.approx(soft[seg.action[row]])
        if r["true"]["rank"] <= 5:
            assert r["top"][r["true"]["rank"] - 1]["action"] == r["true"]["action"]
        assert r["feature_norm"] > 0
        absent = p.predict(int(seg.uid[seg.rows_in("validation1")[0]]))
        assert absent["present"] is False and "top" not in absent and absent["splits"] == ["validation1"]
        with pytest.raises(MissingError, match="UID 999999"):
            p.predict(999999)

    # groups ------------------------------------------------------------------------

    def test_teacher_groups_coexist(self, store):
        assert store.groups("teacher") == ["other", "teacher"]
        a, b = store.group("teacher"), store.group("other")
        assert not np.array_equal(a.logits, b.logits)
        seg = store.segments
        store.write_predictions("stud", seg.uid[:5], np.ones((5, store.classes.num_actions)), kind="student")
        s = Store.open(store.path)
        assert s.groups("teacher") == ["other", "teacher"] and s.groups("student") == ["stud"]
        assert s.groups() == ["other", "stud", "teacher"]
        np.testing.assert_array_equal(s.group("teacher").logits, a.logits)
        s.delete_predictions("other")
        s = Store.open(store.path)
        assert s.groups() == ["stud", "teacher"]
        np.testing.assert_array_equal(s.group("teacher").logits, a.logits)
        with pytest.raises(MissingError, match="no predictions named 'other'"):
            s.group("other")
        provenance = [e["action"] for e in s.manifest["provenance"]]
        assert provenance[0] == "create" and provenance.count("write_predictions") == 3

    def test_overwrite_predictions(self, store):
        seg, A = store.segments, store.classes.num_actions
        before = snapshot(store.path)
        with pytest.raises(StoreFormatError, match="'teacher/teacher' exists"):
            store.write_predictions("teacher", seg.uid[:3], np.zeros((3, A)))
        assert_same(before, snapshot(store.path))
        logits = np.arange(4 * A, dtype=np.float32).reshape(4, A) / 10
        p = store.write_predictions("teacher", seg.uid[[7, 1, 3, 2]], logits, overwrite=True, topk=3)
        p = Store.open(store.path).group("teacher")
        np.testing.assert_array_equal(p.uids, seg.uid[[1, 2, 3, 7]])
        np.testing.assert_array_equal(p.logits, logits[[1, 3, 2, 0]].astype(np.float32))
        assert p.topk == 3 and p.features is None and len(p) == 4
        np.testing.assert_array_equal(Store.open(store.path).group("other").logits, before["teacher/other/logits"])

    @pytest.mark.parametrize("block_rows", [1, 7, 64])
    def test_blockwise_write_is_bit_identical(self, store, block_rows):
        """Row blocks of any size store the bytes of one whole-matrix pass (ties, float64 input, features)."""
        seg, A = store.segments, store.classes.num_actions
        rng = np.random.default_rng(block_rows)
        pick = rng.permutation(len(seg))[: len(seg) - 5]  # an awkward count, out of table order
        logits = rng.normal(size=(len(pick), A)) * 4  # float64: converted through float32
        logits[::3] = np.round(logits[::3])  # many tied values
        feats = rng.normal(size=(len(pick), 9)).astype(np.float32)
        verb = rng.normal(size=(len(pick), store.classes.num_verbs))
        kw = dict(features=feats, verb_logits=verb, topk=13, lse_temperatures=(1.0, 3.0))
        store.write_predictions("whole", seg.uid[pick], logits, block_rows=len(pick), **kw)
        store.write_predictions("blocks", seg.uid[pick], logits, block_rows=block_rows, **kw)
        whole, blocks = store.group("whole"), store.group("blocks")
        for key in ("uids", "logits", "topk_values", "topk_indices", "lse", "features", "verb_logits"):
            a, b = self.raw(store.path, f"teacher/whole/{key}"), self.raw(store.path, f"teacher/blocks/{key}")
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key
        # and the whole-matrix values are the reference ones
        order = np.argsort(seg.row_of(seg.uid[pick].tolist()), kind="stable")
        x = logits[order].astype(np.float32)
        np.testing.assert_array_equal(whole.logits, x)
        np.testing.assert_array_equal(whole.topk_values, topk_ref(x, 13))
        np.testing.assert_array_equal(np.take_along_axis(x, whole.topk_indices.astype(np.int64), 1), topk_ref(x, 13))
        np.testing.assert_allclose(whole.lse[:, 1], logsumexp(x.astype(np.float64) / 3.0), rtol=1e-5)
        assert blocks.topk == 13 and len(blocks) == len(pick)
        with pytest.raises(ConfigError, match="block_rows must be >= 1"):
            store.write_predictions("zero", seg.uid[:2], logits[:2], block_rows=0)

    def test_write_predictions_memory_is_bounded_by_block_rows(self, tmp_path):
        """Temporaries are [block_rows, A]: the peak Python-heap allocation of a write stays well
        under the size of its input, where a whole-matrix pass needs several times it."""
        import tracemalloc

        A, n, V = 1500, 2400, 30
        rng = np.random.default_rng(0)
        action = rng.integers(0, A, n).astype(np.int32)
        av = (np.arange(A) % V).astype(np.int32)
        classes = ClassTable(action_names=[f"a{i}" for i in range(A)], verb_names=[f"v{i}" for i in range(V)],
                             noun_names=[f"n{i}" for i in range(A // V)], action_verb=av,
                             action_noun=(np.arange(A) // V).astype(np.int32))
        seg = SegmentTable(uid=np.arange(n, dtype=np.int64), video=np.zeros(n, np.int32),
                           start_frame=np.arange(n, dtype=np.int64) * 10, end_frame=np.arange(n, dtype=np.int64) * 10 + 5,
                           verb=classes.action_verb[action], noun=classes.action_noun[action], action=action,
                           split=np.zeros(n, np.int8), videos=["v"], splits=["training1"], fps=30.0)
        store = Store.create(tmp_path / f"wide{self.suffix}", classes, seg)
        logits = rng.normal(size=(n, A)).astype(np.float32)  # 14.4 MB
        peaks = {}
        for rows in (64, n):
            tracemalloc.start()
            store.write_predictions(f"b{rows}", seg.uid[::-1], logits, block_rows=rows, overwrite=True)
            peaks[rows] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peaks[64] < logits.nbytes / 2, peaks  # top-K/LSE outputs (~1 MB) plus 64-row temporaries (~3 MB)
        assert peaks[n] > logits.nbytes, peaks  # the same write in one block: the test can tell them apart
        np.testing.assert_array_equal(store.group("b64").topk_indices, store.group(f"b{n}").topk_indices)

    def test_overwrite_video_features(self, store, synthetic_tables):
        fs = store.video("feat")
        old = {v: np.array(fs.frames(v)[0]) for v in fs.videos}
        w = store.video_writer("feat", fs.dim, dtype="float16")
        v0 = fs.videos[2]
        w.put(v0, np.ones((3, fs.dim)), np.array([0.0, 1.0, 2.0]))
        fs2 = w.commit()
        assert fs2.videos == fs.videos and len(fs2) == len(fs) - len(old[v0]) + 3
        for v in fs.videos:
            want = np.ones((3, fs.dim), np.float16) if v == v0 else old[v]
            np.testing.assert_array_equal(Store.open(store.path).video("feat").frames(v)[0], want)
        assert not w.dir.exists()

    def test_preread_reads_the_bytes_the_features_map(self, store):
        """``data_range`` names the bytes the features' memory map reads; ``preread`` reads them all."""
        fs = store.video("feat")
        path, offset, n = store.backend.data_range("video/feat/features")
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(n) == np.ascontiguousarray(fs.features).tobytes()
        assert fs.preread(block=1000, streams=3) == n == fs.features.nbytes > 3000  # blocks and parts that do not divide it

    # bad input ---------------------------------------------------------------------

    def test_bad_predictions_leave_store_intact(self, store):
        seg, A = store.segments, store.classes.num_actions
        uids = seg.uid[:4]
        ok = np.zeros((4, A), np.float32)
        nan = ok.copy()
        nan[2, 1] = np.nan
        inf_feat = np.zeros((4, 3), np.float32)
        inf_feat[1, 0] = -np.inf
        big = ok.astype(np.float64)
        big[3, 0] = 1e39
        big_feat = np.zeros((4, 3), np.float32)
        big_feat[3, 0] = 1e6
        cases = [
            (MissingError, "UID 424242", dict(uids=[*uids[:3], 424242], logits=ok)),
            (DataError, f"UID {uids[1]} given more than once", dict(uids=[uids[0], uids[1], uids[1], uids[2]], logits=ok)),
            (DataError, f"logits: UID {uids[2]} has NaN", dict(uids=uids, logits=nan)),
            (DataError, f"features: UID {uids[1]} has NaN or inf", dict(uids=uids, logits=ok, features=inf_feat)),
            (DataError, rf"logits has shape \[4, {A + 1}\], expected \[4, {A}\]", dict(uids=uids, logits=np.zeros((4, A + 1)))),
            (DataError, r"logits has shape \[3, ", dict(uids=uids, logits=ok[:3])),
            (DataError, "verb_logits has shape", dict(uids=uids, logits=ok, verb_logits=np.zeros((4, 99)))),
            (DataError, f"logits: UID {uids[3]} has a value beyond the float32 range", dict(uids=uids, logits=big)),
            (DataError, f"features: UID {uids[3]} has a value beyond the float16 range", dict(uids=uids, logits=ok, features=big_feat)),
            (DataError, "topk must be >= 1", dict(uids=uids, logits=ok, topk=0)),
            (DataError, "kind must be one of", dict(uids=uids, logits=ok, kind="oracle")),
        ]
        before = snapshot(store.path)
        for err, msg, kw in cases:
            with pytest.raises(err, match=msg) as info:
                store.write_predictions("new", **kw)
            assert isinstance(info.value, KDStoreError) and "\n" not in str(info.value)
            assert_same(before, snapshot(store.path))
        for bad_name in ["", ".x", "_x", "a/b", " x"]:
            with pytest.raises(DataError, match="group name"):
                store.write_predictions(bad_name, uids, ok)
        assert_same(before, snapshot(store.path))

    def test_bad_video_features_leave_store_intact(self, store):
        fs = store.video("feat")
        before = snapshot(store.path)
        w = store.video_writer("feat2", 4)
        ts = np.arange(5.0)
        feats = np.zeros((5, 4), np.float32)
        feats[3, 2] = np.nan
        with pytest.raises(DataError, match=r"video 'v1': frame 3 \(t=3.000s\) has NaN or inf"):
            w.put("v1", feats, ts)
        feats[3, 2] = np.inf
        with pytest.raises(DataError, match="frame 3"):
            w.put("v1", feats, ts)
        with pytest.raises(DataError, match=r"video 'v1': frame 2 \(t=2.000s\) has a value beyond the float16 range"):
            w.put("v1", np.where(np.arange(5)[:, None] == 2, 1e5, 0.0) * np.ones((5, 4)), ts)
        with pytest.raises(DataError, match=r"features of shape \[5, 3\], expected \[n, 4\]"):
            w.put("v1", np.zeros((5, 3)), ts)
        with pytest.raises(DataError, match="no frames"):
            w.put("v1", np.zeros((0, 4)), np.zeros(0))
        with pytest.raises(DataError, match="4 timestamps for 5 frames"):
            w.put("v1", np.zeros((5, 4)), ts[:4])
        with pytest.raises(DataError, match="increasing"):
            w.put("v1", np.zeros((5, 4)), ts[::-1])
        with pytest.raises(DataError, match="increasing"):
            w.put("v1", np.zeros((5, 4)), np.array([0, 1, np.nan, 3, 4]))
        assert not w.done("v1")
        with pytest.raises(DataError, match="nothing to commit"):
            w.commit()
        with pytest.raises(DataError, match=f"feature dimension {fs.dim + 1} differs from the stored {fs.dim}"):
            store.video_writer("feat", fs.dim + 1)
        with pytest.raises(DataError, match="dtype must be float16 or float32"):
            store.video_writer("feat3", 4, dtype="int8")
        with pytest.raises(ConfigError, match="a partial build with other settings"):
            store.video_writer("feat2", 5)  # the staged build of feat2 has dim 4
        with pytest.raises(MissingError, match="no video features named 'feat2'"):
            store.video("feat2")
        assert_same(before, snapshot(store.path))

    def test_bad_segments_refused_before_overwrite(self, store, synthetic_tables):
        classes, seg = synthetic_tables
        before = snapshot(store.path)

        def edited(**cols) -> SegmentTable:
            kw = {c: getattr(seg, c).copy() for c in SegmentTable.COLUMNS}
            for c, (i, v) in cols.items():
                kw[c][i] = v
            return SegmentTable(**kw, videos=seg.videos, splits=seg.splits, fps=seg.fps)

        cases = [
            (f"UID {seg.uid[5]}: unknown action id {classes.num_actions}", edited(action=(5, classes.num_actions))),
            (f"UID {seg.uid[0]}: appears more than once", edited(uid=(4, seg.uid[0]))),
            (f"UID {seg.uid[6]}: ends at frame 1 before it starts", edited(end_frame=(6, 1))),
        ]
        for msg, bad in cases:
            with pytest.raises(DataError, match=msg):
                Store.create(store.path, classes, bad, overwrite=True)
            assert_same(before, snapshot(store.path))
        with pytest.raises(StoreFormatError, match="already exists"):
            Store.create(store.path, classes, seg)
        assert_same(before, snapshot(store.path))

    def test_create_refuses_to_overwrite_foreign(self, tmp_path, synthetic_tables):
        foreign = tmp_path / f"precious{self.suffix}"
        self.foreign_store(foreign)
        with pytest.raises(StoreFormatError, match="not a kdstore store"):
            Store.create(foreign, *synthetic_tables, overwrite=True)
        assert foreign.exists()

    # foreign and damaged stores -----------------------------------------------------

    def test_open_foreign(self, tmp_path):
        random_file = tmp_path / f"random{self.suffix}"
        random_file.write_bytes(np.random.default_rng(0).bytes(5000))
        empty = tmp_path / "empty.zarr"
        empty.mkdir()
        foreign = tmp_path / f"foreign{self.suffix}"
        self.foreign_store(foreign)
        for p, msg in [
            (random_file, "not a kdstore store"),
            (empty, "directory without zarr.json"),
            (tmp_path / "missing.h5", "no such store"),
            (foreign, "manifest format None"),
        ]:
            with pytest.raises(StoreFormatError, match=msg) as info:
                Store.open(p)
            assert str(p) in str(info.value)

    def test_wrong_schema_version(self, store):
        m = store.manifest
        m["schema_version"] = 99
        store.backend.set_attrs("", m)
        with pytest.raises(StoreFormatError, match="schema version 99"):
            Store.open(store.path)

    def test_truncated_store(self, store):
        self.truncate(Path(store.path))
        with pytest.raises(StoreFormatError) as info:
            s = Store.open(store.path)
            s.video("feat").gather(np.zeros((1, 1), np.int64))
        assert str(store.path) in str(info.value)

    # crashes -----------------------------------------------------------------------

    def test_killed_video_writer_resumes(self, store):
        before = snapshot(store.path)
        staged = run_and_kill(CHILD_VIDEOS, [str(store.path), str(ROOT)], lines=3)
        s = Store.open(store.path)
        assert_same(before, snapshot(store.path))  # nothing of "new" is visible
        assert "new" not in s.feature_sets()
        videos = s.segments.videos
        w = s.video_writer("new", 8, dtype="float32", frame_rate=1.0)
        assert [v for v in videos if w.done(v)][:3] == staged  # the child may have staged one more
        for i, v in enumerate(videos):
            if not w.done(v):
                w.put(v, np.full((20 + i, 8), i, np.float32), np.arange(20.0 + i))
        fs = w.commit()
        fs = Store.open(store.path).video("new")
        assert fs.videos == sorted(videos)
        for i, v in enumerate(videos):
            f, t = fs.frames(v)
            np.testing.assert_array_equal(f, np.full((20 + i, 8), i, np.float32))
            np.testing.assert_array_equal(t, np.arange(20.0 + i))
        np.testing.assert_array_equal(Store.open(store.path).video("feat").features, before["video/feat/features"])

    def writing(self, path: Path, size_before: int):
        """A predicate: the killed child is half-way through writing a group's arrays."""
        raise NotImplementedError

    @pytest.mark.parametrize("when", ["mid-write", "between-writes"])
    def test_killed_predictions_writer(self, store, when):
        before = snapshot(store.path)
        seg, A = store.segments, store.classes.num_actions
        H = max(1, (24 << 20) // (2 * len(seg)))  # ~24 MB of features a group: writing takes a while
        path = Path(store.path)
        sizes = []

        def mid_write():
            if not sizes:
                sizes.append(_size(path))
            return self.writing(path, sizes[0])

        args = [str(path), str(ROOT), str(H)]
        done = run_and_kill(CHILD_PREDICTIONS, args, lines=2, until=mid_write if when == "mid-write" else None)
        s = Store.open(store.path)
        new = [n for n in s.groups() if n.startswith("k")]
        assert set(done) <= set(new) and len(new) <= len(done) + 1  # committed ones, perhaps the next
        if when == "mid-write" and self.suffix == ".zarr":  # killed before the rename: k2 is not there
            assert sorted(new) == sorted(done) and list((path / ".staging").glob("tmp-*"))
        for name in new:  # any visible group is complete
            i = int(name[1:])
            p = s.group(name)
            logits = np.random.default_rng(i).normal(size=(len(seg), A)).astype(np.float32)
            np.testing.assert_array_equal(p.logits, logits)
            assert p.features.shape == (len(seg), H) and (p.features == i).all()
        for key, value in before.items():  # previous groups intact
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(np.array(s.backend.memmap(key)), value, err_msg=key)
        # a re-run goes on and commits
        s.write_predictions("after", seg.uid[:2], np.zeros((2, A)))
        s = Store.open(store.path)
        assert "after" in s.groups() and s.group("teacher").logits.shape == before["teacher/teacher/logits"].shape


class TestZarr(StoreTests):
    suffix = ".zarr"

    def raw(self, path, key):
        return zarr.open_group(path, mode="r")[key][...]

    def raw_attrs(self, path, group):
        g = zarr.open_group(path, mode="r")
        return dict((g[group] if group else g).attrs)

    def truncate(self, path):
        chunk = path / "video" / "feat" / "features" / "c" / "0" / "0"
        with open(chunk, "r+b") as f:
            f.truncate(chunk.stat().st_size // 2)

    def writing(self, path, size_before):
        # the staged group's features chunk exists and holds data: it is being written
        return any(f.stat().st_size > 0 for f in (path / ".staging").glob("tmp-*/features/c/0/0"))

    def foreign_store(self, path):
        zarr.open_group(path, mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="int32")

    def test_truncated_segments_chunk(self, store):
        chunk = Path(store.path) / "segments" / "uid" / "c" / "0"
        with open(chunk, "r+b") as f:
            f.truncate(3)
        with pytest.raises(StoreFormatError, match=r"segments/uid.*found 3"):
            Store.open(store.path).segments

    def test_foreign_array_layouts_refused(self, store):
        g = zarr.open_group(store.path, mode="r+")
        g.create_array("video/zipped/features", shape=(4, 2), dtype="float32", compressors=zarr.codecs.ZstdCodec())
        g.create_array("video/big/features", shape=(4, 2), dtype="float32", compressors=None,
                       serializer=zarr.codecs.BytesCodec(endian="big"))
        g.create_array("video/chunked/features", shape=(4, 2), dtype="float32", compressors=None, chunks=(2, 2))
        for name in ("zipped", "big", "chunked"):
            with pytest.raises(StoreFormatError, match="expected one uncompressed little-endian chunk"):
                store.backend.memmap(f"video/{name}/features")

    def test_incomplete_array_metadata(self, store):
        meta_file = Path(store.path) / "segments" / "uid" / "zarr.json"
        meta = json.loads(meta_file.read_text())
        del meta["chunk_grid"]
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(StoreFormatError, match="segments/uid: incomplete array metadata"):
            Store.open(store.path).segments

    def test_corrupt_metadata(self, store):
        (Path(store.path) / "teacher" / "teacher" / "zarr.json").write_text("{not json")
        with pytest.raises(StoreFormatError, match="not valid JSON"):
            Store.open(store.path).group("teacher")
        (Path(store.path) / "zarr.json").write_text("[]")
        with pytest.raises(StoreFormatError, match="not a Zarr v3 JSON object"):
            Store.open(store.path)


class TestHDF5(StoreTests):
    suffix = ".h5"

    def raw(self, path, key):
        with h5py.File(path, "r") as f:
            return f[key][()]

    def raw_attrs(self, path, group):
        with h5py.File(path, "r") as f:
            g = f[group] if group else f
            return json.loads(g["_attrs"][()])

    def truncate(self, path):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)

    def writing(self, path, size_before):
        # the file grew by megabytes: array data of the next group is going in
        return path.stat().st_size > size_before + (4 << 20)

    def foreign_store(self, path):
        with h5py.File(path, "w") as f:
            f["x"] = np.arange(3)

    def test_truncated_to_half(self, store):
        with open(store.path, "r+b") as f:
            f.truncate(Path(store.path).stat().st_size // 2)
        with pytest.raises(StoreFormatError, match="cannot open as HDF5"):
            Store.open(store.path)

    def test_damaged_metadata(self, store):
        data = Path(store.path).read_bytes()  # the manifest JSON (and the copies set_attrs left behind)
        Path(store.path).write_bytes(data.replace(b'"format": "kdstore"', b"\xff" * 19))
        with pytest.raises(StoreFormatError, match="damaged HDF5 store, attrs"):
            Store.open(store.path)

    def test_chunked_dataset_refused(self, store):
        with h5py.File(store.path, "r+") as f:
            f.create_dataset("video/zipped/features", data=np.ones((4, 2), np.float32), chunks=(2, 2), compression="gzip")
        with pytest.raises(StoreFormatError, match="chunked or compressed"):
            store.backend.memmap("video/zipped/features")

    def test_missing_group_attrs(self, store):
        with pytest.raises(MissingError, match="no 'nope'"):
            store.backend.attrs("nope")

    def test_failed_write_leaves_no_staging(self, store):
        """A write that fails while copying leaves neither a group nor staged data behind."""
        from kdstore.backend import Concatenated

        before = snapshot(store.path)
        bad = Concatenated([], (5, 3), np.float32)  # promises 5 rows, yields none
        with pytest.raises(StoreFormatError, match="expected 5 rows, got 0"):
            store.backend.write_group("teacher/broken", {"x": bad}, {})
        with h5py.File(store.path, "r") as f:
            assert "broken" not in f["teacher"] and "_staging" not in f
        # and one that fails while its datasets are created (HDF5 has no object dtype)
        with pytest.raises(TypeError):
            store.backend.write_group("teacher/broken", {"x": np.array([{}, {}], dtype=object)}, {})
        with h5py.File(store.path, "r") as f:
            assert "broken" not in f["teacher"] and "_staging" not in f
        assert_same(before, snapshot(store.path))
