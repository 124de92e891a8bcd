"""Benchmark the fused top-K distillation KL against the eager and compiled torch reference.

    python bench/topk_kl.py [--tiny] [--device cuda|cpu]

Times forward + backward at B=4096, C=2513 (EK55 actions), K=50, T=10 with fp32 and bf16 student
logits in both modes and appends one row per implementation to ``bench/results/topk_kl.csv``.
On CUDA the fused kernel's row also holds its forward time (the one fused launch) against the
ideal time to move its bytes (read the logits, write the gradient, read the teacher inputs) at
the measured device copy bandwidth. On CPU only the reference paths run: the Triton interpreter
is not a performance path. Peak memory is ``torch.cuda.max_memory_allocated`` per row on CUDA,
and the process's peak RSS so far on CPU.
"""

from __future__ import annotations

import argparse
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
FULL = {"B": 4096, "C": 2513, "K": 50}
TINY = {"B": 64, "C": 101, "K": 5}


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


def _roofline(fn, s, t, idx, device, repeat, copy_bw):
    """Forward time of the fused kernel (one launch) against moving its bytes at copy bandwidth."""
    B, C = s.shape
    K = t.shape[1]
    # Logits read once + gradient written once, teacher logits/indices, LSE, mask and loss.
    nbytes = 2 * B * C * s.element_size() + B * K * (t.element_size() + idx.element_size()) + B * (4 + 1 + 4)
    fwd_s = _measure(fn, s, device, repeat, backward=False)["median_s"]
    ideal_s = nbytes / copy_bw
    return {"fwd_median_s": fwd_s, "bytes": nbytes, "copy_gbps": copy_bw / 1e9, "ideal_s": ideal_s,
            "fwd_over_ideal": fwd_s / ideal_s}


def _guarded(measure):
    """Run one measurement; a failure becomes the row's error field instead of ending the run."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - any failure (compile, launch) is a result to record
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def run(tiny: bool = False, device: str | None = None, out_dir=None) -> list[dict]:
    """Measure every implementation, mode and dtype; append and return the CSV rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if tiny else FULL
    repeat = 3 if tiny else (20 if device == "cuda" else 5)
    impls = {"eager": topk_kl_reference}
    if not (tiny and device == "cpu"):  # compiling takes far longer than the whole tiny CPU run
        impls["compiled"] = torch.compile(topk_kl_reference)
    if device == "cuda":
        impls["kernel"] = partial(topk_kl, use_kernel=True)
    copy_bw = _copy_bandwidth() if device == "cuda" else None

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mode in MODES:
            s, t, idx, lse, mask = _inputs(**shape, dtype=dtype, device=device)
            config = {**shape, "T": TEMPERATURE, "mode": mode, "dtype": str(dtype).removeprefix("torch."),
                      "device": device, "tiny": tiny}
            eager_s = None
            for name, impl in impls.items():
                fn = partial(impl, s, t, idx, TEMPERATURE, mode, lse, mask)
                result = _guarded(lambda: _first_call(fn, s, device)) if name == "compiled" else {}
                if "error" not in result:
                    result.update(_guarded(lambda: _measure(fn, s, device, repeat)))
                if name == "eager":
                    eager_s = result.get("median_s")
                if name == "kernel" and "error" not in result:
                    result.update(_guarded(lambda: _roofline(fn, s, t, idx, device, repeat, copy_bw)))
                    if eager_s:
                        result["eager_over_kernel"] = eager_s / result["median_s"]
                rows.append(append_row(BENCH, {**config, "impl": name}, result, out_dir))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help=f"B, C, K = {tuple(TINY.values())}, 3 repeats")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    args = ap.parse_args()
    for row in run(tiny=args.tiny, device=args.device):
        print(row["config"], {k: v for k, v in row.items() if k not in ("time", "bench", "machine", "config")})


if __name__ == "__main__":
    main()
