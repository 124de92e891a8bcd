"""Masked-LM pretraining of an encoder on an action-sequence corpus.

Each corpus line is tokenized without truncation and cut into chunks of ``max_len - 2``
tokens, each wrapped in [CLS] ... [SEP]. BERT masking: ``mask_prob`` of the non-special
tokens (at least one a chunk) are predicted; of those 80% become [MASK], 10% a random
token, 10% stay. The result is a standard HF checkpoint dir (``save_pretrained``,
safetensors) with its tokenizer and ``pretrain.json`` (config and per-epoch loss).

``init_from`` continues from a local checkpoint (a BERT-family or sentence-transformers
directory: its tokenizer gains ``<v>``/``<a>``, its embeddings grow to match, and a
missing masked-LM head starts from random weights). Masking is drawn on the CPU, so the
same seed masks the same tokens on any device; the model runs on ``device`` (bf16
autocast on CUDA).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast

from kdstore.atomic import replace_folder
from kdstore.errors import DataError
from kdstore.faults import crash_point

from ..device import autocast, training_dtype
from .config import PretrainConfig
from .device import stage_devices
from .models import check_checkpoint, check_positions, encoder_config, load_mlm
from .optim import lr_at, make_optimizer, num_threads, seed_epoch, set_lr, steps_per_epoch
from .tokenizer import Tokens, check_known, load_tokenizer, train_tokenizer


def chunk(tok: PreTrainedTokenizerFast, texts: list[str], max_len: int, lines: int = 4096) -> Tokens:
    """Token ids of every line cut into [CLS] + ``max_len - 2`` tokens + [SEP] chunks
    (tokenized ``lines`` lines at a time)."""
    body = max_len - 2
    parts = []
    for lo in range(0, len(texts), lines):
        out = []
        for ids in tok(texts[lo : lo + lines], add_special_tokens=False)["input_ids"]:
            for at in range(0, max(1, len(ids)), body):
                out.append([tok.cls_token_id, *ids[at : at + body], tok.sep_token_id])
        parts.append(Tokens.from_lists(out, tok.pad_token_id))
    return Tokens.concat(parts)


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, tok: PreTrainedTokenizerFast, prob: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], labels [B, T]) with BERT's 80/10/10 masking; labels -100 where unmasked."""
    score = torch.rand(ids.shape, generator=g).masked_fill(special, 2.0)  # [B, T]
    chosen = (score < prob) & ~special  # [B, T]
    chosen[torch.arange(len(ids)), score.argmin(dim=1)] |= ~special.all(dim=1)  # at least one per row
    labels = ids.masked_fill(~chosen, -100)  # [B, T]
    roll = torch.rand(ids.shape, generator=g)  # [B, T]
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = tok.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(len(tok), ids.shape, generator=g)[rand]
    return inputs, labels


def pretrain_mlm(
    texts: list[str],
    out_dir: str | Path,
    cfg: PretrainConfig,
    tok: PreTrainedTokenizerFast | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Pretrain a masked LM on ``texts`` and save it (with its tokenizer) to ``out_dir``.

    The tokenizer is ``tok``, else the ``init_from`` checkpoint's (plus ``<v>``/``<a>``),
    else a WordPiece trained on ``texts``. ``on_step(done, total)`` reports progress.
    Returns the summary written to ``pretrain.json``.
    """
    with num_threads(cfg.threads):
        return _pretrain(texts, Path(out_dir), cfg, tok, on_step)


def _pretrain(texts, out: Path, cfg: PretrainConfig, tok, on_step) -> dict:
    if not texts:
        raise DataError("pretraining corpus is empty")
    if cfg.init_from:
        check_checkpoint(cfg.init_from)
    if tok is None:
        tok = load_tokenizer(cfg.init_from) if cfg.init_from else train_tokenizer(texts, cfg.vocab_size)
    data = chunk(tok, texts, cfg.max_len)
    check_known(tok, data, "pretraining corpus")
    device = stage_devices(cfg.device)[0]
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = load_mlm(cfg.init_from, tok)
    else:
        model = AutoModelForMaskedLM.from_config(encoder_config(cfg.family, cfg.size, tok, cfg.max_len, cfg.dropout))
    check_positions(model, cfg.max_len)
    model.to(device)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    special_ids = torch.tensor(sorted(set(tok.all_special_ids)))
    n, bs = len(data), cfg.batch_size
    per_epoch = steps_per_epoch(n, bs)
    total, step, log = cfg.epochs * per_epoch, 0, []
    for epoch in range(cfg.epochs):
        model.train()
        g = seed_epoch(cfg.seed, epoch)
        perm = torch.randperm(n, generator=g).numpy()
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for b in range(per_epoch):
            ids, attn = data.batch(perm[b * bs : (b + 1) * bs])  # [B, T]
            inputs, labels = mask_tokens(ids, torch.isin(ids, special_ids), tok, cfg.mask_prob, g)
            set_lr(opt, lr_at(step, total, cfg.lr, cfg.warmup))
            with autocast(device, training_dtype(device)):
                logits = model(input_ids=inputs.to(device), attention_mask=attn.to(device)).logits  # [B, T, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.detach()
            if on_step:
                on_step(step, total)
        log.append({"epoch": epoch + 1, "mlm_loss": loss_sum.item() / per_epoch, "seconds": time.perf_counter() - t0})
        crash_point("teacher.pretrain")
    model.cpu()
    summary = {"config": cfg.__dict__, "lines": len(texts), "chunks": n, "vocab": len(tok), "device": device, "log": log}
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(summary, indent=1))

    replace_folder(out, write, marker="pretrain.json")
    return summary
