"""Feature imports at scale: RULSTM's key format, frame selection (--fps, --windows), streaming,
resume after SIGKILL at chosen points, and staged videos never reused from another source."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from kdstore.tables import ClassTable, SegmentTable
from kdstore.errors import ConfigError, DataError
from kdstore.store import Store
from kdstore.validate import validate_store
from trainers.student.config import preset
from trainers.student.data import StudentData
from kdstore.feature_import import import_arrays, import_lmdb
from kdstore.rulstm_lmdb import RulstmLmdb, write_rulstm_lmdb
from kdstore.selection import Selection, WindowSpec, grid_mask, window_mask

ROOT = Path(__file__).resolve().parents[1]
RULSTM_FPS = 30.0  # RULSTM numbers the frames of every dataset at 30 fps
# EGTEA Gaze+ and EPIC-KITCHENS video names; P01_10 / P01_100 / P01_101 sort differently as
# names ("P01_10" < "P01_100") and as keys ("P01_100_frame" < "P01_10_frame")
EGTEA = ("OP01-R01-PastaSalad", "P20-R03-BaconAndEggs")
EPIC = ("P01_01", "P01_10", "P01_100", "P01_101")


def rulstm_key(video: str, frame: int) -> bytes:
    """RULSTM's own formula (RULSTM/dataset.py: ``video + "_" + "frame_{:010d}.jpg".format(f)``)."""
    return (video + "_" + "frame_{:010d}.jpg".format(frame)).encode("utf-8")


def features(video: str, numbers: np.ndarray, dim: int) -> np.ndarray:
    """Deterministic [n, dim] float32 features of a video's frames (distinct per video and frame)."""
    seed = int.from_bytes(video.encode()[:8].ljust(8, b"\0"), "little")
    base = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return base[None, :] + (np.asarray(numbers, np.float32)[:, None] / 1000.0)  # [n, dim]


def make_lmdb(path: Path, frames: dict[str, np.ndarray], dim: int = 8) -> dict[str, np.ndarray]:
    """A RULSTM-format LMDB of ``frames`` (video -> frame numbers); returns the features written."""
    feats = {v: features(v, n, dim) for v, n in frames.items()}
    write_rulstm_lmdb(path, ((v, n, feats[v]) for v, n in frames.items()), map_size=1 << 28)
    return feats


def make_store(path: Path, starts: dict[str, list[int]], fps: float = RULSTM_FPS, actions: int = 1) -> Store:
    """``actions`` actions (segment i labelled i mod ``actions``); segments starting at the given
    annotation frames (at ``fps``) per video, alternately in the splits train and val."""
    ids = np.arange(actions, dtype=np.int32)
    classes = ClassTable([f"cut_x{a}" for a in ids], [f"cut{a}" for a in ids], [f"x{a}" for a in ids], ids, ids)
    videos = list(starts)
    video = np.concatenate([np.full(len(s), i) for i, s in enumerate(starts.values())]).astype(np.int32)
    start = np.concatenate([np.asarray(s, np.int64) for s in starts.values()])
    n = len(start)
    z = (np.arange(n) % actions).astype(np.int32)
    seg = SegmentTable(
        uid=np.arange(1, n + 1), video=video, start_frame=start, end_frame=start + 30, verb=z, noun=z, action=z,
        split=(np.arange(n) % 2).astype(np.int8), videos=videos, splits=["train", "val"], fps=fps,
    )
    return Store.create(path, classes, seg)


