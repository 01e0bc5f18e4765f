"""Clipping policies against torch, the zclip package, exact percentiles and the AGC formula."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from conftest import mlp
from gradguard.clip import unitwise_norm
from gradguard.errors import ConfigError


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    model = mlp(6, 16, 16, 3, activations=("tanh", "relu"), seed=seed).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3
    return model


def twin(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        b.grad = None if a.grad is None else a.grad.clone()
    return other


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def global_norm(model: nn.Module) -> float:
    return math.sqrt(
        sum(float(p.grad.double().norm()) ** 2 for p in model.parameters() if p.grad is not None)
    )


# --- NormClip and ValueClip against torch ------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_normclip_equals_torch_clip_grad_norm_fp32(norm_type: float, max_norm: float) -> None:
    ours = make_model()
    ours[2].bias.grad = None  # None grads are skipped by both
    ref = twin(ours)
    scale = gg.clip_(ours, gg.NormClip(max_norm, norm_type=norm_type))
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type, foreach=True)
    assert float(scale) == pytest.approx(min(1.0, max_norm / (float(total) + 1e-6)), rel=1e-6)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        if a is None or b is None:
            assert a is None
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_normclip_bf16_equals_torch_on_the_same_values(norm_type: float) -> None:
    """bf16: ours accumulates the norm in fp32; compare with torch run in fp32 on the same values.

    torch's own bf16 path rounds the norm to bf16 first (up to 0.4 % off), so its
    coefficient can differ from the exact one by a bf16 ulp; we check that too, loosely.
    """
    ours = make_model(torch.bfloat16)
    ref32 = twin(ours).float()
    for a, b in zip(ours.parameters(), ref32.parameters(), strict=True):
        assert a.grad is not None
        b.grad = a.grad.float()
    ref16 = twin(ours)
    scale = gg.clip_(ours, gg.NormClip(0.5, norm_type=norm_type))
    total32 = torch.nn.utils.clip_grad_norm_(ref32.parameters(), 0.5, norm_type, foreach=True)
    coef = min(1.0, 0.5 / (float(total32) + 1e-6))
    assert float(scale) == pytest.approx(coef, rel=1e-6)
    for p, r in zip(ours.parameters(), ref32.parameters(), strict=True):
        assert p.grad is not None
        assert r.grad is not None
        expected = r.grad.to(torch.bfloat16).float()  # fp32 reference rounded once to bf16
        torch.testing.assert_close(p.grad.float(), expected, rtol=1e-6, atol=0)
    torch.nn.utils.clip_grad_norm_(ref16.parameters(), 0.5, norm_type, foreach=True)
    for p, r in zip(ours.parameters(), ref16.parameters(), strict=True):
        assert p.grad is not None
        assert r.grad is not None
        torch.testing.assert_close(p.grad.float(), r.grad.float(), rtol=2**-7, atol=0)


def test_fp16_overflowing_norm_is_scaled_while_torch_zeroes_it() -> None:
    ours = nn.Linear(1000, 1, bias=False).half()
    ours.weight.grad = torch.full((1, 1000), 1e4, dtype=torch.float16)
    ref = twin(ours)
    gg.clip_(ours, gg.NormClip(1.0))
    assert ours.weight.grad is not None
    assert float(ours.weight.grad.float().norm()) == pytest.approx(1.0, rel=1e-3)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
    assert ref.weight.grad is not None
    assert float(ref.weight.grad.float().abs().max()) == 0.0  # torch's fp16 norm is inf


def test_normclip_rescales_an_fp32_gradient_whose_norm_overflows() -> None:
    model = nn.Linear(10, 1, bias=False)
    model.weight.grad = torch.full((1, 10), 1e25)
    gg.clip_(model, gg.NormClip(1.0))
    assert model.weight.grad is not None
    assert float(model.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)


# --- fp64 gradients: measured and scaled in fp64, as torch does ---------------------------


def fp64_model(magnitude: float, seed: int = 0) -> nn.Module:
    model = make_model(torch.float64, seed=seed)
    for p in model.parameters():
        assert p.grad is not None
        p.grad.mul_(magnitude)
    return model


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("magnitude", [1.0, 1e30, 1e38, 1e100])
def test_normclip_equals_torch_on_fp64_gradients_beyond_the_fp32_range(
    magnitude: float, norm_type: float
) -> None:
    """1e38 and up: the fp64 norm exceeds fp32's 3.4e38, which once left them unclipped."""
    ours = fp64_model(magnitude)
    ref = twin(ours)
    stats = gg.grad_stats(ours)
    scale = gg.clip_(ours, gg.NormClip(0.5, norm_type=norm_type), stats)
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, norm_type, foreach=True)
    assert torch.isfinite(total)
    coefficient = min(1.0, 0.5 / (float(total) + 1e-6))
    assert float(scale) == pytest.approx(coefficient, rel=1e-6)  # fp32: 0 below 1.4e-45
    for a, b in zip(grads(ours), grads(ref), strict=True):
        assert a is not None
        assert b is not None
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    if norm_type == 2.0:
        assert float(stats.total_fp64) == pytest.approx(float(total), rel=1e-12)  # type: ignore[arg-type]
        clipped = math.sqrt(sum(float(g.norm()) ** 2 for g in grads(ours) if g is not None))
        assert clipped == pytest.approx(float(total) * coefficient, rel=1e-9)


