"""The KD modes beyond the paper's, each against its own paper's formula, transcribed here as the
authors' official code writes it (value and gradient, on a fixed batch of awkward sizes):

* ``std`` / ``std_topk``: Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR
  2024), sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py (``normalize``,
  ``kd_loss``);
* ``dkd``: Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), megvii-research/mdistiller,
  mdistiller/distillers/DKD.py (``dkd_loss``);
* ``dist``: Huang et al., "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022),
  hunto/image_classification_sota, lib/models/losses/dist_kd.py (``DIST``), with the paper's
  temperature: softmax(z / tau) and tau^2 on both terms.

The ``std`` modes run through the fused Triton kernel (CPU interpreter) and the torch reference.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import functools

import pytest
import torch
import torch.nn.functional as F

from kdstore.errors import ConfigError
from trainers.kernels import topk_kl as topk_kl_module
from trainers.student.batch import Batch
from trainers.student.config import StudentConfig, preset
from trainers.student.distill import KD_MODES, reads
from trainers.student.losses import student_losses

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]

B, C, K = 7, 37, 5  # B and C neither powers of two nor multiples of each other


# --- the papers' code, transcribed -------------------------------------------------------------


def ls_normalize(logit):
    """logit-standardization-KD, KD.py ``normalize``."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def ls_kd_loss(logits_student_in, logits_teacher_in, temperature):
    """logit-standardization-KD, KD.py ``kd_loss`` with logit_stand=True."""
    logits_student = ls_normalize(logits_student_in)
    logits_teacher = ls_normalize(logits_teacher_in)
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller DKD.py ``dkd_loss`` (``size_average=False`` is ``reduction='sum'``)."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def dist_loss(z_s, z_t, beta, gamma, tau):
    """image_classification_sota dist_kd.py ``DIST`` on softmax(z / tau), times tau^2 (the paper's Eq.)."""

    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    def intra_class_relation(y_s, y_t):
        return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    return tau**2 * (beta * inter_class_relation(y_s, y_t) + gamma * intra_class_relation(y_s, y_t))


# --- helpers -----------------------------------------------------------------------------------


def fixed_batch(seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(B, C, generator=g) * 4, torch.randn(B, C, generator=g) * 6  # [B, C]
    action = torch.randint(C, (B,), generator=g)
    topk, idx = teacher.topk(K, dim=-1)
    perm = torch.rand(B, K, generator=g).argsort(-1)  # nothing may rely on sorted top-K
    b = Batch(frames=torch.zeros(B, 2, 1), action=action, verb=action, noun=action, uids=torch.arange(B),
              teacher_mask=torch.ones(B, dtype=torch.bool) if mask is None else mask,
              teacher_topk=topk.gather(1, perm), teacher_idx=idx.gather(1, perm), teacher_logits=teacher,
              past_action=torch.full((B, 2), -1))  # no segment under the past frames
    return student, teacher, b


def ours(cfg, student, batch):
    s = student.detach().requires_grad_()
    out = {"logits": s, "pred_feats": torch.zeros(len(s), 2, 1), "past_logits": torch.zeros(len(s), 2, s.shape[1])}
    loss = student_losses(out, batch, cfg)["distill"]
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def theirs(fn, student):
    s = student.detach().requires_grad_()
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-7)


@pytest.fixture(params=[False, True], ids=["reference", "kernel"])
def kernel(request, monkeypatch):
    """Run the KL of the ``std`` modes and DKD's NCKD through the Triton kernel (interpreted) or its torch reference."""
    if request.param:
        pytest.importorskip("triton")
        monkeypatch.setattr(topk_kl_module, "topk_kl", functools.partial(topk_kl_module.topk_kl, use_kernel=True))
    return request.param


CFG = dict(distill=9.0, distill_reduction="rows")


# --- each mode against its paper -----------------------------------------------------------------


def test_std_matches_logit_standardisation(kernel):
    student, teacher, b = fixed_batch()
    cfg = preset("egtea", distill_mode="std", temperature=2.0, **CFG)
    assert reads(cfg) == ("logits",)
    assert_same(ours(cfg, student, b), theirs(lambda s: 9.0 * ls_kd_loss(s, teacher, 2.0), student))
    # the element mean is the row mean over C
    elements, _ = ours(preset("egtea", distill_mode="std", temperature=2.0, distill=9.0), student, b)
    torch.testing.assert_close(elements, ours(cfg, student, b)[0] / C)


