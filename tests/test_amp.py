"""The guard's side of a GradScaler: unscale once, share the skip, read the scaler's verdict."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradguard._amp import merge_found_inf, scaler_found_inf, unscale_once


def scaled_backward(scaler: torch.amp.GradScaler, model: nn.Module) -> None:
    model.zero_grad()
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()


def setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.amp.GradScaler("cpu", init_scale=1024.0)


def test_unscale_once_unscales_exactly_once() -> None:
    model, optimizer, scaler = setup()
    scaled_backward(scaler, model)
    scaled = model.weight.grad.clone()
    unscale_once(scaler, optimizer)
    unscale_once(scaler, optimizer)  # the loop (or a second call) already unscaled: no-op
    torch.testing.assert_close(model.weight.grad, scaled / 1024.0)


def test_the_guard_flag_makes_the_scaler_skip_and_back_off() -> None:
    model, optimizer, scaler = setup()
    scaled_backward(scaler, model)
    unscale_once(scaler, optimizer)
    device = torch.device("cpu")
    assert float(scaler_found_inf(scaler, optimizer, device)) == 0
    before = model.weight.detach().clone()
    combined = merge_found_inf(scaler, optimizer, torch.ones(()))
    assert float(combined) == 1
    assert float(scaler_found_inf(scaler, optimizer, device)) == 1
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight, before)  # the scaler skipped the guard's step
    assert scaler.get_scale() == 512.0


def test_scaler_verdict_reads_an_overflow_of_its_own() -> None:
    model, optimizer, scaler = setup()
    scaled_backward(scaler, model)
    model.weight.grad[0, 0] = math.inf
    unscale_once(scaler, optimizer)
    assert float(scaler_found_inf(scaler, optimizer, torch.device("cpu"))) == 1
    assert float(merge_found_inf(scaler, optimizer, torch.zeros(()))) == 1
