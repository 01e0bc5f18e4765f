"""The early-stopping experiment: Divergence stops an LR range test before NaN."""

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
from gradguard.lab import early_stopping as es
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> tuple[lab.LabResult, list[int]]:
    """One quick run through ``lab.run``, recording the thread count inside every training."""
    result, threads = lab_runs.quick("early-stopping", spy=es)
    return result, threads


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: tuple[lab.LabResult, list[int]]) -> dict[str, Any]:
    return lab_runs.stored(quick[0])


def _runs(stored: dict[str, Any]) -> dict[str, es.Run]:
    return {r.arm: r for r in map(es.Run.from_dict, stored["measurements"])}


def test_quick_run_reproduces_its_claims(quick: tuple[lab.LabResult, list[int]]) -> None:
    (result,) = quick[0].experiments
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == ["divergence-stops-before-nan", "no-false-alarm"]
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_the_timeline_is_consistent(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    assert quick[1] == [1] * len(es.ARMS)
    runs = _runs(stored)
    ramp = runs["ramp"]
    assert ramp.stop_step is not None
    assert ramp.divergence_onset is not None
    assert ramp.nonfinite_step is not None
    assert ramp.divergence_onset < ramp.stop_step < ramp.nonfinite_step
    assert ramp.stop_step % es.LOG_EVERY == 0  # decided at a drain
    divergence = next(e for e in ramp.events if e["kind"] == "divergence")
    assert divergence["extra"]["detected_at"] == ramp.stop_step
    assert len(ramp.loss) == ramp.nonfinite_step  # trained on past the stop, up to NaN
    assert all(math.isfinite(v) for v in ramp.loss[: ramp.stop_step])
    assert ramp.lr[:3] == pytest.approx([0.1, 0.102, 0.104])
    healthy = runs["healthy"]
    assert healthy.stop_step is None
    assert healthy.nonfinite_step is None
    assert len(healthy.loss) == es.HEALTHY_STEPS
    abrupt = runs["abrupt"]
    assert abrupt.nonfinite_step is not None
    assert abrupt.stop_step is None  # too fast for five log intervals: no claim about it


def test_the_guarded_run_is_the_unguarded_run_up_to_nan(stored: dict[str, Any]) -> None:
    """A guard without a clip policy only measures: a plain loop takes the same steps."""
    ramp = _runs(stored)["ramp"]
    assert ramp.nonfinite_step is not None
    data = es.regression(0)
    model = es.build_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=es.LR)
    stream = data.batches()
    losses = []
    with single_thread():
        for step in range(1, ramp.nonfinite_step):
            for group in optimizer.param_groups:
                group["lr"] = es.lr_at("ramp", step)
            index = next(stream)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(data.x[index]), data.y[index])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(loss.item())
    assert losses == list(ramp.loss[: ramp.nonfinite_step - 1])


def test_a_run_is_deterministic(stored: dict[str, Any]) -> None:
    first = next(m for m in stored["measurements"] if m["arm"] == "healthy")
    with single_thread():
        again = es.train("healthy", 0)
    assert again.to_dict() == first


def test_the_figure_is_written_from_the_json_alone(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick[0].run_dir / "early-stopping.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "early-stopping.png"
    ]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    (result,) = quick[0].experiments
    runs = _runs(stored)
    assert es.claims(list(runs.values()), (0,)) == result.claims
    ramp = runs["ramp"]
    assert ramp.nonfinite_step is not None

    def verdicts(**changes: es.Run) -> dict[str, bool]:
        changed = [changes.get(r.arm, r) for r in runs.values()]
        return {c.id: c.passed for c in es.claims(changed, (0,))}

    late = dataclasses.replace(ramp, stop_step=ramp.nonfinite_step + 10)
    never = dataclasses.replace(ramp, stop_step=None)
    no_nan = dataclasses.replace(ramp, nonfinite_step=None)
    for arm in (late, never, no_nan):
        assert verdicts(ramp=arm)["divergence-stops-before-nan"] is False
    alarm = {"kind": "divergence", "step": 100}
    noisy = dataclasses.replace(runs["healthy"], events=(alarm,))
    assert verdicts(healthy=noisy) == {"divergence-stops-before-nan": True, "no-false-alarm": False}
