"""Student training throughput by data path and step: from the store vs from tensors on the device.

Copies of the same AVT-h student (same init) take the trainer's step
(``trainers.student.step.TrainStep``: forward with bf16 autocast on CUDA, losses, backward,
optimiser and schedule step, the losses read back every ``SYNC_EVERY`` steps as the trainer
does) on the same batches, reached three ways:

* ``host``: ``StudentData`` + ``BatchLoader`` (memory-mapped gathers of the windows' frames and
  the teacher targets in a background thread, pinned on CUDA), then ``Batch.to(device)``:
  the trainer's path when the split does not fit on the device;
* ``resident``: ``ResidentData``, the split's frames and targets copied to the device once and
  each batch gathered there: the trainer's path when it fits (``data_on_device``);
* ``memory``: the same batches gathered beforehand and kept on the device in a list, the
  fastest a data path can be.

A variant ``<path>+compiled`` runs the step compiled (``--compile``, default ``reduce-overhead``:
CUDA graphs on CUDA). Variants alternate in blocks of steps so that a change of machine load
affects all; each host block starts a fresh loader (cold prefetch queue), the conservative
choice. Per row: ``ratio`` = samples/s over the ``memory`` variant of the same step (goal
for the store: >= 0.97), ``gain`` = samples/s over ``host`` eager (the uncompiled trainer on
a split that does not fit on the device) when that ran, and ``max_loss_diff`` between the variants of the same step (0: the
same batches reached the model). ``--batch-sizes`` sweeps the batch size.

Run from the repository root::

    python bench/student_step.py                 # egtea model, D=1024 fp16, ~100k frames, batch 64
    python bench/student_step.py --device cuda --preset egtea --preset ek55 \\
        --batch-sizes 64,128,256,512,1024 --variants host,resident,memory,host+compiled,resident+compiled,memory+compiled
    python bench/student_step.py --tiny          # seconds: D=32, small model (for tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import append_row, peak_rss_mib  # noqa: E402

BENCH = "student_step"
ACTIONS = {"egtea": 106, "ek55": 2513}  # the synthetic class table is padded up to these
# The presets' models and optimisers. Their distillation weights (egtea: 150 * T^2) make the
# optimiser diverge within a few steps on these random features and random teacher, so the
# weight is 1: a different number, the same computation.
FULL = dict(dim=1024, frames=100_000, n_videos=400, model=dict(distill=1.0), steps=50, warmup=3, block=10)
# A GPU step takes milliseconds: more steps, longer blocks (a trainer keeps one loader for a
# whole epoch, so a fresh loader every 10 steps would overstate its start-up), and a warm-up
# long enough for CUDA-graph trees to record.
CUDA = dict(steps=200, warmup=10, block=50)
TINY = dict(dim=32, frames=5_000, n_videos=24,
            model=dict(num_frames=4, n_layer=1, n_head=2, inter_dim=64, topk=10, distill=1.0),
            steps=12, warmup=2, block=4)
VARIANTS = ("host", "memory")


def build_store(path: Path, dim: int, frames: int, n_videos: int, actions: int = 0, seed: int = 0):
    """A synthetic store with ~``frames`` fp16 features of width ``dim``, at least ``actions``
    action classes, and a teacher (random logits for 90% of the segments)."""
    from kdstore.rulstm import load_annotations
    from kdstore.store import Store
    from kdstore.synthetic import SyntheticConfig, generate_annotations

    ann = generate_annotations(path.parent / "annotations", SyntheticConfig(n_videos=n_videos, seed=seed))
    classes, segments = load_annotations(ann, fps=24.0)
    if (extra := actions - classes.num_actions) > 0:  # classes no segment has, as EK55 has many
        pad = np.zeros(extra, classes.action_verb.dtype)
        classes = dataclasses.replace(classes, action_names=classes.action_names + [f"extra {i}" for i in range(extra)],
                                      action_verb=np.concatenate([classes.action_verb, pad]),
                                      action_noun=np.concatenate([classes.action_noun, pad]))
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


def run(tiny: bool = False, device: str | None = None, out_dir: str | Path | None = None, steps: int | None = None,
        preset_name: str = "egtea", batch_size: int | None = None, variants=VARIANTS, compile: str = "reduce-overhead",
        backend: str = "inductor", store=None) -> list[dict]:
    """Measure ``variants`` at one batch size; append one row each to ``<out_dir>/student_step.csv``.

    ``store``: a store made by :func:`build_store` with this size (default: a fresh one).
    ``backend``: torch.compile's for the ``+compiled`` variants (tests use "aot_eager" on CPU).
    """
    from trainers.student.avt import AVTHead
    from trainers.student.config import preset
    from trainers.student.data import BatchLoader, StudentData, epoch_order
    from trainers.student.losses import check_batch
    from trainers.student.resident import ResidentData
    from trainers.student.step import TrainStep
    from trainers.student.train import SYNC_EVERY, make_optimizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    p = dict(TINY if tiny else FULL)
    if cuda and not tiny:
        p.update(CUDA)
    if steps is not None:
        p["steps"] = steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = preset(preset_name, **p["model"], **({"batch_size": batch_size} if batch_size else {}))
    bs, warmup, steps, block = base.batch_size, p["warmup"], p["steps"], p["block"]
    specs = {v: (v.partition("+")[0], compile if v.endswith("+compiled") else "off") for v in variants}
    unknown = [v for v, (path, _) in specs.items() if path not in ("host", "resident", "memory")]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: expected host, resident or memory, each optionally +compiled")

    with tempfile.TemporaryDirectory(prefix="kdstore-bench-") as tmp:
        t0 = time.perf_counter()
        if store is None:
            store = build_store(Path(tmp) / "store.zarr", p["dim"], p["frames"], p["n_videos"], ACTIONS[preset_name])
        build_s = time.perf_counter() - t0
        n_frames = len(store.video("feat"))
        data = StudentData(store, "feat", "training1", base, teacher="teacher")
        n_batches = warmup + steps
        per_epoch = len(data) // bs * bs  # as the trainer: full batches, a new order each epoch
        epochs = -(-n_batches * bs // per_epoch)
        order = np.concatenate([epoch_order(len(data), base.seed, e, shuffle=True)[:per_epoch] for e in range(epochs)])
        chunks = order[: n_batches * bs].reshape(n_batches, bs)
        classes = store.classes
        paths = {path for path, _ in specs.values()}
        in_memory = [data.batch(ids).to(device) for ids in chunks] if "memory" in paths else []
        resident = ResidentData(data, device) if "resident" in paths else None
        sync()

        def make(step_compile: str):
            cfg = dataclasses.replace(base, compile=step_compile)
            torch.manual_seed(cfg.seed)
            model = AVTHead(data.dim, classes.num_actions, classes.num_verbs, classes.num_nouns, cfg).to(device).train()
            opt = make_optimizer(model, cfg)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # the trainer's scheduler work
            return TrainStep(model, opt, sched, cfg, cfg, device, backend=backend)

        torch._dynamo.reset()  # each compiled variant compiles afresh, within dynamo's recompile limit
        step_fns = {v: make(c) for v, (_, c) in specs.items()}
        losses: dict[str, list[np.ndarray]] = {v: [] for v in specs}
        times: dict[str, list[tuple[float, int]]] = {v: [] for v in specs}  # (seconds, steps) per block

        def run_block(variant: str, lo: int, hi: int, timed: bool) -> None:
            path, _ = specs[variant]
            step_fn = step_fns[variant]
            if path == "host":
                loader = BatchLoader(data, chunks[lo:hi].reshape(-1), bs, pin=cuda, check=lambda b: check_batch(b, base))
                batches = (b.to(device) for b in loader)
            elif path == "resident":
                batches = resident.batches(chunks[lo:hi].reshape(-1), bs)
            else:
                batches = iter(in_memory[lo:hi])
            pending = []
            sync()
            t = time.perf_counter()
            for i, batch in enumerate(batches, start=lo):
                torch.manual_seed(base.seed + i)  # the same dropout masks in the variants of a step
                pending.append(step_fn(batch))
                if len(pending) == SYNC_EVERY or i == hi - 1:  # the trainer's read-back
                    losses[variant].append(torch.stack(pending).cpu().numpy())
                    pending = []
            sync()
            if timed:
                times[variant].append((time.perf_counter() - t, hi - lo))

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for variant in specs:
            run_block(variant, 0, warmup, timed=False)
        for lo in range(warmup, n_batches, block):  # alternate blocks: load changes hit every variant
            for variant in specs:
                run_block(variant, lo, min(lo + block, n_batches), timed=True)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()

    rate = {v: steps * bs / sum(s for s, _ in times[v]) for v in specs}
    config = {"tiny": tiny, "device": device, "preset": preset_name, "dim": p["dim"], "frames": n_frames,
              "dtype": "float16", "amp": "bfloat16" if cuda else "none", "samples": len(data), "batch_size": bs,
              "steps": steps, "warmup": warmup, "block": block,
              "model": {k: getattr(base, k) for k in ("num_frames", "n_layer", "n_head", "inter_dim")},
              "distill_mode": base.distill_mode, "distill": base.distill, "num_actions": classes.num_actions,
              "torch_threads": torch.get_num_threads()}
    rows = []
    for variant, (path, step_compile) in specs.items():
        same_step = [v for v, (_, c) in specs.items() if c == step_compile]
        ref = np.concatenate(losses[same_step[0]])
        diff = max(float(np.max(np.abs(np.concatenate(losses[v]) - ref))) for v in same_step)
        memory = next((v for v in same_step if specs[v][0] == "memory"), None)
        result = {"variant": variant, "samples_per_s": rate[variant], "seconds": sum(s for s, _ in times[variant]),
                  "median_step_s": statistics.median(s / n for s, n in times[variant]),
                  "ratio": rate[variant] / rate[memory] if memory else "",
                  "gain": rate[variant] / rate["host"] if "host" in rate else "",
                  "max_loss_diff": diff, "build_store_s": build_s, "peak_mem_mib": peak}
        rows.append(append_row(BENCH, {**config, "variant": variant, "data": path, "compile": step_compile,
                                       "backend": backend if step_compile != "off" else ""}, result, out_dir))
    return rows


def sweep(presets=("egtea",), batch_sizes=(None,), tiny: bool = False, device: str | None = None, **kw) -> list[dict]:
    """:func:`run` for each preset (one store each) and batch size."""
    rows = []
    p = TINY if tiny else FULL
    for name in presets:
        with tempfile.TemporaryDirectory(prefix="kdstore-bench-") as tmp:
            store = build_store(Path(tmp) / "store.zarr", p["dim"], p["frames"], p["n_videos"], ACTIONS[name])
            for bs in batch_sizes:
                rows += run(tiny=tiny, device=device, preset_name=name, batch_size=bs, store=store, **kw)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small store and model, a few steps")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50, CUDA 200, tiny 12)")
    ap.add_argument("--preset", action="append", choices=sorted(ACTIONS), help="repeatable (default egtea)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default: the preset's)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated host|resident|memory, each optionally +compiled")
    ap.add_argument("--compile", default="reduce-overhead", choices=("default", "reduce-overhead"),
                    help="the +compiled variants' mode")
    ap.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    a = ap.parse_args()
    sizes = tuple(int(b) for b in a.batch_sizes.split(",")) if a.batch_sizes else (None,)
    rows = sweep(presets=a.preset or ("egtea",), batch_sizes=sizes, tiny=a.tiny, device=a.device, out_dir=a.out_dir,
                 steps=a.steps, variants=tuple(a.variants.split(",")), compile=a.compile)
    for r in rows:
        c = json.loads(r["config"])
        ratio, gain = (f"{float(r[k]):.3f}" if r[k] != "" else "-" for k in ("ratio", "gain"))
        print(f"{c['preset']:>5} batch {c['batch_size']:>4} {r['variant']:>17}: {float(r['samples_per_s']):9.1f} "
              f"samples/s  ratio to memory {ratio}  gain over host eager {gain}  "
              f"max loss difference {float(r['max_loss_diff']):.3g}")


if __name__ == "__main__":
    main()
