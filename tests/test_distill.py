"""Distillation as the paper's code computes it, and the registry of distillation terms.

The paper's formulas are written here as its code writes them (StonyBrookNLP/action-anticipation-
lmtovideo, student/AVT-main: loss_fn/kld_lm.py, loss_fn/sim.py, AVT's loss_fn/mse.py,
func/train_eval_ops.py and func/train.py, conf/config.yaml) and compared with the presets."""

import dataclasses

import pytest
import torch
from torch import nn

from kdstore.errors import ConfigError, DataError
from trainers.student.avt import AVTHead
from trainers.student.batch import Batch
from trainers.student.config import preset
from trainers.student.distill import FEATURE_TERMS, KD_MODES, active_terms, distills, reads, without_distillation
from trainers.student.losses import student_losses

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the paper's code, transcribed -------------------------------------------------------------


class PaperKLDiv(nn.KLDivLoss):
    """loss_fn/kld_lm.py: KLDivLoss(reduction='none', log_target=True) on log_softmax(x / 10), times T**2."""

    def __init__(self):
        super().__init__(reduction="none", log_target=True)

    def forward(self, inp, tgt):
        T = 10
        return super().forward(torch.log_softmax(inp / T, dim=1), torch.log_softmax(tgt / T, dim=1)) * (T**2)


class PaperTopKKLDiv(nn.KLDivLoss):
    """kld_lm.py's (commented-out) top-K block: the teacher's top-50 logits and the student's logits
    at those classes; T = 5, as the EK55 runs are named (``*_kldiv_top50_*_wt20_t5``)."""

    def __init__(self):
        super().__init__(reduction="none", log_target=True)

    def forward(self, inp, tgt):
        T, k = 5, 50
        tgt_topk, topk_ind = torch.topk(tgt, k=k, sorted=False)
        inp_redist = torch.gather(inp, dim=1, index=topk_ind)
        return super().forward(torch.log_softmax(inp_redist / T, dim=1), torch.log_softmax(tgt_topk / T, dim=1)) * (T**2)


def paper_weighted(loss_fn, inp, tgt):
    """func/train.py: every loss is reduced with torch.mean, then multiplied by its loss_wts entry
    (conf/config.yaml: distill 150 for EGTEA; the EK55 runs: 20)."""
    return (20.0 if isinstance(loss_fn, PaperTopKKLDiv) else 150.0) * torch.mean(loss_fn(inp, tgt))


def paper_cosine(inp, tgt):
    """loss_fn/sim.py CosineSim: 1 - nn.CosineSimilarity(dim=1), then torch.mean in train.py."""
    return torch.mean(1 - nn.CosineSimilarity(dim=1)(inp, tgt))


def paper_normed_mse(inp, tgt):
    """AVT's loss_fn/mse.py NormedMSE: nn.MSELoss (mean) of the L2-normalised features."""
    return nn.MSELoss()(nn.functional.normalize(inp, dim=-1, p=2), nn.functional.normalize(tgt, dim=-1, p=2))


# --- helpers -----------------------------------------------------------------------------------


def batch_for(teacher: torch.Tensor, mask=None, K: int = 50, features=None) -> Batch:
    """A batch carrying a teacher's full logits and its stored top-K (sorted, as the store keeps it)."""
    B = teacher.shape[0]
    topk, idx = teacher.topk(min(K, teacher.shape[1]), dim=-1)
    return Batch(frames=torch.zeros(B, 2, 1), action=torch.zeros(B, dtype=torch.long),
                 verb=torch.zeros(B, dtype=torch.long), noun=torch.zeros(B, dtype=torch.long),
                 uids=torch.arange(B), teacher_mask=torch.ones(B, dtype=torch.bool) if mask is None else mask,
                 teacher_topk=topk, teacher_idx=idx, teacher_logits=teacher, teacher_features=features,
                 past_action=torch.full((B, 2), -1))


