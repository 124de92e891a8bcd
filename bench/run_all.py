"""Run every benchmark side by side and write ``bench/results.json`` and ``bench/results.md``.

    python bench/run_all.py [--tiny] [--device cpu|cuda] [--skip NAME ...]

Each benchmark module exposes ``run(tiny, device, out_dir) -> list[dict]`` and appends its
rows to ``bench/results/<name>.csv`` too; this script gathers the rows of one run, so the
ratios it reports were all measured in the same session on the same machine.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

BENCHES = ["store_read", "student_step", "topk_kl", "attention", "video_features", "teacher_build", "epic_scale"]
# the columns worth a glance in the markdown table, when a row has them
KEY_FIELDS = ["variant", "stage", "median_s", "p20_s", "p80_s", "peak_mem_mib", "peak_rss_mib", "gbps",
              "samples_per_s", "frames_per_s", "sampled_frames_per_s", "mb_written_per_s", "vs_ceiling",
              "vs_per_sample", "ratio", "graph_median_s", "eager_over_kernel", "graph_eager_over_kernel",
              "graph_over_ideal", "teacher_top1", "teacher_mean_top1_recall", "ngram3_top1",
              "ngram3_mean_top1_recall", "ngram2_top1", "ngram2_mean_top1_recall", "seconds", "error"]


def run_all(tiny: bool = False, device: str | None = None, skip: tuple[str, ...] = (), out_dir: Path | None = None) -> dict:
    """Run the benchmarks and return ``{"machine": ..., "benches": {name: rows}}``."""
    out_dir = Path(out_dir or ROOT / "bench")
    results: dict = {"machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "tiny": tiny, "benches": {}}
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
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(results))
    return results


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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip", nargs="*", default=[])
    a = ap.parse_args()
    print(markdown(run_all(a.tiny, a.device, tuple(a.skip))))
