"""Gradient accumulation in a plain loop: guard.step after every micro-batch, one step logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from conftest import mlp
from gradguard.errors import ConfigError, GradGuardError
from gradguard.records import SAMPLE_COLUMNS

ACCUMULATE = 4
STEPS = 6
NAN_STEP, NAN_MICRO_BATCH = 3, 2


def make_model() -> nn.Module:
    return mlp(5, 16, 1)


def micro_batch(i: int, nan: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(8, 5, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    if nan and i == (NAN_STEP - 1) * ACCUMULATE + NAN_MICRO_BATCH - 1:
        x[2, 1] = float("nan")
    return x, y


def accumulate_loop(run_dir: Path | None = None, nan: bool = True) -> dict[str, Any]:
    """guard.step after each micro-batch; zero_grad after the optimizer steps only."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(
        model,
        optimizer,
        clip=gg.NormClip(1.0),
        accumulation_steps=ACCUMULATE,
        log_every=3,
        run_dir=run_dir,
        tensorboard=False,
    )
    reports, weights, losses = [], [], []
    for i in range(STEPS * ACCUMULATE):
        x, y = micro_batch(i, nan)
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        (loss / ACCUMULATE).backward()
        report = guard.step(loss, batch=i)
        reports.append(report)
        if not report.accumulating:
            optimizer.zero_grad()
            weights.append([p.detach().clone() for p in model.parameters()])
    guard.close()
    return {"guard": guard, "reports": reports, "weights": weights, "losses": losses}


def test_nan_in_one_micro_batch_is_one_skipped_step_and_one_event(tmp_path: Path) -> None:
    run = accumulate_loop(tmp_path / "run")
    guard, reports = run["guard"], run["reports"]
    assert guard.step_count == STEPS
    stepped = [r for r in reports if not r.accumulating]
    assert [r.step for r in stepped] == list(range(1, STEPS + 1))
    assert [r.step for r in stepped if bool(r.skipped)] == [NAN_STEP]
    events = [e for e in guard.events if e.kind == "nonfinite"]
    assert [e.step for e in events] == [NAN_STEP]
    first = (NAN_STEP - 1) * ACCUMULATE
    assert events[0].batch == list(range(first, first + ACCUMULATE))
    weights = run["weights"]
    for before, after in zip(weights[NAN_STEP - 2], weights[NAN_STEP - 1], strict=True):
        assert torch.equal(before, after)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["skipped"] for r in rows].count(True) == 1


def test_micro_batch_reports_say_they_only_accumulate() -> None:
    reports = accumulate_loop()["reports"]
    micro = [r for r in reports if r.accumulating]
    assert len(micro) == STEPS * (ACCUMULATE - 1)
    assert [r.step for r in reports[:ACCUMULATE]] == [1] * ACCUMULATE
    assert all(torch.isnan(r.grad_norm) and not bool(r.skipped) for r in micro)


def test_step_loss_is_the_mean_of_its_micro_batches() -> None:
    run = accumulate_loop(nan=False)
    losses = run["losses"]
    logged = [float(r.loss) for r in run["reports"] if not r.accumulating]
    means = [sum(losses[i : i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(losses), 4)]
    assert logged == pytest.approx(means, rel=1e-6)


def test_same_weights_as_stepping_only_after_the_last_micro_batch() -> None:
    guarded = accumulate_loop(nan=False)["weights"][-1]
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(model, optimizer, clip=gg.NormClip(1.0), log_every=3)
    for i in range(STEPS * ACCUMULATE):
        x, y = micro_batch(i, nan=False)
        (nn.functional.mse_loss(model(x), y) / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            guard.step()
            optimizer.zero_grad()
    guard.close()
    for a, b in zip(guarded, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_function_decides_the_last_micro_batch_of_each_step() -> None:
    # 10 micro-batches per epoch in steps of 4: the epoch's last step has 2.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    position = {"i": 0}

    def last_micro_batch() -> bool:
        i = position["i"]
        return (i + 1) % ACCUMULATE == 0 or i == 9

    guard = gg.Guard(model, optimizer, accumulation_steps=last_micro_batch, log_every=10)
    taken = []
    for i in range(10):
        position["i"] = i
        x, y = micro_batch(i, nan=False)
        nn.functional.mse_loss(model(x), y).backward()
        report = guard.step(batch=i)
        if not report.accumulating:
            taken.append(i)
            optimizer.zero_grad()
    guard.close()
    assert taken == [3, 7, 9]
    assert guard.step_count == 3


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "4", None])
def test_bad_accumulation_steps_are_refused(value: object) -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="accumulation_steps must be an int >= 1"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=value)  # type: ignore[arg-type]


def test_a_closed_guard_refuses_micro_batches() -> None:
    model = make_model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    guard.close()
    with pytest.raises(GradGuardError, match="closed"):
        guard.step()


def test_micro_batch_sample_losses_are_checked_and_joined() -> None:
    class Windows:
        def __init__(self) -> None:
            self.windows: list[Any] = []

        def open(self, meta: Any) -> None:
            pass

        def write(self, window: Any, events: Any) -> None:
            self.windows.append(window)

        def close(self) -> None:
            pass

    sink = Windows()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, accumulation_steps=2, log_every=1, sinks=[sink])
    with pytest.raises(ConfigError, match="sample_losses must be a non-empty tensor"):
        guard.step(sample_losses=torch.empty(0))
    for i in range(2):
        x, y = micro_batch(i, nan=False)
        per_example = nn.functional.mse_loss(model(x), y, reduction="none").mean(dim=1)
        per_example.mean().backward()
        guard.step(per_example.mean(), sample_losses=per_example.detach())
    guard.close()
    assert guard.step_count == 1
    samples = sink.windows[0].samples
    assert samples is not None
    assert samples[0][SAMPLE_COLUMNS.index("size")] == 16  # both micro-batches' examples