def test_normclip_on_unresolved_fp64_stats_and_through_the_policy() -> None:
    ours = fp64_model(1e38)
    ref = twin(ours)
    gg.NormClip(1.0).clip_(gg.grad_stats(ours, resolve=False))
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_fp64_gradients_whose_squares_overflow_fp64_are_clipped_where_torch_zeroes_them() -> None:
    """1e160: the sum of squares leaves even fp64. torch's norm is inf and its coefficient
    0; ours is measured robustly (max-abs scaling) and the gradient keeps its direction."""
    ours = fp64_model(1e160)
    ref = twin(ours)
    before = [g for g in grads(ours) if g is not None]
    gg.clip_(ours, gg.NormClip(1.0))
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
    assert math.isinf(float(total))
    assert all(float(g.abs().max()) == 0.0 for g in grads(ref) if g is not None)
    clipped = [g for g in grads(ours) if g is not None]
    assert math.sqrt(sum(float(g.norm()) ** 2 for g in clipped)) == pytest.approx(1.0, rel=1e-9)
    factors = torch.cat([(g / b).flatten() for g, b in zip(clipped, before, strict=True)])
    torch.testing.assert_close(
        factors, torch.full_like(factors, float(factors[0])), rtol=1e-12, atol=0
    )


@settings(max_examples=40, deadline=None)
@given(
    exponent=st.floats(min_value=-100.0, max_value=150.0),
    max_norm=st.floats(min_value=1e-3, max_value=1e3),
    seed=st.integers(0, 1000),
)
def test_property_normclip_equals_torch_on_fp64_gradients_of_any_magnitude(
    exponent: float, max_norm: float, seed: int
) -> None:
    """Wherever torch's fp64 norm is finite (elements up to 1e150 here), the same gradients."""
    ours = fp64_model(10.0**exponent, seed=seed)
    ref = twin(ours)
    gg.clip_(ours, gg.NormClip(max_norm))
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, foreach=True)
    assert math.isfinite(float(total))
    for a, b in zip(grads(ours), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_normclip_fp64_beyond_the_fp32_range_on_cuda_without_sync(norm_type: float) -> None:
    """The accelerator path: scale computed and applied in fp64 on the device."""
    ours = fp64_model(1e100).cuda()
    ref = twin(ours)
    policy = gg.NormClip(1.0, norm_type=norm_type)
    gg.grad_stats(ours)  # builds and caches the layout (host-to-device copies of indices)
    policy.clip_(gg.grad_stats(twin(ours)))  # builds the policy's device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = gg.grad_stats(ours)
        scale = policy.clip_(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(stats.finite)
    assert bool(stats.overflow)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, norm_type, foreach=True)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert scale.dtype == torch.float64  # fp64 gradients are scaled in fp64, as on the CPU


@pytest.mark.parametrize("name", ["AutoClip", "ZClip", "ZClip-tensor-math", "ValueClip"])
def test_fp64_gradients_beyond_the_fp32_range_reach_every_policy(name: str) -> None:
    policy = POLICIES[name]()
    warm_up(policy)
    model = fp64_model(1e38, seed=3)
    before = gg.grad_stats(model)
    scale = gg.clip_(model, policy, before)
    # One factor for every gradient: kept in fp64, where it can be below fp32's range.
    assert scale.dtype == (torch.float32 if name == "ValueClip" else torch.float64)
    assert 0.0 <= float(scale) <= 1.0
    after = gg.grad_stats(model)
    assert after.total_fp64 is not None
    assert before.total_fp64 is not None
    assert float(after.total_fp64) <= float(before.total_fp64)
    assert all(torch.isfinite(v).all() for v in policy.state_dict().values())
    if name != "ValueClip":  # a norm far above the history: clipped into it
        assert float(after.total_fp64) < 1e3
        clipped = float(before.total_fp64) * float(scale)
        assert clipped == pytest.approx(float(after.total_fp64), rel=1e-9)


def test_guard_clips_fp64_gradients_beyond_the_fp32_range_like_torch() -> None:
    ours = fp64_model(1e38)
    ref = twin(ours)
    guard = gg.Guard(
        ours, torch.optim.SGD(ours.parameters(), lr=0.1), clip=gg.NormClip(1.0), detectors=None
    )
    report = guard.step()
    assert not bool(report.skipped)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    guard.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_valueclip_equals_torch_clip_grad_value_(dtype: torch.dtype) -> None:
    ours = make_model(dtype)
    ours[0].weight.grad = None
    ref = twin(ours)
    original = global_norm(ours)
    scale = gg.clip_(ours, gg.ValueClip(0.7))
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.7)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        if a is None or b is None:
            assert a is None
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    ref_norm = global_norm(ref)
    assert 0.0 < float(scale) < 1.0
    assert float(scale) == pytest.approx(ref_norm / original, rel=1e-5)


