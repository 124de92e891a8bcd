"""The action-language tokenizer: WordPiece built from the corpus, or a checkpoint's own.

Teachers read histories as ``verb <v> noun <a> verb <v> noun``; ``<v>`` and ``<a>`` are
special tokens so they are never split and never masked in pretraining.

Tokenized texts live in ``Tokens``: one right-padded int32 array and the lengths, filled
in chunks (``encode``), so a training set of tens of thousands of histories is a
few tens of MB and no per-text Python objects.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdstore.errors import ConfigError, DataError

from .optim import check_json_files

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<v>", "<a>"]
ACTION_TOKENS = ["<v>", "<a>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A lowercase WordPiece tokenizer built from ``texts``, ``[CLS] text [SEP]`` on encode.

    The vocabulary is the special tokens, every character (alone and as a ``##`` suffix) and
    then whole words by descending count (ties alphabetical) up to ``vocab_size``: class names
    are a small closed set, so whole words fit, and unlike the WordPiece trainer (which breaks
    ties between merges in hash order) the same texts always give the same vocabulary.
    """
    tok = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        for piece in text.split():
            if piece not in SPECIAL_TOKENS:
                counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(piece)))
    chars = sorted({c for w in counts for c in w})
    alphabet = chars + [f"##{c}" for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1]
    ordered = SPECIAL_TOKENS + alphabet + words[: max(0, vocab_size - len(SPECIAL_TOKENS) - len(alphabet))]
    tok.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", extra_special_tokens=ACTION_TOKENS,
    )
    return _prepare(fast)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a local checkpoint dir, with ``<v>``/``<a>`` added if missing.

    Raises ConfigError when the directory has no fast tokenizer, one of its JSON files is
    unreadable, or the tokenizer lacks a mask, pad or CLS-like start token. Nothing is fetched from a hub.
    """
    path = Path(path)
    check_json_files(path, ("config.json", *TOKENIZER_FILES))  # AutoTokenizer reads config.json too
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: no usable tokenizer ({str(e).splitlines()[0][:160]})") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{path}: tokenizer is not a fast (tokenizers) tokenizer")
    missing = [t for t in ("mask_token", "pad_token") if getattr(tok, t, None) is None]
    if missing:
        raise ConfigError(f"{path}: tokenizer has no {' or '.join(missing)}")
    model = tok.backend_tokenizer.model  # a WordPiece model without its unknown token fails on the first unknown word
    if type(model).__name__ == "WordPiece" and model.unk_token not in tok.backend_tokenizer.get_vocab(with_added_tokens=False):
        raise ConfigError(f"{path}: the WordPiece vocabulary has no unknown token {model.unk_token!r} (add it to vocab.txt)")
    new = [t for t in ACTION_TOKENS if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    return _prepare(tok)


def _prepare(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok.truncation_side = "left"  # keep the most recent actions
    return tok


@dataclass
class Tokens:
    """Token ids of ``n`` texts: ``ids[i, :lens[i]]`` is text i, the rest is ``pad_id``."""

    ids: np.ndarray  # [n, width] int32
    lens: np.ndarray  # [n] int32
    pad_id: int

    def __len__(self) -> int:
        return len(self.lens)

    def row(self, i: int) -> list[int]:
        return self.ids[i, : self.lens[i]].tolist()

    def take(self, idx: np.ndarray) -> "Tokens":
        """The texts at positions ``idx``."""
        return Tokens(self.ids[idx], self.lens[idx], self.pad_id)

    def batch(self, idx, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, T], mask [B, T]) of the texts at ``idx``, cut to the longest of them."""
        idx = np.asarray(idx)
        T = max(1, int(self.lens[idx].max()))
        ids = torch.from_numpy(self.ids[idx, :T].astype(np.int64))  # [B, T]
        mask = (torch.arange(T)[None, :] < torch.from_numpy(self.lens[idx].astype(np.int64))[:, None]).long()  # [B, T]
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    @staticmethod
    def from_lists(seqs: list[list[int]], pad_id: int) -> "Tokens":
        lens = np.array([len(s) for s in seqs], np.int32)
        ids = np.full((len(seqs), max(1, int(lens.max(initial=0)))), pad_id, np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        return Tokens(ids, lens, pad_id)

    @staticmethod
    def concat(parts: list["Tokens"]) -> "Tokens":
        width = max(p.ids.shape[1] for p in parts)
        pad = parts[0].pad_id
        ids = np.concatenate([np.pad(p.ids, ((0, 0), (0, width - p.ids.shape[1])), constant_values=pad) for p in parts])
        return Tokens(ids, np.concatenate([p.lens for p in parts]), pad)


def encode(
    tok: PreTrainedTokenizerFast, texts: list[str], max_len: int, recent_first: bool = False, chunk: int = 4096
) -> Tokens:
    """Token ids of each text, with the start/end specials, truncated to ``max_len`` on the side
    of the oldest actions (the left, or the right for ``recent_first`` texts); tokenized
    ``chunk`` texts at a time into one array."""
    out = Tokens(np.full((len(texts), max_len), tok.pad_token_id, np.int32), np.zeros(len(texts), np.int32), tok.pad_token_id)
    side = tok.truncation_side
    tok.truncation_side = "right" if recent_first else "left"
    try:
        for lo in range(0, len(texts), chunk):
            for i, seq in enumerate(tok(texts[lo : lo + chunk], truncation=True, max_length=max_len)["input_ids"], start=lo):
                out.ids[i, : len(seq)] = seq
                out.lens[i] = len(seq)
    finally:
        tok.truncation_side = side
    return out


def check_known(tok: PreTrainedTokenizerFast, ids: Tokens, what: str) -> None:
    """DataError if no text has a single known (non-special, non-[UNK]) token."""
    special = np.array(sorted(set(tok.all_special_ids)))  # [UNK] included
    real = np.arange(ids.ids.shape[1])[None, :] < ids.lens[:, None]  # [n, width]
    if not (real & ~np.isin(ids.ids, special)).any():
        raise DataError(f"{what}: every token is empty or unknown to the tokenizer (vocabulary of {len(tok)} tokens)")
