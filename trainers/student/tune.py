"""``tune-kd``: choose a distillation setting on held-out training videos, then train it once.

Stages, each resumable, in an output directory::

    tune.json       the settings of the tuning (a resume with other settings is refused)
    cells/<id>/     one student run per grid cell, trained on the fit videos; ``result.json``
                    (its metrics on the held-out videos) marks it finished
    grid.csv/json   the grid's table: every cell's setting and held-out metrics
    chosen.json     the chosen cell and its full StudentConfig
    final/          the chosen setting trained on the whole training split

The hold-out is a seeded share of the training split's videos (``split_videos``); no row of
the evaluation split is read before the chosen setting is final. The teacher's targets on
training rows must be out-of-fold (``build-teacher`` with ``folds`` > 1: each training row is
predicted by a model that never saw its video), so the student's targets on the fit videos
hold no label of the video they stand for; the fold models did see held-out videos' labels,
as they saw every other training video's (``check_teacher``).

The grid is any set of StudentConfig fields with a list of values each (``distill_mode``,
``distill``, ``temperature``, ``distill_reduction``, any mode in ``distill.KD_MODES``); its
cells are their product, plus the student without KD. Cells run in one process per device
(each visible GPU, or ``workers`` CPU processes sharing the cores), each taking the next
unfinished cell; a killed cell resumes from its last epoch via the trainer's exact resume.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.identity import check_same
from kdstore.store import Store

from ..config import parse_set
from .config import StudentConfig, preset

NO_KD = "no KD"
METRICS = ("mean_top1_recall", "mean_top5_recall", "top1", "top5")


@dataclass
class TuneConfig:
    """What ``tune-kd`` tries and how it chooses."""

    features: str
    teacher: str
    grid: dict[str, list] = field(default_factory=dict)  # StudentConfig field -> values; cells: their product + no KD
    preset: str = "egtea"
    overrides: dict = field(default_factory=dict)  # StudentConfig fields of every cell
    train_split: str | None = None  # default: the store's training split
    eval_split: str | None = None  # default: the store's evaluation split
    holdout: float = 0.2  # share of the training videos held out for choosing
    holdout_seed: int = 0
    metric: str | None = None  # default: mean_top5_recall on EK100 stores (or with its subsets), else mean_top1_recall
    devices: list[str] | None = None  # one cell process per entry; default: each GPU, else `workers` CPU ones
    workers: int = 1


@dataclass
class Cell:
    """One grid setting: its name, the fields it sets and the full config it trains."""

    name: str
    setting: dict
    config: StudentConfig

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Plan:
    """Everything a tuning run needs, checked: splits, hold-out videos, metric and cells."""

    store_path: str
    cfg: TuneConfig
    train_split: str
    eval_split: str
    metric: str
    fit_videos: list[str]
    held_videos: list[str]
    cells: list[Cell]
    segments_sha256: str = ""  # the store's segments: a moved store still resumes, another one does not


def parse_grid(pairs: list[str]) -> dict[str, list]:
    """``["distill=1,150", "temperature=1,10"]`` as typed values per StudentConfig field; a
    one-line ConfigError for an empty grid, an axis without values or an unknown field/value."""
    if not pairs:
        raise ConfigError("grid: empty; give at least one field=value[,value...] (e.g. --grid distill=1,150)")
    grid: dict[str, list] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not values:
            raise ConfigError(f"grid: {pair!r} has no values; expected field=value[,value...]")
        key = key.strip().replace("-", "_")
        grid[key] = [parse_set(StudentConfig, [f"{key}={v}"])[key] for v in values]
    return grid


def make_cells(grid: dict[str, list], base: str, overrides: dict) -> list[Cell]:
    """No KD first, then the grid's product in order; settings that do not distil are the no-KD
    cell, and duplicates are dropped. Each cell's config is checked (ConfigError names it)."""
    from .distill import distills, without_distillation

    if not grid or not all(grid.values()):
        raise ConfigError("grid: empty; give at least one field with at least one value")
    plain = without_distillation(preset(base, **overrides))
    cells, seen = [Cell(NO_KD, {}, plain)], {json.dumps(plain.to_dict(), sort_keys=True)}
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        name = " ".join(f"{k}={v}" for k, v in setting.items())
        try:
            cfg = preset(base, **{**overrides, **setting})
        except ConfigError as e:
            raise ConfigError(f"grid cell {name!r}: {e}") from None
        key = json.dumps((cfg if distills(cfg) else plain).to_dict(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            cells.append(Cell(name, setting, cfg))
    if len(cells) == 1:
        raise ConfigError("grid: no cell distils (every setting equals the student without KD)")
    return cells


def split_videos(store: Store, split: str, share: float, seed: int) -> tuple[list[str], list[str]]:
    """(fit, held-out) video names of ``split``: a seeded permutation of its sorted videos, the
    first ``share`` of them (at least one, and at least one left) held out."""
    seg = store.segments
    videos = sorted({seg.videos[v] for v in np.unique(seg.video[seg.rows_in(split)])})
    if not 0 < share < 1:
        raise ConfigError(f"holdout: {share} is not a share between 0 and 1")
    if len(videos) < 2:
        raise DataError(f"{store.path}: split {split!r} has {len(videos)} video(s); a hold-out needs two or more")
    order = np.random.default_rng(seed).permutation(len(videos))
    n = min(max(1, round(share * len(videos))), len(videos) - 1)
    held = sorted(videos[i] for i in order[:n])
    return sorted(set(videos) - set(held)), held


def check_teacher(store: Store, teacher: str, train_split: str) -> None:
    """Refuse a teacher whose training-split predictions are not out-of-fold for ``train_split``."""
    if teacher not in store.groups():
        raise MissingError(f"{store.path}: no prediction group {teacher!r} to distil from")
    cfg = store.group(teacher).config
    if cfg.get("train_split") != train_split or int(cfg.get("folds", 0)) < 2:
        raise ConfigError(f"teacher/{teacher}: its {train_split!r} predictions are not out-of-fold (train_split "
                          f"{cfg.get('train_split')!r}, folds {cfg.get('folds')}); build it with folds >= 2 on that split")


def setup(store: Store, cfg: TuneConfig) -> Plan:
    """Check the settings and make the plan: splits, hold-out, metric and cells."""
    train_split, eval_split = cfg.train_split, cfg.eval_split
    if train_split is None or eval_split is None:
        default = store.default_splits()
        train_split, eval_split = train_split or default[0], eval_split or default[1]
    seg = store.segments
    shared = np.flatnonzero(seg.in_split(train_split) & seg.in_split(eval_split))
    if len(shared):
        raise DataError(f"{seg.describe(shared[0])}: in both {train_split!r} and {eval_split!r}; the hold-out needs disjoint splits")
    # EK100's challenge ranks by class-mean top-5 recall; a store with its subsets is one
    metric = cfg.metric or ("mean_top5_recall" if store.dataset == "ek100" or seg.subsets else "mean_top1_recall")
    if metric not in METRICS:
        raise ConfigError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    check_teacher(store, cfg.teacher, train_split)
    fit, held = split_videos(store, train_split, cfg.holdout, cfg.holdout_seed)
    cells = make_cells(cfg.grid, cfg.preset, cfg.overrides)
    return Plan(str(store.path), cfg, train_split, eval_split, metric, fit, held, cells, store.manifest["segments_sha256"])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a kill leaves the old file or the new one


def _check_resume(out: Path, plan: Plan) -> None:
    """Write ``tune.json``, refusing a directory tuned with other settings (cells may be added)."""
    settings = {"segments_sha256": plan.segments_sha256, "features": plan.cfg.features, "teacher": plan.cfg.teacher,
                "train_split": plan.train_split, "eval_split": plan.eval_split, "metric": plan.metric,
                "held_videos": plan.held_videos}
    path = out / "tune.json"
    if path.exists():
        check_same(json.loads(path.read_text()), settings, f"{out}: tuned with other settings",
                   hint="use a new output directory", ignore=["fit_videos"])
    out.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps({**settings, "fit_videos": plan.fit_videos}, indent=1))


def run_cell(plan: Plan, cell: Cell, out: Path, device: str | None = None, threads: int | None = None) -> dict:
    """Train ``cell`` on the fit videos (resuming its run) and score it on the held-out videos;
    the result is saved in ``result.json`` and returned as is when that exists."""
    import torch

    from kdstore.metrics import compute_metrics

    from .data import StudentData
    from .distill import distills
    from .train import load_model, predict_logits, train_student

    run = out / "cells" / cell.id
    if (run / "result.json").exists():
        return json.loads((run / "result.json").read_text())
    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = plan.cfg.teacher if distills(cell.config) else None
    store = Store.open(plan.store_path)  # a cell runs in a process of its own
    train_student(store, plan.cfg.features, run, cell.config, teacher=teacher, train_split=plan.train_split,
                  eval_split=None, device=device, progress=False, train_videos=plan.fit_videos)
    model, cfg, _ = load_model(run, device)
    held = StudentData(store, plan.cfg.features, plan.train_split, cfg, videos=plan.held_videos)
    metrics = compute_metrics(predict_logits(model, held, device=device), held.action, store.classes)
    result = {"cell": cell.name, "id": cell.id, "setting": cell.setting,
              **{k: getattr(cfg, k) for k in ("distill_mode", "distill_reduction", "distill", "temperature")},
              "distils": distills(cfg), "held_out_rows": len(held), **{k: metrics[k] for k in METRICS}}
    _write(run / "result.json", json.dumps(result, indent=1))
    return result


_DEVICE: str | None = None


def _take_device(slots) -> None:
    global _DEVICE
    _DEVICE = slots.get()
    if _DEVICE.startswith("cuda"):
        import torch

        torch.cuda.set_device(_DEVICE)


def _pool_cell(plan: Plan, cell: Cell, out: Path, threads: int | None) -> dict:
    return run_cell(plan, cell, out, _DEVICE, threads)


def cell_devices(cfg: TuneConfig) -> list[str]:
    """One entry per cell process: the given devices, else each visible GPU, else ``workers`` CPUs."""
    if cfg.devices:
        return list(cfg.devices)
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"] * max(1, cfg.workers)


def run_grid(plan: Plan, out: Path, on_result: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Every cell's held-out result, in cell order: finished cells are read back, the others
    run in this process (one device) or in one spawned process per device."""
    _check_resume(out, plan)
    devices = cell_devices(plan.cfg)
    results: dict[str, dict] = {}
    todo = [c for c in plan.cells if not (out / "cells" / c.id / "result.json").exists()]
    for c in plan.cells:
        if c not in todo:
            results[c.id] = run_cell(plan, c, out)
    report = lambda r: on_result and on_result(r, len(results), len(plan.cells))  # noqa: E731
    if len(devices) <= 1 or len(todo) <= 1:
        for c in todo:
            results[c.id] = run_cell(plan, c, out, devices[0])
            report(results[c.id])
    else:
        n = min(len(devices), len(todo))
        threads = max(1, (os.cpu_count() or 1) // n) if devices[0] == "cpu" else None
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            slots = manager.Queue()
            for d in devices[:n]:
                slots.put(d)
            with ProcessPoolExecutor(n, mp_context=ctx, initializer=_take_device, initargs=(slots,)) as pool:
                futures = {pool.submit(_pool_cell, plan, c, out, threads): c for c in todo}
                for f in as_completed(futures):
                    results[futures[f].id] = f.result()  # re-raises a cell's error
                    report(results[futures[f].id])
    table = [results[c.id] for c in plan.cells]
    write_table(out, table, plan.metric)
    return table


def write_table(out: Path, table: list[dict], metric: str) -> None:
    """``grid.json`` (the metric and the rows) and ``grid.csv`` (one row per cell)."""
    _write(out / "grid.json", json.dumps({"metric": metric, "cells": table}, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cell", "id", "setting", "held_out_rows", *METRICS])
    for r in table:
        w.writerow([r["cell"], r["id"], json.dumps(r["setting"], sort_keys=True), r["held_out_rows"], *(r[k] for k in METRICS)])
    _write(out / "grid.csv", buf.getvalue())


def choose(plan: Plan, table: list[dict], out: Path | None = None) -> Cell:
    """The cell with the best held-out ``plan.metric`` (ties: the earlier cell, no KD first);
    with ``out``, written to ``chosen.json``."""
    best = max(range(len(table)), key=lambda i: (table[i][plan.metric], -i))
    cell = plan.cells[best]
    if out is not None:
        _write(out / "chosen.json", json.dumps({"metric": plan.metric, "cell": cell.name, "id": cell.id,
                                                "setting": cell.setting, "held_out": table[best],
                                                "config": cell.config.to_dict()}, indent=1))
    return cell


def train_final(store: Store, plan: Plan, cell: Cell, out: Path, name: str | None = None,
                device: str | None = None) -> dict:
    """Train the chosen setting on the whole training split (resumed if interrupted), then
    evaluate it once on the evaluation split; with ``name`` its predictions go into the store."""
    from .distill import distills
    from .train import predict_into_store, train_student

    run = out / "final"
    teacher = plan.cfg.teacher if distills(cell.config) else None
    train_student(store, plan.cfg.features, run, cell.config, teacher=teacher, train_split=plan.train_split,
                  eval_split=None, device=device)
    group = name or f"tuned-{out.name}"
    metrics = predict_into_store(store, run, group, [plan.train_split, plan.eval_split], overwrite=True)
    result = {"cell": cell.name, "group": group, "eval_split": plan.eval_split, "metrics": metrics[plan.eval_split]}
    _write(out / "final.json", json.dumps(result, indent=1))
    return result


def tune_kd(store: Store, cfg: TuneConfig, out_dir: str | Path, name: str | None = None,
            on_result: Callable[[dict, int, int], None] | None = None) -> dict:
    """The whole procedure: plan, grid on the hold-out, choice, final run; returns a summary."""
    out = Path(out_dir)
    plan = setup(store, cfg)
    table = run_grid(plan, out, on_result)
    cell = choose(plan, table, out)
    final = train_final(store, plan, cell, out, name, (cfg.devices or [None])[0])
    return {"metric": plan.metric, "grid": table, "chosen": cell.name, "final": final,
            "held_videos": len(plan.held_videos), "fit_videos": len(plan.fit_videos), "config": asdict(cfg)}

