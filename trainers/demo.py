"""The end-to-end demo: ingest -> teacher -> video features -> KD tuning -> students -> report.

The students are trained for several seeds in three variants: without KD, with the paper's
setting (the preset's) and with the setting ``tune-kd`` chose on held-out training videos
(trainers.student.tune; a small grid, the evaluation split never read for the choice).

Every stage writes into one directory and is skipped when its output already exists, so
an interrupted demo resumes and a second run reuses what is built. The default data is
the embedded synthetic kitchen dataset; ``annotations`` runs on a real RULSTM-format
folder (e.g. EGTEA) with synthetic frame features made from its labels.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from kdstore.errors import KDStoreError
from kdstore.identity import check_same
from kdstore.ingest import ingest
from kdstore.evaluation import format_table, metrics_table
from kdstore.provenance import provenance_entry
from kdstore.report import write_report
from kdstore.store import Store
from kdstore.synthetic import CORPUS_FILE, SyntheticConfig, generate_annotations, synthetic_features

MARKER = "kdstore-demo.json"
FEATURES = "synthetic"


@dataclass
class DemoConfig:
    """What the demo builds; the defaults finish within minutes on two CPU cores."""

    # Recipes share stages (long-range structure), and 2000 further recipe sequences form the
    # text corpus the teacher is pretrained on (kdstore.synthetic).
    synthetic: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(n_videos=120, shared_stages=24, corpus_size=2000))
    annotations: str | None = None  # a RULSTM folder instead of the synthetic data
    split: int = 1  # with ``annotations``: training<split> / validation<split> (EPIC's layout: training / validation)
    fps: float | None = None  # with ``annotations``: their frame rate (None: the dataset's default)
    feature_dim: int = 64
    feature_rate: float = 2.0
    feature_noise: float = 2.0
    # A tiny BERT from scratch: MLM on the training histories + the recipe corpus (when the
    # annotation folder has one, ``recipes.txt``), then fine-tuning on the training histories
    # plus ``corpus_examples`` (history, next action) pairs from the corpus, 5 folds.
    teacher_preset: str = "tiny"
    teacher_overrides: dict = field(default_factory=lambda: {
        "hist_len": 10, "max_len": 64, "epochs": 8, "folds": 5, "topk": 50, "pretrain_epochs": 8,
        "vocab_size": 256, "lr": 2e-3, "corpus_examples": 2000})
    # AVT's egtea head at an eighth of its width (inter_dim 256 of 2048), with the preset's
    # distillation (the paper's: weight 150, T = 10, mean over B x C elements). SGD lr 1e-2: at
    # AVT's 1e-3 the plain student stays at chance in 15 epochs on these features.
    student_preset: str = "egtea"
    student_overrides: dict = field(default_factory=lambda: {"inter_dim": 256, "n_head": 4, "epochs": 15, "lr": 1e-2})
    seeds: tuple[int, ...] = (0, 1, 2)
    # The KD grid tried on held-out training videos (seed of the first student seed); its cells are
    # the product plus no KD. The full grid of docs/distillation.md is a ``tune-kd`` command away.
    tune_grid: dict = field(default_factory=lambda: {"distill_reduction": ["rows"], "distill": [1.0, 4.0],
                                                     "temperature": [1.0, 4.0]})
    holdout: float = 0.2  # share of the training videos held out for the choice
    # Processes that train grid cells and students at once on the CPU, one torch thread each
    # when the cores allow (on a GPU: one). Execution only: not part of the demo's settings.
    workers: int = 2


def _check_dir(out: Path) -> None:
    """Refuse a directory that holds something other than an earlier demo."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise KDStoreError(f"{out}: exists and is not a kdstore demo directory (no {MARKER}); choose an empty or new directory")


def run_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig(), console: Console | None = None) -> dict:
    """Run (or resume) the demo in ``out_dir``; returns the summary written to ``summary.json``."""
    console = console or Console(stderr=True)
    out = Path(out_dir)
    _check_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}}
    marker = out / MARKER
    if marker.exists():
        check_same(json.loads(marker.read_text()), settings, f"{out}: holds a demo built with other settings",
                   hint="use a new directory", error=KDStoreError)
    marker.write_text(json.dumps(settings, indent=1))
    store, ann, (train_split, eval_split) = _ingest(out, cfg, console)
    baselines = _teacher(store, ann, cfg, train_split, eval_split, console)
    _features(store, cfg, console)
    chosen = _tune(store, out, cfg, train_split, eval_split, console)
    variants = _students(store, out, cfg, chosen, train_split, eval_split, console)
    return _report(store, out, cfg, baselines, variants, chosen, eval_split, console)


