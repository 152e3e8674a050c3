"""The optimizer and its schedule, and the end of every update (clipping, then the optimizer
step unless something is not finite): the same for every stage."""

from __future__ import annotations

import math

import torch

from speechrl import distributed
from speechrl.config import TrainConfig

# Devices whose AdamW has a fused kernel (one kernel over all tensors of a device and dtype).
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-d tensors).

    Fused (``torch._fused_adamw_``) when every parameter is a floating-point tensor on the CPU
    or a CUDA device, FSDP2's DTensors included (DTensor shards the fused op like any pointwise
    one): the same update as the default for-each one up to float rounding, 3.6x faster on the
    tiny preset's 3.8 M parameters on the CPU (docs/benchmarks.md). Otherwise the default."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             fused=True if fused else None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'constant' or 'cosine'")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def clipped_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                 loss_finite: bool = True) -> tuple[float, bool]:
    """How every update ends: clip the gradients, then take the optimizer step unless the loss
    (``loss_finite``) or the gradient norm is not finite. Returns (grad norm, whether the step
    was taken); a skipped step's gradients are the caller's to drop
    (:func:`speechrl.train.common.end_step` counts it)."""
    grad_norm, finite = clip_and_check(model, max_norm)
    if not (finite and loss_finite):
        return grad_norm, False
    optimizer.step()
    return grad_norm, True


def clip_and_check(model: torch.nn.Module, max_norm: float) -> tuple[float, bool]:
    """Clip gradients; return (grad norm, finite). A non-finite norm means the step is skipped.

    Under DDP the gradients are already averaged, so every rank finds the same norm; under
    FSDP2 each rank holds a shard and the norm is reduced over ranks (a DTensor)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params and not distributed.is_sharded(model):
        return 0.0, True
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    return norm, math.isfinite(norm)
