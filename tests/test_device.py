"""trainers/device.py: a run's device, autocast dtype and torchrun rank (the two-rank path runs
in test_video_features.py::test_torchrun_two_processes_equal_one)."""

from __future__ import annotations

import pytest
import torch

from kdstore.errors import ConfigError
from trainers.device import autocast, autocast_dtype, distributed, resolve_device


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
        with pytest.raises(ConfigError, match="has no GPU"):
            resolve_device("cuda")


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        autocast_dtype("fp8", cpu)
    x = torch.ones(2, 2)
    with autocast(cpu, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert (x @ x).dtype == torch.float32


def test_one_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed(torch.device("cpu")) as (rank, world):
        assert (rank, world) == (0, 1)
        assert not torch.distributed.is_initialized()
