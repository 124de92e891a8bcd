"""Every knob of a text-teacher build, and the presets.

``egtea`` and ``ek55`` hold the values the paper ("Text-Derived Knowledge Helps Vision",
EACL Findings 2023) states for fine-tuning a pretrained language model: history length
15 (EGTEA) / 5 (EK55), AdamW at lr 1e-5, the multi-task loss 0.8 action + 0.1 verb +
0.1 noun. They expect a pretrained checkpoint (``--init-from DIR``, e.g. a local copy of
bert-base-uncased); without one they train BERT-base from scratch, which lr 1e-5 does badly.

``egtea-scratch`` is the CPU recipe, sized so that the whole 5-fold build of one EGTEA
split (pretraining + 6 fine-tunes) runs in well under 30 minutes on 2 CPU cores: a "mini"
BERT (hidden 128, 2 layers; "small", hidden 256 x 4 layers, costs ~6x more a step here)
pretrained with masked-LM on the training split's action sequences only, then fine-tuned
at lr 1e-3 (1e-5 moves a randomly initialised model far too slowly), max_len 48 (the last
~11 actions), two stages at a time in worker processes of one thread each. Two additions
of ours, chosen on validation1 against the n-gram baseline (splits 2 and 3 were not
used): mild class weights ((n / (C count)) ** 0.25, ``class_weighted``) for class-mean
recall, and ``history_dropout=0.5``, which trains on thinned histories too, since a gappy
split's histories skip ~4 of 5 actions.
``egtea-cpu`` is the ``egtea`` preset sized for a small pretrained checkpoint on 2 CPU
cores (``--init-from``, e.g. all-MiniLM-L6-v2, 22M parameters): the last ~9 actions
(max_len 48), 3 epochs at lr 3e-4 with frozen word embeddings (the optimizer then skips
half the weights), and ``egtea-scratch``'s two additions; sized for time, not tuned
(docs/results.md measures it with one and two epochs at max_len 32).
``ek100-cpu`` is the CPU recipe for EPIC-KITCHENS-100 (``training`` -> ``validation``,
76,885 training segments, 3,806 actions), sized for the 5-fold build to run within an hour
on 2 CPU cores: the paper's history length 5 (max_len 32 holds 5 actions of this
vocabulary), a "tiny" BERT (hidden 64, 2 layers) from scratch without pretraining, batch
16 at lr 3e-3 for 3 epochs (a mini BERT at batch 32-64 barely left the class prior in that
budget), histories newest action first (``recent_first``), no history dropout (EK100's
histories are complete within a video), and ``prior_correction=0.5``, a post-hoc logit
adjustment towards the challenge's class-mean recall (chosen on validation); top-K for
K = 50. Its figures against the n-gram, and the probes behind it, are in docs/results.md.
``demo`` is a quick variant for the synthetic demo; ``tiny`` is for tests.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass

from kdstore.errors import ConfigError

from .device import DEVICES

FAMILIES = ("bert", "roberta", "distilbert", "albert", "deberta", "electra")
SIZES = ("tiny", "mini", "small", "base")


@dataclass
class TeacherConfig:
    """Hyper-parameters of one teacher build; defaults are the ``egtea`` preset."""

    # Model: a transformers family at a size preset, or a local HF checkpoint.
    family: str = "bert"
    size: str = "base"
    init_from: str | None = None  # local HF checkpoint dir (its tokenizer gains <v>, <a>)
    vocab_size: int = 512  # WordPiece vocabulary trained on the histories (no init_from)
    dropout: float = 0.1
    pooling: str = "cls"  # the heads read the [CLS] state ("cls", the paper's) or the tokens' mean ("mean")
    freeze_embeddings: bool = False  # keep a checkpoint's word embeddings fixed while fine-tuning
    # Input: the text of the actions before a segment.
    hist_len: int = 15
    multi_history: tuple[int, ...] = ()  # e.g. (5, 10, 15): train on each, average predictions
    history: str = "gappy"  # gappy: history from the segment's own split; complete: all splits
    max_len: int = 128  # tokens, [CLS]/[SEP] included; truncation drops the oldest tokens
    history_dropout: float = 0.0  # train on histories thinned at a rate drawn from [0, this) (see finetune.Thinning)
    recent_first: bool = False  # history text newest action first, next to [CLS] (truncation then drops the oldest, at the end)
    colon: str = "keep"  # class-name compounds: EGTEA "keep" (eating:utensil), EK55 "reverse" (pan:dust)
    # Loss.
    multi_task: bool = True  # 0.8 CE_action + 0.1 CE_verb + 0.1 CE_noun; else CE_action
    class_weighted: float = 0.0  # CE weights (n / (C * count)) ** this: 0 off, 1 balanced, 0.5 square root
    label_smoothing: float = 0.0
    # Post-hoc logit adjustment of every stored prediction: scores - this * log(class prior on the
    # training labels), per head. Trades top-1 accuracy for class-mean recall; 0: off.
    prior_correction: float = 0.0
    # Optimisation (AdamW, no decay on bias/LayerNorm, linear warmup then linear decay).
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    epochs: int = 10
    batch_size: int = 32
    grad_clip: float = 1.0
    # Out-of-fold predictions for the training split: K-fold cross-fitting by video.
    folds: int = 5
    topk: int = 50
    # Masked-LM pretraining on the training histories before fine-tuning (0: none).
    pretrain_epochs: int = 0
    pretrain_lr: float = 5e-4
    pretrain_batch_size: int = 32
    pretrain_window: int = 16  # actions per pretraining line (a video's train sequence, cut)
    mask_prob: float = 0.15
    # With an external corpus (build_teacher's ``corpus``): (history, next action) fine-tuning
    # examples drawn from its lines, added to every stage's training examples (0: none).
    corpus_examples: int = 0
    seed: int = 0
    threads: int = 1  # torch threads per process (1 is fastest for these small models on a busy CPU)
    workers: int = 1  # fine-tuning stages (full model, folds) in parallel processes: on CPU in all, on CUDA per GPU
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda (every visible GPU, bf16 autocast)

    def __post_init__(self) -> None:
        self.multi_history = tuple(self.multi_history)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.family not in FAMILIES:
            raise ConfigError(f"TeacherConfig.family: expected one of {FAMILIES}, got {self.family!r}")
        if self.size not in SIZES:
            raise ConfigError(f"TeacherConfig.size: expected one of {SIZES}, got {self.size!r}")
        if self.colon not in ("keep", "reverse"):
            raise ConfigError(f"TeacherConfig.colon: expected 'keep' or 'reverse', got {self.colon!r}")
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"TeacherConfig.pooling: expected 'cls' or 'mean', got {self.pooling!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"TeacherConfig.device: expected one of {DEVICES}, got {self.device!r}")
        if self.history not in ("gappy", "complete"):
            raise ConfigError(f"TeacherConfig.history: expected 'gappy' or 'complete', got {self.history!r}")
        for name in ("hist_len", "max_len", "lr", "epochs", "batch_size", "folds", "topk", "vocab_size",
                     "pretrain_lr", "pretrain_batch_size", "pretrain_window", "threads", "workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TeacherConfig.{name}: expected > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "pretrain_epochs", "corpus_examples", "grad_clip", "label_smoothing", "class_weighted",
                     "prior_correction"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TeacherConfig.{name}: expected >= 0, got {getattr(self, name)!r}")
        for name in ("dropout", "warmup", "label_smoothing", "history_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"TeacherConfig.{name}: expected in [0, 1), got {getattr(self, name)!r}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"TeacherConfig.mask_prob: expected in (0, 1), got {self.mask_prob!r}")
        if any(h <= 0 for h in self.multi_history):
            raise ConfigError(f"TeacherConfig.multi_history: lengths must be > 0, got {self.multi_history}")
        if self.max_len < 8:
            raise ConfigError(f"TeacherConfig.max_len: expected >= 8 tokens, got {self.max_len}")

    @property
    def hist_lens(self) -> tuple[int, ...]:
        """The history lengths a segment is read at (one unless ``multi_history``)."""
        return self.multi_history or (self.hist_len,)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "multi_history": list(self.multi_history)}


def _check_type(name: str, value, hint) -> None:
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = typing.get_args(hint)
        if any(_matches(value, t) for t in options):
            return
    elif _matches(value, hint):
        return
    raise ConfigError(f"TeacherConfig.{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _matches(value, t) -> bool:
    if t is type(None):
        return value is None
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(t) is tuple:
        return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


PRESETS: dict[str, dict] = {
    "egtea": {},
    "ek55": {"hist_len": 5, "max_len": 64, "colon": "reverse"},
    "egtea-scratch": dict(
        size="mini", max_len=48, lr=1e-3, epochs=8, batch_size=64, class_weighted=0.25, history_dropout=0.5,
        pretrain_epochs=20, pretrain_lr=1e-3, workers=2,
    ),
    "egtea-cpu": dict(
        max_len=48, lr=3e-4, epochs=3, class_weighted=0.25, history_dropout=0.5, freeze_embeddings=True, workers=2,
    ),
    "ek100-cpu": dict(
        size="tiny", hist_len=5, max_len=32, colon="reverse", recent_first=True, lr=3e-3, epochs=3, batch_size=16,
        dropout=0.0, prior_correction=0.5, folds=5, topk=50, workers=2,
    ),
    "demo": dict(
        size="mini", max_len=64, lr=1e-3, epochs=6, batch_size=32, pretrain_epochs=10, pretrain_lr=1e-3, workers=2,
    ),
    "tiny": dict(
        size="tiny", hist_len=4, max_len=32, vocab_size=256, lr=3e-3, epochs=3, batch_size=16,
        folds=2, topk=10, pretrain_lr=3e-3, pretrain_window=8, dropout=0.0,
    ),
}


def preset(name: str, **overrides) -> TeacherConfig:
    """The named preset with ``overrides`` applied (None values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"teacher preset {name!r}: expected one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"teacher config: unknown option(s) {', '.join(unknown)}")
    return TeacherConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def config_from_dict(d: dict) -> TeacherConfig:
    """The config saved with a build (``to_dict``), checked again."""
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    return TeacherConfig(**{k: (tuple(v) if k == "multi_history" else v) for k, v in d.items() if k in fields})


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs with JSON values (``lr=5e-4``, ``multi_history=[5,10,15]``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
