"""FaultInjector: each fault does what it says, on schedule, and leaves no trace."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.errors import ConfigError
from gradguard.testing import Fault, FaultInjector


def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    optimizer.zero_grad()
    loss = model(torch.ones(3, 4)).pow(2).mean()
    loss.backward()
    return loss


def hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    count = len(model._forward_hooks)
    for p in model.parameters():
        count += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return (
        count + len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
    )


@pytest.mark.parametrize(("kind", "check"), [("nan", math.isnan), ("inf", math.isinf)])
def test_nan_and_inf_go_into_the_named_gradient_only(kind: Any, check: Any) -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={1: kind}, parameter="2.weight")
    with injector.step() as fault:
        one_step(model, optimizer)
    assert fault == Fault(1, kind, "2.weight")
    for name, p in model.named_parameters():
        assert p.grad is not None
        bad = [check(v) for v in p.grad.flatten().tolist()]
        assert sum(bad) == (1 if name == "2.weight" else 0), name
    assert hooks_left(model, optimizer) == 0


def test_spike_multiplies_every_gradient() -> None:
    model, optimizer = setup()
    one_step(model, optimizer)
    clean = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    injector = FaultInjector(model, optimizer, at={1: "spike"}, spike_factor=1e3)
    with injector.step():
        one_step(model, optimizer)
    for p, g in zip(model.parameters(), clean, strict=True):
        torch.testing.assert_close(p.grad, g * 1e3)


def test_loss_fault_makes_the_output_the_loss_and_the_gradients_nan() -> None:
    model, optimizer = setup()
    with FaultInjector(model, optimizer, at={1: "loss"}).step():
        loss = one_step(model, optimizer)
    assert math.isnan(float(loss.detach()))
    assert all(bool(p.grad.isnan().all()) for p in model.parameters() if p.grad is not None)
    assert hooks_left(model, optimizer) == 0


def test_lr_fault_lasts_k_optimizer_steps_and_only_during_the_step() -> None:
    model, optimizer = setup()
    seen: list[float] = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    injector = FaultInjector(model, optimizer, at={2: "lr"}, lr_factor=100, lr_steps=3)
    for _ in range(6):
        with injector.step():
            one_step(model, optimizer)
            optimizer.step()
        assert optimizer.param_groups[0]["lr"] == 0.1  # restored after every step
    # our post-hook runs before the injector's (registered later): it sees the raised LR
    assert seen == pytest.approx([0.1, 10.0, 10.0, 10.0, 0.1, 0.1])
    assert hooks_left(model, optimizer) == 1  # only the test's own hook


def test_random_schedule_is_reproducible_and_disabled_leaves_no_trace() -> None:
    def schedule(seed: int, enabled: bool = True) -> list[Fault]:
        model, optimizer = setup()
        injector = FaultInjector(
            model, optimizer, probability=0.2, seed=seed, enabled=enabled, kinds=("nan", "spike")
        )
        for _ in range(100):
            with injector.step():
                one_step(model, optimizer)
        assert hooks_left(model, optimizer) == 0
        return injector.log

    first = schedule(3)
    assert first == schedule(3)
    assert first != schedule(4)
    assert 10 <= len(first) <= 30
    assert schedule(3, enabled=False) == []


def test_no_fault_step_registers_nothing() -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={5: "nan"})
    with injector.step() as fault:
        assert fault is None
        assert hooks_left(model, optimizer) == 0
        one_step(model, optimizer)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"at": {1: "boom"}}, "unknown fault kind 'boom'"),
        ({"probability": 1.5}, r"probability must lie in \[0, 1\]"),
        ({"parameter": "nope"}, "not a trainable parameter"),
        ({"lr_steps": 0}, "lr_steps must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    model, optimizer = setup()
    with pytest.raises(ConfigError, match=message):
        FaultInjector(model, optimizer, **kwargs)


def test_lr_faults_need_the_optimizer() -> None:
    model, _ = setup()
    with pytest.raises(ConfigError, match="need the optimizer"):
        FaultInjector(model, at={1: "lr"})