def distill_value_and_grad(cfg, logits, batch, key="distill"):
    logits = logits.detach().requires_grad_()
    out = {"logits": logits, "pred_feats": torch.zeros(len(logits), 2, 1),
           "past_logits": torch.zeros(len(logits), 2, logits.shape[1])}
    loss = student_losses(out, batch, cfg)[key]
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def paper_value_and_grad(loss_fn, logits, teacher):
    logits = logits.detach().requires_grad_()
    loss = paper_weighted(loss_fn, logits, teacher)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def fixed_batch(B: int, C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 4, torch.randn(B, C, generator=g) * 6  # student, teacher


# --- the KD term -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "C", "paper_fn"), [("egtea", 106, PaperKLDiv), ("ek55", 2513, PaperTopKKLDiv)])
def test_preset_matches_the_paper_loss_value_and_gradient(name, C, paper_fn):
    cfg = preset(name)
    student, teacher = fixed_batch(8, C)
    ours, ours_grad = distill_value_and_grad(cfg, student, batch_for(teacher, K=cfg.topk))
    paper, paper_grad = paper_value_and_grad(paper_fn(), student, teacher)
    assert paper > 0
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, paper_grad, rtol=1e-4, atol=1e-8)


def test_paper_strength_per_row_is_weight_t2_over_c():
    """The element mean puts 150 * T^2 / C on each row's KL (EGTEA: 1.4 T^2); the row mean 150 * T^2."""
    student, teacher = fixed_batch(8, 106)
    kl_rows = torch.nn.functional.kl_div(torch.log_softmax(student / 10, 1), torch.log_softmax(teacher / 10, 1),
                                         reduction="none", log_target=True).sum(1).mean()
    elements, _ = distill_value_and_grad(preset("egtea"), student, batch_for(teacher))
    rows, _ = distill_value_and_grad(preset("egtea", distill_reduction="rows"), student, batch_for(teacher))
    torch.testing.assert_close(elements, 150 * 100 / 106 * kl_rows)
    torch.testing.assert_close(rows, 106 * elements)


@pytest.mark.parametrize(("name", "C", "paper_fn"), [("egtea", 106, PaperKLDiv), ("ek55", 2513, PaperTopKKLDiv)])
def test_rows_without_a_teacher_leave_the_mean_over_the_others(name, C, paper_fn):
    """Rows without a teacher contribute nothing: the loss is the paper's formula over the rows
    that have one (divided by their count x C). The paper's own code instead gives a missing UID a
    constant -1 target (a uniform distribution) that it counts in its mean: a different value."""
    cfg = preset(name)
    student, teacher = fixed_batch(8, C, seed=1)
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    garbage = teacher.clone()
    garbage[~mask] = float("nan")  # what an absent row holds must never matter
    ours, grad = distill_value_and_grad(cfg, student, batch_for(garbage, mask, K=cfg.topk))
    paper, paper_grad = paper_value_and_grad(paper_fn(), student[mask], teacher[mask])
    torch.testing.assert_close(ours, paper, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask], paper_grad, rtol=1e-4, atol=1e-8)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    uniform_fill = torch.where(mask[:, None], teacher, -1.0)  # base_video_dataset.py's missing-UID default
    assert not torch.allclose(ours, paper_weighted(paper_fn(), student, uniform_fill))


@pytest.mark.parametrize("mode", list(KD_MODES))
def test_no_row_with_a_teacher_gives_zero_and_stays_in_the_graph(mode):
    cfg = preset("egtea", distill_mode=mode, topk=5)
    student, teacher = fixed_batch(4, 12)
    b = batch_for(teacher, torch.zeros(4, dtype=torch.bool), K=5)
    b.teacher_lse = torch.zeros(4)
    loss, grad = distill_value_and_grad(cfg, student, b)
    assert loss.item() == 0.0 and not grad.any()


def test_topk_lse_element_mean_divides_by_c():
    """topk_lse stands in for the full KL, so its element mean divides by C like `full`."""
    student, teacher = fixed_batch(6, 20)
    b = batch_for(teacher, K=20)
    b.teacher_lse = torch.logsumexp(teacher / 10, 1)
    lse, _ = distill_value_and_grad(preset("egtea", distill_mode="topk_lse", topk=20), student, b)
    full, _ = distill_value_and_grad(preset("egtea"), student, b)
    torch.testing.assert_close(lse, full, rtol=1e-5, atol=1e-6)


# --- feature distillation ----------------------------------------------------------------------


def feature_setup(H: int, D: int = 16, B: int = 6, mask=None, seed: int = 0):
    """A model with a teacher of width H, its outputs on random frames, and a batch with teacher features."""
    cfg = preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, dropout=0.0, block_dropout=0.0,
                 distill_feat=2.0, distill_feat_mse=3.0)
    torch.manual_seed(seed)
    model = AVTHead(D, 7, 3, 4, cfg, teacher_dim=H)
    frames = torch.randn(B, 4, D)
    g = torch.Generator().manual_seed(seed + 1)
    b = batch_for(torch.randn(B, 7, generator=g), mask, K=7, features=torch.randn(B, H, generator=g))
    b.frames, b.action, b.past_action = frames, torch.randint(7, (B,), generator=g), torch.full((B, 4), -1)
    return cfg, model, model(frames), b