def many_of_one_shape(dtype: torch.dtype, seed: int, scale: float) -> nn.Module:
    """Twelve Linear(5, 5) (stacked by shape), a wide one (measured alone), a sparse embedding."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {
            "stack": nn.Sequential(*(nn.Linear(5, 5) for _ in range(12))),
            "wide": nn.Linear(200, 100),
            "embedding": nn.Embedding(7, 5, sparse=True),
        }
    ).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("embedding"):
            rows = torch.tensor([[1, 4]])
            values = torch.randn(2, 5, generator=generator, dtype=torch.float64) * scale
            p.grad = torch.sparse_coo_tensor(rows, values.to(dtype), p.shape, check_invariants=True)
        else:
            size = torch.rand(p.shape[0], 1, generator=generator, dtype=torch.float64) * 2
            size = size if p.ndim > 1 else size.squeeze(1)
            p.grad = (
                torch.randn(p.shape, generator=generator, dtype=torch.float64) * size * scale
            ).to(dtype)
    return model


def dense(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to_dense() if grad.is_sparse else grad


def varied_shapes(dtype: torch.dtype, seed: int, scale: float) -> nn.Module:
    """Small gradients of many shapes (some shared, most not) and a large one, all dense."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        *(nn.Linear(6, 6) for _ in range(3)),
        nn.Linear(6, 9),
        nn.Linear(9, 4),
        nn.Conv1d(4, 5, 3),
        nn.LayerNorm(5),
        nn.Linear(200, 100),  # its weight is large: read alone
    ).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        size = torch.rand(p.shape[0], *([1] * (p.ndim - 1)), generator=generator) * 2
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        p.grad = (noise * size * scale).to(dtype)
    return model


@pytest.mark.parametrize("make", [many_of_one_shape, varied_shapes])
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 10.0),
    clip_value=st.floats(0.05, 3.0),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    measured=st.booleans(),
    missing=st.sets(st.integers(0, 25), max_size=4),
)
def test_property_valueclip_is_torchs_clamp_bit_for_bit_and_scales_by_the_norm_ratio(
    make: Callable[[torch.dtype, int, float], nn.Module],
    seed: int,
    scale: float,
    clip_value: float,
    dtype: torch.dtype,
    measured: bool,
    missing: set[int],
) -> None:
    """Stacked shapes, shapes of their own, a large weight, a sparse embedding, missing
    gradients: torch's clamp bit for bit, and exactly 1 when nothing lies beyond."""
    ours = make(dtype, seed, scale)
    for i, p in enumerate(ours.parameters()):
        if i in missing:
            p.grad = None
    ref = twin(ours)
    original = global_norm(ours)
    peaks = [float(g.abs().max()) for g in map(dense, grads(ours)) if g is not None]
    beyond = any(peak > clip_value for peak in peaks)
    stats = gg.grad_stats(ours) if measured else None
    scale_out = gg.clip_(ours, gg.ValueClip(clip_value), stats)
    dense_params = [q for q in ref.parameters() if q.grad is not None and not q.grad.is_sparse]
    torch.nn.utils.clip_grad_value_(dense_params, clip_value, foreach=False)
    for q in ref.parameters():  # torch's clip_grad_value_ cannot clamp a sparse gradient
        if q.grad is not None and q.grad.is_sparse:
            q.grad = q.grad.to_dense().clamp(-clip_value, clip_value)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        a = dense(a)
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert torch.equal(a, b)
    expected = global_norm(ref) / original if original > 0 else 1.0
    # Norms accumulate in fp32, as torch's do: 20,000 clamped elements of one magnitude
    # (the wide layer) sum to within ~1e-5 of the fp64 reference.
    rel = 1e-6 if dtype == torch.float64 else 1e-4  # the scale itself is fp32
    assert float(scale_out) == pytest.approx(expected, rel=rel, abs=1e-7)
    if not beyond:  # nothing to clamp: exactly 1, without measuring a norm
        assert float(scale_out) == 1.0


def test_valueclip_clamps_inf_and_keeps_nan_in_a_stacked_batch() -> None:
    ours = many_of_one_shape(torch.float32, 0, 0.1)
    stack = ours["stack"]
    stack[3].weight.grad[1, 2] = math.inf  # type: ignore[index]
    stack[7].bias.grad[0] = math.nan  # type: ignore[index]
    ours["embedding"].weight.grad = None
    ref = twin(ours)
    scale = gg.clip_(ours, gg.ValueClip(0.5))
    torch.nn.utils.clip_grad_value_(ref.parameters(), 0.5)
    for a, b in zip(grads(ours), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert float(stack[3].weight.grad[1, 2]) == 0.5  # type: ignore[index]
    assert float(scale) == 1.0  # a NaN norm: the guard decides, the policy does not scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("clipping", [0.01, 0.3])
def test_agc_measured_or_not_clips_the_same_bits_and_reports_the_same_scale(
    dtype: torch.dtype, clipping: float
) -> None:
    ours = many_of_one_shape(dtype, 5, 0.2)
    direct = twin(ours)
    stats = gg.grad_stats(ours)
    policy = gg.AGC(clipping=clipping, exclude=("wide",))
    by_stats = gg.clip_(ours, policy, stats)
    by_units = gg.clip_(direct, gg.AGC(clipping=clipping, exclude=("wide",)))
    for a, b in zip(grads(ours), grads(direct), strict=True):
        torch.testing.assert_close(dense(a), dense(b), rtol=0, atol=0)
    assert float(by_units) == pytest.approx(float(by_stats), rel=1e-6)
    assert float(by_stats) < 1.0


def test_agc_stacked_by_shape_equals_agc_tensor_by_tensor() -> None:
    ours = many_of_one_shape(torch.float32, 9, 0.3)
    alone = twin(ours)
    gg.clip_(ours, gg.AGC(exclude=()))
    for name, p in alone.named_parameters():  # one tensor at a time: nothing to stack
        gg.clip_([(name, p)], gg.AGC(exclude=()))
    changed = 0
    for a, b, c in zip(
        grads(ours),
        grads(alone),
        grads(twin(many_of_one_shape(torch.float32, 9, 0.3))),
        strict=True,
    ):
        assert torch.equal(dense(a), dense(b))  # type: ignore[arg-type]
        changed += int(not torch.equal(dense(a), dense(c)))  # type: ignore[arg-type]
    assert 0 < changed < 27


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("missing", [(), (3,), (0, 9)])
def test_agc_on_varied_shapes_equals_agc_tensor_by_tensor(
    dtype: torch.dtype, missing: tuple[int, ...]
) -> None:
    """Rows of one length copied together, vectors in one call, a large weight alone, and
    (with gradients missing) the fallback: each bitwise the tensor-by-tensor result."""
    ours = varied_shapes(dtype, 4, 0.5)
    for i, p in enumerate(ours.parameters()):
        if i in missing:
            p.grad = None
    alone = twin(ours)
    untouched = twin(ours)
    scale = gg.clip_(ours, gg.AGC(clipping=0.05, exclude=()))
    for name, p in alone.named_parameters():
        gg.clip_([(name, p)], gg.AGC(clipping=0.05, exclude=()))
    changed = 0
    for a, b, c in zip(grads(ours), grads(alone), grads(untouched), strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None and c is not None:
            assert torch.equal(a, b)
            changed += int(not torch.equal(a, c))
    assert changed > 0
    assert 0.0 < float(scale) < 1.0


# --- ZClip against the zclip package ----------------------------------------------------


def spiky_norms(n: int = 2000, seed: int = 3) -> list[float]:
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(0.0, 0.25, n)) * np.linspace(2.0, 0.7, n)
    spikes = rng.random(n) < 0.03
    base[spikes] *= rng.uniform(3.0, 40.0, spikes.sum())
    return [float(x) for x in base]


def _import_zclip() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package imports FSDP1, deprecated in torch
        import zclip

    return zclip


ZCLIP_CONFIGS: list[dict[str, Any]] = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile", "z_thresh": 2.0},
    {"max_grad_norm": 3.0, "warmup_steps": 10, "alpha": 0.9, "clip_factor": 0.7},
]


