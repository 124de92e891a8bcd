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

In code, ``plan_build`` reads and checks everything a build decides before training (the
rows of each split, every row's history text, the folds, the settings a resume must share:
a ``BuildPlan``); ``build_teacher`` then runs small stages on it: tokenizer, work dir,
pretraining, the fine-tuning jobs, gathering, the collapse guard (``fit_check``), the prior
correction, metrics and the store write.

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
import warnings
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
from kdstore.identity import check_same
from kdstore.evaluation import group_metrics
from kdstore.metrics import marginalise, softmax
from kdstore.layout import check_name as _check_name
from kdstore.provenance import provenance_entry
from kdstore.store import Store

from .config import PretrainConfig, TeacherConfig
from .corpus import corpus_sequences, history_corpus, history_texts
from .folds import assign_folds
from .device import stage_devices
from .finetune import Examples, Thinning, finetune, predict
from .fit_check import fit_check, fit_warning
from .models import TeacherModel, check_checkpoint, pretrained_teacher, scratch_teacher
from .ngram import action_histories
from .optim import checked_read, num_threads, read_json
from .pretrain import pretrain_mlm
from .progress import progress
from .tokenizer import Tokens, check_known, encode, load_tokenizer, train_tokenizer

PRED_KEYS = ("action", "verb", "noun", "features")


@dataclass
class BuildResult:
    """What a build wrote: the group name, its UIDs, metrics per split, the log, the timing,
    where this run's fine-tuning stages ran (stage, device, process id), and the collapse
    guard's record (``fit_check.fit_check``)."""

    name: str
    uids: np.ndarray
    metrics: dict
    log: list
    seconds: float
    work_dir: Path
    stages: list[dict]
    fit_check: dict | None = None


class CollapsedTeacherWarning(UserWarning):
    """A teacher's fit on its own training rows is not clearly above the class prior."""


def work_dir_for(store: Store, name: str) -> Path:
    """The default work dir of teacher ``name``: ``<store>.teacher-work/<name>``."""
    return Path(f"{store.path}.teacher-work") / name


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

    A teacher whose fit on its own training rows is not clearly above the class prior
    (``fit_check``) is built and written all the same, with a warning, and its group's
    config records ``fit_check`` with ``collapsed`` true.
    """
    t0 = time.perf_counter()
    with num_threads(cfg.threads):
        _check_target(store, name, overwrite)
        plan = plan_build(store, cfg, train_split, eval_splits, pretrained, corpus, work_dir, name)
        devices = devices or stage_devices(cfg.device, cfg.workers)
        if not fresh:
            _check_resume(plan.work, plan.settings)
        tok = plan.tokenizer(fresh)
        ids = plan.encode(tok)
        _check_inputs(plan, tok, ids)
        _setup_work_dir(plan, tok, fresh)
        with progress(show_progress) as task:
            model_base, tok_dir, log = _pretrain(plan, tok, task)
            jobs = _stage_jobs(plan, tok, ids, tok_dir, model_base)
            ran = run_stages(jobs, devices, task, on_epoch)
        for j in jobs:
            log += [{"stage": j.stage, **r} for r in read_json(j.sdir / "state.json", ("log",))["log"]]
        out = _gather_predictions([j.sdir / "predictions.safetensors" for j in jobs], len(plan.all_rows))
        check = _fit_check(plan, out)
        _adjust_scores(plan, out)
        uids, metrics = _write(plan, out, log, len(tok), check, overwrite)
    return BuildResult(name, uids, metrics, log, time.perf_counter() - t0, plan.work, ran, check)


@dataclass
class BuildPlan:
    """What a build reads and decides before any training: rows, history texts, folds, settings."""

    store: Store
    name: str
    cfg: TeacherConfig
    train_split: str
    eval_splits: tuple[str, ...]
    rows: dict[str, np.ndarray]  # split -> labelled segment rows, the training split first
    texts: dict[int, list[str]]  # history length -> the text of every row of ``all_rows``
    folds: np.ndarray | None  # [n_train] fold of each training row (None: one model)
    corpus: list[str]
    base: Path | None  # the checkpoint fine-tuned (pretrained or init_from)
    pretrained: str | Path | None
    work: Path
    settings: dict  # build.json: what a resume must share

    @property
    def nums(self) -> tuple[int, int, int]:
        return _nums(self.store)

    @property
    def all_rows(self) -> np.ndarray:
        return np.concatenate(list(self.rows.values()))

    @property
    def n_train(self) -> int:
        return len(self.rows[self.train_split])

    def tokenizer(self, fresh: bool = False):
        """The checkpoint's tokenizer, the work dir's, or one trained on the training histories."""
        tok_dir = self.base or self.work / "tokenizer"
        if self.base or (tok_dir.exists() and not fresh):
            return load_tokenizer(tok_dir)
        classes, cfg = self.store.classes, self.cfg
        vocab_lines = [action_text(classes, [a], cfg.colon) for a in range(classes.num_actions)]
        return train_tokenizer([t for t in self.texts[max(cfg.hist_lens)][: self.n_train] if t] + self.corpus + vocab_lines,
                               cfg.vocab_size)

    def encode(self, tok) -> dict[int, Tokens]:
        """History length -> the token ids of every row's history."""
        return {L: encode(tok, self.texts[L], self.cfg.max_len, self.cfg.recent_first) for L in self.cfg.hist_lens}


