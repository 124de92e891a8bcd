"""AVT-h student: model, config presets, batch and losses."""

import dataclasses
import json
import sys
import types

import pytest
import torch

from kdstore.errors import ConfigError, DataError, DependencyError
from trainers.student.avt import AVTHead
from trainers.student.batch import Batch
from trainers.student.config import PRESETS, StudentConfig, preset
from trainers.student.losses import student_losses

D, A, V, N = 16, 7, 3, 4  # feature dim, actions, verbs, nouns


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**overrides) -> StudentConfig:
    small = dict(num_frames=6, n_layer=2, n_head=2, inter_dim=32, dropout=0.0, block_dropout=0.0,
                 past_cls=0.1, verb_noun_heads=True)
    return preset("egtea", **{**small, **overrides})


def tiny_model(cfg: StudentConfig, seed: int = 0) -> AVTHead:
    torch.manual_seed(seed)
    return AVTHead(D, A, V, N, cfg)


def make_batch(B: int = 4, T: int = 6, mask=None, temperature: float = 10.0, seed: int = 0) -> Batch:
    """A batch whose top-K targets cover all A classes (K = A), in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    teacher = 5 * torch.randn(B, A, generator=g)
    topk, idx = teacher.topk(A, dim=-1)
    perm = torch.randperm(A, generator=g)
    return Batch(
        frames=torch.randn(B, T, D, generator=g),
        action=torch.randint(A, (B,), generator=g),
        verb=torch.randint(V, (B,), generator=g),
        noun=torch.randint(N, (B,), generator=g),
        uids=torch.arange(100, 100 + B),
        teacher_mask=torch.ones(B, dtype=torch.bool) if mask is None else torch.tensor(mask),
        past_action=torch.randint(-1, A, (B, T), generator=g),
        teacher_topk=topk[:, perm],
        teacher_idx=idx[:, perm],
        teacher_lse=torch.logsumexp(teacher / temperature, dim=-1),
        teacher_logits=teacher,
    )


def rows_of(batch: Batch, rows: list[int]) -> Batch:
    return dataclasses.replace(batch, **{f.name: v[rows] for f in dataclasses.fields(batch)
                                         if (v := getattr(batch, f.name)) is not None})


# --- model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 3, 5])
def test_changing_a_frame_never_changes_earlier_outputs(t):
    """Position t predicts frame t+1 from frames <= t; past position p > 0 scores the prediction
    of frame p (from frames < p), past position 0 frame 0 itself."""
    model = tiny_model(tiny_cfg()).eval()
    frames = torch.randn(3, 6, D)
    changed = frames.clone()
    changed[:, t] = torch.randn(3, D)
    with torch.no_grad():
        before, after = model(frames), model(changed)
    torch.testing.assert_close(after["pred_feats"][:, :t], before["pred_feats"][:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after["pred_feats"][:, t], before["pred_feats"][:, t])
    torch.testing.assert_close(after["past_logits"][:, 1:t + 1], before["past_logits"][:, 1:t + 1], rtol=0, atol=1e-6)
    for p in ([0] if t == 0 else []) + ([t + 1] if t + 1 < 6 else []):  # the last frame reaches only the future
        assert not torch.allclose(after["past_logits"][:, p], before["past_logits"][:, p])


@pytest.mark.parametrize("T", [6, 4])
def test_output_shapes(T):
    model = tiny_model(tiny_cfg()).eval()
    frames = torch.randn(3, T, D)
    out = model(frames)
    assert out["logits"].shape == (3, A)
    assert out["past_logits"].shape == (3, T, A)
    assert out["pred_feats"].shape == (3, T, D)
    assert out["verb_logits"].shape == (3, V)
    assert out["noun_logits"].shape == (3, N)
    torch.testing.assert_close(out["logits"], model.action_head(out["pred_feats"][:, -1]))
    # AVT's past: the observed first frame, then the predictions of frames 1..T-1
    past = torch.cat([frames[:, :1], out["pred_feats"][:, :-1]], dim=1)  # [3, T, D]
    torch.testing.assert_close(out["past_logits"], model.action_head(past))
    without = tiny_model(tiny_cfg(past_first_frame=False)).eval()(frames)
    torch.testing.assert_close(without["past_logits"], out["past_logits"][:, 1:])


def test_optional_outputs_absent_when_disabled():
    out = tiny_model(tiny_cfg(past_cls=0.0, verb_noun_heads=False))(torch.randn(2, 6, D))
    assert set(out) == {"logits", "pred_feats"}


def test_model_takes_its_shape_config():
    """AVTHead reads an AVTConfig; a StudentConfig gives the same model through AVTConfig.of."""
    from trainers.student.avt import AVTConfig

    cfg = tiny_cfg()
    shape = AVTConfig.of(cfg)
    assert not hasattr(shape, "lr") and shape.classify_past and shape.past_first_frame
    a, b = tiny_model(shape), tiny_model(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("shape", [(2, 7, D), (2, 6, D + 1), (6, D)])
def test_bad_frames_shape_is_data_error(shape):
    with pytest.raises(DataError, match="frames"):
        tiny_model(tiny_cfg())(torch.randn(*shape))


def test_xformers_missing_is_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(DependencyError, match=r"pip install 'kdstore\[gpu\]'"):
        AVTHead(D, A, V, N, tiny_cfg(attn_impl="xformers"))


@pytest.mark.parametrize("xformers", ["absent", "broken"])
def test_auto_attention_resolves_to_sdpa_on_cpu(monkeypatch, xformers):
    """auto on the CPU: SDPA, whether xformers is missing or imports but cannot run (a module
    whose attention raises stands in for a build without kernels); outputs equal SDPA's."""
    from trainers.student import avt

    if xformers == "absent":
        monkeypatch.setitem(sys.modules, "xformers", None)
        monkeypatch.setitem(sys.modules, "xformers.ops", None)
    else:
        broken = types.ModuleType("xformers.ops")
        broken.LowerTriangularMask = object

        def memory_efficient_attention(*args, **kw):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

        broken.memory_efficient_attention = memory_efficient_attention
        monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", broken)
    monkeypatch.setattr(avt, "_XFORMERS_WORKS", {})
    x = torch.randn(3, 6, D)
    auto, sdpa = tiny_model(tiny_cfg(attn_impl="auto")), tiny_model(tiny_cfg(attn_impl="sdpa"))
    assert {b.attn.impl for b in auto.blocks} == {"auto"}  # resolved at the first forward
    out_auto, out_sdpa = auto(x), sdpa(x)
    assert {b.attn.impl for b in auto.blocks} == {"sdpa"}
    for k in out_sdpa:
        assert torch.equal(out_auto[k], out_sdpa[k]), k
    assert avt._XFORMERS_WORKS == {("cpu", None, torch.float32, 16): False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_attention_on_cuda():
    """auto picks xformers exactly when it runs on this GPU and torch, and matches SDPA."""
    from trainers.student.avt import xformers_works

    x = torch.randn(5, 6, D, device="cuda")
    auto, sdpa = tiny_model(tiny_cfg(attn_impl="auto")).cuda(), tiny_model(tiny_cfg(attn_impl="sdpa")).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_auto, out_sdpa = auto(x), sdpa(x)
    works = xformers_works(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 16)
    assert {b.attn.impl for b in auto.blocks} == {"xformers" if works else "sdpa"}
    torch.testing.assert_close(out_auto["logits"].float(), out_sdpa["logits"].float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers' attention kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_matches_sdpa_on_cuda(dtype):
    """Same weights, same input: the two attention implementations agree (outputs and gradients)."""
    xops = pytest.importorskip("xformers.ops")
    q = torch.randn(1, 4, 2, 16, device="cuda", dtype=dtype)
    try:
        xops.memory_efficient_attention(q, q, q)
    except NotImplementedError:  # e.g. a wheel built for another torch: its CUDA operators did not load
        pytest.skip("xformers has no attention operator for this torch/GPU")
    x = torch.randn(5, 6, D, device="cuda")  # [B, T, D]
    outs, grads = [], []
    for impl in ("sdpa", "xformers"):
        model = tiny_model(tiny_cfg(attn_impl=impl)).cuda().eval()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        loss = sum(v.float().sum() for v in out.values())
        outs.append(out["logits"].float())
        grads.append(torch.autograd.grad(loss, model.blocks[0].attn.qkv.weight)[0])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    torch.testing.assert_close(grads[1], grads[0], **tol)


# --- config ----------------------------------------------------------------------------------

def test_presets_have_the_published_values():
    eg, ek = preset("egtea"), preset("ek55")
    assert (eg.num_frames, eg.fps, eg.tau_a) == (10, 1.0, 0.5)
    assert (eg.n_layer, eg.n_head, eg.inter_dim, eg.dropout) == (2, 4, 2048, 0.8)
    assert (eg.past_cls, eg.feat) == (0.1, 1.0)
    assert (eg.optimizer, eg.nesterov, eg.lr, eg.momentum, eg.weight_decay) == ("sgd", True, 1e-3, 0.9, 1e-6)
    assert (eg.scheduler, eg.warmup_epochs, eg.batch_size, eg.epochs) == ("cosine", 0, 64, 15)
    assert eg.distill_mode == "full"
    assert (ek.num_frames, ek.fps, ek.tau_a) == (10, 2.0, 1.0)
    assert (ek.n_layer, ek.n_head, ek.inter_dim, ek.dropout) == (12, 8, 2048, 0.8)
    assert (ek.past_cls, ek.feat) == (0.0, 2.0)
    assert (ek.optimizer, ek.lr, ek.weight_decay) == ("adam", 5e-6, 1e-4)
    assert (ek.scheduler, ek.warmup_epochs, ek.batch_size, ek.epochs) == ("cosine", 5, 32, 20)
    assert (ek.distill_mode, ek.topk) == ("topk", 50)
    assert (eg.distill, eg.temperature, ek.distill, ek.temperature) == (150.0, 10.0, 20.0, 5.0)
    for cfg in (eg, ek):
        assert cfg.label_smoothing == 0.0
        assert (cfg.distill_reduction, cfg.distill_feat, cfg.distill_feat_mse) == ("elements", 0.0, 0.0)


def test_preset_returns_a_copy_with_overrides():
    cfg = preset("egtea", lr=0.5)
    cfg.epochs = 1
    assert cfg.lr == 0.5
    assert (PRESETS["egtea"]["lr"], PRESETS["egtea"]["epochs"]) == (1e-3, 15)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_from_dict_round_trip(name):
    cfg = preset(name)
    assert StudentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="lrr"):
        StudentConfig.from_dict({**preset("egtea").to_dict(), "lrr": 1.0})
    with pytest.raises(ConfigError, match="lrr"):
        preset("egtea", lrr=1.0)
    with pytest.raises(ConfigError, match="nope"):
        preset("nope")


@pytest.mark.parametrize("bad", [dict(distill_mode="kl"), dict(distill_reduction="mean"), dict(distill_feat=-1.0),
                                 dict(n_layer="2"), dict(n_layer=True),
                                 dict(inter_dim=30, n_head=4), dict(dropout=1.0), dict(topk=0)])
def test_bad_values_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        preset("egtea", **bad)


# --- batch -----------------------------------------------------------------------------------

def test_batch_to_moves_tensors_and_keeps_none():
    batch = dataclasses.replace(make_batch(), teacher_logits=None)
    moved = batch.to("cpu")
    assert moved.teacher_logits is None
    assert torch.equal(moved.frames, batch.frames)
    if torch.cuda.is_available():
        assert batch.pin_memory().frames.is_pinned()


# --- losses ----------------------------------------------------------------------------------

def distill_and_grad(mode: str, batch: Batch):
    cfg = tiny_cfg(distill_mode=mode)
    out = tiny_model(cfg)(batch.frames)
    losses = student_losses(out, batch, cfg)
    (grad,) = torch.autograd.grad(losses["distill"], out["logits"])
    return losses, grad


@pytest.mark.parametrize("mode", ["topk", "topk_lse"])
def test_full_equals_topk_when_topk_covers_all_classes(mode):
    batch = make_batch()
    full, full_grad = distill_and_grad("full", batch)
    topk, topk_grad = distill_and_grad(mode, batch)
    assert full["distill"] > 0
    torch.testing.assert_close(topk["distill"], full["distill"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(topk_grad, full_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "topk", "topk_lse"])
def test_rows_without_teacher_do_not_affect_distill(mode):
    batch = make_batch(mask=[True, False, True, False])
    garbage = dataclasses.replace(batch, teacher_topk=batch.teacher_topk.clone(),
                                  teacher_idx=batch.teacher_idx.clone(),
                                  teacher_lse=batch.teacher_lse.clone(),
                                  teacher_logits=batch.teacher_logits.clone())
    for row in (1, 3):  # placeholders a loader might leave in rows without a teacher
        garbage.teacher_topk[row] = float("nan")
        garbage.teacher_idx[row] = -1
        garbage.teacher_lse[row] = float("inf")
        garbage.teacher_logits[row] = float("nan")
    losses, grad = distill_and_grad(mode, batch)
    garbage_losses, _ = distill_and_grad(mode, garbage)
    only_teacher_rows, _ = distill_and_grad(mode, rows_of(batch, [0, 2]))
    assert torch.equal(garbage_losses["distill"], losses["distill"])
    torch.testing.assert_close(only_teacher_rows["distill"], losses["distill"])
    assert grad[[1, 3]].abs().max() == 0 and grad[[0, 2]].abs().max() > 0


@pytest.mark.parametrize("mode", ["full", "topk", "topk_lse"])
def test_distill_is_zero_when_no_row_has_a_teacher(mode):
    losses, grad = distill_and_grad(mode, make_batch(mask=[False] * 4))
    assert losses["distill"].item() == 0.0
    assert grad.abs().max() == 0
    assert torch.isfinite(losses["total"])


def test_loss_keys_and_total():
    batch = make_batch()
    cfg = tiny_cfg(verb_noun_weight=0.5, feat=2.0)
    losses = student_losses(tiny_model(cfg)(batch.frames), batch, cfg)
    assert set(losses) == {"ce", "verb", "noun", "past_cls", "feat", "distill", "total"}
    expected = (losses["ce"] + 0.5 * (losses["verb"] + losses["noun"]) + 0.1 * losses["past_cls"]
                + 2.0 * losses["feat"] + losses["distill"])
    torch.testing.assert_close(losses["total"], expected)


def test_nan_frames_raise_data_error_naming_the_uid():
    batch = make_batch()
    batch.frames[2, 3, 1] = float("nan")
    cfg = tiny_cfg()
    with pytest.raises(DataError, match="UID 102"):
        student_losses(tiny_model(cfg)(batch.frames), batch, cfg)


@pytest.mark.parametrize(("mode", "field"), [("full", "teacher_logits"), ("topk", "teacher_topk"),
                                             ("topk_lse", "teacher_lse")])
def test_nonfinite_teacher_raises_data_error_naming_the_uid(mode, field):
    batch = make_batch()
    getattr(batch, field)[1] = float("inf")
    cfg = tiny_cfg(distill_mode=mode)
    with pytest.raises(DataError, match=f"UID 101: {field}"):
        student_losses(tiny_model(cfg)(batch.frames), batch, cfg)


def test_missing_teacher_field_is_config_error():
    batch = dataclasses.replace(make_batch(), teacher_lse=None)
    cfg = tiny_cfg(distill_mode="topk_lse")
    with pytest.raises(ConfigError, match="teacher_lse"):
        student_losses(tiny_model(cfg)(batch.frames), batch, cfg)


def test_tiny_model_overfits_a_small_problem():
    # A teacher that agrees with the labels, and a distillation weight that leaves the other
    # terms a say (the paper's 150 * T^2 would swamp them on 16 random rows).
    cfg = tiny_cfg(distill=1.0, temperature=2.0)
    batch = make_batch(B=16, temperature=cfg.temperature, seed=1)
    batch.teacher_logits[torch.arange(16), batch.action] += 20
    model = tiny_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(100):
        losses = student_losses(model(batch.frames), batch, cfg)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    for key in ("total", "ce", "verb", "noun", "distill"):
        assert last[key] < 0.1 * first[key], key
    assert last["feat"] < 0.7 * first["feat"]  # next random frame: memorised more slowly