def test_std_ignores_the_logits_scale_and_shift():
    """What standardisation is for: a student whose logits are an affine map of the teacher's has zero loss."""
    student, teacher, b = fixed_batch()
    cfg = preset("egtea", distill_mode="std", temperature=2.0, **CFG)
    loss, grad = ours(cfg, 0.1 * teacher + 3.0, b)
    assert loss.abs() < 1e-6 and grad.abs().max() < 1e-5
    assert ours(preset("egtea", distill_mode="full", temperature=2.0, **CFG), 0.1 * teacher + 3.0, b)[0] > 0.1


def test_std_topk_standardises_over_the_teachers_top_k(kernel):
    student, teacher, b = fixed_batch()
    cfg = preset("egtea", distill_mode="std_topk", topk=K, temperature=2.0, **CFG)
    assert reads(cfg) == ("topk_values", "topk_indices")
    b_no_full = Batch(**{**b.__dict__, "teacher_logits": None})  # it never reads the full logits

    def paper(s):  # the student's logits at the teacher's top-K classes, as the paper's top-K KD takes them
        return 9.0 * ls_kd_loss(s.gather(1, b.teacher_idx), b.teacher_topk, 2.0)

    assert_same(ours(cfg, student, b_no_full), theirs(paper, student))


@pytest.mark.parametrize(("alpha", "beta", "T"), [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.0, 2.0, 3.0)])
def test_dkd_matches_decoupled_kd(alpha, beta, T, kernel):
    student, teacher, b = fixed_batch(seed=1)
    cfg = preset("egtea", distill_mode="dkd", dkd_alpha=alpha, dkd_beta=beta, temperature=T, distill=1.0,
                 distill_reduction="rows")
    assert_same(ours(cfg, student, b), theirs(lambda s: dkd_loss(s, teacher, b.action, alpha, beta, T), student))


def test_dkd_is_the_kl_when_alpha_and_beta_are_one():
    """Zhao et al.'s Eq. (1)-(3) identity: KD = TCKD + (1 - p_t^T) NCKD, so alpha = beta = 1 is
    not the KL (NCKD is down-weighted by the teacher's non-target mass); each part is checked."""
    student, teacher, b = fixed_batch(seed=2)
    T = 4.0
    cfg = dict(distill_mode="dkd", temperature=T, distill=1.0, distill_reduction="rows")
    tckd, _ = ours(preset("egtea", dkd_alpha=1.0, dkd_beta=0.0, **cfg), student, b)
    nckd_rows = []
    for r in range(B):  # per row, since the identity weights NCKD by each row's own (1 - p_t)
        br = Batch(**{k: (v[r:r + 1] if isinstance(v, torch.Tensor) else v) for k, v in b.__dict__.items()})
        nckd_rows.append(ours(preset("egtea", dkd_alpha=0.0, dkd_beta=1.0, **cfg), student[r:r + 1], br)[0])
    p_nt = 1 - torch.softmax(teacher / T, 1).gather(1, b.action[:, None])[:, 0]  # [B]
    kl = F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1), reduction="none").sum(1) * T * T
    torch.testing.assert_close(tckd + (p_nt * torch.stack(nckd_rows)).mean(), kl.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("beta", "gamma", "T"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (1.0, 0.0, 2.0)])
def test_dist_matches_dist(beta, gamma, T):
    student, teacher, b = fixed_batch(seed=3)
    cfg = preset("egtea", distill_mode="dist", dist_beta=beta, dist_gamma=gamma, temperature=T, distill=2.0)
    assert_same(ours(cfg, student, b), theirs(lambda s: 2.0 * dist_loss(s, teacher, beta, gamma, T), student))


# --- rows without a teacher ----------------------------------------------------------------------


MASK = torch.tensor([True, False, True, True, False, True, True])


