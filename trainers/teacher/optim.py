"""Training plumbing shared by pretraining and fine-tuning: AdamW, the lr schedule,
padding, and epoch checkpoints in safetensors + JSON (no pickle).

A checkpoint directory holds ``model-e<epoch>.safetensors``, ``optimizer-e<epoch>.safetensors``
(AdamW's per-parameter ``step``/``exp_avg``/``exp_avg_sq`` tensors, keyed ``<index>.<name>``)
and ``state.json`` (epoch, global step, AdamW's param groups, the training log). Resuming
restores all of it, and each epoch's shuffling and dropout are seeded from (seed, epoch),
so an interrupted run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from kdstore.atomic import replace_with
from kdstore.errors import ConfigError
from kdstore.faults import crash_point

NO_DECAY = ("bias", "layernorm", "layer_norm", "norm.weight")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter except biases and LayerNorm weights (fused
    when the model is on CUDA)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=all(p.is_cuda for p in decay + no_decay) or None)  # one kernel on CUDA


def lr_at(step: int, total: int, lr: float, warmup: float) -> float:
    """Linear warmup over ``warmup * total`` steps, then linear decay to 0."""
    w = max(1, int(warmup * total))
    return lr * (step + 1) / w if step < w else lr * max(0.0, (total - step) / max(1, total - w))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed dropout for ``epoch`` and return the generator that shuffles it."""
    torch.manual_seed(seed * 1009 + epoch)
    return torch.Generator().manual_seed(seed * 1013 + epoch)


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_checkpoint(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Write model, optimizer and ``state`` (JSON, must hold ``epoch``) for ``load_checkpoint``.

    Tensors go to files named by epoch and ``state.json``, which names them, is replaced
    last (atomically), so a crash at any point leaves the previous checkpoint usable.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tag = f"e{state['epoch']}"
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().reshape(-1).clone() for i, s in sd["state"].items() for k, v in s.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    replace_with(path / f"model-{tag}.safetensors", lambda p: save_model(model, str(p)))
    replace_with(path / f"optimizer-{tag}.safetensors", lambda p: save_file(tensors, str(p)))
    crash_point("teacher.checkpoint")
    replace_with(path / "state.json", lambda p: p.write_text(json.dumps({**state, "tag": tag, "param_groups": groups}, indent=1)))
    for old in path.glob("*-e*.safetensors"):
        if not old.name.endswith(f"-{tag}.safetensors"):
            old.unlink()


RESUME_HINT = "delete its stage directory or pass fresh (--fresh)"


@contextmanager
def checked_read(path: str | Path) -> Iterator[None]:
    """Turn a safetensors read of ``path`` that fails (missing, cut short, not safetensors, a
    tensor missing) into a one-line ConfigError naming the file."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint file ({_first_line(e)}); {RESUME_HINT}") from None


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ConfigError naming the file if it is missing, cut
    short or not safetensors."""
    with checked_read(path):
        return load_file(str(path), device=str(device))


def read_json(path: Path, required: tuple[str, ...] = (), hint: str | None = RESUME_HINT) -> dict:
    """A JSON object file of a checkpoint; ConfigError naming it if it is unreadable, not an
    object or lacks ``required`` keys (``hint``, if any, ends the message)."""
    end = f"; {hint}" if hint else ""
    try:
        out = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint file ({_first_line(e)}){end}") from None
    if not isinstance(out, dict) or not set(required) <= out.keys():
        keys = f" with {', '.join(required)}" if required else ""
        raise ConfigError(f"{path}: unreadable checkpoint file (expected a JSON object{keys}){end}")
    return out


def check_json_files(path: Path, names: tuple[str, ...]) -> None:
    """ConfigError naming the first of ``names`` in the directory ``path`` that is not a readable JSON object."""
    for name in names:
        if (path / name).exists():
            read_json(path / name, hint=None)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def load_checkpoint(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict | None:
    """Restore a checkpoint written by ``save_checkpoint`` onto the model's device; None if
    there is none.

    ConfigError naming the file if one is unreadable (truncated, not safetensors or JSON),
    or if a stored tensor's shape differs from the model's (e.g. heads for another class count).
    """
    path = Path(path)
    if not (path / "state.json").exists():
        return None
    state = read_json(path / "state.json", ("epoch", "tag", "param_groups", "log"))
    weights = path / f"model-{state['tag']}.safetensors"
    device = next(model.parameters()).device
    tensors = read_safetensors(weights, device)
    own = model.state_dict()
    for key, v in tensors.items():
        if key in own and tuple(own[key].shape) != tuple(v.shape):
            raise ConfigError(
                f"{weights}: {key} has shape {list(v.shape)}, the model needs {list(own[key].shape)}"
                " (checkpoint made for another class count or model; use a fresh work dir)"
            )
    missing = sorted(own.keys() - tensors.keys())
    if missing:
        raise ConfigError(f"{weights}: lacks {len(missing)} of the model's tensors ({missing[0]}, ...)")
    model.load_state_dict(tensors)
    if opt is not None:
        flat = read_safetensors(path / f"optimizer-{state['tag']}.safetensors")
        per: dict[int, dict] = {}
        for key, v in flat.items():
            i, name = key.split(".", 1)
            per.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, s in per.items():
            for name in ("exp_avg", "exp_avg_sq"):
                s[name] = s[name].reshape(params[i].shape)
        opt.load_state_dict({"state": per, "param_groups": state["param_groups"]})
    return state