def dense_segments(videos, seconds: int, seed: int = 0) -> dict[str, list[int]]:
    """EPIC-like dense segments: one every ~3 s, at arbitrary 30 fps frames, some within the first seconds."""
    rng = np.random.default_rng(seed)
    return {v: sorted(rng.integers(1, seconds * 30, size=seconds // 3).tolist()) for v in videos}


# ---------------------------------------------------------------------------------------
# the key format


def test_lmdb_keys_are_rulstm_s_and_sparse_lmdbs_import_exactly(tmp_path):
    rng = np.random.default_rng(0)
    frames = {v: np.sort(rng.choice(np.arange(1, 400), size=60, replace=False)) for v in EGTEA + EPIC}  # gaps
    feats = make_lmdb(tmp_path / "rgb", frames)
    import lmdb

    env = lmdb.open(str(tmp_path / "rgb"), readonly=True, lock=False)
    with env.begin() as txn:
        keys = [k for k, _ in txn.cursor()]
        value = txn.get(rulstm_key("P01_101", int(frames["P01_101"][3])))
    env.close()
    assert sorted(keys) == sorted(rulstm_key(v, int(n)) for v, ns in frames.items() for n in ns)
    np.testing.assert_array_equal(np.frombuffer(value, "float32"), feats["P01_101"][3])

    store = make_store(tmp_path / "s.zarr", {v: [300] for v in EGTEA + EPIC})
    r = import_lmdb(store, tmp_path / "rgb", "rgb", native_fps=RULSTM_FPS, dtype="float32", progress=False)
    assert (r.videos, r.frames, r.source_frames, r.kept_frames) == (6, 360, 360, 360)
    fs = Store.open(tmp_path / "s.zarr").video("rgb")
    assert fs.videos == sorted(EGTEA + EPIC)
    for v in EGTEA + EPIC:
        got, ts = fs.frames(v)
        np.testing.assert_array_equal(got, feats[v])
        np.testing.assert_array_equal(ts, frames[v] / RULSTM_FPS)  # exact: frame n at n / 30 s
    assert validate_store(tmp_path / "s.zarr") == []


def test_badly_numbered_frames_are_refused(tmp_path):
    import lmdb

    store = make_store(tmp_path / "s.zarr", {"P01_01": [30]})
    for name, keys, error in (
        ("widths", [b"P01_01_frame_0000000002.jpg", b"P01_01_frame_1.jpg"], "frame 1 follows frame 2 in key order"),
        ("twice", [b"P01_01_frame_0000000001.jpg", b"P01_01_frame_000000000001.jpg"], "frame 1 follows frame 1"),
        ("split", [b"P01_01_frame_0000000001.jpg", b"P01_01_frame_0x_frame_0000000001.jpg", b"P01_01_frame_1000000000.jpg"],
         "frames of video 'P01_01' are not contiguous in key order"),
    ):
        env = lmdb.open(str(tmp_path / name), map_size=1 << 22)
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, np.zeros(4, np.float32).tobytes())
        env.close()
        with pytest.raises(DataError, match=error):
            import_lmdb(store, tmp_path / name, name, native_fps=30, progress=False)
    assert store.feature_sets() == []


def test_reader_remaps_and_reads_identically(tmp_path):
    frames = {v: np.arange(1, 50) for v in EPIC}
    feats = make_lmdb(tmp_path / "rgb", frames, dim=16)
    with RulstmLmdb(tmp_path / "rgb", remap_bytes=1) as src:  # reopens after every block and video
        for video in src.videos():
            keep = np.arange(len(video.numbers)) % 3 != 1
            got = np.concatenate([b.copy() for b in src.read(video, keep, block_rows=5)])
            np.testing.assert_array_equal(got, feats[video.name][keep])


# ---------------------------------------------------------------------------------------
# frame selection


def nearest_to_grid(ts: np.ndarray, fps: float) -> set[int]:
    """Independently: for each grid point k / fps within half a step of the frames, the
    nearest frame, the earlier one on a tie."""
    out = set()
    k = int(np.ceil(ts[0] * fps - 0.5))
    while k / fps <= ts[-1] + 0.5 / fps:
        d = [abs(t - k / fps) for t in ts]
        out.add(min(range(len(ts)), key=lambda i: (round(d[i], 9), i)))
        k += 1
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=80, unique=True), st.sampled_from([0.5, 1.0, 2.0, 4.0, 7.0, 30.0]))
def test_grid_keeps_the_frame_nearest_each_grid_point(numbers, fps):
    ts = np.sort(np.asarray(numbers)) / RULSTM_FPS
    assert set(np.flatnonzero(grid_mask(ts, fps))) == nearest_to_grid(ts, fps)


