"""The detection corpus: its scoring on synthetic runs, and its healthy runs really train.

``score`` is checked on hand-built :class:`RunResult`s (hits, misses, late or wrong-kind
events, info events, false alarms, layers, non-finite deadlines). Each healthy scenario
is run once, quick, to check that it trains. Whether the default detectors meet every
label is ``test_quick_corpus_meets_its_label`` (slow).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gradguard.records import Event

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import detection  # noqa: E402
import detection_healthy  # noqa: E402
from detection_common import Expect, RunResult, Scenario  # noqa: E402


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _never_run(seed: int, quick: bool) -> RunResult:
    raise AssertionError("score must not run the scenario")


def _scenario(expect: Expect | None = None, quick_expect: Expect | None = None) -> Scenario:
    return Scenario(
        name="synthetic",
        healthy=expect is None,
        description="a hand-built run",
        label_reason="for the scoring tests",
        run=_never_run,
        expect=expect,
        quick_expect=quick_expect,
    )


def _event(
    step: int,
    kind: str = "spike",
    severity: str = "warning",
    layers: tuple[str, ...] = (),
    detected_at: int | None = None,
) -> Event:
    extra = {} if detected_at is None else {"detected_at": detected_at}
    return Event(
        step=step,
        kind=kind,  # type: ignore[arg-type]
        value=1.0,
        threshold=0.5,
        layers=layers,
        extra=extra,
        severity=severity,  # type: ignore[arg-type]
    )


def _run(*events: Event, steps: int = 100, first_nonfinite: int | None = None) -> RunResult:
    return RunResult(
        events=list(events),
        losses=[1.0] * steps,
        layer_names=("a", "b"),
        first_nonfinite_step=first_nonfinite,
    )


SPIKE_AT_50 = Expect(kinds=("spike", "divergence"), onset=50, within=20)


def _score(expect: Expect | None, run: RunResult, quick: bool = False) -> detection.Outcome:
    return detection.score(_scenario(expect), 0, quick, run)


# --- score: healthy runs ---------------------------------------------------------------


def test_healthy_run_counts_every_warning_and_error_as_a_false_alarm() -> None:
    run = _run(_event(5), _event(30, "divergence", "error"), _event(40, severity="info"))
    outcome = _score(None, run)
    assert outcome.false_alarms == 2
    assert [r.kind for r in outcome.raised] == ["spike", "divergence"]
    assert outcome.info_events == 1
    assert not outcome.passed
    assert outcome.detected is None
    assert outcome.delay is None


def test_healthy_run_with_only_info_events_passes() -> None:
    outcome = _score(None, _run(_event(5, severity="info"), _event(9, "nonfinite", "info")))
    assert outcome.false_alarms == 0
    assert outcome.raised == []
    assert outcome.passed


# --- score: pathological runs ----------------------------------------------------------


def test_hit_within_the_window() -> None:
    outcome = _score(SPIKE_AT_50, _run(_event(55, layers=("b",))))
    assert outcome.detected == detection.Raised("spike", 55, 55, "b")
    assert outcome.delay == 5
    assert outcome.right == 1
    assert outcome.false_alarms == 0
    assert outcome.passed


def test_miss_without_events() -> None:
    outcome = _score(SPIKE_AT_50, _run())
    assert outcome.detected is None
    assert outcome.delay is None
    assert not outcome.passed


def test_late_detection_is_a_miss_and_the_boundary_is_inclusive() -> None:
    late = _score(SPIKE_AT_50, _run(_event(55, "divergence", detected_at=71)))
    assert late.detected is None
    assert late.right == 0
    assert not late.passed
    on_time = _score(SPIKE_AT_50, _run(_event(55, "divergence", detected_at=70)))
    assert on_time.detected is not None
    assert on_time.delay == 20


def test_wrong_kind_is_not_a_detection() -> None:
    outcome = _score(SPIKE_AT_50, _run(_event(52, "vanishing")))
    assert outcome.detected is None
    assert outcome.right == 0
    assert outcome.false_alarms == 0  # at or after the onset: wrong, but not a false alarm
    assert len(outcome.raised) == 1


def test_info_events_never_detect() -> None:
    outcome = _score(SPIKE_AT_50, _run(_event(52, severity="info")))
    assert outcome.detected is None
    assert outcome.raised == []
    assert outcome.info_events == 1


def test_error_severity_counts() -> None:
    outcome = _score(SPIKE_AT_50, _run(_event(60, "divergence", "error")))
    assert outcome.detected is not None
    assert outcome.detected.kind == "divergence"


def test_events_before_the_onset_are_false_alarms() -> None:
    run = _run(_event(10), _event(45, detected_at=55), _event(56))
    outcome = _score(SPIKE_AT_50, run)
    assert outcome.false_alarms == 2  # an onset before the label's is early, known late or not
    assert outcome.detected == detection.Raised("spike", 56, 56, None)
    assert outcome.passed


def test_the_earliest_known_match_is_the_detection() -> None:
    run = _run(_event(51, "divergence", detected_at=68), _event(60))
    outcome = _score(SPIKE_AT_50, run)
    assert outcome.right == 2
    assert outcome.detected is not None
    assert (outcome.detected.step, outcome.delay) == (60, 10)


@pytest.mark.parametrize(
    ("layers", "ok"),
    [
        (("blocks.1",), True),
        (("blocks.1.attn.qkv", "blocks.0"), True),
        (("blocks.10.attn",), False),  # a prefix of the name, not of the module path
        (("blocks.0", "blocks.1"), False),  # only the first layer named counts
        ((), False),
    ],
)
def test_layer_local_labels(layers: tuple[str, ...], ok: bool) -> None:
    expect = Expect(kinds=("exploding",), onset=20, within=30, layer="blocks.1")
    outcome = _score(expect, _run(_event(25, "exploding", layers=layers)))
    assert outcome.detected is not None
    assert outcome.layer_ok is ok
    assert outcome.passed  # detection is the criterion; the layer is scored apart


def test_layer_ok_is_none_without_a_layer_label_or_a_detection() -> None:
    assert _score(SPIKE_AT_50, _run(_event(55, layers=("a",)))).layer_ok is None
    expect = Expect(kinds=("exploding",), onset=20, within=30, layer="a")
    assert _score(expect, _run()).layer_ok is None


def test_before_nonfinite() -> None:
    expect = Expect(kinds=("spike",), onset=50, within=20, before_nonfinite=True)
    at_nonfinite = _run(_event(55, detected_at=60), first_nonfinite=60)
    assert _score(expect, at_nonfinite).detected is None
    before = _run(_event(55, detected_at=59), first_nonfinite=60)
    assert _score(expect, before).detected is not None
    never = _run(_event(55, detected_at=60), first_nonfinite=None)
    assert _score(expect, never).detected is not None
    relaxed = Expect(kinds=("spike",), onset=50, within=20)
    assert _score(relaxed, at_nonfinite).detected is not None


def test_quick_variant_uses_its_own_label() -> None:
    scenario = _scenario(SPIKE_AT_50, quick_expect=Expect(kinds=("spike",), onset=10, within=5))
    run = _run(_event(12))
    quick = detection.score(scenario, 0, True, run)
    assert quick.detected is not None
    assert quick.delay == 2
    full = detection.score(scenario, 0, False, run)
    assert full.detected is None
    assert full.false_alarms == 1


def test_pathological_scenario_without_a_label_is_rejected() -> None:
    scenario = Scenario("broken", False, "d", "r", _never_run)
    with pytest.raises(ValueError, match="no Expect"):
        detection.score(scenario, 0, False, _run())


# --- totals and markdown ---------------------------------------------------------------


def _outcomes() -> list[detection.Outcome]:
    layer = Expect(kinds=("exploding",), onset=20, within=30, layer="a")
    return [
        _score(None, _run(_event(5))),  # healthy, 1 false alarm
        _score(None, _run()),  # healthy, clean
        _score(SPIKE_AT_50, _run(_event(10), _event(55))),  # hit, 1 false alarm
        _score(SPIKE_AT_50, _run(_event(90))),  # late: a miss
        _score(layer, _run(_event(25, "exploding", layers=("a.w",)))),  # hit, layer ok
        _score(layer, _run(_event(25, "exploding", layers=("b",)))),  # hit, wrong layer
    ]


def test_totals() -> None:
    t = detection.totals(_outcomes())
    assert (t.runs, t.healthy_runs, t.healthy_clean, t.healthy_false_alarms) == (6, 2, 1, 1)
    assert (t.pathological_runs, t.detected) == (4, 3)
    assert t.recall == pytest.approx(3 / 4)
    assert (t.right_events, t.counted_events) == (3, 6)
    assert t.precision == pytest.approx(3 / 6)
    assert (t.layer_correct, t.layer_checked) == (1, 2)
    assert t.layer_accuracy == pytest.approx(0.5)
    assert t.median_delay == 5  # delays 5, 5, 5


def test_totals_of_nothing_has_no_ratios() -> None:
    t = detection.totals([])
    assert t.precision is None
    assert t.recall is None
    assert t.layer_accuracy is None


def test_markdown_lists_every_run_and_the_totals() -> None:
    outcomes = _outcomes()
    text = detection.to_markdown(outcomes)
    rows = [line for line in text.splitlines() if line.startswith("| synthetic | 0 |")]
    assert len(rows) == len(outcomes)
    assert "spike@10, spike@55" in rows[2]
    assert "exploding@25 [b]" in rows[5]
    assert "3 / 4 pathological runs detected (75%)" in text
    assert "3 / 6 counted events" in text
    assert "| synthetic | FAIL (4 / 6) |" in text


def test_describe_corpus_names_every_scenario() -> None:
    text = detection.describe_corpus()
    for scenario in detection.all_scenarios():
        assert f"### `{scenario.name}`" in text
        assert scenario.label_reason in text


def test_unknown_scenario_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        detection.run_corpus(["no_such_scenario"], progress=False)


# --- the healthy runs train ------------------------------------------------------------


def _quarter(notes: dict[str, float]) -> bool:
    return notes["final_loss"] < 0.25 * notes["initial_loss"]


#: What "it trained" means for each healthy scenario's quick run, read from its notes.
TRAINS: dict[str, Callable[[dict[str, float]], bool]] = {
    "gpt_adamw": lambda n: (
        n["final_loss"] < n["initial_loss"] - 1.0 and n["held_out_loss"] < n["unigram_entropy"]
    ),
    "bert_cls": lambda n: _quarter(n) and n["test_accuracy"] > 0.9,
    "resnet_bn_digits": lambda n: _quarter(n) and n["test_accuracy"] > 0.7,
    "lstm_adding": lambda n: n["test_mse"] < 0.25 * n["baseline_mse"],
    "mlp_momentum_noisy": lambda n: _quarter(n) and n["test_accuracy"] > 0.9,
    "fp16_scaler": lambda n: _quarter(n) and n["test_accuracy"] > 0.9 and n["skipped_steps"] > 0,
    "learning_transition": lambda n: (
        n["plateau_steps"] >= 100 and n["final_loss"] < 0.01 * n["plateau_loss"]
    ),
    "vit_onecycle": lambda n: _quarter(n) and n["test_accuracy"] > 0.8,
    "gru_adamw": lambda n: _quarter(n) and n["test_accuracy"] > 0.8,
    "cnn_adam": lambda n: n["final_loss"] < 0.7 * n["initial_loss"] and n["test_accuracy"] > 0.4,
}


def test_every_healthy_scenario_has_a_training_check() -> None:
    assert {s.name for s in detection_healthy.SCENARIOS} == set(TRAINS)
    assert all(s.healthy and s.expect is None for s in detection_healthy.SCENARIOS)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("scenario", detection_healthy.SCENARIOS, ids=lambda s: s.name)
def test_healthy_scenario_trains(scenario: Scenario) -> None:
    run = scenario.run(0, True)
    assert run.steps > 50
    assert all(math.isfinite(loss) for loss in run.losses)
    assert run.layer_names
    assert all(isinstance(e, Event) for e in run.events)
    assert all(e.step <= run.steps for e in run.events)
    assert TRAINS[scenario.name](run.notes), run.notes


@pytest.mark.usefixtures("one_thread")
def test_healthy_runs_are_seeded() -> None:
    scenario = next(s for s in detection_healthy.SCENARIOS if s.name == "mlp_momentum_noisy")
    first, again, other = scenario.run(1, True), scenario.run(1, True), scenario.run(2, True)
    assert first.losses == again.losses
    assert first.losses != other.losses


# --- the corpus against its labels: the quick variants, one seed -----------------------


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("scenario", detection.all_scenarios(), ids=lambda s: s.name)
def test_quick_corpus_meets_its_label(scenario: Scenario) -> None:
    outcome = detection.score(scenario, 0, True, scenario.run(0, True))
    assert outcome.passed, detection.to_markdown([outcome])
    assert outcome.layer_ok is not False, detection.to_markdown([outcome])
