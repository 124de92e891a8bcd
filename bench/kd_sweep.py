"""Does distillation help? Train the demo's student under several KD settings over several seeds.

    python bench/kd_sweep.py DEMO_DIR [--seeds 0 1 2] [--settings NAME ...] [--split 1] [--set k=v ...] [--tiny]
    python bench/kd_sweep.py --table CSV [CSV ...]

Uses the store a ``kdstore demo DEMO_DIR`` run built (frame features ``synthetic`` and the
text teacher ``teacher``; with ``--annotations`` on real label sequences) and trains the
demo's student (``DemoConfig``'s preset and overrides) without KD and under each setting;
``--set k=v`` overrides any student config field in every run (``--set epochs=8`` for a
shorter sweep). One row per run (validation metrics, seconds) is appended to
``bench/results/kd_sweep.csv``. Prints a markdown table: class-mean top-1 recall per seed,
mean ± std over seeds, and the mean top-1 and top-5; ``--table CSV ...`` prints that table
from the rows of earlier sweeps (several run side by side with their own ``--out-dir``).
``--list`` prints the settings. Torch threads follow ``OMP_NUM_THREADS`` (the figures in
docs/distillation.md ran with 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_row, peak_rss_mib  # noqa: E402
from kdstore.errors import ConfigError  # noqa: E402
from kdstore.store import Store  # noqa: E402
from trainers.demo import FEATURES, DemoConfig  # noqa: E402
from trainers.config import parse_set  # noqa: E402
from trainers.student.config import StudentConfig, preset  # noqa: E402
from trainers.student.distill import distills, without_distillation  # noqa: E402
from trainers.student.train import train_student  # noqa: E402

NO_KD = "no KD"
# Overrides of the demo student, whose preset distils as the paper does: full KL at T = 10
# times T^2, mean over B x C elements, weight 150.
SETTINGS = {
    NO_KD: {},
    "paper: full, elements, w150 T10": {},
    "full, elements, w50 T10": {"distill": 50.0},
    "full, elements, w450 T10": {"distill": 450.0},
    "full, elements, w150 T5": {"temperature": 5.0},
    "full, elements, w150 T20": {"temperature": 20.0},
    "full, elements, w150 T2": {"temperature": 2.0},
    "full, elements, w150 T1": {"temperature": 1.0},
    "top-20, elements, w150 T10": {"distill_mode": "topk", "topk": 20},
    "full, rows, w150 T10": {"distill_reduction": "rows"},
    "full, rows, w1 T2": {"distill_reduction": "rows", "distill": 1.0, "temperature": 2.0},
    "paper + feature cosine w1": {"distill_feat": 1.0},
    # Each KD loss of trainers.student.distill at its own paper's recommended setting (not tuned here):
    # logit standardisation, base T 2, KD weight 9 against CE weight 0.1 (the authors' CIFAR-100
    # command), so 90 against our CE's 1; sum over classes, mean over rows.
    "std (Sun et al.): T2, rows, w90": {"distill_mode": "std", "temperature": 2.0, "distill": 90.0,
                                        "distill_reduction": "rows"},
    # the same with their KD weight as it stands (9), our CE weight 1 instead of their 0.1
    "std (Sun et al.): T2, rows, w9": {"distill_mode": "std", "temperature": 2.0, "distill": 9.0,
                                       "distill_reduction": "rows"},
    # decoupled KD, mdistiller's defaults: alpha 1, beta 8, T 4, CE weight 1, mean over rows (no warm-up).
    "dkd (Zhao et al.): a1 b8 T4, rows": {"distill_mode": "dkd", "dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0,
                                         "distill": 1.0, "distill_reduction": "rows"},
    # DIST, the authors' ImageNet code: beta = gamma = 1, tau 1, KD weight 1 against CE 1.
    "dist (Huang et al.): b1 g1 T1": {"distill_mode": "dist", "dist_beta": 1.0, "dist_gamma": 1.0, "temperature": 1.0,
                                      "distill": 1.0},
    # the paper's setting towards the teacher's temperature-scaled targets (`kdstore calibrate` first)
    "paper, calibrated teacher": {"teacher_calibration": True},
}
METRICS = ("mean_top1_recall", "top1", "top5")


def student_config(setting: str, seed: int, tiny: bool = False, overrides: dict | None = None):
    """The demo's student config under ``setting`` for ``seed``, with ``overrides`` on every setting."""
    demo = DemoConfig()
    base = {**demo.student_overrides, **({"epochs": 2, "inter_dim": 32, "n_head": 2} if tiny else {}), **(overrides or {})}
    cfg = preset(demo.student_preset, **{**base, **SETTINGS[setting], "seed": seed})
    return without_distillation(cfg) if setting == NO_KD else cfg


