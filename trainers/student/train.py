"""Train an AVT-h student on a store's features, with or without distillation.

Read top to bottom: set up (data, model, optimiser, schedule), resume if a checkpoint of
the same run exists, then for each epoch: train, evaluate, checkpoint, log. Checkpoints
are safetensors (model and optimiser tensors) plus JSON (epoch, step, config, metrics);
the sample order of an epoch is a function of (seed, epoch) and the torch RNG state is
saved, so a resumed run continues exactly where the uninterrupted one would have been.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.faults import crash_point
from kdstore.metrics import compute_metrics
from kdstore.store import Store

from .avt import AVTHead
from .config import EXECUTION_FIELDS, StudentConfig
from .data import BatchLoader, StudentData, WindowBatchSampler, preread_on
from .distill import distills, without_distillation
from .losses import check_batch
from .resident import ResidentData, resident_on
from .step import TrainStep

CKPT, STATE, LOG = "last.safetensors", "last.json", "log.jsonl"
# Steps between reads of the losses back to the host (a sync): the divergence check, the
# progress bar and the epoch's sums see every step, a little later.
SYNC_EVERY = 32


def _dist(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device), initialising torch.distributed when launched
    by torchrun. A CUDA rank takes the GPU of its LOCAL_RANK; a rank without one is refused
    before any process group starts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                              "start at most that many processes per node, or pass device='cpu'")
        device = f"cuda:{local}"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world, device


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


def _save(run: Path, model, opt, state: dict) -> None:
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
    state = json.dumps({**state, "param_groups": opt_state["param_groups"]}, indent=1)
    save_file(tensors, run / f".{CKPT}.tmp", metadata={"state": state})
    (run / f".{STATE}.tmp").write_text(state)
    os.replace(run / f".{CKPT}.tmp", run / CKPT)
    crash_point("student.checkpoint")
    os.replace(run / f".{STATE}.tmp", run / STATE)


def _read_checkpoint(run: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a run's checkpoint; one-line errors for a missing or damaged one."""
    path = run / CKPT
    if not path.is_file():
        raise MissingError(f"{run}: no student checkpoint ({CKPT}) in this run directory")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        state = json.loads(meta["state"]) if "state" in meta else json.loads((run / STATE).read_text())
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
                          " delete the run directory to train afresh") from None
    return tensors, state


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


def load_model(run: str | Path, map_location: str = "cpu") -> tuple[AVTHead, StudentConfig, dict]:
    """The model of a run directory, its config and its saved state."""
    tensors, state = _read_checkpoint(Path(run), map_location)
    cfg = StudentConfig.from_dict(state["config"])
    model = AVTHead(state["feat_dim"], *state["classes"], cfg, teacher_dim=state.get("teacher_dim"))
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


