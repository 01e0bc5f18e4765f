"""Optimizer step paths: found_inf skips, priming, the LR cool-down and scheduler replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradguard._stepping import (
    cooled_lr,
    prime_fused_state,
    replay_scheduler,
    scheduler_state,
    step_with_found_inf,
    supports_found_inf,
)


def model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    return model


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in model.parameters()] + state


def test_fused_optimizers_support_found_inf_and_others_do_not() -> None:
    params = list(nn.Linear(2, 2).parameters())
    assert supports_found_inf(torch.optim.AdamW(params, fused=True))
    assert not supports_found_inf(torch.optim.AdamW(params, foreach=True))


def test_found_inf_set_changes_nothing_and_unset_is_a_normal_step() -> None:
    model = model_with_grads()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    assert prime_fused_state(optimizer, torch.device("cpu"))
    before = snapshot(model, optimizer)
    step_with_found_inf(optimizer, torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, optimizer), strict=True))
    assert not hasattr(optimizer, "found_inf")  # the flag is removed after the step
    reference = model_with_grads()
    plain = torch.optim.AdamW(reference.parameters(), lr=0.1, fused=True)
    plain.step()
    step_with_found_inf(optimizer, torch.zeros(()))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_priming_creates_the_state_a_first_step_starts_from() -> None:
    model = model_with_grads()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    weights = [p.detach().clone() for p in model.parameters()]
    assert prime_fused_state(optimizer, torch.device("cpu"))
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
        state = optimizer.state[p]
        assert float(state["step"]) == 0
        assert not state["exp_avg"].any()
        assert not state["exp_avg_sq"].any()


def test_sgd_with_dampening_cannot_be_primed() -> None:
    model = model_with_grads()
    damped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1, fused=True)
    assert not prime_fused_state(damped, torch.device("cpu"))
    assert not damped.state
    undamped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    assert prime_fused_state(undamped, torch.device("cpu"))
    assert all(not s["momentum_buffer"].any() for s in undamped.state.values())


def test_cooled_lr_scales_the_step_only() -> None:
    model = model_with_grads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    grad = model.weight.grad.clone()
    with cooled_lr(optimizer, 0.25):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
        optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(model.weight.detach(), before - 0.025 * grad)


def test_replay_steps_the_scheduler_once_per_step_taken() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    start = scheduler_state(scheduler, optimizer)
    for _ in range(4):  # stepped after every device-path step, skipped ones included
        optimizer.step()
        scheduler.step()
    skipped = np.array([False, True, False, False])
    replay_scheduler(scheduler, optimizer, start, skipped, skipped)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5**3)
    assert scheduler.last_epoch == 3
    untouched = scheduler.state_dict()
    replay_scheduler(scheduler, optimizer, start, skipped, np.zeros(4, dtype=bool))
    assert scheduler.state_dict() == untouched  # no device-path skip: nothing to undo
