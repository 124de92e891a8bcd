"""The student's fast paths against the plain ones: device-resident data (the CPU standing in
for the device) against the memory-mapped batches, and the compiled step against eager."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import build_store, synthetic_annotations
from kdstore.errors import DataError
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig
from trainers.student.config import preset
from trainers.student.data import StudentData, epoch_order
from trainers.student.resident import ResidentData, resident_bytes, resident_on

pytestmark = pytest.mark.usefixtures("one_thread")
ALL_FIELDS = ("logits", "topk_values", "topk_indices", "lse", "features")


def small_cfg(**overrides):
    base = dict(num_frames=4, n_layer=1, n_head=2, inter_dim=64, epochs=2, batch_size=16, optimizer="adam",
                lr=3e-3, dropout=0.1, distill=0.1, temperature=2.0, topk=10)
    return preset("egtea", **{**base, **overrides})


@pytest.fixture(scope="module")
def st(tmp_path_factory) -> SimpleNamespace:
    """A store with fp16 and fp32 feature sets and a teacher `some` (features; ~20% UIDs absent)."""
    root = tmp_path_factory.mktemp("resident")
    _, classes, segments = synthetic_annotations(root / "ann", SyntheticConfig(n_videos=16))
    path = root / "store.zarr"
    store = build_store(path, classes, segments, features=(("feat", 24, "float16"), ("f32", 8, "float32")),
                        teachers=())
    rng = np.random.default_rng(3)
    present = rng.random(len(segments)) < 0.8
    logits = rng.normal(size=(len(segments), classes.num_actions)).astype(np.float32) * 3
    hidden = rng.normal(size=(len(segments), 6)).astype(np.float32)
    store.write_predictions("some", segments.uid[present], logits[present], features=hidden[present], topk=10)
    return SimpleNamespace(path=path, root=root, store=Store.open(path))


@pytest.mark.parametrize("features", ["feat", "f32"])
def test_resident_batches_equal_memmap_batches(st, features):
    """Every field of every batch, bit for bit and dtype for dtype, in an epoch's order with a
    last partial batch: the resident gathers on the device return what the memmap path reads."""
    cfg = small_cfg(temperature=10.0, topk=7)
    data = StudentData(st.store, features, "training1", cfg, teacher="some", fields=ALL_FIELDS)
    resident = ResidentData(data, "cpu")
    order = epoch_order(len(data), 0, 1, shuffle=True)
    got = list(resident.batches(order, 13))
    assert len(got) == -(-len(data) // 13) and len(list(resident.batches(order, 13, drop_last=True))) == len(data) // 13
    n_absent = 0
    for i, b in enumerate(got):
        want = data.batch(order[i * 13: (i + 1) * 13])
        n_absent += int((~want.teacher_mask).sum())
        for name, w in vars(want).items():
            g = getattr(b, name)
            assert w is not None and g.dtype == w.dtype and torch.equal(g, w), name
    assert n_absent > 0  # rows without a teacher occur
    # the resident tensors are what resident_bytes counts
    held = [resident.frames, resident.window, resident.action, resident.verb, resident.noun, resident.uids,
            resident.teacher_mask, resident.past_action, *resident.teacher.values()]
    assert resident_bytes(data) == sum(t.nbytes for t in held)
    assert len(resident.frames) == len(np.unique(data.frame_idx)) < len(st.store.video(features))


def test_resident_policy():
    data = SimpleNamespace()  # the CPU decisions read nothing of the data
    assert not resident_on(data, "cpu", "auto") and not resident_on(data, "cpu", "never")
    assert resident_on(data, "cpu", "always")


def test_preread_policy(st, monkeypatch):
    """auto reads the file first when the windows reach enough of it and it fits in half the
    available memory; always and never decide alone."""
    import trainers.student.data as d

    data = StudentData(st.store, "feat", "training1", small_cfg())
    reach = len(np.unique(data.frame_idx)) / len(data.features)
    assert d.available_memory() > 0
    assert d.preread_on(data, "always") and not d.preread_on(data, "never")
    monkeypatch.setattr(d, "available_memory", lambda: 10 * data.features.features.nbytes)
    monkeypatch.setattr(d, "PREREAD_REACH", reach * 1.01)
    assert not d.preread_on(data, "auto")
    monkeypatch.setattr(d, "PREREAD_REACH", reach * 0.99)
    assert d.preread_on(data, "auto")
    for avail in (lambda: data.features.features.nbytes, lambda: None):  # needs twice its size; unknown memory
        monkeypatch.setattr(d, "available_memory", avail)
        assert not d.preread_on(data, "auto") and d.preread_on(data, "always")


def _nan_copy(st, tmp_path, data) -> tuple:
    """A copy of the store with one NaN in a frame that a window of ``data`` reads; (path, its readers)."""
    dst = tmp_path / "copy.zarr"
    shutil.copytree(st.path, dst)
    frame = int(data.frame_idx[len(data) // 2, -1])
    fs = st.store.video("feat")
    mm = np.memmap(dst / "video" / "feat" / "features" / "c" / "0" / "0", dtype=np.float16, mode="r+",
                   shape=(len(fs), fs.dim))
    mm[frame, 3] = np.nan
    mm.flush()
    del mm
    return dst, set(data.uid[(data.frame_idx == frame).any(axis=1)].tolist())


@pytest.mark.parametrize("on_device", ["always", "never"])
def test_nan_frame_names_the_uid(st, tmp_path, on_device):
    """Resident data is checked once, when it is loaded; host batches in the loader's thread."""
    from trainers.student.train import STATE, train_student

    cfg = small_cfg(epochs=1, distill_mode="none", data_on_device=on_device)
    dst, readers = _nan_copy(st, tmp_path, StudentData(st.store, "feat", "training1", cfg))
    with pytest.raises(DataError, match=r"UID \d+: frames contain NaN") as e:
        train_student(Store.open(dst), "feat", tmp_path / "run", cfg, eval_split=None, progress=False)
    assert int(re.search(r"UID (\d+)", str(e.value)).group(1)) in readers
    assert not (tmp_path / "run" / STATE).exists()


