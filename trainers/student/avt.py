"""AVT-h, the head of the Anticipative Video Transformer (Girdhar & Grauman, ICCV 2021).

A causal GPT-2 over precomputed per-frame features. Position t sees frames 0..t and predicts
the feature of frame t+1; the prediction at the last position is "the future", which a linear
classifier maps to the anticipated action. As in AVT, the classifiers read the decoded
(feature-space) predictions, after a strong dropout, and the past classifier scores AVT's
"updated past": the observed first frame, then the prediction of each later frame
(facebookresearch/AVT models/future_prediction.py ``AVTh.forward``, models/base_model.py
``forward_singlecrop``).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdstore.errors import ConfigError, DataError, DependencyError
from trainers.student.config import StudentConfig


@dataclass(frozen=True)
class AVTConfig:
    """The head's shape and regularisation: all the model needs, nothing of its training."""

    num_frames: int = 10  # positions of the learned position embedding
    n_layer: int = 2
    n_head: int = 4
    inter_dim: int = 2048
    dropout: float = 0.8  # on the features the classifiers read
    block_dropout: float = 0.1
    attn_impl: str = "auto"
    verb_noun_heads: bool = False
    classify_past: bool = True  # also output past_logits
    past_first_frame: bool = True  # past_logits over T positions (AVT), else over the T-1 predictions
    avt_init: bool = True

    @classmethod
    def of(cls, cfg: StudentConfig) -> "AVTConfig":
        """The model part of a student config."""
        return cls(num_frames=cfg.num_frames, n_layer=cfg.n_layer, n_head=cfg.n_head, inter_dim=cfg.inter_dim,
                   dropout=cfg.dropout, block_dropout=cfg.block_dropout, attn_impl=cfg.attn_impl,
                   verb_noun_heads=cfg.verb_noun_heads, classify_past=cfg.past_cls > 0,
                   past_first_frame=cfg.past_first_frame, avt_init=cfg.avt_init)


def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise DependencyError(
            "attn_impl='xformers' needs xformers, which is not installed; "
            "run pip install 'kdstore[gpu]'") from e
    return xops


_XFORMERS_WORKS: dict[tuple, bool] = {}


def xformers_works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether xformers imports and its causal memory-efficient attention runs forward and
    backward (with dropout) on ``device`` for ``dtype`` heads of width ``head_dim``; cached.
    False, for instance, on a CPU (no training kernels) or where the installed xformers was
    built for another torch (its CUDA operators do not load)."""
    key = (device.type, device.index, dtype, head_dim)
    if key not in _XFORMERS_WORKS:
        try:
            import xformers.ops as xops

            q = torch.randn(1, 4, 2, head_dim, device=device, dtype=dtype, requires_grad=True)  # [B, T, H, C/H]
            xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask(), p=0.1).sum().backward()
            _XFORMERS_WORKS[key] = True
        except Exception:  # noqa: BLE001 - any failure (import, no operator, no kernel) means "use SDPA"
            _XFORMERS_WORKS[key] = False
    return _XFORMERS_WORKS[key]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t.

    ``attn_impl="auto"`` is resolved at the first forward, for the device and dtype of its
    queries: xformers where :func:`xformers_works`, else SDPA (``self.impl`` then says which).
    The probe is eager code: resolve before compiling (``AVTHead.resolve_attention``, which
    the trainer's compiled step calls).
    """

    def __init__(self, cfg: AVTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.p_drop = cfg.block_dropout
        self.impl = cfg.attn_impl
        if self.impl == "xformers":
            _xformers_ops()  # fail at construction, not at the first step
        self.qkv = nn.Linear(cfg.inter_dim, 3 * cfg.inter_dim)
        self.proj = nn.Linear(cfg.inter_dim, cfg.inter_dim)
        self.resid_drop = nn.Dropout(cfg.block_dropout)

    def resolve(self, device: torch.device, dtype: torch.dtype) -> None:
        """Settle ``attn_impl="auto"`` for queries of ``dtype`` on ``device``."""
        if self.impl == "auto":
            head_dim = self.qkv.out_features // 3 // self.n_head
            self.impl = "xformers" if xformers_works(torch.device(device), dtype, head_dim) else "sdpa"

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] -> [B, T, C]."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)  # 3 x [B, T, H, C/H]
        p = self.p_drop if self.training else 0.0
        if self.impl == "auto":
            self.resolve(q.device, q.dtype)
        if self.impl == "xformers":
            xops = _xformers_ops()
            y = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask(), p=p)  # [B, T, H, C/H]
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # 3 x [B, H, T, C/H]
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True).transpose(1, 2)  # [B, T, H, C/H]
        return self.resid_drop(self.proj(y.reshape(B, T, C)))  # [B, T, C]


