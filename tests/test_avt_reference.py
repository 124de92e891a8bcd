"""AVT-h against an independent transcription of facebookresearch/AVT, on fixed inputs.

The reference below is written from AVT's code, not from ours: the head is AVT's ``AVTh``
(models/future_prediction.py) on transformers' ``GPT2Model``, as AVT builds it, with output_len=1,
return_past_too=True and avg_last_n=1 (expts/11_egtea_avt_tsn.txt); the classifiers and the
past classifier are models/base_model.py ``forward_singlecrop``; the losses are
func/train_eval_ops.py ``BasicLossAccuracy`` (``MultiDimCrossEntropy(ignore_index=-1,
reduction='none')``, past targets the mode of each one-frame subclip's labels) reduced and
weighted as func/train.py ``train_one_epoch`` (``torch.mean`` of each, weights of the config);
the per-frame labels are datasets/base_video_dataset.py ``_get_vidseg_labels``. Our model's
weights are copied into it, and losses and every gradient must agree.
"""

import numpy as np
import pytest
import torch
from torch import nn

from trainers.student.avt import AVTConfig, AVTHead
from trainers.student.batch import Batch
from trainers.student.config import preset
from trainers.student.data import frame_actions
from trainers.student.losses import student_losses

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

D, A, T, B = 12, 9, 6, 5  # feature dim, actions, frames, batch


