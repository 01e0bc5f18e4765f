"""The optimizers-lr experiment: high-LR SGD, adaptive optimizers, warm-up and clipping."""

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
from gradguard.lab import optimizers_lr as ol
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots

# The quick run's verdicts, seed 0. None: the two warm-up spike claims, whose verdict on
# seed 0 depends on the machine. The warmed-up BN net at LR up to 5 has sporadic loss
# spikes whose size is chaotic in the last bits of the arithmetic: with the same code, torch
# and seed, step 47-48 spikes to 1.68x the initial loss on the machine the lab was written
# on and to 1.04x on another (docs/lab.md, row 10). Their numbers are checked below instead.
EXPECTED: dict[str, bool | None] = {
    "sgd-usual-lr-converges": True,
    "sgd-high-lr-blows-up": True,
    "guard-clip-rescues-high-lr": True,
    "adam-converges": True,
    "rmsprop-converges": True,
    "adagrad-converges": True,
    "constant-high-lr-spikes-early": True,
    "warmup-removes-early-spike": None,
    "warmup-no-spike-at-transition": None,
    "warmup-decay-converges": True,
}


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> tuple[lab.LabResult, list[int]]:
    """One quick run through ``lab.run``, recording the thread count inside every training."""
    result, threads = lab_runs.quick("optimizers-lr", spy=ol)
    return result, threads


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: tuple[lab.LabResult, list[int]]) -> dict[str, Any]:
    return lab_runs.stored(quick[0])


def _runs(stored: dict[str, Any]) -> dict[str, ol.Run]:
    return {r.arm: r for r in map(ol.Run.from_dict, stored["measurements"])}


def test_quick_run_gives_the_recorded_verdicts(quick: tuple[lab.LabResult, list[int]]) -> None:
    (result,) = quick[0].experiments
    assert result.seeds == (0,)
    assert list(EXPECTED) == [c.id for c in result.claims]
    by_id = {c.id: c for c in result.claims}
    for claim_id, verdict in EXPECTED.items():
        if verdict is not None:
            assert by_id[claim_id].passed is verdict, claim_id
    spike = by_id["warmup-removes-early-spike"].values[0]
    transition = by_id["warmup-no-spike-at-transition"].values[0]
    for claim_id in ("warmup-removes-early-spike", "warmup-no-spike-at-transition"):
        assert by_id[claim_id].passed is (by_id[claim_id].values[0] < 1.5)
    # Whichever machine: warm-up at least halves the constant-LR spike, never goes above
    # 2x the initial loss in its first 50 steps, and the longer window contains the shorter.
    assert 1.0 <= spike < 2.0
    assert transition >= spike
    assert by_id["constant-high-lr-spikes-early"].values[0] > 2 * spike


def test_every_arm_is_trained_single_threaded_and_recorded(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    assert quick[1] == [1] * len(ol.ARMS)
    runs = _runs(stored)
    assert list(runs) == [a.name for a in ol.ARMS]
    high = runs["sgd-high"]
    assert high.nonfinite_step is not None
    assert len(high.loss) == high.nonfinite_step  # an unguarded run stops at its first NaN
    assert math.isnan(high.final_loss)
    assert high.events == ()
    clipped = runs["sgd-high-clip"]
    assert len(clipped.loss) == ol.STEPS
    assert clipped.nonfinite_step is None
    assert 0 < clipped.clipped_fraction < 1
    assert runs["sgd"].clipped_fraction == 0
    assert runs["bn-warmup"].lr[0] == pytest.approx(ol.BN_LR / ol.WARMUP)
    assert runs["bn-warmup"].lr[ol.WARMUP - 1] == pytest.approx(ol.BN_LR)
    assert runs["bn-constant"].lr == (ol.BN_LR,) * ol.STEPS


def test_the_guard_without_faults_steps_like_plain_sgd_until_it_clips(
    stored: dict[str, Any],
) -> None:
    runs = _runs(stored)
    plain, guarded = runs["sgd-high"], runs["sgd-high-clip"]
    first_clip = next(i for i, n in enumerate(guarded.grad_norm) if n > ol.CLIP)
    assert plain.loss[: first_clip + 1] == guarded.loss[: first_clip + 1]
    assert plain.grad_norm[: first_clip + 1] == pytest.approx(
        guarded.grad_norm[: first_clip + 1], rel=1e-6
    )


def test_a_run_is_deterministic(stored: dict[str, Any]) -> None:
    first = next(m for m in stored["measurements"] if m["arm"] == "sgd-high-clip")
    with single_thread():
        again = ol.train("sgd-high-clip", 0)
    assert again.to_dict() == first


def test_build_model_is_pytorch_default_init_and_keeps_the_global_rng() -> None:
    state = torch.get_rng_state()
    model = ol.build_model(batchnorm=True, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert [type(m) for m in model] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]
    torch.manual_seed(4)
    assert torch.equal(model[0].weight, nn.Linear(64, ol.WIDTH).weight)


def test_the_figure_is_written_from_the_json_alone(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick[0].run_dir / "optimizers-lr.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "optimizers-lr.png"
    ]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    (result,) = quick[0].experiments
    runs = list(_runs(stored).values())
    assert ol.claims(runs, (0,)) == result.claims

    def verdicts(arm: str, **changes: Any) -> dict[str, bool]:
        changed = [dataclasses.replace(r, **changes) if r.arm == arm else r for r in runs]
        return {c.id: c.passed for c in ol.claims(changed, (0,))}

    usual = runs[0].final_loss
    assert verdicts("sgd-high", final_loss=5 * usual)["sgd-high-lr-blows-up"] is False
    assert verdicts("sgd-high", final_loss=20 * usual)["sgd-high-lr-blows-up"] is True
    assert verdicts("sgd-high-clip", final_loss=math.nan)["guard-clip-rescues-high-lr"] is False
    assert verdicts("bn-warmup", early_peak=1.1)["warmup-removes-early-spike"] is True
    assert verdicts("bn-warmup", early_peak=1.6)["warmup-removes-early-spike"] is False
    spiked = verdicts("bn-warmup", early_peak=1.1, transition_peak=2.4)
    assert spiked["warmup-removes-early-spike"] is True
    assert spiked["warmup-no-spike-at-transition"] is False
    assert verdicts("bn-warmup", transition_peak=1.2)["warmup-no-spike-at-transition"] is True
    assert verdicts("adam", final_loss=2.3)["adam-converges"] is False
