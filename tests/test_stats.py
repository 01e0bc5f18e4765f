"""grad_stats against a per-tensor loop oracle, over dtypes, layouts and failure cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard as gg
from gradguard import stats as stats_module
from gradguard.errors import ConfigError, UnsupportedModelError


def loop_norms(model: nn.Module) -> dict[str, float]:
    """Brute-force oracle: fp64 norm of each trainable parameter's grad, 0 when None."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None:
            out[name] = 0.0
        else:
            dense = g.to_dense() if g.is_sparse else g
            out[name] = float(dense.double().norm())
    return out


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(torch.tanh(self.attn(x)))


class Encoder(nn.Module):
    def __init__(self, d: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.scale


def backward(model: nn.Module, n: int = 5) -> None:
    torch.manual_seed(1)
    model(torch.randn(n, 3)).square().sum().backward()


def assert_matches_oracle(model: nn.Module, stats: gg.GradStats, rel: float = 1e-6) -> None:
    oracle = loop_norms(model)
    assert stats.names == tuple(oracle)
    torch.testing.assert_close(
        stats.per_tensor.double(),
        torch.tensor(list(oracle.values()), dtype=torch.float64),
        rtol=rel,
        atol=1e-12,
    )
    per_layer: dict[str, float] = {}
    for name, value in oracle.items():
        layer = stats_module.layer_of(name)
        per_layer[layer] = per_layer.get(layer, 0.0) + value**2
    assert stats.layer_names == tuple(per_layer)
    torch.testing.assert_close(
        stats.per_layer.double(),
        torch.tensor([math.sqrt(v) for v in per_layer.values()], dtype=torch.float64),
        rtol=rel,
        atol=1e-12,
    )
    total = math.sqrt(sum(v**2 for v in oracle.values()))
    assert float(stats.total) == pytest.approx(total, rel=rel)


def test_norms_match_loop_and_layers_are_named_by_owner_in_depth_order() -> None:
    model = Wrapper()
    backward(model)
    stats = gg.grad_stats(model)
    assert_matches_oracle(model, stats)
    # named_parameters() order: a module's own parameters, then its children's.
    assert stats.layer_names[:5] == (
        "(root)",
        "encoder.embed",
        "encoder.layers.0.attn",
        "encoder.layers.0.mlp.0",
        "encoder.layers.0.mlp.2",
    )
    assert stats.layer_names[-1] == "encoder.head"
    assert stats.per_tensor.dtype == torch.float32
    assert bool(stats.finite)
    assert not bool(stats.overflow)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_is_accumulated_in_fp32(dtype: torch.dtype) -> None:
    model = Encoder().to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    stats = gg.grad_stats(model)
    assert stats.per_tensor.dtype == torch.float32
    assert_matches_oracle(model, stats, rel=1e-5)


def test_mixed_dtypes_form_several_groups_and_keep_parameter_order() -> None:
    model = Encoder()
    model.layers[1].to(torch.bfloat16)
    model.layers[3].to(torch.float64)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    stats = gg.grad_stats(model)
    assert len(stats_module._LAYOUTS[model].groups) == 3
    assert_matches_oracle(model, stats, rel=1e-5)


def test_none_grads_count_as_zero_and_frozen_parameters_are_left_out() -> None:
    model = Encoder()
    model.layers[0].requires_grad_(False)
    backward(model)
    model.layers[2].attn.weight.grad = None
    stats = gg.grad_stats(model)
    assert not any(name.startswith("layers.0.") for name in stats.names)
    index = stats.names.index("layers.2.attn.weight")
    assert float(stats.per_tensor[index]) == 0.0
    assert_matches_oracle(model, stats)


def test_sparse_and_zero_size_gradients() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 4, sparse=True)
            self.empty = nn.Parameter(torch.zeros(0, 3))
            self.out = nn.Linear(4, 1)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(idx)).sum() + self.empty.sum()

    model = Model()
    model(torch.tensor([1, 1, 5, 7])).backward()
    assert model.emb.weight.grad is not None
    assert model.emb.weight.grad.is_sparse
    stats = gg.grad_stats(model)
    assert_matches_oracle(model, stats)
    assert float(stats.per_tensor[stats.names.index("empty")]) == 0.0


def test_named_parameters_are_accepted() -> None:
    model = Encoder()
    backward(model)
    by_module = gg.grad_stats(model)
    by_pairs = gg.grad_stats(model.named_parameters())
    assert by_pairs.names == by_module.names
    torch.testing.assert_close(by_pairs.per_tensor, by_module.per_tensor)


