"""AVT-h training step with PyTorch SDPA attention vs xformers' memory-efficient attention.

    python bench/attention.py [--tiny] [--device cuda|cpu]

Times forward + backward of the student head (bf16 autocast on CUDA) for the ``egtea`` and
``ek55`` presets' models at two batch sizes and appends one row per (preset, batch, impl) to
``bench/results/attention.csv``. AVT-h attends over only ``num_frames`` (10) positions, so the
attention is a small share of the step; this measures whether the choice matters at all.
Without xformers (or without CUDA, where it has no kernels for training) its rows record the
reason instead of a time.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import append_row, peak_rss_mib, timeit

BENCH = "attention"
DIM = 1024  # backbone feature width (TSN/ViT-L features)
CLASSES = {"egtea": (106, 19, 51), "ek55": (2513, 125, 352)}  # actions, verbs, nouns
FULL = {"presets": ("egtea", "ek55"), "batches": (64, 256), "repeat": 20}
# On CPU a step of the ek55 model at batch 256 takes tens of seconds and xformers is not
# measured: one small row keeps the benchmark honest without dominating run_all.
CPU = {"presets": ("egtea",), "batches": (64,), "repeat": 5}
TINY = {"presets": ("egtea",), "batches": (4,), "repeat": 3, "model": dict(n_layer=1, inter_dim=64, n_head=2)}


def _step_fn(model, frames, amp):
    def step():
        with amp:
            out = model(frames)
        sum(v.float().mean() for v in out.values()).backward()
    return step


def run(tiny: bool = False, device: str | None = None, out_dir=None) -> list[dict]:
    """Time one student step per preset, batch size and attention implementation."""
    from trainers.student.avt import AVTHead
    from trainers.student.config import preset

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    p = TINY if tiny else (FULL if cuda else CPU)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    sync = torch.cuda.synchronize if cuda else None
    rows = []
    for name in p["presets"]:
        for impl in ("sdpa", "xformers"):
            for bs in p["batches"]:
                cfg = preset(name, attn_impl=impl, **p.get("model", {}))
                config = {"preset": name, "impl": impl, "batch_size": bs, "num_frames": cfg.num_frames,
                          "n_layer": cfg.n_layer, "inter_dim": cfg.inter_dim, "device": device, "tiny": tiny}
                try:
                    if impl == "xformers" and not cuda:
                        raise RuntimeError("xformers is measured on CUDA only")
                    torch.manual_seed(0)
                    model = AVTHead(DIM, *CLASSES[name], cfg).to(device).train()
                    frames = torch.randn(bs, cfg.num_frames, DIM, device=device)  # [B, T, D]
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    result = timeit(_step_fn(model, frames, amp), repeat=p["repeat"], warmup=3, sync=sync)
                    result["samples_per_s"] = bs / result["median_s"]
                    result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
                except Exception as e:  # noqa: BLE001 - a missing or failing impl is a result to record
                    result = {"error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(append_row(BENCH, config, result, out_dir))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="one small model, batch 4, 3 repeats")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    args = ap.parse_args()
    for row in run(tiny=args.tiny, device=args.device):
        print(row["config"], row.get("median_s", ""), row.get("samples_per_s", ""), row.get("error", ""))


if __name__ == "__main__":
    main()
