"""The opt-in flat gradient buffer: bitwise the per-tensor path, and safe when views drop."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gradguard as gg
from gradguard.errors import ConfigError


def mlp(widths: tuple[int, ...] = (5, 7, 7, 7, 3), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers)


def batch(model: nn.Module, seed: int = 1) -> tuple[Tensor, Tensor]:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, first.in_features, generator=g), torch.randn(
        6, last.out_features, generator=g
    )


def backward(model: nn.Module, seed: int = 1, scale: float = 1.0) -> Tensor:
    x, y = batch(model, seed)
    first = next(model.parameters())
    x, y = x.to(first.device, first.dtype), y.to(first.device, first.dtype)
    loss = nn.functional.mse_loss(model(x), y) * scale
    loss.backward()
    return loss.detach()


def pair(model: nn.Module) -> tuple[nn.Module, nn.Module, gg.FlatGrads]:
    """The model and a deep copy whose gradients are flat."""
    flat_model = copy.deepcopy(model)
    return model, flat_model, gg.flatten_grads_(flat_model)


def on_flat_path(stats: gg.GradStats, flat: gg.FlatGrads) -> bool:
    """Whether the statistics came from the buffers: each group is its one buffer."""
    groups = stats.grad_groups
    return len(groups) == len(flat.buffers) and all(
        len(g) == 1 and g[0] is b for g, b in zip(groups, flat.buffers, strict=True)
    )


def assert_same_stats(a: gg.GradStats, b: gg.GradStats, exact: bool = True) -> None:
    if exact:
        assert torch.equal(a.per_tensor, b.per_tensor)
        assert torch.equal(a.total, b.total)
    torch.testing.assert_close(b.per_tensor, a.per_tensor, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(b.total, a.total, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(b.per_layer, a.per_layer, rtol=1e-6, atol=0.0)
    assert bool(a.finite) == bool(b.finite)
    assert a.names == b.names


def same_grads(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@contextmanager
def flat_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list[warnings.WarningMessage] = []
        yield found
    found.extend(w for w in caught if "flat gradient buffer" in str(w.message))


# --- the buffer itself ------------------------------------------------------------------


def test_grads_become_views_in_parameter_order_and_keep_existing_values() -> None:
    model = mlp()
    backward(model)
    before = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    flat = gg.flatten_grads_(model)
    (buffer,) = flat.buffers
    assert buffer.numel() == sum(p.numel() for p in model.parameters())
    for p, old, offset, length in zip(
        model.parameters(), before, flat.offsets, flat.lengths, strict=True
    ):
        assert p.grad is not None
        assert torch.equal(p.grad, old)
        assert p.grad.data_ptr() == buffer[offset:].data_ptr()
        assert p.grad.numel() == length
    assert flat.attached()
    assert len(flat) == 8
    assert "8 tensors in 1 buffers" in repr(flat)


@pytest.mark.parametrize("mode", ["plain", "accumulate", "autocast"])
def test_backward_accumulates_into_the_views(mode: str) -> None:
    model, flat_model, flat = pair(mlp())
    for m in (model, flat_model):
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                backward(m)
        else:
            for seed in range(3 if mode == "accumulate" else 1):
                backward(m, seed)
    assert flat.attached()
    assert same_grads(model, flat_model)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in flat.params)


def test_create_graph_replaces_the_views_and_the_measurement_falls_back() -> None:
    model, flat_model, flat = pair(mlp())
    backward(model)
    x, y = batch(flat_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own create_graph reference-cycle warning
        nn.functional.mse_loss(flat_model(x), y).backward(create_graph=True)
    assert not flat.attached()
    with flat_warnings() as found:
        stats = gg.grad_stats(flat_model)
    assert len(found) == 1
    assert not on_flat_path(stats, flat)
    assert_same_stats(gg.grad_stats(model), stats)
    for p in flat_model.parameters():
        p.grad = None  # break the reference cycle create_graph made


def test_zero_zeroes_the_buffers_and_keeps_the_views() -> None:
    _, flat_model, flat = pair(mlp())
    backward(flat_model)
    views = [p.grad for p in flat_model.parameters()]
    flat.zero_()
    assert all(p.grad is v for p, v in zip(flat_model.parameters(), views, strict=True))
    assert not bool(flat.buffers[0].any())


# --- grad_stats and clipping equal the per-tensor path ------------------------------------


class TwoDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 4).double()
        self.c = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.b(self.a(x).double()).float())


def grads_for(model: nn.Module, seed: int = 1) -> None:
    if isinstance(model, TwoDtypes):
        g = torch.Generator().manual_seed(seed)
        model(torch.randn(6, 5, generator=g)).square().sum().backward()
    else:
        backward(model, seed)


@pytest.mark.parametrize(
    "make",
    [mlp, lambda: mlp((3, 3, 3, 3, 3, 3, 3)), lambda: mlp().double(), lambda: mlp().bfloat16()],
    ids=["fp32", "equal-segments", "fp64", "bf16"],
)
def test_norms_equal_the_per_tensor_path(make: Callable[[], nn.Module]) -> None:
    model, flat_model, flat = pair(make())
    for m in (model, flat_model):
        grads_for(m)
    a, b = gg.grad_stats(model), gg.grad_stats(flat_model)
    assert on_flat_path(b, flat)
    assert_same_stats(a, b)
    assert (a.per_tensor_fp64 is None) == (b.per_tensor_fp64 is None)
    if a.per_tensor_fp64 is not None:
        assert b.per_tensor_fp64 is not None
        assert torch.equal(a.per_tensor_fp64, b.per_tensor_fp64)


def test_mixed_dtypes_get_one_buffer_each() -> None:
    model, flat_model, flat = pair(TwoDtypes())
    assert [b.dtype for b in flat.buffers] == [torch.float32, torch.float64]
    assert flat.buffer_index == (0, 0, 1, 1, 0, 0)
    for m in (model, flat_model):
        grads_for(m)
    a, b = gg.grad_stats(model), gg.grad_stats(flat_model)
    assert on_flat_path(b, flat)
    assert_same_stats(a, b)
    assert b.per_tensor_fp64 is not None
    assert a.per_tensor_fp64 is not None
    assert torch.equal(a.per_tensor_fp64, b.per_tensor_fp64)
    for policy in (gg.NormClip(0.01), gg.ValueClip(0.01)):
        gg.clip_(model, policy)
        gg.clip_(flat_model, policy)
        assert same_grads(model, flat_model)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=7),
    seed=st.integers(0, 1000),
    max_norm=st.floats(1e-3, 10.0),
    clip_value=st.floats(1e-3, 1.0),
)
def test_clipped_gradients_are_bitwise_those_of_the_per_tensor_path(
    widths: list[int], seed: int, max_norm: float, clip_value: float
) -> None:
    model, flat_model, flat = pair(mlp(tuple(widths), seed))
    for m in (model, flat_model):
        backward(m, seed, scale=10.0)
    a, b = gg.grad_stats(model), gg.grad_stats(flat_model)
    assert on_flat_path(b, flat)
    assert_same_stats(a, b)
    assert torch.equal(
        gg.clip_(model, gg.NormClip(max_norm), a), gg.clip_(flat_model, gg.NormClip(max_norm), b)
    )
    assert same_grads(model, flat_model)
    gg.clip_(model, gg.ValueClip(clip_value))
    gg.clip_(flat_model, gg.ValueClip(clip_value))
    assert same_grads(model, flat_model)
    assert flat.attached()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_norms_and_clipping_equal_the_per_tensor_path() -> None:
    model, flat_model, flat = pair(mlp().cuda())
    for m in (model, flat_model):
        backward(m, scale=10.0)
    a, b = gg.grad_stats(model), gg.grad_stats(flat_model)
    assert on_flat_path(b, flat)
    assert_same_stats(a, b)  # the fused per-tensor kernel on both paths: bitwise
    gg.clip_(model, gg.NormClip(0.01), a)
    gg.clip_(flat_model, gg.NormClip(0.01), b)
    assert same_grads(model, flat_model)


def test_a_parameter_without_gradient_in_a_step_reads_zero() -> None:
    model, flat_model, flat = pair(mlp())
    for m in (model, flat_model):
        m[0].requires_grad_(False)  # type: ignore[index]
        backward(m)
        m[0].requires_grad_(True)  # type: ignore[index]
    a, b = gg.grad_stats(model), gg.grad_stats(flat_model)
    assert on_flat_path(b, flat)
    assert float(b.per_tensor[0]) == 0.0 == float(a.per_tensor[0])  # None there, zeros here
    assert_same_stats(a, b)


def test_stale_statistics_are_refused_on_the_flat_path() -> None:
    _, flat_model, _ = pair(mlp())
    backward(flat_model)
    stats = gg.grad_stats(flat_model)
    gg.clip_(flat_model, gg.NormClip(1.0), stats)  # fresh: accepted
    backward(flat_model)  # accumulates in place: the buffer's version moves
    with pytest.raises(ConfigError, match="stale GradStats"):
        gg.clip_(flat_model, gg.NormClip(1.0), stats)


# --- dropped views --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["optimizer", "model"])
def test_dropped_views_warn_once_fall_back_and_never_read_the_stale_buffer(how: str) -> None:
    model, flat_model, flat = pair(mlp())
    optimizer = torch.optim.SGD(flat_model.parameters(), lr=0.1)
    backward(flat_model)
    if how == "optimizer":
        optimizer.zero_grad()  # set_to_none=True, torch's default
    else:
        flat_model.zero_grad()
    flat.buffers[0].fill_(float("nan"))  # a stale buffer must never be read as the gradient
    with flat_warnings() as found:
        for seed in (2, 3):
            model.zero_grad()
            flat_model.zero_grad()
            backward(model, seed)
            backward(flat_model, seed)
            a, b = gg.grad_stats(model), gg.grad_stats(flat_model)
            assert not on_flat_path(b, flat)
            assert_same_stats(a, b)
            assert bool(b.finite)
    assert len(found) == 1
    message = str(found[0].message)
    assert "set_to_none=True" in message
    assert "guard.zero_grad()" in message
    assert "zero_grad(set_to_none=False)" in message
    flat.zero_()  # re-attaches, zeroed: nothing stale
    assert flat.attached()
    assert not bool(flat.buffers[0].any())
    backward(flat_model, 4)
    model.zero_grad()
    backward(model, 4)
    stats = gg.grad_stats(flat_model)
    assert on_flat_path(stats, flat)
    assert_same_stats(gg.grad_stats(model), stats)


def test_zero_grad_set_to_none_false_keeps_the_views() -> None:
    _, flat_model, flat = pair(mlp())
    optimizer = torch.optim.AdamW(flat_model.parameters(), foreach=True)
    backward(flat_model)
    optimizer.zero_grad(set_to_none=False)
    flat_model.zero_grad(set_to_none=False)
    assert flat.attached()
    assert not bool(flat.buffers[0].any())


def test_freezing_after_flattening_warns_and_measures_the_trainable_ones() -> None:
    model, flat_model, flat = pair(mlp())
    for m in (model, flat_model):
        m[2].requires_grad_(False)  # type: ignore[index]
        backward(m)
    with flat_warnings() as found:
        b = gg.grad_stats(flat_model)
    assert len(found) == 1
    assert "flatten_grads_(model) again" in str(found[0].message)
    assert_same_stats(gg.grad_stats(model), b)


# --- refused inputs -----------------------------------------------------------------------


def test_unsupported_inputs_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="sparse"):
        gg.flatten_grads_(nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1)))
    dense = nn.Embedding(10, 3)
    dense(torch.tensor([1, 2])).sum().backward()
    dense.weight.grad = dense.weight.grad.to_sparse()  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="sparse"):
        gg.flatten_grads_(dense)
    with pytest.raises(ConfigError, match="meta device"):
        gg.flatten_grads_(nn.Linear(2, 2, device="meta"))
    with pytest.raises(ConfigError, match="nn.Module"):
        gg.flatten_grads_([("w", torch.zeros(2, requires_grad=True))])  # type: ignore[arg-type]
    bucket_views = nn.Linear(2, 2)
    bucket_views.gradient_as_bucket_view = True  # what DDP(..., gradient_as_bucket_view=True) has
    with pytest.raises(ConfigError, match="gradient_as_bucket_view=False"):
        gg.flatten_grads_(bucket_views)
    with pytest.raises(gg.UnsupportedModelError):
        gg.flatten_grads_(nn.Linear(2, 2).requires_grad_(False))


def test_frozen_parameters_stay_out_of_the_buffer() -> None:
    model = mlp()
    model[0].requires_grad_(False)  # type: ignore[index]
    flat = gg.flatten_grads_(model)
    assert len(flat) == 6
    assert model[0].weight.grad is None


# --- the guard -----------------------------------------------------------------------------


def optimizers() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "adamw-foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True),
        "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True),
    }


@pytest.mark.parametrize("name", sorted(optimizers()))
def test_guard_steps_and_skips_bitwise_like_the_per_tensor_path(name: str) -> None:
    make = optimizers()[name]
    plain, flat_model = mlp(), mlp()
    guards = [
        gg.Guard(m, make(m), clip=gg.NormClip(0.05), detectors=None, flat_grads=flat)
        for m, flat in ((plain, False), (flat_model, True))
    ]
    flat = guards[1].flat_grads
    assert flat is not None
    assert guards[0].flat_grads is None
    with flat_warnings() as found:
        for step in range(6):
            reports = []
            for model, guard in zip((plain, flat_model), guards, strict=True):
                guard.zero_grad()
                loss = backward(model, step)
                if step == 3:
                    model[2].weight.grad[0, 0] = float("nan")  # type: ignore[index]
                before = [p.detach().clone() for p in model.parameters()]
                reports.append(guard.step(loss))
                if step == 3:
                    assert all(
                        torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
                    )
            assert bool(reports[0].skipped) == bool(reports[1].skipped) == (step == 3)
            assert torch.equal(reports[0].scale, reports[1].scale)
            assert same_weights(plain, flat_model)
    assert not found
    assert flat.attached()
    for guard in guards:
        guard.close()


def test_guard_zero_grad_keeps_the_views_and_reattaches_dropped_ones() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None, flat_grads=True)
    flat = guard.flat_grads
    assert flat is not None
    backward(model)
    guard.zero_grad()
    assert flat.attached()
    assert not bool(flat.buffers[0].any())
    optimizer.zero_grad()  # drops the views
    assert not flat.attached()
    guard.zero_grad()
    assert flat.attached()
    loss = backward(model)
    guard.step(loss)
    with pytest.raises(gg.GradGuardError, match="already used"):
        guard.step(loss)  # same gradients, no backward since: refused as without the buffer
    guard.close()


def test_a_wrapped_optimizers_zero_grad_keeps_the_views() -> None:
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, detectors=None, flat_grads=True)
    wrapped = guard.wrap()
    flat = guard.flat_grads
    assert flat is not None
    for seed in (1, 2, 3):  # a framework's loop: zero_grad (set_to_none), backward, step
        wrapped.zero_grad()
        assert flat.attached()
        backward(model, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "views dropped" warning
            wrapped.step()
    assert flat.attached()
    assert guard.step_count == 3
    guard.close()


def test_guard_zero_grad_without_flat_grads_sets_them_to_none() -> None:
    model = mlp()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=None)
    backward(model)
    guard.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    guard.close()


# --- DDP ------------------------------------------------------------------------------------

SCRIPT = Path(__file__).with_name("distributed_scenarios.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_with_flat_grads_is_bitwise_the_per_tensor_path(tmp_path: Path) -> None:
    out = tmp_path / "flat.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "flat", "ddp", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["flat_path"]
        assert rank["still_views"]
        assert not rank["warnings"]
        assert rank["stats_equal"]
        assert rank["grads_equal"]
        assert rank["weights_equal"]
        assert rank["skipped"] == [[step == 6, step == 6] for step in range(20)]
        assert rank["replicas_equal"]
