"""Shared benchmark plumbing: timing with percentiles, peak memory, CSV rows.

Every benchmark appends one row per measured configuration to ``bench/results/<name>.csv``
with the machine, package versions, config, median and p20/p80 seconds and peak memory.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# `kdstore evaluate --json` keys: the four every dataset has, and EK100's other class-mean
# top-5 recall cells (action overall is mean_top5_recall)
METRICS = ("top1", "top5", "mean_top1_recall", "mean_top5_recall")
EPIC_CELLS = ("verb_mean_top5_recall", "noun_mean_top5_recall",
              *(f"{subset}_{task}_mean_top5_recall" for subset in ("unseen", "tail") for task in ("verb", "noun", "action")))


def machine() -> dict:
    """Describe the machine and the versions that the numbers depend on."""
    import numpy
    import torch

    info = {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    return info


def timeit(fn: Callable[[], object], repeat: int = 20, warmup: int = 3, sync: Callable[[], None] | None = None) -> dict:
    """Run ``fn`` ``warmup + repeat`` times and return median/p20/p80 seconds."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    # inclusive: percentiles stay within the measured range even with few repeats
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_s": statistics.median(times), "p20_s": q[1], "p80_s": q[7], "repeat": repeat}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_ahead_kb(path: Path) -> int | None:
    """The read-ahead of the block device holding ``path`` (None where sysfs does not say):
    it sets how much a page fault of a memory map reads, so cold gathers depend on it."""
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (block / "queue", block / ".." / "queue"):  # a whole disk, or a partition's disk
        try:
            return int((q / "read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
    return None


def append_row(bench: str, config: dict, result: dict, out_dir: Path | None = None) -> dict:
    """Append one result row to ``<out_dir>/<bench>.csv`` and return it."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bench": bench,
        "machine": json.dumps(machine(), sort_keys=True),
        "config": json.dumps(config, sort_keys=True),
        **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in result.items()},
    }
    path = out_dir / f"{bench}.csv"
    existing = []
    if path.exists():
        with path.open() as f:
            existing = list(csv.DictReader(f))
    fields = list(dict.fromkeys([*(existing[0].keys() if existing else []), *row.keys()]))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(existing)
        w.writerow(row)
    return row