def plan_build(store: Store, cfg: TeacherConfig, train_split: str, eval_splits: tuple[str, ...] = (),
               pretrained: str | Path | None = None, corpus: list[str] | None = None, work_dir: str | Path | None = None,
               name: str = "teacher") -> BuildPlan:
    """The build's rows, texts, folds and settings; a KDStoreError for an empty split, an unusable
    checkpoint, histories that are all empty, too few videos for the folds or a missing corpus."""
    seg = store.segments
    eval_splits = tuple(s for s in dict.fromkeys(eval_splits) if s != train_split)
    rows = {s: seg.rows_in(s, labelled=True) for s in (train_split, *eval_splits)}  # the teacher reads labels
    for s, r in rows.items():
        if len(r) == 0:
            raise DataError(f"{store.path}: no labelled segments in split {s!r} ({len(seg.rows_in(s))} unlabelled);"
                            " the teacher predicts labelled segments only")
    if pretrained and cfg.init_from:
        raise ConfigError("give a pretrained checkpoint or init_from, not both")
    base = Path(pretrained or cfg.init_from) if (pretrained or cfg.init_from) else None
    if base:
        check_checkpoint(base)
    texts = {L: [t for s, r in rows.items() for t in history_texts(store.classes, seg, r, L, cfg.history, cfg.colon,
                                                                      split=s, recent_first=cfg.recent_first)]
             for L in cfg.hist_lens}
    n_train = len(rows[train_split])
    if not any(t for L in cfg.hist_lens for t in texts[L][:n_train]):
        raise DataError(f"split {train_split!r}: every history is empty (no segment has an earlier action in its video)")
    folds = assign_folds(seg.video[rows[train_split]], cfg.folds, cfg.seed) if cfg.folds > 1 else None
    corpus = list(corpus or [])
    if cfg.corpus_examples and not corpus:
        raise ConfigError("corpus_examples needs a corpus")
    settings = {"config": _result_config(cfg.to_dict()), "train_split": train_split, "eval_splits": list(eval_splits),
                "pretrained": str(pretrained) if pretrained else None,
                "corpus_sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest() if corpus else None,
                "segments_sha256": store.manifest["segments_sha256"], "classes": list(_nums(store))}
    work = Path(work_dir) if work_dir else work_dir_for(store, name)
    return BuildPlan(store, name, cfg, train_split, eval_splits, rows, texts, folds, corpus, base, pretrained, work, settings)


def _nums(store: Store) -> tuple[int, int, int]:
    c = store.classes
    return c.num_actions, c.num_verbs, c.num_nouns


def _check_target(store: Store, name: str, overwrite: bool) -> None:
    """A KDStoreError now, not after training, for a bad name, an existing group or an unwritable store."""
    _check_name(name)
    if name in store.groups() and not overwrite:
        raise DataError(f"{store.path}: predictions {name!r} already exist (pass overwrite to replace them)")
    store.check_writable()


def _check_inputs(plan: BuildPlan, tok, ids: dict[int, Tokens]) -> None:
    """DataError if no training history has a known token; a teacher checkpoint's class counts are
    checked too, both before any write."""
    cfg, n = plan.cfg, plan.n_train
    check_known(tok, Tokens.concat([ids[L].take(np.flatnonzero([bool(t) for t in plan.texts[L][:n]]))
                                    for L in cfg.hist_lens]), f"split {plan.train_split!r} histories")
    if plan.base:
        make_model(cfg, tok, plan.base, plan.nums, cfg.seed)


def _setup_work_dir(plan: BuildPlan, tok, fresh: bool) -> None:
    """The work dir with build.json and, without a checkpoint, the tokenizer."""
    if fresh:
        shutil.rmtree(plan.work, ignore_errors=True)
    plan.work.mkdir(parents=True, exist_ok=True)
    (plan.work / "build.json").write_text(json.dumps(plan.settings, indent=1))
    tok_dir = plan.base or plan.work / "tokenizer"
    if not tok_dir.exists():
        tok.save_pretrained(tok_dir)


