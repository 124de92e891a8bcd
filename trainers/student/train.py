"""Train an AVT-h student on a store's features, with or without distillation.

A run is a :class:`StudentRecipe` in stages, as torchtune's recipes: ``setup`` (``_setup_data``,
``_setup_model``, resume from the :class:`RunDir` when it holds a checkpoint of the same run,
``_setup_steps``), then ``train``: for each epoch, ``_train_epoch`` over a batch source (resident
on the device or from a loader thread), ``_evaluate``, ``save_checkpoint``. Checkpoints are
safetensors (model and optimiser tensors) plus JSON (epoch, step, config, metrics); the sample
order of an epoch is a function of (seed, epoch) and the torch RNG state is saved, so a resumed
run continues exactly where the uninterrupted one would have been.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdstore.atomic import replace_with, write_text
from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.evaluation import group_metrics
from kdstore.faults import crash_point
from kdstore.identity import check_same
from kdstore.metrics import compute_metrics
from kdstore.store import Store

from ..device import distributed, resolve_device
from .avt import AVTConfig, AVTHead
from .batch import Batch
from .config import EXECUTION_FIELDS, StudentConfig
from .data import BatchLoader, StudentData, WindowBatchSampler, preread_on
from .distill import FEATURE_TERMS, active_terms, distills, without_distillation
from .losses import check_batch
from .resident import ResidentData, resident_on
from .step import TrainStep

CKPT, STATE, LOG = "last.safetensors", "last.json", "log.jsonl"
# Steps between reads of the losses back to the host (a sync): the divergence check, the
# progress bar and the epoch's sums see every step, a little later.
SYNC_EVERY = 32


def make_optimizer(model: torch.nn.Module, cfg: StudentConfig) -> torch.optim.Optimizer:
    """The config's optimiser; on CUDA its fused form (one kernel a step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and params[0].is_cuda or None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, steps_per_epoch: int, cfg: StudentConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to zero at the last step."""
    warm = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


