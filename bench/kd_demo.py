"""Does the KD setting chosen on held-out training videos help? The demo's three students
(no KD, the paper's setting, the ``tune-kd`` choice) over 3 seeds, on the synthetic data and
on real label sequences with synthetic frames.

    python bench/kd_demo.py [--runs NAME ...] [--work DIR] [--tiny] [--docs PATH | --no-docs]
    python bench/kd_demo.py --from-json bench/kd_demo.json [--docs PATH]   # rewrite the section only

Each run is ``kdstore demo`` (trainers.demo.run_demo) in ``<work>/<run>`` (default: a new
temporary folder, so every figure is computed afresh; with ``--work`` an interrupted run
resumes). Runs on annotation folders skip when ``../shared/data/<dataset>`` is absent. One row
per (run, student variant, seed) and one per grid cell is appended to
``bench/results/kd_demo.csv``; the rows go to ``bench/kd_demo.json`` and the section between
``<!-- kd_demo:begin -->`` and ``<!-- kd_demo:end -->`` of docs/distillation.md (also written
by ``bench/run_all.py``). Torch threads follow ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_row, machine  # noqa: E402
from kdstore.synthetic import SyntheticConfig  # noqa: E402
from trainers.demo import DemoConfig, run_demo  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DOCS = ROOT / "docs" / "distillation.md"
SAVED = ROOT / "bench" / "kd_demo.json"
BEGIN, END = "<!-- kd_demo:begin -->", "<!-- kd_demo:end -->"
METRICS = ("mean_top1_recall", "top1", "top5", "mean_top5_recall")
EK100_SUBSETS = ("unseen_action_mean_top5_recall", "tail_action_mean_top5_recall")


def _egtea(split: int, data: Path = DATA) -> tuple[DemoConfig, str]:
    over = {**DemoConfig().student_overrides, "epochs": 8}
    return (DemoConfig(annotations=str(data / "egtea"), split=split, fps=30.0, student_overrides=over),
            f"kdstore demo egtea{split} --annotations ../shared/data/egtea --fps 30 --split {split} --set epochs=8")


def _ek100(data: Path = DATA) -> tuple[DemoConfig, str]:
    """EK100's 67k training segments are 8x EGTEA's: 2 epochs of teacher pretraining,
    fine-tuning and student training, so the run fits a 2-core afternoon."""
    d = DemoConfig()
    return (DemoConfig(annotations=str(data / "ek100"), teacher_overrides={**d.teacher_overrides, "epochs": 2, "pretrain_epochs": 2},
                       student_overrides={**d.student_overrides, "epochs": 2}),
            "python bench/kd_demo.py --runs ek100")


def runs_in(data: Path = DATA) -> dict:
    """name -> (config, the equivalent command, the annotation folder it needs), with the
    annotation folders under ``data``."""
    return {"synthetic": (DemoConfig(), "kdstore demo demo-out", None),
            **{f"egtea-{k}": (*_egtea(k, data), "egtea") for k in (1, 2, 3)},
            "ek100": (*_ek100(data), "ek100")}


RUNS = runs_in()
# the size the test suite runs (tests/test_demo.py)
TINY = DemoConfig(synthetic=SyntheticConfig(n_videos=24, seed=3, shared_stages=8, corpus_size=30),
                  teacher_overrides={**DemoConfig().teacher_overrides, "corpus_examples": 100},
                  student_overrides={"inter_dim": 32, "n_head": 2, "epochs": 2, "batch_size": 32}, seeds=(0,),
                  tune_grid={"distill_reduction": ["rows"], "distill": [1.0], "temperature": [1.0, 4.0]})


def rows_of(name: str, summary: dict, seconds: float, command: str, out_dir) -> list[dict]:
    """The run's rows: one per student (variant, seed) on the evaluation split, one per grid cell (held out)."""
    by_name = {r["name"]: r for r in summary["table"]}
    base = {"run": name, "command": command, "eval_split": summary["eval_split"], "chosen": summary["tune"]["chosen"],
            "metric": summary["tune"]["metric"], "demo_seconds": seconds}
    rows = []
    for variant in summary["students"]:
        for key in sorted(k for k in by_name if k.startswith(f"student-{variant}-s")):
            r = by_name[key]
            rows.append(append_row("kd_demo", {**base, "variant": variant, "seed": int(key.rsplit("-s", 1)[1])},
                                   {k: r[k] for k in (*METRICS, *EK100_SUBSETS) if r.get(k) is not None}, out_dir))
    for cell in summary["tune"]["grid"]:
        rows.append(append_row("kd_demo", {**base, "variant": "grid", "cell": cell["cell"]},
                               {f"held_out_{k}": cell[k] for k in METRICS}, out_dir))
    return rows