@pytest.mark.parametrize("host_math", [True, False], ids=["cpu-float-math", "tensor-math"])
@pytest.mark.parametrize("config", ZCLIP_CONFIGS)
def test_zclip_matches_the_zclip_package_step_by_step(
    config: dict[str, Any], host_math: bool
) -> None:
    zclip = _import_zclip()
    package_config = {"max_grad_norm": None, **config}
    peer = zclip.ZClip(**package_config)
    ours = gg.ZClip(**config)
    ours._host_math_on_cpu = host_math  # the tensor path is what runs on an accelerator
    peer_model = nn.Linear(1, 1, bias=False)
    our_model = nn.Linear(1, 1, bias=False)
    clipped_steps = 0
    for step, norm64 in enumerate(spiky_norms()):
        norm = float(torch.tensor(norm64, dtype=torch.float32))
        peer_model.weight.grad = torch.tensor([[norm]])
        our_model.weight.grad = torch.tensor([[norm]])
        peer.step(peer_model)
        scale = gg.clip_(our_model, ours)
        peer_grad = float(peer_model.weight.grad[0, 0])
        our_grad = float(our_model.weight.grad[0, 0])
        peer_clipped = peer_grad < norm
        assert (float(scale) < 1.0) == peer_clipped, f"decision differs at step {step}"
        assert our_grad == pytest.approx(peer_grad, rel=1e-5), f"threshold differs at {step}"
        clipped_steps += peer_clipped
        if peer.initialized:
            assert float(ours.mean) == pytest.approx(peer.mean, rel=1e-5)
            assert float(ours.var) == pytest.approx(peer.var, rel=1e-4, abs=1e-9)
    assert 10 < clipped_steps < 1000  # the sequence exercises both branches


def test_zclip_package_is_poisoned_by_one_nan_and_ours_is_not() -> None:
    zclip = _import_zclip()
    peer = zclip.ZClip(max_grad_norm=None, warmup_steps=5)
    ours = gg.ZClip(warmup_steps=5)
    model = nn.Linear(1, 1, bias=False)
    for norm in [1.0, 1.1, 0.9, 1.0, math.nan, 1.2, 1.0, 0.8]:
        model.weight.grad = torch.tensor([[norm]])
        peer.step(model)
        model.weight.grad = torch.tensor([[norm]])
        gg.clip_(model, ours)
    assert math.isnan(peer.mean)
    assert math.isfinite(float(ours.mean))


# --- AutoClip -----------------------------------------------------------------------------


def test_autoclip_threshold_is_within_one_percentile_point_over_100k_heavy_tailed_norms() -> None:
    rng = np.random.default_rng(0)
    norms = np.abs(rng.standard_cauchy(100_000)) * np.exp(rng.normal(0, 1, 100_000)) + 1e-3
    policy = gg.AutoClip(percentile=10.0)
    size_at_start = sum(v.numel() for v in policy.state_dict().values())
    values = torch.tensor(norms, dtype=torch.float32)
    for i in range(values.numel()):
        policy.observe(values[i])
        if i in (9, 999, 99_999):
            threshold = float(policy.threshold(torch.device("cpu")))
            seen = norms[: i + 1]
            rank = 100.0 * float(np.mean(seen <= threshold))
            assert abs(rank - 10.0) <= 1.0, f"rank {rank:.2f} after {i + 1} norms"
    assert sum(v.numel() for v in policy.state_dict().values()) == size_at_start
    exact = float(np.percentile(norms, 10.0))
    assert float(policy.threshold(torch.device("cpu"))) == pytest.approx(exact, rel=0.03)


