"""The AVT-h student end to end on a synthetic store: data windows and teacher targets,
batch loading, training with and without distillation, exact resume, DDP, prediction
groups and the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, build_store, synthetic_annotations
from kdstore.errors import ConfigError, DataError, MissingError, StoreFormatError
from kdstore.store import Store
from kdstore.synthetic import NOUNS, VERBS, SyntheticConfig
from kdstore.predictions import TeacherTargets
from trainers.student.batch import Batch
from trainers.student.config import preset
from trainers.student.data import BatchLoader, StudentData, epoch_order

# 48 videos of 2 recipes: ~880 segments over 41 actions, enough for a tiny student to learn.
DATA = SyntheticConfig(n_videos=48, n_recipes=2)
DIM = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**overrides):
    """A tiny student that learns the synthetic store in a few epochs on CPU."""
    base = dict(num_frames=4, n_layer=1, n_head=2, inter_dim=64, epochs=6, batch_size=16, optimizer="adam",
                lr=3e-3, dropout=0.1, distill=0.1, temperature=2.0, topk=10)
    return preset("egtea", **{**base, **overrides})


def oracle_logits(segments, num_actions: int, seed: int = 0) -> np.ndarray:
    """A noisy oracle teacher: 4 on the true action plus unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(num_actions, dtype=np.float32)[segments.action]
    return onehot * 4 + rng.normal(size=onehot.shape).astype(np.float32)


@pytest.fixture(scope="module")
def kd(tmp_path_factory) -> SimpleNamespace:
    """A store with `video/feat` (D=32 fp16 at 2 fps), teacher `oracle` (some UIDs absent)
    and teacher `all` (every UID)."""
    root = tmp_path_factory.mktemp("student")
    ann, classes, segments = synthetic_annotations(root / "ann", DATA)
    path = root / "store.zarr"
    store = build_store(path, classes, segments, features=(("feat", DIM, "float16"),), teachers=(), rate=2.0)
    logits = oracle_logits(segments, classes.num_actions)
    present = np.random.default_rng(1).random(len(segments)) < 0.8
    store.write_predictions("oracle", segments.uid[present], logits[present], topk=10)
    store.write_predictions("all", segments.uid, logits, topk=10)
    return SimpleNamespace(path=path, root=root, ann=ann, classes=classes, segments=segments,
                           store=Store.open(path), absent=set(segments.uid[~present].tolist()))


