"""The adaptive-clipping experiment: spikes, loss scale, AGC, the claims and the figure."""

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
from gradguard.errors import ConfigError
from gradguard.lab import adaptive_clipping as ac
from gradguard.lab._harness import single_thread
from gradguard.lab.data import load_digits
from gradguard.lab.plots import write_plots


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> lab.LabResult:
    result: lab.LabResult = lab_runs.quick("adaptive-clipping")[0]
    return result


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: lab.LabResult) -> dict[str, Any]:
    return lab_runs.stored(quick)


def _records(stored: dict[str, Any]) -> list[ac.RunRecord]:
    return [ac.RunRecord.from_dict(m) for m in stored["measurements"]]


# --- the experiment --------------------------------------------------------------------------


def test_quick_run_reproduces_its_claims(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == [
        "no-clip-diverges-under-spikes",
        "fixed-clip-works-at-its-scale",
        "adaptive-clip-absorbs-spikes",
        "adaptive-clip-ignores-loss-scale",
        "fixed-clip-fails-at-another-scale",
        "fixed-clip-always-on-at-another-scale",
        "zclip-leaves-clean-runs-alone",
        "agc-trains-no-norm-net-at-high-lr",
        "no-agc-fails-at-high-lr",
        "agc-is-not-spike-protection",
    ]
    assert result.all_passed, [(c.id, c.values, c.note) for c in result.claims if not c.passed]


def test_every_arm_shares_the_seeds_spike_schedule(stored: dict[str, Any]) -> None:
    records = _records(stored)
    spiked = [r for r in records if r.part == "spikes" and r.condition != "clean"]
    assert {(r.method, r.condition) for r in records if r.part == "spikes"} == set(ac.QUICK_ARMS)
    schedule = tuple(sorted(ac.spike_schedule(0)))
    assert all(r.spikes == schedule for r in spiked)
    assert all(r.spikes == () for r in records if r.condition == "clean")
    for r in records:
        if r.diverged_step is None:
            steps = ac.STEPS if r.part == "spikes" else ac.RES_STEPS
            assert len(r.loss) == len(r.grad_norm) == steps
        else:
            assert math.isnan(r.final_loss)
            assert len(r.loss) == r.diverged_step
    # The spikes are in the traces: the unclipped gradient norm jumps ~1000x on a spike step.
    norm = next(r for r in records if (r.method, r.condition) == ("norm", "spikes"))
    spike = schedule[0]
    assert norm.grad_norm[spike - 1] > 100 * norm.grad_norm[spike - 2]


def test_claims_round_trip_and_fail_when_contradicted(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    records = _records(stored)
    assert ac.claims(records, (0,)) == result.claims
    assert ac.tables(records, (0,)) == result.tables

    def verdicts(method: str, condition: str, **changes: Any) -> dict[str, bool]:
        changed = [
            dataclasses.replace(r, **changes)
            if (r.part, r.method, r.condition) == ("spikes", method, condition)
            else r
            for r in records
        ]
        return {c.id: c.passed for c in ac.claims(changed, (0,))}

    assert not verdicts("zclip", "spikes_x100", final_loss=0.5)["adaptive-clip-ignores-loss-scale"]
    assert not verdicts("none", "spikes", final_loss=1e-4)["no-clip-diverges-under-spikes"]
    assert not verdicts("zclip", "clean", clip_fraction=0.3)["zclip-leaves-clean-runs-alone"]
    assert not verdicts("norm", "spikes_x100", clip_fraction=0.5)[
        "fixed-clip-always-on-at-another-scale"
    ]


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "adaptive-clipping.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "adaptive-clipping.png"
    ]


# --- the mechanisms the claims rest on -------------------------------------------------------


def test_loss_x100_with_lr_over_100_leaves_unclipped_sgd_unchanged() -> None:
    """The premise of the scale condition: only a clipping policy sees the difference."""
    digits = load_digits()
    x, y = digits.x_train[:64], digits.y_train[:64]
    finals = []
    for scale in (1.0, ac.LOSS_SCALE):
        model = ac.build_mlp(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=ac.LR / scale, momentum=ac.MOMENTUM)
        with single_thread():
            for _ in range(20):
                optimizer.zero_grad()
                (scale * nn.functional.cross_entropy(model(x), y)).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-6)


def test_runs_are_deterministic_and_leave_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    with single_thread():
        first = ac.spike_run("zclip", "spikes", seed=4, traced=True)
        second = ac.spike_run("zclip", "spikes", seed=4, traced=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == second


def test_spike_schedule_is_seeded_and_starts_after_step_50() -> None:
    schedule = ac.spike_schedule(0)
    assert schedule == ac.spike_schedule(0)
    assert schedule != ac.spike_schedule(1)
    assert min(schedule) > ac.SPIKE_AFTER
    assert set(schedule.values()) == {"spike"}
    counts = [len(ac.spike_schedule(s)) for s in range(20)]
    expected = (ac.STEPS - ac.SPIKE_AFTER) * ac.SPIKE_PROBABILITY
    assert sum(counts) / len(counts) == pytest.approx(expected, rel=0.25)


def test_models_use_he_init_and_scale_the_residual_branches() -> None:
    mlp = ac.build_mlp(0)
    hidden = mlp[2].weight.detach()
    assert float(hidden.std()) == pytest.approx(math.sqrt(2 / ac.WIDTH), rel=0.05)
    assert all(not layer.bias.any() for layer in mlp if isinstance(layer, nn.Linear))
    res = ac.build_residual(0)
    first, second = res.blocks[0][1].weight.detach(), res.blocks[0][3].weight.detach()
    he = math.sqrt(2 / ac.RES_WIDTH)
    assert float(first.std()) == pytest.approx(he, rel=0.1)
    assert float(second.std()) == pytest.approx(ac.RES_BRANCH_GAIN * he, rel=0.1)


def test_unknown_method_or_condition_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'sgd'"):
        ac.make_policy("sgd")
    with pytest.raises(ConfigError, match="'noisy'"):
        ac.spike_run("none", "noisy", seed=0)
