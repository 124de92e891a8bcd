"""The teacher-target reader (kdstore.predictions): the one gather of prediction rows behind the
student's batches, evaluate, report, the demo and the torch.utils.data interface."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, SUFFIXES, build_store, synthetic_annotations
from kdstore.errors import ConfigError, MissingError
from kdstore.evaluation import evaluate_group, metrics_table
from kdstore.metrics import compute_metrics
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig
from kdstore.predictions import FIELDS, HEADS, TeacherTargets, present_logits, present_scores
from trainers.student.config import preset
from trainers.student.data import StudentData, WindowBatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=SUFFIXES)
def ts(request, tmp_path_factory) -> SimpleNamespace:
    """A store whose `teacher` group predicts training1 only (validation1 absent), with features."""
    root = tmp_path_factory.mktemp("targets")
    _, classes, segments = synthetic_annotations(root / "ann", SyntheticConfig(n_videos=16))
    store = build_store(root / f"store{request.param}", classes, segments, teacher_hidden=8)
    return SimpleNamespace(store=store, seg=segments, classes=classes, group=store.group("teacher"))


def stored(group, uid: int, field: str, lse_col: int = 0, k: int | None = None) -> np.ndarray:
    """Brute force: the stored row of ``uid`` (by a scan of the group's UIDs)."""
    row = int(np.flatnonzero(np.asarray(group.uids) == uid)[0])
    a = np.asarray(getattr(group, field))
    return a[row, lse_col] if field == "lse" else a[row, :k] if field.startswith("topk") else a[row]


def test_gather_returns_stored_rows_and_zeroes_absent_ones(ts):
    rows = np.r_[ts.seg.rows_in("validation1")[:5], ts.seg.rows_in("training1")[:7], 3, 3]
    fields = {f: t for f, t in FIELDS.items() if f not in HEADS}  # the group has no verb/noun heads
    r = TeacherTargets(ts.group, fields, temperature=2.0, k=4)
    g = r.gather(rows)
    present = np.isin(ts.seg.uid[rows], ts.group.uids)
    np.testing.assert_array_equal(g["present"], present)
    assert present[5:].all() and not present[:5].all()
    col = ts.group.lse_column(2.0)
    for field, dtype in fields.items():
        assert g[field].dtype == dtype and len(g[field]) == len(rows)
        assert not g[field][~present].any()
        for i in np.flatnonzero(present):
            np.testing.assert_array_equal(g[field][i], stored(ts.group, ts.seg.uid[rows[i]], field, col, 4).astype(dtype))
    assert g["topk_values"].shape[1] == r.width("topk_values") == 4
    assert r.width("features") == 8 and r.width("logits") == ts.classes.num_actions and r.width("lse") == 0


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_gather_round_trip(ts, data):
    """Any batch of segment rows (repeats, any order) gathers what was written for its UIDs."""
    n = len(ts.seg)
    rows = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=40)), dtype=np.int64)
    fields = data.draw(st.lists(st.sampled_from(["logits", "topk_values", "topk_indices", "features"]),
                                min_size=1, unique=True))
    g = TeacherTargets(ts.group, fields).gather(rows)
    for i, uid in enumerate(ts.seg.uid[rows]):
        assert g["present"][i] == (uid in set(ts.group.uids.tolist()))
        for f in fields:
            want = stored(ts.group, uid, f).astype(FIELDS[f]) if g["present"][i] else 0
            np.testing.assert_array_equal(g[f][i], want)


def test_present_scores_carry_a_groups_own_heads(ts):
    """Verb/noun head logits come with the action logits where a group stores them; None where not."""
    rng = np.random.default_rng(0)
    rows = ts.seg.rows_in("training1")[:9]
    uids, a, v, n = ts.seg.uid[rows], ts.classes.num_actions, ts.classes.num_verbs, ts.classes.num_nouns
    written = {"logits": rng.normal(size=(9, a)), "verb_logits": rng.normal(size=(9, v)), "noun_logits": rng.normal(size=(9, n))}
    group = ts.store.write_predictions("with-heads", uids, written["logits"], verb_logits=written["verb_logits"],
                                       noun_logits=written["noun_logits"], topk=5, overwrite=True)
    asked = np.r_[ts.seg.rows_in("validation1")[:3], rows[::-1]]
    scores, kept = present_scores(group, asked)
    np.testing.assert_array_equal(kept, rows[::-1])
    for field, want in written.items():
        np.testing.assert_allclose(scores[field], want[::-1].astype(np.float16).astype(np.float32), rtol=1e-3)
    plain, _ = present_scores(ts.group, asked)
    assert plain["verb_logits"] is None and plain["noun_logits"] is None