def last_at_or_before(ts: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The student's lookup on one video: the last frame at or before each time (else the
    first), both rounded to whole microseconds."""
    us = lambda x: np.rint(np.asarray(x, np.float64) * 1e6).astype(np.int64)  # noqa: E731
    return np.maximum(np.searchsorted(us(ts), us(t), side="right") - 1, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 2000), min_size=1, max_size=150, unique=True),
    st.lists(st.integers(0, 2200), max_size=6),
    st.floats(0.0, 3.0), st.floats(0.0, 2.0), st.integers(1, 12), st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    st.floats(0.0, 1.0),
)
def test_window_mask_keeps_every_frame_a_window_can_reach(numbers, start_frames, tau_min, width, T, fps, u):
    ts = np.sort(np.asarray(numbers)) / RULSTM_FPS
    starts = np.asarray(start_frames) / RULSTM_FPS
    spec = WindowSpec(tau_min, tau_min + width, T, fps)
    keep = window_mask(ts, starts, spec)
    assert keep[0] and keep[-1]
    kept = np.flatnonzero(keep)
    for tau in (spec.tau_min, spec.tau_max, spec.tau_min + u * width):
        for frames in range(1, T + 1):  # shorter windows too
            times = (starts - tau)[:, None] + ((np.arange(frames) - (frames - 1)) / fps)[None, :]
            full = last_at_or_before(ts, times)
            np.testing.assert_array_equal(kept[last_at_or_before(ts[kept], times)], full)


def test_windows_keep_one_frame_per_window_time_on_a_grid_the_times_hit():
    ts = np.arange(3000) / RULSTM_FPS  # 100 s at 30 fps
    starts = np.array([600, 1200]) / RULSTM_FPS  # segments 20 s apart: their windows do not overlap
    keep = window_mask(ts, starts, WindowSpec(1.0, 1.0, 10, 1.0))
    want = {0, 2999} | {round((s - 1.0 - j) * RULSTM_FPS) for s in starts for j in range(10)}
    assert set(np.flatnonzero(keep)) == want  # 2 x 10 window frames and both ends, no neighbours


def test_a_student_time_may_not_round_below_the_imported_windows():
    spec = WindowSpec(1.0, 1.0, 10, 1.0)
    assert "outside the imported range" in spec.refusal(float(np.nextafter(1.0, 2.0)), 10, 1.0)
    assert spec.refusal(float(np.nextafter(1.0, 0.0)), 10, 1.0) is None  # later times: window_mask covers tau_min - COVER_TOL
    # 3 frames at 0.9 fps, i / 0.9, against every frame at 0.3 fps: 1 / 0.3 rounds below 3 / 0.9
    assert -1 / 0.3 < -3 / 0.9
    assert "round below" in WindowSpec(1.0, 1.0, 10, 0.9).refusal(1.0, 4, 0.3)


def student_frames(store: Store, name: str, cfg, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(timestamps [N, T], features [N, T, D]) of every window the student reads."""
    data = StudentData(store, name, split, cfg)
    return data.features.timestamps[data.frame_idx], data.features.gather(data.frame_idx)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_student_reads_the_same_windows_from_a_windows_import(tmp_path, suffix):
    videos = (*EGTEA, *EPIC[:2])
    frames = {v: np.arange(1, 90 * 30) for v in videos}  # 90 s at 30 fps
    frames["P01_10"] = frames["P01_10"][::3]  # and a sparse one
    make_lmdb(tmp_path / "rgb", frames, dim=8)
    store = make_store(tmp_path / f"s{suffix}", dense_segments(videos, 90))
    imp = dict(native_fps=RULSTM_FPS, dtype="float32", progress=False)
    import_lmdb(store, tmp_path / "rgb", "full", **imp)
    ranged = import_lmdb(store, tmp_path / "rgb", "ranged", windows=WindowSpec(0.5, 1.5, 10, 1.0), **imp)
    point = import_lmdb(store, tmp_path / "rgb", "point", windows=WindowSpec(1.0, 1.0, 10, 2.0), **imp)
    import_lmdb(store, tmp_path / "rgb", "grid", fps=2.0, **imp)
    both = import_lmdb(store, tmp_path / "rgb", "grid-windows", fps=2.0, windows=WindowSpec(1.0, 1.0, 10, 2.0), **imp)
    store = Store.open(store.path)
    assert point.kept_frames < ranged.kept_frames < ranged.source_frames and both.kept_frames < point.kept_frames
    for set_name, ref, cfg in (
        ("ranged", "full", preset("egtea", tau_a=0.5, fps=1.0, num_frames=10)),
        ("ranged", "full", preset("egtea", tau_a=1.5, fps=1.0, num_frames=4)),
        ("ranged", "full", preset("egtea", tau_a=0.8, fps=1.0, num_frames=10)),
        ("point", "full", preset("ek55", tau_a=1.0, fps=2.0, num_frames=10)),
        ("grid-windows", "grid", preset("ek55", tau_a=1.0, fps=2.0, num_frames=10)),
    ):
        for split in ("train", "val"):
            ts, got = student_frames(store, set_name, cfg, split)
            ts_ref, want = student_frames(store, ref, cfg, split)
            np.testing.assert_array_equal(ts, ts_ref)
            np.testing.assert_array_equal(got, want)
    # outside the windows it was imported for, a subsampled set is refused
    with pytest.raises(ConfigError, match="video/point"):
        student_frames(store, "point", preset("ek55", tau_a=0.5, fps=2.0, num_frames=10))


