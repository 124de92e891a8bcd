"""Teacher models: a transformers encoder (any family) with action, verb and noun heads.

Encoders come from the Auto classes: ``AutoConfig.for_model`` + ``from_config`` for a
family at a size preset (random init), or ``from_pretrained`` on a local checkpoint dir
(safetensors only). The teacher pools the encoder's last hidden state: position 0 (the
[CLS] / <s> token, the paper's choice, ``pooling="cls"``) or the mean over the real
tokens (``"mean"``, how sentence-transformers checkpoints were trained). The pooled
vector feeds the heads and is stored as the teacher's features.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedTokenizerFast

from kdstore.errors import ConfigError

from .optim import check_json_files, read_json, read_safetensors
from .tokenizer import TOKENIZER_FILES

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# hidden, layers, heads, intermediate
SIZE_PRESETS = {
    "tiny": (64, 2, 2, 256),
    "mini": (128, 2, 2, 512),
    "small": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
}
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "albert": "albert",
               "deberta": "deberta-v2", "electra": "electra"}
HEADS_FILE, TEACHER_FILE = "heads.safetensors", "teacher.json"
JSON_FILES = ("config.json", *TOKENIZER_FILES, TEACHER_FILE)
POOLINGS = ("cls", "mean")


def encoder_config(family: str, size: str, tok: PreTrainedTokenizerFast, max_len: int, dropout: float = 0.1) -> PretrainedConfig:
    """A randomly-initialisable config of ``family`` at ``size`` for this tokenizer."""
    if family not in MODEL_TYPES:
        raise ConfigError(f"model family {family!r}: expected one of {', '.join(MODEL_TYPES)}")
    if size not in SIZE_PRESETS:
        raise ConfigError(f"model size {size!r}: expected one of {', '.join(SIZE_PRESETS)}")
    h, layers, heads, inter = SIZE_PRESETS[size]
    kw = dict(
        vocab_size=len(tok), max_position_embeddings=max_len + 2,  # roberta's positions start at pad+1
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    )
    if family == "distilbert":
        kw |= dict(dim=h, n_layers=layers, n_heads=heads, hidden_dim=inter, dropout=dropout, attention_dropout=dropout)
    else:
        kw |= dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                   hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if family in ("albert", "electra"):
        kw["embedding_size"] = min(128, h)
    if family == "roberta":
        kw["type_vocab_size"] = 1
    return AutoConfig.for_model(MODEL_TYPES[family], **kw)


def check_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a local HF checkpoint dir (config.json + safetensors weights + a
    tokenizer), else ConfigError; also one naming the file if a JSON file of it is unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a Hugging Face checkpoint directory (no such directory)")
    missing = [] if (path / "config.json").exists() else ["config.json"]
    if not [p for p in path.glob("*.safetensors") if p.name != HEADS_FILE]:
        missing.append("model.safetensors")
    if not (path / "tokenizer.json").exists() and not (path / "vocab.txt").exists():
        missing.append("tokenizer.json")
    if missing:
        raise ConfigError(f"{path}: not a Hugging Face checkpoint directory (missing {', '.join(missing)})")
    check_json_files(path, JSON_FILES)
    return path


def load_mlm(path: str | Path, tok: PreTrainedTokenizerFast) -> nn.Module:
    """A masked-LM model from a local checkpoint, embeddings resized to the tokenizer."""
    return _load_local(AutoModelForMaskedLM, path, tok, "as a masked-LM checkpoint")


def _load_local(auto_cls, path: str | Path, tok: PreTrainedTokenizerFast, what: str) -> nn.Module:
    """``auto_cls`` from a local checkpoint (safetensors only), embeddings grown to the tokenizer."""
    path = check_checkpoint(path)
    try:
        model = auto_cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except SafetensorError as e:
        files = ", ".join(str(p) for p in sorted(path.glob("*.safetensors")) if p.name != HEADS_FILE)
        raise ConfigError(f"{files}: unreadable checkpoint file ({str(e).splitlines()[0][:160]})") from None
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot load {what} ({str(e).splitlines()[0][:160]})") from None
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    return model


def check_positions(model: nn.Module, max_len: int) -> None:
    """ConfigError if ``max_len`` tokens do not fit the encoder's position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    if "roberta" in model.config.model_type:  # its positions start at pad + 1
        limit -= model.config.pad_token_id + 1
    if max_len > limit:
        raise ConfigError(f"max_len {max_len}: the model has only {limit} positions")