@pytest.mark.parametrize(
    ("argument", "fix"),
    [
        (torch.ones(3), "Pass the model itself"),
        (42, "Pass the model itself"),
        ([torch.ones(3, requires_grad=True)], "named_parameters()"),
    ],
)
def test_non_module_arguments_raise_with_the_fix(argument: object, fix: str) -> None:
    with pytest.raises(UnsupportedModelError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        gg.grad_stats(argument)  # type: ignore[arg-type]


def test_model_without_trainable_parameters_raises() -> None:
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(gg.GradGuardError, match="all frozen.*requires_grad_"):
        gg.grad_stats(frozen)
    with pytest.raises(gg.GradGuardError, match="no parameters"):
        gg.grad_stats(nn.ReLU())


def test_fp32_gradient_of_1e25_overflows_but_reads_finite_with_the_true_norm() -> None:
    model = nn.Linear(10, 1, bias=False)
    model.weight.grad = torch.full((1, 10), 1e25)
    fast = gg.grad_stats(model, resolve=False)
    assert not bool(fast.finite)  # unresolved: an overflowed norm looks like an Inf
    stats = gg.grad_stats(model)
    assert bool(stats.finite)
    assert bool(stats.overflow)
    assert not torch.isnan(stats.total)
    assert float(stats.total) == pytest.approx(1e25 * math.sqrt(10), rel=1e-6)
    assert stats.resolved
    again = fast.resolve()
    assert bool(again.finite)
    assert float(again.total) == pytest.approx(float(stats.total))


def test_per_tensor_norms_whose_squares_overflow_are_combined_robustly() -> None:
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False))
    model[0].weight.grad = torch.full((1, 4), 1e19)  # norm 2e19 is finite, its square is not
    model[1].weight.grad = torch.full((1, 4), 1.0)
    stats = gg.grad_stats(model)
    assert bool(stats.finite)
    assert bool(stats.overflow)
    assert float(stats.total) == pytest.approx(2e19, rel=1e-6)
    assert float(stats.per_layer[0]) == pytest.approx(2e19, rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_elements_are_not_finite_and_not_overflow(bad: float) -> None:
    model = Encoder()
    backward(model)
    model.layers[1].attn.weight.grad[0, 0] = bad  # type: ignore[index]
    stats = gg.grad_stats(model)
    assert not bool(stats.finite)
    assert not bool(stats.overflow)


def test_fp16_gradient_whose_fp16_norm_overflows_is_measured_in_fp32() -> None:
    model = nn.Linear(1000, 1, bias=False).half()
    model.weight.grad = torch.full((1, 1000), 1e4, dtype=torch.float16)
    stats = gg.grad_stats(model)
    assert bool(stats.finite)
    assert not bool(stats.overflow)
    assert float(stats.total) == pytest.approx(1e4 * math.sqrt(1000), rel=1e-6)


# --- what finite and overflow mean (docs/statistics.md) ------------------------------------


def test_finite_means_every_element_finite_once_resolved_and_the_fp32_norm_before() -> None:
    """Resolved: NaN/Inf elements only. Unresolved: the fp32 global norm, so overflow too."""
    model = nn.Linear(10, 1, bias=False)
    model.weight.grad = torch.full((1, 10), 3e38)  # the largest fp32 values: all finite
    unresolved = gg.grad_stats(model, resolve=False)
    assert not unresolved.resolved
    assert not bool(unresolved.finite)
    assert not bool(unresolved.overflow)  # not told apart yet
    stats = unresolved.resolve()
    assert bool(stats.finite)
    assert bool(stats.overflow)
    assert math.isinf(float(stats.total))  # the true norm, 9.5e38, has no fp32 value
    assert stats.total_fp64 is None  # an fp32 model
    model.weight.grad[0, 3] = math.inf
    stats = gg.grad_stats(model)
    assert not bool(stats.finite)
    assert not bool(stats.overflow)


def test_missing_gradients_are_finite_with_norm_zero() -> None:
    model = nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    stats = gg.grad_stats(model)
    assert bool(stats.finite)
    assert float(stats.per_tensor[1]) == 0.0


# --- fp64 gradients: fp64 norms beside the fp32 ones ----------------------------------------


def fp64_linear(magnitude: float) -> nn.Module:
    model = nn.Linear(10, 3).double()
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * magnitude
    return model


@pytest.mark.parametrize("resolve", [None, False])
@pytest.mark.parametrize("magnitude", [1e38, 1e100])
def test_fp64_norm_beyond_the_fp32_range_is_finite_and_flagged_overflow(
    magnitude: float, resolve: bool | None
) -> None:
    model = fp64_linear(magnitude)
    stats = gg.grad_stats(model, resolve=resolve)
    oracle = math.sqrt(sum(v**2 for v in loop_norms(model).values()))
    assert stats.total_fp64 is not None
    assert stats.total_fp64.dtype == torch.float64
    assert float(stats.total_fp64) == pytest.approx(oracle, rel=1e-12)
    assert math.isinf(float(stats.total))  # fp32, as logged
    assert stats.per_tensor.dtype == torch.float32
    assert bool(stats.finite)  # told by the fp64 norm, without resolving
    assert bool(stats.overflow)
    assert stats.resolved


def test_fp64_squares_overflowing_fp64_are_measured_robustly_once_resolved() -> None:
    model = fp64_linear(1e160)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert math.isinf(float(torch.linalg.vector_norm(grads[0])))  # torch's own norm
    oracle = 1e160 * math.sqrt(sum(float((g / 1e160).norm()) ** 2 for g in grads))
    fast = gg.grad_stats(model, resolve=False)
    assert not bool(fast.finite)  # an inf fp64 norm: unresolved, it looks like an Inf
    for stats in (fast.resolve(), gg.grad_stats(model)):
        assert bool(stats.finite)
        assert bool(stats.overflow)
        assert stats.total_fp64 is not None
        assert float(stats.total_fp64) == pytest.approx(oracle, rel=1e-12)


def test_fp64_model_with_ordinary_gradients_keeps_its_fp64_norm() -> None:
    model = fp64_linear(1.0)
    stats = gg.grad_stats(model)
    oracle = math.sqrt(sum(v**2 for v in loop_norms(model).values()))
    assert stats.total_fp64 is not None
    assert float(stats.total_fp64) == pytest.approx(oracle, rel=1e-15)
    assert not bool(stats.overflow)
    assert gg.grad_stats(Encoder()).total_fp64 is None  # fp32: no fp64 pass, nothing kept


def test_model_converted_to_fp64_after_a_measurement_gets_fp64_norms() -> None:
    model = nn.Linear(10, 3)
    model.weight.grad = torch.ones(3, 10)
    assert gg.grad_stats(model).total_fp64 is None
    model.double()
    model.weight.grad = torch.full((3, 10), 1e100, dtype=torch.float64)
    stats = gg.grad_stats(model)
    assert stats.total_fp64 is not None
    assert float(stats.total_fp64) == pytest.approx(1e100 * math.sqrt(30), rel=1e-12)


def test_mixed_fp32_overflow_and_fp64_gradients() -> None:
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False).double())
    model[0].weight.grad = torch.full((1, 4), 1e25)  # its fp32 norm overflows
    model[1].weight.grad = torch.full((1, 4), 1e40, dtype=torch.float64)
    stats = gg.grad_stats(model)
    assert bool(stats.finite)
    assert bool(stats.overflow)
    assert stats.total_fp64 is not None
    assert float(stats.total_fp64) == pytest.approx(2e40, rel=1e-12)
    model[0].weight.grad[0, 0] = math.nan
    stats = gg.grad_stats(model)
    assert not bool(stats.finite)
    assert not bool(stats.overflow)