# ---------------------------------------------------------------------------------------
# a student refuses a subsampled set that cannot give its windows


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 2000), min_size=1, max_size=150, unique=True), st.lists(st.integers(0, 2200), max_size=6),
    st.floats(0.0, 3.0), st.floats(0.0, 2.0), st.integers(1, 12), st.sampled_from([1.0, 2.0, 4.0]), st.booleans(),
    st.floats(-0.2, 1.2), st.integers(1, 14), st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 8.0]),
)
def test_a_selection_that_accepts_a_config_gives_the_full_set_s_windows(numbers, start_frames, tau_min, width, n, wfps,
                                                                       grid, u, T, fps):
    ts = np.sort(np.asarray(numbers)) / RULSTM_FPS
    starts = np.asarray(start_frames) / RULSTM_FPS
    sel = Selection(wfps if grid else None, WindowSpec(tau_min, tau_min + width, n, wfps))
    tau = tau_min + u * width
    why = sel.refusal(tau, T, fps)
    in_range = tau_min - 1e-9 <= tau <= tau_min + width  # u outside [0, 1] is out of range unless width is ~0
    assert (why is None) == (in_range and (T == 1 or (fps <= wfps and (wfps / fps) % 1 == 0
                                                      and (T - 1) * wfps / fps <= n - 1))), why
    if why is None:
        ref = ts[grid_mask(ts, wfps)] if grid else ts  # a grid-and-windows set reads as its grid does
        kept = ref[window_mask(ref, starts, sel.windows)]
        times = (starts - tau)[:, None] + ((np.arange(T) - (T - 1)) / fps)[None, :]
        np.testing.assert_array_equal(kept[last_at_or_before(kept, times)], ref[last_at_or_before(ref, times)])


def test_a_grid_serves_windows_at_its_rate_or_below():
    assert Selection().refusal(3.0, 50, 30.0) is None  # every frame
    assert Selection(4.0).refusal(1.0, 10, 4.0) is None and Selection(4.0).refusal(1.0, 10, 1.5) is None
    assert "denser than the 1 fps grid" in Selection(1.0).refusal(1.0, 10, 4.0)
    assert Selection(1.0).refusal(1.0, 1, 4.0) is None  # one frame: no rate to miss
    both = Selection(2.0, WindowSpec(0.5, 2.0, 10, 2.0))
    assert Selection.from_json(both.to_json()) == both
    assert Selection.from_json(None) == Selection()


@pytest.fixture(scope="module")
def subsets(tmp_path_factory) -> SimpleNamespace:
    """A Zarr store with one RULSTM LMDB imported whole (``full``) and subsampled: ``tau1``
    (CLI ``--windows --tau-a 1``, 10 frames at 1 fps), ``fps1`` (``--fps 1``) and ``range``
    (windows over tau_a 0.5-2 s, 10 frames at 2 fps)."""
    root = tmp_path_factory.mktemp("subsets")
    videos = (*EGTEA, *EPIC[:2])
    make_lmdb(root / "rgb", {v: np.arange(1, 60 * 30) for v in videos}, dim=8)
    starts = dense_segments(videos, 60)
    store = make_store(root / "s.zarr", starts, actions=3)
    imp = dict(native_fps=RULSTM_FPS, dtype="float32", progress=False)
    import_lmdb(store, root / "rgb", "full", **imp)
    import_lmdb(store, root / "rgb", "range", windows=WindowSpec(0.5, 2.0, 10, 2.0), **imp)
    for name, opts in (("tau1", ["--windows", "--tau-a", "1", "--window-fps", "1"]), ("fps1", ["--fps", "1"])):
        res = CliRunner().invoke(cli.app, ["import-features", str(store.path), str(root / "rgb"), "--name", name,
                                           "--native-fps", "30", "--dtype", "float32", "--no-progress", *opts])
        assert res.exit_code == 0, res.output
    return SimpleNamespace(root=root, path=store.path, starts=starts, videos=videos)


def windows_cfg(**kw):
    base = dict(num_frames=10, n_layer=1, n_head=2, inter_dim=32, batch_size=16, topk=2, epochs=1)
    return preset("egtea", **{**base, **kw})


@pytest.mark.parametrize("name, window, why", [
    ("tau1", dict(tau_a=2.0, fps=1.0), "tau_a 2 s is outside the imported range"),
    ("fps1", dict(tau_a=1.0, fps=4.0), "its 4 fps windows are denser than the 1 fps grid"),
    ("range", dict(tau_a=1.0, fps=4.0), "its 4 fps frames are not on the imported 2 fps window offsets"),
    ("range", dict(tau_a=1.0, fps=1.0), "10 frames at 1 fps reach further back than the imported windows"),
])
def test_student_refuses_a_set_whose_selection_misses_its_windows(subsets, name, window, why):
    store = Store.open(subsets.path)
    with pytest.raises(ConfigError) as e:
        StudentData(store, name, "train", windows_cfg(**window))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"video/{name} in {subsets.path}: ") and why in msg
    assert f"asks for windows of 10 frames at {window['fps']:g} fps ending tau_a {window['tau_a']:g} s" in msg
    holds = {"tau1": "only the frames of windows of up to 10 frames at 1 fps ending tau_a 1 s",
             "fps1": "the frames nearest a 1 fps grid",
             "range": "only the frames of windows of up to 10 frames at 2 fps ending tau_a 0.5-2 s"}[name]
    assert f"the set holds {holds}" in msg