class TeacherModel(nn.Module):
    """Encoder + linear action/verb/noun heads on the pooled last hidden state."""

    def __init__(self, encoder: nn.Module, num_actions: int, num_verbs: int, num_nouns: int, dropout: float = 0.1,
                 pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.encoder, self.pooling = encoder, pooling
        hidden = _hidden_size(encoder.config)
        self.drop = nn.Dropout(dropout)
        self.action = nn.Linear(hidden, num_actions)
        self.verb = nn.Linear(hidden, num_verbs)
        self.noun = nn.Linear(hidden, num_nouns)

    @property
    def num_classes(self) -> tuple[int, int, int]:
        return self.action.out_features, self.verb.out_features, self.noun.out_features

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        if self.pooling == "cls":
            pooled = h[:, 0]  # [B, H]
        else:
            m = mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # [B, H]
        x = self.drop(pooled)
        return {"action": self.action(x), "verb": self.verb(x), "noun": self.noun(x), "features": pooled}

    def freeze_embeddings(self) -> None:
        """Keep the encoder's word embeddings as they are (positions and LayerNorm still train);
        the optimizer then skips them, a third to a half of a small checkpoint's weights."""
        self.encoder.get_input_embeddings().weight.requires_grad_(False)

    def save(self, path: str | Path, tok: PreTrainedTokenizerFast, extra: dict | None = None) -> None:
        """Write an HF checkpoint of the encoder + tokenizer, plus the heads and their class counts."""
        path = Path(path)
        self.encoder.save_pretrained(path)
        tok.save_pretrained(path)
        heads = {f"{n}.{k}": v.detach().contiguous() for n in ("action", "verb", "noun") for k, v in getattr(self, n).state_dict().items()}
        save_file(heads, path / HEADS_FILE)
        A, V, N = self.num_classes
        (path / TEACHER_FILE).write_text(json.dumps({"num_actions": A, "num_verbs": V, "num_nouns": N, **(extra or {})}, indent=1))


def _hidden_size(config: PretrainedConfig) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "dim"))


def scratch_teacher(family: str, size: str, tok: PreTrainedTokenizerFast, max_len: int, classes: tuple[int, int, int],
                    dropout: float, pooling: str = "cls") -> TeacherModel:
    """A randomly initialised teacher of ``family`` at ``size``."""
    encoder = AutoModel.from_config(encoder_config(family, size, tok, max_len, dropout))
    return TeacherModel(encoder, *classes, dropout=dropout, pooling=pooling)


def pretrained_teacher(path: str | Path, tok: PreTrainedTokenizerFast, classes: tuple[int, int, int], dropout: float,
                       pooling: str = "cls", max_len: int | None = None) -> TeacherModel:
    """A teacher whose encoder comes from a local checkpoint (a BERT-family or
    sentence-transformers directory, a ``pretrain-lm`` output or a teacher export).

    A teacher export (``heads.safetensors`` + ``teacher.json``) also restores the heads;
    ConfigError if its class counts differ from ``classes``, or if ``max_len`` tokens do
    not fit the encoder's positions.
    """
    path = check_checkpoint(path)
    encoder = _load_local(AutoModel, path, tok, "the encoder")
    if max_len is not None:
        check_positions(encoder, max_len)
    model = TeacherModel(encoder, *classes, dropout=dropout, pooling=pooling)
    if (path / HEADS_FILE).exists():
        meta = read_json(path / TEACHER_FILE, hint=None) if (path / TEACHER_FILE).exists() else {}
        found = tuple(meta.get(k) for k in ("num_actions", "num_verbs", "num_nouns"))
        if found != tuple(classes):
            raise ConfigError(
                f"{path}: teacher heads have {found[0]} actions, {found[1]} verbs, {found[2]} nouns;"
                f" the store has {classes[0]}, {classes[1]}, {classes[2]}"
            )
        heads = read_safetensors(path / HEADS_FILE)
        for n in ("action", "verb", "noun"):
            getattr(model, n).load_state_dict({k: heads[f"{n}.{k}"] for k in ("weight", "bias")})
    return model
