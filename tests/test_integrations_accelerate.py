"""Accelerate: a real Accelerator(cpu=True) loop with accumulate, guarded by prepare_guard."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from gradguard.integrations.accelerate import prepare_guard  # noqa: E402

ACCUMULATE = 4
MICRO_BATCH = 8
WINDOWS = 8
NAN_WINDOW, NAN_MICRO_BATCH = 3, 2  # 1-based optimizer step, 1-based micro-batch in it


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons: each test starts from a clean state."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def data(nan: bool) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(MICRO_BATCH * ACCUMULATE * WINDOWS, 6, generator=g)
    y = x[:, :1] - 0.5 * x[:, 1:2]
    if nan:
        micro = (NAN_WINDOW - 1) * ACCUMULATE + (NAN_MICRO_BATCH - 1)
        x[micro * MICRO_BATCH + 3, 0] = float("nan")
    return torch.utils.data.TensorDataset(x, y)


def build(nan: bool) -> tuple[Accelerator, nn.Module, Any, Any]:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    loader = torch.utils.data.DataLoader(data(nan), batch_size=MICRO_BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def train_guarded(nan: bool, **options: Any) -> dict[str, Any]:
    accelerator, model, optimizer, loader = build(nan)
    guard = prepare_guard(accelerator, model, optimizer, log_every=4, **options)
    weights, reports = [], []
    for i, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            report = guard.step(loss, batch=i)
            optimizer.zero_grad()
        if not report.accumulating:
            reports.append(report)
            weights.append([p.detach().clone() for p in model.parameters()])
    syncs_before_close = guard.sync_count
    guard.close()
    return {
        "guard": guard,
        "reports": reports,
        "weights": weights,
        "syncs": syncs_before_close,
        "model": model,
    }


def train_reference() -> tuple[list[torch.Tensor], int]:
    """Accelerate's own loop, optimizer.step() inside accumulate: weights and step count."""
    accelerator, model, optimizer, loader = build(nan=False)
    steps: list[int] = []
    optimizer.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], len(steps)


def test_nan_in_one_micro_batch_skips_exactly_one_step_and_logs_one_event() -> None:
    run = train_guarded(nan=True, clip=gg.NormClip(1.0))
    guard, reports, weights = run["guard"], run["reports"], run["weights"]
    _, reference_steps = train_reference()
    assert guard.step_count == reference_steps == WINDOWS  # one per optimizer step
    assert [r.step for r in reports] == list(range(1, WINDOWS + 1))
    assert [int(r.step) for r in reports if bool(r.skipped)] == [NAN_WINDOW]
    nonfinite = [e for e in guard.events if e.kind == "nonfinite"]
    assert len(nonfinite) == 1
    event = nonfinite[0]
    assert event.step == NAN_WINDOW
    first = (NAN_WINDOW - 1) * ACCUMULATE
    assert event.batch == list(range(first, first + ACCUMULATE))  # the window's micro-batches
    for before, after in zip(weights[NAN_WINDOW - 2], weights[NAN_WINDOW - 1], strict=True):
        assert torch.equal(before, after)
    for before, after in zip(weights[NAN_WINDOW - 1], weights[NAN_WINDOW], strict=True):
        assert not torch.equal(before, after)
    assert all(torch.isfinite(p).all() for p in weights[-1])


def test_fused_path_kept_no_host_read_per_step() -> None:
    run = train_guarded(nan=True, clip=gg.NormClip(1.0))
    guard = run["guard"]
    assert guard.fused
    assert all(guard._steps.on_device)  # every optimizer step skipped or stepped on device
    # one transfer per drain (8 steps, log_every=4), none per step or per micro-batch
    assert run["syncs"] == WINDOWS // 4


def test_guarded_loop_steps_exactly_as_accelerate_does() -> None:
    run = train_guarded(nan=False)
    reference, _ = train_reference()
    for guarded, plain in zip(run["weights"][-1], reference, strict=True):
        assert torch.equal(guarded, plain)


def test_loss_logged_is_the_mean_of_the_micro_batches() -> None:
    accelerator, model, optimizer, loader = build(nan=False)
    guard = prepare_guard(accelerator, model, optimizer, log_every=WINDOWS)
    losses: list[float] = []
    logged: list[float] = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            losses.append(float(loss.detach()))
            accelerator.backward(loss)
            report = guard.step(loss)
            optimizer.zero_grad()
        if not report.accumulating:
            assert report.loss is not None
            logged.append(float(report.loss))
    guard.close()
    means = [sum(losses[i : i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(losses), 4)]
    assert logged == pytest.approx(means, rel=1e-6)


def test_names_are_the_model_own() -> None:
    accelerator, model, optimizer, _ = build(nan=False)
    guard = prepare_guard(accelerator, model, optimizer)
    assert guard.layer_names == ("0", "2")
    assert guard.optimizer is optimizer.optimizer
    guard.close()


def test_clipping_in_both_accelerate_and_the_guard_is_refused() -> None:
    accelerator, model, optimizer, loader = build(nan=False)
    guard = prepare_guard(accelerator, model, optimizer, clip=gg.NormClip(1.0))
    x, y = next(iter(loader))
    with accelerator.accumulate(model):
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        with pytest.raises(ConfigError, match=r"clip_grad_norm_\(\) and the guard's clip"):
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        with pytest.raises(ConfigError, match=r"clip_grad_value_\(\) and the guard's clip"):
            accelerator.clip_grad_value_(model.parameters(), 1.0)
    guard.close()
    accelerator.clip_grad_norm_(model.parameters(), 1.0)  # a closed guard no longer refuses


def test_accelerate_clipping_without_a_guard_policy_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    accelerator, model, optimizer, loader = build(nan=False)
    guard = prepare_guard(accelerator, model, optimizer)
    x, y = next(iter(loader))
    accelerator.backward(nn.functional.mse_loss(model(x), y))
    with caplog.at_level(logging.WARNING, logger="gradguard.integrations.accelerate"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    assert [r.getMessage().count("logged norms are the clipped ones") for r in caplog.records] == [
        1
    ]
    guard.close()


@pytest.mark.parametrize("option", ["accumulation_steps", "scaler"])
def test_options_the_accelerator_owns_are_refused(option: str) -> None:
    accelerator, model, optimizer, _ = build(nan=False)
    with pytest.raises(ConfigError, match=f"prepare_guard does not take {option}="):
        prepare_guard(accelerator, model, optimizer, **{option: 2})


def test_not_an_accelerator_is_refused() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="needs the loop's accelerate.Accelerator"):
        prepare_guard(object(), model, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]


def test_deepspeed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator, model, optimizer, _ = build(nan=False)
    monkeypatch.setattr(
        Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED)
    )
    with pytest.raises(ConfigError, match="does not support DEEPSPEED"):
        prepare_guard(accelerator, model, optimizer)


def test_prepared_scheduler_is_stepped_after_taken_steps_only() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = torch.utils.data.DataLoader(data(nan=True), batch_size=MICRO_BATCH)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    guard = prepare_guard(accelerator, model, optimizer, scheduler=scheduler, log_every=2)
    assert guard.scheduler is scheduler.scheduler
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            guard.step()
            optimizer.zero_grad()
    guard.close()
    # 8 optimizer steps, one skipped: the LR halved 7 times
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**7)


def test_guard_given_the_accelerated_optimizer_points_to_prepare_guard() -> None:
    _, model, optimizer, _ = build(nan=False)
    with pytest.raises(ConfigError, match="prepare_guard"):
        gg.Guard(model, optimizer)
