"""``build-teacher``: tokenizer, optional MLM pretraining, K-fold fine-tuning, store writes.

Stages, each resumable, in a work dir (default ``<store>.teacher-work/<name>/``)::

    build.json          settings of the build (a resume with other settings is refused)
    tokenizer/          WordPiece trained on the train-split histories (no checkpoint given)
    pretrained/         masked-LM checkpoint from ``pretrain_epochs`` on the train split (and the corpus)
    full/               model trained on every training example: predicts the eval splits
    fold0/ ... foldK-1/ model trained without fold k's videos: predicts fold k's training UIDs
    teacher/            the full model as an HF checkpoint + heads (usable as --pretrained)

A stage directory holds epoch checkpoints (see ``optim``) and, when finished,
``predictions.safetensors``. A rerun skips finished stages, resumes a stage from its last
epoch checkpoint (model and AdamW state restored exactly), and redoes an interrupted
pretraining from its start. An unreadable checkpoint file is a ConfigError naming it.

Stages run on ``cfg.device`` (see ``device``): the fine-tuning stages go to a pool of
processes, one per entry of ``stage_devices`` (each visible GPU, or ``workers`` CPU
processes), each taking the next unfinished stage; with one entry they run in this
process. The device changes neither the files nor their format, so a build started on
the CPU resumes on a GPU and the other way round.

An external ``corpus`` (action-sequence lines, e.g. recipes; ``corpus.read_corpus``) joins
the train-split histories in the tokenizer and the masked-LM pretraining, as the paper
pretrains on recipe text; with ``corpus_examples`` it also gives that many (history, next
action) fine-tuning examples to every stage (lines whose actions are all store classes;
no video's labels, so out-of-fold predictions stay honest).

Every segment of the requested splits gets a prediction. The input of a segment is its
history text; a segment without earlier actions (first in its video) reads just the
special tokens, ``[CLS] [SEP]``. Only segments with a non-empty history are training
examples (their label is the segment's own action). With ``multi_history`` each length is
a training example and a segment's logits and features are the mean over the lengths.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from kdstore.atomic import replace_with
from kdstore.text import action_text, action_words
from kdstore.errors import ConfigError, DataError
from kdstore.faults import crash_point
from kdstore.metrics import compute_metrics, marginalise, softmax
from kdstore.store import Store, _check_name, provenance_entry

from .config import PretrainConfig, TeacherConfig
from .corpus import corpus_sequences, history_corpus, history_texts
from .device import stage_devices
from .finetune import Examples, Thinning, finetune, predict
from .models import TeacherModel, check_checkpoint, pretrained_teacher, scratch_teacher
from .ngram import action_histories
from .optim import checked_read, num_threads, read_json
from .pretrain import pretrain_mlm
from .progress import progress
from .tokenizer import Tokens, check_known, encode, load_tokenizer, train_tokenizer

PRED_KEYS = ("action", "verb", "noun", "features")


@dataclass
class BuildResult:
    """What a build wrote: the group name, its UIDs, metrics per split, the log, the timing, and
    where this run's fine-tuning stages ran (stage, device, process id)."""

    name: str
    uids: np.ndarray
    metrics: dict
    log: list
    seconds: float
    work_dir: Path
    stages: list[dict]


def work_dir_for(store: Store, name: str) -> Path:
    """The default work dir of teacher ``name``: ``<store>.teacher-work/<name>``."""
    return Path(f"{store.path}.teacher-work") / name


