"""The action-language tokenizer: WordPiece trained on the corpus, or a checkpoint's own.

Teachers read histories as ``verb <v> noun <a> verb <v> noun``; ``<v>`` and ``<a>`` are
special tokens so they are never split and never masked in pretraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdstore.errors import ConfigError, DataError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<v>", "<a>"]
ACTION_TOKENS = ["<v>", "<a>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A lowercase WordPiece tokenizer trained on ``texts``, ``[CLS] text [SEP]`` on encode."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False))
    # the trainer numbers tokens in hash order: renumber (specials first, then sorted) so builds are reproducible
    ordered = SPECIAL_TOKENS + sorted(set(tok.get_vocab()) - set(SPECIAL_TOKENS))
    tok.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")
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

    Raises ConfigError when the directory has no fast tokenizer or lacks a mask, pad or
    CLS-like start token. Nothing is fetched from a hub.
    """
    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: no usable tokenizer ({str(e).splitlines()[0][:160]})") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{path}: tokenizer is not a fast (tokenizers) tokenizer")
    missing = [t for t in ("mask_token", "pad_token") if getattr(tok, t, None) is None]
    if missing:
        raise ConfigError(f"{path}: tokenizer has no {' or '.join(missing)}")
    new = [t for t in ACTION_TOKENS if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    return _prepare(tok)


def _prepare(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok.truncation_side = "left"  # keep the most recent actions
    return tok


def encode(tok: PreTrainedTokenizerFast, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of each text, with the start/end specials, left-truncated to ``max_len``."""
    return tok(texts, truncation=True, max_length=max_len)["input_ids"]


def check_known(tok: PreTrainedTokenizerFast, ids: list[list[int]], what: str) -> None:
    """DataError if no text has a single known (non-special, non-[UNK]) token."""
    special = set(tok.all_special_ids)  # [UNK] included
    if not any(i not in special for seq in ids for i in seq):
        raise DataError(f"{what}: every token is empty or unknown to the tokenizer (vocabulary of {len(tok)} tokens)")
