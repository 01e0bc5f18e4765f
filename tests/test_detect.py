"""Detectors on synthetic windows: each fires on its condition, stays silent on healthy data,
keeps one event per episode, and resumes from a JSON round trip of its state exactly."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard.detect
from gradguard.detect import (
    FP32_MAX,
    Detector,
    Divergence,
    Exploding,
    NonFinite,
    Overflow,
    Spike,
    Vanishing,
    default_detectors,
    detector_events_to_stop,
)
from gradguard.errors import ConfigError, GradGuardError
from gradguard.records import Event, Window

ArrayLike = Sequence[float] | np.ndarray[Any, Any]


def make_window(
    start: int = 1,
    *,
    n: int | None = None,
    loss: ArrayLike | None = None,
    grad_norm: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    skipped: ArrayLike | None = None,
    finite: ArrayLike | None = None,
    overflow: ArrayLike | None = None,
    per_layer: ArrayLike | None = None,
    per_tensor: ArrayLike | None = None,
    layer_names: Sequence[str] | None = None,
    tensor_names: Sequence[str] | None = None,
) -> Window:
    """A window of steps ``start, start + 1, ...``; unspecified columns are healthy.

    The loss is given wherever ``loss`` is passed (NaN values stay given: a NaN loss), the
    grad norm defaults to 1, ``finite`` to the finiteness of the grad norm and ``skipped``
    to ``~finite`` (the guard's "skip" mode). Per-layer norms default to two layers of 1.
    """
    arrays = [loss, grad_norm, scale, per_layer, per_tensor]
    if n is None:
        n = next(len(a) for a in arrays if a is not None)
    g = np.ones(n) if grad_norm is None else np.asarray(grad_norm, dtype=np.float64)
    over = np.zeros(n, bool) if overflow is None else np.asarray(overflow, dtype=bool)
    fin = np.isfinite(g) | over if finite is None else np.asarray(finite, dtype=bool)
    skip = ~fin if skipped is None else np.asarray(skipped, dtype=bool)
    s = np.ones(n) if scale is None else np.asarray(scale, dtype=np.float64)
    layers = np.ones((n, 2)) if per_layer is None else np.asarray(per_layer, dtype=np.float64)
    tensors = g[:, None].copy() if per_tensor is None else np.asarray(per_tensor, np.float64)
    window = Window(
        steps=np.arange(start, start + n, dtype=np.int64),
        loss=np.full(n, np.nan) if loss is None else np.asarray(loss, dtype=np.float64),
        loss_given=np.full(n, loss is not None),
        grad_norm=g,
        clipped_norm=g * s,
        scale=s,
        skipped=skip,
        finite=fin,
        overflow=over,
        lr=np.full(n, 1e-3),
        per_layer=layers,
        per_tensor=tensors,
        layer_names=tuple(layer_names or (f"l{j}" for j in range(layers.shape[1]))),
        tensor_names=tuple(tensor_names or (f"t{j}" for j in range(tensors.shape[1]))),
    )
    assert len(window) == n
    return window


def windows_of(size: int, **series: np.ndarray[Any, Any]) -> list[Window]:
    """Cut equal-length per-step series into consecutive windows of ``size`` steps."""
    n = len(next(iter(series.values())))
    return [
        make_window(start + 1, **{k: v[start : start + size] for k, v in series.items()})
        for start in range(0, n, size)
    ]


def dicts(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Events as dicts (NaN as "nan"), so NaN values compare equal; extra included."""
    return [event.to_dict() for event in events]


def run(detector: Detector, windows: Sequence[Window]) -> list[Event]:
    return [event for window in windows for event in detector.observe(window)]


def per_drain(detector: Detector, windows: Sequence[Window]) -> list[list[Event]]:
    return [detector.observe(window) for window in windows]


def lognormal(n: int, seed: int, sigma: float = 0.2) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).lognormal(0.0, sigma, n)


