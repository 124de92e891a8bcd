"""One optimisation step of the student, eager or compiled.

The forward and the losses are one function of the batch; ``cfg.compile`` runs it through
``torch.compile`` (AOTAutograd compiles its backward with it). ``"reduce-overhead"`` is the
mode that removes the per-step Python and launch cost: on CUDA, Inductor's CUDA-graph trees
replay forward and backward as graphs, copying each batch into their static inputs, and fall
back to eager kernels around any graph break. It is chosen over hand-written
``torch.cuda.graphs`` capture because it also fuses the small element-wise kernels (layer
norms, GELU, dropout, the losses) that dominate a step of this small model, keeps working
(slower) where a part cannot be captured, and runs on the CPU, where the tests compare it
with eager. The optimiser steps outside the graph, as one fused kernel on CUDA.

Nothing in the step reads a value back to the host: the batch is checked before it reaches
the step (``check_batch`` in the loader, or once at load for resident data), and the losses
come back as one device vector that the trainer reads every few steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..device import autocast, training_dtype
from .batch import Batch
from .config import StudentConfig
from .losses import student_losses


class TrainStep:
    """``step(batch)``: forward, losses, backward, gradient clipping, optimiser and schedule
    step; returns the detached losses stacked in the order of ``keys`` (set by the first call).

    Args:
        net: the model (possibly DDP-wrapped) that the forward runs.
        opt, sched: the optimiser and its learning-rate schedule.
        cfg: the run's config (compile, grad_clip); ``loss_cfg`` the losses' (without
            distillation for a baseline).
        device: where the batch lives; CUDA steps autocast to bf16.
        backend: torch.compile's backend (tests on CPU use "aot_eager").
    """

    def __init__(self, net: torch.nn.Module, opt: torch.optim.Optimizer, sched, cfg: StudentConfig,
                 loss_cfg: StudentConfig, device: str, backend: str = "inductor"):
        self.net, self.opt, self.sched, self.cfg = net, opt, sched, cfg
        self.params = [p for group in opt.param_groups for p in group["params"]]
        self.graphs = torch.device(device).type == "cuda" and cfg.compile == "reduce-overhead"
        amp = training_dtype(device)  # bf16 on CUDA, None (float32) elsewhere

        def forward_losses(batch: Batch) -> dict[str, Tensor]:
            with autocast(device, amp):
                out = net(batch.frames)
            return student_losses({k: v.float() for k, v in out.items()}, batch, loss_cfg, check=False)

        self.forward_losses = forward_losses
        if cfg.compile != "off":
            # attn_impl="auto" probes xformers in eager code, not inside the graph being traced
            getattr(net, "module", net).resolve_attention(device, amp or torch.float32)
            mode = None if cfg.compile == "default" or backend != "inductor" else cfg.compile  # modes are Inductor's
            self.forward_losses = torch.compile(forward_losses, mode=mode, backend=backend)
        self.keys: list[str] | None = None

    def __call__(self, batch: Batch) -> Tensor:
        if self.graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        losses = self.forward_losses(batch)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.keys is None:
            self.keys = sorted(losses)
        # a new tensor: the graphs' outputs are overwritten by the next replay
        return torch.stack([losses[k].detach() for k in self.keys])  # [len(keys)]
