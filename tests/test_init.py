"""gradguard.init: the scheme per following activation, recurrent and attention weights,
the records returned, LSUV, and the errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import gradguard as gg
from gradguard.errors import ConfigError, UnsupportedModelError
from gradguard.init import (
    LINEAR,
    Activation,
    expected_std,
    initialize,
    lsuv,
    set_forget_bias,
    trace_followers,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread, as the lab runs: tiny kernels stall when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Functional(nn.Module):
    """Activations called as functions, which only torch.fx sees."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)
        self.bn = nn.BatchNorm1d(256)
        self.c = nn.Linear(256, 256)
        self.d = nn.Linear(256, 256)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.a(x))
        x = F.leaky_relu(self.bn(self.b(x)), 0.2)
        x = torch.tanh(self.c(x) + x)  # through a residual sum
        return self.d(x)


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.act = nn.SELU()
        self.b = nn.Linear(256, 256)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = -x
        return self.b(self.act(self.a(x)))


def test_followers_from_fx_see_functional_activations() -> None:
    found = trace_followers(Functional())
    assert found == {
        "a": Activation("relu"),
        "b": Activation("leaky_relu", 0.2),
        "c": Activation("tanh"),
        "d": LINEAR,
    }


def test_followers_fall_back_to_run_and_registration_order() -> None:
    model = Dynamic()
    assert trace_followers(model) == {"a": Activation("selu"), "b": LINEAR}
    assert trace_followers(model, torch.randn(4, 256)) == {"a": Activation("selu"), "b": LINEAR}


def test_transformer_feed_forward_is_initialized_for_its_activation() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, activation="gelu")
    assert trace_followers(layer)["linear1"] == Activation("gelu")
    records = {f"{r.layer}.{r.parameter}": r for r in initialize(layer)}
    assert records["linear1.weight"].scheme == "he"
    assert records["self_attn.in_proj_weight"].scheme == "xavier"
    assert records["norm1.weight"].scheme == "reset"


@pytest.mark.parametrize(
    ("layer", "scheme", "gain"),
    [
        ("a", "he", math.sqrt(2)),
        ("b", "he", math.sqrt(2 / (1 + 0.2**2))),
        ("c", "xavier", 1.0),
        ("d", "xavier", 1.0),
    ],
)
def test_auto_picks_the_scheme_and_gain_of_the_following_activation(
    layer: str, scheme: str, gain: float
) -> None:
    torch.manual_seed(0)
    model = Functional()
    records = {r.layer: r for r in initialize(model)}
    record = records[layer]
    assert record.scheme == scheme
    assert record.gain == pytest.approx(gain)
    weight = getattr(model, layer).weight.detach()
    act = trace_followers(Functional())[layer]
    assert float(weight.std()) == pytest.approx(expected_std(weight, scheme, act), rel=0.05)
    assert record.std == pytest.approx(float(weight.std()))
    assert torch.count_nonzero(getattr(model, layer).bias) == 0
    assert record.bias == "zeros"


def test_selu_gets_lecun_and_norm_layers_are_reset() -> None:
    torch.manual_seed(0)
    model = Dynamic()
    records = {r.layer: r for r in initialize(model)}
    assert records["a"].scheme == "lecun"
    assert float(model.a.weight.detach().std()) == pytest.approx(1 / 16, rel=0.05)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0)
        bn.bias.fill_(1.0)
    initialize(bn)
    assert torch.equal(bn.weight, torch.ones(4))
    assert torch.equal(bn.bias, torch.zeros(4))


@pytest.mark.parametrize("scheme", ["xavier", "he", "lecun", "orthogonal"])
def test_named_schemes_apply_to_every_layer(scheme: str) -> None:
    torch.manual_seed(0)
    model = Functional()
    records = initialize(model, scheme)
    assert {r.scheme for r in records if r.module == "Linear"} == {scheme}
    if scheme == "orthogonal":
        w = model.c.weight.detach()  # tanh follows: gain 1
        assert torch.allclose(w @ w.T, torch.eye(256), atol=1e-4)
        w = model.a.weight.detach()  # ReLU follows: gain √2
        assert torch.allclose(w @ w.T, 2 * torch.eye(256), atol=1e-4)