def flat_layer_windows(count: int, size: int = 10, seed: int = 0) -> list[Window]:
    """Healthy per-layer profile: five layers within a factor of ten, lognormal noise."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.1, 0.3, 1.0, 0.5, 0.2])
    return [
        make_window(1 + i * size, per_layer=scales * rng.lognormal(0.0, 0.5, (size, 5)))
        for i in range(count)
    ]


def layer_windows(profiles: Sequence[Sequence[float]], size: int = 4, **kw: Any) -> list[Window]:
    """One window per profile, every step of it with that per-layer norm profile."""
    return [
        make_window(1 + i * size, per_layer=np.tile(np.asarray(p, float), (size, 1)), **kw)
        for i, p in enumerate(profiles)
    ]


def median_windows(medians: Sequence[float], size: int = 5) -> list[Window]:
    """One window per median: grad norms spread evenly around it (median exact)."""
    spread = np.linspace(0.8, 1.2, size)
    return [make_window(1 + i * size, grad_norm=m * spread) for i, m in enumerate(medians)]


def loss_windows(means: Sequence[float], size: int = 4, spread: float = 0.01) -> list[Window]:
    """One window per mean loss: ``+-spread`` around it (mean exact up to rounding)."""
    offsets = np.resize([-spread, spread], size)
    return [make_window(1 + i * size, loss=m + offsets) for i, m in enumerate(means)]


# --- the contract every detector meets ---------------------------------------------------


def scenario_windows() -> list[Window]:
    """Sixty windows in which every detector has something to say, and something not to."""
    rng = np.random.default_rng(7)
    n, size = 600, 10
    loss = 3.0 * np.exp(-np.arange(n) / 300) + rng.normal(0, 0.01, n)
    grad = rng.lognormal(0.0, 0.2, n)
    grad[[150, 151, 152, 420]] *= 40.0  # spikes
    grad[200] = np.nan  # a non-finite step
    grad[210] = np.inf
    loss[300] = 50.0  # a loss spike
    grad[450:] *= np.repeat(4.0 ** np.arange(15), 10)  # explosion from step 451
    loss[520:] = 20.0 + rng.normal(0, 0.1, 80)  # divergence from step 521
    scale = np.minimum(1.0, 2.0 / grad)
    scale[~np.isfinite(grad)] = 1.0
    layers = np.tile([1e-5, 1e-2, 1.0], (n, 1)) * rng.lognormal(0, 0.1, (n, 3))
    layers[250:300, 0] = 1.0  # the vanishing layer recovers, then vanishes again
    layers[100:400, 1] = 0.0  # a layer with exactly zero gradient for a while
    tensors = np.tile(grad[:, None], (1, 2))
    tensors[200, 1] = np.nan
    overflow = np.zeros(n, bool)
    overflow[330] = True
    grad[330] = tensors[330, 0] = np.inf
    return windows_of(
        size,
        loss=loss,
        grad_norm=grad,
        scale=scale,
        per_layer=layers,
        per_tensor=tensors,
        overflow=overflow,
    )


DETECTORS: list[Callable[[], Detector]] = [
    NonFinite,
    Overflow,
    lambda: Spike(),
    lambda: Spike(window=16, sigma=3.0, min_samples=8, metrics=("grad_norm",)),
    lambda: Vanishing(),
    lambda: Vanishing(threshold=0.05, patience=1, ignore_zero=True),
    lambda: Exploding(),
    lambda: Exploding(growth=3.0, patience=2, clip_fraction=0.5),
    lambda: Divergence(),
    lambda: Divergence(tolerance=0.0, patience=2, min_delta=0.01),
]


@pytest.fixture(params=range(len(DETECTORS)), ids=lambda i: f"detector{i}")
def factory(request: pytest.FixtureRequest) -> Callable[[], Detector]:
    return DETECTORS[request.param]


def test_every_detector_meets_the_protocol(factory: Callable[[], Detector]) -> None:
    detector = factory()
    assert isinstance(detector, Detector)
    assert detector.name in repr(type(detector)).lower()
    assert json.loads(json.dumps(detector.state_dict(), allow_nan=False)) is not None


def test_the_scenario_makes_every_detector_speak(factory: Callable[[], Detector]) -> None:
    events = run(factory(), scenario_windows())
    assert events, "the resume test below would prove nothing without events"
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert {e.kind for e in events} == {factory().name}
    assert all(e.message for e in events)
    assert all(json.dumps(e.to_dict(), allow_nan=False) for e in events)


@pytest.mark.parametrize("cut", [1, 15, 22, 31, 45, 53, 58])
def test_resuming_from_json_state_reproduces_an_uninterrupted_run(
    factory: Callable[[], Detector], cut: int
) -> None:
    windows = scenario_windows()
    uninterrupted = run(factory(), windows)

    first = factory()
    before = run(first, windows[:cut])
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = factory()
    resumed.load_state_dict(saved)
    after = run(resumed, windows[cut:])

    assert dicts(before + after) == dicts(uninterrupted)
    assert json.dumps(resumed.state_dict()) == json.dumps(run_state(factory, windows))


def run_state(factory: Callable[[], Detector], windows: Sequence[Window]) -> dict[str, Any]:
    detector = factory()
    run(detector, windows)
    return detector.state_dict()


def test_an_empty_or_unusable_window_leaves_state_untouched(
    factory: Callable[[], Detector],
) -> None:
    detector = factory()
    run(detector, scenario_windows()[:12])
    before = json.dumps(detector.state_dict())
    empty = make_window(121, n=0, grad_norm=[], per_layer=np.ones((0, 3)))
    nan_skipped = make_window(121, grad_norm=[np.nan] * 4, per_layer=np.full((4, 3), np.nan))
    assert detector.observe(empty) == []
    assert json.dumps(detector.state_dict()) == before
    detector.observe(nan_skipped)
    if isinstance(detector, NonFinite):  # its state is the streak of non-finite steps
        assert detector.state_dict() == {"streak": 4, "warned": True}
        return
    assert json.dumps(detector.state_dict()) == before


def test_load_state_dict_rejects_a_foreign_state(factory: Callable[[], Detector]) -> None:
    with pytest.raises(ConfigError, match="load_state_dict expects keys"):
        factory().load_state_dict({"unexpected": 1})


def test_default_detectors_cover_every_kind_once() -> None:
    detectors = default_detectors()
    assert [d.name for d in detectors] == [
        "nonfinite",
        "overflow",
        "spike",
        "vanishing",
        "exploding",
        "divergence",
    ]
    assert [type(d) for d in detectors] == [
        NonFinite,
        Overflow,
        Spike,
        Vanishing,
        Exploding,
        Divergence,
    ]
    assert detectors[0] is not default_detectors()[0]  # fresh objects, no shared state


def test_detect_imports_only_numpy_the_stdlib_records_errors_and_protocols() -> None:
    source = gradguard.detect.__file__
    assert source is not None
    # the package: its __init__ and the private modules it re-exports from
    nodes = [
        n
        for path in sorted(Path(source).parent.glob("*.py"))
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
    ]
    imported = {alias.name for n in nodes if isinstance(n, ast.Import) for alias in n.names}
    imported |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
    outside = {
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names | {"__future__", "numpy"}
        and not name.startswith("gradguard.detect.")
    }
    # protocols holds the Detector protocol and imports nothing of gradguard at run time;
    # _repr builds reprs with the stdlib alone (checked below)
    assert outside == {"gradguard._repr", "gradguard.errors", "gradguard.protocols"} | {
        "gradguard.records"
    }
    repr_source = Path(source).parent.parent / "_repr.py"
    repr_imports = {
        alias.name.split(".")[0]
        for n in ast.walk(ast.parse(repr_source.read_text(encoding="utf-8")))
        if isinstance(n, ast.Import | ast.ImportFrom)
        for alias in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])
    }
    assert repr_imports <= sys.stdlib_module_names | {"__future__"}


def test_detector_events_to_stop_only_on_divergence() -> None:
    kinds = ["nonfinite", "overflow", "spike", "vanishing", "exploding", "rollback"]
    events = [Event(step=i, kind=k, value=1.0, threshold=0.5) for i, k in enumerate(kinds)]
    assert not detector_events_to_stop(events)
    assert not detector_events_to_stop([])
    stop = Event(step=9, kind="divergence", value=9.0, threshold=2.0)
    assert detector_events_to_stop([*events, stop])
    assert detector_events_to_stop(iter([stop]))


# --- argument validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: Spike(window=1), "window must be an int >= 2, got 1"),
        (lambda: Spike(window=12.5), "window must be an int >= 2, got 12.5"),
        (lambda: Spike(window=True), "window must be an int >= 2, got True"),
        (lambda: Spike(sigma=0.0), "sigma must be a number in (0.0, inf), got 0.0"),
        (lambda: Spike(sigma=math.nan), "sigma must be a number in (0.0, inf), got nan"),
        (lambda: Spike(sigma="6"), "sigma must be a number in (0.0, inf), got '6'"),
        (lambda: Spike(min_samples=1), "min_samples must be an int >= 2, got 1"),
        (lambda: Spike(window=32, min_samples=33), "min_samples must be in [2, window=32], got 33"),
        (lambda: Spike(metrics=()), "metrics must be a non-empty sequence"),
        (lambda: Spike(metrics="loss"), "got 'loss'"),
        (lambda: Spike(metrics=("loss", "lr")), "('loss', 'grad_norm')"),
        (lambda: Spike(metrics=("loss", "loss")), "distinct names"),
        (lambda: Vanishing(threshold=0.0), "threshold must be a number in (0.0, 1.0), got 0.0"),
        (lambda: Vanishing(threshold=1.0), "threshold must be a number in (0.0, 1.0), got 1.0"),
        (lambda: Vanishing(patience=0), "patience must be an int >= 1, got 0"),
        (lambda: Vanishing(ignore_zero=1), "ignore_zero must be True or False, got 1"),
        (lambda: Exploding(growth=1.0), "growth must be a number in (1.0, inf), got 1.0"),
        (lambda: Exploding(growth=math.inf), "growth must be a number in (1.0, inf), got inf"),
        (lambda: Exploding(patience=-1), "patience must be an int >= 1, got -1"),
        (lambda: Exploding(clip_fraction=0), "clip_fraction must be a number in (0.0, 1.0], got 0"),
        (lambda: Exploding(clip_fraction=1.5), "clip_fraction must be a number in (0.0, 1.0]"),
        (lambda: Divergence(tolerance=-0.1), "tolerance must be a number in [0.0, inf), got -0.1"),
        (lambda: Divergence(patience=2.0), "patience must be an int >= 1, got 2.0"),
        (lambda: Divergence(min_delta=-1), "min_delta must be a number in [0.0, inf), got -1"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_argument_value_and_range(
    build: Callable[[], object], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert fragment in str(info.value)
    assert isinstance(info.value, GradGuardError)
    assert isinstance(info.value, ValueError)


def test_boundary_arguments_are_accepted() -> None:
    Spike(window=2, min_samples=2, sigma=0.5, metrics=["loss"])
    Vanishing(threshold=0.999, patience=1, ignore_zero=True)
    Exploding(growth=1.0001, patience=1, clip_fraction=1.0)
    Divergence(tolerance=0.0, patience=1, min_delta=0.0)


# --- NonFinite and Overflow -----------------------------------------------------------------


def test_nonfinite_fires_once_per_bad_step_naming_the_bad_tensors() -> None:
    window = make_window(
        41,
        grad_norm=[1.0, np.nan, 1.0, np.inf],
        per_tensor=[[1, 1, 1], [1, np.nan, np.inf], [1, 1, 1], [np.inf, 1, 1]],
        tensor_names=("fc1.weight", "fc1.bias", "fc2.weight"),
    )
    events = NonFinite().observe(window)
    assert [(e.step, e.kind, e.metric) for e in events] == [
        (42, "nonfinite", "grad_norm"),
        (44, "nonfinite", "grad_norm"),
    ]
    assert math.isnan(events[0].value)
    assert events[1].value == math.inf
    assert math.isnan(events[0].threshold)
    assert events[0].layers == ("fc1.bias", "fc2.weight")
    assert events[1].layers == ("fc1.weight",)
    message = events[0].message
    for words in ("NaN/Inf gradients", "skipped", "fc1.bias"):
        assert words in message
    # The symptom only: the guard's explainer adds the cause and advice that fits it.
    for words in ("learning rate", "epsilon", "bf16"):
        assert words not in message
    assert events[0].extra == {"skipped": True, "loss_finite": True}


def test_nonfinite_says_when_the_loss_itself_is_nan_and_when_the_step_was_not_skipped() -> None:
    window = make_window(1, loss=[np.nan, 1.0], grad_norm=[np.nan, np.nan], skipped=[0, 1])
    first, second = NonFinite().observe(window)
    assert "not skipped" in first.message
    assert "forward pass" in first.message
    assert "forward pass" not in second.message
    assert "step skipped" in second.message


def test_nonfinite_silent_on_finite_steps_and_leaves_an_overflowed_norm_to_overflow() -> None:
    healthy = make_window(1, grad_norm=lognormal(50, 0))
    assert NonFinite().observe(healthy) == []
    # an overflowed norm of finite elements: Overflow's, whatever ``finite`` says
    for finite in (True, False):
        window = make_window(1, grad_norm=[np.inf], overflow=[True], finite=[finite])
        assert NonFinite().observe(window) == []
        assert [e.kind for e in Overflow().observe(window)] == ["overflow"]


def test_overflow_fires_per_overflowed_step_with_fp32_max_as_threshold() -> None:
    window = make_window(
        7,
        grad_norm=[1.0, np.inf, 2.0],
        overflow=[False, True, False],
        per_tensor=[[1, 1], [3e38, np.inf], [1, 1]],
        tensor_names=("emb.weight", "head.weight"),
    )
    (event,) = Overflow().observe(window)
    assert (event.step, event.kind, event.metric) == (8, "overflow", "grad_norm")
    assert event.value == math.inf
    assert event.threshold == FP32_MAX == pytest.approx(3.4028235e38)
    assert event.layers == ("head.weight",)
    assert "overflowed fp32" in event.message
    assert "Clip the gradient norm" in event.message
    assert Overflow().observe(make_window(1, grad_norm=lognormal(50, 1))) == []


# --- Spike ------------------------------------------------------------------------------------


def reference_spikes(
    values: Sequence[float],
    window: int = 64,
    sigma: float = 6.0,
    min_samples: int = 8,
    min_factor: float = 2.0,
    reference: int = 8,
) -> list[tuple[int, float, float]]:
    """Brute force, in plain Python: (index, value, threshold) of each spike of a positive
    series; log scale, level = median of the last ``reference`` kept values, noise = 1.4826
    MAD of the kept values' steps / sqrt 2, spikes kept clipped to their threshold."""
    kept: list[float] = []
    found = []
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        x = math.log(v)
        past = kept[-window:]
        if len(past) >= min_samples:
            level = statistics.median(past[-reference:])
            steps = [b - a for a, b in pairwise(past)]
            centre = statistics.median(steps)
            noise = 1.4826 * statistics.median(abs(s - centre) for s in steps) / math.sqrt(2)
            limit = level + max(sigma * noise, math.log(min_factor)) + 1e-12 * abs(level)
            if x > limit:
                found.append((i, v, math.exp(limit)))
                x = limit
        kept.append(x)
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["loss", "grad_norm"])
@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_spike_is_silent_on_5000_steps_of_lognormal_noise(
    seed: int, metric: str, noise: float
) -> None:
    windows = windows_of(10, **{metric: lognormal(5000, seed, sigma=noise)})
    assert run(Spike(), windows) == []