class AVThReference(nn.Module):
    """AVT's AVTh (future_prediction.py) + BaseModel classifier on past and future (base_model.py)."""

    def __init__(self, in_features: int, inter_dim: int, n_layer: int, n_head: int, num_actions: int):
        super().__init__()
        self.encoder = nn.Linear(in_features, inter_dim, bias=False)
        self.decoder = nn.Linear(inter_dim, in_features, bias=False)
        config = transformers.GPT2Config(n_embd=inter_dim, vocab_size=in_features, n_layer=n_layer, n_head=n_head,
                                         use_cache=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt_model = transformers.GPT2Model(config)
        del self.gpt_model.wte
        self.classifier = nn.Linear(in_features, num_actions)
        self.dropout = nn.Dropout(0.0)

    def forward(self, feats: torch.Tensor):
        orig_feats_len = feats.size(1)
        prev = feats
        enc = self.encoder(feats)
        position_ids = torch.arange(0, enc.size(1), dtype=torch.long)
        last_hidden_state = self.gpt_model(inputs_embeds=enc, position_ids=position_ids).last_hidden_state
        all_outputs = self.decoder(last_hidden_state)  # output_len=1: one pass
        feat_loss = nn.MSELoss(reduction="none")(all_outputs[:, :orig_feats_len - 1], feats[:, 1:orig_feats_len])
        final = torch.cat((prev, all_outputs[:, orig_feats_len - 1:, :]), dim=1)  # return_past_too
        final = torch.mean(final[:, -1:, :], dim=1)  # avg_last_n=1
        updated_past_feat = torch.cat([prev[:, :1, :], all_outputs[:, :(orig_feats_len - 1)]], dim=1)
        past_logits = self.classifier(self.dropout(updated_past_feat))  # classifier_on_past
        logits = self.classifier(self.dropout(final))
        return logits, past_logits, feat_loss


def reference_losses(ref: AVThReference, frames, action, target_subclips, wts: dict) -> dict:
    """train_eval_ops.BasicLossAccuracy + train.train_one_epoch: mean of each unreduced loss, weighted sum."""
    crit = nn.CrossEntropyLoss(ignore_index=-1, reduction="none")
    logits, past_logits, feat_loss = ref(frames)
    past_target = torch.mode(target_subclips, -1)[0]  # [B, T]
    losses = {"cls_action": crit(logits, action),
              "past_cls_action": crit(past_logits.reshape(-1, past_logits.size(-1)),
                                      past_target.reshape(-1)).reshape(past_target.shape),
              "feat": feat_loss}
    losses = {k: torch.mean(v) for k, v in losses.items()}
    losses["total"] = torch.sum(torch.stack([wts[k] * v for k, v in losses.items() if wts[k] > 0]))
    return losses


def copy_into(ref: AVThReference, model: AVTHead) -> dict[str, tuple[nn.Parameter, bool]]:
    """Copy our weights into the reference; returns ours -> (the reference's, transposed?)."""
    pairs = {"encoder.weight": (ref.encoder.weight, False), "decoder.weight": (ref.decoder.weight, False),
             "action_head.weight": (ref.classifier.weight, False), "action_head.bias": (ref.classifier.bias, False),
             "ln_f.weight": (ref.gpt_model.ln_f.weight, False), "ln_f.bias": (ref.gpt_model.ln_f.bias, False)}
    for i, h in enumerate(ref.gpt_model.h):
        for ours, theirs in (("ln_1", h.ln_1), ("ln_2", h.ln_2)):
            pairs |= {f"blocks.{i}.{ours}.weight": (theirs.weight, False), f"blocks.{i}.{ours}.bias": (theirs.bias, False)}
        for ours, theirs in (("attn.qkv", h.attn.c_attn), ("attn.proj", h.attn.c_proj), ("mlp.0", h.mlp.c_fc),
                             ("mlp.2", h.mlp.c_proj)):  # transformers' Conv1D holds W transposed
            pairs |= {f"blocks.{i}.{ours}.weight": (theirs.weight, True), f"blocks.{i}.{ours}.bias": (theirs.bias, False)}
    ours = dict(model.named_parameters())
    assert set(ours) == set(pairs) | {"pos_emb.weight"}
    with torch.no_grad():
        for name, (p, transposed) in pairs.items():
            p.copy_(ours[name].T if transposed else ours[name])
        ref.gpt_model.wpe.weight[:T].copy_(ours["pos_emb.weight"])
    return pairs


def fixed_batch():
    g = torch.Generator().manual_seed(7)
    frames = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    action = torch.randint(A, (B,), generator=g)
    past = torch.randint(-1, A, (B, T), generator=g)  # -1: frames no segment covers
    past[0] = -1  # a row with no labelled frame
    return frames, action, past


@pytest.mark.parametrize("name", ["egtea", "ek55"])
def test_forward_losses_and_gradients_match_avt(name):
    cfg = preset(name, num_frames=T, inter_dim=16, n_head=2, n_layer=2, dropout=0.0, block_dropout=0.0,
                 distill_mode="none", attn_impl="sdpa", past_cls=0.1)
    torch.manual_seed(0)
    model = AVTHead(D, A, 1, 1, cfg).double()
    ref = AVThReference(D, cfg.inter_dim, cfg.n_layer, cfg.n_head, A).double()
    pairs = copy_into(ref, model)
    frames, action, past = fixed_batch()
    batch = Batch(frames=frames, action=action, verb=action, noun=action, uids=torch.arange(B),
                  teacher_mask=torch.zeros(B, dtype=torch.bool), past_action=past)
    ours = student_losses(model(frames), batch, cfg)
    theirs = reference_losses(ref, frames, action, past[:, :, None],
                              {"cls_action": 1.0, "past_cls_action": cfg.past_cls, "feat": cfg.feat})
    for o, t in (("ce", "cls_action"), ("past_cls", "past_cls_action"), ("feat", "feat"), ("total", "total")):
        torch.testing.assert_close(ours[o], theirs[t], rtol=1e-12, atol=1e-12, msg=o)
    ours["total"].backward()
    theirs["total"].backward()
    for n, p in model.named_parameters():
        if n == "pos_emb.weight":
            torch.testing.assert_close(p.grad, ref.gpt_model.wpe.weight.grad[:T], rtol=1e-10, atol=1e-12)
            continue
        q, transposed = pairs[n]
        torch.testing.assert_close(p.grad, q.grad.T if transposed else q.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_past_cls_counts_ignored_frames_in_its_mean():
    """One labelled frame among B x T: the loss is its cross-entropy / (B x T), as torch.mean of
    AVT's unreduced loss (0 at ignored targets) gives."""
    cfg = preset("egtea", num_frames=T, inter_dim=16, n_head=2, n_layer=1, dropout=0.0, distill_mode="none")
    model = AVTHead(D, A, 1, 1, cfg)
    frames, action, past = fixed_batch()
    past = torch.full((B, T), -1)
    past[2, 3] = 4
    batch = Batch(frames=frames.float(), action=action, verb=action, noun=action, uids=torch.arange(B),
                  teacher_mask=torch.zeros(B, dtype=torch.bool), past_action=past)
    out = model(batch.frames)
    loss = student_losses(out, batch, cfg)["past_cls"]
    one = nn.functional.cross_entropy(out["past_logits"][2, 3][None], torch.tensor([4]))
    torch.testing.assert_close(loss, one / (B * T))


def test_init_is_avts():
    """avt_init: every nn.Linear outside GPT-2 N(0, 0.01) with zero bias (AVT's
    BaseModel._initialize_weights); GPT-2's own layers keep GPT-2's N(0, 0.02)."""
    cfg = preset("egtea", num_frames=T, inter_dim=256, n_head=2, n_layer=2)
    torch.manual_seed(0)
    m = AVTHead(512, 400, 1, 1, cfg)
    for layer in (m.encoder, m.decoder, m.action_head):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not m.action_head.bias.any()
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # 1/sqrt(2 n_layer)
    assert m.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    torch.manual_seed(0)
    gpt2 = AVTHead(512, 400, 1, 1, AVTConfig.of(preset("egtea", num_frames=T, inter_dim=256, n_head=2, avt_init=False)))
    assert gpt2.encoder.weight.std().item() == pytest.approx(0.02, rel=0.05)


# --- per-frame past labels ---------------------------------------------------------------------

class Table:
    """The few columns of a segment table that frame_actions reads."""

    def __init__(self, video, start_frame, end_frame, action, fps=30.0):
        self.video, self.action = np.asarray(video), np.asarray(action)
        self.start_frame, self.end_frame, self.fps = np.asarray(start_frame), np.asarray(end_frame), fps


def vidseg_labels(seg: Table, pool, video: int, times) -> list[int]:
    """AVT's _get_vidseg_labels on one clip: for each frame time, the rows of the same video
    with orig_start <= t <= orig_end; none: -1; several: argmin |t - (end - start) / 2|."""
    rows = [r for r in sorted(pool) if seg.video[r] == video]
    out = []
    for t in times:
        m = [r for r in rows if seg.start_frame[r] / seg.fps <= t and seg.end_frame[r] / seg.fps >= t]
        if not m:
            out.append(-1)
            continue
        half = np.array([(seg.end_frame[r] / seg.fps - seg.start_frame[r] / seg.fps) / 2.0 for r in m])
        out.append(int(seg.action[m[int(np.argmin(np.abs(t - half)))]]))
    return out


def test_frame_actions_match_avts_vidseg_labels():
    rng = np.random.default_rng(0)
    n = 80
    video = rng.integers(0, 4, n)
    start = rng.integers(0, 900, n)
    end = start + rng.integers(0, 300, n)  # overlaps, zero-length segments
    start[5], end[5], video[5] = start[6], end[6], video[6]  # identical twins: the first row wins
    seg = Table(video, start, end, rng.integers(0, 20, n))
    pool = rng.permutation(n)[:70]
    qvideo = rng.integers(0, 5, 40)  # video 4 has no segments
    times = np.round(rng.uniform(-1, 40, (40, 7)), 1)
    times[:, 0] = start[rng.integers(0, n, 40)] / 30.0  # exactly at a boundary
    got = frame_actions(seg, pool, qvideo, times)
    want = np.array([vidseg_labels(seg, pool, v, ts) for v, ts in zip(qvideo, times)])
    assert (want >= 0).sum() > 100 and (want == -1).sum() > 20
    np.testing.assert_array_equal(got, want)
