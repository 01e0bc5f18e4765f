"""The normalization experiment: sigmoid MLPs with and without BatchNorm / LayerNorm."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LabRuns
from gradguard import lab
from gradguard.lab import normalization as nm
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots

CLAIM_IDS = [
    "sigmoid-plateau-without-bn",
    "bn-lifts-sigmoid-plateau",
    "ln-lifts-sigmoid-plateau",
    "bn-tolerates-high-lr",
    "deep-sigmoid-at-chance-without-bn",
    "bn-trains-deep-sigmoid",
    "deep-sigmoid-gradient-vanishes",
    "bn-restores-gradient-flow",
]


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> tuple[lab.LabResult, list[int]]:
    """One quick run through ``lab.run``, recording the thread count inside every training."""
    result, threads = lab_runs.quick("normalization", spy=nm)
    return result, threads


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: tuple[lab.LabResult, list[int]]) -> dict[str, Any]:
    return lab_runs.stored(quick[0])


def test_quick_run_reproduces_its_claims(quick: tuple[lab.LabResult, list[int]]) -> None:
    (result,) = quick[0].experiments
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == CLAIM_IDS
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_every_setting_and_norm_is_trained_single_threaded(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    result, threads = quick
    assert threads == [1] * len(nm.SETTINGS) * len(nm.NORMS)
    runs = [nm.Run.from_dict(m) for m in stored["measurements"]]
    assert {(r.setting, r.norm) for r in runs} == {
        (s.key, n) for s in nm.SETTINGS for n in nm.NORMS
    }
    for run in runs:
        assert len(run.loss) == len(run.grad_norm) == nm.STEPS
        assert len(run.layer_steps) == len(run.layer_norms) == nm.STEPS // nm.LOG_EVERY
        assert len(run.linear_names) == run.depth + 1
        assert run.layer_norms[0] == run.init_norms
    deep = {r.norm: r for r in runs if r.setting == "deep"}
    # The guard's Vanishing detector sees what the claim measures.
    assert "vanishing" in deep["none"].event_kinds()
    assert "vanishing" not in deep["batch"].event_kinds()


def test_a_run_is_deterministic(stored: dict[str, Any]) -> None:
    first = next(
        m for m in stored["measurements"] if (m["setting"], m["norm"]) == ("deep", "batch")
    )
    with single_thread():
        again = nm.train(nm.SETTING_BY_KEY["deep"], "batch", 0)
    assert again.to_dict() == first


def test_build_model_places_the_norm_before_each_sigmoid_and_keeps_the_global_rng() -> None:
    state = torch.get_rng_state()
    model = nm.build_model(3, "layer", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.Sigmoid] * 3 + [nn.Linear]
    torch.manual_seed(5)
    assert torch.equal(model[0].weight, nn.Linear(64, nm.WIDTH).weight)  # default init


def test_the_figure_is_written_from_the_json_alone(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick[0].run_dir / "normalization.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "normalization.png"
    ]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    (result,) = quick[0].experiments
    runs = [nm.Run.from_dict(m) for m in stored["measurements"]]
    assert nm.claims(runs, (0,)) == result.claims
    stalled = [
        dataclasses.replace(r, test_accuracy=0.1) if (r.setting, r.norm) == ("deep", "batch") else r
        for r in runs
    ]
    verdicts = {c.id: c.passed for c in nm.claims(stalled, (0,))}
    assert verdicts.pop("bn-trains-deep-sigmoid") is False
    assert all(verdicts.values())