# --- the source fingerprint -----------------------------------------------------------------


def test_check_source_accepts_fresh_statistics_and_names_the_stale_tensor() -> None:
    model = Encoder()
    backward(model)
    stats = gg.grad_stats(model)
    stats.check_source(model)
    stats.check_source()
    assert stats.versions is not None
    assert len(stats.versions) == len(stats.names)
    assert model.head.bias.grad is not None
    model.head.bias.grad.mul_(2)  # one tensor written in place
    with pytest.raises(ConfigError, match=r"'head.bias' was written in place"):
        stats.check_source(model)


def test_check_source_tells_a_gradient_set_to_none_or_appearing() -> None:
    model = Encoder()
    backward(model)
    model.head.weight.grad = None
    stats = gg.grad_stats(model)
    model.head.weight.grad = torch.zeros_like(model.head.weight)
    with pytest.raises(ConfigError, match="'head.weight' had no gradient when measured"):
        stats.check_source()
    stats = gg.grad_stats(model)
    model.embed.weight.grad = None
    with pytest.raises(ConfigError, match="'embed.weight' has had its .grad set to None"):
        stats.check_source()


def test_check_source_compares_the_parameters_themselves() -> None:
    model = Encoder()
    backward(model)
    stats = gg.grad_stats(model)
    stats.check_source(model.named_parameters())  # the same tensors, another layout object
    n = len(stats.names)
    with pytest.raises(ConfigError, match=f"measured on other parameters: {n} tensors"):
        stats.check_source(list(model.named_parameters())[:-1])
    with pytest.raises(ConfigError, match=f"not this model's {n} trainable ones"):
        gg.grad_stats(model.layers).check_source(model)