def test_resident_nan_teacher_names_the_uid(st, tmp_path):
    data = StudentData(st.store, "feat", "training1", small_cfg(), teacher="some")
    row = int(np.flatnonzero(data.targets.row_of_segment[data.rows] >= 0)[5])
    data.targets._arrays["logits"] = np.array(data.targets._arrays["logits"])
    data.targets._arrays["logits"][data.targets.row_of_segment[data.rows[row]], 2] = np.inf
    with pytest.raises(DataError, match=rf"UID {data.uid[row]}: teacher_logits contain NaN/inf"):
        ResidentData(data, "cpu")


def test_trainer_resident_equals_host_and_resumes_across_them(st, tmp_path):
    """The trainer on resident data takes the steps it takes on host batches, bit for bit; a run
    may resume with the other data path (an execution field, not part of its identity), and
    reading the feature file first (preread) changes nothing either."""
    from trainers.student.train import CKPT, read_log, train_student

    def cfg(on_device):
        return small_cfg(distill_mode="topk_lse", temperature=10.0, data_on_device=on_device,
                         preread="always" if on_device == "always" else "never")

    train_student(Store.open(st.path), "feat", tmp_path / "a", cfg("always"), teacher="some", progress=False)
    train_student(Store.open(st.path), "feat", tmp_path / "b", cfg("never"), teacher="some", progress=False, stop_after_epochs=1)
    train_student(Store.open(st.path), "feat", tmp_path / "b", cfg("always"), teacher="some", progress=False)
    a, b = load_file(tmp_path / "a" / CKPT), load_file(tmp_path / "b" / CKPT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda log: [{k: v for k, v in e.items() if k not in ("seconds", "samples_per_s")} for e in log]  # noqa: E731
    assert drop(read_log(tmp_path / "a")) == drop(read_log(tmp_path / "b"))


def _steps(st, cfg, n: int, backend: str | None):
    """Losses [n, keys] and final parameters of ``n`` steps of a fresh model (eager when backend is None)."""
    from trainers.student.avt import AVTHead
    from trainers.student.step import TrainStep
    from trainers.student.train import lr_factor, make_optimizer

    data = StudentData(st.store, "feat", "training1", cfg, teacher="some")
    classes = st.store.classes
    torch.manual_seed(0)
    model = AVTHead(data.dim, classes.num_actions, classes.num_verbs, classes.num_nouns, cfg)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, n, cfg))
    step = TrainStep(model.train(), opt, sched, cfg, cfg, "cpu", backend=backend or "inductor")
    order = epoch_order(len(data), 0, 0, shuffle=True)
    losses = [step(data.batch(order[i * 16: (i + 1) * 16])) for i in range(n)]
    return torch.stack(losses), dict(model.named_parameters()), step.keys