def _ingest(out: Path, cfg: DemoConfig, console: Console) -> tuple[Store, Path, list[str]]:
    """1. annotations (the synthetic ones, written first, or ``cfg.annotations``) -> store."""
    store_path = out / "store.zarr"
    if cfg.annotations:
        ann, fps = Path(cfg.annotations), cfg.fps
        # EGTEA numbers its split schemes (training<split>.csv); EPIC's layout has one (training.csv)
        epic = not (ann / f"training{cfg.split}.csv").exists() and (ann / "training.csv").exists()
        splits = ["training", "validation"] if epic else [f"training{cfg.split}", f"validation{cfg.split}"]
    else:
        ann, splits, fps = out / "annotations", ["training1", "validation1"], 24.0
        if not (ann / "actions.csv").exists():
            generate_annotations(ann, cfg.synthetic)
    try:
        store = Store.open(store_path)
    except KDStoreError:
        console.print(f"[bold]1/5[/bold] ingest {ann}")
        store = ingest(ann, store_path, splits=splits, fps=fps, overwrite=store_path.exists())
    seg = store.segments
    console.print(f"store: {len(seg)} segments, {len(seg.videos)} videos, {store.classes.num_actions} actions")
    return store, ann, splits


def _teacher(store: Store, ann: Path, cfg: DemoConfig, train_split: str, eval_split: str, console: Console) -> list[str]:
    """2. the text teacher and n-gram baselines (the standard one on the training labels; with a
    recipe corpus also one on training labels + corpus, to tell the corpus's share from the
    model's); returns the baselines' group names."""
    from trainers.teacher.build import build_teacher
    from trainers.teacher.config import preset as teacher_preset
    from trainers.teacher.corpus import corpus_sequences, read_corpus
    from trainers.teacher.ngram import ngram_baseline

    seg, classes = store.segments, store.classes
    corpus = read_corpus(ann / CORPUS_FILE) if (ann / CORPUS_FILE).exists() else []
    if "teacher" not in store.groups():
        console.print("[bold]2/5[/bold] build the text teacher (MLM pretraining, fine-tuning, 5-fold out-of-fold)"
                      + (f" with a {len(corpus)}-line recipe corpus" if corpus else ""))
        over = cfg.teacher_overrides if corpus else {**cfg.teacher_overrides, "corpus_examples": 0}
        build_teacher(store, "teacher", teacher_preset(cfg.teacher_preset, **over),
                      train_split=train_split, eval_splits=(eval_split,), corpus=corpus or None)
    baselines = {"ngram": None, **({"ngram-corpus": corpus_sequences(classes, corpus)} if corpus else {})}
    for name, extra in baselines.items():
        if name not in store.groups():
            rows = np.concatenate([seg.rows_in(train_split), seg.rows_in(eval_split)])
            probs = np.concatenate([ngram_baseline(seg, classes.num_actions, train_split, seg.rows_in(s), extra=extra, split=s)
                                    for s in (train_split, eval_split)])
            store.write_predictions(name, seg.uid[rows], np.log(probs + 1e-9), kind="baseline",
                                    config={"model": "interpolated 3-gram", "train_split": train_split,
                                            "corpus_lines": len(extra) if extra is not None else 0})
    return list(baselines)


def _features(store: Store, cfg: DemoConfig, console: Console) -> None:
    """3. video features, simulated from the labels (action embedding + noise)."""
    if FEATURES in store.feature_sets():
        return
    console.print(f"[bold]3/5[/bold] simulate frame features ({cfg.feature_dim}-d at {cfg.feature_rate} fps, noise {cfg.feature_noise})")
    writer = store.video_writer(FEATURES, cfg.feature_dim, "float16", cfg.feature_rate,
                                attrs={"backbone": {"name": "synthetic", "noise": cfg.feature_noise}})
    for video, (f, t) in synthetic_features(store.classes, store.segments, cfg.feature_dim, cfg.feature_rate,
                                            cfg.feature_noise).items():
        if not writer.done(video):
            writer.put(video, f, t)
    writer.commit(provenance_entry("synthetic_features", group=f"video/{FEATURES}"))


def _workers(cfg: DemoConfig) -> int:
    """Processes for the grid and the students: ``cfg.workers`` on the CPU (at most one a core), one on a GPU."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(cfg.workers, os.cpu_count() or 1))


def _train(store: Store, run: Path, name: str, scfg, teacher: str | None, splits: tuple[str, str],
           progress: bool = True) -> str:
    """Train one student and write its predictions into the store."""
    from trainers.student.train import predict_into_store, train_student

    train_student(store, FEATURES, run, scfg, teacher=teacher, train_split=splits[0], eval_split=splits[1],
                  progress=progress)
    predict_into_store(store, run, name, list(splits), overwrite=True)
    return name


def _train_in_pool(store_path: Path, threads: int, *job) -> str:
    """``_train`` in a pool process: its own store handle and ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    return _train(Store.open(store_path), *job, progress=False)


