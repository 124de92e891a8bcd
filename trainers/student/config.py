"""Every knob of the AVT-h student, and the published presets.

The presets reproduce AVT's configs for precomputed TSN features (facebookresearch/AVT,
expts/11_egtea_avt_tsn.txt and expts/08_ek55_avt_tsn.txt) plus the distillation of "Text-Derived
Knowledge Helps Vision" (EACL Findings 2023) as its code computes it (loss_fn/kld_lm.py,
func/train.py, conf/config.yaml): KL at temperature T times T^2, averaged over all B x C
elements (``distill_reduction="elements"``); feature distillation weights 0. EGTEA: full KL,
weight 150, T = 10 (the committed config and kld_lm.py). EK55: the teacher's top-50 classes,
weight 20, T = 5, the setting every EK55 run directory of the paper's code is named after
(helpers/metrics_multiple.py: ``*_kldiv_top50_*_wt20_t5``; its EGTEA runs: ``*_wt150_t10``).
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

from kdstore.errors import ConfigError

from ..config import Rules, check, make



def _kd_modes() -> tuple[str, ...]:
    from .distill import KD_MODES, NONE  # the registry imports torch: looked up when checked, so the CLI starts fast

    return (*KD_MODES, NONE)


def _reductions() -> tuple[str, ...]:
    from .distill import REDUCTIONS

    return REDUCTIONS


RULES = Rules(choices={
    "attn_impl": ("auto", "sdpa", "xformers"),
    "distill_mode": _kd_modes,
    "distill_reduction": _reductions,
    "optimizer": ("sgd", "adam", "adamw"),
    "scheduler": ("cosine",),
    "data_on_device": ("auto", "always", "never"),
    "compile": ("off", "default", "reduce-overhead"),
    "preread": ("auto", "always", "never"),
}, positive=("num_frames", "fps", "tau_a", "n_layer", "n_head", "inter_dim", "temperature", "topk", "lr", "epochs",
             "batch_size", "grad_clip"),
   non_negative=("past_cls", "feat", "verb_noun_weight", "distill", "distill_feat", "distill_feat_mse",
                 "weight_decay", "momentum", "warmup_epochs", "label_smoothing",
                 "dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma"),
   fraction=("dropout", "block_dropout"))


@dataclass
class StudentConfig:
    """Hyper-parameters of one student run; defaults are the `egtea` preset."""

    # Input window: num_frames features sampled at fps, ending tau_a seconds before the action.
    num_frames: int = 10
    fps: float = 1.0
    tau_a: float = 0.5
    # Model.
    n_layer: int = 2
    n_head: int = 4
    inter_dim: int = 2048
    dropout: float = 0.8  # on features before the classifiers (AVT's model.dropout)
    block_dropout: float = 0.1  # embedding/attention/residual dropout of the GPT-2 blocks
    attn_impl: str = "auto"
    verb_noun_heads: bool = False
    # AVT's head as AVT trains it (facebookresearch/AVT; False: the simpler variants).
    past_first_frame: bool = True  # past classifier also scores the observed first frame's feature (T positions)
    past_frame_labels: bool = True  # past targets: the action under each frame (-1: ignored), not the anticipated one
    avt_init: bool = True  # encoder, decoder, classifiers N(0, 0.01) as AVT's BaseModel; False: GPT-2's N(0, 0.02)
    # Loss weights.
    past_cls: float = 0.1
    feat: float = 1.0
    verb_noun_weight: float = 1.0
    label_smoothing: float = 0.0
    distill: float = 150.0
    temperature: float = 10.0
    distill_mode: str = "full"
    distill_reduction: str = "elements"  # the paper's mean over B x C (topk: B x K); "rows": over B
    topk: int = 50
    distill_feat: float = 0.0  # 1 - cos(student future aggregate, teacher [CLS] feature)
    distill_feat_mse: float = 0.0  # MSE of the two, L2-normalised
    dkd_alpha: float = 1.0  # distill_mode dkd: weight of the target / non-target KL (TCKD)
    dkd_beta: float = 8.0  # distill_mode dkd: weight of the KL among the non-target classes (NCKD)
    dist_beta: float = 1.0  # distill_mode dist: weight of the inter-class relation (per row, across classes)
    dist_gamma: float = 1.0  # distill_mode dist: weight of the intra-class relation (per class, across rows)
    teacher_calibration: bool = False  # KD reads the teacher's logits divided by the temperature `kdstore calibrate` stored
    # Optimisation.
    optimizer: str = "sgd"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: int = 0
    epochs: int = 15
    batch_size: int = 64
    grad_clip: float | None = None  # max grad norm; None: no clipping (AVT's default)
    scheduler: str = "cosine"
    seed: int = 42
    # Execution (same results, other speed; a resume may change them).
    # data_on_device: keep the frames the split's windows reach and the teacher targets on the
    # training device and gather batches there (auto: on CUDA when they fit in a share of its
    # free memory; trainers.student.resident), else pinned host batches from a loader thread.
    data_on_device: str = "auto"
    # compile: torch.compile the forward and losses (their backward with them); "reduce-overhead"
    # replays them as CUDA graphs on CUDA (trainers.student.step).
    compile: str = "off"
    # preread: read the feature file once, sequentially, into the page cache before training
    # (auto: when the training windows reach much of it and it fits in available memory;
    # trainers.student.data.preread_on): a cold first epoch then gathers from memory.
    preread: str = "auto"

    def __post_init__(self) -> None:
        check(self, RULES, _relations)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        """Inverse of `to_dict`; unknown keys and invalid values raise one ConfigError."""
        return make(cls, d)


def _relations(c: StudentConfig) -> list[str]:
    out = []
    if c.inter_dim % c.n_head:
        out.append(f"inter_dim: {c.inter_dim} is not divisible by n_head={c.n_head}")
    if c.warmup_epochs >= c.epochs:
        out.append(f"warmup_epochs: {c.warmup_epochs} leaves no epoch of the {c.epochs} for the scheduler")
    if c.distill > 0:
        pairs = {"dkd": ("dkd_alpha", "dkd_beta"), "dist": ("dist_beta", "dist_gamma")}.get(c.distill_mode, ())
        if pairs and not any(getattr(c, p) > 0 for p in pairs):
            out.append(f"{', '.join(pairs)}: both 0 leave distill_mode={c.distill_mode!r} no term; set one > 0")
        if c.distill_mode == "std_topk" and c.topk < 2:
            out.append(f"topk: distill_mode 'std_topk' standardises over the teacher's top-K, needs >= 2, got {c.topk}")
    return out


# Fields that choose how a run executes, not what it computes: a resume may change them.
EXECUTION_FIELDS = ("data_on_device", "compile", "preread")


# The presets' values (checked whenever a preset is made).
PRESETS: dict[str, dict[str, Any]] = {
    "egtea": dict(
        num_frames=10, fps=1.0, tau_a=0.5,
        n_layer=2, n_head=4, inter_dim=2048, dropout=0.8,
        past_cls=0.1, feat=1.0,
        past_first_frame=True, past_frame_labels=True, avt_init=True,
        distill=150.0, temperature=10.0, distill_mode="full", distill_reduction="elements",  # 106 actions
        optimizer="sgd", lr=1e-3, weight_decay=1e-6, momentum=0.9, nesterov=True,
        warmup_epochs=0, epochs=15, batch_size=64, scheduler="cosine",
    ),
    "ek55": dict(
        num_frames=10, fps=2.0, tau_a=1.0,
        n_layer=12, n_head=8, inter_dim=2048, dropout=0.8,
        past_cls=0.0, feat=2.0,
        past_first_frame=True, past_frame_labels=True, avt_init=True,
        distill=20.0, temperature=5.0, distill_mode="topk", topk=50, distill_reduction="elements",  # 2513
        optimizer="adam", lr=5e-6, weight_decay=1e-4, nesterov=False,
        warmup_epochs=5, epochs=20, batch_size=32, scheduler="cosine",
    ),
}


def preset(name: str, **overrides: Any) -> StudentConfig:
    """A fresh copy of preset `name` with `overrides` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown student preset {name!r}; expected one of {sorted(PRESETS)}")
    return make(StudentConfig, PRESETS[name], overrides)