class RunDir:
    """A run directory: its checkpoint (the run's identity inside) and its per-epoch log."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def has_checkpoint(self) -> bool:
        return (self.path / CKPT).exists()

    def read(self, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, state) of the checkpoint; one-line errors for a missing or damaged one."""
        path = self.path / CKPT
        if not path.is_file():
            raise MissingError(f"{self.path}: no student checkpoint ({CKPT}) in this run directory")
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
            state = json.loads(meta["state"]) if "state" in meta else json.loads((self.path / STATE).read_text())
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{path}: not a readable checkpoint ({why}); delete the run directory to train afresh") from None
        return tensors, state

    def check_same(self, state: dict, identity: dict, epochs: int) -> None:
        """Raise ConfigError unless the checkpoint ``state`` is of the run ``identity`` describes,
        up to its length (more epochs extend it: the rest follows the longer schedule) and its
        execution fields, and has not trained more than ``epochs``."""
        check_same({k: state[k] for k in identity if k in state}, identity, f"{self.path}: checkpoint of another run",
                   hint="use a new run directory", ignore=[f"config.{k}" for k in ("epochs", *EXECUTION_FIELDS)])
        if state["epoch"] > epochs:
            raise ConfigError(f"{self.path}: has trained {state['epoch']} epochs, more than epochs={epochs}; "
                              f"resume with epochs >= {state['epoch']}")

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
        """Checkpoint atomically: tensors and the state (also kept in the safetensors metadata,
        which is what a resume reads) in one file renamed into place, then a JSON copy."""
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()
        for pid, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        text = json.dumps({**state, "param_groups": opt_state["param_groups"]}, indent=1)
        replace_with(self.path / CKPT, lambda tmp: save_file(tensors, str(tmp), metadata={"state": text}))
        crash_point("student.checkpoint")
        write_text(self.path / STATE, text)

    def log(self, entry: dict) -> None:
        with open(self.path / LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def trim_log(self, epochs: int) -> None:
        """Keep the log entries of the first ``epochs`` epochs (a crash may have logged one more)."""
        path = self.path / LOG
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        keep = [line for line in lines if _epoch_of(line) <= epochs]
        if keep != lines:
            write_text(path, "".join(line + "\n" for line in keep))


def _restore(model, opt, tensors: dict[str, torch.Tensor], state: dict) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut short by a crash


def inference_config(cfg: StudentConfig) -> StudentConfig:
    """``cfg`` for reading samples to predict: no past labels (only the training losses read them)."""
    return dataclasses.replace(cfg, past_cls=0.0)


def load_model(run: str | Path, map_location: str = "cpu") -> tuple[AVTHead, StudentConfig, dict]:
    """The model of a run directory, its config and its saved state."""
    tensors, state = RunDir(run).read(map_location)
    cfg = StudentConfig.from_dict(state["config"])
    model = AVTHead(state["feat_dim"], *state["classes"], AVTConfig.of(cfg), teacher_dim=state.get("teacher_dim"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval(), cfg, state


@torch.no_grad()
def predict_logits(model: AVTHead, data: StudentData, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """[N, A] float32 action logits for every sample of ``data``, in order."""
    model.eval()
    out = []
    for b in BatchLoader(data, np.arange(len(data)), batch_size):
        out.append(model(b.frames.to(device))["logits"].float().cpu().numpy())
    return np.concatenate(out)


class LossMeter:
    """An epoch's losses: each step's loss vector stays on the device until ``SYNC_EVERY``
    have gathered, then one read-back (a host sync) adds them up, checks for divergence and
    ``report``s (steps done, last total) to the progress bar."""

    def __init__(self, keys: Callable[[], list[str]], where: str, first_step: int,
                 report: Callable[[int, float], None]):
        self.keys, self.where, self.step, self.report = keys, where, first_step, report
        self.sums: dict[str, float] = {}
        self.pending: list[torch.Tensor] = []  # [len(keys)] losses of the steps not read back yet

    def add(self, losses: torch.Tensor) -> None:
        self.pending.append(losses)
        self.step += 1
        if len(self.pending) == SYNC_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        keys = self.keys()
        values = torch.stack(self.pending).double().cpu().numpy()  # [n, len(keys)]
        total = values[:, keys.index("total")]
        if not np.isfinite(total).all():
            bad = int(np.flatnonzero(~np.isfinite(total))[0])
            raise DataError(f"{self.where}, step {self.step - len(self.pending) + bad + 1} "
                            f"(loss {total[bad]}); lower lr or the distill weight")
        for k, v in zip(keys, values.sum(0)):
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.report(len(self.pending), float(total[-1]))
        self.pending.clear()

    def means(self, steps: int, world: int, device: str) -> dict[str, float]:
        """Each loss's mean over the epoch's ``steps``; over the global batches under DDP, as one process would log."""
        self.flush()
        sums = self.sums
        if world > 1:
            t = torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            sums = dict(zip(sorted(sums), (t / world).tolist()))
        return {k: v / steps for k, v in sums.items()}


class ResidentBatches:
    """Batch source: gathers on the device from the split kept there (trainers.student.resident)."""

    def __init__(self, resident: ResidentData, batch_size: int):
        self.resident, self.batch_size = resident, batch_size

    def __call__(self, order: np.ndarray) -> Iterator[Batch]:
        return self.resident.batches(order, self.batch_size)


class LoaderBatches:
    """Batch source: a loader thread gathers from the memory map and checks each batch (so the
    step never waits on the host); batches are pinned and copied to a CUDA device."""

    def __init__(self, data: StudentData, batch_size: int, device: str, loss_cfg: StudentConfig):
        self.data, self.batch_size, self.device, self.loss_cfg = data, batch_size, device, loss_cfg

    def __call__(self, order: np.ndarray) -> Iterator[Batch]:
        loader = BatchLoader(self.data, order, self.batch_size, pin=self.device.startswith("cuda"),
                             check=lambda b: check_batch(b, self.loss_cfg))
        return (b.to(self.device) for b in loader)


def batch_source(data: StudentData, cfg: StudentConfig, loss_cfg: StudentConfig, device: str):
    """Resident batches where cfg.data_on_device puts the split on the device, else a loader's."""
    if resident_on(data, device, cfg.data_on_device):
        return ResidentBatches(ResidentData(data, device), cfg.batch_size)
    return LoaderBatches(data, cfg.batch_size, device, loss_cfg)


class StudentRecipe:
    """One student run (see :func:`train_student` for the arguments): ``setup()``, then ``train()``."""

    def __init__(self, store: Store, features: str, run_dir: str | Path, cfg: StudentConfig,
                 teacher: str | None, train_split: str, eval_split: str | None, device: str, progress: bool,
                 train_videos: list[str] | None = None, rank: int = 0, world: int = 1):
        self.store, self.features, self.cfg, self.train_videos = store, features, cfg, train_videos
        self.run = RunDir(run_dir)
        self.train_split, self.eval_split, self.progress = train_split, eval_split, progress
        self.device, self.rank, self.world = device, rank, world  # trainers.device: resolve_device, distributed
        self.teacher = teacher if distills(cfg) else None
        # without a teacher the losses are the baseline's whatever the distillation terms say
        self.loss_cfg = cfg if self.teacher is not None else without_distillation(cfg)

    def setup(self) -> None:
        self.run.path.mkdir(parents=True, exist_ok=True)
        self._setup_data()
        self._setup_model()
        self._resume()
        self._setup_steps()

    def _setup_data(self) -> None:
        cfg, store = self.cfg, self.store
        self.train_data = StudentData(store, self.features, self.train_split, cfg, self.teacher, videos=self.train_videos)
        self.eval_data = StudentData(store, self.features, self.eval_split, inference_config(cfg)) if self.eval_split else None
        classes = store.classes
        self.classes = classes
        # the projection to the teacher's width exists only for a feature-distillation term
        feature_kd = any(name in FEATURE_TERMS for name in active_terms(self.loss_cfg))
        self.teacher_dim = self.train_data.teacher_dim if feature_kd else None
        self.identity = {"config": cfg.to_dict(), "features": self.features, "teacher": self.teacher,
                         "train_split": self.train_split, "feat_dim": self.train_data.dim, "teacher_dim": self.teacher_dim,
                         "classes": [classes.num_actions, classes.num_verbs, classes.num_nouns],
                         "store_segments": store.manifest["segments_sha256"]}
        if self.train_videos is not None:  # a hold-out run; absent otherwise, so older checkpoints resume
            self.identity["train_videos"] = sorted(self.train_videos)

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.seed)
        c = self.classes
        self.model = AVTHead(self.train_data.dim, c.num_actions, c.num_verbs, c.num_nouns, AVTConfig.of(self.cfg),
                             teacher_dim=self.teacher_dim).to(self.device)
        self.opt = make_optimizer(self.model, self.cfg)

    def _resume(self) -> None:
        """Continue from the run directory's checkpoint when it holds one of this run."""
        self.start_epoch, self.step, self.metrics = 0, 0, {}
        if self.run.has_checkpoint():
            tensors, state = self.run.read()
            self.run.check_same(state, self.identity, self.cfg.epochs)
            _restore(self.model, self.opt, tensors, state)
            self.start_epoch, self.step, self.metrics = state["epoch"], state["step"], state.get("metrics", {})
        if self.rank == 0:
            self.run.trim_log(self.start_epoch)

    def _setup_steps(self) -> None:
        """DDP, the epoch sampler, the learning-rate schedule, the step function, the batch source."""
        cfg, device = self.cfg, self.device
        self.net = self.model
        if self.world > 1:
            ids = [torch.device(device).index] if device.startswith("cuda") else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if len(self.train_data) < cfg.batch_size * self.world:
            raise ConfigError(f"split {self.train_split!r}: {len(self.train_data)} samples, fewer than one global batch "
                              f"of batch_size {cfg.batch_size} x {self.world} process(es)")
        self.sampler = WindowBatchSampler(len(self.train_data), cfg.batch_size, seed=cfg.seed, drop_last=True,
                                          rank=self.rank, world=self.world)
        steps = self.steps_per_epoch = len(self.sampler)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, steps, cfg), last_epoch=self.step - 1)
        self.step_fn = TrainStep(self.net, self.opt, self.sched, cfg, self.loss_cfg, device)
        if preread_on(self.train_data, cfg.preread):
            self.train_data.features.preread()
        self.batches = batch_source(self.train_data, cfg, self.loss_cfg, device)

    def train(self, stop_after_epochs: int | None = None) -> dict:
        """Train the remaining epochs (up to ``stop_after_epochs``, as a crash would end it);
        returns the last evaluation's metrics."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, steps = self.cfg, self.steps_per_epoch
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"), disable=not self.progress or self.rank != 0, transient=True)
        with bar:
            task = bar.add_task("student", total=cfg.epochs * steps, completed=self.start_epoch * steps, info="")
            for epoch in range(self.start_epoch, cfg.epochs):
                if stop_after_epochs is not None and epoch >= stop_after_epochs:
                    break
                report = lambda n, loss, e=epoch: bar.update(  # noqa: E731
                    task, advance=n, info=f"epoch {e + 1}/{cfg.epochs} loss {loss:.3f}")
                entry = self._train_epoch(epoch, report)
                entry |= self._evaluate()
                self.save_checkpoint(epoch + 1, entry)
        return self.metrics

    def _train_epoch(self, epoch: int, report: Callable[[int, float], None]) -> dict:
        """One epoch's steps; its log entry."""
        self.net.train()
        # every rank reads its part of the same global batches: same samples as one process
        self.sampler.set_epoch(epoch)
        order = np.concatenate(list(self.sampler))
        meter = LossMeter(lambda: self.step_fn.keys, f"{self.run.path}: training diverged at epoch {epoch + 1}",
                          self.step, report)
        t0 = time.perf_counter()
        for batch in self.batches(order):
            meter.add(self.step_fn(batch))
        means = meter.means(self.steps_per_epoch, self.world, self.device)
        self.step = meter.step
        seconds = time.perf_counter() - t0
        return {"epoch": epoch + 1, "step": self.step, "lr": self.sched.get_last_lr()[0], "seconds": seconds,
                "samples_per_s": self.steps_per_epoch * self.cfg.batch_size * self.world / seconds,
                **{f"train_{k}": v for k, v in means.items()}}

    def _evaluate(self) -> dict:
        """The eval split's metrics (rank 0), as ``eval_*`` log fields; they become the run's metrics."""
        if self.eval_data is None or self.rank != 0:
            return {}
        logits = predict_logits(self.model, self.eval_data, device=self.device)
        self.metrics = compute_metrics(logits, self.eval_data.action, self.classes)
        return {f"eval_{k}": v for k, v in self.metrics.items()}

    def save_checkpoint(self, epochs: int, entry: dict) -> None:
        """Log the epoch, then checkpoint (rank 0): a resume drops log entries past the checkpoint."""
        if self.rank != 0:
            return
        self.run.log(entry)
        crash_point("student.logged")
        self.run.save(self.model, self.opt, {**self.identity, "epoch": epochs, "step": self.step, "metrics": self.metrics})
        crash_point("student.epoch")


def train_student(
    store: Store,
    features: str,
    run_dir: str | Path,
    cfg: StudentConfig,
    teacher: str | None = None,
    train_split: str = "training1",
    eval_split: str | None = "validation1",
    device: str | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    train_videos: list[str] | None = None,
) -> dict:
    """Train (or resume) a student in ``run_dir`` on ``store``; returns the final evaluation metrics.

    ``teacher=None``, or a config without an active distillation term (``distill_mode="none"``
    and zero feature weights), trains the baseline without distillation, everything else equal.
    ``stop_after_epochs`` ends the process early as a crash would (for resume tests). Under
    torchrun, each rank trains on its slice of every global batch of ``world * batch_size``
    samples and gradients are averaged (DDP). A resume may raise ``cfg.epochs`` to extend a
    run; its remaining steps follow the cosine schedule of the new length, and it may change
    the execution fields (``data_on_device``, ``compile``, ``preread``), which do not change what a run computes.
    ``train_videos`` trains on the training split's segments in these videos only (a hold-out).
    """
    dev = resolve_device(device)
    with distributed(dev) as (rank, world):
        recipe = StudentRecipe(store, features, run_dir, cfg, teacher, train_split, eval_split, str(dev), progress,
                               train_videos, rank, world)
        recipe.setup()
        metrics = recipe.train(stop_after_epochs)
        del recipe  # its DDP reducer holds the process group: freed before the group ends
    return metrics


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-epoch JSONL log of a run."""
    path = Path(run_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def predict_into_store(
    store: Store, run_dir: str | Path, name: str, splits: list[str] | None = None,
    overwrite: bool = False, device: str = "cpu",
) -> dict:
    """Write a trained student's per-UID logits into ``store`` as ``teacher/<name>`` (kind
    student), with ``kdstore.evaluation``'s metrics of each labelled split; returns those."""
    model, cfg, state = load_model(run_dir, map_location=device)
    splits = splits or store.segments.splits
    uids, logits = [], []
    for split in splits:
        data = StudentData(store, state["features"], split, inference_config(cfg))
        if data.dim != state["feat_dim"]:
            raise ConfigError(f"video/{state['features']}: dimension {data.dim}, the student was trained on {state['feat_dim']}")
        uids.append(data.uid)
        logits.append(predict_logits(model.to(device), data, device=device))
    # a segment in several splits (EGTEA's schemes) is predicted once per split, identically: store it once
    uids_all, first = np.unique(np.concatenate(uids), return_index=True)
    all_logits = np.concatenate(logits)[first]
    metrics = group_metrics(store, uids_all, {"logits": all_logits}, {s: s for s in splits})
    config = {**state["config"], "teacher": state["teacher"], "run_dir": str(run_dir)}
    store.write_predictions(name, uids_all, all_logits, kind="student", config=config, metrics=metrics,
                            log=read_log(run_dir), topk=cfg.topk, overwrite=overwrite)
    return metrics