def train_student(
    store_path: str | Path,
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
    """Train (or resume) a student in ``run_dir``; returns the final evaluation metrics.

    ``teacher=None``, or a config without an active distillation term (``distill_mode="none"``
    and zero feature weights), trains the baseline without distillation, everything else equal.
    ``stop_after_epochs`` ends the process early as a crash would (for resume tests). Under
    torchrun, each rank trains on its slice of every global batch of ``world * batch_size``
    samples and gradients are averaged (DDP). A resume may raise ``cfg.epochs`` to extend a
    run; its remaining steps follow the cosine schedule of the new length, and it may change
    the execution fields (``data_on_device``, ``compile``, ``preread``), which do not change what a run computes.
    ``train_videos`` trains on the training split's segments in these videos only (a hold-out).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = _dist(device)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    store = Store.open(store_path)
    teacher = teacher if distills(cfg) else None
    # without a teacher the losses are the baseline's whatever the distillation terms say
    loss_cfg = cfg if teacher is not None else without_distillation(cfg)
    train = StudentData(store, features, train_split, cfg, teacher, videos=train_videos)
    evaluate = StudentData(store, features, eval_split, cfg) if eval_split else None
    classes = store.classes
    identity = {"config": cfg.to_dict(), "features": features, "teacher": teacher, "train_split": train_split,
                "feat_dim": train.dim, "teacher_dim": train.teacher_dim,
                "classes": [classes.num_actions, classes.num_verbs, classes.num_nouns],
                "store_segments": store.manifest["segments_sha256"]}
    if train_videos is not None:
        identity["train_videos"] = sorted(train_videos)

    torch.manual_seed(cfg.seed)
    model = AVTHead(train.dim, classes.num_actions, classes.num_verbs, classes.num_nouns, cfg,
                    teacher_dim=train.teacher_dim).to(device)
    opt = make_optimizer(model, cfg)
    start_epoch, step = 0, 0
    metrics: dict = {}
    if (run / CKPT).exists():
        tensors, state = _read_checkpoint(run)
        # the same run, up to its length (more epochs extend it: the rest follows the longer
        # schedule) and its execution fields
        ignored = dict.fromkeys(("epochs", *EXECUTION_FIELDS))
        same = lambda d: {**d, "config": {**d.get("config", {}), **ignored}}  # noqa: E731
        saved, now = same(state), same(identity)
        diff = sorted(k for k in identity if saved.get(k) != now[k])
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff if k != "config")
            cdiff = [k for k in now["config"] if saved.get("config", {}).get(k) != now["config"][k]]
            raise ConfigError(f"{run}: checkpoint of another run ({detail or 'config keys ' + ', '.join(cdiff)}); use a new run directory")
        if state["epoch"] > cfg.epochs:
            raise ConfigError(f"{run}: has trained {state['epoch']} epochs, more than epochs={cfg.epochs}; "
                              f"resume with epochs >= {state['epoch']}")
        _restore(model, opt, tensors, state)
        start_epoch, step, metrics = state["epoch"], state["step"], state.get("metrics", {})
    if rank == 0:
        _trim_log(run, start_epoch)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    per_step = cfg.batch_size * world
    if len(train) < per_step:
        raise ConfigError(f"split {train_split!r}: {len(train)} samples, fewer than one global batch of "
                          f"batch_size {cfg.batch_size} x {world} process(es)")
    sampler = WindowBatchSampler(len(train), cfg.batch_size, seed=cfg.seed, drop_last=True, rank=rank, world=world)
    steps_per_epoch = len(sampler)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, cfg), last_epoch=step - 1)
    step_fn = TrainStep(net, opt, sched, cfg, loss_cfg, device)
    if preread_on(train, cfg.preread):
        train.features.preread()
    resident = ResidentData(train, device) if resident_on(train, device, cfg.data_on_device) else None

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), disable=not progress or rank != 0, transient=True)
    with bar:
        task = bar.add_task("student", total=cfg.epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after_epochs is not None and epoch >= stop_after_epochs:
                return metrics
            net.train()
            # every rank reads its part of the same global batches: same samples as one process
            sampler.set_epoch(epoch)
            order = np.concatenate(list(sampler))
            sums: dict[str, float] = {}
            pending: list[torch.Tensor] = []  # [len(keys)] losses of the steps not read back yet

            def read_back() -> None:
                """The pending steps' losses to the host: sums, progress, and the divergence check."""
                values = torch.stack(pending).double().cpu().numpy()  # [n, len(keys)]
                total = values[:, step_fn.keys.index("total")]
                if not np.isfinite(total).all():
                    bad = int(np.flatnonzero(~np.isfinite(total))[0])
                    raise DataError(f"{run}: training diverged at epoch {epoch + 1}, step {step - len(pending) + bad + 1} "
                                    f"(loss {total[bad]}); lower lr or the distill weight")
                for k, v in zip(step_fn.keys, values.sum(0)):
                    sums[k] = sums.get(k, 0.0) + float(v)
                bar.update(task, advance=len(pending), info=f"epoch {epoch + 1}/{cfg.epochs} loss {total[-1]:.3f}")
                pending.clear()

            t0 = time.perf_counter()
            if resident is not None:
                batches = resident.batches(order, cfg.batch_size)
            else:  # checked in the loader's thread, so the step never waits on the host
                loader = BatchLoader(train, order, cfg.batch_size, pin=device.startswith("cuda"),
                                     check=lambda b: check_batch(b, loss_cfg))
                batches = (b.to(device) for b in loader)
            for batch in batches:
                pending.append(step_fn(batch))
                step += 1
                if len(pending) == SYNC_EVERY:
                    read_back()
            if pending:
                read_back()
            if world > 1:  # log the losses of the global batches, as one process would
                t = torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(t)
                sums = dict(zip(sorted(sums), (t / world).tolist()))
            seconds = time.perf_counter() - t0
            entry = {"epoch": epoch + 1, "step": step, "lr": sched.get_last_lr()[0], "seconds": seconds,
                     "samples_per_s": steps_per_epoch * per_step / seconds,
                     **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()}}
            if evaluate is not None and rank == 0:
                logits = predict_logits(model, evaluate, device=device)
                metrics = compute_metrics(logits, evaluate.action, classes)
                entry |= {f"eval_{k}": v for k, v in metrics.items()}
            if rank == 0:  # the log first: a resume drops entries of epochs past the checkpoint
                with open(run / LOG, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                crash_point("student.logged")
                _save(run, model, opt, {**identity, "epoch": epoch + 1, "step": step, "metrics": metrics})
                crash_point("student.epoch")
    return metrics


def _trim_log(run: Path, epochs: int) -> None:
    """Keep the log entries of the first ``epochs`` epochs (a crash may have logged one more)."""
    path = run / LOG
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _epoch_of(line) <= epochs]
    if keep != lines:
        (run / f".{LOG}.tmp").write_text("".join(line + "\n" for line in keep))
        os.replace(run / f".{LOG}.tmp", path)


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut short by a crash


def read_log(run_dir: str | Path) -> list[dict]:
    """The per-epoch JSONL log of a run."""
    path = Path(run_dir) / LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def predict_into_store(
    store_path: str | Path, run_dir: str | Path, name: str, splits: list[str] | None = None,
    overwrite: bool = False, device: str = "cpu",
) -> dict:
    """Write a trained student's per-UID logits into the store as ``teacher/<name>`` (kind student)."""
    model, cfg, state = load_model(run_dir, map_location=device)
    store = Store.open(store_path)
    splits = splits or store.segments.splits
    uids, logits = [], []
    for split in splits:
        data = StudentData(store, state["features"], split, cfg)
        if data.dim != state["feat_dim"]:
            raise ConfigError(f"video/{state['features']}: dimension {data.dim}, the student was trained on {state['feat_dim']}")
        uids.append(data.uid)
        logits.append(predict_logits(model.to(device), data, device=device))
    # a segment in several splits (EGTEA's schemes) is predicted once per split, identically: store it once
    uids_all, first = np.unique(np.concatenate(uids), return_index=True)
    all_logits = np.concatenate(logits)[first]
    metrics = {}
    for split, u, lg in zip(splits, uids, logits):
        labels = store.segments.action[store.segments.row_of(u)]  # -1: unlabelled (test), left out of the metrics
        metrics[split] = compute_metrics(lg, labels, store.classes) if (labels >= 0).any() else {"unlabelled": len(u)}
    config = {**state["config"], "teacher": state["teacher"], "run_dir": str(run_dir)}
    store.write_predictions(name, uids_all, all_logits, kind="student", config=config,
                            metrics=metrics, log=read_log(run_dir), topk=cfg.topk, overwrite=overwrite)
    return metrics
