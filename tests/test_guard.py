"""Guard: exact skips for every optimizer and implementation, modes, AMP, syncs, wrapping."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from conftest import mlp
from gradguard.errors import ConfigError, GradGuardError

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "Adam": (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5, "centered": True}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
}
HAS_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}
IMPLEMENTATIONS = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
CASES = [
    (opt, impl)
    for opt in OPTIMIZERS
    for impl in IMPLEMENTATIONS
    if impl != "fused" or opt in HAS_FUSED
]


def make_model(seed: int = 0) -> nn.Module:
    return mlp(5, 16, 16, 1, activations=("tanh", "relu"), seed=seed)


def make_optimizer(model: nn.Module, name: str, impl: str) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    return cls(model.parameters(), **kwargs, **IMPLEMENTATIONS[impl])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 5, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def backward(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
) -> dict[str, Any]:
    def clone(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: clone(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(clone(v) for v in value)
        return value

    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "optimizer": clone(optimizer.state_dict()),
        "scheduler": None if scheduler is None else clone(scheduler.state_dict()),
    }


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, path
        assert (
            torch.equal(a, b)
            or (a.isnan() == b.isnan()).all()
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), path
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}.{key}")
        return
    if isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
        return
    assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), path


def assert_all_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        assert torch.isfinite(p).all()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all()


@pytest.mark.parametrize(("name", "impl"), CASES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skipped_step_leaves_weights_optimizer_and_scheduler_bitwise_unchanged(
    name: str, impl: str, bad: float
) -> None:
    model = make_model()
    optimizer = make_optimizer(model, name, impl)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    guard = gg.Guard(model, optimizer, scheduler=scheduler, detectors=None, log_every=4)
    for step in range(3):
        optimizer.zero_grad()
        guard.step(backward(model, step))
    guard.flush()
    before = snapshot(model, optimizer, scheduler)

    optimizer.zero_grad()
    loss = backward(model, 3)
    model[2].weight.grad[3, 4] = bad  # type: ignore[index]
    report = guard.step(loss)
    guard.flush()  # the fused path settles the scheduler at the drain
    assert bool(report.skipped)
    assert not bool(report.finite)
    assert_bitwise_equal(snapshot(model, optimizer, scheduler), before)

    optimizer.zero_grad()
    report = guard.step(backward(model, 4))
    guard.flush()
    assert not bool(report.skipped)
    after = snapshot(model, optimizer, scheduler)
    assert not torch.equal(after["params"][0], before["params"][0])
    assert after["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] + 1
    assert_all_finite(model, optimizer)


class _LrSink:
    """Keeps the LR the guard logged for each step."""

    def __init__(self) -> None:
        self.lr: list[float] = []

    def open(self, meta: Any) -> None:
        pass

    def write(self, window: Any, events: Any) -> None:
        self.lr += window.lr.tolist()

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("impl", "tensor_lr"), [("foreach", False), ("fused", False), ("fused", True)]
)  # a tensor LR needs fused (or capturable) Adam
def test_the_logged_lr_is_the_one_each_step_used(impl: str, tensor_lr: bool) -> None:
    """The scheduler steps inside guard.step: the LR is read before it, not after."""
    model = make_model()
    lr: Any = torch.tensor(0.1) if tensor_lr else 0.1
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, **IMPLEMENTATIONS[impl])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    sink = _LrSink()
    guard = gg.Guard(model, optimizer, scheduler=scheduler, sinks=[sink], log_every=2)
    used = []
    for step in range(4):
        used.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.zero_grad()
        guard.step(backward(model, step))
    guard.close()
    assert used == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
    assert sink.lr == pytest.approx(used)


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_guarded_run_equals_the_plain_loop_when_nothing_goes_wrong(name: str, impl: str) -> None:
    plain, guarded = make_model(), make_model()
    plain_opt = make_optimizer(plain, name, impl)
    guarded_opt = make_optimizer(guarded, name, impl)
    guard = gg.Guard(guarded, guarded_opt, detectors=None, log_every=3)
    for step in range(7):
        plain_opt.zero_grad()
        backward(plain, step)
        plain_opt.step()
        guarded_opt.zero_grad()
        guard.step(backward(guarded, step))
    for a, b in zip(plain.parameters(), guarded.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_a_skipped_first_step_leaves_only_the_state_a_first_step_starts_from(impl: str) -> None:
    model, reference = make_model(), make_model()
    optimizer = make_optimizer(model, "SGD", impl)
    ref_opt = make_optimizer(reference, "SGD", impl)
    guard = gg.Guard(model, optimizer, detectors=None)
    loss = backward(model, 0)
    model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
    assert bool(guard.step(loss).skipped)
    for step in range(1, 5):  # afterwards, the run equals one that never saw the bad step
        optimizer.zero_grad()
        guard.step(backward(model, step))
        ref_opt.zero_grad()
        backward(reference, step)
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nonfinite_zero_zeroes_only_the_offending_tensor_and_steps() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, nonfinite="zero", detectors=None)
    before = [p.detach().clone() for p in model.parameters()]
    loss = backward(model, 0)
    model[2].weight.grad[0, 0] = math.inf  # type: ignore[index]
    report = guard.step(loss)
    assert not bool(report.skipped)
    assert torch.isfinite(report.grad_norm)
    names = [n for n, _ in model.named_parameters()]
    for name, old, new in zip(names, before, model.parameters(), strict=True):
        if name == "2.weight":
            assert torch.equal(old, new)
        else:
            assert not torch.equal(old, new), name


def test_nonfinite_raise_names_the_parameters_and_the_fix() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, nonfinite="raise", detectors=None)
    loss = backward(model, 0)
    model[4].bias.grad[0] = math.nan  # type: ignore[index]
    with pytest.raises(GradGuardError, match=r"4\.bias.*NormClip"):
        guard.step(loss)


@pytest.mark.parametrize("fused", [False, True])
def test_amp_scaler_and_guard_agree_on_skipped_steps(fused: bool) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = gg.Guard(model, optimizer, scaler=scaler, detectors=None, log_every=2)
    for step in range(2):
        optimizer.zero_grad()
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        assert not bool(guard.step(loss).skipped)
    before = snapshot(model, optimizer)
    scale_before = scaler.get_scale()
    optimizer.zero_grad()
    x, y = batch(2)
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].bias.grad[0] = math.inf  # type: ignore[index]
    report = guard.step(loss)
    assert bool(report.skipped)
    assert_bitwise_equal(snapshot(model, optimizer), before)
    assert scaler.get_scale() == scale_before * 0.5  # the scaler saw the skip too
    optimizer.zero_grad()
    x, y = batch(3)
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    assert not bool(guard.step(loss).skipped)
    assert not torch.equal(model[0].weight, before["params"][0])


def test_scaled_gradients_are_measured_unscaled() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    reference = make_model()
    backward(reference, 0)
    expected = gg.grad_stats(reference).total
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    guard = gg.Guard(model, optimizer, scaler=scaler, detectors=None)
    x, y = batch(0)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    torch.testing.assert_close(guard.step().grad_norm, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("make", "limit"),
    [
        (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True), 20),
        (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True), 1020),
    ],
    ids=["fused", "non-fused"],
)
def test_sync_budget_over_1000_steps(
    make: Callable[[nn.Module], torch.optim.Optimizer], limit: int
) -> None:
    model = make_model()
    optimizer = make(model)
    guard = gg.Guard(model, optimizer, clip=gg.NormClip(1.0), log_every=50)
    x, y = batch(0)
    for _ in range(1000):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
    assert guard.sync_count <= limit
    assert guard.sync_count >= 20  # one per drain at least: the count is real


def test_report_holds_device_tensors_and_clip_is_applied() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gg.Guard(model, optimizer, clip=gg.NormClip(1e-3), detectors=None)
    loss = backward(model, 0)
    norm = gg.grad_stats(model).total
    report = guard.step(loss)
    assert report.step == 1
    torch.testing.assert_close(report.grad_norm, norm)
    assert float(report.clipped_norm) == pytest.approx(1e-3, rel=1e-3)
    assert float(gg.grad_stats(model).total) == pytest.approx(1e-3, rel=1e-3)
    assert report.loss is not None
    assert float(report.loss) == float(loss.detach())


def test_wrapped_optimizer_runs_the_guard_with_a_closure() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None, log_every=1)
    wrapped = guard.wrap()
    assert isinstance(wrapped, torch.optim.Optimizer)
    assert wrapped.param_groups is optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)

    def closure() -> torch.Tensor:
        wrapped.zero_grad()
        loss = backward(model, 0)
        model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    wrapped.step(closure)
    scheduler.step()
    assert guard.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert [e.kind for e in guard.events] == []  # detectors=None
    assert guard.sync_count >= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nonfinite": "ignore"}, "nonfinite must be 'skip', 'raise' or 'zero'"),
        ({"log_every": 0}, "log_every must be an int in \\[1, 10000\\]"),
        ({"clip": 1.0}, r"gg.NormClip\(1.0\)"),
        ({"detectors": "all"}, "detectors must be 'default'"),
        ({"detectors": [object()]}, "detector objects"),
        ({"recovery": object()}, "recovery must be"),
        ({"on_event": 3}, "on_event must be a callable"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    model = make_model()
    with pytest.raises(ConfigError, match=message):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_model_and_optimizer_types_are_checked() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="model must be an nn.Module"):
        gg.Guard("model", torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        gg.Guard(model, "sgd")  # type: ignore[arg-type]


def test_loss_must_be_a_scalar() -> None:
    model = make_model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=None)
    backward(model, 0)
    with pytest.raises(ConfigError, match=r"pass loss.mean\(\)"):
        guard.step(torch.ones(3))


def test_closed_guard_refuses_to_step() -> None:
    model = make_model()
    with gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=None) as guard:
        backward(model, 0)
        guard.step()
    with pytest.raises(GradGuardError, match="closed"):
        guard.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adamw_step_does_not_sync_on_cuda_between_drains() -> None:
    model = make_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, optimizer, clip=gg.NormClip(1.0), log_every=50)
    x, y = (t.cuda() for t in batch(0))
    for step in range(120):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        drains_now = (step + 1) % 50 == 0
        if step > 2 and not drains_now:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            guard.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert guard.sync_count <= 3


def _layer_weight_norms(model: nn.Module) -> list[float]:
    """Per-layer parameter norms, computed directly (the reference)."""
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        squares[layer] = squares.get(layer, 0.0) + float(p.detach().double().pow(2).sum())
    return [math.sqrt(v) for v in squares.values()]


def test_each_drain_carries_the_layers_weight_norms_now_and_at_the_last_drain() -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    at_start = _layer_weight_norms(model)
    windows: list[Any] = []
    guard = gg.Guard(model, optimizer, log_every=5, detectors=None)
    drain = guard._window

    def keep(*args: Any, **kwargs: Any) -> Any:
        window = drain(*args, **kwargs)
        windows.append(window)
        return window

    guard._window = keep  # type: ignore[method-assign]
    expected_now = []
    for step in range(1, 11):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        guard.step()
        if step % 5 == 0:
            expected_now.append(_layer_weight_norms(model))
    first, second = windows
    assert first.weight_norm_before.tolist() == pytest.approx(at_start, rel=1e-6)
    assert first.weight_norm.tolist() == pytest.approx(expected_now[0], rel=1e-6)
    assert second.weight_norm_before is first.weight_norm
    assert second.weight_norm.tolist() == pytest.approx(expected_now[1], rel=1e-6)
    assert expected_now[0] != pytest.approx(at_start, rel=1e-3)  # the weights did move
    assert guard.sync_count == 10 + 2  # one read per step, one transfer per drain: no more
    state = guard.state_dict()
    guard.close()  # one open guard per optimizer
    resumed = gg.Guard(model, optimizer, log_every=5, detectors=None)
    resumed.load_state_dict(state)
    assert resumed._last_weight_norm.tolist() == second.weight_norm.tolist()