@pytest.mark.parametrize("name, window", [
    ("tau1", dict(tau_a=1.0, fps=1.0)),
    ("tau1", dict(tau_a=1.0, fps=1.0, num_frames=3)),
    ("range", dict(tau_a=1.3, fps=2.0)),
    ("range", dict(tau_a=2.0, fps=1.0, num_frames=5)),  # every other 2 fps offset
])
def test_a_covering_selection_reads_the_full_set_s_windows(subsets, name, window):
    store = Store.open(subsets.path)
    cfg = windows_cfg(**window)
    for split in ("train", "val"):
        ts, got = student_frames(store, name, cfg, split)
        ts_ref, want = student_frames(store, "full", cfg, split)
        np.testing.assert_array_equal(ts, ts_ref)
        np.testing.assert_array_equal(got, want)


def test_a_grid_set_serves_windows_at_its_rate_or_below(subsets):
    store = Store.open(subsets.path)
    for fps in (1.0, 0.5):
        cfg = windows_cfg(tau_a=1.0, fps=fps)
        data = StudentData(store, "fps1", "train", cfg)
        ts = data.features.timestamps[data.frame_idx]  # [N, T]
        asked = (store.segments.start_frame[data.rows] / RULSTM_FPS - 1.0)[:, None] + ((np.arange(10) - 9) / fps)[None, :]
        inside = asked >= 1 / RULSTM_FPS  # at or after each video's first frame
        # a grid frame at or before each asked time, less than a grid step and a source frame before it
        assert ((ts <= asked + 1e-9) & (ts > asked - 1.0 - 1 / RULSTM_FPS))[inside].all()
        assert all(len(set(row[m])) == m.sum() for row, m in zip(ts, inside))  # each its own frame


@pytest.mark.usefixtures("one_thread")
def test_train_and_predict_on_a_covering_set_match_the_full_set_and_refuse_one_that_is_not(subsets, tmp_path):
    from processes import cli as run_cli
    from trainers.student.train import predict_into_store, train_student

    args = ["--preset", "egtea", "--no-distill", "--train-split", "train", "--eval-split", "val", "--device", "cpu",
            "--set", "num_frames=4", "--set", "n_layer=1", "--set", "n_head=2", "--set", "inter_dim=32",
            "--set", "batch_size=16", "--set", "topk=2", "--set", "epochs=1", "--set", "fps=2"]
    r = run_cli("train-student", subsets.path, "-f", "tau1", "--run", tmp_path / "refused", *args, "--set", "tau_a=2")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: video/tau1 in {subsets.path}: ") and "tau_a 2 s is outside" in lines[0]
    assert not (tmp_path / "refused" / "last.safetensors").exists()

    cfg = windows_cfg(num_frames=4, fps=2.0, tau_a=1.3)
    logits = {}
    for name in ("range", "full"):
        train_student(Store.open(subsets.path), name, tmp_path / name, cfg, train_split="train", eval_split="val", device="cpu",
                      progress=False)
        predict_into_store(Store.open(subsets.path), tmp_path / name, f"student-{name}")
        logits[name] = np.asarray(Store.open(subsets.path).group(f"student-{name}").logits)
    np.testing.assert_array_equal(logits["range"], logits["full"])

    # the run's windows against a store whose `range` covers only tau_a 1 s: predict refuses
    other = make_store(tmp_path / "other.zarr", subsets.starts, actions=3)
    import_lmdb(other, subsets.root / "rgb", "range", native_fps=RULSTM_FPS, dtype="float32", progress=False,
                windows=WindowSpec(1.0, 1.0, 10, 2.0))
    res = CliRunner().invoke(cli.app, ["predict", str(other.path), "--run", str(tmp_path / "range"), "--name", "p"])
    assert isinstance(res.exception, ConfigError), res.output
    assert str(res.exception).startswith(f"video/range in {other.path}: ") and "tau_a 1.3 s is outside" in str(res.exception)
    assert "p" not in Store.open(other.path).groups()


def test_each_segment_s_frames_are_one_run_in_time_order(tmp_path):
    frames = {"P01_01": np.arange(1, 120 * 30)}
    make_lmdb(tmp_path / "rgb", frames)
    starts = {"P01_01": [900, 1500, 3000]}  # 30 s, 50 s, 100 s
    store = make_store(tmp_path / "s.zarr", starts)
    import_lmdb(store, tmp_path / "rgb", "w", native_fps=30, windows=WindowSpec(0.5, 2.0, 10, 1.0), progress=False)
    fs = Store.open(store.path).video("w")
    ts = fs.frames("P01_01")[1]
    assert ts[0] == 1 / 30 and ts[-1] == (120 * 30 - 1) / 30  # the video's ends stay
    inner = ts[1:-1]
    for s in (30.0, 50.0, 100.0):  # all 30 fps frames of [s - 2 - 9, s - 0.5], nothing between the runs
        run = inner[(inner >= s - 11.0 - 1e-6) & (inner <= s - 0.5 + 1e-6)]
        np.testing.assert_allclose(np.diff(run), 1 / 30, atol=1e-9)
        assert abs(run[0] - (s - 11.0)) < 1e-9  # from the earliest window time's own frame, not the one before
    assert len(inner) == sum(len(np.arange(round((s - 11) * 30), np.floor((s - 0.5) * 30 + 1e-3) + 1))
                             for s in (30.0, 50.0, 100.0))