def test_spike_fires_on_an_injected_spike_with_the_reference_threshold() -> None:
    grad = lognormal(400, 3)
    grad[300] = 50.0
    (event,) = run(Spike(metrics=("grad_norm",)), windows_of(10, grad_norm=grad))
    ((index, value, threshold),) = reference_spikes(list(grad))
    assert (event.step, event.kind, event.metric) == (index + 1, "spike", "grad_norm")
    assert event.value == value == 50.0
    assert event.threshold == pytest.approx(threshold, rel=1e-9)
    level = math.exp(np.median(np.log(grad[292:300])))
    assert event.extra["level"] == pytest.approx(level, rel=1e-9)
    assert "Gradient-norm spike" in event.message


def test_a_blow_up_during_the_steep_early_descent_is_a_warning() -> None:
    # The loss falls from 2.3 by 4 % a step with 5 % noise; at step 25 an LR burst sends it
    # up tenfold for three steps. A rolling mean and std over the descent cannot see it.
    rng = np.random.default_rng(1)
    loss = 2.3 * np.exp(-np.arange(100) / 25) * rng.lognormal(0, 0.05, 100)
    loss[24:27] *= 10.0
    events = run(Spike(metrics=("loss",)), windows_of(10, loss=loss))
    assert [e.step for e in events][:1] == [25]
    assert events[0].severity == "warning"
    assert "Check the batch" in events[0].message
    old_rule = reference_zscore(list(loss), window=128, sigma=6.0, min_samples=64)
    assert old_rule == []


def reference_zscore(
    values: Sequence[float], window: int, sigma: float, min_samples: int
) -> list[int]:
    """The rolling mean + sigma * std rule (OLMo-core's), for comparison."""
    history: list[float] = []
    found = []
    for i, v in enumerate(values):
        past = history[-window:]
        if len(past) >= min_samples:
            mean = sum(past) / len(past)
            std = math.sqrt(sum((x - mean) ** 2 for x in past) / len(past))
            if v - mean > sigma * std:
                found.append(i)
        history.append(v)
    return found


def test_a_loss_spike_is_info_unless_it_undoes_a_real_share_of_the_progress() -> None:
    rng = np.random.default_rng(2)
    base = np.concatenate([np.geomspace(2.3, 0.02, 200), np.full(200, 0.02)])
    base *= rng.lognormal(0, 0.05, 400)
    small, large = base.copy(), base.copy()
    small[300] = 0.3  # 15x the level, but 12 % of the way back to the start
    large[300] = 2.5  # back above where training started: the weights were hurt
    (info,) = run(Spike(metrics=("loss",)), windows_of(10, loss=small))
    (warning,) = run(Spike(metrics=("loss",)), windows_of(10, loss=large))
    assert (info.step, info.severity) == (301, "info")
    assert (warning.step, warning.severity) == (301, "warning")
    assert "No action needed" in info.message
    assert "undoes" in warning.message


