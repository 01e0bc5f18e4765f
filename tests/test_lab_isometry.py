"""The isometry experiment: Jacobian spectra of deep nets and deep linear nets' learning time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LabRuns
from gradguard import lab
from gradguard.lab import isometry as iso
from gradguard.lab._harness import single_thread
from gradguard.lab.data import N_CLASSES, load_digits
from gradguard.lab.plots import write_plots

CLAIM_IDS = [
    "orthogonal-tanh-isometric",
    "orthogonal-tanh-sigma-max",
    "linear-orthogonal-exact",
    "gaussian-tanh-spread",
    "gaussian-tanh-sigma-max",
    "relu-orthogonal-spread",
    "large-q-not-isometric",
    "linear-gaussian-spread-grows",
    "diagnose-sigma-max",
    "orthogonal-no-depth-slowdown",
    "gaussian-slower-or-diverges",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # As in the experiment: one thread gives the experiment's bits and no oversubscription.
    with single_thread():
        yield


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> lab.LabResult:
    result: lab.LabResult = lab_runs.quick("isometry")[0]
    return result


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: lab.LabResult) -> dict[str, Any]:
    return lab_runs.stored(quick)


def _parts(experiment: dict[str, Any]) -> tuple[list[iso.Spectrum], list[iso.LinearRun]]:
    rows = experiment["measurements"]
    spectra = [iso.Spectrum.from_dict(r) for r in rows if r["part"] == "spectrum"]
    linear = [iso.LinearRun.from_dict(r) for r in rows if r["part"] == "linear"]
    return spectra, linear


# --- the experiment ----------------------------------------------------------------------------


def test_quick_run_reproduces_its_claims(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.name == "isometry"
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == CLAIM_IDS
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_results_json_holds_every_spectrum_and_run(stored: dict[str, Any]) -> None:
    spectra, linear = _parts(stored)
    assert [(s.network, s.depth) for s in spectra] == [
        (net.name, d) for net in iso.NETWORKS for d in iso.DEPTHS
    ]
    deepest = max(iso.DEPTHS)
    for s in spectra:
        kept = s.depth == deepest
        assert len(s.singular_values) == (iso.N if kept else 0)
        assert (s.diagnose_sigma_max is not None) is kept
        if kept:
            assert list(s.singular_values) == sorted(s.singular_values, reverse=True)
            assert s.sigma_max == s.singular_values[0]
    assert [(r.init, r.depth) for r in linear] == [
        (i, d) for i in iso.SAXE_INITS for d in iso.SAXE_DEPTHS
    ]
    for run in linear:
        if run.outcome == "reached":
            assert run.steps == len(run.loss) - 1
            assert run.loss[-1] < iso.SAXE_TARGET <= min(run.loss[:-1])


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "isometry.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == ["isometry.png"]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    spectra, linear = _parts(stored)
    assert iso.claims(spectra, linear, (0,)) == result.claims

    def verdicts(
        network: str | None = None, init: str | None = None, **changes: Any
    ) -> dict[str, bool]:
        new_spectra = [
            dataclasses.replace(s, **changes)
            if s.network == network and s.depth == max(iso.DEPTHS)
            else s
            for s in spectra
        ]
        new_linear = [
            dataclasses.replace(r, **changes) if r.init == init and r.depth == 32 else r
            for r in linear
        ]
        return {c.id: c.passed for c in iso.claims(new_spectra, new_linear, (0,))}

    spread = verdicts("tanh-orthogonal", var_sq=3.0)
    assert spread.pop("orthogonal-tanh-isometric") is False
    assert all(spread.values())
    assert verdicts("relu-orthogonal", var_sq=1.0)["relu-orthogonal-spread"] is False
    assert verdicts("tanh-gaussian", sigma_max=1.5)["diagnose-sigma-max"] is False
    assert (
        verdicts(init="orthogonal", steps=None, outcome="diverged")["orthogonal-no-depth-slowdown"]
        is False
    )
    assert (
        verdicts(init="gaussian", steps=None, outcome="diverged")["gaussian-slower-or-diverges"]
        is True
    )
    assert (
        verdicts(init="gaussian", steps=1, outcome="reached")["gaussian-slower-or-diverges"]
        is False
    )


def test_spectra_are_deterministic(stored: dict[str, Any]) -> None:
    spectra, _ = _parts(stored)
    net = next(n for n in iso.NETWORKS if n.name == "tanh-orthogonal")
    again = iso.measure_spectra(net, 0)
    assert again == [s for s in spectra if s.network == net.name]


# --- the machinery -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tanh-gaussian", "relu-orthogonal", "linear-gaussian"])
def test_exact_spectrum_equals_the_svd_of_the_layer_product(name: str) -> None:
    """The estimator's exact mode against J = Π D_l W_l accumulated layer by layer."""
    net = next(n for n in iso.NETWORKS if n.name == name)
    model = iso.build_network(net, 6, 4)
    x = iso.network_input(net, 4)[:1]
    jacobian = torch.eye(iso.N, dtype=torch.float64)
    h = x.double()
    for linear, act in zip(model[0::2], model[1::2], strict=True):
        w, b = linear.weight.detach().double(), linear.bias.detach().double()
        pre = h @ w.T + b
        if isinstance(act, nn.Tanh):
            slope = 1 - torch.tanh(pre).square()
        elif isinstance(act, nn.ReLU):
            slope = (pre > 0).double()
        else:
            slope = torch.ones_like(pre)
        jacobian = (slope.T * w) @ jacobian
        h = act(pre)
    expected = torch.linalg.svdvals(jacobian)
    measured = iso.singular_values(model, x, 0)
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-5)