def test_info_shows_the_kept_fraction_and_a_grid_import_keeps_exact_timestamps(tmp_path):
    frames = {v: np.arange(1, 301) for v in EPIC}  # 10 s at 30 fps
    make_lmdb(tmp_path / "rgb", frames)
    make_store(tmp_path / "s.h5", {v: [150] for v in EPIC})
    res = CliRunner().invoke(cli.app, ["import-features", str(tmp_path / "s.h5"), str(tmp_path / "rgb"), "--name", "g",
                                       "--native-fps", "30", "--fps", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "kept 164 of 1200 source frames (13.7%)" in " ".join(res.output.split())  # 41 grid points (0 .. 10 s at 4 fps) a video
    fs = Store.open(tmp_path / "s.h5").video("g")
    ts = fs.frames("P01_100")[1]
    assert fs.frame_rate == 4.0 and len(ts) == 41
    np.testing.assert_array_equal(ts, frames["P01_100"][sorted(nearest_to_grid(frames["P01_100"] / 30, 4.0))] / 30)
    out = " ".join(CliRunner().invoke(cli.app, ["info", str(tmp_path / "s.h5")]).output.split())
    assert "video/g: 164 frames x 8 float16 in 4 videos (kept 13.7% of 1200 source frames)" in out
    info = json.loads(CliRunner().invoke(cli.app, ["info", str(tmp_path / "s.h5"), "--json"]).output)
    assert info["video"]["g"]["selection"] == {"fps": 4.0, "windows": None}
    assert info["video"]["g"]["kept"] == {"source_frames": 1200, "fraction": 164 / 1200}


def test_selection_options_are_checked(tmp_path):
    make_lmdb(tmp_path / "rgb", {"P01_01": np.arange(1, 61)})
    make_store(tmp_path / "s.zarr", {"P01_01": [30]})
    run = lambda *a: CliRunner().invoke(cli.app, ["import-features", str(tmp_path / "s.zarr"), str(tmp_path / "rgb"),
                                                  "--name", "x", "--no-progress", *a])
    assert "--windows needs --tau-a" in run("--windows", "--window-fps", "1").output
    assert "--windows needs --tau-a" in run("--windows", "--tau-a", "1").output
    assert "add --windows" in run("--tau-a", "1").output
    for bad, msg in (("2:1", "A <= B"), ("x", "expected A or A:B"), ("1:2:3", "expected A or A:B")):
        res = run("--windows", "--tau-a", bad, "--window-fps", "1")
        assert isinstance(res.exception, ConfigError) and msg in str(res.exception)
    assert run("--fps", "2").exit_code == 0
    res = run("--fps", "1")  # another selection into the same group
    assert isinstance(res.exception, ConfigError) and "holds frames selected by {'fps': 2.0" in str(res.exception)
    assert Store.open(tmp_path / "s.zarr").video("x").frame_rate == 2.0


# ---------------------------------------------------------------------------------------
# streaming put


def test_put_streams_blocks_and_names_the_bad_frame(tmp_path):
    store = make_store(tmp_path / "s.zarr", {"a": [30]})
    w = store.video_writer("f", 4, dtype="float16")
    blocks = [np.ones((3, 4), np.float32), np.full((2, 4), 2.0, np.float32)]
    w.put("a", iter(blocks), np.arange(5) / 2)
    assert w.done("a")
    with pytest.raises(DataError, match=r"video 'b': 6 timestamps for 5 frames"):
        w.put("b", iter(blocks), np.arange(6) / 2)
    with pytest.raises(DataError, match=r"video 'b': 4 timestamps for more than 4 frames"):
        w.put("b", iter(blocks), np.arange(4) / 2)
    bad = [blocks[0], np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], np.float32)]
    with pytest.raises(DataError, match=r"video 'b': frame 4 \(t=2.000s\) has NaN or inf"):
        w.put("b", iter(bad), np.arange(5) / 2)
    assert not w.done("b") and [p.name for p in w.dir.iterdir() if p.name.startswith(".")] == []  # no temp file left
    fs = w.commit()
    np.testing.assert_array_equal(fs.frames("a")[0], np.concatenate(blocks).astype(np.float16))


# ---------------------------------------------------------------------------------------
# SIGKILL at chosen points, resume, and staging from another source

