"""The regularization experiment: L2 weight decay and dropout, weights, gradients, gap."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LabRuns
from gradguard import lab
from gradguard.lab import regularization as rg
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots

# The quick run's verdicts, seed 0. Three seed-text claims do not reproduce at this scale:
# regularization holds the late gradient norm *up* (the unregularized net's gradient decays
# as it fits the data), and dropout widens the cross-entropy gap (its test accuracy is not
# lower, its errors are more confident). Reported as not reproduced, with the numbers.
# Added later: dropout narrows the accuracy gap (the paper's measure); in a regime where
# the unregularized gradient does grow (noisy labels, depth 6) neither L2 nor dropout keeps
# it below 0.8x: not reproduced either.
EXPECTED = {
    "weights-grow-without-regularization": True,
    "l2-restrains-weight-growth": True,
    "l2-gradient-at-equilibrium": True,
    "l2-restrains-gradient-norm": False,
    "dropout-restrains-gradient-norm": False,
    "l2-narrows-generalization-gap": True,
    "dropout-narrows-generalization-gap": False,
    "dropout-narrows-accuracy-gap": True,
    "gradient-grows-without-regularization": True,
    "l2-restrains-gradient-growth": False,
    "dropout-restrains-gradient-growth": False,
}


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> tuple[lab.LabResult, list[int]]:
    """One quick run through ``lab.run``, recording the thread count inside every training."""
    result, threads = lab_runs.quick("regularization", spy=rg)
    return result, threads


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: tuple[lab.LabResult, list[int]]) -> dict[str, Any]:
    return lab_runs.stored(quick[0])


def _runs(stored: dict[str, Any]) -> dict[str, rg.Run]:
    return {r.arm: r for r in map(rg.Run.from_dict, stored["measurements"])}


def test_quick_run_gives_the_recorded_verdicts(quick: tuple[lab.LabResult, list[int]]) -> None:
    (result,) = quick[0].experiments
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == list(EXPECTED)
    assert {c.id: c.passed for c in result.claims} == EXPECTED
    by_id = {c.id: c for c in result.claims}
    # Not a near miss: the regularized late gradient norms are several times larger.
    assert by_id["l2-restrains-gradient-norm"].values[0] > 2
    assert by_id["dropout-restrains-gradient-norm"].values[0] > 10
    # The growth regime is real (the gradient grows several-fold), and the regularizers'
    # restraint is a few per cent at most, far from the 0.8x asked.
    assert by_id["gradient-grows-without-regularization"].values[0] > 5
    assert by_id["l2-restrains-gradient-growth"].values[0] > 0.9
    assert by_id["dropout-restrains-gradient-growth"].values[0] > 0.85


def test_every_arm_is_trained_single_threaded_and_recorded(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    assert quick[1] == [1] * len(rg.ARMS)
    runs = _runs(stored)
    assert list(runs) == list(rg.ARMS)
    for run in runs.values():
        steps = rg.GROWTH_STEPS if rg.is_noisy(run.arm) else rg.STEPS
        assert len(run.loss) == len(run.grad_norm) == steps
        assert len(run.norm_steps) == len(run.param_norm) == steps // rg.NORM_EVERY + 1
        window = steps // 10
        assert run.late_grad_norm == pytest.approx(sum(run.grad_norm[-window:]) / window)
        assert run.early_grad_norm == pytest.approx(sum(run.grad_norm[:window]) / window)
    # Same init in every arm of a regime: the regularizers act only during training.
    for arms in (rg.CLEAN_ARMS, rg.NOISY_ARMS):
        assert len({runs[arm].param_norm[0] for arm in arms}) == 1
    assert runs["none"].grad_norm[0] == runs["l2"].grad_norm[0]
    assert runs["noisy-none"].grad_norm[0] == runs["noisy-l2"].grad_norm[0]
    assert runs["noisy-none"].param_norm[0] != runs["none"].param_norm[0]


def test_noisy_labels_are_fixed_per_seed_and_redraw_about_30_percent() -> None:
    true = rg.load_digits().y_train
    labels = rg.noisy_labels(0)
    assert torch.equal(labels, rg.noisy_labels(0))
    assert not torch.equal(labels, rg.noisy_labels(1))
    wrong = float((labels != true).float().mean())
    assert 0.2 < wrong < 0.33  # 30 % redrawn, a tenth of them to the true class
    assert labels.dtype == true.dtype
    assert 0 <= int(labels.min()) <= int(labels.max()) <= 9


def test_a_run_is_deterministic(stored: dict[str, Any]) -> None:
    first = next(m for m in stored["measurements"] if m["arm"] == "l2")
    with single_thread():
        again = rg.train("l2", 0)
    assert again.to_dict() == first


def test_parameter_norm_and_the_equilibrium_measure_match_a_manual_computation() -> None:
    model = rg.build_model("dropout", seed=1)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    deep = rg.build_model("noisy-dropout", seed=1)
    assert [type(m) for m in deep] == [nn.Linear, nn.ReLU, nn.Dropout] * 6 + [nn.Linear]
    assert [type(m) for m in rg.build_model("noisy-l2", seed=1)] == [nn.Linear, nn.ReLU] * 6 + [
        nn.Linear
    ]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert rg.parameter_norm(model) == pytest.approx(float(flat.norm()), rel=1e-5)


def test_the_figure_is_written_from_the_json_alone(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick[0].run_dir / "regularization.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "regularization.png"
    ]


def test_claims_round_trip_and_pass_when_the_measurement_agrees(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    (result,) = quick[0].experiments
    runs = _runs(stored)
    assert rg.claims(list(runs.values()), (0,)) == result.claims
    none, noisy = runs["none"], runs["noisy-none"]
    calm = {
        "l2": dataclasses.replace(runs["l2"], late_grad_norm=none.late_grad_norm / 2),
        "dropout": dataclasses.replace(
            runs["dropout"],
            late_grad_norm=none.late_grad_norm / 2,
            test_loss=runs["dropout"].train_loss + none.gap / 2,
        ),
        **{
            arm: dataclasses.replace(runs[arm], late_grad_norm=noisy.late_grad_norm / 2)
            for arm in ("noisy-l2", "noisy-dropout")
        },
    }
    verdicts = {c.id: c.passed for c in rg.claims([none, noisy, *calm.values()], (0,))}
    assert all(verdicts.values()), verdicts
    grown = dataclasses.replace(none, param_norm=(none.param_norm[0],) * len(none.param_norm))
    flat = dataclasses.replace(noisy, late_grad_norm=noisy.early_grad_norm)
    changed = {c.id: c.passed for c in rg.claims([grown, flat, *calm.values()], (0,))}
    assert changed["weights-grow-without-regularization"] is False
    assert changed["gradient-grows-without-regularization"] is False
    assert not math.isnan(grown.weight_growth)
    worse = dataclasses.replace(runs["dropout"], test_accuracy=none.test_accuracy - 0.01)
    accuracy = {c.id: c.passed for c in rg.claims([none, noisy, *calm.values(), worse], (0,))}
    assert accuracy["dropout-narrows-accuracy-gap"] is False