def test_autoclip_clips_to_the_running_percentile() -> None:
    model = nn.Linear(1, 1, bias=False)
    policy = gg.AutoClip(percentile=50.0)
    for norm in [1.0, 2.0, 3.0, 4.0]:
        model.weight.grad = torch.tensor([[norm]])
        gg.clip_(model, policy)
    model.weight.grad = torch.tensor([[100.0]])
    gg.clip_(model, policy)  # history {1,2,3,4,100}: median 3
    assert float(model.weight.grad[0, 0]) == pytest.approx(3.0, rel=0.03)


# --- AGC against the paper's formula ------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.hidden = nn.Linear(16, 8)
        self.gain = nn.Parameter(torch.ones(8))
        self.classifier = nn.Linear(8, 3)


def agc_reference(
    weight: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float
) -> torch.Tensor:
    """Brock et al. 2021, eq. 3, one unit (row / output channel) at a time."""
    out = grad.clone().double()
    units = range(weight.shape[0]) if weight.ndim > 1 else [None]
    for i in units:
        w = weight.double() if i is None else weight[i].double()
        g = grad.double() if i is None else grad[i].double()
        w_norm = max(float(w.norm()), eps)
        g_norm = float(g.norm())
        if g_norm / w_norm > clipping:
            clipped = clipping * w_norm / g_norm * g
            if i is None:
                out = clipped
            else:
                out[i] = clipped
    return out.to(grad.dtype)


@pytest.mark.parametrize("clipping", [0.01, 0.1])
def test_agc_matches_the_paper_formula_unit_by_unit(clipping: float) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        model.hidden.weight[0].zero_()  # a zero unit: the eps floor applies
    for p in model.parameters():
        p.grad = torch.randn_like(p) * torch.rand(p.shape[0], *[1] * (p.ndim - 1)) * 0.5
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gg.clip_(model, gg.AGC(clipping=clipping, eps=1e-3))
    for name, p in model.named_parameters():
        assert p.grad is not None
        if name.startswith("classifier."):
            torch.testing.assert_close(p.grad, before[name], rtol=0, atol=0)
            continue
        expected = agc_reference(p.detach(), before[name], clipping, 1e-3)
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(model.hidden.weight.grad, before["hidden.weight"])


def test_agc_exclude_patterns_and_unitwise_norm() -> None:
    model = ConvNet()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gg.clip_(model, gg.AGC(exclude=("conv*", "gain")))
    assert model.conv.weight.grad is not None
    assert torch.equal(model.conv.weight.grad, before["conv.weight"])
    assert torch.equal(model.gain.grad, before["gain"])
    assert not torch.equal(model.classifier.weight.grad, before["classifier.weight"])
    w = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(unitwise_norm(w).flatten(), w.flatten(1).norm(dim=1))
    with pytest.raises(ConfigError, match=r"exclude=\('head',\)"):
        gg.AGC(exclude="head")