DRIVER = r"""
import json, os, shutil, signal, sys
sys.path.insert(0, {root!r})
from kdstore import features as kfeatures, store as kstore
from kdstore import feature_import as imports, rulstm_lmdb

kill, k = {kill!r}, {k!r}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kill == "put":  # before the k-th video is staged
    put, n = kfeatures.VideoWriter.put, [0]
    def counted(self, *a, **kw):
        if n[0] == k:
            die()
        n[0] += 1
        return put(self, *a, **kw)
    kfeatures.VideoWriter.put = counted
elif kill == "block":  # inside the k-th video's put, after its first block is written
    imports.BLOCK_ROWS = 4
    read, n = rulstm_lmdb.RulstmLmdb.read, [0]
    def blocks(self, *a, **kw):
        n[0] += 1
        for i, b in enumerate(read(self, *a, **kw)):
            if n[0] == k + 1 and i == 1:
                die()
            yield b
    rulstm_lmdb.RulstmLmdb.read = blocks
elif kill in ("cleanup-features", "cleanup-writer"):  # while the committed import's staging is deleted
    rmtree = shutil.rmtree
    def partly(path, *a, **kw):
        if os.path.basename(str(path)).startswith("video-"):
            doomed = "*.feat.npy" if kill == "cleanup-features" else "writer.json"
            for p in sorted(__import__("pathlib").Path(path).glob(doomed))[: k + 1]:
                p.unlink()
            die()
        return rmtree(path, *a, **kw)
    shutil.rmtree = partly
args = json.loads(sys.argv[1])
if "windows_spec" in args:
    w = args.pop("windows_spec")
    args["windows"] = imports.WindowSpec.parse(w["tau_a"], w["num_frames"], w["fps"])
fn = imports.import_lmdb if args.pop("format") == "lmdb" else imports.import_arrays
fn(kstore.Store.open(args.pop("store")), args.pop("source"), args.pop("name"), progress=False, **args)
"""


def import_killed(kill: str, k: int, **args) -> int:
    """Run an import in a subprocess that SIGKILLs itself at ``kill`` (k-th occurrence); its return code."""
    code = DRIVER.format(root=str(ROOT), kill=kill, k=k)
    args = {key: str(v) if isinstance(v, Path) else v for key, v in args.items()}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, -signal.SIGKILL), res.stderr
    return res.returncode


def assert_same_group(a: Store, b: Store, name: str) -> None:
    fa, fb = a.video(name), b.video(name)
    assert fa.videos == fb.videos
    np.testing.assert_array_equal(np.asarray(fa.offsets), np.asarray(fb.offsets))
    np.testing.assert_array_equal(np.asarray(fa.timestamps), np.asarray(fb.timestamps))
    np.testing.assert_array_equal(np.asarray(fa.features), np.asarray(fb.features))


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_killed_lmdb_import_resumes_to_the_uninterrupted_result(tmp_path, suffix):
    videos = EGTEA + EPIC
    frames = {v: np.arange(1, 40 * 30, 2) for v in videos}
    make_lmdb(tmp_path / "rgb", frames, dim=8)
    starts = dense_segments(videos, 40)
    opts = dict(format="lmdb", source=tmp_path / "rgb", name="rgb", native_fps=30.0)
    windows = WindowSpec(0.5, 1.0, 10, 1.0)
    ref = make_store(tmp_path / f"ref{suffix}", starts)
    import_lmdb(ref, tmp_path / "rgb", "rgb", native_fps=30, windows=windows, progress=False)
    points = [("put", 0), ("put", 3), ("block", 0), ("block", 4), ("cleanup-features", 0), ("cleanup-features", 5),
              ("cleanup-writer", 0)]
    for i, (kill, k) in enumerate(points):
        path = tmp_path / f"s{i}{suffix}"
        make_store(path, starts)
        spec = dict(tau_a="0.5:1", num_frames=10, fps=1.0)
        if kill.startswith("cleanup"):  # a group of the same name is there already: the kill comes after the swap
            import_lmdb(Store.open(path), tmp_path / "rgb", "rgb", native_fps=30, windows=windows, progress=False)
        assert import_killed(kill, k, store=path, **opts, windows_spec=spec) == -signal.SIGKILL, (kill, k)
        r = import_lmdb(Store.open(path), tmp_path / "rgb", "rgb", native_fps=30, windows=windows, progress=False)
        assert r.videos + r.skipped == len(videos)
        if kill == "put":
            assert r.skipped == k
        assert_same_group(Store.open(path), ref, "rgb")
        assert validate_store(path) == [], (kill, k)
        assert not any(Store.open(path).backend.staging_dir().glob("video-*"))


