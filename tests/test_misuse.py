"""Misuse never costs data: each case ends in a clear error or in correct handling."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError, GradGuardError


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _backward(model: nn.Module, nan_in: nn.Parameter | None = None) -> torch.Tensor:
    loss = model(torch.randn(6, 4)).square().mean()
    loss.backward()
    if nan_in is not None:
        assert nan_in.grad is not None
        nan_in.grad.fill_(math.nan)
    return loss


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- the guard measures what the optimizer steps -------------------------------------------


def test_an_optimizer_over_another_model_is_refused_naming_the_tensors() -> None:
    model, other = _model(), _model(1)
    with pytest.raises(ConfigError, match=r"steps 4 tensor\(s\) that are not parameters"):
        gg.Guard(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_an_optimizer_over_part_of_the_model_is_accepted() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)  # fine-tuning the head
    guard = gg.Guard(model, optimizer, detectors=None)
    _backward(model)
    guard.step()
    assert guard.step_count == 1


def test_a_param_group_of_another_model_added_later_is_refused_before_the_step() -> None:
    model, other = _model(), _model(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    optimizer.add_param_group({"params": list(other.parameters())})
    _backward(model)
    _backward(other, nan_in=other[0].weight)
    before = _weights(other)
    with pytest.raises(ConfigError, match="not parameters of the model"):
        guard.step()
    assert _unchanged(other, before)  # the NaN never reached the other model's weights
    assert guard.step_count == 0


def test_a_group_added_through_the_wrapped_optimizer_is_checked_too() -> None:
    model, other = _model(), _model(1)
    guard = gg.Guard(model, torch.optim.SGD(model[0].parameters(), lr=0.1), detectors=None)
    wrapped = guard.wrap()
    wrapped.add_param_group({"params": list(model[2].parameters())})  # the model's: fine
    _backward(model)
    wrapped.step()
    wrapped.add_param_group({"params": list(other.parameters())})
    _backward(model)
    with pytest.raises(ConfigError, match="not parameters of the model"):
        wrapped.step()


def test_a_module_added_after_the_guard_is_refused_before_its_nan_reaches_the_weights() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    _backward(model)
    guard.step()
    head = nn.Linear(1, 1)
    model.append(head)
    optimizer.add_param_group({"params": list(head.parameters())})
    optimizer.zero_grad()
    _backward(model, nan_in=head.weight)
    before = _weights(model)
    with pytest.raises(ConfigError, match=r"parameters the guard was not built with: 3\.weight"):
        guard.step()
    assert _unchanged(model, before)


def test_a_module_built_before_the_guard_and_added_after_is_noticed() -> None:
    model = _model()
    head = nn.Linear(1, 1)  # its parameters were registered before the guard existed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    model.add_module("head", head)
    _backward(model)
    with pytest.raises(ConfigError, match="head.weight"):
        guard.step()


def test_a_replaced_parameter_is_noticed() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    model[0].weight = nn.Parameter(torch.zeros(8, 4))
    _backward(model)
    with pytest.raises(ConfigError) as info:
        guard.step()
    assert "0.weight" in str(info.value)


def test_modules_made_elsewhere_cost_nothing_but_one_check() -> None:
    model = _model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=None)
    _model(3)  # an unrelated model built mid-run (e.g. for evaluation)
    for _ in range(3):
        guard.optimizer.zero_grad()
        _backward(model)
        guard.step()
    assert guard.step_count == 3


def test_the_refusal_is_a_gradguard_error() -> None:
    assert issubclass(ConfigError, GradGuardError)


def test_a_step_without_backward_is_refused_and_not_counted() -> None:
    model = _model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_every=2)
    with pytest.raises(GradGuardError, match=r"no gradients: was backward\(\) called\?"):
        guard.step()
    assert guard.step_count == 0
    _backward(model)
    guard.step()
    guard.optimizer.zero_grad(set_to_none=True)
    with pytest.raises(GradGuardError, match="step 2: no gradients"):
        guard.step()
    guard.close()
    assert guard.step_count == 1
    assert not any(e.cause == "dead_units" for e in guard.events)


# --- every step mode leaves a true record ---------------------------------------------------


def _rows(run_dir: object) -> list[dict[str, object]]:
    from gradguard.sinks import read_jsonl

    return read_jsonl(f"{run_dir}/metrics.jsonl")


def _logged_guard(model: nn.Module, nonfinite: Any, log_every: int, run_dir: object) -> gg.Guard:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return gg.Guard(
        model, optimizer, nonfinite=nonfinite, log_every=log_every, run_dir=run_dir,
        tensorboard=False,
    )  # fmt: skip


def test_raise_caught_by_the_loop_keeps_the_log_numbered_and_records_the_step(
    tmp_path: object,
) -> None:
    model = _model()
    guard = _logged_guard(model, "raise", 4, tmp_path)
    for step in range(1, 11):
        guard.optimizer.zero_grad()
        _backward(model, nan_in=model[0].bias if step == 3 else None)
        before = _weights(model)
        if step != 3:
            guard.step()
            continue
        with pytest.raises(GradGuardError, match="step 3: non-finite gradients"):
            guard.step()  # the loop catches it and goes on
        assert _unchanged(model, before)  # skipped: nothing stepped
    guard.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11)) == list(range(1, guard.step_count + 1))
    assert (rows[2]["skipped"], rows[2]["finite"]) == (True, False)
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert event.step == 3


def test_zero_mode_records_the_step_as_non_finite_and_zeroed_with_an_event(
    tmp_path: object,
) -> None:
    model = _model()
    guard = _logged_guard(model, "zero", 2, tmp_path)
    for step in range(1, 5):
        guard.optimizer.zero_grad()
        _backward(model, nan_in=model[2].weight if step == 2 else None)
        guard.step()
    guard.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = _rows(tmp_path)
    assert (rows[1]["finite"], rows[1]["skipped"], rows[1].get("zeroed")) == (False, False, True)
    assert "zeroed" not in rows[0]
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert (event.step, event.severity, event.layers) == (2, "warning", ("2.weight",))
    assert "zeroed" in event.message


# --- objects that belong to one guard ---------------------------------------------------------


def test_one_rollback_for_two_guards_is_refused() -> None:
    rollback = gg.Rollback(every=10)
    first, second = _model(), _model(1)
    gg.Guard(first, torch.optim.SGD(first.parameters(), lr=0.1), recovery=rollback)
    with pytest.raises(ConfigError, match="Rollback already belongs to another Guard"):
        gg.Guard(second, torch.optim.SGD(second.parameters(), lr=0.1), recovery=rollback)


def test_two_open_guards_on_one_optimizer_are_refused_until_the_first_closes() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gg.Guard(model, optimizer, detectors=None)
    with pytest.raises(ConfigError, match="optimizer .*already belongs to another Guard"):
        gg.Guard(model, optimizer, detectors=None)
    first.close()
    second = gg.Guard(model, optimizer, detectors=None)  # a closed guard lets go
    _backward(model)
    second.step()
    assert second.step_count == 1


@pytest.mark.parametrize("what", ["detector", "sink"])
def test_a_detector_or_sink_shared_by_two_guards_is_refused(what: str, tmp_path: object) -> None:
    from gradguard.detect import Spike
    from gradguard.sinks import JsonlSink

    shared: dict[str, object] = {
        "detector": {"detectors": [Spike()]},
        "sink": {"sinks": [JsonlSink(f"{tmp_path}/run")]},
    }
    kwargs: Any = shared[what]
    first, second = _model(), _model(1)
    owner = gg.Guard(first, torch.optim.SGD(first.parameters(), lr=0.1), **kwargs)
    with pytest.raises(ConfigError, match=f"this {what} .*already belongs to another Guard"):
        gg.Guard(second, torch.optim.SGD(second.parameters(), lr=0.1), **kwargs)
    owner.close()


def test_a_dropped_guard_in_a_reference_cycle_lets_its_optimizer_go() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gg.Guard(model, optimizer, detectors=None, recovery=gg.Rollback(every=10))  # a cycle
    guard = gg.Guard(model, optimizer, detectors=None)  # the loop's new guard
    _backward(model)
    guard.step()
    assert guard.step_count == 1
