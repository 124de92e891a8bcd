"""Why does (or doesn't) distillation help? Train the demo's student under several KD settings.

    python bench/kd_sweep.py DEMO_DIR [--seeds 0 1 2] [--tiny]

Uses the store a ``kdstore demo DEMO_DIR`` run built (synthetic features + teacher) and
trains the same AVT-h student without KD and with KD at several (weight, temperature)
pairs and optimisers, appending one row per run (validation metrics, seconds) to
``bench/results/kd_sweep.csv``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import append_row, peak_rss_mib  # noqa: E402
from trainers.demo import FEATURES  # noqa: E402
from trainers.student.config import preset  # noqa: E402
from trainers.student.train import train_student  # noqa: E402

BASE = {"inter_dim": 256, "n_head": 4, "epochs": 15}
SETTINGS = {
    "sgd-1e-2 no-kd": {"lr": 1e-2, "distill_mode": "none"},
    "sgd-1e-2 kd w1 T2": {"lr": 1e-2, "distill": 1.0, "temperature": 2.0},
    "sgd-1e-2 kd w10 T4": {"lr": 1e-2, "distill": 10.0, "temperature": 4.0},
    "adamw-3e-4 no-kd": {"optimizer": "adamw", "lr": 3e-4, "distill_mode": "none"},
    "adamw-3e-4 kd w1 T2": {"optimizer": "adamw", "lr": 3e-4, "distill": 1.0, "temperature": 2.0},
    "adamw-3e-4 kd w150 T10 (paper)": {"optimizer": "adamw", "lr": 3e-4},
    "sgd-1e-3 no-kd (AVT egtea)": {"distill_mode": "none"},
    "sgd-1e-3 kd w150 T10 (paper)": {},
}


def run(demo_dir: str | Path, seeds=(0,), tiny: bool = False, out_dir=None) -> list[dict]:
    """Train every setting for every seed on the demo store; returns the appended rows."""
    store = Path(demo_dir) / "store.zarr"
    base = {**BASE, **({"epochs": 2, "inter_dim": 32, "n_head": 2} if tiny else {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in SETTINGS.items():
            for seed in seeds:
                cfg = preset("egtea", **{**base, **over, "seed": seed})
                t0 = time.perf_counter()
                try:
                    m = train_student(store, FEATURES, Path(tmp) / f"{name}-{seed}", cfg,
                                      teacher="teacher" if cfg.distill_mode != "none" else None, progress=False)
                    result = {k: m[k] for k in ("top1", "top5", "mean_top1_recall", "mean_top5_recall")}
                except Exception as e:  # a diverging setting is a finding, not a crash of the sweep
                    result = {"error": f"{type(e).__name__}: {e}"}
                result |= {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
                rows.append(append_row("kd_sweep", {"setting": name, "seed": seed, **cfg.to_dict()}, result, out_dir))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    for r in run(a.demo_dir, a.seeds, a.tiny):
        print(r["config"][:60], {k: r[k] for k in r if k in ("top1", "mean_top1_recall", "seconds", "error")})