def half_ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at each value of the fp64 ``reference``: the rounding bound.

    In the subnormal range the spacing is fixed (2^-24 for fp16), so the bound is absolute.
    """
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(reference.abs().clamp(min=info.tiny)))
    return torch.exp2(exponent) * info.eps / 2


def agc_units(dtype: torch.dtype, factors: torch.Tensor, seed: int) -> nn.Module:
    """One weight whose row i, clipped by AGC(clipping=1), takes the factor ``factors[i]``."""
    generator = torch.Generator().manual_seed(seed)
    rows = factors.numel()
    grad = ((torch.rand(rows, 16, generator=generator, dtype=torch.float64) * 2 - 1) * 3e4).to(
        dtype
    )
    direction = torch.rand(rows, 16, generator=generator, dtype=torch.float64) + 0.5
    row_norms = grad.double().norm(dim=1, keepdim=True) * factors.unsqueeze(1)
    weight = direction / direction.norm(dim=1, keepdim=True) * row_norms
    model = nn.Module()
    model.weight = nn.Parameter(weight.to(dtype))
    model.bias = nn.Parameter(torch.full((3,), 1e-3, dtype=torch.float64).to(dtype))
    model.weight.grad = grad
    model.bias.grad = torch.tensor([2e4, -3e4, 1.5e4], dtype=dtype)  # a 0-d factor, 4.4e-8
    return model


ON_CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_agc_low_precision_product_is_rounded_once_from_the_exact_one(
    dtype: torch.dtype, seed: int, device: str
) -> None:
    """Factors across 1e-7..1: each clipped element is the fp64 product rounded to the dtype.

    A factor cast to fp16 before multiplying loses up to a third of itself below fp16's
    normal range (a 4.4e-8 factor reads 5.96e-8); formed in fp32, the error stays within
    half a unit in the last place (plus 2^-10 of it for the fp32 factor's own rounding).
    """
    factors = torch.logspace(-7, 0, 57, dtype=torch.float64)
    model = agc_units(dtype, factors, seed)
    expected = {}
    for name, p in model.named_parameters():
        assert p.grad is not None
        weight_norm = unitwise_norm(p.detach().double()).clamp(min=1e-9)
        grad_norm = unitwise_norm(p.grad.double())
        factor = torch.where(grad_norm > weight_norm, weight_norm / grad_norm, 1.0)
        expected[name] = p.grad.double() * factor  # fp64 product of the same values
    model.to(device)
    gg.clip_(model, gg.AGC(clipping=1.0, eps=1e-9, exclude=()))
    model.cpu()
    for name, p in model.named_parameters():
        assert p.grad is not None
        error = (p.grad.double() - expected[name]).abs()
        bound = half_ulp(expected[name], dtype) * (1 + 2**-10)
        assert bool((error <= bound).all()), f"{name}: {float((error / bound).max()):.3f} bounds"
    bias = model.get_parameter("bias")  # its 0-d factor, 4e-8, is far below fp16's normal range
    assert bias.grad is not None
    assert float(bias.grad.double().norm()) == pytest.approx(
        float(bias.detach().double().norm()), rel=2**-8
    )


@settings(max_examples=60, deadline=None)
@given(
    log_factor=st.floats(min_value=-7.0, max_value=0.0),
    log_scale=st.floats(min_value=-3.0, max_value=4.5),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_agc_rounds_each_low_precision_product_once(
    log_factor: float, log_scale: float, dtype: torch.dtype, seed: int
) -> None:
    """One unit clipped by ``10**log_factor``; gradient elements up to ``10**log_scale``,
    so products fall anywhere from fp16's subnormals to its normal range."""
    generator = torch.Generator().manual_seed(seed)
    grad = (torch.rand(1, 32, generator=generator, dtype=torch.float64) * 2 - 1) * 10**log_scale
    grad = grad.to(dtype)
    grad_norm = float(grad.double().norm())
    assume(grad_norm > 1e-5)  # AGC floors the gradient norm at 1e-6 before dividing
    model = nn.Linear(32, 1, bias=False).to(dtype)
    with torch.no_grad():  # a weight whose norm makes the factor 10**log_factor
        model.weight.fill_(grad_norm * 10**log_factor / math.sqrt(32))
    weight_norm = max(float(model.weight.detach().double().norm()), 1e-30)
    model.weight.grad = grad.clone()
    gg.clip_(model, gg.AGC(clipping=1.0, eps=1e-30, exclude=()))
    factor = min(1.0, weight_norm / grad_norm)
    expected = grad.double() * factor
    assert model.weight.grad is not None
    error = (model.weight.grad.double() - expected).abs()
    assert bool((error <= half_ulp(expected, dtype) * (1 + 2**-10)).all())


def test_agc_fp64_is_computed_in_fp64_beyond_the_fp32_range() -> None:
    model = ConvNet().double()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e100
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    scale = gg.clip_(model, gg.AGC(clipping=0.01, exclude=()))
    for name, p in model.named_parameters():
        expected = agc_reference(p.detach(), before[name], 0.01, 1e-3)
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)
    assert 0.0 <= float(scale) < 1e-90


# --- NaN and Inf gradients: what each policy does to them (docs/clipping.md) -------------


