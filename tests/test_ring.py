"""The guard's ring buffer: rows written on the device come back as the Window they describe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard._ring import StepBuffer
from gradguard.errors import ConfigError
from gradguard.records import SAMPLE_COLUMNS, SAMPLE_TOP, StepReport
from gradguard.stats import grad_stats


def stats_of(model: torch.nn.Module) -> object:
    model.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    return grad_stats(model)


def report(step: int, loss: float | None, skipped: bool) -> StepReport:
    return StepReport(
        step=step,
        grad_norm=torch.tensor(2.0 * step),
        clipped_norm=torch.tensor(1.0),
        scale=torch.tensor(0.5),
        skipped=torch.tensor(skipped),
        finite=torch.tensor(not skipped),
        loss=None if loss is None else torch.tensor(loss),
    )


def make() -> tuple[StepBuffer, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    names = tuple(n for n, _ in model.named_parameters())
    flags = (torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool))
    return StepBuffer(4, ("0", "1"), names, torch.device("cpu"), flags), model


def drain(buffer: StepBuffer, first_step: int) -> object:
    host = buffer.filled().double().numpy().reshape(buffer.count, buffer.width)
    buffer.count = 0
    return buffer.window(
        host,
        first_step,
        weight_norm=None,
        weight_norm_before=None,
        update_ratio=None,
        loss_scaled=False,
    )


def test_rows_come_back_as_their_window() -> None:
    buffer, model = make()
    stats = stats_of(model)
    buffer.note(batch=[7, 8], samples_given=False)
    buffer.record(report(5, 0.25, False), stats, None, lr=0.1, zeroed=None)
    buffer.note(batch=None, samples_given=False)
    buffer.record(report(6, None, True), stats, None, lr=torch.tensor(0.05), zeroed=None)
    window = drain(buffer, first_step=5)
    assert window.steps.tolist() == [5, 6]
    assert window.loss[0] == 0.25
    assert math.isnan(window.loss[1])
    assert window.loss_given.tolist() == [True, False]
    assert window.grad_norm.tolist() == [10.0, 12.0]
    assert window.skipped.tolist() == [False, True]
    assert window.lr[0] == 0.1  # a float LR is kept on the host, exact
    assert window.lr[1] == pytest.approx(0.05)  # a tensor LR went through the row
    np.testing.assert_allclose(window.per_layer[0], stats.per_layer.numpy(), rtol=1e-6)
    np.testing.assert_allclose(window.per_tensor[1], stats.per_tensor.numpy(), rtol=1e-6)
    assert window.batch == ([7, 8], None)
    assert window.samples is None


def test_zeroed_steps_log_what_was_seen_before_zeroing() -> None:
    buffer, model = make()
    stats = stats_of(model)
    seen = torch.full_like(stats.per_tensor, math.inf)
    buffer.note(None, False)
    buffer.record(report(1, 1.0, False), stats, None, lr=0.1, zeroed=seen)
    window = drain(buffer, 1)
    assert window.zeroed.tolist() == [True]
    assert window.finite.tolist() == [False]
    assert np.isinf(window.per_tensor[0]).all()


def test_sample_summary_matches_numpy_and_marks_steps_without_one() -> None:
    buffer, model = make()
    stats = stats_of(model)
    losses = torch.tensor([0.5, 3.0, math.nan, 0.7, 9.0, 0.6])
    summary = buffer.sample_summary(losses)
    finite = np.array([0.5, 3.0, 0.7, 9.0, 0.6])
    median = np.median(finite)
    column = dict(zip(SAMPLE_COLUMNS, summary.tolist(), strict=True))
    assert column["median"] == pytest.approx(float(np.sort(finite)[(len(finite) - 1) // 2]))
    assert column["mad"] == pytest.approx(
        float(np.sort(np.abs(finite - median))[(len(finite) - 1) // 2])
    )
    assert column["nonfinite"] == 1
    assert column["size"] == 6
    # a NaN example stands out first, then the largest losses
    top = [column[f"top{i}"] for i in range(SAMPLE_TOP)]
    assert math.isnan(top[0])
    assert top[1:] == pytest.approx([9.0, 3.0, 0.7])
    assert [column[f"position{i}"] for i in range(SAMPLE_TOP)] == [2, 4, 1, 3]
    buffer.note(None, True)
    buffer.record(report(1, 1.0, False), stats, summary, lr=0.1, zeroed=None)
    buffer.note(None, False)
    buffer.record(report(2, 1.0, False), stats, None, lr=0.1, zeroed=None)
    window = drain(buffer, 1)
    assert window.samples is not None
    assert window.samples[0].tolist() == pytest.approx(summary.tolist(), nan_ok=True)
    assert np.isnan(window.samples[1]).all()
    with pytest.raises(ConfigError, match="non-empty tensor"):
        buffer.sample_summary(torch.empty(0))


def test_discard_forgets_rows_and_notes() -> None:
    buffer, model = make()
    buffer.note([1], False)
    buffer.on_device.append(True)
    buffer.record(report(1, 1.0, False), stats_of(model), None, lr=0.1, zeroed=None)
    buffer.discard()
    assert buffer.count == 0
    assert buffer.on_device == []
    buffer.note(None, False)
    buffer.record(report(2, 2.0, False), stats_of(model), None, lr=0.2, zeroed=None)
    window = drain(buffer, 2)
    assert window.batch is None
    assert window.lr.tolist() == [0.2]