class Block(nn.Module):
    """GPT-2 block: pre-LN attention and 4x GELU MLP, each on a residual branch."""

    def __init__(self, cfg: AVTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.inter_dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.inter_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.inter_dim, 4 * cfg.inter_dim),
            nn.GELU(approximate="tanh"),  # GPT-2's gelu_new
            nn.Linear(4 * cfg.inter_dim, cfg.inter_dim),
            nn.Dropout(cfg.block_dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, C] -> [B, T, C]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AVTHead(nn.Module):
    """AVT-h on features of dimension `feat_dim`.

    `cfg` is an :class:`AVTConfig` (a StudentConfig is read through ``AVTConfig.of``).
    `num_verbs` and `num_nouns` size the optional verb and noun heads (cfg.verb_noun_heads).
    With `teacher_dim` (feature distillation) the model also outputs its future prediction in
    the teacher's feature space: through a learned bias-free projection when the widths differ.
    """

    def __init__(self, feat_dim: int, num_actions: int, num_verbs: int, num_nouns: int,
                 cfg: AVTConfig | StudentConfig, teacher_dim: int | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, AVTConfig) else AVTConfig.of(cfg)
        if cfg.verb_noun_heads and min(num_verbs, num_nouns) < 1:
            raise ConfigError(f"verb_noun_heads needs num_verbs and num_nouns >= 1, "
                              f"got {num_verbs} and {num_nouns}")
        self.cfg, self.feat_dim, self.max_frames = cfg, feat_dim, cfg.num_frames
        # Bias-free encoder/decoder as in AVT: the decoder output is a feature, not a logit.
        self.encoder = nn.Linear(feat_dim, cfg.inter_dim, bias=False)
        self.pos_emb = nn.Embedding(cfg.num_frames, cfg.inter_dim)
        self.drop = nn.Dropout(cfg.block_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.inter_dim)
        self.decoder = nn.Linear(cfg.inter_dim, feat_dim, bias=False)
        self.cls_drop = nn.Dropout(cfg.dropout)
        self.action_head = nn.Linear(feat_dim, num_actions)
        self.verb_head = nn.Linear(feat_dim, num_verbs) if cfg.verb_noun_heads else None
        self.noun_head = nn.Linear(feat_dim, num_nouns) if cfg.verb_noun_heads else None
        self.teacher_proj = None
        if teacher_dim is not None:
            self.teacher_proj = nn.Linear(feat_dim, teacher_dim, bias=False) if teacher_dim != feat_dim else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init for the transformer (transformers' ``GPT2PreTrainedModel._init_weights``:
        N(0, 0.02), zero biases, residual projections N(0, 0.02 / sqrt(2 n_layer)), unit layer
        norms); with avt_init the Linear layers outside it N(0, 0.01) with zero biases, as AVT's
        ``BaseModel._initialize_weights`` leaves them (it re-initialises every nn.Linear, and
        GPT-2's own layers are transformers' Conv1D, which it does not touch)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        if self.cfg.avt_init:
            outside = (self.encoder, self.decoder, self.action_head, self.verb_head, self.noun_head, self.teacher_proj)
            for m in outside:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.01)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def resolve_attention(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Settle ``attn_impl="auto"`` now, for the attention's inputs of ``dtype`` on ``device``
        (e.g. before compiling; otherwise the first forward does it)."""
        for block in self.blocks:
            block.attn.resolve(torch.device(device), dtype)

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        """frames [B, T, D] with T <= cfg.num_frames -> dict of

        logits [B, A] (the future: the last position's prediction), pred_feats [B, T, D]
        (position t predicts frame t+1), past_logits when cfg.classify_past ([B, T, A] over
        frame 0's feature and the predictions of frames 1..T-1 with past_first_frame, else
        [B, T-1, A] over those predictions), verb_logits [B, V] and noun_logits [B, N] when
        verb_noun_heads, and future_agg [B, H] with teacher_dim (the future prediction, before
        dropout, in the teacher's space: the paper's feature-distillation input).
        """
        if (frames.ndim != 3 or frames.shape[-1] != self.feat_dim
                or not 1 <= frames.shape[1] <= self.max_frames):
            raise DataError(f"frames: expected [B, T<={self.max_frames}, {self.feat_dim}], "
                            f"got {list(frames.shape)}")
        T = frames.shape[1]
        x = self.drop(self.encoder(frames) + self.pos_emb.weight[:T])  # [B, T, C]
        for block in self.blocks:
            x = block(x)  # [B, T, C]
        pred_feats = self.decoder(self.ln_f(x))  # [B, T, D]
        future = self.cls_drop(pred_feats[:, -1])  # [B, D]; one dropout mask for every future head, as AVT
        out = {"logits": self.action_head(future), "pred_feats": pred_feats}
        if self.cfg.classify_past:
            past = pred_feats[:, :-1]  # [B, T-1, D]
            if self.cfg.past_first_frame:
                past = torch.cat([frames[:, :1], past], dim=1)  # [B, T, D]
            out["past_logits"] = self.action_head(self.cls_drop(past))  # [B, T or T-1, A]
        if self.verb_head is not None:
            out["verb_logits"] = self.verb_head(future)  # [B, V]
            out["noun_logits"] = self.noun_head(future)  # [B, N]
        if self.teacher_proj is not None:
            out["future_agg"] = self.teacher_proj(pred_feats[:, -1])  # [B, H]
        return out