def _pretrain(plan: BuildPlan, tok, task) -> tuple[Path | None, Path, list[dict]]:
    """Masked-LM pretraining (``pretrain_epochs``; skipped when finished); returns the model base,
    the tokenizer dir the stages load, and the pretraining log."""
    cfg, tok_dir = plan.cfg, plan.base or plan.work / "tokenizer"
    if not cfg.pretrain_epochs:
        return plan.base, tok_dir, []
    out = plan.work / "pretrained"
    if not (out / "pretrain.json").exists():
        store = plan.store
        lines = history_corpus(store.classes, store.segments, plan.train_split, cfg.pretrain_window, cfg.colon) + plan.corpus
        pcfg = PretrainConfig(family=cfg.family, size=cfg.size, init_from=str(plan.base) if plan.base else None,
                              max_len=cfg.max_len, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
                              batch_size=cfg.pretrain_batch_size, weight_decay=cfg.weight_decay,
                              warmup=cfg.warmup, mask_prob=cfg.mask_prob, dropout=cfg.dropout, seed=cfg.seed,
                              threads=cfg.threads, device=cfg.device)
        pretrain_mlm(lines, out, pcfg, tok=tok, on_step=task("pretrain"))
    return out, out, [{"stage": "pretrain", **r} for r in read_json(out / "pretrain.json", ("log",))["log"]]


def _stage_jobs(plan: BuildPlan, tok, ids: dict[int, Tokens], tok_dir: Path, model_base: Path | None) -> list[StageJob]:
    """The full model's stage (it predicts the eval splits, and every split without folds) and one
    stage per fold (it predicts that fold's training rows)."""
    cfg, work = plan.cfg, plan.work
    long = _long_histories(plan)
    extra = _corpus_examples(plan.store.classes, plan.corpus, cfg, tok) if cfg.corpus_examples else None

    def job(stage: str, seed: int, train_idx: np.ndarray, pred_idx: np.ndarray) -> StageJob:
        data = stage_examples(plan, tok, ids, train_idx, long, extra)
        return StageJob(stage, work / stage, cfg.to_dict(), tok_dir, model_base, plan.nums, seed, data,
                        [ids[L].take(pred_idx) for L in cfg.hist_lens], pred_idx,
                        work / "teacher" if stage == "full" else None)

    train_idx, everything, folds = np.arange(plan.n_train), np.arange(len(plan.all_rows)), plan.folds
    jobs = [job("full", cfg.seed, train_idx, everything[plan.n_train:] if folds is not None else everything)]
    if folds is not None:
        jobs += [job(f"fold{k}", cfg.seed + 101 * (k + 1), train_idx[folds != k], train_idx[folds == k])
                 for k in range(cfg.folds)]
    return jobs


def _long_histories(plan: BuildPlan) -> np.ndarray | None:
    """[n_train, W] the actions a thinned history draws from (``history_dropout``), else None."""
    cfg = plan.cfg
    if not cfg.history_dropout:
        return None
    return action_histories(plan.store.segments, plan.rows[plan.train_split], 4 * max(cfg.hist_lens), cfg.history,
                            plan.train_split)


def stage_examples(plan: BuildPlan, tok, ids: dict[int, Tokens], idx: np.ndarray, long: np.ndarray | None = None,
                   extra: dict | None = None) -> Examples:
    """One example per (row, distinct non-empty history text); ``idx`` are train-split positions
    (plus the corpus examples ``extra``); ``long`` the thinning's histories (``_long_histories``)."""
    cfg, seg, classes = plan.cfg, plan.store.segments, plan.store.classes
    at, lens = [], []
    for i in idx:
        seen = set()
        for L in cfg.hist_lens:
            if plan.texts[L][i] and plan.texts[L][i] not in seen:
                seen.add(plan.texts[L][i])
                at.append(i)
                lens.append(L)
    at = np.asarray(at, dtype=np.int64)
    picked = Tokens(np.empty((len(at), cfg.max_len), np.int32), np.empty(len(at), np.int32), tok.pad_token_id)
    for L in cfg.hist_lens:
        sel = np.asarray(lens) == L
        picked.ids[sel], picked.lens[sel] = ids[L].ids[at[sel]], ids[L].lens[at[sel]]
    lab = plan.all_rows[at]
    action, verb, noun = seg.action[lab], seg.verb[lab], seg.noun[lab]
    hist = long[at] if long is not None else None
    if extra is not None:
        picked, lens = Tokens.concat([picked, extra["ids"]]), lens + extra["lens"]
        a = extra["action"]
        action, verb, noun = (np.concatenate([x, y.astype(x.dtype)]) for x, y in
                              ((action, a), (verb, classes.action_verb[a]), (noun, classes.action_noun[a])))
        if hist is not None:
            hist = np.concatenate([hist, _left_pad(extra["hist"], hist.shape[1])])
    thin = None
    if long is not None:
        words = [action_words(classes, a, cfg.colon) for a in range(classes.num_actions)]
        thin = Thinning(hist, np.asarray(lens), words, cfg.history_dropout, cfg.max_len, cfg.recent_first).prepare(tok, picked)
    return Examples(picked, action, verb, noun, thin)


