"""Run every benchmark side by side and write ``bench/results.json``, ``bench/results.md`` and
the "All benchmarks in one run" section of ``docs/results.md``.

    python bench/run_all.py [--tiny] [--device cpu|cuda] [--skip NAME ...] [--docs PATH | --no-docs]
    python bench/run_all.py --from-json bench/results.json [--docs PATH]   # rewrite the section only

Each benchmark module exposes ``run(tiny, device, out_dir) -> list[dict]`` and appends its
rows to ``bench/results/<name>.csv`` too; this script gathers the rows of one run, so the
ratios it reports were all measured in the same session on the same machine. In the docs
file only the lines between ``<!-- run_all:begin -->`` and ``<!-- run_all:end -->`` are
rewritten. A full-size run writes ``docs/results.md`` unless ``--no-docs``; a ``--tiny`` run
writes docs only where ``--docs`` names a file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

DOCS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
BENCHES = ["store_read", "student_step", "topk_kl", "attention", "video_features", "teacher_build", "epic", "epic_scale",
           "preread", "kd_demo"]
# the columns worth a glance in the markdown table, when a row has them
KEY_FIELDS = ["variant", "stage", "median_s", "p20_s", "p80_s", "peak_mem_mib", "peak_rss_mib", "gbps",
              "samples_per_s", "frames_per_s", "sampled_frames_per_s", "mb_written_per_s", "vs_ceiling",
              "vs_per_sample", "ratio", "gain", "graph_median_s", "eager_over_impl", "graph_eager_over_impl",
              "graph_over_ideal", "teacher_top1", "teacher_mean_top1_recall", "ngram3_top1",
              "ngram3_mean_top1_recall", "ngram2_top1", "ngram2_mean_top1_recall", "mean_top5_recall",
              "unseen_action_mean_top5_recall", "tail_action_mean_top5_recall", "seconds", "preread_s", "error"]


def run_all(tiny: bool = False, device: str | None = None, skip: tuple[str, ...] = (), out_dir: Path | None = None,
            docs: Path | None = None, kd_docs: Path | None = None) -> dict:
    """Run the benchmarks and return ``{"machine": ..., "benches": {name: rows}}``; with
    ``docs``, also rewrite that file's marked section (``write_docs``), and with ``kd_docs``
    the kd_demo section of that file (docs/distillation.md) from the kd_demo rows."""
    out_dir = Path(out_dir or ROOT / "bench")
    results: dict = {"machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "tiny": tiny,
                     "device": device, "skip": list(skip), "load_start": os.getloadavg()[0], "benches": {}}
    for name in BENCHES:
        if name in skip:
            continue
        mod = importlib.import_module(f"bench.{name}")
        params = inspect.signature(mod.run).parameters
        kwargs = {"tiny": tiny, "out_dir": out_dir / "results"}
        if "device" in params:
            kwargs["device"] = device
        t0 = time.perf_counter()
        try:
            rows = mod.run(**kwargs)
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            rows = [{"error": f"{type(e).__name__}: {e}"}]
        results["benches"][name] = {"seconds": time.perf_counter() - t0, "rows": rows}
    results["load_end"] = os.getloadavg()[0]
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(results))
    if docs is not None:
        write_docs(Path(docs), results)
    if kd_docs is not None and "kd_demo" in results["benches"]:
        write_kd_docs(Path(kd_docs), results, out_dir)
    return results


def write_kd_docs(path: Path, results: dict, out_dir: Path | None = None) -> None:
    """The kd_demo section of ``path`` from this run's kd_demo rows (saved to ``kd_demo.json`` beside results.json)."""
    from bench import kd_demo

    kd = {**results, "rows": results["benches"]["kd_demo"]["rows"]}
    (Path(out_dir or ROOT / "bench") / "kd_demo.json").write_text(json.dumps(kd, indent=1, default=str))
    kd_demo.write_docs(path, kd)


def markdown(results: dict) -> str:
    """The results as one markdown table per benchmark."""
    m = results["machine"]
    out = [f"Measured {results['time']} on {m['cpu']} ({m['cores']} cores), device {m['device']}, "
           f"torch {m['torch']}, numpy {m['numpy']}{' (tiny sizes)' if results['tiny'] else ''}.", ""]
    for name, b in results["benches"].items():
        configs = [json.loads(r["config"]) if isinstance(r.get("config"), str) else {} for r in b["rows"]]
        rows = [{**c, **r} for c, r in zip(configs, b["rows"])]
        cols = [c for c in KEY_FIELDS if any(c in r for r in rows)] or ["error"]
        # the config keys that vary between rows tell the rows apart
        varying = sorted(k for k in {k for c in configs for k in c} - set(cols) if len({str(c.get(k)) for c in configs}) > 1)
        cols = varying + cols
        out += [f"### {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def docs_section(results: dict) -> str:
    """What ``write_docs`` puts between the markers: the command, its duration and load, and
    ``markdown(results)``."""
    cmd = "python bench/run_all.py" + (" --tiny" if results.get("tiny") else "")
    cmd += f" --device {results['device']}" if results.get("device") else ""
    cmd += " --skip " + " ".join(results["skip"]) if results.get("skip") else ""
    minutes = sum(b["seconds"] for b in results["benches"].values()) / 60
    load = (f"; load average {results['load_start']:.1f} at the start, {results['load_end']:.1f} at the end"
            if "load_start" in results and "load_end" in results else "")
    return (f"`{cmd}` ({minutes:.0f} min in all{load}) wrote `bench/results.json`, `bench/results.md` and "
            f"this section.\n\n{markdown(results)}")


def write_docs(path: Path, results: dict, begin: str = BEGIN, end: str = END, section=None) -> None:
    """Replace what lies between the ``begin`` and ``end`` marker lines of ``path`` with
    ``section(results)`` (default ``docs_section``); every byte outside them stays as it is."""
    text = path.read_text()
    nb, ne = text.count(begin), text.count(end)
    if nb != 1 or ne != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path}: expected one {begin!r} before one {end!r}, found {nb} begin and {ne} end markers"
                         + (" in the wrong order" if nb == ne == 1 else ""))
    head, tail = text[: text.index(begin) + len(begin)], text[text.index(end):]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{head}\n{(section or docs_section)(results).rstrip()}\n{tail}")
    os.replace(tmp, path)  # a crash leaves the old file or the new one


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--docs", type=Path, default=None, help=f"file whose marked section to rewrite (default {DOCS.relative_to(ROOT)}, not with --tiny)")
    ap.add_argument("--no-docs", action="store_true", help="write no docs file")
    ap.add_argument("--kd-docs", type=Path, default=None, help="file whose kd_demo section to rewrite (default docs/distillation.md, not with --tiny)")
    ap.add_argument("--from-json", type=Path, default=None, help="rewrite the docs section from this results.json, run nothing")
    a = ap.parse_args()
    if a.from_json and a.no_docs:
        ap.error("--from-json only writes docs: drop --no-docs")
    docs = None if a.no_docs else a.docs or (None if a.tiny else DOCS)
    if a.from_json:
        write_docs(a.docs or DOCS, json.loads(a.from_json.read_text()))
    else:
        kd_docs = None if a.no_docs else a.kd_docs or (None if a.tiny else ROOT / "docs" / "distillation.md")
        print(markdown(run_all(a.tiny, a.device, tuple(a.skip), docs=docs, kd_docs=kd_docs)))