@pytest.mark.parametrize("H", [16, 24], ids=["same-width", "projected"])
def test_feature_terms_match_the_paper(H):
    cfg, model, out, b = feature_setup(H)
    losses = student_losses(out, b, cfg)
    future_agg = out["pred_feats"][:, -1] if H == 16 else model.teacher_proj(out["pred_feats"][:, -1])
    torch.testing.assert_close(out["future_agg"], future_agg)
    torch.testing.assert_close(losses["distill_feat"], 2.0 * paper_cosine(future_agg, b.teacher_features))
    torch.testing.assert_close(losses["distill_feat_mse"], 3.0 * paper_normed_mse(future_agg, b.teacher_features))
    assert isinstance(model.teacher_proj, nn.Identity) == (H == 16)


@pytest.mark.parametrize("H", [16, 24], ids=["same-width", "projected"])
def test_feature_terms_train_the_model_and_projection(H):
    cfg, model, out, b = feature_setup(H)
    losses = student_losses(out, b, cfg)
    grads = torch.autograd.grad(losses["distill_feat"] + losses["distill_feat_mse"],
                                [model.encoder.weight, model.decoder.weight, *model.teacher_proj.parameters()])
    assert all(g.abs().sum() > 0 for g in grads) and len(grads) == (2 if H == 16 else 3)


def test_feature_terms_ignore_rows_without_a_teacher():
    mask = torch.tensor([True, False, True, True, False, True])
    cfg, model, out, b = feature_setup(24, mask=mask)
    ref = student_losses(out, b, cfg)
    b.teacher_features = b.teacher_features.clone()
    b.teacher_features[~mask] = float("nan")
    future = out["future_agg"].detach().requires_grad_()
    losses = student_losses({**out, "future_agg": future}, b, cfg)
    for key, fn, w in (("distill_feat", paper_cosine, 2.0), ("distill_feat_mse", paper_normed_mse, 3.0)):
        assert torch.equal(losses[key], ref[key])
        torch.testing.assert_close(losses[key], w * fn(future[mask], b.teacher_features[mask]))
    (grad,) = torch.autograd.grad(losses["distill_feat"] + losses["distill_feat_mse"], future)
    assert not grad[~mask].any() and grad[mask].abs().sum() > 0
    b.teacher_mask = torch.zeros(6, dtype=torch.bool)
    none = student_losses({**out, "future_agg": future}, b, cfg)
    assert none["distill_feat"].item() == 0.0 and none["distill_feat_mse"].item() == 0.0
    assert none["distill_feat"].requires_grad


def test_feature_terms_need_the_models_projection_and_matching_width():
    cfg, model, out, b = feature_setup(24)
    with pytest.raises(ConfigError, match="future_agg"):
        student_losses({k: v for k, v in out.items() if k != "future_agg"}, b, cfg)
    with pytest.raises(DataError, match="teacher_features"):
        student_losses(out, dataclasses.replace(b, teacher_features=torch.zeros(6, 5)), cfg)
    with pytest.raises(ConfigError, match="teacher_features"):
        student_losses(out, dataclasses.replace(b, teacher_features=None), cfg)


# --- the registry ------------------------------------------------------------------------------


def test_active_terms_and_what_they_read():
    eg = preset("egtea")
    assert list(active_terms(eg)) == ["distill"] and reads(eg) == ("logits",)
    ek = preset("ek55")
    assert reads(ek) == ("topk_values", "topk_indices")
    assert reads(preset("ek55", distill_mode="topk_lse")) == ("topk_values", "topk_indices", "lse")
    both = preset("egtea", distill_feat=1.0, distill_feat_mse=0.5)
    assert list(active_terms(both)) == ["distill", "distill_feat", "distill_feat_mse"]
    assert reads(both) == ("logits", "features")
    feat_only = preset("egtea", distill_mode="none", distill_feat=1.0)
    assert reads(feat_only) == ("features",) and distills(feat_only)
    for cfg in (eg, ek, both, preset("egtea", distill=0.0)):
        base = without_distillation(cfg)
        assert not distills(base) and reads(base) == ()
    assert not distills(preset("egtea", distill=0.0))
    assert {t.weight for t in FEATURE_TERMS.values()} == {"distill_feat", "distill_feat_mse"}