def _spans(plan: BuildPlan) -> dict[str, slice]:
    """Split -> its rows' positions in the build's row order."""
    start = np.cumsum([0, *(len(r) for r in plan.rows.values())])
    return {s: slice(start[i], start[i + 1]) for i, s in enumerate(plan.rows)}


def _kind(plan: BuildPlan) -> str:
    return "out-of-fold" if plan.folds is not None else "in-sample"


def _fit_check(plan: BuildPlan, out: dict[str, np.ndarray]) -> dict:
    """The collapse guard on the training rows' predictions (before any prior correction); warns."""
    seg = plan.store.segments
    check = fit_check(out["action"][_spans(plan)[plan.train_split]], seg, plan.nums[0], plan.train_split,
                      plan.rows[plan.train_split], plan.folds)
    message = fit_warning(check, plan.name)
    if message:
        warnings.warn(message, CollapsedTeacherWarning, stacklevel=3)
    return check


def _adjust_scores(plan: BuildPlan, out: dict[str, np.ndarray]) -> None:
    """In place: the prior correction of every head, and without multi-task heads the verb and noun
    marginals of the action scores."""
    cfg, seg, nums = plan.cfg, plan.store.segments, plan.nums
    if cfg.prior_correction:  # applied after the stages: a resume with another value reuses them
        lab = plan.rows[plan.train_split]
        for key, labels, n in (("action", seg.action, nums[0]), ("verb", seg.verb, nums[1]), ("noun", seg.noun, nums[2])):
            out[key] -= cfg.prior_correction * _log_prior(labels[lab], n)  # [n, C] - [C]
    if not cfg.multi_task:  # untrained heads: store the action model's own verb/noun marginals
        out["verb"], out["noun"] = _marginal_logits(out["action"], plan.store.classes)


def _metric_splits(plan: BuildPlan) -> dict[str, str]:
    """The stored metrics' keys and splits: each eval split, and the training split (out-of-fold or in-sample)."""
    return {**{s: s for s in plan.eval_splits}, f"{plan.train_split} ({_kind(plan)})": plan.train_split}


def _write(plan: BuildPlan, out: dict[str, np.ndarray], log: list, vocab: int, check: dict,
           overwrite: bool) -> tuple[np.ndarray, dict]:
    """Write the group with its metrics (``kdstore.evaluation``'s); returns its UIDs and the metrics."""
    cfg, name = plan.cfg, plan.name
    uids = plan.store.segments.uid[plan.all_rows]
    metrics = group_metrics(plan.store, uids, {"logits": out["action"], "verb_logits": out["verb"],
                                               "noun_logits": out["noun"]}, _metric_splits(plan))
    config = {**cfg.to_dict(), "train_split": plan.train_split, "eval_splits": list(plan.eval_splits),
              "pretrained": str(plan.pretrained) if plan.pretrained else None, "vocab": vocab, "work_dir": str(plan.work),
              "fit_check": check}
    plan.store.write_predictions(
        name, uids, out["action"], features=out["features"], verb_logits=out["verb"], noun_logits=out["noun"],
        topk=cfg.topk, lse_temperatures=cfg.lse_temperatures, kind="teacher", config=config, metrics=metrics, log=log, overwrite=overwrite,
        provenance=provenance_entry("build_teacher", group=f"teacher/{name}", train_split=plan.train_split),
    )
    return uids, metrics


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
    prior correction and the log-sum-exp temperatures, which are applied to their predictions afterwards)."""
    return {k: v for k, v in d.items() if k not in ("threads", "workers", "device", "prior_correction", "lse_temperatures")}


def _check_resume(work: Path, settings: dict) -> None:
    """ConfigError if ``work`` holds a build with other settings."""
    path = work / "build.json"
    if not path.exists():
        return
    old = read_json(path)
    if "config" in old:  # its fields as this version reads them (defaults for fields added since)
        old["config"] = _result_config(TeacherConfig.from_dict(old["config"]).to_dict())
    check_same(old, settings, f"{work}: holds a build with other settings", hint="pass fresh (--fresh) or another work dir")