def copy_store(kd, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(kd.path, dst)
    return dst


# --- data: windows ----------------------------------------------------------------------


@pytest.mark.parametrize("num_frames,fps,tau_a", [(5, 1.0, 0.5), (6, 2.0, 1.0)])
def test_windows_match_brute_force(kd, num_frames, fps, tau_a):
    cfg = small_cfg(num_frames=num_frames, fps=fps, tau_a=tau_a)
    data = StudentData(kd.store, "feat", "training1", cfg)
    fs, seg = kd.store.video("feat"), kd.segments
    assert data.frame_idx.shape == (len(data), num_frames)
    padded = 0
    for i, r in enumerate(data.rows):
        vi = fs.videos.index(seg.videos[seg.video[r]])
        lo, hi = int(fs.offsets[vi]), int(fs.offsets[vi + 1])
        ts = fs.timestamps[lo:hi]
        end = seg.start_frame[r] / seg.fps - tau_a  # the window's last frame is at or before this
        expect = []
        for j in range(num_frames):
            t = end + (j - (num_frames - 1)) / fps
            before = np.flatnonzero(ts <= t)
            expect.append(lo + (before[-1] if len(before) else 0))  # before the video: its first frame
            padded += not len(before)
        assert data.frame_idx[i].tolist() == expect, f"UID {seg.uid[r]}"
        last = data.frame_idx[i, -1] - lo
        assert ts[last] <= end + 1e-9 and (last == hi - lo - 1 or ts[last + 1] > end)
    assert padded > 0, "no window starts before its video: the padding case is untested"
    # a batch is the gather of those frames, as float32
    ids = np.array([3, 0, len(data) - 1, 3])
    b = data.batch(ids)
    assert b.frames.dtype == torch.float32 and b.frames.shape == (4, num_frames, DIM)
    np.testing.assert_array_equal(b.frames.numpy(), np.asarray(fs.features)[data.frame_idx[ids]].astype(np.float32))
    np.testing.assert_array_equal(b.uids.numpy(), seg.uid[data.rows[ids]])
    np.testing.assert_array_equal(b.action.numpy(), seg.action[data.rows[ids]])
    np.testing.assert_array_equal(b.verb.numpy(), seg.verb[data.rows[ids]])
    np.testing.assert_array_equal(b.noun.numpy(), seg.noun[data.rows[ids]])
    assert b.action.dtype == b.verb.dtype == b.noun.dtype == torch.long
    assert not b.teacher_mask.any() and b.teacher_logits is None and b.teacher_topk is None


def test_past_labels_are_the_actions_under_each_frame(kd):
    """AVT's per-frame past targets (datasets/base_video_dataset.py _get_vidseg_labels): for the
    time of each frame read, the action of the split's segment in that video covering it
    (orig_start <= t <= orig_end), among the segments AVT keeps (window end >= 1/30 s);
    -1 where none does. The time is the stored timestamp of the frame read."""
    cfg = small_cfg(num_frames=6, fps=2.0, tau_a=1.0)
    data = StudentData(kd.store, "feat", "training1", cfg)
    fs, seg = kd.store.video("feat"), kd.segments
    kept = [r for r in data.rows if seg.start_frame[r] / seg.fps - cfg.tau_a >= 1 / 30]
    covered = 0
    for i, r in enumerate(data.rows):
        for j, t in enumerate(fs.timestamps[data.frame_idx[i]]):
            m = [q for q in kept if seg.video[q] == seg.video[r]
                 and seg.start_frame[q] / seg.fps <= t <= seg.end_frame[q] / seg.fps]
            half = [abs(t - (seg.end_frame[q] - seg.start_frame[q]) / seg.fps / 2) for q in m]
            assert data.past_action[i, j] == (seg.action[m[int(np.argmin(half))]] if m else -1), f"UID {seg.uid[r]}"
            covered += bool(m)
    assert 0 < covered < data.past_action.size  # both cases occur
    np.testing.assert_array_equal(data.batch(np.array([2, 0])).past_action.numpy(), data.past_action[[2, 0]])
    # only the training losses read them
    assert StudentData(kd.store, "feat", "training1", small_cfg(past_cls=0.0)).past_action is None
    assert StudentData(kd.store, "feat", "training1", small_cfg(past_frame_labels=False)).past_action is None


# --- data: teacher targets --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "topk", "topk_lse"])
def test_teacher_fields_equal_stored(kd, mode):
    cfg = small_cfg(distill_mode=mode, topk=5, temperature=10.0)
    data = StudentData(kd.store, "feat", "training1", cfg, teacher="oracle")
    pred = kd.store.group("oracle")
    ids = np.random.default_rng(0).permutation(len(data))
    b = data.batch(ids)
    prow = pred.row_of_segment[data.rows[ids]]
    present = prow >= 0
    assert 0 < present.sum() < len(ids)  # both cases occur
    np.testing.assert_array_equal(b.teacher_mask.numpy(), present)
    assert set(b.uids.numpy()[~present].tolist()) <= kd.absent
    p = prow[present]
    fields = {"full": {"teacher_logits"}, "topk": {"teacher_topk", "teacher_idx"},
              "topk_lse": {"teacher_topk", "teacher_idx", "teacher_lse"}}[mode]
    for name in ("teacher_logits", "teacher_topk", "teacher_idx", "teacher_lse"):
        assert (getattr(b, name) is not None) == (name in fields), name
    if mode == "full":
        assert b.teacher_logits.shape == (len(ids), kd.classes.num_actions)
        np.testing.assert_array_equal(b.teacher_logits.numpy()[present], np.asarray(pred.logits)[p].astype(np.float32))
        return
    g = TeacherTargets(pred, ("topk_values", "topk_indices", "lse"), temperature=10.0).gather(data.rows[ids])
    np.testing.assert_array_equal(g["present"], present)
    assert b.teacher_topk.dtype == torch.float32 and b.teacher_idx.dtype == torch.long
    assert b.teacher_topk.shape == b.teacher_idx.shape == (len(ids), 5)
    np.testing.assert_array_equal(b.teacher_topk.numpy()[present], np.asarray(pred.topk_values)[p, :5])
    np.testing.assert_array_equal(b.teacher_idx.numpy()[present], np.asarray(pred.topk_indices)[p, :5])
    np.testing.assert_array_equal(b.teacher_topk.numpy()[present], g["topk_values"][present, :5])
    np.testing.assert_array_equal(b.teacher_idx.numpy()[present], g["topk_indices"][present, :5])
    # the stored top-5 are the true top-5 of the stored logits
    assert (b.teacher_idx.numpy()[present, 0] == np.asarray(pred.logits)[p].argmax(1)).all()
    if mode == "topk_lse":
        np.testing.assert_array_equal(b.teacher_lse.numpy()[present], np.asarray(pred.lse)[p, pred.lse_column(10.0)])
        np.testing.assert_array_equal(b.teacher_lse.numpy()[present], g["lse"][present])


@pytest.mark.parametrize("mode", ["full", "topk", "topk_lse"])
def test_absent_teacher_rows_are_never_targets(kd, mode):
    """Whatever an absent row's teacher fields hold, the distillation loss is unchanged."""
    from trainers.student.losses import student_losses

    cfg = small_cfg(distill_mode=mode, topk=5, temperature=10.0, past_cls=0.0)
    data = StudentData(kd.store, "feat", "training1", cfg, teacher="oracle")
    b = data.batch(np.arange(64))
    absent = ~b.teacher_mask
    assert absent.any()
    torch.manual_seed(0)
    out = {"logits": torch.randn(64, kd.classes.num_actions), "pred_feats": torch.randn(64, 4, DIM)}
    ref = student_losses(out, b, cfg)["distill"]
    garbage = Batch(**{**b.__dict__})
    for name in ("teacher_logits", "teacher_topk", "teacher_lse"):
        t = getattr(b, name)
        if t is not None:
            t = t.clone()
            t[absent] = float("nan")
            setattr(garbage, name, t)
    assert torch.equal(student_losses(out, garbage, cfg)["distill"], ref)
    # by hand for full mode: the mean KL over the present rows x classes only
    if mode == "full":
        keep = b.teacher_mask
        lp = torch.log_softmax(b.teacher_logits[keep] / 10.0, -1)
        lq = torch.log_softmax(out["logits"][keep] / 10.0, -1)
        kl = (lp.exp() * (lp - lq)).mean() * cfg.distill * 100.0
        torch.testing.assert_close(ref, kl)


@pytest.mark.parametrize("mode", ["full", "topk_lse"])
def test_empty_teacher_group_masks_every_row(kd, tmp_path, mode):
    dst = copy_store(kd, tmp_path)
    store = Store.open(dst)
    store.write_predictions("empty", np.zeros(0, np.int64), np.zeros((0, kd.classes.num_actions), np.float32), topk=10)
    cfg = small_cfg(distill_mode=mode, temperature=10.0)
    b = StudentData(store, "feat", "training1", cfg, teacher="empty").batch(np.arange(20))
    assert not b.teacher_mask.any()
    from trainers.student.losses import student_losses

    out = {"logits": torch.randn(20, kd.classes.num_actions, requires_grad=True), "pred_feats": torch.randn(20, 4, DIM),
           "past_logits": torch.randn(20, 4, kd.classes.num_actions)}
    distill = student_losses(out, b, cfg)["distill"]
    assert float(distill.detach()) == 0.0
    distill.backward()
    assert not out["logits"].grad.any()


def test_video_without_features_names_the_uid(tmp_path):
    _, classes, segments = synthetic_annotations(tmp_path / "ann")
    store = Store.create(tmp_path / "s.zarr", classes, segments)
    rows = segments.rows_in("training1")
    missing = segments.videos[segments.video[rows[len(rows) // 2]]]
    from kdstore.synthetic import synthetic_features

    w = store.video_writer("feat", DIM, frame_rate=2.0)
    for video, (f, t) in synthetic_features(classes, segments, dim=DIM, rate=2.0).items():
        if video != missing:
            w.put(video, f, t)
    w.commit()
    first = segments.uid[rows[segments.video[rows] == segments.videos.index(missing)][0]]
    with pytest.raises(MissingError, match=rf"UID {first}\b.*{re.escape(missing)}"):
        StudentData(store, "feat", "training1", small_cfg())


# --- data: loading ----------------------------------------------------------------------


def test_epoch_order_is_deterministic():
    a = epoch_order(100, seed=3, epoch=2, shuffle=True)
    np.testing.assert_array_equal(a, epoch_order(100, seed=3, epoch=2, shuffle=True))
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=3, shuffle=True))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=2, shuffle=True))
    np.testing.assert_array_equal(epoch_order(100, seed=3, epoch=2, shuffle=False), np.arange(100))


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_loader_yields_every_sample_once(kd, drop_last):
    data = StudentData(kd.store, "feat", "training1", small_cfg(distill_mode="topk"), teacher="oracle")
    order = epoch_order(len(data), seed=0, epoch=0, shuffle=True)
    bs = 50
    assert len(data) % bs  # a last, short batch exists
    loader = BatchLoader(data, order, bs, drop_last=drop_last, prefetch=2)
    batches = list(loader)
    assert len(batches) == len(loader) == (len(data) // bs if drop_last else -(-len(data) // bs))
    uids = np.concatenate([b.uids.numpy() for b in batches])
    n = len(data) // bs * bs if drop_last else len(data)
    np.testing.assert_array_equal(uids, data.uid[order[:n]])  # in order, each once
    assert len(np.unique(uids)) == n
    assert all(len(b.uids) == bs for b in batches[:-1])
    assert list(loader)[0].uids.tolist() == batches[0].uids.tolist()  # iterable again


class _Failing:
    """StudentData stand-in whose `fail_at`-th batch raises."""

    def __init__(self, fail_at: int):
        self.calls, self.fail_at = 0, fail_at

    def batch(self, ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise DataError(f"UID {int(ids[0])}: broken batch")
        return ids


def test_batch_loader_surfaces_worker_exceptions():
    seen = []
    with pytest.raises(DataError, match="UID 6: broken batch"):
        for ids in BatchLoader(_Failing(fail_at=3), np.arange(20), 3):
            seen.append(ids.tolist())
    assert seen == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("chunks", [3, 5, 6, 12])
def test_batch_loader_consumer_exception_does_not_hang(chunks):
    """The consumer fails while the worker blocks on a full queue (also on its final put)."""
    result = {}

    def consume():
        try:
            for _ in BatchLoader(_Failing(fail_at=-1), np.arange(chunks * 2), 2, prefetch=4):
                time.sleep(0.3)  # the worker fills the queue meanwhile
                raise ValueError("step failed")
        except ValueError as e:
            result["error"] = e

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "BatchLoader hung after the consumer raised"
    assert "error" in result


# --- training ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "full", "topk", "topk_lse"])
def test_tiny_student_beats_chance(kd, tmp_path, mode):
    from trainers.student.train import read_log, train_student

    metrics = train_student(Store.open(kd.path), "feat", tmp_path / "run", small_cfg(distill_mode=mode), teacher="oracle",
                            progress=False)
    chance = 100.0 / kd.classes.num_actions
    assert metrics["top1"] > 4 * chance, (metrics, chance)
    assert {"top1", "top5", "mean_top1_recall", "verb_top1", "noun_top1"} <= set(metrics)
    log = read_log(tmp_path / "run")
    assert [e["epoch"] for e in log] == list(range(1, 7))
    assert log[-1]["eval_top1"] == metrics["top1"]
    assert log[-1]["train_total"] < log[0]["train_total"]
    assert ("train_distill" in log[0]) == (mode != "none")
    assert all(np.isfinite(e["train_total"]) for e in log)
    state = json.loads((tmp_path / "run" / "last.json").read_text())
    assert state["teacher"] == (None if mode == "none" else "oracle") and state["epoch"] == 6


def test_teacher_none_trains_the_baseline(kd, tmp_path):
    """teacher=None with a distilling config trains without distillation instead of failing."""
    from trainers.student.train import read_log, train_student

    train_student(Store.open(kd.path), "feat", tmp_path / "run", small_cfg(distill_mode="full", epochs=2), teacher=None,
                  eval_split=None, progress=False)
    log = read_log(tmp_path / "run")
    assert len(log) == 2 and "train_distill" not in log[0] and "eval_top1" not in log[0]


def test_resume_is_exact(kd, tmp_path):
    from trainers.student.train import CKPT, STATE, read_log, train_student

    # dropout on and top-K distillation with absent rows: the RNG state and masks matter
    cfg = small_cfg(distill_mode="topk", epochs=4, dropout=0.3, block_dropout=0.1)
    a, b = tmp_path / "a", tmp_path / "b"
    ma = train_student(Store.open(kd.path), "feat", a, cfg, teacher="oracle", progress=False)
    train_student(Store.open(kd.path), "feat", b, cfg, teacher="oracle", progress=False, stop_after_epochs=2)
    assert [e["epoch"] for e in read_log(b)] == [1, 2]
    mb = train_student(Store.open(kd.path), "feat", b, cfg, teacher="oracle", progress=False)
    assert ma == mb
    la, lb = read_log(a), read_log(b)
    assert len(la) == len(lb) == 4
    for ea, eb in zip(la, lb):
        assert {k: v for k, v in ea.items() if k.startswith(("train_", "eval_", "lr", "step", "epoch"))} == \
               {k: v for k, v in eb.items() if k.startswith(("train_", "eval_", "lr", "step", "epoch"))}
    ta, tb = load_file(a / CKPT), load_file(b / CKPT)
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta) and "rng.torch" in ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert json.loads((a / STATE).read_text()) == json.loads((b / STATE).read_text())
    # a finished run called again trains nothing and returns its metrics
    assert train_student(Store.open(kd.path), "feat", b, cfg, teacher="oracle", progress=False) == ma
    assert len(read_log(b)) == 4


def test_resume_with_another_config_is_refused(kd, tmp_path):
    from trainers.student.train import train_student

    run = tmp_path / "run"
    cfg = small_cfg(epochs=2, distill_mode="none")
    train_student(Store.open(kd.path), "feat", run, cfg, eval_split=None, progress=False, stop_after_epochs=1)
    with pytest.raises(ConfigError, match="lr"):
        train_student(Store.open(kd.path), "feat", run, small_cfg(epochs=2, distill_mode="none", lr=1e-2), eval_split=None,
                      progress=False)
    with pytest.raises(ConfigError, match="teacher"):
        train_student(Store.open(kd.path), "feat", run, small_cfg(epochs=2, distill_mode="full"), teacher="oracle",
                      eval_split=None, progress=False)


def test_batch_larger_than_split_is_refused(kd, tmp_path):
    from trainers.student.train import train_student

    with pytest.raises(ConfigError, match="fewer than one global batch"):
        train_student(Store.open(kd.path), "feat", tmp_path / "run", small_cfg(batch_size=100000, distill_mode="none"),
                      progress=False)


def test_feature_dimension_mismatch(kd, tmp_path):
    from trainers.student.train import predict_into_store, train_student

    run = tmp_path / "run"
    train_student(Store.open(kd.path), "feat", run, small_cfg(epochs=1, distill_mode="none"), eval_split=None, progress=False)
    other = copy_store(kd, tmp_path)
    store = Store.open(other)
    store.backend.delete_group("video/feat")
    w = store.video_writer("feat", 16, frame_rate=2.0)
    from kdstore.synthetic import synthetic_features

    for video, (f, t) in synthetic_features(kd.classes, kd.segments, dim=16, rate=2.0).items():
        w.put(video, f, t)
    w.commit()
    with pytest.raises(ConfigError, match="dimension 16.*32"):
        predict_into_store(Store.open(other), run, "student")
    with pytest.raises(ConfigError, match="feat_dim"):  # resuming on it is refused too
        train_student(Store.open(other), "feat", run, small_cfg(epochs=2, distill_mode="none"), eval_split=None, progress=False)


def test_teacher_with_another_class_count(kd, tmp_path):
    """A group copied from a store with the same segments but one more action."""
    from trainers.student.train import train_student

    ann = tmp_path / "ann"
    shutil.copytree(kd.ann, ann)
    used = {tuple(map(int, line.split(",")[1].strip().split("_")))
            for line in (ann / "actions.csv").read_text().splitlines()}
    v, n = next((v, n) for v in range(len(VERBS)) for n in range(len(NOUNS)) if (v, n) not in used)
    with open(ann / "actions.csv", "a") as f:
        f.write(f"{kd.classes.num_actions}, {v}_{n}, {VERBS[v]}_{NOUNS[n]}\n")
    from kdstore.rulstm import load_annotations

    classes, segments = load_annotations(ann, fps=24.0)
    assert classes.num_actions == kd.classes.num_actions + 1
    src = Store.create(tmp_path / "other.zarr", classes, segments)
    src.write_predictions("wide", segments.uid, oracle_logits(segments, classes.num_actions), topk=10)
    dst = copy_store(kd, tmp_path)
    shutil.copytree(tmp_path / "other.zarr" / "teacher" / "wide", dst / "teacher" / "wide")
    pattern = rf"{classes.num_actions} classes.*{kd.classes.num_actions}"
    for mode in ("full", "topk"):
        with pytest.raises(ConfigError, match=pattern):
            StudentData(Store.open(dst), "feat", "training1", small_cfg(distill_mode=mode), teacher="wide")
    with pytest.raises(ConfigError, match=pattern):
        train_student(Store.open(dst), "feat", tmp_path / "run", small_cfg(), teacher="wide", progress=False)


def test_teacher_of_other_segments(kd, tmp_path):
    _, classes, segments = synthetic_annotations(tmp_path / "ann", SyntheticConfig(n_videos=12, seed=5))
    src = Store.create(tmp_path / "other.zarr", classes, segments)
    assert src.manifest["segments_sha256"] != kd.store.manifest["segments_sha256"]
    src.write_predictions("foreign", segments.uid, oracle_logits(segments, classes.num_actions), topk=10)
    dst = copy_store(kd, tmp_path)
    shutil.copytree(tmp_path / "other.zarr" / "teacher" / "foreign", dst / "teacher" / "foreign")
    with pytest.raises(StoreFormatError, match="other segments"):
        StudentData(Store.open(dst), "feat", "training1", small_cfg(), teacher="foreign")


def test_nan_frame_names_the_uid(kd, tmp_path):
    """A NaN written into the stored feature bytes is reported with a UID whose window reads it."""
    from trainers.student.train import train_student

    dst = copy_store(kd, tmp_path)
    cfg = small_cfg(epochs=1, distill_mode="none")
    data = StudentData(kd.store, "feat", "training1", cfg)
    frame = int(data.frame_idx[len(data) // 2, -1])
    fs = kd.store.video("feat")
    chunk = dst / "video" / "feat" / "features" / "c" / "0" / "0"
    mm = np.memmap(chunk, dtype=np.float16, mode="r+", shape=(len(fs), fs.dim))
    mm[frame, 3] = np.nan
    mm.flush()
    del mm
    readers = set(data.uid[(data.frame_idx == frame).any(axis=1)].tolist())
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"UID \d+: frames contain NaN") as e:
        train_student(Store.open(dst), "feat", tmp_path / "run", cfg, eval_split=None, progress=False)
    assert int(re.search(r"UID (\d+)", str(e.value)).group(1)) in readers
    assert time.perf_counter() - t0 < 30  # and the loader's thread did not hang the exit


def test_divergence_is_an_error(kd, tmp_path):
    """A loss that turns NaN/inf stops training (no NaN checkpoint or log line)."""
    from trainers.student.train import STATE, read_log, train_student

    run = tmp_path / "run"
    with pytest.raises(DataError, match="diverged"):
        train_student(Store.open(kd.path), "feat", run, small_cfg(epochs=2, distill_mode="none", optimizer="sgd", lr=1e3),
                      eval_split=None, progress=False)
    assert not (run / STATE).exists() and read_log(run) == []


# --- predictions ------------------------------------------------------------------------


def test_predict_into_store(kd, tmp_path):
    from kdstore.evaluation import evaluate_group
    from kdstore.metrics import compute_metrics
    from trainers.student.train import load_model, predict_into_store, predict_logits, train_student

    dst = copy_store(kd, tmp_path)
    run = tmp_path / "run"
    train_student(Store.open(dst), "feat", run, small_cfg(epochs=2, distill_mode="full"), teacher="oracle", progress=False)
    metrics = predict_into_store(Store.open(dst), run, "student")
    store = Store.open(dst)
    assert "student" in store.groups("student") and "student" not in store.groups("teacher")
    group = store.group("student")
    assert group.kind == "student" and len(group) == len(store.segments)
    assert set(group.metrics) == {"training1", "validation1"} and group.metrics == json.loads(json.dumps(metrics))
    assert group.metrics == {s: evaluate_group(store, "student", s) for s in ("training1", "validation1")}
    assert group.config["run_dir"] == str(run) and len(group.attrs["log"]) == 2
    model, cfg, _ = load_model(run)
    data = StudentData(store, "feat", "validation1", cfg)
    logits = predict_logits(model, data)
    np.testing.assert_allclose(np.asarray(group.logits)[group.row_of_segment[data.rows]], logits, atol=2e-2, rtol=2e-3)
    assert metrics["validation1"]["top1"] == compute_metrics(logits, data.action, store.classes)["top1"]
    # the eval metrics of training are those of the validation split
    assert json.loads((run / "last.json").read_text())["metrics"]["top1"] == metrics["validation1"]["top1"]
    uid = int(data.uid[0])
    r = group.predict(uid, k=3)
    assert r["present"] and r["kind"] == "student" and len(r["top"]) == 3 and r["splits"] == ["validation1"]
    assert r["top"][0]["action"] == int(logits[0].argmax())
    with pytest.raises(Exception, match="exists"):
        predict_into_store(Store.open(dst), run, "student")
    predict_into_store(Store.open(dst), run, "student", splits=["validation1"], overwrite=True)
    assert len(Store.open(dst).group("student")) == len(data)


# --- DDP --------------------------------------------------------------------------------

_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from trainers.student.config import StudentConfig
from kdstore.store import Store
from trainers.student.train import train_student
cfg = StudentConfig.from_dict(json.loads(sys.argv[3]))
train_student(Store.open(sys.argv[1]), "feat", sys.argv[2], cfg, teacher="all", eval_split="validation1", progress=False,
              device="cpu")  # gloo on CPU also on a machine with a GPU: the comparison is exact there
assert not torch.distributed.is_initialized()  # train_student ends the process group it started
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(kd, tmp_path):
    from trainers.student.train import CKPT, read_log, train_student

    base = dict(epochs=3, dropout=0.0, block_dropout=0.0, distill_mode="full", optimizer="sgd", lr=0.05,
                distill=0.1)
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), str(kd.path),
           str(tmp_path / "ddp"), json.dumps(small_cfg(batch_size=16, **base).to_dict())]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    train_student(Store.open(kd.path), "feat", tmp_path / "one", small_cfg(batch_size=32, **base), teacher="all",
                  progress=False, device="cpu")
    ld, lo = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert len(ld) == len(lo) == 3
    for ed, eo in zip(ld, lo):
        assert ed["step"] == eo["step"]
        for k in ("train_total", "train_ce", "train_feat", "train_distill", "train_past_cls"):
            assert ed[k] == pytest.approx(eo[k], rel=1e-4), k
        assert ed["eval_top1"] == pytest.approx(eo["eval_top1"], abs=1.5)
    td, to = load_file(tmp_path / "ddp" / CKPT), load_file(tmp_path / "one" / CKPT)
    for k in (k for k in to if k.startswith("model.")):
        torch.testing.assert_close(td[k], to[k], atol=1e-4, rtol=1e-3, msg=k)


