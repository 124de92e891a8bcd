"""Where a run computes: its device, its autocast dtype, and its rank among torchrun's processes.

Under ``torchrun`` (``WORLD_SIZE > 1``) each process is one rank; a CUDA rank takes the GPU of
its ``LOCAL_RANK``, and the ranks talk over NCCL (CUDA) or Gloo (CPU). Ranks exchange JSON,
never pickles.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn.functional as F

from kdstore.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto``: CUDA when available; under torchrun CUDA ranks use ``cuda:LOCAL_RANK``.

    ConfigError for CUDA without a GPU, and for a LOCAL_RANK beyond this node's GPUs.
    """
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available")
        if dev.index is None:
            local = int(os.environ.get("LOCAL_RANK", 0))
            if local >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                                  "start at most that many processes per node, or pass device='cpu'")
            dev = torch.device("cuda", local)
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 (or fp16) on CUDA and fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def training_dtype(device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step: bf16 on CUDA (fp16 would need a loss scaler),
    None (float32) elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; nothing (float32) for None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


@contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size) of this process; under torchrun the process group is started on
    entry (unless the caller started it), and on exit every rank waits for the others before
    the group is destroyed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield dist.get_rank(), dist.get_world_size()
        # no rank leaves (tearing down its connections, or reaped by torchrun) while a peer
        # still works: rank 0 evaluates, checkpoints and commits after the others are done
        dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def all_gather_json(obj, device: torch.device) -> list:
    """Every rank's JSON-serialisable ``obj``, as bytes in tensors (no pickle)."""
    import torch.distributed as dist

    comm = device if device.type == "cuda" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=comm)  # [n]
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=comm))
    n = max(int(s) for s in sizes)
    bufs = [torch.zeros(n, dtype=torch.uint8, device=comm) for _ in sizes]
    dist.all_gather(bufs, F.pad(data, (0, n - len(data))))
    return [json.loads(bytes(b[: int(s)].tolist())) for b, s in zip(bufs, sizes)]
