"""The optimizer every stage builds: fused AdamW where the kernel exists, the same update as the
default for-each AdamW, and a state dict that round-trips (resume)."""

from __future__ import annotations

import copy

import torch

from speechrl.config import TrainConfig
from speechrl.train.optim import build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 8))
    model[0].bias.requires_grad_(False)  # frozen: not in the optimizer
    return model


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Random but reproducible gradients: step i's depend on i alone."""
    for i in steps:
        gen = torch.Generator().manual_seed(100 + i)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        optimizer.zero_grad()


def _default_adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The intended optimizer written out under torch's default (for-each) AdamW: weight decay
    on the trainable matrices only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas))


def test_cpu_optimizer_is_fused_and_matches_the_default_adamw():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused_model, default_model = _model(), _model()
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    assert [len(g["params"]) for g in fused.param_groups] == [2, 3]  # 2-d decays, the rest not
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    default = _default_adamw(default_model, cfg)
    assert not default.defaults["fused"]
    start = [p.detach().clone() for p in fused_model.parameters()]
    _steps(fused_model, fused, range(5))
    _steps(default_model, default, range(5))
    moved = 0.0
    for a, b, s in zip(fused_model.parameters(), default_model.parameters(), start, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        moved = max(moved, float((a.detach() - s).abs().max()))
    assert moved > 1e-2  # five steps of lr 1e-2 moved the weights: the comparison is not idle
    assert torch.equal(fused_model[0].bias, start[1])  # the frozen bias did not move


def test_fused_optimizer_state_round_trips_like_a_resume():
    """Three steps, state dict saved and loaded into a fresh model and optimizer, two more:
    exactly the weights of five uninterrupted steps. The saved state of the default AdamW
    (checkpoints written before the optimizer was fused) loads too and continues within
    rounding."""
    cfg = TrainConfig(lr=1e-2)
    model = _model()
    optimizer = build_optimizer(model, cfg)
    _steps(model, optimizer, range(3))
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _steps(model, optimizer, range(3, 5))

    resumed = _model()
    resumed.load_state_dict(weights)
    resumed_optimizer = build_optimizer(resumed, cfg)
    resumed_optimizer.load_state_dict(state)
    assert resumed_optimizer.defaults["fused"] is True
    _steps(resumed, resumed_optimizer, range(3, 5))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    old = _model()
    old_optimizer = _default_adamw(old, cfg)
    _steps(old, old_optimizer, range(3))
    from_old = _model()
    from_old.load_state_dict(old.state_dict())
    from_old_optimizer = build_optimizer(from_old, cfg)
    from_old_optimizer.load_state_dict(old_optimizer.state_dict())
    _steps(from_old, from_old_optimizer, range(3, 5))
    for a, b in zip(model.parameters(), from_old.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_parameters_off_the_fused_devices_keep_the_default_adamw():
    model = torch.nn.Linear(4, 4, device="meta")
    assert not build_optimizer(model, TrainConfig()).defaults["fused"]