@pytest.mark.parametrize("mode", ["topk_lse", "full"])
def test_compiled_step_matches_eager(st, mode):
    """torch.compile of the step (backend aot_eager on CPU: the traced forward and backward
    graphs without Inductor's code generation, which takes minutes here; bench/gpu_checks.sh
    runs the CUDA test below with Inductor and CUDA graphs) against eager, over a few steps
    with momentum, a schedule and clipping. Without dropout: compiled graphs draw other masks."""
    cfg = small_cfg(distill_mode=mode, temperature=10.0, dropout=0.0, block_dropout=0.0, optimizer="sgd",
                    lr=0.05, grad_clip=1.0, verb_noun_heads=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, p_eager, keys = _steps(st, preset("egtea", **{**cfg.to_dict(), "compile": "off"}), 5, None)
    compiled, p_comp, keys_c = _steps(st, preset("egtea", **{**cfg.to_dict(), "compile": "reduce-overhead"}), 5,
                                      "aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph: no break
    assert not torch._dynamo.utils.counters["graph_break"]
    assert keys == keys_c and {"ce", "distill", "feat", "past_cls", "total", "verb", "noun"} <= set(keys)
    assert not torch.equal(eager[0], eager[-1])  # the steps changed the model
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, p in p_eager.items():
        torch.testing.assert_close(p_comp[name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["topk_lse", "full"])
def test_cuda_graphs_step_and_resident_data(st, mode):
    """On CUDA: resident batches equal host ones, and the step compiled by Inductor with CUDA
    graphs (reduce-overhead) against eager, both under bf16 autocast and the fused optimiser."""
    from trainers.student.avt import AVTHead
    from trainers.student.step import TrainStep
    from trainers.student.train import lr_factor, make_optimizer

    cfg = small_cfg(distill_mode=mode, temperature=10.0, dropout=0.0, block_dropout=0.0, optimizer="sgd",
                    lr=0.05, grad_clip=1.0)
    data = StudentData(st.store, "feat", "training1", cfg, teacher="some")
    resident = ResidentData(data, "cuda")
    order = epoch_order(len(data), 0, 0, shuffle=True)[:6 * 16]
    batches = list(resident.batches(order, 16))
    for i, b in enumerate(batches):
        want = data.batch(order[i * 16: (i + 1) * 16])
        assert all(torch.equal(getattr(b, k).cpu(), w) for k, w in vars(want).items() if w is not None)
    runs = {}
    for compile in ("off", "reduce-overhead"):
        torch.manual_seed(0)
        model = AVTHead(data.dim, *(st.store.classes.num_actions, 1, 1), cfg).cuda()
        opt = make_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 6, cfg))
        step = TrainStep(model.train(), opt, sched, preset("egtea", **{**cfg.to_dict(), "compile": compile}), cfg,
                         "cuda")
        losses = torch.stack([step(b) for b in batches]).cpu()
        runs[compile] = losses, {k: v.detach().cpu() for k, v in model.named_parameters()}
    (le, pe), (lc, pc) = runs["off"], runs["reduce-overhead"]
    torch.testing.assert_close(lc, le, rtol=2e-2, atol=2e-3)  # bf16 autocast: other fusions round differently
    for name, p in pe.items():
        torch.testing.assert_close(pc[name], p, rtol=2e-2, atol=2e-3, msg=name)