def test_a_resumed_import_never_takes_videos_staged_from_another_source(tmp_path):
    names = [f"P{p:02d}_{i:02d}" for p in (1, 2) for i in range(1, 13)]  # 24 videos, as in the report
    for folder, scale in (("A", 1.0), ("B", -1.0)):
        (tmp_path / folder).mkdir()
        for v in names:
            np.save(tmp_path / folder / f"{v}.npy", scale * features(v, np.arange(20), 8))
    make_store(tmp_path / "s.zarr", {v: [60] for v in names})
    args = dict(format="npy", store=tmp_path / "s.zarr", name="f", native_fps=2.0)
    assert import_killed("put", 13, **args, source=tmp_path / "A") == -signal.SIGKILL
    with pytest.raises(ConfigError, match=r"a partial build with other settings is staged .*/A.*--restart"):
        import_arrays(Store.open(tmp_path / "s.zarr"), tmp_path / "B", "f", native_fps=2.0, progress=False)
    r = import_arrays(Store.open(tmp_path / "s.zarr"), tmp_path / "B", "f", native_fps=2.0, restart=True, progress=False)
    assert (r.videos, r.skipped) == (24, 0)
    fs = Store.open(tmp_path / "s.zarr").video("f")
    for v in names:
        np.testing.assert_array_equal(fs.frames(v)[0], (-features(v, np.arange(20), 8)).astype(np.float16))
    # a changed folder is another source too, and so is another selection of the same one
    assert import_killed("put", 2, **args, source=tmp_path / "B") == -signal.SIGKILL
    np.save(tmp_path / "B" / f"{names[0]}.npy", np.zeros((20, 8), np.float32))
    with pytest.raises(ConfigError, match="holds features from arrays .*/B, this import reads arrays .*/B: pass --overwrite"):
        import_arrays(Store.open(tmp_path / "s.zarr"), tmp_path / "B", "f", native_fps=2.0, progress=False)
    with pytest.raises(ConfigError, match="a partial build with other settings is staged"):
        import_arrays(Store.open(tmp_path / "s.zarr"), tmp_path / "B", "f", native_fps=2.0, progress=False, mode="overwrite")


def test_a_resumed_lmdb_import_never_takes_videos_of_another_lmdb(tmp_path):
    frames = {v: np.arange(1, 61) for v in EPIC}
    a = make_lmdb(tmp_path / "A", frames)
    make_lmdb(tmp_path / "B", {v: n + 1 for v, n in frames.items()})
    make_store(tmp_path / "s.h5", {v: [30] for v in EPIC})
    args = dict(format="lmdb", store=tmp_path / "s.h5", name="f", native_fps=30.0)
    assert import_killed("put", 2, **args, source=tmp_path / "B") == -signal.SIGKILL
    with pytest.raises(ConfigError, match="a partial build with other settings is staged"):
        import_lmdb(Store.open(tmp_path / "s.h5"), tmp_path / "A", "f", native_fps=30, progress=False)
    with pytest.raises(ConfigError, match="a partial build with other settings is staged"):  # same LMDB, other selection
        import_lmdb(Store.open(tmp_path / "s.h5"), tmp_path / "B", "f", native_fps=30, fps=10.0, progress=False)
    import_lmdb(Store.open(tmp_path / "s.h5"), tmp_path / "A", "f", native_fps=30, restart=True, progress=False)
    fs = Store.open(tmp_path / "s.h5").video("f")
    for v in EPIC:
        np.testing.assert_array_equal(fs.frames(v)[0], a[v].astype(np.float16))
        np.testing.assert_array_equal(fs.frames(v)[1], frames[v] / 30)


def test_an_append_adds_videos_and_their_source_counts(tmp_path):
    from kdstore.inspect import summary

    for folder, videos in (("one", ("P01_01", "P01_02")), ("two", ("P01_03",))):
        (tmp_path / folder).mkdir()
        for v in videos:
            np.save(tmp_path / folder / f"{v}.npy", features(v, np.arange(40), 8))
    store = make_store(tmp_path / "s.zarr", {v: [30] for v in ("P01_01", "P01_02", "P01_03")})
    import_arrays(store, tmp_path / "one", "f", native_fps=4.0, fps=1.0, progress=False)
    r = import_arrays(store, tmp_path / "two", "f", native_fps=4.0, fps=1.0, progress=False, mode="append")
    assert (r.source_frames, r.kept_frames) == (40, 11)  # this import's video: 0-9.75 s at 4 fps; grid 0, 1, .., 10 s
    fs = Store.open(tmp_path / "s.zarr").video("f")
    assert fs.videos == ["P01_01", "P01_02", "P01_03"] and fs.attrs["source_frames"] == {"P01_01": 40, "P01_02": 40, "P01_03": 40}
    assert fs.attrs["video_sources"] == {"P01_01": 0, "P01_02": 0, "P01_03": 1}
    assert summary(Store.open(tmp_path / "s.zarr"))["video"]["f"]["kept"] == {"source_frames": 120, "fraction": 33 / 120}
