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
``epic-cpu`` is ``ek100-cpu`` made to learn on EPIC-KITCHENS-55 too (23,493 training
segments, 2,513 actions named by 721 surface words): the heads read the mean of the token
states (``pooling="mean"``) and the vocabulary holds 1,024 tokens. With [CLS] pooling the
tiny BERT at lr 3e-3 needs many optimizer steps before [CLS] carries the history, and the
warmup, a tenth of the steps, reaches the peak lr after 436 steps on EK55 (1,261 on
EK100): three epochs of EK55 left it at 10 % top-1 on its own training rows (the bigram:
29 %), while the mean of the token states carries the last action from the first step.
With 512 tokens, 287 of EK55's words came out as several tokens, the rarer ones in characters.
docs/results.md has the probes (``bench/teacher_fit.py``) and the figures on both.
``demo`` is a quick variant for the synthetic demo; ``tiny`` is for tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kdstore.errors import ConfigError

from ..config import Rules, check, make

FAMILIES = ("bert", "roberta", "distilbert", "albert", "deberta", "electra")
SIZES = ("tiny", "mini", "small", "base")
DEVICES = ("auto", "cpu", "cuda")

TEACHER_RULES = Rules(
    choices={"family": FAMILIES, "size": SIZES, "pooling": ("cls", "mean"), "history": ("gappy", "complete"),
             "colon": ("keep", "reverse"), "device": DEVICES},
    positive=("hist_len", "multi_history", "lse_temperatures", "lr", "epochs", "batch_size", "folds", "topk", "vocab_size",
              "pretrain_lr", "pretrain_batch_size", "pretrain_window", "threads", "workers"),
    non_negative=("weight_decay", "pretrain_epochs", "corpus_examples", "grad_clip", "class_weighted", "prior_correction"),
    fraction=("dropout", "warmup", "label_smoothing", "history_dropout"),
    probability=("mask_prob",),
    minimum={"max_len": 8},  # [CLS], [SEP] and a few actions' tokens
)

PRETRAIN_RULES = Rules(
    choices={"family": FAMILIES, "size": SIZES, "device": DEVICES},
    positive=("vocab_size", "epochs", "lr", "batch_size", "threads"),
    non_negative=("weight_decay",),
    fraction=("warmup", "dropout"),
    probability=("mask_prob",),
    minimum={"max_len": 8},
)