def test_orthogonal_weights_and_prefix_nets() -> None:
    net = next(n for n in iso.NETWORKS if n.name == "tanh-orthogonal")
    deep, shallow = iso.build_network(net, 8, 1), iso.build_network(net, 3, 1)
    w = deep[2].weight.detach()
    torch.testing.assert_close(w @ w.T, net.sigma_w**2 * torch.eye(iso.N), atol=1e-4, rtol=0)
    for a, b in zip(shallow.parameters(), list(deep.parameters())[:6], strict=True):
        assert torch.equal(a, b)


def test_critical_points_match_the_reference_and_have_unit_chi() -> None:
    sw, sb = iso.tanh_critical_point(1 / 64)
    assert (round(sw, 3), round(sb, 3)) == (1.015, 0.002)
    assert iso.tanh_critical_point(1.0) == pytest.approx((1.467, 0.389), abs=1e-3)
    z = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for q in (1 / 64, 1.0):
        sw, sb = iso.tanh_critical_point(q)
        h = math.sqrt(q) * z
        chi = sw**2 * float((1 - torch.tanh(h).square()).square().mean())
        fixed = sw**2 * float(torch.tanh(h).square().mean()) + sb**2
        assert chi == pytest.approx(1.0, rel=2e-3)
        assert fixed == pytest.approx(q, rel=2e-3)


def test_qr_form_gives_the_full_batch_loss_and_gradient() -> None:
    data = iso.regression()
    digits = load_digits()
    y = nn.functional.one_hot(digits.y_train, N_CLASSES).float()
    model = iso.build_linear(2, "gaussian", 0)
    loss = data.loss(model)
    (grad,) = torch.autograd.grad(loss, [model[0].weight])
    full = (model(digits.x_train) - y).square().sum(dim=1).mean()
    (full_grad,) = torch.autograd.grad(full, [model[0].weight])
    assert float(loss.detach()) == pytest.approx(float(full.detach()), rel=1e-4)
    torch.testing.assert_close(grad, full_grad, rtol=1e-3, atol=1e-6)
    assert iso.least_squares_optimum() == pytest.approx(0.4067, abs=1e-3)


def test_linear_runs_stop_at_the_target_or_at_a_divergence() -> None:
    data = iso.regression()
    run = iso.train_linear(data, "orthogonal", 1, 0)
    assert run.outcome == "reached"
    assert run.steps is not None
    assert run.steps == len(run.loss) - 1
    assert run.loss == iso.train_linear(data, "orthogonal", 1, 0).loss  # deterministic
    bad = dataclasses.replace(data, r=data.r * 1e4)  # a learning rate far too large for it
    diverged = iso.train_linear(bad, "gaussian", 1, 0)
    assert (diverged.steps, diverged.outcome) == (None, "diverged")
    assert not diverged.loss[-1] < iso.SAXE_DIVERGED