def run(tiny: bool = False, out_dir=None, runs=None, work=None, data: Path = DATA) -> list[dict]:
    """Run the demos (``runs``: names of RUNS; tiny: one small synthetic demo) with the annotation
    folders under ``data``; returns their rows."""
    all_runs = runs_in(Path(data))
    todo = {"tiny": (TINY, "(tiny)", None)} if tiny else {k: all_runs[k] for k in runs or all_runs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, command, needs) in todo.items():
            if needs and not (Path(data) / needs).is_dir():
                print(f"{name}: skipped, no {Path(data) / needs}", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            summary = run_demo(Path(work or tmp) / name, cfg)
            rows += rows_of(name, summary, time.perf_counter() - t0, command, out_dir)
    return rows


def _cfg(row: dict) -> dict:
    return json.loads(row["config"]) if isinstance(row.get("config"), str) else row


def _stat(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def run_section(rows: list[dict]) -> list[str]:
    """Markdown of one run: its command, the students' means over seeds, the grid."""
    c0 = _cfg(rows[0])
    students = [r for r in rows if _cfg(r)["variant"] != "grid"]
    keys = [k for k in (*METRICS, *EK100_SUBSETS) if k in students[0]]
    out = [f"#### {c0['run']}", "", f"`OMP_NUM_THREADS=1 {c0['command']}`, {c0['eval_split']}, %, mean ± std over seeds:", "",
           "| student | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for variant in dict.fromkeys(_cfg(r)["variant"] for r in students):
        rs = [r for r in students if _cfg(r)["variant"] == variant]
        label = {"no-kd": "no KD", "kd": "paper's KD (preset)", "tuned": f"tuned: {c0['chosen']}"}.get(variant, variant)
        out.append(f"| {label} | {len(rs)} | " + " | ".join(_stat([float(r[k]) for r in rs]) for k in keys) + " |")
    metric = c0["metric"]
    out += ["", f"The grid on held-out training videos (the first seed; chosen by held-out {metric}), %:", "",
            "| cell | " + " | ".join(f"held-out {k}" for k in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for r in (r for r in rows if _cfg(r)["variant"] == "grid"):
        name = _cfg(r)["cell"] + (" (chosen)" if _cfg(r)["cell"] == c0["chosen"] else "")
        out.append(f"| {name} | " + " | ".join(f"{float(r[f'held_out_{k}']):.2f}" for k in METRICS) + " |")
    return out + [""]


def docs_section(results: dict) -> str:
    """What goes between the markers: the machine, then each run's tables."""
    m = results["machine"]
    out = [f"`python bench/kd_demo.py{' --tiny' if results.get('tiny') else ''}` (or `python bench/run_all.py`) "
           f"measured {results['time']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}.", ""]
    by_run: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_run.setdefault(_cfg(r)["run"], []).append(r)
    for rows in by_run.values():
        out += run_section(rows)
    return "\n".join(out)


def write_docs(path: Path, results: dict) -> None:
    """Replace the lines between the kd_demo markers of ``path`` (bench.run_all.write_docs)."""
    from bench.run_all import write_docs as write

    write(path, results, BEGIN, END, docs_section)


def results_of(rows: list[dict], tiny: bool) -> dict:
    """The rows with the machine and the time, as ``bench/kd_demo.json`` holds them."""
    return {"machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "tiny": tiny, "rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=None)
    ap.add_argument("--work", type=Path, default=None, help="folder of the demo directories (default: a temporary one)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--data", type=Path, default=DATA, help="folder of the annotation folders (default ../shared/data)")
    ap.add_argument("--docs", type=Path, default=None, help=f"file whose kd_demo section to rewrite (default {DOCS.relative_to(ROOT)})")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--from-json", type=Path, default=None, help="rewrite the docs section from this JSON, run nothing")
    a = ap.parse_args()
    if a.from_json:
        write_docs(a.docs or DOCS, json.loads(a.from_json.read_text()))
        sys.exit(0)
    rows = run(a.tiny, runs=a.runs, work=a.work, data=a.data)
    if not a.tiny and SAVED.exists():  # keep the saved rows of the runs not run now
        ran = {_cfg(r)["run"] for r in rows}
        rows = [r for r in json.loads(SAVED.read_text())["rows"] if _cfg(r)["run"] not in ran] + rows
    res = results_of(rows, a.tiny)
    if not a.tiny:
        SAVED.write_text(json.dumps(res, indent=1, default=str))
    if not a.no_docs and not (a.tiny and a.docs is None):
        write_docs(a.docs or DOCS, res)
    print(docs_section(res))