def test_recurrent_weights_are_orthogonal_per_gate_and_inputs_xavier() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(10, 16, num_layers=2, bidirectional=True)
    records = initialize(lstm, forget_bias=1.0)
    by_name = {r.parameter: r for r in records}
    assert by_name["weight_hh_l1_reverse"].scheme == "orthogonal"
    assert by_name["weight_ih_l0"].scheme == "xavier"
    assert by_name["weight_ih_l0"].bias == "forget=1"
    for block in lstm.weight_hh_l0.detach().chunk(4):
        assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    radius = torch.linalg.eigvals(lstm.weight_hh_l0.detach()[16:32].double()).abs().max()
    assert float(radius) == pytest.approx(1.0, abs=1e-5)  # orthogonal: every |eigenvalue| is 1
    total = lstm.bias_ih_l0.detach() + lstm.bias_hh_l0.detach()
    assert torch.allclose(total[16:32], torch.ones(16))
    assert torch.count_nonzero(total[:16]) == 0
    assert torch.count_nonzero(total[32:]) == 0


def test_set_forget_bias_checks_its_module() -> None:
    cell = nn.LSTMCell(3, 5)
    set_forget_bias(cell, 2.0)
    assert torch.allclose((cell.bias_ih + cell.bias_hh)[5:10], torch.full((5,), 2.0))
    with pytest.raises(UnsupportedModelError, match="LSTM"):
        set_forget_bias(nn.GRU(3, 5), 1.0)  # type: ignore[arg-type]


def test_initialize_errors() -> None:
    with pytest.raises(ConfigError, match="scheme must be one of auto, xavier"):
        initialize(nn.Linear(2, 2), "kaiming")
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        initialize("model")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match="no layer it knows"):
        initialize(nn.Embedding(4, 4))


def test_initialize_is_reproducible_with_the_global_seed() -> None:
    torch.manual_seed(3)
    a = Functional()
    initialize(a)
    torch.manual_seed(3)
    b = Functional()
    initialize(b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_gg_init_is_the_module() -> None:
    assert gg.init.initialize is initialize
    assert gg.init.lsuv is lsuv


# --------------------------------------------------------------------------- LSUV


def output_stds(model: nn.Module, x: Tensor) -> list[float]:
    stds: list[float] = []
    handles = [
        m.register_forward_hook(lambda _m, _a, out: stds.append(float(out.std())))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return stds


def deep_relu(depth: int = 32, width: int = 64) -> nn.Sequential:
    return nn.Sequential(*(m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())))


def test_lsuv_gives_every_layer_unit_variance() -> None:
    torch.manual_seed(0)
    model = deep_relu()
    x = torch.randn(256, 64)
    records = lsuv(model, x)
    assert len(records) == 32
    assert all(r.converged and r.iterations <= 10 for r in records)
    for std in output_stds(model, x):
        assert abs(std**2 - 1) < 0.1


def test_lsuv_rescues_a_vanishing_relu_network() -> None:
    """The lab's E7b: 32 x 64 ReLU layers, orthogonal gain 1, vanish; LSUV fixes it."""
    torch.manual_seed(0)
    model = deep_relu()
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight)
            nn.init.zeros_(module.bias)
    x = torch.randn(256, 64)
    assert gg.diagnose(model, x).verdict == "vanishing"
    lsuv(model, x, orthogonal=False)
    assert gg.diagnose(model, x).verdict == "healthy"


def test_lsuv_target_and_restored_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 8))
    running = [b.clone() for b in model.buffers()]
    x = torch.randn(128, 16)
    rng = torch.get_rng_state()
    records = lsuv(model, x, target_std=0.5, tol=0.05, orthogonal=False)
    assert [r.layer for r in records] == ["0", "3"]
    for record in records:
        assert abs(record.std**2 / 0.25 - 1) < 0.05
    for before, after in zip(running, model.buffers(), strict=True):
        assert torch.equal(before, after)
    assert torch.equal(rng, torch.get_rng_state())


def test_lsuv_reports_a_dead_layer_instead_of_dividing_by_zero() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    records = lsuv(model, torch.randn(32, 4), orthogonal=False)
    assert records[0].converged is False
    assert records[0].std == 0.0
    assert records[1].converged is False  # zero input: rescaling cannot reach the target


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_std": 0.0}, "target_std"),
        ({"tol": 1.5}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_lsuv_validates_its_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        lsuv(nn.Linear(2, 2), torch.randn(4, 2), **kwargs)  # type: ignore[arg-type]


def test_lsuv_needs_a_layer_that_runs() -> None:
    with pytest.raises(UnsupportedModelError, match="no Linear/Conv layer"):
        lsuv(nn.Sequential(nn.ReLU()), torch.randn(4, 2))