def test_valueclip_clamps_inf_to_the_bound_and_keeps_nan_as_torch_does() -> None:
    model = nn.Linear(5, 1, bias=False)
    values = [math.nan, math.inf, -math.inf, 5.0, -0.2]
    model.weight.grad = torch.tensor([values])
    ref = twin(model)
    scale = gg.clip_(model, gg.ValueClip(1.0))
    torch.nn.utils.clip_grad_value_(ref.parameters(), 1.0)
    expected = torch.tensor([[math.nan, 1.0, -1.0, 1.0, -0.2]])
    torch.testing.assert_close(model.weight.grad, expected, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(ref.weight.grad, expected, equal_nan=True, rtol=0, atol=0)
    assert float(scale) == 1.0  # the norm before clipping was not finite: no ratio


def test_agc_leaves_a_nan_unit_and_zeroes_an_inf_unit_with_nan_where_the_inf_was() -> None:
    model = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    grad = torch.full((4, 3), 0.1)
    grad[0, 1] = math.nan  # NaN norm: never above the bound, factor 1
    grad[1, 2] = math.inf  # inf norm: factor 0, so 0 * inf = NaN and the rest 0
    grad[2] = 100.0  # a finite unit above the bound: clipped as usual
    model.weight.grad = grad.clone()
    scale = gg.clip_(model, gg.AGC(clipping=0.5, exclude=()))
    out = model.weight.grad
    assert out is not None
    torch.testing.assert_close(out[0], grad[0], equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out[1, 2])
    assert torch.equal(out[1, :2], torch.zeros(2))
    assert float(out[2].norm()) == pytest.approx(0.5 * math.sqrt(3), rel=1e-6)
    assert torch.equal(out[3], grad[3])  # ratio 0.1, under the bound
    assert float(scale) == 1.0  # the global norm was not finite: no ratio


def test_agc_zeroes_a_finite_unit_whose_fp32_norm_overflows() -> None:
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.weight.grad = torch.tensor([[1e20, 1e20, 1e20], [1e-3, 0.0, 0.0]])
    gg.clip_(model, gg.AGC(clipping=0.01, exclude=()))
    assert torch.equal(model.weight.grad[0], torch.zeros(3))
    assert float(model.weight.grad[1, 0]) == pytest.approx(1e-3, rel=1e-6)  # ratio under 0.01


@pytest.mark.parametrize("name", ["NormClip", "NormClip-inf", "AutoClip", "ZClip", "ZClip-max"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_global_policies_leave_nonfinite_gradients_untouched(name: str, bad: float) -> None:
    policy = POLICIES[name]()
    warm_up(policy)
    model = make_model(seed=7)
    model[2].weight.grad[0, 0] = bad  # type: ignore[index]
    before = grads(model)
    scale = gg.clip_(model, policy)
    assert float(scale) == 1.0
    for a, b in zip(grads(model), before, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


# --- statistics know their source -----------------------------------------------------------


def trained(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    model(x).square().sum().backward()
    return model, x


def test_clip_refuses_statistics_of_another_model() -> None:
    a, _ = trained(0)
    b, _ = trained(1)
    with pytest.raises(ConfigError, match="measured on other parameters.*grad_stats\\(model\\)"):
        gg.clip_(b, gg.NormClip(1.0), gg.grad_stats(a))
    with pytest.raises(ConfigError, match="other parameters"):
        gg.clip_(b.named_parameters(), gg.NormClip(1.0), gg.grad_stats(a.named_parameters()))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_clip_refuses_statistics_measured_before_zero_grad_and_backward(
    set_to_none: bool,
) -> None:
    model, x = trained()
    stats = gg.grad_stats(model)
    model.zero_grad(set_to_none=set_to_none)
    model(x * 2).square().sum().backward()
    message = "new .grad tensor" if set_to_none else "written in place"
    with pytest.raises(ConfigError, match=f"stale GradStats.*{message}.*grad_stats"):
        gg.clip_(model, gg.NormClip(1.0), stats)


def test_clip_refuses_statistics_after_another_backward_or_a_clip() -> None:
    model, x = trained()
    stats = gg.grad_stats(model)
    model(x).square().sum().backward()  # accumulates into the same tensors
    with pytest.raises(ConfigError, match="written in place"):
        gg.clip_(model, gg.NormClip(1.0), stats)
    stats = gg.grad_stats(model)
    gg.clip_(model, gg.NormClip(1e-3), stats)
    with pytest.raises(ConfigError, match="or a clip"):
        gg.clip_(model, gg.ValueClip(1.0), stats)


def test_fresh_statistics_clip_like_torch() -> None:
    model, x = trained()
    ref = copy.deepcopy(model)
    model.zero_grad(set_to_none=False)
    ref.zero_grad(set_to_none=False)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    stats = gg.grad_stats(model)
    scale = gg.clip_(model, gg.NormClip(0.5), stats)  # same model, untouched since: accepted
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, foreach=True)
    assert float(scale) == pytest.approx(0.5 / (float(total) + 1e-6), rel=1e-6)
    for a, b in zip(grads(model), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_named_parameters_and_a_ddp_style_wrapper_share_the_statistics() -> None:
    model, _ = trained()
    wrapper = nn.Sequential(model)  # other names, the same parameters
    gg.clip_(wrapper, gg.NormClip(1.0), gg.grad_stats(model))
    gg.clip_(model.named_parameters(), gg.NormClip(1.0), gg.grad_stats(model))


# --- contract suite over every policy ----------------------------------------------------


def zclip_with_tensor_math(**kwargs: Any) -> gg.ZClip:
    policy = gg.ZClip(**kwargs)
    policy._host_math_on_cpu = False  # the path an accelerator takes, exercised on the CPU
    return policy


POLICIES: dict[str, Callable[[], gg.ClipPolicy]] = {
    "NormClip": lambda: gg.NormClip(1.0),
    "NormClip-inf": lambda: gg.NormClip(0.3, norm_type=math.inf),
    "ValueClip": lambda: gg.ValueClip(0.5),
    "AutoClip": lambda: gg.AutoClip(percentile=25.0),
    "ZClip": lambda: gg.ZClip(warmup_steps=3, z_thresh=1.0),
    "ZClip-max": lambda: gg.ZClip(warmup_steps=3, max_grad_norm=2.0),
    "ZClip-tensor-math": lambda: zclip_with_tensor_math(warmup_steps=3, z_thresh=1.0),
    "AGC": lambda: gg.AGC(clipping=0.05),
}


def warm_up(policy: gg.ClipPolicy, steps: int = 6, seed: int = 0) -> None:
    for step in range(steps):
        model = make_model(seed=seed + step)
        gg.clip_(model, policy)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_scale_in_unit_interval_and_dtype_kept(name: str, dtype: torch.dtype) -> None:
    policy = POLICIES[name]()
    warm_up(policy)
    model = make_model(dtype, seed=99)
    for p in model.parameters():
        assert p.grad is not None
        p.grad.mul_(50)
    before = gg.grad_stats(model).total
    scale = gg.clip_(model, policy)
    assert scale.shape == ()
    assert scale.dtype == torch.float32
    assert 0.0 <= float(scale) <= 1.0
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())
    after = gg.grad_stats(model).total
    assert float(after) <= float(before) * (1 + 1e-6)


@pytest.mark.parametrize("name", POLICIES)
def test_contract_state_round_trip_reproduces_the_run(name: str) -> None:
    original = POLICIES[name]()
    warm_up(original, steps=5)
    restored = POLICIES[name]()
    restored.load_state_dict(original.state_dict())
    for step in range(4):
        a, b = make_model(seed=50 + step), make_model(seed=50 + step)
        scale_a = gg.clip_(a, original)
        scale_b = gg.clip_(b, restored)
        assert torch.equal(scale_a, scale_b)
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key])


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_contract_nonfinite_step_leaves_state_unchanged(name: str, bad: float) -> None:
    policy = POLICIES[name]()
    warm_up(policy)
    state = policy.state_dict()
    model = make_model(seed=7)
    model[2].weight.grad[0, 0] = bad  # type: ignore[index]
    scale = gg.clip_(model, policy)
    after = policy.state_dict()
    assert state.keys() == after.keys()
    for key in state:
        assert torch.equal(state[key], after[key]), key
    if name not in ("ValueClip", "AGC"):
        assert float(scale) == 1.0  # a global policy leaves an unmeasurable step alone


def test_load_state_dict_rejects_foreign_state() -> None:
    with pytest.raises(ConfigError, match="saved from another policy"):
        gg.ZClip().load_state_dict(gg.AutoClip().state_dict())
    with pytest.raises(ConfigError, match="different configuration"):
        gg.AutoClip(bins_per_octave=8).load_state_dict(gg.AutoClip().state_dict())


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(POLICIES)),
    magnitudes=st.lists(st.floats(min_value=1e-4, max_value=1e4), min_size=1, max_size=12),
    nan_at=st.integers(min_value=0, max_value=11),
    seed=st.integers(0, 1000),
)
def test_property_never_raises_norm_and_nan_never_enters_state(
    name: str, magnitudes: list[float], nan_at: int, seed: int
) -> None:
    policy = POLICIES[name]()
    for step, magnitude in enumerate(magnitudes):
        model = make_model(seed=seed + step)
        for p in model.parameters():
            assert p.grad is not None
            p.grad.mul_(magnitude)
        if step == nan_at:
            model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
            state = policy.state_dict()
            gg.clip_(model, policy)
            after = policy.state_dict()
            assert all(torch.equal(state[k], after[k]) for k in state)
            continue
        before = gg.grad_stats(model).total
        scale = gg.clip_(model, policy)
        assert 0.0 <= float(scale) <= 1.0
        assert float(gg.grad_stats(model).total) <= float(before) * (1 + 1e-6)


