"""The action-language tokenizer: WordPiece built from the corpus, or a checkpoint's own.

Teachers read histories as ``verb <v> noun <a> verb <v> noun``; ``<v>`` and ``<a>`` are
special tokens so they are never split and never masked in pretraining.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdstore.errors import ConfigError, DataError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<v>", "<a>"]
ACTION_TOKENS = ["<v>", "<a>"]


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


def encode(tok: PreTrainedTokenizerFast, texts: list[str], max_len: int, recent_first: bool = False) -> list[list[int]]:
    """Token ids of each text, with the start/end specials, truncated to ``max_len`` on the side
    of the oldest actions: the left, or the right for ``recent_first`` texts."""
    side = tok.truncation_side
    tok.truncation_side = "right" if recent_first else "left"
    try:
        return tok(texts, truncation=True, max_length=max_len)["input_ids"]
    finally:
        tok.truncation_side = side


def check_known(tok: PreTrainedTokenizerFast, ids: list[list[int]], what: str) -> None:
    """DataError if no text has a single known (non-special, non-[UNK]) token."""
    special = set(tok.all_special_ids)  # [UNK] included
    if not any(i not in special for seq in ids for i in seq):
        raise DataError(f"{what}: every token is empty or unknown to the tokenizer (vocabulary of {len(tok)} tokens)")