def test_ddp_rank_without_gpu_is_refused(kd, tmp_path, monkeypatch):
    """A torchrun rank whose LOCAL_RANK has no GPU: a ConfigError before any process group starts."""
    from trainers.student.train import train_student

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="LOCAL_RANK 1 has no GPU: this node has 1"):
        train_student(Store.open(kd.path), "feat", tmp_path / "run", small_cfg(), teacher=None, progress=False, device="cuda")
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


# --- CLI --------------------------------------------------------------------------------


def test_cli_train_and_predict(kd, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    dst = copy_store(kd, tmp_path)
    run = tmp_path / "run"
    sets = ["epochs=2", "inter_dim=32", "n_head=2", "n_layer=1", "num_frames=4", "batch_size=32", "topk=10",
            "optimizer=adam", "lr=0.003", "dropout=0.1"]
    args = ["train-student", str(dst), "-f", "feat", "--run", str(run), "-t", "oracle", "--preset", "egtea"]
    args += [a for s in sets for a in ("--set", s)]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    state = json.loads((run / "last.json").read_text())
    assert state["epoch"] == 2 and state["config"]["inter_dim"] == 32 and state["teacher"] == "oracle"
    assert state["config"]["optimizer"] == "adam" and state["config"]["distill_mode"] == "full"
    r = runner.invoke(app, ["predict", str(dst), "--run", str(run), "--name", "cli-student"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    group = Store.open(dst).group("cli-student")
    assert group.kind == "student" and set(group.metrics) == {"training1", "validation1"}
    # distilling without a teacher is a usage error
    r = runner.invoke(app, ["train-student", str(dst), "-f", "feat", "--run", str(tmp_path / "r2")])
    assert r.exit_code != 0 and "--teacher" in r.output + str(r.exception)


def test_cli_feature_distillation(kd, tmp_path):
    """Feature distillation from the CLI: the teacher's [CLS] features (width 12, projected from the
    student's 32), the terms in the log, the projection saved with the model and used by predict."""
    from typer.testing import CliRunner

    from cli import app
    from trainers.student.train import load_model, read_log

    dst = copy_store(kd, tmp_path)
    store = Store.open(dst)
    rng = np.random.default_rng(3)
    feats = np.eye(12, dtype=np.float32)[kd.segments.action % 12] + 0.1 * rng.normal(size=(len(kd.segments), 12))
    store.write_predictions("lm", kd.segments.uid, oracle_logits(kd.segments, kd.classes.num_actions),
                            features=feats, topk=10)
    sets = ["epochs=2", "inter_dim=32", "n_head=2", "n_layer=1", "num_frames=4", "batch_size=32", "optimizer=adam",
            "lr=0.003", "distill_feat=1.0", "distill_feat_mse=0.5"]
    run = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["train-student", str(dst), "-f", "feat", "--run", str(run), "-t", "lm",
                            *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 0, r.output + repr(r.exception)
    log = read_log(run)
    assert {"train_distill", "train_distill_feat", "train_distill_feat_mse"} <= set(log[0])
    assert 0 < log[0]["train_distill_feat"] <= 2.0
    model, cfg, state = load_model(run)
    assert state["teacher_dim"] == 12 and model.teacher_proj.weight.shape == (12, DIM)
    r = runner.invoke(app, ["predict", str(dst), "--run", str(run), "--name", "feat-student"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert Store.open(dst).group("feat-student").config["teacher"] == "lm"
    # --no-distill turns the feature terms off too: no teacher needed, none read
    r = runner.invoke(app, ["train-student", str(dst), "-f", "feat", "--run", str(tmp_path / "plain"), "--no-distill",
                            *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "train_distill_feat" not in read_log(tmp_path / "plain")[0]
    assert json.loads((tmp_path / "plain" / "last.json").read_text())["teacher_dim"] is None
    # KD on the logits of a teacher whose features are stored: no projection without a feature term
    r = runner.invoke(app, ["train-student", str(dst), "-f", "feat", "--run", str(tmp_path / "kd"), "-t", "lm",
                            *[a for s in sets[:7] for a in ("--set", s)], "--set", "epochs=1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    model, _, state = load_model(tmp_path / "kd")
    assert state["teacher_dim"] is None and model.teacher_proj is None and "train_distill" in read_log(tmp_path / "kd")[0]