def test_a_gradient_spike_is_info_with_a_loss_and_a_warning_without() -> None:
    loss, grad = 2.0 * lognormal(200, 4, 0.02), lognormal(200, 5)
    grad[150] = 30.0
    (with_loss,) = run(Spike(), windows_of(8, loss=loss, grad_norm=grad))
    (alone,) = run(Spike(), windows_of(8, grad_norm=grad))
    assert (with_loss.metric, with_loss.severity) == ("grad_norm", "info")
    assert (alone.metric, alone.severity) == ("grad_norm", "warning")


def test_spike_reports_loss_and_grad_norm_at_the_same_step_loss_first() -> None:
    loss, grad = 2.0 + 0.1 * lognormal(200, 4), lognormal(200, 5)
    loss[150], grad[150] = 9.0, 30.0
    events = run(Spike(), windows_of(8, loss=loss, grad_norm=grad))
    assert [(e.step, e.metric) for e in events] == [(151, "loss"), (151, "grad_norm")]
    assert "Loss spike" in events[0].message
    only_loss = run(Spike(metrics=("loss",)), windows_of(8, loss=loss, grad_norm=grad))
    assert [e.metric for e in only_loss] == ["loss"]


def test_a_spike_names_the_layer_that_jumped_most_first() -> None:
    rng = np.random.default_rng(3)
    layers = rng.lognormal(0, 0.1, (100, 4)) * [1.0, 0.5, 2.0, 0.1]
    grad = np.sqrt((layers**2).sum(axis=1))
    layers[60] *= [1.0, 3.0, 1.0, 400.0]  # the last layer moved most, the second a little
    grad[60] = np.sqrt((layers[60] ** 2).sum())
    (event,) = run(Spike(metrics=("grad_norm",)), windows_of(10, grad_norm=grad, per_layer=layers))
    assert event.layers == ("l3", "l1")
    assert "Largest jump in l3, l1" in event.message


def test_spike_matches_the_brute_force_reference_on_bursts_shifts_and_nans() -> None:
    rng = np.random.default_rng(11)
    values = rng.lognormal(2.0, 0.1, 3000)
    values[500:505] *= 8.0  # burst
    values[900] = np.nan
    values[1500:] *= 6.0  # level shift
    values[2000:2010] = np.inf
    events = run(Spike(metrics=("grad_norm",)), windows_of(7, grad_norm=values))
    expected = reference_spikes(list(values))
    assert [(e.step - 1, e.value) for e in events] == [(i, v) for i, v, _ in expected]
    assert [e.threshold for e in events] == pytest.approx([t for _, _, t in expected])
    assert {501, 502, 503, 504, 505} <= {e.step for e in events}


def test_spike_adapts_to_a_genuine_level_shift_within_a_bounded_number_of_steps() -> None:
    values = lognormal(1000, 6, 0.1)
    values[300:] *= 100.0
    events = run(Spike(metrics=("grad_norm",)), windows_of(10, grad_norm=values))
    assert 0 < len(events) < 32
    assert max(e.step for e in events) < 301 + 32


def test_a_nan_step_never_enters_the_spike_history() -> None:
    spike = Spike(window=32, min_samples=4, metrics=("loss", "grad_norm"))
    run(spike, windows_of(4, loss=np.full(8, 2.0), grad_norm=np.full(8, 1.0)))
    before = spike.state_dict()["history"]
    # step 9: NaN grads (skipped); step 10: finite grads, inf loss; step 11: inf grad norm
    bad = make_window(9, loss=[np.nan, np.inf, 2.0], grad_norm=[np.nan, 1.0, np.inf])
    assert spike.observe(bad) == []
    after = spike.state_dict()["history"]
    assert after == {"loss": before["loss"], "grad_norm": [*before["grad_norm"], 0.0]}
    assert run(spike, windows_of(4, loss=np.full(8, 2.0), grad_norm=np.full(8, 1.0))) == []
    (event,) = spike.observe(make_window(12, loss=[4.5], grad_norm=[1.0]))
    assert (event.metric, event.value) == ("loss", 4.5)
    assert event.threshold == pytest.approx(4.0)  # twice the level: the noise is zero
    assert json.dumps(spike.state_dict(), allow_nan=False)


def test_skipped_steps_and_missing_losses_are_neither_tested_nor_kept() -> None:
    spike = Spike(window=16, min_samples=4)
    quiet = make_window(1, loss=[1.0, 1.1, 0.9, 1.0, 1.05], grad_norm=[1.0, 1.1, 0.9, 1.0, 1.05])
    spike.observe(quiet)
    huge_but_skipped = make_window(6, loss=[1e9], grad_norm=[1e9], skipped=[True])
    assert spike.observe(huge_but_skipped) == []
    spike.observe(make_window(7, grad_norm=[1.0, 1.1]))
    history = spike.state_dict()["history"]
    assert len(history["loss"]) == 5
    assert len(history["grad_norm"]) == 7
    assert max(history["grad_norm"]) < math.log(2.0)


def test_a_spike_enters_the_history_clipped_to_its_threshold() -> None:
    spike = Spike(window=16, min_samples=4, metrics=("grad_norm",))
    spike.observe(make_window(1, grad_norm=[1.0, 1.0, 1.0, 1.0]))
    (event,) = spike.observe(make_window(5, grad_norm=[100.0]))
    assert event.threshold == pytest.approx(2.0)
    assert spike.state_dict()["history"]["grad_norm"][-1] == pytest.approx(math.log(2.0))