@dataclass
class TeacherConfig:
    """Hyper-parameters of one teacher build; defaults are the ``egtea`` preset."""

    # Model: a transformers family at a size preset, or a local HF checkpoint.
    family: str = "bert"  # the encoder's transformers family (without init_from)
    size: str = "base"  # tiny (hidden 64 x 2 layers), mini (128 x 2), small (256 x 4) or base (768 x 12)
    init_from: str | None = None  # local HF checkpoint dir (its tokenizer gains <v>, <a>)
    vocab_size: int = 512  # WordPiece vocabulary trained on the histories (no init_from)
    dropout: float = 0.1
    pooling: str = "cls"  # the heads read the [CLS] state ("cls", the paper's) or the tokens' mean ("mean")
    freeze_embeddings: bool = False  # keep a checkpoint's word embeddings fixed while fine-tuning
    # Input: the text of the actions before a segment.
    hist_len: int = 15  # actions of history (paper: 15 EGTEA, 5 EK55)
    multi_history: tuple[int, ...] = ()  # history lengths, e.g. 5,10,15: train on each, average predictions
    history: str = "gappy"  # gappy: history from the segment's own split; complete: all splits
    max_len: int = 128  # tokens, [CLS]/[SEP] included; truncation drops the oldest tokens
    history_dropout: float = 0.0  # train on histories thinned at a rate drawn from [0, this) (see finetune.Thinning)
    recent_first: bool = False  # history text newest action first, next to [CLS] (truncation then drops the oldest, at the end)
    colon: str = "keep"  # class-name compounds: EGTEA "keep" (eating:utensil), EK55 "reverse" (pan:dust)
    # Loss.
    multi_task: bool = True  # 0.8 CE_action + 0.1 CE_verb + 0.1 CE_noun; else CE_action
    class_weighted: float = 0.0  # CE weights (n / (C * count)) ** this: 0 off, 1 balanced, 0.5 square root
    label_smoothing: float = 0.0
    prior_correction: float = 0.0  # stored scores - this * log(training class prior), every head: class-mean recall over top-1 (0: off)
    # Optimisation (AdamW, no decay on bias/LayerNorm, linear warmup then linear decay).
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    epochs: int = 10
    batch_size: int = 32
    grad_clip: float = 1.0
    # Out-of-fold predictions for the training split: K-fold cross-fitting by video.
    folds: int = 5  # 1: the full model predicts every split
    topk: int = 50  # logits stored a UID
    lse_temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 10.0)  # log-sum-exp columns stored (KD topk_lse reads one; kdstore add-lse adds more)
    # Masked-LM pretraining on the training histories before fine-tuning.
    pretrain_epochs: int = 0  # MLM epochs before fine-tuning (0: none)
    pretrain_lr: float = 5e-4
    pretrain_batch_size: int = 32
    pretrain_window: int = 16  # actions per pretraining line (a video's train sequence, cut)
    mask_prob: float = 0.15
    # With an external corpus (build_teacher's ``corpus``): (history, next action) fine-tuning
    # examples drawn from its lines, added to every stage's training examples.
    corpus_examples: int = 0  # fine-tuning examples drawn from the external corpus (0: none)
    seed: int = 0
    threads: int = 1  # torch threads per process (1 is fastest for these small models on a busy CPU)
    workers: int = 1  # fine-tuning stages (full model, folds) in parallel processes: on CPU in all, on CUDA per GPU
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda (every visible GPU, bf16 autocast)

    def __post_init__(self) -> None:
        check(self, TEACHER_RULES)

    @property
    def hist_lens(self) -> tuple[int, ...]:
        """The history lengths a segment is read at (one unless ``multi_history``)."""
        return self.multi_history or (self.hist_len,)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict."""
        return {**dataclasses.asdict(self), "multi_history": list(self.multi_history),
                "lse_temperatures": list(self.lse_temperatures)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherConfig":
        """Inverse of ``to_dict`` (the config saved with a build); unknown keys and invalid
        values raise one ConfigError."""
        return make(cls, d)


@dataclass
class PretrainConfig:
    """Knobs of one masked-LM run (``kdstore pretrain-lm``, or a build's ``pretrain_epochs``)."""

    family: str = "bert"
    size: str = "small"
    init_from: str | None = None  # local HF checkpoint dir to continue from (its tokenizer gains <v>, <a>)
    vocab_size: int = 512  # WordPiece vocabulary trained on the corpus (no init_from)
    max_len: int = 64  # tokens a chunk, [CLS]/[SEP] included
    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    mask_prob: float = 0.15  # of the non-special tokens, predicted
    dropout: float = 0.1
    seed: int = 0
    threads: int = 1  # torch CPU threads
    device: str = "auto"  # auto (CUDA when visible), cpu or cuda (the first visible GPU, bf16 autocast)

    def __post_init__(self) -> None:
        check(self, PRETRAIN_RULES)


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
    "epic-cpu": dict(
        size="tiny", hist_len=5, max_len=32, colon="reverse", recent_first=True, pooling="mean", vocab_size=1024,
        lr=3e-3, epochs=3, batch_size=16, dropout=0.0, prior_correction=0.5, folds=5, topk=50, workers=2,
    ),
    "demo": dict(
        size="mini", max_len=64, lr=1e-3, epochs=6, batch_size=32, pretrain_epochs=10, pretrain_lr=1e-3, workers=2,
    ),
    "tiny": dict(
        size="tiny", hist_len=4, max_len=32, vocab_size=256, lr=3e-3, epochs=3, batch_size=16,
        folds=2, topk=10, pretrain_lr=3e-3, pretrain_window=8, dropout=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> TeacherConfig:
    """A fresh copy of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ConfigError(f"teacher preset {name!r}: expected one of {', '.join(PRESETS)}")
    return make(TeacherConfig, PRESETS[name], overrides)