def assign_folds(videos: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[n] fold of each row: whole videos go to the fold with the fewest rows so far,
    largest videos first (ties in a seeded random order)."""
    uniq, counts = np.unique(videos, return_counts=True)
    if len(uniq) < k:
        raise ConfigError(f"{k} folds need at least {k} videos in the training split, found {len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes, fold_of = np.zeros(k, np.int64), {}
    for i in order:
        f = int(np.argmin(sizes))
        fold_of[uniq[i]] = f
        sizes[f] += counts[i]
    return np.array([fold_of[v] for v in videos], dtype=np.int64)


@dataclass
class StageJob:
    """Everything one fine-tuning stage needs; runs in this process or in a worker."""

    stage: str
    sdir: Path
    cfg: dict
    tok_dir: Path
    model_base: Path | None
    nums: tuple[int, int, int]
    seed: int
    data: Examples
    pred_ids: list[Tokens]  # per history length, the inputs of the predicted rows
    pred_index: np.ndarray  # [m] positions of the predicted rows in the build's row order
    export: Path | None = None  # where the full model is saved as a teacher checkpoint


def make_model(cfg: TeacherConfig, tok, model_base: Path | None, nums: tuple[int, int, int], seed: int) -> TeacherModel:
    """The teacher to fine-tune: from ``model_base`` if given, else randomly initialised."""
    torch.manual_seed(seed)
    if model_base:
        model = pretrained_teacher(model_base, tok, nums, cfg.dropout, cfg.pooling, cfg.max_len)
    else:
        model = scratch_teacher(cfg.family, cfg.size, tok, cfg.max_len, nums, cfg.dropout, cfg.pooling)
    if cfg.freeze_embeddings:
        model.freeze_embeddings()
    return model


def run_stage(job: StageJob, device: str = "cpu", on_step=None, on_epoch=None) -> dict:
    """Fine-tune on ``device`` (resuming from ``job.sdir``), predict, write ``predictions.safetensors``;
    returns where it ran (stage, device, process id)."""
    cfg = TeacherConfig.from_dict(job.cfg)
    tok = load_tokenizer(job.tok_dir)
    with num_threads(cfg.threads):
        model = make_model(cfg, tok, job.model_base, job.nums, job.seed).to(device)
        finetune(model, job.data, cfg, tok, job.seed, job.sdir, on_step=on_step, on_epoch=on_epoch)
        preds = predict(model, job.pred_ids[0])
        for ids in job.pred_ids[1:]:  # mean over history lengths, summed in place
            for k, v in predict(model, ids).items():
                preds[k] += v
    for k in PRED_KEYS:
        preds[k] /= len(job.pred_ids)
    if job.export:
        model.save(job.export, tok, {"config": job.cfg})
    replace_with(job.sdir / "predictions.safetensors",  # the stage counts as finished only once this exists
                 lambda tmp: save_file({**preds, "index": job.pred_index.astype(np.int64)}, str(tmp)))
    crash_point("teacher.stage")
    return {"stage": job.stage, "device": device, "pid": os.getpid()}


_DEVICE = "cpu"  # the device of this stage process, taken once from the pool's queue of slots


def _take_device(slots) -> None:
    global _DEVICE
    _DEVICE = slots.get()
    if _DEVICE.startswith("cuda"):
        torch.cuda.set_device(_DEVICE)


def _worker(job: StageJob, queue) -> dict:
    return run_stage(job, _DEVICE, on_step=lambda done, total: queue.put((job.stage, done, total)))


def run_stages(jobs: list[StageJob], devices: list[str], task, on_epoch=None) -> list[dict]:
    """Run the unfinished stages: with one device in this process, else in one spawned process
    per entry of ``devices`` (at most one per stage), each taking the next stage as it frees up.
    Returns where each stage ran (``run_stage``)."""
    todo = [j for j in jobs if not (j.sdir / "predictions.safetensors").exists()]
    if len(devices) <= 1 or len(todo) <= 1:
        return [run_stage(j, devices[0], task(j.stage), (lambda e, row, s=j.stage: on_epoch(s, e, row)) if on_epoch else None)
                for j in todo]
    n = min(len(devices), len(todo))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue, slots = manager.Queue(), manager.Queue()
        for d in devices[:n]:
            slots.put(d)
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_take_device, initargs=(slots,)) as pool:
            bars = {j.stage: task(j.stage) for j in todo}
            futures = [pool.submit(_worker, j, queue) for j in todo]
            while not all(f.done() for f in futures) or not queue.empty():
                try:
                    stage, done, total = queue.get(timeout=0.5)
                except Empty:
                    continue
                if bars[stage]:
                    bars[stage](done, total)
            return [f.result() for f in futures]  # re-raises a worker's error


def build_teacher(
    store: Store,
    name: str,
    cfg: TeacherConfig,
    *,
    train_split: str,
    eval_splits: tuple[str, ...] = (),
    pretrained: str | Path | None = None,
    corpus: list[str] | None = None,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    fresh: bool = False,
    show_progress: bool = True,
    on_epoch: Callable[[str, int, dict], None] | None = None,
    devices: list[str] | None = None,
) -> BuildResult:
    """Train the teacher and write ``teacher/<name>`` (kind "teacher") into ``store``.

    Bad input (unknown or empty split, an existing group without ``overwrite``, a
    checkpoint that is not one or whose heads have other class counts, histories that
    are all empty or unknown to the tokenizer, a work dir of another build) raises a
    KDStoreError before anything is written. ``on_epoch(stage, epoch, row)`` is called
    after each fine-tuning epoch's checkpoint (only when the stages run in this process).
    ``devices`` (default ``stage_devices(cfg.device, cfg.workers)``) lists one device per
    stage process, e.g. ``["cuda:2", "cuda:3"]``.
    """
    with num_threads(cfg.threads):
        return _build(store, name, cfg, train_split, eval_splits, pretrained, corpus, work_dir, overwrite, fresh,
                      show_progress, on_epoch, devices)


def _build(store, name, cfg, train_split, eval_splits, pretrained, corpus, work_dir, overwrite, fresh, show_progress,
           on_epoch, devices) -> BuildResult:
    t0 = time.perf_counter()
    seg, classes = store.segments, store.classes
    nums = (classes.num_actions, classes.num_verbs, classes.num_nouns)
    _check_name(name)
    if name in store.predictions() and not overwrite:
        raise DataError(f"{store.path}: predictions {name!r} already exist (pass overwrite to replace them)")
    store.check_writable()  # a read-only or busy store fails now, not after training
    eval_splits = tuple(s for s in dict.fromkeys(eval_splits) if s != train_split)
    rows = {s: seg.rows_in(s, labelled=True) for s in (train_split, *eval_splits)}  # the teacher reads labels
    for s, r in rows.items():
        if len(r) == 0:
            raise DataError(f"{store.path}: no labelled segments in split {s!r} ({len(seg.rows_in(s))} unlabelled);"
                            " the teacher predicts labelled segments only")
    devices = devices or stage_devices(cfg.device, cfg.workers)
    if pretrained and cfg.init_from:
        raise ConfigError("give a pretrained checkpoint or init_from, not both")
    base = Path(pretrained or cfg.init_from) if (pretrained or cfg.init_from) else None
    if base:
        check_checkpoint(base)
    all_rows = np.concatenate(list(rows.values()))
    n_train = len(rows[train_split])
    texts = {L: [t for s, r in rows.items() for t in history_texts(classes, seg, r, L, cfg.history, cfg.colon, split=s,
                                                                      recent_first=cfg.recent_first)]
             for L in cfg.hist_lens}
    if not any(t for L in cfg.hist_lens for t in texts[L][:n_train]):
        raise DataError(f"split {train_split!r}: every history is empty (no segment has an earlier action in its video)")
    folds = assign_folds(seg.video[rows[train_split]], cfg.folds, cfg.seed) if cfg.folds > 1 else None
    corpus = list(corpus or [])
    if cfg.corpus_examples and not corpus:
        raise ConfigError("corpus_examples needs a corpus")

    work = Path(work_dir) if work_dir else work_dir_for(store, name)
    settings = {"config": _result_config(cfg.to_dict()), "train_split": train_split, "eval_splits": list(eval_splits),
                "pretrained": str(pretrained) if pretrained else None,
                "corpus_sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest() if corpus else None,
                "segments_sha256": store.manifest["segments_sha256"], "classes": list(nums)}
    if not fresh:
        _check_resume(work, settings)
    tok_dir = base or work / "tokenizer"
    if base or (tok_dir.exists() and not fresh):
        tok = load_tokenizer(tok_dir)
    else:
        vocab_lines = [action_text(classes, [a], cfg.colon) for a in range(classes.num_actions)]
        tok = train_tokenizer([t for t in texts[max(cfg.hist_lens)][:n_train] if t] + corpus + vocab_lines, cfg.vocab_size)
    ids = {L: encode(tok, texts[L], cfg.max_len, cfg.recent_first) for L in cfg.hist_lens}
    check_known(tok, Tokens.concat([ids[L].take(np.flatnonzero([bool(t) for t in texts[L][:n_train]]))
                                    for L in cfg.hist_lens]), f"split {train_split!r} histories")
    if base:
        make_model(cfg, tok, base, nums, cfg.seed)  # a teacher checkpoint's class counts are checked before any write

    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "build.json").write_text(json.dumps(settings, indent=1))
    if not tok_dir.exists():
        tok.save_pretrained(tok_dir)
    log: list[dict] = []
    with progress(show_progress) as task:
        model_base = base
        if cfg.pretrain_epochs:
            model_base = tok_dir = work / "pretrained"
            if not (model_base / "pretrain.json").exists():
                lines = history_corpus(classes, seg, train_split, cfg.pretrain_window, cfg.colon) + corpus
                pcfg = PretrainConfig(family=cfg.family, size=cfg.size, init_from=str(base) if base else None,
                                      max_len=cfg.max_len, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
                                      batch_size=cfg.pretrain_batch_size, weight_decay=cfg.weight_decay,
                                      warmup=cfg.warmup, mask_prob=cfg.mask_prob, dropout=cfg.dropout, seed=cfg.seed,
                                      threads=cfg.threads, device=cfg.device)
                pretrain_mlm(lines, model_base, pcfg, tok=tok, on_step=task("pretrain"))
            log += [{"stage": "pretrain", **r} for r in read_json(model_base / "pretrain.json", ("log",))["log"]]

        long = None
        if cfg.history_dropout:  # the actions a thinned history draws from
            long = action_histories(seg, rows[train_split], 4 * max(cfg.hist_lens), cfg.history, train_split)  # [n_train, W]
            words = [action_words(classes, a, cfg.colon) for a in range(classes.num_actions)]

        extra = _corpus_examples(classes, corpus, cfg, tok) if cfg.corpus_examples else None

        def examples(idx: np.ndarray) -> Examples:
            """One example per (row, distinct non-empty history text); ``idx`` are train-split positions
            (plus the corpus examples)."""
            at, lens = [], []
            for i in idx:
                seen = set()
                for L in cfg.hist_lens:
                    if texts[L][i] and texts[L][i] not in seen:
                        seen.add(texts[L][i])
                        at.append(i)
                        lens.append(L)
            at = np.asarray(at, dtype=np.int64)
            picked = Tokens(np.empty((len(at), cfg.max_len), np.int32), np.empty(len(at), np.int32), tok.pad_token_id)
            for L in cfg.hist_lens:
                sel = np.asarray(lens) == L
                picked.ids[sel], picked.lens[sel] = ids[L].ids[at[sel]], ids[L].lens[at[sel]]
            lab = all_rows[at]
            action, verb, noun = seg.action[lab], seg.verb[lab], seg.noun[lab]
            hist = long[at] if long is not None else None
            if extra is not None:
                picked, lens = Tokens.concat([picked, extra["ids"]]), lens + extra["lens"]
                a = extra["action"]
                action, verb, noun = (np.concatenate([x, y.astype(x.dtype)]) for x, y in
                                      ((action, a), (verb, classes.action_verb[a]), (noun, classes.action_noun[a])))
                if hist is not None:
                    hist = np.concatenate([hist, _left_pad(extra["hist"], hist.shape[1])])
            thin = (Thinning(hist, np.asarray(lens), words, cfg.history_dropout, cfg.max_len, cfg.recent_first).prepare(tok, picked)
                    if long is not None else None)
            return Examples(picked, action, verb, noun, thin)

        def job(stage: str, seed: int, train_idx: np.ndarray, pred_idx: np.ndarray) -> StageJob:
            return StageJob(stage, work / stage, cfg.to_dict(), tok_dir, model_base, nums, seed, examples(train_idx),
                            [ids[L].take(pred_idx) for L in cfg.hist_lens], pred_idx,
                            work / "teacher" if stage == "full" else None)

        train_idx, everything = np.arange(n_train), np.arange(len(all_rows))
        jobs = [job("full", cfg.seed, train_idx, everything[n_train:] if folds is not None else everything)]
        if folds is not None:
            jobs += [job(f"fold{k}", cfg.seed + 101 * (k + 1), train_idx[folds != k], train_idx[folds == k])
                     for k in range(cfg.folds)]
        ran = run_stages(jobs, devices, task, on_epoch)
    for j in jobs:
        log += [{"stage": j.stage, **r} for r in read_json(j.sdir / "state.json", ("log",))["log"]]
    out = _gather_predictions([j.sdir / "predictions.safetensors" for j in jobs], len(all_rows))

    if cfg.prior_correction:  # applied after the stages: a resume with another value reuses them
        lab = rows[train_split]
        for key, labels, n in (("action", seg.action, nums[0]), ("verb", seg.verb, nums[1]), ("noun", seg.noun, nums[2])):
            out[key] -= cfg.prior_correction * _log_prior(labels[lab], n)  # [n, C] - [C]
    if not cfg.multi_task:  # untrained heads: store the action model's own verb/noun marginals
        out["verb"], out["noun"] = _marginal_logits(out["action"], classes)
    labels, start = seg.action[all_rows], np.cumsum([0, *(len(r) for r in rows.values())])
    span = {s: slice(start[i], start[i + 1]) for i, s in enumerate(rows)}
    metrics = {s: compute_metrics(out["action"][span[s]], labels[span[s]], classes) for s in eval_splits}
    kind = "out-of-fold" if folds is not None else "in-sample"
    metrics[f"{train_split} ({kind})"] = compute_metrics(out["action"][span[train_split]], labels[span[train_split]], classes)
    uids = seg.uid[all_rows]
    config = {**cfg.to_dict(), "train_split": train_split, "eval_splits": list(eval_splits),
              "pretrained": str(pretrained) if pretrained else None, "vocab": len(tok), "work_dir": str(work)}
    store.write_predictions(
        name, uids, out["action"], features=out["features"], verb_logits=out["verb"], noun_logits=out["noun"],
        topk=cfg.topk, kind="teacher", config=config, metrics=metrics, log=log, overwrite=overwrite,
        provenance=provenance_entry("build_teacher", group=f"teacher/{name}", train_split=train_split),
    )
    return BuildResult(name, uids, metrics, log, time.perf_counter() - t0, work, ran)


def _gather_predictions(paths: list[Path], n: int) -> dict[str, np.ndarray]:
    """[n, width] float32 arrays of every key in PRED_KEYS, filled from the stages' prediction
    files one array at a time (each file's ``index`` says which rows it holds)."""
    out: dict[str, np.ndarray] = {}
    for path in paths:
        with checked_read(path), safe_open(str(path), "np") as f:
            index = f.get_tensor("index")
            for k in PRED_KEYS:
                part = f.get_tensor(k)  # [m, width]
                if k not in out:
                    out[k] = np.zeros((n, part.shape[1]), np.float32)
                out[k][index] = part
                del part
    return out


def _log_prior(labels: np.ndarray, num: int) -> np.ndarray:
    """[num] log class frequencies of ``labels``, add-one smoothed (a class never seen stays finite)."""
    counts = np.bincount(labels, minlength=num).astype(np.float64) + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def _marginal_logits(action: np.ndarray, classes, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Log verb and noun marginals of the action scores, [n, V] and [n, N], in row blocks."""
    verb = np.empty((len(action), classes.num_verbs), np.float32)
    noun = np.empty((len(action), classes.num_nouns), np.float32)
    for lo in range(0, len(action), block_rows):
        probs = softmax(action[lo : lo + block_rows])  # [b, A]
        verb[lo : lo + len(probs)] = np.log(marginalise(probs, classes.action_verb, classes.num_verbs) + 1e-12)
        noun[lo : lo + len(probs)] = np.log(marginalise(probs, classes.action_noun, classes.num_nouns) + 1e-12)
    return verb, noun


def _corpus_examples(classes, corpus: list[str], cfg: TeacherConfig, tok) -> dict:
    """``cfg.corpus_examples`` (history, next action) pairs drawn (seeded) from the corpus lines,
    each at a history length drawn from ``cfg.hist_lens``."""
    seqs = corpus_sequences(classes, corpus, cfg.colon)
    pairs = np.array([(i, j) for i, s in enumerate(seqs) for j in range(1, len(s))], np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        raise DataError("corpus: no line of two or more actions that are all store classes")
    rng = np.random.default_rng(cfg.seed)
    pick = pairs[np.sort(rng.choice(len(pairs), size=min(cfg.corpus_examples, len(pairs)), replace=False))]
    lens = [int(x) for x in rng.choice(cfg.hist_lens, size=len(pick))]
    hists = [seqs[i][max(0, j - L):j] for (i, j), L in zip(pick, lens)]
    ids = encode(tok, [action_text(classes, h[:: -1 if cfg.recent_first else 1], cfg.colon) for h in hists], cfg.max_len,
                 cfg.recent_first)
    return {"ids": ids, "action": np.array([seqs[i][j] for i, j in pick], np.int64), "lens": lens, "hist": hists}


def _left_pad(hists: list[np.ndarray], width: int) -> np.ndarray:
    """[n, width] action ids, oldest first, -1 padded on the left."""
    out = np.full((len(hists), width), -1, np.int64)
    for r, h in enumerate(hists):
        h = h[len(h) - width:] if len(h) > width else h
        if len(h):
            out[r, width - len(h):] = h
    return out


def _result_config(d: dict) -> dict:
    """The config fields that change the stages' results (not threads, workers, device, or the
    prior correction, which is applied to their predictions afterwards)."""
    return {k: v for k, v in d.items() if k not in ("threads", "workers", "device", "prior_correction")}


def _check_resume(work: Path, settings: dict) -> None:
    """ConfigError if ``work`` holds a build with other settings."""
    path = work / "build.json"
    if not path.exists():
        return
    old = read_json(path)
    old_cfg = TeacherConfig.from_dict(old.get("config", {})).to_dict() if "config" in old else {}
    old = {**old, "config": _result_config(old_cfg)}
    diff = sorted(k for k in settings if old.get(k) != settings[k])
    if "config" in diff:
        diff.remove("config")
        diff += [f"config.{k}" for k in settings["config"] if old["config"].get(k) != settings["config"][k]]
    if diff:
        what = "class counts differ from the store's" if diff == ["classes"] else f"other settings ({', '.join(diff)})"
        raise ConfigError(f"{work}: holds a build with {what}; pass fresh (--fresh) or another work dir")
