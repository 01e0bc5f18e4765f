"""The depth-activation experiment: data, init schemes, the measurement, and the physics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from sklearn.datasets import load_digits as sklearn_load_digits
from torch import nn

from gradguard.errors import ConfigError
from gradguard.lab import data
from gradguard.lab import depth_activation as da
from gradguard.lab._records import ExperimentResult

Calls = list[tuple[int, int, int]]  # (done, total, threads while running)


@pytest.fixture(scope="module")
def quick() -> tuple[ExperimentResult, Calls, int]:
    """One quick run, started with 2 threads; returns the threads left after it."""
    calls: Calls = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = da.EXPERIMENT.run(
            quick=True,
            seed=0,
            progress=lambda d, t: calls.append((d, t, torch.get_num_threads())),
        )
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return result, calls, after


def _loop_layer_norms(model: da.MLP) -> list[float]:
    """Brute-force oracle: per Linear layer, sqrt(sum of squared fp64 norms of its grads)."""
    norms = []
    for layer in model.linears():
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        squares = sum(float(g.double().norm()) ** 2 for g in grads)
        norms.append(math.sqrt(squares))
    return norms


# --- data ------------------------------------------------------------------------------------


def test_digits_split_is_fixed_standardized_and_cached() -> None:
    digits = data.load_digits()
    assert digits.x_train.shape == (1437, 64)
    assert digits.x_test.shape == (360, 64)
    assert digits.x_train.dtype == digits.x_test.dtype == torch.float32
    assert digits.y_train.dtype == torch.int64
    assert data.load_digits() is digits

    raw = sklearn_load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    assert torch.equal(digits.y_train, torch.as_tensor(raw.target)[perm[:1437]])
    assert torch.equal(digits.y_test, torch.as_tensor(raw.target)[perm[1437:]])

    std = digits.x_train.std(dim=0)
    constant = std == 0
    assert constant.any(), "digits has pixels that are always 0 in training"
    assert (digits.x_train[:, constant] == 0).all()
    assert (digits.x_test[:, constant] == 0).all()
    torch.testing.assert_close(digits.x_train.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[~constant], torch.ones(int((~constant).sum())))


# --- initialization --------------------------------------------------------------------------


def test_default_init_is_nn_linear_draw_for_draw_without_touching_global_rng() -> None:
    torch.manual_seed(7)
    reference = [nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)]
    state = torch.get_rng_state()
    model = da.build(depth=2, activation="tanh", init="default", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for ours, theirs in zip(model.linears(), reference, strict=True):
        assert torch.equal(ours.weight, theirs.weight)
        assert torch.equal(ours.bias, theirs.bias)


@pytest.mark.parametrize(
    ("activation", "expected_std"),
    [
        ("tanh", math.sqrt(2 / (128 + 128))),  # Xavier
        ("relu", math.sqrt(2 / 128)),  # He
        ("leaky_relu", math.sqrt(2 / (1 + da.LEAKY_SLOPE**2) / 128)),  # He for leaky slopes
        ("selu", math.sqrt(1 / 128)),  # LeCun
    ],
)
def test_matched_schemes_have_the_published_weight_std_and_zero_bias(
    activation: str, expected_std: float
) -> None:
    model = da.build(depth=30, activation=activation, init="matched", seed=0)
    hidden = torch.cat([layer.weight.detach().flatten() for layer in model.linears()[1:-1]])
    assert float(hidden.std()) == pytest.approx(expected_std, rel=0.01)
    assert all(not layer.bias.any() for layer in model.linears())


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'orthogonal'.*'xavier'"):
        da.initialize(da.MLP(2, "tanh"), "orthogonal", torch.Generator())


# --- the measurement -------------------------------------------------------------------------


@pytest.mark.parametrize(("activation", "init"), [("tanh", "default"), ("relu", "matched")])
def test_per_layer_norms_equal_a_brute_force_loop(activation: str, init: str) -> None:
    model = da.build(depth=10, activation=activation, init=init, seed=1)
    x, y = da.batch(1)
    measured = da.probe(model, x, y)
    expected = _loop_layer_norms(model)
    assert measured["layer_names"] == tuple(f"net.{2 * i}" for i in range(11))
    assert measured["grad_norms"] == pytest.approx(expected, rel=1e-5)
    probe = da.run_probe(activation, init, 10, 1)
    assert probe.ratio == pytest.approx(expected[0] / expected[-1], rel=1e-5)


def test_activation_and_backprop_traces_match_a_manual_pass() -> None:
    model = da.build(depth=5, activation="elu", init="default", seed=2)
    x, y = da.batch(2)
    measured = da.probe(model, x, y)

    model.zero_grad(set_to_none=True)
    outputs = []
    h = x
    for module in model.net:
        h = module(h)
        if isinstance(module, nn.Linear):
            h.retain_grad()
            outputs.append(h)
    nn.functional.cross_entropy(h, y).backward()  # type: ignore[no-untyped-call]
    hidden_std = [
        float(m(o.detach()).std()) for m, o in zip(list(model.net)[1::2], outputs, strict=False)
    ]
    assert measured["activation_std"] == pytest.approx(hidden_std, rel=1e-6)
    assert measured["backprop_std"] == pytest.approx(
        [float(o.grad.std()) for o in outputs], rel=1e-6
    )
    loss = nn.functional.cross_entropy(h.detach(), y)
    assert measured["loss"] == pytest.approx(float(loss), rel=1e-6)


def test_underflowed_first_layer_is_flagged_not_mistaken_for_a_zero_gradient() -> None:
    model = da.build(depth=30, activation="sigmoid", init="default", seed=0)
    measured = da.probe(model, *da.batch(0))
    flagged = measured["underflow_layers"]
    names = list(measured["layer_names"])
    assert flagged[0] == "net.0"
    assert flagged == names[: len(flagged)], "the gradient vanishes from the input side"
    assert len(flagged) < len(names) // 2
    oracles = _loop_layer_norms(model)
    for name, norm, oracle in zip(names, measured["grad_norms"], oracles, strict=True):
        if name in flagged:
            assert norm == 0.0
            assert oracle > 0  # the gradient itself is not 0
        else:
            assert norm == pytest.approx(oracle, rel=1e-3)
    clean = da.probe(da.build(5, "sigmoid", "default", 0), *da.batch(0))
    assert clean["underflow_layers"] == []


# --- the physics -----------------------------------------------------------------------------


def test_sigmoid_standard_init_gradient_vanishes_by_many_orders_at_depth_30() -> None:
    assert da.run_probe("sigmoid", "default", 30, 0).ratio < 1e-12
    # Not an fp32 artefact alone: at depth 20 the norm is still representable and tiny.
    assert 0 < da.run_probe("sigmoid", "default", 20, 0).ratio < 1e-12


def test_he_init_keeps_relu_within_an_order_of_magnitude_where_default_collapses() -> None:
    for depth in da.DEPTHS:
        assert 0.1 < da.run_probe("relu", "matched", depth, 0).ratio < 10
    assert da.run_probe("relu", "default", 30, 0).ratio < 1e-8


def test_xavier_keeps_tanh_near_one_while_standard_init_shrinks_with_depth() -> None:
    ratios = [da.run_probe("tanh", "default", d, 0).ratio for d in da.DEPTHS]
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[-1] < 1e-4
    assert 0.5 < da.run_probe("tanh", "matched", 30, 0).ratio < 2


def test_relu_default_decays_at_the_predicted_rate_per_layer() -> None:
    r10 = da.run_probe("relu", "default", 10, 3).ratio
    r20 = da.run_probe("relu", "default", 20, 3).ratio
    assert (r20 / r10) ** (1 / 10) == pytest.approx(math.sqrt(1 / 6), rel=0.15)


# --- the experiment --------------------------------------------------------------------------


def test_quick_run_probes_every_configuration_and_reports_progress(
    quick: tuple[ExperimentResult, Calls, int],
) -> None:
    result, calls, _ = quick
    assert result.seeds == (0,)
    assert len(result.measurements) == len(da.ACTIVATIONS) * len(da.INITS) * len(da.DEPTHS)
    assert [(d, t) for d, t, _ in calls] == [(d, 48) for d in range(1, 49)]
    assert {c.id for c in result.claims} >= {
        "sigmoid-standard-vanishes",
        "tanh-normalized-flat",
        "relu-he-flat",
    }
    assert result.all_passed, [c.id for c in result.claims if not c.passed]


def test_claims_fail_when_the_measurement_contradicts_them(
    quick: tuple[ExperimentResult, Calls, int],
) -> None:
    result, _, _ = quick
    probes = [da.Probe.from_dict(m) for m in result.measurements]
    assert da.claims(probes, (0,)) == result.claims  # the records round-trip
    flipped = [
        dataclasses.replace(p, ratio=0.5)
        if (p.activation, p.init, p.depth) == ("sigmoid", "default", 30)
        else p
        for p in probes
    ]
    verdicts = {c.id: c.passed for c in da.claims(flipped, (0,))}
    assert verdicts.pop("sigmoid-standard-vanishes") is False
    assert all(verdicts.values())


def test_experiment_runs_single_threaded_and_restores_the_thread_count(
    quick: tuple[ExperimentResult, Calls, int],
) -> None:
    _, calls, after = quick
    assert {threads for _, _, threads in calls} == {1}
    assert after == 2