@pytest.mark.parametrize("mode", ["std", "std_topk", "dkd", "dist"])
def test_rows_without_a_teacher_are_left_out(mode, kernel):
    """Each loss over the rows that have a teacher is its paper's formula on those rows alone
    (DIST's intra-class term: correlations across those rows only); NaN in the others never matters."""
    student, teacher, b = fixed_batch(seed=4, mask=MASK)
    b.teacher_logits = torch.where(MASK[:, None], teacher, float("nan"))
    b.teacher_topk = torch.where(MASK[:, None], b.teacher_topk, float("nan"))
    b.teacher_idx = torch.where(MASK[:, None], b.teacher_idx, 10**6)  # padding indices must not be read
    cfg = preset("egtea", distill_mode=mode, topk=K, temperature=3.0, **CFG)
    kept = MASK.nonzero()[:, 0]
    paper = {
        "std": lambda s: 9.0 * ls_kd_loss(s[kept], teacher[kept], 3.0),
        "std_topk": lambda s: 9.0 * ls_kd_loss(s[kept].gather(1, b.teacher_idx[kept]), b.teacher_topk[kept], 3.0),
        "dkd": lambda s: 9.0 * dkd_loss(s[kept], teacher[kept], b.action[kept], 1.0, 8.0, 3.0),
        "dist": lambda s: 9.0 * dist_loss(s[kept], teacher[kept], 1.0, 1.0, 3.0),
    }[mode]
    loss, grad = ours(cfg, student, b)
    assert_same((loss, grad), theirs(paper, student))
    assert torch.equal(grad[~MASK], torch.zeros_like(grad[~MASK]))


@pytest.mark.parametrize("mode", ["std", "std_topk", "dkd", "dist"])
def test_no_row_with_a_teacher_gives_zero(mode):
    student, _, b = fixed_batch(mask=torch.zeros(B, dtype=torch.bool))
    loss, grad = ours(preset("egtea", distill_mode=mode, topk=K), student, b)
    assert loss.item() == 0.0 and not grad.any()


def test_every_mode_is_in_the_registry_with_its_reads():
    assert {"std", "std_topk", "dkd", "dist"} <= set(KD_MODES)
    assert all(KD_MODES[m].reads == ("logits",) for m in ("std", "dkd", "dist"))


# --- config fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dkd_alpha": -1.0}, "dkd_alpha: expected >= 0, got -1.0"),
    ({"dist_gamma": -0.5}, "dist_gamma: expected >= 0, got -0.5"),
    ({"distill_mode": "dkd", "dkd_alpha": 0.0, "dkd_beta": 0.0}, "dkd_alpha, dkd_beta: both 0"),
    ({"distill_mode": "dist", "dist_beta": 0.0, "dist_gamma": 0.0}, "dist_beta, dist_gamma: both 0"),
    ({"distill_mode": "std_topk", "topk": 1}, "topk: distill_mode 'std_topk'"),
    ({"distill_mode": "dkd_typo"}, "distill_mode: expected one of"),
    ({"teacher_calibration": "yes"}, "teacher_calibration: expected bool"),
])
def test_bad_values_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        preset("egtea", **overrides)
    assert "\n" not in str(e.value)


def test_new_fields_round_trip_and_off_modes_ignore_them():
    cfg = preset("egtea", distill_mode="dkd", dkd_alpha=0.5, dkd_beta=2.0, teacher_calibration=True)
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    preset("egtea", distill_mode="full", dkd_alpha=0.0, dkd_beta=0.0)  # only dkd needs one of them
    preset("egtea", distill_mode="dkd", distill=0.0, dkd_alpha=0.0, dkd_beta=0.0)  # a KD term that is off


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["std", "std_topk", "dkd", "dist"])
def test_each_mode_trains_a_student(mode, tmp_path, synthetic_tables, make_store):
    """Selected by name in a config, each mode reads its fields from the store and trains."""
    import numpy as np

    from trainers.student.train import read_log, train_student

    classes, seg = synthetic_tables
    store = make_store(tmp_path / "s.zarr", classes, seg, teacher_split=None)
    cfg = preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, epochs=1, batch_size=16, optimizer="adam",
                 lr=3e-3, distill_mode=mode, topk=5, temperature=2.0, distill=1.0)
    m = train_student(store, "feat", tmp_path / "run", cfg, teacher="teacher", progress=False)
    log = read_log(tmp_path / "run")
    assert np.isfinite(m["mean_top1_recall"]) and log[-1]["train_distill"] > 0 and np.isfinite(log[-1]["train_distill"])
