"""Student training throughput: batches read from the store vs batches already in memory.

Two copies of the same AVT-h student (same init) take the same optimiser steps on the same
batches:

* ``store``: the trainer's data path, ``StudentData`` + ``BatchLoader`` (memory-mapped
  gathers of the windows' frames and the teacher logits, prepared by a background thread,
  pinned on CUDA) then ``Batch.to(device)``;
* ``memory``: the same batches gathered beforehand and kept on the device in a list, the
  fastest a data path can be.

Each step is the trainer's: forward (bf16 autocast on CUDA), ``student_losses``, backward,
optimiser step, and reading the loss back (which synchronises, as the trainer's logging
does). The two variants alternate in blocks of steps so that a change of machine load
affects both; each store block starts a fresh loader (cold prefetch queue), which is the
conservative choice. ``ratio`` = store samples/s / memory samples/s; the goal is >= 0.90.
The two variants' losses must be identical (the same batches reach the model), which
``max_loss_diff`` reports.

Run from the repository root::

    python bench/student_step.py                 # D=1024 fp16, ~100k frames, egtea model, batch 64
    python bench/student_step.py --device cuda
    python bench/student_step.py --tiny          # seconds: D=32, small model (for tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import append_row, peak_rss_mib  # noqa: E402

BENCH = "student_step"

# The egtea preset's model and optimiser. Its distillation weight (150 * T^2) makes SGD diverge
# within ~8 steps on these random features and random teacher, so the weight is 1: a
# different number, the same computation.
FULL = dict(dim=1024, frames=100_000, n_videos=400, model=dict(distill=1.0), batch_size=64, steps=50, warmup=3,
            block=10)
# A GPU step takes milliseconds: more steps, and blocks as long as a short epoch (a trainer
# keeps one loader for a whole epoch, so a fresh loader every 10 steps would overstate its start-up).
CUDA = dict(steps=500, block=100)
TINY = dict(dim=32, frames=5_000, n_videos=24,
            model=dict(num_frames=4, n_layer=1, n_head=2, inter_dim=64, topk=10, distill=1.0),
            batch_size=16, steps=12, warmup=2, block=4)


def build_store(path: Path, dim: int, frames: int, n_videos: int, seed: int = 0):
    """A synthetic store with ~``frames`` fp16 features of width ``dim`` and a teacher
    (random logits for 90% of the segments)."""
    from kdstore.annotations import load_annotations
    from kdstore.store import Store
    from kdstore.synthetic import SyntheticConfig, generate_annotations

    ann = generate_annotations(path.parent / "annotations", SyntheticConfig(n_videos=n_videos, seed=seed))
    classes, segments = load_annotations(ann, fps=24.0)
    store = Store.create(path, classes, segments)
    ends = {v: 2.0 + segments.end_frame[segments.video == i].max() / segments.fps for i, v in enumerate(segments.videos)}
    rate = frames / sum(ends.values())  # frames a second, for ~`frames` in all
    rng = np.random.default_rng(seed)
    w = store.video_writer("feat", dim, dtype="float16", frame_rate=rate)
    for video, end in ends.items():
        t = np.arange(0.0, end, 1.0 / rate)
        w.put(video, rng.standard_normal((len(t), dim), dtype=np.float32), t)
    w.commit()
    keep = rng.random(len(segments)) < 0.9
    logits = rng.normal(size=(int(keep.sum()), classes.num_actions)).astype(np.float32) * 3
    store.write_predictions("teacher", segments.uid[keep], logits)
    return Store.open(path)


def _step(model, opt, batch, cfg, amp) -> float:
    """One training step exactly as trainers.student.train does it; returns the loss."""
    from trainers.student.losses import student_losses

    with amp:
        out = model(batch.frames)
    losses = student_losses({k: v.float() for k, v in out.items()}, batch, cfg)
    opt.zero_grad(set_to_none=True)
    losses["total"].backward()
    opt.step()
    loss = float(losses["total"].detach())
    if not np.isfinite(loss):
        raise RuntimeError(f"the loss is {loss}: training diverged, the timings would not be of real training")
    return loss


def run(tiny: bool = False, device: str | None = None, out_dir: str | Path | None = None,
        steps: int | None = None) -> list[dict]:
    """Measure both variants; append one row each to ``<out_dir>/student_step.csv``."""
    from trainers.student.avt import AVTHead
    from trainers.student.config import preset
    from trainers.student.data import BatchLoader, StudentData, epoch_order
    from trainers.student.train import make_optimizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    p = dict(TINY if tiny else FULL)
    if cuda and not tiny:
        p.update(CUDA)
    if steps is not None:
        p["steps"] = steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = preset("egtea", batch_size=p["batch_size"], **p["model"])
    bs, warmup, steps, block = cfg.batch_size, p["warmup"], p["steps"], p["block"]

    with tempfile.TemporaryDirectory(prefix="kdstore-bench-") as tmp:
        t0 = time.perf_counter()
        store = build_store(Path(tmp) / "store.zarr", p["dim"], p["frames"], p["n_videos"])
        build_s = time.perf_counter() - t0
        n_frames = len(store.video("feat"))
        data = StudentData(store, "feat", "training1", cfg, teacher="teacher")
        n_batches = warmup + steps
        per_epoch = len(data) // bs * bs  # as the trainer: full batches, a new order each epoch
        epochs = -(-n_batches * bs // per_epoch)
        order = np.concatenate([epoch_order(len(data), cfg.seed, e, shuffle=True)[:per_epoch] for e in range(epochs)])
        chunks = order[: n_batches * bs].reshape(n_batches, bs)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        classes = store.classes

        def make():
            torch.manual_seed(cfg.seed)
            model = AVTHead(data.dim, classes.num_actions, classes.num_verbs, classes.num_nouns, cfg).to(device)
            return model.train(), make_optimizer(model, cfg)

        in_memory = [data.batch(ids).to(device) for ids in chunks]  # the "memory" variant's batches
        sync()
        models = {"store": make(), "memory": make()}
        losses: dict[str, list[float]] = {"store": [], "memory": []}
        times: dict[str, list[float]] = {"store": [], "memory": []}
        waits: dict[str, list[float]] = {"store": [], "memory": []}  # time spent getting the batch

        def run_block(variant: str, lo: int, hi: int, timed: bool) -> None:
            model, opt = models[variant]
            if variant == "store":
                batches = (b.to(device) for b in BatchLoader(data, chunks[lo:hi].reshape(-1), bs, pin=cuda))
            else:
                batches = iter(in_memory[lo:hi])
            sync()
            t = time.perf_counter()
            for i, batch in enumerate(batches, start=lo):  # waiting for a batch counts in the step time
                got = time.perf_counter()
                torch.manual_seed(cfg.seed + i)  # the same dropout masks in both variants
                losses[variant].append(_step(model, opt, batch, cfg, amp))
                sync()
                now = time.perf_counter()
                if timed:
                    times[variant].append(now - t)
                    waits[variant].append(got - t)
                t = now

        for variant in ("store", "memory"):
            run_block(variant, 0, warmup, timed=False)
        for lo in range(warmup, n_batches, block):  # alternate blocks: load changes hit both
            for variant in ("store", "memory"):
                run_block(variant, lo, min(lo + block, n_batches), timed=True)

    rate = {v: steps * bs / sum(times[v]) for v in times}
    ratio = rate["store"] / rate["memory"]
    # the machine may be shared: the ratio of median step times is robust to load spikes
    median_ratio = statistics.median(times["memory"]) / statistics.median(times["store"])
    max_diff = float(np.max(np.abs(np.array(losses["store"]) - np.array(losses["memory"]))))
    config = {"tiny": tiny, "device": device, "dim": p["dim"], "frames": n_frames,
              "dtype": "float16", "samples": len(data), "batch_size": bs, "steps": steps, "warmup": warmup,
              "block": block, "model": {k: getattr(cfg, k) for k in ("num_frames", "n_layer", "n_head", "inter_dim")},
              "distill_mode": cfg.distill_mode, "distill": cfg.distill, "num_actions": classes.num_actions,
              "torch_threads": torch.get_num_threads()}
    rows = []
    for variant in ("store", "memory"):
        result = {"variant": variant, "samples_per_s": rate[variant], "seconds": sum(times[variant]),
                  "median_step_s": statistics.median(times[variant]), "max_step_s": max(times[variant]),
                  "wait_s": sum(waits[variant]), "ratio": ratio, "median_ratio": median_ratio, "max_loss_diff": max_diff, "build_store_s": build_s, "peak_rss_mib": peak_rss_mib()}
        rows.append(append_row(BENCH, {**config, "variant": variant}, result, out_dir))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small store and model, a few steps")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50; tiny 12)")
    ap.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    a = ap.parse_args()
    rows = run(tiny=a.tiny, device=a.device, out_dir=a.out_dir, steps=a.steps)
    for r in rows:
        print(f"{r['variant']:>6}: {float(r['samples_per_s']):9.1f} samples/s  "
              f"(median step {float(r['median_step_s']) * 1e3:.1f} ms)")
    print(f" ratio: {float(rows[0]['ratio']):.3f} (store / memory; goal >= 0.90), of median steps "
          f"{float(rows[0]['median_ratio']):.3f}; the store variant waited {float(rows[0]['wait_s']):.3f} s for "
          f"batches in {float(rows[0]['seconds']):.1f} s; max loss difference {float(rows[0]['max_loss_diff']):.3g}")


if __name__ == "__main__":
    main()
