"""The launch budget, counted on the CPU: operators dispatched do not grow with the tensors.

On a GPU the cost of gradguard's step is the number of kernels it launches; every aten
operator dispatched is at most one launch. A ``TorchDispatchMode`` counts them: for a
model of 10 parameter tensors and one of 1,000, ``guard.step`` beyond the optimizer's own
step, and each policy's ``gg.clip_``, must dispatch the same number of operators.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg

SMALL, LARGE = 5, 500  # Linear(8, 8) layers: 10 and 1,000 parameter tensors

POLICIES: dict[str, Callable[[], gg.ClipPolicy | None]] = {
    "none": lambda: None,
    "NormClip": lambda: gg.NormClip(1.0),
    "NormClip(p=1)": lambda: gg.NormClip(1.0, norm_type=1.0),
    "ValueClip": lambda: gg.ValueClip(0.01),
    "AGC": gg.AGC,
    "ZClip": gg.ZClip,
    "AutoClip": gg.AutoClip,
}


class OperatorCount(TorchDispatchMode):
    """Counts every aten operator dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def dispatched(fn: Callable[[], object]) -> Counter[str]:
    counter = OperatorCount()
    with counter:
        fn()
    return counter.ops


def layers(n: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(n)))


def backward(model: nn.Module, seed: int) -> None:
    model.zero_grad(set_to_none=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()


def guard_step_beyond_the_optimizer(n: int, policy: str, impl: str) -> Counter[str]:
    model = layers(n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **{impl: True})
    guard = gg.Guard(model, optimizer, clip=POLICIES[policy](), log_every=1000)
    for seed in range(3):  # past the first steps, which create state and caches
        backward(model, seed)
        guard.step()
    backward(model, 3)
    own = dispatched(optimizer.step)
    backward(model, 4)
    total = dispatched(guard.step)
    guard.close()
    total.subtract(own)
    return total


def clip_alone(n: int, policy: str, build: Callable[[int], nn.Module] = layers) -> Counter[str]:
    model = build(n)
    clip = POLICIES[policy]()
    assert clip is not None
    for seed in range(3):
        backward(model, seed)
        gg.clip_(model, clip)
    backward(model, 3)
    return dispatched(lambda: gg.clip_(model, clip))


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_guard_step_dispatches_as_many_operators_for_1000_tensors_as_for_10(
    policy: str, impl: str
) -> None:
    small = guard_step_beyond_the_optimizer(SMALL, policy, impl)
    large = guard_step_beyond_the_optimizer(LARGE, policy, impl)
    grew = {op: large[op] - small[op] for op in large | small if large[op] != small[op]}
    assert not grew, f"{sum(small.values())} -> {sum(large.values())} operators: {grew}"
    assert 0 < sum(small.values()) <= 100


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_each_policys_clip_dispatches_as_many_operators_for_1000_tensors_as_for_10(
    policy: str,
) -> None:
    small = clip_alone(SMALL, policy)
    large = clip_alone(LARGE, policy)
    grew = {op: large[op] - small[op] for op in large | small if large[op] != small[op]}
    assert not grew, f"{sum(small.values())} -> {sum(large.values())} operators: {grew}"
    assert 0 < sum(small.values()) <= 100


class SideBySide(nn.ModuleList):
    """Layers applied to the same input, their outputs concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self], dim=1)


def distinct_layers(n: int) -> nn.Module:
    """``n`` Linear(8, 8 + i) side by side: every parameter tensor of its own shape."""
    torch.manual_seed(0)
    return SideBySide(nn.Linear(8, 8 + i) for i in range(n))


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_each_policys_clip_dispatches_as_many_operators_for_distinct_shapes(policy: str) -> None:
    small = clip_alone(SMALL, policy, distinct_layers)
    large = clip_alone(LARGE, policy, distinct_layers)
    grew = {op: large[op] - small[op] for op in large | small if large[op] != small[op]}
    assert not grew, f"{sum(small.values())} -> {sum(large.values())} operators: {grew}"
    assert 0 < sum(small.values()) <= 100