# --- construction-time validation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: gg.NormClip(0.0), "max_norm must be a positive number"),
        (lambda: gg.NormClip(-1.0), "max_norm"),
        (lambda: gg.NormClip(math.inf), "max_norm"),
        (lambda: gg.NormClip(1.0, norm_type=0), "norm_type must be a positive number or math.inf"),
        (lambda: gg.ValueClip(0), "clip_value"),
        (lambda: gg.AutoClip(percentile=0), r"percentile must lie in \(0, 100\]"),
        (lambda: gg.AutoClip(percentile=101), "percentile"),
        (lambda: gg.ZClip(alpha=1.0), "alpha must lie strictly between 0.0 and 1.0"),
        (lambda: gg.ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: gg.ZClip(mode="median"), "mode must be one of 'zscore', 'percentile'"),  # type: ignore[arg-type]
        (lambda: gg.ZClip(clip_option="max"), "clip_option"),  # type: ignore[arg-type]
        (lambda: gg.ZClip(max_grad_norm=-2), "max_grad_norm"),
        (lambda: gg.AGC(clipping=0), "clipping"),
        (lambda: gg.AGC(eps=-1), "eps"),
    ],
)
def test_bad_arguments_fail_at_construction(factory: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        factory()


def test_clip_rejects_a_non_policy() -> None:
    with pytest.raises(ConfigError, match=r"NormClip\(1.0\)"):
        gg.clip_(make_model(), "norm")  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", POLICIES)
def test_contract_policies_do_not_sync_on_cuda(name: str) -> None:
    policy = POLICIES[name]()
    model = make_model().cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    gg.clip_(model, policy)  # first call builds caches and device state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            stats = gg.grad_stats(model)
            scale = policy.clip_(stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scale.device.type == "cuda"
    assert 0.0 <= float(scale) <= 1.0


# --- ZClip's two paths, NormClip's threshold dtype ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ZCLIP_CONFIGS)
def test_zclip_cpu_float_path_and_tensor_path_agree_step_by_step(
    config: dict[str, Any], dtype: torch.dtype
) -> None:
    """The CPU's float rule and the accelerator's tensor rule: same scales, same state."""
    floats, tensors = gg.ZClip(**config), zclip_with_tensor_math(**config)
    norms = spiky_norms(400, seed=5)
    norms[30] = norms[200] = math.nan
    norms[120] = math.inf
    models = [nn.Linear(1, 1, bias=False).to(dtype) for _ in range(2)]
    for step, norm in enumerate(norms):
        scales = []
        for model, policy in zip(models, (floats, tensors), strict=True):
            model.weight.grad = torch.tensor([[norm]], dtype=dtype)
            scales.append(gg.clip_(model, policy))
        assert scales[0].dtype == scales[1].dtype == dtype
        assert float(scales[0]) == pytest.approx(float(scales[1]), rel=1e-6), f"step {step}"
        if step % 50 == 49:  # reading the float path's state folds it back into tensors
            for key, value in floats.state_dict().items():
                torch.testing.assert_close(value, tensors.state_dict()[key], rtol=1e-12, atol=0)


def test_normclip_clips_fp64_gradients_by_max_norm_itself_not_its_fp32_rounding() -> None:
    """0.1 has no exact fp32 value: an fp32 threshold would be off by 1.5e-8 relative."""
    model = fp64_model(1.0)
    ref = twin(model)
    scale = gg.clip_(model, gg.NormClip(0.1))
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1, foreach=True)
    assert scale.dtype == torch.float64
    assert float(scale) == pytest.approx(0.1 / (float(total) + 1e-6), rel=1e-15)
    for a, b in zip(grads(model), grads(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
