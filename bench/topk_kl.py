"""Benchmark the fused top-K distillation KL against the eager and compiled torch reference.

    python bench/topk_kl.py [--tiny] [--device cuda|cpu] [--batches 64,512,4096]

Times forward + backward at C=2513 (EK55 actions), K=50, T=10 with fp32 and bf16 student
logits in both modes, for B = 64, 128, 256, 512 (the student's batch sizes, where launch
overhead dominates) and 4096, and appends one row per implementation to
``bench/results/topk_kl.csv``: ``eager`` and ``compiled`` (``torch.compile`` of the reference,
compiled afresh for each shape) and, on CUDA, ``kernel`` (its rows a program by
``rows_per_program``) and, where that rule packs rows, ``kernel_rows1`` (one row a program).
On CUDA every row also holds the device time of forward + backward replayed from a CUDA graph
(``graph_*``: no Python or launch overhead), its forward time alone, and both times against the
ideal of reading the logits and writing their gradient once at the measured device copy
bandwidth (``wall_over_ideal``, ``graph_over_ideal``). On CPU only the reference paths run: the
Triton interpreter is not a performance path. Peak memory is ``torch.cuda.max_memory_allocated``
per row on CUDA, and the process's peak RSS so far on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import append_row, peak_rss_mib, timeit
from trainers.kernels.topk_kl import MODES, topk_kl, topk_kl_reference

BENCH = "topk_kl"
TEMPERATURE = 10.0
FULL = {"B": (64, 128, 256, 512, 4096), "C": 2513, "K": 50}
TINY = {"B": (64,), "C": 101, "K": 5}


def _inputs(B, C, K, dtype, device):
    """Student logits [B, C] (requiring grad), teacher top-K [B, K], indices, teacher LSE, mask."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(B, C, generator=g) * 2  # [B, C]
    t, idx = teacher.topk(K, dim=-1)  # [B, K]
    lse = (teacher / TEMPERATURE).logsumexp(-1)  # [B]
    mask = torch.rand(B, generator=g) > 0.1  # [B]
    s = (torch.randn(B, C, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()  # [B, C]
    return s, t.to(device), idx.to(device), lse.to(device), mask.to(device)


def _fwd_bwd(fn, s):
    torch.autograd.grad(fn().sum(), s)


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else None


def _measure(fn, s, device, repeat, backward=True):
    """Time ``fn`` (and the backward of its summed output) and record the peak memory."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = timeit(partial(_fwd_bwd, fn, s) if backward else fn, repeat=repeat, warmup=3, sync=_sync(device))
    result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    return result


def _first_call(fn, s, device):
    """Seconds of the first forward + backward: for torch.compile, mostly compilation."""
    t0 = time.perf_counter()
    _fwd_bwd(fn, s)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"first_call_s": time.perf_counter() - t0}


def _copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write) on a 512 MiB buffer."""
    src = torch.empty(1 << 27, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeat=20, warmup=3, sync=torch.cuda.synchronize)["median_s"]
    return 2 * src.numel() * src.element_size() / t


def _graph_time(fn, s, repeat, backward=True, prefix="graph"):
    """Device time of one forward + backward (or forward only), replayed from a CUDA graph (no
    Python or launch overhead between kernels): median and p20/p80 over ``repeat`` timings of
    10 replays."""
    step = partial(_fwd_bwd, fn, s) if backward else fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotuning, allocator) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {f"{prefix}_median_s": statistics.median(times), f"{prefix}_p20_s": q[1], f"{prefix}_p80_s": q[7]}


def _roofline(fn, s, repeat, copy_bw, result):
    """Forward alone, and forward + backward against reading the logits and writing their
    gradient once at the measured copy bandwidth (the ideal)."""
    B, C = s.shape
    nbytes = 2 * B * C * s.element_size()
    ideal_s = nbytes / copy_bw
    out = {"fwd_median_s": _measure(fn, s, "cuda", repeat, backward=False)["median_s"], "bytes": nbytes,
           "copy_gbps": copy_bw / 1e9, "ideal_s": ideal_s, "wall_over_ideal": result["median_s"] / ideal_s}
    if "graph_median_s" in result:
        out["graph_over_ideal"] = result["graph_median_s"] / ideal_s
    return out


def _guarded(measure):
    """Run one measurement; a failure becomes the row's error field instead of ending the run."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - any failure (compile, launch) is a result to record
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _kernel(rows: int | None):
    """The fused kernel with ``rows`` rows a program (None: ``rows_per_program``'s choice)."""
    from trainers.kernels import topk_kl as module

    def fn(*args):
        saved, module.ROWS_PER_PROGRAM = module.ROWS_PER_PROGRAM, rows
        try:
            return topk_kl(*args, use_kernel=True)
        finally:
            module.ROWS_PER_PROGRAM = saved
    return fn


def _compiled():
    """``torch.compile`` of the reference, compiled afresh (a new shape is not a recompile that
    counts against dynamo's limit, nor a dynamic-shape graph)."""
    torch._dynamo.reset()
    return torch.compile(topk_kl_reference, dynamic=False)


def run(tiny: bool = False, device: str | None = None, out_dir=None, batches=None) -> list[dict]:
    """Measure every implementation, mode, dtype and batch size (``batches``: default the
    configuration's); append and return the CSV rows."""
    from trainers.kernels.topk_kl import rows_per_program

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(TINY if tiny else FULL)
    repeat = 3 if tiny else (20 if device == "cuda" else 5)
    copy_bw = _copy_bandwidth() if device == "cuda" else None

    rows = []
    for B in batches or shape.pop("B"):
        impls = {"eager": lambda: topk_kl_reference}
        if not (tiny and device == "cpu"):  # compiling takes far longer than the whole tiny CPU run
            impls["compiled"] = _compiled
        if device == "cuda":
            impls["kernel"] = lambda: _kernel(None)
            if rows_per_program(B) > 1:
                impls["kernel_rows1"] = lambda: _kernel(1)
        for dtype in (torch.float32, torch.bfloat16):
            for mode in MODES:
                s, t, idx, lse, mask = _inputs(B, shape["C"], shape["K"], dtype=dtype, device=device)
                config = {"B": B, "C": shape["C"], "K": shape["K"], "T": TEMPERATURE, "mode": mode,
                          "dtype": str(dtype).removeprefix("torch."), "device": device, "tiny": tiny}
                eager = {}
                for name, make in impls.items():
                    fn = partial(make(), s, t, idx, TEMPERATURE, mode, lse, mask)
                    result = _guarded(lambda: _first_call(fn, s, device)) if name == "compiled" else {}
                    if name.startswith("kernel"):
                        result["rows_per_program"] = rows_per_program(B) if name == "kernel" else 1
                    if "error" not in result:
                        result.update(_guarded(lambda: _measure(fn, s, device, repeat)))
                    if device == "cuda" and "error" not in result:
                        result.update(_guarded(lambda: _graph_time(fn, s, repeat)))
                        result.update(_guarded(lambda: _roofline(fn, s, repeat, copy_bw, result)))
                    if name == "eager":
                        eager = result
                    elif "error" not in result:
                        for key, label in (("median_s", "eager_over_impl"), ("graph_median_s", "graph_eager_over_impl")):
                            if key in eager and key in result:
                                result[label] = eager[key] / result[key]
                    rows.append(append_row(BENCH, {**config, "impl": name}, result, out_dir))
    return rows


SWEEP = {"MAX_BLOCK_C": (1024, 4096), "TILE": (2048, 8192), "MAX_WARPS": (4, 8, 16), "ROWS_PER_PROGRAM": (1, 2, 4, 8)}
SWEEP_SHAPE = {"B": 4096, "C": 2513, "K": 50}


def sweep(out_dir=None) -> list[dict]:
    """CUDA only: graph time of the kernel's forward + backward in topk_lse mode at B = 4096 for
    each combination of the module's block knobs (rows in ``topk_kl_sweep.csv``)."""
    from trainers.kernels import topk_kl as module

    defaults = {k: getattr(module, k) for k in (*SWEEP, "ELEMS_PER_WARP")}
    module.ELEMS_PER_WARP = 32  # so that MAX_WARPS sets the warps
    rows = []
    try:
        for knobs in itertools.product(*SWEEP.values()):
            for k, v in zip(SWEEP, knobs):
                setattr(module, k, v)
            for dtype in (torch.float32, torch.bfloat16):
                s, t, idx, lse, mask = _inputs(**SWEEP_SHAPE, dtype=dtype, device="cuda")
                fn = partial(topk_kl, s, t, idx, TEMPERATURE, "topk_lse", lse, mask, use_kernel=True)
                config = {**SWEEP_SHAPE, "T": TEMPERATURE, "mode": "topk_lse", "dtype": str(dtype).removeprefix("torch."),
                          **dict(zip(SWEEP, knobs))}
                result = _guarded(lambda: {**_graph_time(fn, s, 10), **_graph_time(fn, s, 10, False, "fwd_graph")})
                rows.append(append_row(f"{BENCH}_sweep", config, result, out_dir))
    finally:
        for k, v in defaults.items():
            setattr(module, k, v)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help=f"B, C, K = {tuple(TINY.values())}, 3 repeats")
    ap.add_argument("--batches", default=None, help=f"comma-separated B (default {','.join(map(str, FULL['B']))})")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    ap.add_argument("--sweep", action="store_true", help="CUDA: time the kernel's block knobs instead")
    args = ap.parse_args()
    if args.sweep:
        for row in sweep():
            print(row["config"], row.get("graph_median_s", row.get("error")), row.get("fwd_graph_median_s"))
        return
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    for row in run(tiny=args.tiny, device=args.device, batches=batches):
        print(row["config"], {k: v for k, v in row.items() if k not in ("time", "bench", "machine", "config")})


if __name__ == "__main__":
    main()
