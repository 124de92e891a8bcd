"""Where teacher stages run: the device of each stage process (bf16 autocast on CUDA: ``trainers.device``).

``device`` is ``auto`` (CUDA when a GPU is visible, else CPU), ``cpu`` or ``cuda``. On CPU
``workers`` stage processes share the cores; on CUDA every visible GPU runs ``workers``
stage processes (default one), so the K folds of a build spread over the GPUs. Numbers
are computed in float32 on CPU and under bf16 autocast on CUDA; weights, optimizer state
and checkpoints stay float32 either way, so a build started on one resumes on the other.
"""

from __future__ import annotations

import torch

from kdstore.errors import ConfigError

from .config import DEVICES


def stage_devices(device: str, workers: int = 1, cuda_count: int | None = None) -> list[str]:
    """The device of each parallel stage process, e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu", "cpu"]``.

    ``cuda_count`` is the number of visible GPUs (default: ``torch.cuda.device_count()``).
    ConfigError for an unknown device or ``cuda`` without a GPU.
    """
    if device not in DEVICES:
        raise ConfigError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if workers < 1:
        raise ConfigError(f"workers: expected >= 1, got {workers}")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if device == "cuda" and count == 0:
        raise ConfigError("device 'cuda': no CUDA GPU is visible (use --device cpu or auto)")
    if device == "cpu" or count == 0:
        return ["cpu"] * workers
    return [f"cuda:{i}" for _ in range(workers) for i in range(count)]  # fewer stages than slots: one per GPU first
