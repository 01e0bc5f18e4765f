"""The selu experiment: a 32-layer SELU net self-normalizes; ReLU under LeCun init stalls."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradguard import lab
from gradguard.lab import initialization as ini
from gradguard.lab import selu
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots

CLAIM_IDS = [
    "selu-unit-variance",
    "selu-zero-mean",
    "relu-same-init-vanishes",
    "selu-gradient-stable",
    "relu-gradient-vanishes",
    "selu-trains",
    "relu-same-init-stalls",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # As in the experiment: one thread gives the experiment's bits and no oversubscription.
    with single_thread():
        yield


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> lab.LabResult:
    return lab.run(["selu"], quick=True, out=tmp_path_factory.mktemp("selu"), progress=False)


@pytest.fixture(scope="module")
def stored(quick: lab.LabResult) -> dict[str, Any]:
    data = json.loads((quick.run_dir / "results.json").read_text(encoding="utf-8"))
    (experiment,) = data["experiments"]
    assert isinstance(experiment, dict)
    return experiment


def test_quick_run_reproduces_its_claims(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.name == "selu"
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == CLAIM_IDS
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_every_activation_is_stored_with_per_layer_statistics(stored: dict[str, Any]) -> None:
    runs = [ini.Run.from_dict(m) for m in stored["measurements"]]
    assert [(r.activation, r.init, r.depth) for r in runs] == [
        (a, "lecun", selu.DEPTH) for a in selu.ACTIVATIONS
    ]
    for run in runs:
        assert len(run.hidden_std) == len(run.hidden_mean) == selu.DEPTH
        assert len(run.relative_grad) == selu.DEPTH + 1
        assert run.log_steps[-1] == selu.STEPS
    verdicts = {r.activation: r.verdict for r in runs}
    assert verdicts["selu"] == "healthy"
    assert verdicts["relu"] == "vanishing"


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "selu.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == ["selu.png"]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    runs = [ini.Run.from_dict(m) for m in stored["measurements"]]
    assert selu.claims(runs, (0,)) == result.claims

    def verdicts(activation: str, **changes: Any) -> dict[str, bool]:
        changed = [
            dataclasses.replace(r, **changes) if r.activation == activation else r for r in runs
        ]
        return {c.id: c.passed for c in selu.claims(changed, (0,))}

    failed_training = verdicts("selu", final_loss=1.0)
    assert failed_training.pop("selu-trains") is False
    assert all(failed_training.values())
    drift = (1.0,) * (selu.DEPTH - 1) + (3.0,)
    assert verdicts("selu", hidden_std=drift)["selu-unit-variance"] is False
    assert verdicts("selu", gradient_ratio=100.0)["selu-gradient-stable"] is False
    assert verdicts("relu", final_loss=0.5)["relu-same-init-stalls"] is False
    assert verdicts("relu", hidden_std=(0.5,) * selu.DEPTH)["relu-same-init-vanishes"] is False


def test_selu_chi_matches_a_monte_carlo_estimate() -> None:
    h = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h.requires_grad_(True)
    (derivative,) = torch.autograd.grad(torch.selu(h).sum(), h)
    assert float(derivative.square().mean()) == pytest.approx(selu.SELU_CHI, rel=2e-3)
    assert pytest.approx(selu.SELU_CHI**16) == selu.SELU_GRADIENT_RATIO
    assert 2.5 < selu.SELU_GRADIENT_RATIO < 3.5


def test_mixed_activations_in_one_stack_match_each_network() -> None:
    activations = ["selu", "selu", "relu", "tanh"]
    models = []
    for k, activation in enumerate(activations):
        model = ini.build_mlp(3, activation)
        ini.initialize_mlp(model, "lecun", k, torch.zeros(1))
        models.append(model)
    stacked = ini.StackedMLP(models, activations)
    assert [(first, end) for _, first, end in stacked.groups] == [(0, 2), (2, 3), (3, 4)]
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = stacked(x)
        for k, model in enumerate(models):
            torch.testing.assert_close(logits[k], model(x[k]), rtol=1e-5, atol=1e-6)


def test_lecun_init_is_the_same_for_every_activation() -> None:
    weights = []
    for activation in selu.ACTIVATIONS:
        model = ini.build_mlp(selu.DEPTH, activation)
        ini.initialize_mlp(model, "lecun", 2, torch.zeros(1))
        weights.append([layer.weight.detach() for layer in ini.linears(model)])
        assert isinstance(model[1], type(ini.ACTIVATIONS[activation][0]()))
    for other in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], other, strict=True))
    hidden = torch.cat([w.flatten() for w in weights[0][1:-1]])
    assert float(hidden.std()) == pytest.approx(1 / math.sqrt(selu.WIDTH), rel=0.02)
    assert isinstance(ini.build_mlp(1, "selu")[1], nn.SELU)
