"""Teacher devices: stage placement, autocast, folds across a pool of device processes, CUDA
builds (run by bench/gpu_checks.sh on a GPU machine; skipped here), unreadable checkpoints."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import annotation_store as new_store
import torch

from kdstore.errors import ConfigError
from kdstore.store import Store
from trainers.teacher.build import build_teacher
from trainers.teacher.config import preset
from trainers.device import autocast, training_dtype
from trainers.teacher.device import stage_devices
from trainers.teacher.models import scratch_teacher
from trainers.teacher.tokenizer import encode, train_tokenizer

BUILD = dict(pretrain_epochs=1, history_dropout=0.5, threads=1)
ARGS = dict(train_split="training1", eval_splits=("validation1",), show_progress=False)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_checks.sh runs it)")




@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_ann):
    """A tiny build (MLM pretraining + 2 folds) in this process on the CPU."""
    store = new_store(tmp_path_factory.mktemp("built") / "s.zarr", teacher_ann)
    cfg = preset("tiny", device="cpu", **BUILD)
    return store, cfg, build_teacher(store, "t", cfg, **ARGS)


def logits(store: Store, name: str) -> np.ndarray:
    return np.asarray(store.group(name).logits, np.float32)


def test_stage_devices():
    assert stage_devices("cpu", 3, cuda_count=4) == ["cpu"] * 3
    assert stage_devices("auto", 2, cuda_count=0) == ["cpu", "cpu"]
    assert stage_devices("auto", 1, cuda_count=2) == ["cuda:0", "cuda:1"]
    assert stage_devices("cuda", 2, cuda_count=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]  # GPUs first
    with pytest.raises(ConfigError, match="device 'cuda': no CUDA GPU is visible"):
        stage_devices("cuda", 1, cuda_count=0)
    with pytest.raises(ConfigError, match="device 'tpu': expected one of auto, cpu, cuda"):
        stage_devices("tpu")
    with pytest.raises(ConfigError, match="TeacherConfig: device: expected one of auto, cpu, cuda, got 'gpu'"):
        preset("tiny", device="gpu")


def test_autocast_only_on_cuda():
    tok = train_tokenizer(["take <v> cup <a> open <v> fridge"], 200)
    model = scratch_teacher("bert", "tiny", tok, 16, (5, 3, 4), 0.0)
    x, mask = encode(tok, ["take <v> cup"], 16).batch([0])
    with autocast("cpu", training_dtype("cpu")):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
        assert model(x, mask)["action"].dtype == torch.float32
    assert training_dtype("cuda:1") == training_dtype(torch.device("cuda")) == torch.bfloat16 and training_dtype("cpu") is None


@CUDA
def test_autocast_on_cuda_is_bf16():
    tok = train_tokenizer(["take <v> cup <a> open <v> fridge"], 200)
    model = scratch_teacher("bert", "tiny", tok, 16, (5, 3, 4), 0.0).cuda()
    x, mask = encode(tok, ["take <v> cup"], 16).batch([0], "cuda")
    with autocast("cuda", training_dtype("cuda")):
        assert model(x, mask)["action"].dtype == torch.bfloat16


def test_cpu_build_records_its_device(built):
    store, cfg, r = built
    assert {row["device"] for row in r.log if row["stage"] != "pretrain"} == {"cpu"}
    assert [s["stage"] for s in r.stages] == ["full", "fold0", "fold1"] and {s["device"] for s in r.stages} == {"cpu"}
    assert store.group("t").config["device"] == "cpu"


def test_folds_spread_over_a_pool_of_device_processes(built, tmp_path, teacher_ann):
    """Three "cpu" device slots stand in for three GPUs: at most one process each (a process
    that frees up first may take two stages), every stage once, the same predictions as the
    in-process build."""
    import os

    store, cfg, r = built
    other = new_store(tmp_path / "s.zarr", teacher_ann)
    work = tmp_path / "work"
    work.mkdir()
    for part in ("tokenizer", "pretrained", "build.json"):  # share the pretrained encoder: only the stages run
        (shutil.copytree if part != "build.json" else shutil.copy)(r.work_dir / part, work / part)
    res = build_teacher(other, "t", cfg, work_dir=work, devices=["cpu", "cpu", "cpu"], **ARGS)
    pids = {s["pid"] for s in res.stages}
    assert sorted(s["stage"] for s in res.stages) == ["fold0", "fold1", "full"]
    assert 1 <= len(pids) <= 3 and os.getpid() not in pids
    assert np.allclose(logits(store, "t"), logits(other, "t"), atol=1e-2)
    assert store.group("t").features.shape == other.group("t").features.shape


def test_unreadable_checkpoints_are_one_line_config_errors(built, tmp_path):
    store, cfg, r = built

    def resume_error(work: Path) -> str:
        with pytest.raises(ConfigError) as e:
            build_teacher(store, "x", cfg, work_dir=work, **ARGS)
        assert "\n" not in str(e.value) and "x" not in store.groups()
        return str(e.value)

    cases = {  # file -> how it is spoiled
        "full/model-e{e}.safetensors": lambda b: b[: len(b) // 2],  # cut short
        "fold0/optimizer-e{e}.safetensors": lambda b: b"not a safetensors file",
        "fold1/state.json": lambda b: b[:10],
        "fold0/predictions.safetensors": lambda b: b[:100],
        "pretrained/model.safetensors": lambda b: b[: len(b) // 3],
    }
    for i, (name, spoil) in enumerate(cases.items()):
        work = tmp_path / f"w{i}"
        shutil.copytree(r.work_dir, work)
        for stage in ("full", "fold0", "fold1"):  # resume every stage from its last epoch
            if f"{stage}/" in name and "predictions" not in name:
                (work / stage / "predictions.safetensors").unlink()
        if name.startswith("pretrained"):
            for stage in ("full", "fold0", "fold1"):
                shutil.rmtree(work / stage)
        path = work / name.format(e=cfg.epochs)
        path.write_bytes(spoil(path.read_bytes()))
        msg = resume_error(work)
        assert str(path) in msg, msg
        assert "unreadable checkpoint file" in msg or "cannot load" in msg, msg


# -- CUDA (bench/gpu_checks.sh) -----------------------------------------------------------


@CUDA
def test_cuda_build_has_the_cpu_format_and_resumes_on_cpu(built, tmp_path, teacher_ann):
    store, cfg, r = built
    gpu = new_store(tmp_path / "g.zarr", teacher_ann)
    work = tmp_path / "work"
    on_gpu = preset("tiny", device="cuda", **BUILD)

    def stop(stage, epoch, row):
        if stage == "fold0" and epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_teacher(gpu, "t", on_gpu, work_dir=work, on_epoch=stop, devices=["cuda:0"], **ARGS)
    res = build_teacher(gpu, "t", cfg, work_dir=work, **ARGS)  # the same build, resumed on the CPU
    devs = {(row["stage"], row["device"]) for row in res.log if row["stage"] != "pretrain"}
    assert ("full", "cuda:0") in devs and ("fold1", "cpu") in devs
    a, b = store.group("t"), gpu.group("t")
    assert a.features.shape == b.features.shape and a.topk == b.topk and set(a.metrics) == set(b.metrics)
    assert sorted(a.attrs) == sorted(b.attrs)
    assert np.isfinite(logits(gpu, "t")).all()


@CUDA
def test_cuda_folds_across_gpus(built, tmp_path, teacher_ann):
    store, cfg, r = built
    gpu = new_store(tmp_path / "g.zarr", teacher_ann)
    res = build_teacher(gpu, "t", preset("tiny", device="cuda", **BUILD), **ARGS)
    used = {s["device"] for s in res.stages}
    assert used == {f"cuda:{i}" for i in range(min(3, torch.cuda.device_count()))}
    agree = (logits(store, "t").argmax(1) == logits(gpu, "t").argmax(1)).mean()
    assert agree > 0.5, agree  # bf16 and CUDA dropout streams: close to the CPU build, not equal