def run(demo_dir: str | Path, seeds=(0,), settings=None, split: int = 1, tiny: bool = False, out_dir=None,
        overrides: dict | None = None) -> list[dict]:
    """Train every setting for every seed on the demo store; returns the appended rows."""
    store = Path(demo_dir) / "store.zarr"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in settings or SETTINGS:
            for seed in seeds:
                cfg = student_config(name, seed, tiny, overrides)
                if cfg.teacher_calibration and distills(cfg):
                    calibrated_teacher(store)
                t0 = time.perf_counter()
                try:
                    m = train_student(Store.open(store), FEATURES, Path(tmp) / f"{len(rows)}", cfg,
                                      teacher="teacher" if distills(cfg) else None, train_split=f"training{split}",
                                      eval_split=f"validation{split}", progress=False)
                    result = {k: m[k] for k in (*METRICS, "mean_top5_recall")}
                except Exception as e:  # a diverging setting is a finding, not a crash of the sweep
                    result = {"error": f"{type(e).__name__}: {e}"}
                result |= {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
                rows.append(append_row("kd_sweep", {"setting": name, "demo": str(demo_dir), "split": split,
                                                    **cfg.to_dict()}, result, out_dir))
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
    return rows


def calibrated_teacher(store: Path) -> None:
    """Fit the demo teacher's temperature on its out-of-fold training rows, unless stored already."""
    from kdstore.calibration import calibrate

    s = Store.open(store)
    if "calibration" not in s.group("teacher").attrs:
        r = calibrate(s, "teacher")
        print(f"teacher calibrated: T {r['temperature']:.4f}, out-of-fold ECE {r['ece_before']:.4f} -> "
              f"{r['ece_after']:.4f} ({r['rows']} rows of {r['split']})", flush=True)


def read_rows(paths) -> list[dict]:
    """The rows of kd_sweep CSVs, as ``run`` returns them (empty cells dropped)."""
    import csv

    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per setting, class-mean top-1 recall per seed and mean ± std over seeds."""
    import json

    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(json.loads(r["config"])["setting"], []).append(r)
    lines = ["| setting | mean top-1 recall per seed | mean ± std | top-1 | top-5 |", "|---|---|---|---|---|"]
    for name, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | {rs[0]['error'][:80]} | | | |")
            continue
        vals = {k: [float(r[k]) for r in ok] for k in METRICS}
        rec = vals["mean_top1_recall"]
        lines.append(f"| {name} | {' / '.join(f'{v:.2f}' for v in rec)} | {statistics.mean(rec):.2f} ± "
                     f"{statistics.pstdev(rec):.2f} | {statistics.mean(vals['top1']):.2f} | "
                     f"{statistics.mean(vals['top5']):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", nargs="?")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--settings", nargs="+", default=None, help="setting names (default: all); see --list")
    ap.add_argument("--split", type=int, default=1, help="training<split> / validation<split>")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                    help="student config override for every run (repeatable), e.g. --set epochs=5")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    ap.add_argument("--list", action="store_true", help="print the settings and exit")
    ap.add_argument("--table", nargs="+", metavar="CSV", help="print the table of these sweep CSVs and exit")
    a = ap.parse_args()
    if a.table:
        print(table(read_rows(a.table)))
        sys.exit(0)
    if a.list or a.demo_dir is None:
        print("\n".join(f"{k}: {v}" for k, v in SETTINGS.items()))
        sys.exit(0)
    unknown = sorted(set(a.settings or ()) - set(SETTINGS))
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; see --list")
    try:
        overrides = parse_set(StudentConfig, a.overrides)
    except ConfigError as e:
        ap.error(str(e))
    print(table(run(a.demo_dir, a.seeds, a.settings, a.split, a.tiny, a.out_dir, overrides)))