def _students(store: Store, out: Path, cfg: DemoConfig, chosen, train_split: str, eval_split: str,
              console: Console) -> dict:
    """4b. every variant (no KD, the paper's setting, the chosen one) for every seed, in
    ``cfg.workers`` processes on the CPU; returns ``{variant: setting}`` (None: no KD)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from trainers.student.config import preset as student_preset
    from trainers.student.distill import without_distillation
    from trainers.student.tune import NO_KD

    variants = {"no-kd": None, "kd": {}, "tuned": chosen.setting if chosen.name != NO_KD else None}
    done, jobs = store.groups(), []
    for seed in cfg.seeds:
        for variant, setting in variants.items():
            name = f"student-{variant}-s{seed}"
            scfg = student_preset(cfg.student_preset, **{**cfg.student_overrides, **(setting or {}), "seed": seed})
            if name not in done:
                jobs.append((out / "runs" / name, name, without_distillation(scfg) if setting is None else scfg,
                             "teacher" if setting is not None else None, (train_split, eval_split)))
    workers = min(_workers(cfg), len(jobs))
    if workers <= 1:
        for job in jobs:
            console.print(f"[bold]4/5[/bold] train {job[1]}")
            _train(store, *job)
        return variants
    console.print(f"[bold]4/5[/bold] train {len(jobs)} students in {workers} processes")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for f in as_completed([pool.submit(_train_in_pool, store.path, threads, *job) for job in jobs]):
            console.print(f"  trained {f.result()}", highlight=False)
    return variants


def _report(store: Store, out: Path, cfg: DemoConfig, baselines: list[str], variants: dict, chosen, eval_split: str,
            console: Console) -> dict:
    """5. the table, the seed means and the report; writes ``summary.json``."""
    console.print("[bold]5/5[/bold] evaluate and report")
    students = {v: [f"student-{v}-s{s}" for s in cfg.seeds] for v in variants}
    table = metrics_table(store, eval_split, ["teacher", *baselines, *(n for v in variants for n in students[v])])
    by_name = {r["name"]: r for r in table}
    spread = {}
    for variant, names in students.items():
        rows = [by_name[n] for n in names]
        spread[variant] = {k: (statistics.mean(r[k] for r in rows), statistics.pstdev(r[k] for r in rows))
                           for k in ("top1", "top5", "mean_top1_recall", "mean_top5_recall") if rows[0].get(k) is not None}
    seed_rows = "".join(
        f"<tr><td>student {v}{' (' + html.escape(chosen.name) + ')' if v == 'tuned' else ''}</td>"
        + "".join(f"<td>{m:.2f} &plusmn; {s:.2f}</td>" for m, s in spread[v].values()) + "</tr>"
        for v in variants
    )
    extra = (f"<h2>Students over {len(cfg.seeds)} seeds (mean &plusmn; std)</h2><table><tr><th>model</th>"
             + "".join(f"<th>{k} (%)</th>" for k in spread["kd"]) + f"</tr>{seed_rows}</table>")
    report = write_report(store, out, eval_split, teacher="teacher", kd_student=f"student-kd-s{cfg.seeds[0]}",
                          plain_student=f"student-no-kd-s{cfg.seeds[0]}", extra_html=extra, tune_dir=out / "tune")
    grid = json.loads((out / "tune" / "grid.json").read_text())
    summary = {"store": str(store.path), "eval_split": eval_split, "table": table, "students": spread,
               "tune": {"metric": grid["metric"], "chosen": chosen.name, "grid": grid["cells"]}, "report": str(report)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _tune(store: Store, out: Path, cfg: DemoConfig, train_split: str, eval_split: str, console: Console):
    """4a. the grid on held-out training videos (resumed), and the cell it chose."""
    from trainers.student.tune import TuneConfig, choose, run_grid, setup

    tcfg = TuneConfig(features=FEATURES, teacher="teacher", grid=cfg.tune_grid, preset=cfg.student_preset,
                      overrides={**cfg.student_overrides, "seed": cfg.seeds[0]}, train_split=train_split,
                      eval_split=eval_split, holdout=cfg.holdout, workers=_workers(cfg))
    plan = setup(store, tcfg)
    console.print(f"[bold]4/5[/bold] tune KD: {len(plan.cells)} settings on {len(plan.fit_videos)} training videos, "
                  f"chosen by {plan.metric} on {len(plan.held_videos)} held-out ones")

    def show(r: dict, done: int, total: int) -> None:
        console.print(f"  cell {done}/{total} {r['cell']}: held-out {plan.metric} {r[plan.metric]:.2f}", highlight=False)

    cell = choose(plan, run_grid(plan, out / "tune", show), out / "tune")
    console.print(f"  chosen: {cell.name}", highlight=False)
    return cell


def summary_text(summary: dict) -> str:
    """The demo's result table: every model on the evaluation split, then the seed means."""
    lines = [format_table(summary["table"]), "", f"students, mean ± std over seeds ({summary['eval_split']}):"]
    for variant, stats in summary["students"].items():
        lines.append(f"  {variant:<6}" + "".join(f"  {k} {m:6.2f} ± {s:4.2f}" for k, (m, s) in stats.items()))
    tune = summary["tune"]
    lines.append(f"tuned: {tune['chosen']} (chosen by held-out {tune['metric']} on training videos)")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)