def test_reader_errors(ts, tmp_path):
    with pytest.raises(ConfigError, match="unknown field"):
        TeacherTargets(ts.group, ("logit",))
    with pytest.raises(ConfigError, match="needs a temperature"):
        TeacherTargets(ts.group, ("lse",))
    with pytest.raises(MissingError, match=r"T=3\.0"):
        TeacherTargets(ts.group, ("lse",), temperature=3.0)
    with pytest.raises(ConfigError, match="top-10, asked for top-11"):
        TeacherTargets(ts.group, ("topk_values",), k=11)
    path = tmp_path / f"copy{ts.store.path.suffix}"
    (shutil.copytree if ts.store.path.is_dir() else shutil.copy)(ts.store.path, path)
    store = Store.open(path)
    rows = ts.seg.rows_in("training1")
    store.write_predictions("nofeat", ts.seg.uid[rows], np.zeros((len(rows), ts.classes.num_actions), np.float32))
    with pytest.raises(MissingError, match="teacher/nofeat: stores no features"):
        TeacherTargets(store.group("nofeat"), ("logits", "features"))
    store.write_predictions("empty", np.zeros(0, np.int64), np.zeros((0, ts.classes.num_actions), np.float32))
    g = TeacherTargets(store.group("empty"), ("logits", "topk_indices")).gather(np.arange(5))
    assert not g["present"].any() and not g["logits"].any() and g["topk_indices"].shape == (5, store.group("empty").topk)


def test_absent_rows_never_count_in_metrics(ts):
    """evaluate, report and the demo (through metrics_table) score the rows a group predicts,
    never a stand-in row: indexing prediction rows with -1 would read the last UID's logits."""
    rows = np.r_[ts.seg.rows_in("training1")[:30], ts.seg.rows_in("validation1")[:20]]
    logits, kept = present_logits(ts.group, rows)
    prow = ts.group.row_of_segment[rows]
    np.testing.assert_array_equal(kept, rows[prow >= 0])
    np.testing.assert_array_equal(logits, np.asarray(ts.group.logits, np.float32)[prow[prow >= 0]])
    want = compute_metrics(logits, ts.seg.action[kept], ts.classes)
    wrong = compute_metrics(np.asarray(ts.group.logits, np.float32)[prow], ts.seg.action[rows], ts.classes)
    assert want != wrong
    # a split where the group predicts some rows only
    split_rows = ts.seg.rows_in("training1")
    m = evaluate_group(ts.store, "teacher", "training1")
    assert m["coverage"] == 100.0
    table = {r["name"]: r for r in metrics_table(ts.store, "training1")}
    assert table["teacher"]["n"] == len(split_rows)
    assert {k: m[k] for k in want} == {k: table["teacher"][k] for k in want}


def test_student_batches_take_one_gather_per_batch(ts, monkeypatch):
    cfg = preset("egtea", num_frames=3, distill_feat=1.0, topk=5, distill_mode="topk_lse", temperature=2.0)
    data = StudentData(ts.store, "feat", "training1", cfg, teacher="teacher")
    assert set(data.targets.fields) == {"topk_values", "topk_indices", "lse", "features"}
    assert data.teacher_dim == 8
    calls = []
    gather = TeacherTargets.gather
    monkeypatch.setattr(TeacherTargets, "gather", lambda self, rows: calls.append(len(rows)) or gather(self, rows))
    b = data.batch(np.arange(17))
    assert calls == [17]
    assert b.teacher_topk.shape == (17, 5) and b.teacher_idx.dtype == torch.long and b.teacher_lse.shape == (17,)
    assert b.teacher_features.shape == (17, 8) and b.teacher_logits is None and b.teacher_mask.all()
    only = StudentData(ts.store, "feat", "training1", cfg, teacher="teacher", fields=("logits",))
    assert only.targets.fields == ("logits",) and only.teacher_dim is None


@pytest.mark.parametrize(("world", "drop_last"), [(1, False), (1, True), (3, True)])
def test_window_batch_sampler(world, drop_last):
    n, bs = 53, 5
    parts = []
    for rank in range(world):
        s = WindowBatchSampler(n, bs, seed=4, drop_last=drop_last, rank=rank, world=world)
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == len(s) and all(len(b) == bs for b in batches[:-1])
        parts.append(batches)
    # rank r holds the r-th slice of every global batch; together: the epoch's order
    glob = np.concatenate([np.concatenate(step) for step in zip(*parts)])
    from trainers.student.data import epoch_order

    order = epoch_order(n, 4, 2, True)
    np.testing.assert_array_equal(glob, order[: len(glob)])
    assert len(glob) == (n if not drop_last else n // (bs * world) * bs * world)


def test_dataloader_example_in_the_docs_runs(ts):
    """docs/trainers.md's torch.utils.data example, run as written on a small store."""
    text = (ROOT / "docs" / "trainers.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)\n *```", text, re.S) if "WindowBatchSampler" in b)
    code = textwrap.dedent(code)
    code = code.replace('"egtea.zarr"', repr(str(ts.store.path))).replace('"tsn"', '"feat"').replace('"bert"', '"teacher"')
    ns: dict = {}
    exec(compile(code, "docs/trainers.md", "exec"), ns)
    b = ns["batch"]
    assert b.frames.shape[1:] == (10, 16) and b.teacher_logits.shape[1] == ts.classes.num_actions
    assert b.teacher_features.shape[1] == 8 and b.teacher_mask.all()
    assert ns["seen"] == len(ts.seg.rows_in("training1")) * 2  # every window once per epoch
