"""Benchmark: the EPIC-KITCHENS-100 pipeline, stage by stage, through the ``kdstore`` CLI.

    python bench/epic.py                           # ../shared/data/ek100, teacher preset ek100-cpu
    python bench/epic.py --preset NAME --set k=v   # any teacher preset and overrides
    python bench/epic.py --tiny                    # synthetic EK100-layout data: seconds

Stages: ``ingest``, ``info``, ``validate``, ``build-teacher`` (training -> validation),
``evaluate`` of the teacher and of the n-gram baseline (orders 2 and 3), and ``export`` of
the teacher's validation predictions as leaderboard JSON. Each runs as its own process, so
its wall time includes starting Python and importing torch, and its peak RSS (from
``wait4``, the stage's process and the workers it waited for) is its own. Each row also
carries the stage's CPU seconds (user + system, workers included) and the 1-minute load
average before and after it: on a shared machine wall time follows the load, CPU time
much less. Appends one row a stage to ``bench/results/epic.csv``; the evaluate rows carry
the challenge's class-mean top-5 recall (verb/noun/action x overall/unseen/tail).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import append_row  # noqa: E402
from kdstore.metrics import EK100_COLUMNS  # noqa: E402
from kdstore.synthetic import SyntheticConfig, generate_epic100  # noqa: E402

EK100_DIR = ROOT.parent / "shared/data/ek100"
DEFAULT_PRESET = "ek100-cpu"
TINY_OVERRIDES = ("epochs=1", "folds=1", "threads=1")


# Runs cli.py and, at exit, writes its peak RSS in KiB to the file named by its first argument:
# its own VmHWM (high-water mark of this process since exec, so not the parent's pages that a
# fork's rusage would count) or, if larger, that of the workers it waited for.
_LAUNCH = """
import atexit, resource, runpy, sys
out, sys.argv = sys.argv[1], sys.argv[2:]
def peak():
    own = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    open(out, "w").write(str(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))
atexit.register(peak)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stage(args: list[str], show: bool = False) -> tuple[float, float, str, float]:
    """(seconds, peak RSS MiB, stdout, CPU seconds) of ``kdstore <args>`` run in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        peak, out, err = Path(tmp) / "peak", Path(tmp) / "out", Path(tmp) / "err"
        with open(out, "w") as fo, open(err, "w") as fe:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            p = subprocess.run([sys.executable, "-c", _LAUNCH, str(peak), str(ROOT / "cli.py"), *args], stdout=fo,
                               stderr=None if show else fe)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        if p.returncode != 0:
            raise RuntimeError(f"kdstore {' '.join(args)} failed ({p.returncode}): {err.read_text().strip()[-2000:]}")
        return seconds, int(peak.read_text()) / 1024.0, out.read_text(), cpu


def run(
    tiny: bool = False,
    out_dir: str | Path | None = None,
    preset: str = DEFAULT_PRESET,
    overrides: tuple[str, ...] | None = None,
    data_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    repeat: int = 1,
    show_progress: bool = False,
) -> list[dict]:
    """Run every stage (the cheap ones ``repeat`` times) and append a row a stage; returns the rows."""
    overrides = tuple(overrides or ())
    if tiny:
        overrides += TINY_OVERRIDES
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(work_dir or tmp)
        base.mkdir(parents=True, exist_ok=True)
        data = Path(data_dir) if data_dir else EK100_DIR
        if tiny:
            data = generate_epic100(base / "ek100", SyntheticConfig(n_videos=24, n_recipes=3, stages=(3, 5)))
        if not (data / "actions.csv").is_file():
            raise FileNotFoundError(f"{data}: no EK100 annotation folder (actions.csv)")
        store = base / "ek100.zarr"
        sets = [a for o in overrides for a in ("--set", o)]
        stages = [
            ("ingest", ["ingest", str(data), str(store), "--overwrite", *(["--dataset", "ek100"] if tiny else [])], repeat),
            ("info", ["info", str(store)], repeat),
            ("validate", ["validate", str(store)], repeat),
            ("build-teacher", ["build-teacher", str(store), "--name", "teacher", "--preset", preset, "--train-split", "training",
                               "--eval-split", "validation", "--fresh", "--overwrite", *sets], 1),
            ("evaluate-teacher", ["evaluate", str(store), "-p", "teacher", "--json"], repeat),
            ("evaluate-ngram2", ["evaluate", str(store), "--baseline", "ngram", "--order", "2", "--json"], repeat),
            ("evaluate-ngram3", ["evaluate", str(store), "--baseline", "ngram", "--order", "3", "--json"], repeat),
            ("export", ["export", str(store), "teacher", str(base / "validation.json"), "--format", "epic",
                        "--split", "validation"], repeat),
        ]
        config = {"tiny": tiny, "data": str(data), "preset": preset, "overrides": list(overrides), "repeat": repeat}
        rows = []
        for stage, args, n in stages:
            load_before = os.getloadavg()[0]
            runs = [run_stage(args, show_progress and stage == "build-teacher") for _ in range(n)]
            times = [r[0] for r in runs]
            q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
            result = {"stage": stage, "median_s": statistics.median(times), "p20_s": q[1], "p80_s": q[7],
                      "peak_rss_mib": max(r[1] for r in runs), "cpu_s": statistics.median(r[3] for r in runs),
                      "load_before": load_before, "load_after": os.getloadavg()[0]}
            if stage.startswith("evaluate"):
                m = json.loads(runs[-1][2])
                result |= {k: m.get(k) for k, _ in EK100_COLUMNS} | {k: m.get(k) for k in ("n", "coverage")}
            if stage == "export":
                result["bytes"] = (base / "validation.json").stat().st_size
            rows.append(append_row("epic", {**config, "stage": stage}, result, out_dir))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="synthetic EK100-layout data and a one-epoch teacher")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"teacher preset (default {DEFAULT_PRESET})")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="TeacherConfig override (repeatable)")
    p.add_argument("--data", default=None, help=f"EK100 annotation folder (default {EK100_DIR})")
    p.add_argument("--repeat", type=int, default=1, help="runs of each stage but build-teacher")
    p.add_argument("--work-dir", default=None, help="keep the store, work dir and JSON here")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    rows = run(a.tiny, a.out_dir, a.preset, tuple(a.set) if a.set is not None else None, a.data, a.work_dir, a.repeat,
               show_progress=True)
    for r in rows:
        print(f"{r['stage']:>18}: {float(r['median_s']):8.1f} s  CPU {float(r['cpu_s']):8.1f} s  "
              f"peak RSS {float(r['peak_rss_mib']):7.0f} MiB  load {float(r['load_before']):.1f}-{float(r['load_after']):.1f}"
              + "".join(f"  {h} {float(r[k]):.2f}" for k, h in EK100_COLUMNS if r.get(k) not in (None, "")))


if __name__ == "__main__":
    main()
