"""Benchmark: a whole ``build-teacher`` (MLM pretraining, fine-tuning, K-fold out-of-fold
predictions, store writes) on one real EGTEA split, against the n-gram baseline.

    python bench/teacher_build.py              # EGTEA split 1, preset egtea-scratch
    python bench/teacher_build.py --split 2
    python bench/teacher_build.py --tiny       # synthetic data, tiny preset: seconds

Appends one row to ``bench/results/teacher_build.csv``: wall time, peak memory of this
process and of the largest worker process, and the validation metrics of the teacher and
of the interpolated 2- and 3-gram baselines.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import append_row, peak_rss_mib  # noqa: E402
from kdstore.annotations import load_annotations  # noqa: E402
from kdstore.metrics import compute_metrics  # noqa: E402
from kdstore.store import Store  # noqa: E402
from kdstore.synthetic import SyntheticConfig, generate_annotations  # noqa: E402
from trainers.teacher.build import build_teacher  # noqa: E402
from trainers.teacher.config import parse_overrides, preset  # noqa: E402
from trainers.teacher.ngram import ngram_baseline  # noqa: E402

EGTEA_DIR = ROOT.parent / "shared/data/egtea"
METRICS = ("top1", "top5", "mean_top1_recall", "mean_top5_recall", "verb_top1", "noun_top1")


def run(
    tiny: bool = False,
    out_dir: str | Path | None = None,
    split: int = 1,
    preset_name: str | None = None,
    data_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    show_progress: bool = False,
    **overrides,
) -> list[dict]:
    """Build one teacher from scratch, time it, and append the result row; returns ``[row]``.

    ``tiny`` uses a small synthetic dataset and the ``tiny`` preset (a few seconds);
    otherwise the real EGTEA ``training<split>``/``validation<split>`` and ``egtea-scratch``.
    ``work_dir`` keeps the store and checkpoints there (default: a temporary directory).
    """
    name = preset_name or ("tiny" if tiny else "egtea-scratch")
    cfg = preset(name, **overrides)
    train_split, eval_split = f"training{split}", f"validation{split}"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(work_dir) if work_dir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        if tiny:
            ann = generate_annotations(base / "ann", SyntheticConfig(n_videos=24, n_recipes=2, stages=(4, 6), steps=(1, 2)))
            classes, segments = load_annotations(ann, fps=24.0)
            train_split, eval_split = "training1", "validation1"
        else:
            classes, segments = load_annotations(data_dir or EGTEA_DIR, [train_split, eval_split])
        store = Store.create(base / f"store-{split}.zarr", classes, segments, overwrite=True)
        t0 = time.perf_counter()
        result = build_teacher(store, "teacher", cfg, train_split=train_split, eval_splits=(eval_split,),
                               fresh=True, show_progress=show_progress)
        seconds = time.perf_counter() - t0
        rows = segments.rows_in(eval_split)
        baselines = {order: compute_metrics(ngram_baseline(segments, classes.num_actions, train_split, rows, order, split=eval_split),
                                            segments.action[rows], classes) for order in (2, 3)}
    teacher = result.metrics[eval_split]
    row = {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "uids": len(result.uids),
        **{f"teacher_{k}": teacher[k] for k in METRICS},
        **{f"ngram{o}_{k}": m[k] for o, m in baselines.items() for k in METRICS},
    }
    config = {"tiny": tiny, "split": split, "preset": name, "train_split": train_split, "eval_split": eval_split,
              "teacher": cfg.to_dict()}
    return [append_row("teacher_build", config, row, out_dir)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="synthetic data and the tiny preset")
    p.add_argument("--split", type=int, default=1, help="EGTEA split (1, 2 or 3)")
    p.add_argument("--preset", default=None, help="teacher preset (default egtea-scratch, or tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TeacherConfig override")
    p.add_argument("--work-dir", default=None, help="keep the store and checkpoints here")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    [row] = run(a.tiny, a.out_dir, a.split, a.preset, work_dir=a.work_dir, show_progress=True, **parse_overrides(a.set))
    for k, v in row.items():
        if k not in ("machine", "config"):
            print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