def test_fingerprint_false_records_no_versions_but_still_sees_replacement() -> None:
    model = Encoder()
    backward(model)
    stats = gg.grad_stats(model, fingerprint=False)
    assert stats.versions is None
    assert model.head.bias.grad is not None
    model.head.bias.grad.mul_(2)
    stats.check_source(model)  # in-place writes go unseen without the versions
    model.zero_grad(set_to_none=True)
    backward(model)
    with pytest.raises(ConfigError, match="new .grad tensor"):
        stats.check_source(model)


def test_fingerprint_survives_resolve() -> None:
    model = nn.Linear(10, 1, bias=False)
    model.weight.grad = torch.full((1, 10), 1e25)
    stats = gg.grad_stats(model, resolve=False).resolve()
    assert stats.versions is not None
    stats.check_source(model)


def test_layout_is_cached_and_rebuilt_when_trainability_changes() -> None:
    model = Encoder()
    backward(model)
    gg.grad_stats(model)
    layout = stats_module._LAYOUTS[model]
    gg.grad_stats(model)
    assert stats_module._LAYOUTS[model] is layout
    model.head.requires_grad_(False)
    stats = gg.grad_stats(model)
    assert stats_module._LAYOUTS[model] is not layout
    assert "head.weight" not in stats.names
    model.head.requires_grad_(True)
    assert "head.weight" in gg.grad_stats(model).names
    stats_module.forget(model)
    assert model not in stats_module._LAYOUTS


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=3),
        min_size=1,
        max_size=8,
    ),
    scale=st.floats(min_value=1e-6, max_value=1e6),
    seed=st.integers(0, 2**16),
)
def test_property_norms_equal_the_loop_oracle(
    shapes: list[list[int]], scale: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Module()
    for i, shape in enumerate(shapes):
        p = nn.Parameter(torch.empty(shape))
        p.grad = torch.randn(shape, generator=generator) * scale
        model.register_parameter(f"p{i}", p)
    assert_matches_oracle(model, gg.grad_stats(model), rel=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grad_stats_does_not_sync_on_cuda() -> None:
    model = Encoder().cuda()
    model(torch.randn(5, 3, device="cuda")).sum().backward()
    gg.grad_stats(model)  # builds and caches the layout (host->device copies of indices)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = gg.grad_stats(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not stats.resolved
    assert_matches_oracle(model, stats, rel=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_norms_of_many_tensors_of_one_shape_are_bitwise_torchs_per_tensor_norms(
    dtype: torch.dtype, threads: int
) -> None:
    """On the CPU small tensors of one shape are measured stacked: the same bits."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(12, 12) for _ in range(30)), nn.Linear(12, 300)).to(dtype)
    for i, p in enumerate(model.parameters()):
        p.grad = (torch.randn_like(p, dtype=torch.float64) * 10.0 ** (i % 7 - 3)).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = gg.grad_stats(model)
    finally:
        torch.set_num_threads(previous)
    grads = [p.grad for p in model.parameters()]
    wide = None if dtype == torch.float64 else torch.float32
    expected = torch.stack(list(torch._foreach_norm(grads, 2.0, dtype=wide)))  # type: ignore[arg-type]
    layout = stats_module.layout_for(model)
    assert layout.shape_batches is not None  # the stacked path ran
    measured = stats.per_tensor if stats.per_tensor_fp64 is None else stats.per_tensor_fp64
    assert torch.equal(measured, expected.to(measured.dtype))


def test_a_sparse_gradient_among_one_shape_falls_back_to_tensor_by_tensor_norms() -> None:
    model = nn.ModuleList([nn.Embedding(6, 4, sparse=True), nn.Embedding(6, 4), nn.Linear(4, 4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].weight.grad = torch.randn(6, 4).to_sparse()
    stats = gg.grad_stats(model)
    for norm, p in zip(stats.per_tensor.tolist(), model.parameters(), strict=True):
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad  # type: ignore[union-attr]
        assert norm == pytest.approx(float(grad.norm()), rel=1e-6)
