"""The pathological half of the detection corpus: every pathology is real.

Each test runs one scenario's quick variant (seed 0) and checks the pathology on the run's
own measurements (its losses and ``notes``), never on what a detector says.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import detection_faulty as faulty  # noqa: E402
from detection_common import RunResult  # noqa: E402

NAMES = (
    "deep_sigmoid_mlp",
    "deep_relu_normal",
    "tanh_rnn_radius3",
    "dead_relu",
    "lr_burst_early",
    "lr_burst_late",
    "poisoned_batch",
    "nan_log0",
    "fp16_overflow",
    "slow_divergence",
    "layer_lr_too_high",
    "tanh_small_init",
    "adam_lr_too_high",
)
SCENARIOS = {scenario.name: scenario for scenario in faulty.SCENARIOS}
_RUNS: dict[str, RunResult] = {}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick(name: str) -> RunResult:
    """The quick variant of a scenario on seed 0, run once per test session."""
    if name not in _RUNS:
        _RUNS[name] = SCENARIOS[name].run(0, True)
    return _RUNS[name]


def test_the_corpus_is_the_thirteen_labelled_pathologies() -> None:
    assert tuple(SCENARIOS) == NAMES
    for scenario in faulty.SCENARIOS:
        assert not scenario.healthy
        assert scenario.expect is not None
        assert scenario.expect.kinds
        assert scenario.expect.onset >= 1
        assert scenario.expect.within >= 0
        assert scenario.label_reason
        assert scenario.description


@pytest.mark.parametrize("name", NAMES)
def test_run_is_consistent_with_its_label(name: str) -> None:
    result = quick(name)
    expect = SCENARIOS[name].expect_for(True)
    assert expect is not None
    assert result.steps == len(result.losses) > expect.onset + expect.within
    if expect.layer is not None:
        assert any(layer.startswith(expect.layer) for layer in result.layer_names)
    bad = [i + 1 for i, loss in enumerate(result.losses) if not math.isfinite(loss)]
    if bad:
        assert result.first_nonfinite_step is not None
        assert result.first_nonfinite_step <= bad[0]
    if expect.before_nonfinite and result.first_nonfinite_step is not None:
        assert result.first_nonfinite_step > expect.onset


def test_deep_sigmoid_mlp_gradient_vanishes_toward_the_input() -> None:
    notes = quick("deep_sigmoid_mlp").notes
    assert notes["first_over_last_grad_max"] < 1e-4  # measured: below 1e-15 at every step
    assert notes["loss_last20"] == pytest.approx(faulty.CHANCE_LOSS, rel=0.05)


def test_deep_relu_normal_is_huge_but_finite_at_step_one() -> None:
    result = quick("deep_relu_normal")
    notes = result.notes
    assert 1e6 < notes["loss_step1"] < math.inf
    assert 1e6 < notes["grad_norm_step1"] < math.inf
    assert notes["smallest_layer_grad_step1"] > 1e6  # every layer, not one
    assert notes["first_bias_grad_step1"] > 1e5 * notes["last_bias_grad_step1"]
    assert result.first_nonfinite_step is not None
    assert result.first_nonfinite_step <= 5


def test_tanh_rnn_radius3_explodes_then_blows_up() -> None:
    result = quick("tanh_rnn_radius3")
    notes = result.notes
    assert notes["rnn_grad_norm_step1"] > 1e3  # radius 0.9: 2.5-7.5
    assert notes["loss_max_finite"] > 1e6 * notes["loss_step1"]
    assert result.first_nonfinite_step is not None


def test_dead_relu_layers_get_exactly_zero_gradient_and_loss_stays_at_chance() -> None:
    notes = quick("dead_relu").notes
    assert notes["dead_max_preactivation"] < 0.0
    assert notes["dead_grad_max"] == 0.0
    assert notes["zero_grad_layers"] == 2
    assert notes["first_zero_grad_layer_index"] == 0
    assert notes["live_grad_min_of_max"] > 0.0
    assert notes["loss_max_rel_dev_from_chance"] < 0.05


def test_lr_burst_early_hits_a_falling_loss_and_blows_it_up() -> None:
    result = quick("lr_burst_early")
    notes = result.notes
    assert notes["loss_drop_10_steps_before"] > 0.3  # still falling steeply
    assert notes["jump"] >= 5.0
    assert faulty.EARLY_BURST < notes["peak_step"] <= faulty.EARLY_BURST + 10
    assert notes["steps_to_recover"] >= 10 or math.isnan(notes["steps_to_recover"])


def test_lr_burst_late_blows_up_a_flat_loss() -> None:
    notes = quick("lr_burst_late").notes
    assert abs(notes["loss_drop_10_steps_before"]) < 0.05  # flat
    assert notes["jump"] >= 5.0
    assert faulty.LATE_BURST < notes["peak_step"] <= faulty.LATE_BURST + 10


def test_poisoned_batch_spikes_at_its_step() -> None:
    result = quick("poisoned_batch")
    notes = result.notes
    assert notes["loss_ratio"] >= 20.0  # measured: x44 (seeds 0-2: x44-124)
    assert notes["grad_norm_ratio_to_mean10"] >= 100.0
    step = faulty.POISON_STEP
    assert max(result.losses[: step - 1]) < result.losses[step - 1] / 5


def test_nan_log0_loss_is_inf_at_its_step_only() -> None:
    result = quick("nan_log0")
    notes = result.notes
    assert not math.isfinite(result.losses[faulty.LOG0_STEP - 1])
    assert notes["zero_probabilities_at_step"] >= 1
    assert notes["zero_probabilities_elsewhere"] == 0
    assert notes["nonfinite_losses"] == 1
    assert result.first_nonfinite_step == faulty.LOG0_STEP


def test_fp16_gradients_overflow_at_their_step_with_a_finite_loss() -> None:
    result = quick("fp16_overflow")
    notes = result.notes
    assert notes["max_grad_before"] < 1.0  # plain fp16 gradients are far from 65504
    assert not math.isfinite(notes["max_grad_at_step"])
    assert math.isfinite(notes["loss_at_step"])
    assert result.first_nonfinite_step == faulty.FP16_STEP
    assert all(math.isfinite(loss) for loss in result.losses)


def test_slow_divergence_rises_for_long_before_any_nan() -> None:
    result = quick("slow_divergence")
    notes = result.notes
    expect = SCENARIOS["slow_divergence"].expect_for(True)
    assert expect is not None
    assert abs(notes["ma_min_center_step"] - expect.onset) <= 10
    assert notes["rise"] >= 3.0
    assert notes["ma_100_steps_later_over_min"] >= 3.0
    assert result.first_nonfinite_step is None


def test_layer_lr_too_high_blows_up_that_layers_weights() -> None:
    notes = quick("layer_lr_too_high").notes
    assert notes["hot_weight_norm_growth"] >= 10.0
    assert notes["loss_peak_20"] >= 5.0 * notes["loss_step1"]
    assert notes["other_grad_growth_20_min"] > notes["hot_grad_growth_20"]


def test_tanh_small_init_gradient_vanishes_and_the_loss_stays_at_chance() -> None:
    notes = quick("tanh_small_init").notes
    assert notes["first_over_last_grad_max"] < 1e-4
    assert abs(notes["loss_last20"] - math.log(10)) < 0.05 * math.log(10)


def test_adam_lr_too_high_blows_up_at_once_and_never_trains() -> None:
    notes = quick("adam_lr_too_high").notes
    assert notes["loss_max_first10"] > 10 * math.log(10)
    assert notes["loss_last20"] > 0.9 * math.log(10)