def test_a_zero_or_negative_value_switches_the_metric_to_a_linear_scale() -> None:
    spike = Spike(min_samples=4, metrics=("loss",))
    loss = np.array([-3.0, -3.1, -2.9, -3.0, -3.05, -2.95, -3.0, 5.0])
    (event,) = run(spike, [make_window(1, loss=loss)])
    assert (event.step, event.value) == (8, 5.0)
    assert spike.state_dict()["linear"] == {"loss": True}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=80),
    min_samples=st.integers(2, 80),
    size=st.integers(1, 13),
)
def test_spike_never_fires_before_min_samples_values(
    values: list[float], min_samples: int, size: int
) -> None:
    spike = Spike(window=max(min_samples, 2), sigma=0.1, min_samples=min_samples)
    events = run(spike, windows_of(size, grad_norm=np.asarray(values)))
    assert all(e.step > min_samples for e in events)
    assert all(math.isfinite(e.threshold) for e in events)


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(-1e12, 1e12, allow_nan=False),
    count=st.integers(2, 300),
    sigma=st.floats(1.5, 10.0),
)
def test_a_constant_series_never_spikes(value: float, count: int, sigma: float) -> None:
    spike = Spike(window=64, sigma=sigma, min_samples=2)
    constant = np.full(count, value)
    assert run(spike, windows_of(9, loss=constant, grad_norm=constant)) == []


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=20),
)
def test_spike_events_do_not_depend_on_how_steps_are_drained(seed: int, sizes: list[int]) -> None:
    values = np.exp(np.random.default_rng(seed).standard_t(2, 300) * 0.3)
    one = run(Spike(window=32, sigma=4.0, min_samples=16), windows_of(300, grad_norm=values))
    cuts = np.cumsum([0, *sizes])
    cuts = [int(c) for c in cuts if c < 300] + [300]
    windows = [
        make_window(a + 1, grad_norm=values[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    assert dicts(run(Spike(window=32, sigma=4.0, min_samples=16), windows)) == dicts(one)
    expected = reference_spikes(list(values), window=32, sigma=4.0, min_samples=16)
    assert [(e.step - 1, e.value) for e in one] == [(i, v) for i, v, _ in expected]


# --- Vanishing --------------------------------------------------------------------------------


def test_vanishing_is_silent_on_a_healthy_layer_profile() -> None:
    assert run(Vanishing(), flat_layer_windows(300)) == []


def test_vanishing_patience_needs_consecutive_drains() -> None:
    low, ok = [1e-5, 1.0], [0.5, 1.0]
    windows = layer_windows([low, low, ok, low, low, ok, low])
    assert run(Vanishing(patience=3), windows) == []
    assert len(run(Vanishing(patience=2), windows)) == 2


def test_vanishing_fires_once_per_episode_and_rearms_when_it_clears() -> None:
    low, ok = [1e-5, 1.0], [0.5, 1.0]
    windows = layer_windows([low] * 10 + [ok] + [low] * 5, size=3)
    drains = per_drain(Vanishing(), windows)
    assert [i for i, d in enumerate(drains) if d] == [2, 13]
    assert drains[13][0].step == 1 + 11 * 3


def test_vanishing_fires_after_patience_drains_naming_the_leading_weak_layers() -> None:
    names = ("encoder.0", "encoder.1", "decoder.0", "decoder.1", "head")
    profile = [1e-5, 1e-4, 3e-3, 1e-5, 1.0]
    windows = layer_windows([profile] * 6, layer_names=names)
    drains = per_drain(Vanishing(), windows)
    assert [len(d) for d in drains] == [0, 0, 1, 0, 0, 0]
    (event,) = drains[2]
    assert (event.kind, event.severity) == ("vanishing", "warning")
    assert event.step == 1  # onset: the first step of the first drain below threshold
    assert event.extra["detected_at"] == 12
    # decoder.1 is as small as encoder.0, but a healthy layer before it gets a gradient
    assert event.layers == ("encoder.0", "encoder.1")
    assert event.value == pytest.approx(1e-5)
    assert event.threshold == 1e-3
    assert event.extra["ratios"] == pytest.approx({"encoder.0": 1e-5, "encoder.1": 1e-4})
    assert "Vanishing gradients in the first 2 layer(s)" in event.message
    assert "ReLU" not in event.message  # remedies are the explainer's advice, by cause
    assert "zero gradient" not in event.message


def test_small_layers_after_a_healthy_one_are_not_vanishing() -> None:
    # A BERT at initialization: embeddings healthy, attention query/key 1e-4 of the largest
    # layer (second order while attention is uniform), LayerNorm gains 2e-2.
    names = ("emb", "q", "k", "v", "ln", "mlp", "q2", "k2", "head")
    profile = [0.3, 8e-5, 9e-5, 1.5e-2, 2.4e-2, 2.3e-2, 7.8e-5, 7.7e-5, 1.0]
    assert run(Vanishing(), layer_windows([profile] * 20, layer_names=names)) == []


def test_vanishing_names_zero_gradient_layers_as_dead_or_unused() -> None:
    windows = layer_windows([[0.0, 1e-6, 1.0]] * 3)
    (event,) = run(Vanishing(), windows)
    assert event.layers == ("l0", "l1")
    assert event.value == 0.0
    assert event.extra["zero"] == ["l0"]
    assert "Exactly zero gradient in l0" in event.message
    assert "Vanishing gradients in the first 2 layer(s), l1:" in event.message
    assert "dead units" in event.message
    assert "does not use" in event.message
    (ignored,) = run(Vanishing(ignore_zero=True), windows)
    assert ignored.layers == ("l1",)
    assert "zero gradient" not in ignored.message.lower()
    only_zero = layer_windows([[0.0, 1.0]] * 3)
    assert run(Vanishing(ignore_zero=True), only_zero) == []
    (dead,) = run(Vanishing(), only_zero)
    assert "Vanishing gradients" not in dead.message


def test_dead_leading_layers_count_only_while_the_loss_is_stuck() -> None:
    profile = np.tile([0.0, 0.0, 1.0], (5, 1))
    stuck = [make_window(1 + 5 * i, per_layer=profile, loss=np.full(5, 2.30)) for i in range(6)]
    learning = [
        make_window(1 + 5 * i, per_layer=profile, loss=np.full(5, 2.3 * 0.8**i)) for i in range(6)
    ]
    (event,) = run(Vanishing(), stuck)
    assert event.layers == ("l0", "l1")
    assert "while the loss stays at 2.3" in event.message
    assert run(Vanishing(), learning) == []  # parameters the loss ignores; the run learns


def test_vanishing_averages_only_usable_steps() -> None:
    per_layer = np.array([[1e-5, 1.0], [1e3, np.inf], [1e3, 1.0], [1e-5, 1.0]])
    # step 2: an overflowed layer norm; step 3: skipped; both stay out of the average
    windows = [
        make_window(1 + 4 * i, per_layer=per_layer, skipped=[0, 0, 1, 0], finite=[1, 1, 1, 1])
        for i in range(3)
    ]
    (event,) = run(Vanishing(), windows)
    assert event.value == pytest.approx(1e-5)


# --- Exploding --------------------------------------------------------------------------------


def test_exploding_is_silent_on_healthy_noise_with_occasional_clipping() -> None:
    grad = lognormal(5000, 8, sigma=0.5)
    scale = np.minimum(1.0, 2.0 / grad)  # clips the top few percent
    assert 0.0 < np.mean(scale < 1) < 0.2
    assert run(Exploding(), windows_of(10, grad_norm=grad, scale=scale)) == []


def test_exploding_fires_on_sustained_growth_of_the_median() -> None:
    drains = per_drain(Exploding(), median_windows([1.0, 1.0, 3.0, 9.0, 27.0, 81.0, 81.0]))
    assert [i for i, d in enumerate(drains) if d] == [4]
    (event,) = drains[4]
    assert (event.kind, event.metric) == ("exploding", "grad_norm")
    assert event.value == pytest.approx(27.0)
    assert event.threshold == pytest.approx(10.0)  # growth x the smallest median (1.0)
    assert event.step == 1 + 2 * 5  # onset: the first drain that grew
    assert event.extra["detected_at"] == 25
    for words in ("Exploding gradients", "27x"):
        assert words in event.message
    assert "Clip the gradient norm" not in event.message  # advice is the explainer's


def test_exploding_needs_growth_at_every_drain_and_the_full_factor() -> None:
    assert run(Exploding(), median_windows([1.0, 30.0, 20.0, 40.0, 50.0])) == []
    assert run(Exploding(), median_windows([1.0, 2.0, 4.0, 8.0, 9.0, 9.5])) == []
    assert run(Exploding(growth=8.0), median_windows([1.0, 2.0, 4.0, 8.0]))
    assert run(Exploding(patience=1), median_windows([1.0, 10.0]))
    assert run(Exploding(), median_windows([0.0, 1e-8, 1e-7, 1e-6])) == []


def test_exploding_growth_rearms_after_a_plateau() -> None:
    medians = [1.0, 3.0, 9.0, 27.0, 27.0, 27.0, 81.0, 243.0, 729.0, 729.0]
    drains = per_drain(Exploding(), median_windows(medians))
    assert [i for i, d in enumerate(drains) if d] == [3, 8]


def test_exploding_fires_on_persistent_clipping_once_per_episode() -> None:
    size = 20
    heavy = np.where(np.arange(size) < 19, 0.5, 1.0)  # 95 % of steps clipped
    light = np.where(np.arange(size) < 10, 0.5, 1.0)  # 50 %
    scales = [heavy] * 8 + [light] + [heavy] * 4
    windows = [make_window(1 + i * size, scale=s) for i, s in enumerate(scales)]
    drains = per_drain(Exploding(), windows)
    assert [i for i, d in enumerate(drains) if d] == [2, 11]
    event = drains[2][0]
    assert (event.metric, event.step, event.value, event.threshold) == (
        "clip_fraction",
        1,
        0.95,
        0.9,
    )
    assert "clipping was active on 95% of steps" in event.message
    assert drains[11][0].step == 1 + 9 * size


def test_exploding_growth_and_clipping_share_one_episode() -> None:
    size = 5
    medians = [1.0, 3.0, 9.0, 27.0, 81.0, 81.0, 81.0, 1.0, 1.0]
    spread = np.linspace(0.8, 1.2, size)
    windows = [
        make_window(1 + i * size, grad_norm=m * spread, scale=np.minimum(1.0, 2.0 / (m * spread)))
        for i, m in enumerate(medians)
    ]
    drains = per_drain(Exploding(), windows)
    assert [i for i, d in enumerate(drains) if d] == [3]  # clipping holds after growth stops
    assert drains[3][0].metric == "grad_norm"  # growth named first when both hold
    again = per_drain(Exploding(), [*windows, *windows[1:]])
    assert [i for i, d in enumerate(again) if d] == [3, 11]  # re-armed once both cleared


def test_exploding_clip_fraction_counts_only_usable_steps() -> None:
    grad = np.array([5.0, 5.0, np.nan, np.nan])
    windows = [make_window(1 + 4 * i, grad_norm=grad, scale=[0.2, 0.2, 1, 1]) for i in range(3)]
    (event,) = run(Exploding(), windows)
    assert event.value == 1.0


# --- Divergence -------------------------------------------------------------------------------


def test_divergence_is_silent_on_a_decreasing_loss() -> None:
    loss = 5.0 * np.exp(-np.arange(3000) / 500) + lognormal(3000, 9, 0.05) * 0.05
    assert run(Divergence(), windows_of(10, loss=loss)) == []
    assert run(Divergence(tolerance=0.0, patience=3), loss_windows(np.linspace(5, 1, 100))) == []


def test_divergence_fires_after_patience_bad_drains_and_says_stop() -> None:
    means = [3.0, 2.0, 1.5, 1.2, 1.0, 2.5, 2.4, 2.6, 2.5, 2.45, 2.6]
    drains = per_drain(Divergence(), loss_windows(means))
    assert [i for i, d in enumerate(drains) if d] == [9]
    (event,) = drains[9]
    assert (event.kind, event.metric, event.severity) == ("divergence", "loss", "error")
    assert event.value == pytest.approx(2.45)
    assert event.threshold == pytest.approx(2.15)  # best 1.0 plus 100 %, plus 5 % of 3.0
    assert event.step == 1 + 5 * 4  # onset: the first step above it (2.49 > 2.15)
    assert event.extra == {"best": pytest.approx(1.0), "detected_at": 40}
    assert detector_events_to_stop([event])
    for words in ("Divergence", "stopping", "learning rate", "clip", "checkpoint"):
        assert words in event.message


def test_a_loss_that_climbs_at_every_bad_drain_stops_after_three() -> None:
    means = [3.0, 2.0, 1.0, 1.0, 2.5, 3.0, 4.0, 5.0]
    drains = per_drain(Divergence(), loss_windows(means, size=10))
    assert [i for i, d in enumerate(drains) if d] == [6]  # 2.5 < 3.0 < 4.0: running away
    assert drains[6][0].step == 1 + 4 * 10
    wobbling = [3.0, 2.0, 1.0, 1.0, 2.5, 3.0, 2.8, 3.0, 3.1, 3.2]
    found = per_drain(Divergence(), loss_windows(wobbling, size=10))
    assert [i for i, d in enumerate(found) if d] == [8]
    # Drains of 4 steps: three climbing ones are 12 steps of noise; it takes 30.
    climbing = loss_windows([3.0, 2.0, 1.0, 1.0, *np.geomspace(2.5, 40, 9)])
    short = per_drain(Divergence(patience=10), climbing)
    assert [i for i, d in enumerate(short) if d] == [4 + 7]  # 8 climbing drains = 32 steps


def test_the_onset_is_the_first_step_above_the_threshold() -> None:
    windows = [*loss_windows([1.0]), make_window(5, loss=[1.0, 1.1, 5.0, 5.0])]
    windows += [make_window(9 + 4 * i, loss=[5.0] * 4) for i in range(4)]
    (event,) = run(Divergence(), windows)
    assert event.step == 7


def test_divergence_patience_resets_on_a_good_drain_and_rearms() -> None:
    means = [1.0] + [3.0] * 4 + [1.5] + [3.0] * 5 + [3.0] * 3 + [1.0] + [3.0] * 5
    drains = per_drain(Divergence(), loss_windows(means))
    assert [i for i, d in enumerate(drains) if d] == [10, 19]


def test_divergence_uses_the_absolute_best_for_negative_losses() -> None:
    # best -2: the threshold is -2 + 1.0 * 2 = 0, not -2 * (1 + 1.0) = -4
    plain = Divergence(start_fraction=0.0)
    assert run(plain, loss_windows([-2.0] + [-1.0] * 10)) == []
    (event,) = run(Divergence(start_fraction=0.0), loss_windows([-2.0] + [0.5] * 10))
    assert event.threshold == pytest.approx(0.0)
    # the start fraction's margin is taken on |start| too: -2 + 2 + 0.05 * 2
    (margined,) = run(Divergence(), loss_windows([-2.0] + [0.5] * 10))
    assert margined.threshold == pytest.approx(0.1)


def test_divergence_counts_all_nan_loss_windows_as_bad() -> None:
    nan_loss = make_window(5, loss=[np.nan] * 4, grad_norm=[np.nan] * 4)
    windows = loss_windows([1.0]) + [
        make_window(5 + 4 * i, loss=[np.inf, np.nan, np.nan, np.inf]) for i in range(5)
    ]
    (event,) = run(Divergence(), windows)
    assert math.isnan(event.value)
    assert event.threshold == pytest.approx(2.05)
    assert "NaN/Inf" in event.message
    (from_start,) = run(Divergence(), [nan_loss] * 5)  # no best yet: still divergence
    assert math.isnan(from_start.threshold)


def test_divergence_ignores_windows_without_a_usable_loss() -> None:
    no_loss = make_window(100, grad_norm=[1.0, 1.0])
    scaler_warmup = make_window(100, loss=[9.0, 9.0], grad_norm=[np.inf, np.inf])
    bad = loss_windows([1.0, 5.0, 5.0])
    windows = [*bad, no_loss, scaler_warmup, *loss_windows([5.0, 5.0, 5.0])]
    drains = per_drain(Divergence(), windows)
    assert [i for i, d in enumerate(drains) if d] == [7]  # the streak ran through them
    detector = Divergence()
    detector.observe(scaler_warmup)
    assert detector.state_dict()["best"] is None


def test_divergence_start_fraction_ignores_noise_near_zero_but_not_a_climb_back() -> None:
    # A run that fell from 2.3 to ~0.005 and wobbles up to 4x its best: batch noise.
    means = [2.3, 0.5, 0.05, 0.005] + [0.02, 0.015, 0.03, 0.02, 0.015, 0.02]
    assert run(Divergence(), loss_windows(means, spread=0.0)) == []
    (relative_rule,) = run(Divergence(start_fraction=0.0), loss_windows(means, spread=0.0))
    assert relative_rule.threshold == pytest.approx(0.01)
    # Climbing back to a tenth of the start for five drains is divergence.
    climb = loss_windows([2.3, 0.5, 0.05, 0.005] + [0.25] * 5, spread=0.0)
    (event,) = run(Divergence(), climb)
    assert event.threshold == pytest.approx(0.005 * 2 + 0.05 * 2.3)
    assert event.step == 1 + 4 * 4


def test_divergence_state_keeps_the_start_and_loads_states_saved_without_it() -> None:
    detector = Divergence(start_fraction=0.05)
    run(detector, loss_windows([2.3, 0.005], spread=0.0))
    state = detector.state_dict()
    assert state["start"] == pytest.approx(2.3)
    restored = Divergence(start_fraction=0.05)
    restored.load_state_dict(state)
    assert restored.threshold() == pytest.approx(detector.threshold())
    assert restored.threshold() == pytest.approx(0.01 + 0.05 * 2.3)
    old = {k: v for k, v in state.items() if k != "start"}
    older = Divergence(start_fraction=0.05)
    older.load_state_dict(old)  # gradguard 0.1 saved no start: the margin starts at 0
    assert older.threshold() == pytest.approx(0.01)


def test_divergence_min_delta_is_an_absolute_margin_for_losses_near_zero() -> None:
    means = [1e-6] + [3e-6] * 6
    assert len(run(Divergence(), loss_windows(means, spread=0.0))) == 1
    assert run(Divergence(min_delta=1e-3), loss_windows(means, spread=0.0)) == []


def test_divergence_tolerance_zero_stops_after_patience_drains_worse_than_the_best() -> None:
    strict = {"tolerance": 0.0, "patience": 3, "start_fraction": 0.0}
    assert run(Divergence(**strict), loss_windows([3, 2, 2, 2, 2], spread=0)) == []
    means = [3.0, 2.0, 2.1, 2.2, 2.05]
    (event,) = run(Divergence(**strict), loss_windows(means, spread=0.0))
    assert event.step == 1 + 2 * 4
    assert event.threshold == 2.0


def test_exploding_catches_a_blow_up_within_one_log_interval() -> None:
    """A norm that rises step after step (30x each, as in an RNN with radius 3) is caught
    before a second drain, at the step where the run of rises began."""
    norms = np.array([1.0, 0.5] + [0.5 * 30.0**k for k in range(1, 9)])
    detector = Exploding()
    events = detector.observe(make_window(1, grad_norm=norms))
    assert len(events) == 1
    event = events[0]
    assert event.metric == "grad_norm"
    assert event.step == 2  # the run of rises starts at 0.5
    assert event.extra["run_steps"] == 9
    assert event.threshold == pytest.approx(100 * 0.5)
    assert detector.observe(make_window(11, grad_norm=norms * 1e12)) == []  # same episode


def test_exploding_run_spans_drains_and_needs_every_step_to_rise() -> None:
    rising = 2.0 ** np.arange(12)  # 2048x over 12 steps
    split = [make_window(1, grad_norm=rising[:5]), make_window(6, grad_norm=rising[5:])]
    assert [e.step for e in run(Exploding(), split)] == [1]
    dented = rising.copy()
    dented[[4, 8]] = dented[[3, 7]] * 0.9  # a fall every few steps: never 8 rises in a row
    assert run(Exploding(), [make_window(1, grad_norm=dented)]) == []


def test_growth_while_the_loss_falls_is_a_learning_transition_not_an_explosion() -> None:
    medians = [1.0, 1.0, 3.0, 9.0, 27.0, 81.0, 81.0]
    spread = np.linspace(0.8, 1.2, 5)
    falling = [
        make_window(1 + i * 5, grad_norm=m * spread, loss=np.full(5, 2.0 * 0.7**i))
        for i, m in enumerate(medians)
    ]
    rising = [
        make_window(1 + i * 5, grad_norm=m * spread, loss=np.full(5, 2.0 * 1.1**i))
        for i, m in enumerate(medians)
    ]
    assert run(Exploding(), falling) == []
    (event,) = run(Exploding(), rising)
    assert (event.metric, event.severity) == ("grad_norm", "warning")
    assert "while the loss rose" in event.message
    fast = np.array([0.5 * 30.0**k for k in range(10)])
    assert run(Exploding(), [make_window(1, grad_norm=fast, loss=np.geomspace(2, 0.2, 10))]) == []
    assert run(Exploding(), [make_window(1, grad_norm=fast, loss=np.geomspace(2, 20, 10))])


def test_exploding_growth_names_the_layer_that_grew_most_first() -> None:
    medians = [1.0, 1.0, 3.0, 9.0, 27.0, 81.0]
    windows = [
        make_window(
            1 + i * 5,
            grad_norm=np.full(5, m),
            per_layer=np.tile([1.0, 1.0 + 0.1 * i, m, m**0.8], (5, 1)),
        )
        for i, m in enumerate(medians)
    ]
    (event,) = run(Exploding(), windows)
    assert event.layers == ("l2", "l3")  # l2 grew 27x, l3 14x; l1 barely moved


def with_weights(window: Window, weights: Sequence[float]) -> Window:
    return dataclasses.replace(window, weight_norm=np.asarray(weights, dtype=np.float64))


def test_gradients_far_larger_than_their_weights_are_exploding_at_the_first_drain() -> None:
    # A 12-layer ReLU MLP with N(0, 1) weights: every layer's gradient is ~3e7 x its
    # weights (measured); a healthy MLP sits near 0.04-0.15.
    grads = np.tile([2e9, 2.1e9, 2.2e9, 3e9], (10, 1))
    window = with_weights(make_window(1, per_layer=grads, grad_norm=grads.sum(1)), [64.0] * 4)
    (event,) = Exploding().observe(window)
    assert (event.kind, event.metric, event.severity) == ("exploding", "grad_to_weight", "warning")
    assert event.step == 1
    assert event.extra["detected_at"] == 10
    assert event.value == pytest.approx(np.median(grads[0] / 64.0))
    assert event.layers == ("l0", "l1", "l2", "l3")  # input side first
    healthy = np.tile([0.23, 0.31, 0.28], (10, 1))
    quiet = with_weights(make_window(1, per_layer=healthy), [6.5, 6.5, 1.9])
    assert Exploding().observe(quiet) == []


def test_a_few_zero_initialized_layers_do_not_make_the_size_rule_fire() -> None:
    grads = np.tile([0.2, 0.3, 0.1, 0.5], (10, 1))
    window = with_weights(make_window(1, per_layer=grads), [5.0, 5.0, 1e-9, 0.0])
    assert Exploding().observe(window) == []
    assert Exploding(max_ratio=0.01).observe(window)  # the rule is live


def test_nonfinite_steps_under_a_loss_scaler_are_info_until_the_scaler_cannot_help() -> None:
    grad = np.array([np.inf] * 3 + [1.0] * 7)
    scaled = dataclasses.replace(
        make_window(1, grad_norm=grad, loss=np.full(10, 2.0)), loss_scaled=True
    )
    assert [e.severity for e in NonFinite().observe(scaled)] == ["info"] * 3
    plain = make_window(1, grad_norm=grad, loss=np.full(10, 2.0))
    assert [e.severity for e in NonFinite().observe(plain)] == ["warning", "info", "info"]
    nan_loss = dataclasses.replace(
        make_window(1, grad_norm=grad, loss=[np.nan] * 3 + [2.0] * 7), loss_scaled=True
    )
    assert [e.severity for e in NonFinite().observe(nan_loss)] == ["warning", "info", "info"]
    endless = dataclasses.replace(
        make_window(1, grad_norm=np.full(30, np.inf), loss=np.full(30, 2.0)), loss_scaled=True
    )
    severities = [e.severity for e in NonFinite().observe(endless)]
    assert severities == ["info"] * 20 + ["warning"] + ["info"] * 9
    not_skipped = make_window(1, grad_norm=[np.nan], skipped=[False])
    assert [e.severity for e in NonFinite().observe(not_skipped)] == ["error"]


def test_divergence_is_an_error_and_every_event_round_trips_its_severity() -> None:
    (event,) = run(Divergence(), loss_windows([1.0] + [5.0] * 6))
    assert event.severity == "error"
    assert Event.from_dict(event.to_dict()) == event
    legacy = {k: v for k, v in event.to_dict().items() if k != "severity"}
    assert Event.from_dict(legacy).severity == "warning"
    assert Event.from_dict({**legacy, "kind": "cooldown"}).severity == "info"


def test_clipping_at_every_step_while_the_loss_falls_is_one_info_note() -> None:
    size = 10
    falling = [
        make_window(1 + i * size, scale=np.full(size, 0.5), loss=np.full(size, 2.0 * 0.8**i))
        for i in range(8)
    ]
    events = run(Exploding(), falling)
    assert [(e.metric, e.severity) for e in events] == [("clip_fraction", "info")]
    assert "below the typical gradient norm" in events[0].message
    rising = [
        make_window(1 + i * size, scale=np.full(size, 0.5), loss=np.full(size, 2.0 * 1.2**i))
        for i in range(8)
    ]
    (event,) = run(Exploding(), rising)
    assert (event.metric, event.severity, event.step) == ("clip_fraction", "warning", 1)
    assert "while the loss rose" in event.message


def test_a_lasting_tenfold_rise_hidden_in_batch_noise_is_a_level_shift() -> None:
    # Late in training the batch losses of a converged regression vary threefold from step
    # to step; an LR burst lifts the level tenfold for good. No single step stands out
    # against that noise, the level does.
    rng = np.random.default_rng(4)
    loss = np.concatenate([np.geomspace(0.5, 1e-4, 200), np.full(300, 1e-4)])
    loss *= rng.lognormal(0, 0.6, 500)
    loss[400:] *= 10.0
    events = run(Spike(metrics=("loss",)), windows_of(10, loss=loss))
    shifts = [e for e in events if e.extra.get("shift")]
    assert len(shifts) == 1
    (shift,) = shifts
    assert 401 <= shift.step <= 403
    assert shift.extra["detected_at"] <= 401 + 8
    assert shift.severity == "info"  # 0.1 % of the progress since 0.5: Rollback's business
    assert "Loss level shift" in shift.message
    assert shift.value / shift.extra["level"] > 5
    back = loss.copy()
    back[403:] /= 10.0  # a rise that passes within three steps is no shift
    assert not [e for e in run(Spike(), windows_of(10, loss=back)) if e.extra.get("shift")]


def test_a_level_shift_that_undoes_the_progress_is_a_warning() -> None:
    rng = np.random.default_rng(5)
    loss = np.full(200, 2.3) * rng.lognormal(0, 0.05, 200)
    loss[100:] = 0.5 * rng.lognormal(0, 0.05, 100)
    loss[150:] = 1.6 * rng.lognormal(0, 0.05, 50)  # 61 % of the way back to the start
    events = run(Spike(), windows_of(10, loss=loss))
    assert all(e.severity == "info" for e in events if not e.extra.get("shift"))
    (shift,) = [e for e in events if e.extra.get("shift")]
    assert shift.severity == "warning"
    assert shift.step == 151
    assert "undoing 58%" in shift.message
    assert shift.extra["detected_at"] == 153  # the median of 5 moves with the third


def test_weight_growth_is_measured_over_ten_steps_whatever_the_drain_length() -> None:
    def drains(size: int, factor: float) -> list[Window]:
        out = []
        for i in range(4):
            window = make_window(
                1 + i * size, per_layer=np.ones((size, 2)), loss=np.full(size, 2.0 * 1.5**i)
            )
            before = np.array([1.0, factor**i])
            out.append(
                dataclasses.replace(
                    window,
                    weight_norm=np.array([1.0, factor ** (i + 1)]),
                    weight_norm_before=before,
                )
            )
        return out

    # 4x per drain of 5 steps is 16x per 10 steps: the layer that blows up is named
    (event,) = run(Exploding(), drains(5, 4.0))
    assert (event.metric, event.layers, event.extra["detected_at"]) == (
        "weight_growth",
        ("l1",),
        10,
    )
    # 4x per drain of 10 steps is not tenfold
    assert run(Exploding(), drains(10, 4.0)) == []
    (fast,) = run(Exploding(), drains(10, 12.0))
    assert fast.extra["detected_at"] == 20  # the loss is flat within the first drain
    assert "grew 12x since step 10" in fast.message


def test_weak_layers_that_still_move_are_not_vanishing() -> None:
    """Adam scales each gradient by its own size: a tiny gradient can take a full step."""
    profile = [1e-6, 1e-5, 1.0]
    moving = np.array([2e-3, np.nan, 1e-3])  # layer 0 measured: it moves like the others
    still = np.array([1e-9, np.nan, 1e-3])
    for ratios, expected in ((moving, 0), (still, 1)):
        windows = [
            dataclasses.replace(w, update_ratio=ratios) for w in layer_windows([profile] * 4)
        ]
        events = [e for d in per_drain(Vanishing(), windows) for e in d]
        assert len(events) == expected
    (event,) = events
    assert event.layers == ("l0", "l1")
    assert event.extra["update_ratios"] == {"l0": 1e-9}


def test_adam_on_tiny_input_features_is_not_vanishing_while_sgd_is() -> None:
    import torch
    from torch import nn

    import gradguard as gg

    def events(make_optimizer: Any) -> list[Event]:
        torch.manual_seed(0)
        # no bias in the first layer: its whole gradient scales with the tiny inputs
        model = nn.Sequential(nn.Linear(8, 32, bias=False), nn.ReLU(), nn.Linear(32, 1))
        guard = gg.Guard(model, make_optimizer(model.parameters()), detectors=[Vanishing()])
        for _ in range(120):
            x = torch.randn(64, 8)
            loss = (model(x * 1e-6) - x[:, :1]).square().mean()  # inputs in micro-units
            guard.optimizer.zero_grad()
            loss.backward()
            guard.step(loss)
        guard.close()
        return list(guard.events)

    assert events(lambda p: torch.optim.Adam(p, lr=1e-3)) == []
    (event,) = events(lambda p: torch.optim.SGD(p, lr=1e-2))
    assert event.layers[0] == "0"
