"""Run the detection corpus and score the guard's default detectors against its labels.

Every scenario of ``detection_healthy`` and ``detection_faulty`` is trained for each seed
on one CPU thread; the events of warning or error severity (the ones a user is asked to
act on) are scored against the scenario's label: none at all on a healthy run; on a
pathological run, an event of an expected kind, at or after the onset, known within the
allowed delay (and before the first non-finite step where the label asks for it), naming
the right layer first for layer-local pathologies. Events of ``info`` severity are log
lines and never count.

Usage, from the repository root::

    python benchmarks/detection.py [--quick] [--only NAME ...] [--seeds N] [--out PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from detection_common import Expect, RunResult, Scenario
from detection_faulty import SCENARIOS as FAULTY
from detection_healthy import SCENARIOS as HEALTHY
from gradguard.records import Event

SEEDS = (0, 1, 2)
COUNTED_SEVERITIES = ("warning", "error")
_MAX_RAISED_SHOWN = 4


def all_scenarios() -> list[Scenario]:
    """Every scenario of the corpus, healthy ones first; names are unique."""
    scenarios = [*HEALTHY, *FAULTY]
    names = [s.name for s in scenarios]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate scenario names in the corpus: {duplicates}")
    return scenarios


def counts(event: Event) -> bool:
    """Whether an event counts: a warning or an error (``info`` events never do)."""
    return getattr(event, "severity", "warning") in COUNTED_SEVERITIES


@dataclass(frozen=True)
class Raised:
    """A counted event as the score sees it: its kind, onset step, known-at step, layer."""

    kind: str
    step: int
    known_at: int
    layer: str | None
    cause: str = ""
    batch: Any = None
    examples: int = 0  # how many examples the event names as standing out

    @classmethod
    def of(cls, event: Event) -> Raised:
        """Read a guard event (``known_at`` is ``extra["detected_at"]``, else ``step``)."""
        known_at = int(event.extra.get("detected_at", event.step))
        return cls(
            event.kind,
            int(event.step),
            known_at,
            event.layers[0] if event.layers else None,
            getattr(event, "cause", ""),
            getattr(event, "batch", None),
            len(getattr(event, "evidence", {}).get("outliers", ())),
        )

    def __str__(self) -> str:
        known = "" if self.known_at == self.step else f" (known {self.known_at})"
        layer = f" [{self.layer}]" if self.layer else ""
        cause = f" <{self.cause}>" if self.cause else ""
        return f"{self.kind}@{self.step}{known}{layer}{cause}"


@dataclass
class Outcome:
    """The score of one scenario run (one seed, full or quick).

    Attributes:
        scenario: the scenario's name.
        seed: the seed it ran with.
        quick: whether it was the quick variant.
        healthy: the scenario's label.
        expect: what a pathological run must raise (None when healthy).
        raised: every counted event, in the order the guard emitted them.
        detected: the earliest-known counted event that satisfies ``expect``, or None.
        right: how many counted events satisfy ``expect`` (0 on healthy runs).
        false_alarms: counted events on a healthy run; before the onset on a pathological one.
        layer_ok: for layer-local labels with a detection, whether it named the layer.
        cause: the detecting event's cause judged against the label: ``right``,
            ``unknown`` or ``wrong`` (None without a detection or a cause label).
        evidence_ok: for labels that ask for the batch id and the examples, whether the
            detecting event carries both.
        info_events: events of ``info`` severity (shown, never scored).
        steps: guard steps the run took.
        seconds: wall-clock time of the run.
        notes: the run's notes (final loss, accuracy...).
    """

    scenario: str
    seed: int
    quick: bool
    healthy: bool
    expect: Expect | None
    raised: list[Raised]
    detected: Raised | None
    right: int
    false_alarms: int
    layer_ok: bool | None
    info_events: int
    steps: int
    cause: str | None = None
    evidence_ok: bool | None = None
    seconds: float = 0.0
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def delay(self) -> int | None:
        """Steps from the onset to when the detection was known (None without one)."""
        if self.detected is None or self.expect is None:
            return None
        return self.detected.known_at - self.expect.onset

    @property
    def passed(self) -> bool:
        """The corpus criterion: healthy, no counted event; pathological, detected."""
        return not self.raised if self.healthy else self.detected is not None


def _matches(raised: Raised, expect: Expect, run: RunResult) -> bool:
    """Whether a counted event is a right detection of ``expect`` in ``run``."""
    if raised.kind not in expect.kinds or raised.step < expect.onset:
        return False
    if raised.known_at - expect.onset > expect.within:
        return False
    nonfinite = run.first_nonfinite_step
    return not (expect.before_nonfinite and nonfinite is not None and raised.known_at >= nonfinite)


def _cause_verdict(cause: str, expected: tuple[str, ...]) -> str:
    """``right`` when the cause is one the label allows, ``unknown`` when honest, else wrong."""
    if cause in expected:
        return "right"
    return "unknown" if cause in ("", "unknown") else "wrong"


def _layer_ok(layer: str | None, expected: str) -> bool:
    return layer is not None and (layer == expected or layer.startswith(expected + "."))


def score(scenario: Scenario, seed: int, quick: bool, run: RunResult) -> Outcome:
    """Score one run of ``scenario`` against its label (pure: reads the run only).

    Args:
        scenario: the scenario that produced ``run``.
        seed: the seed it ran with.
        quick: whether it was the quick variant (which selects the label).
        run: the run's events, losses and first non-finite step.

    Returns:
        The outcome, with ``seconds`` left at 0 (the caller times the run).
    """
    expect = scenario.expect_for(quick)
    if not scenario.healthy and expect is None:
        raise ValueError(f"pathological scenario {scenario.name!r} has no Expect")
    raised = [Raised.of(e) for e in run.events if counts(e)]
    detected, right, layer_ok = None, 0, None
    cause: str | None = None
    evidence_ok: bool | None = None
    if scenario.healthy or expect is None:
        false_alarms = len(raised)
    else:
        false_alarms = sum(r.step < expect.onset for r in raised)
        matching = [r for r in raised if _matches(r, expect, run)]
        right = len(matching)
        if matching:
            detected = min(matching, key=lambda r: (r.known_at, r.step))
            if expect.layer is not None:
                layer_ok = _layer_ok(detected.layer, expect.layer)
            if expect.causes:
                cause = _cause_verdict(detected.cause, expect.causes)
            if expect.batch is not None or expect.examples:
                evidence_ok = (expect.batch is None or detected.batch == expect.batch) and (
                    not expect.examples or detected.examples > 0
                )
    return Outcome(
        scenario=scenario.name,
        seed=seed,
        quick=quick,
        healthy=scenario.healthy,
        expect=None if scenario.healthy else expect,
        raised=raised,
        detected=detected,
        right=right,
        false_alarms=false_alarms,
        layer_ok=layer_ok,
        info_events=sum(not counts(e) for e in run.events),
        steps=run.steps,
        cause=cause,
        evidence_ok=evidence_ok,
        notes=dict(run.notes),
    )


def _select(names: Iterable[str] | None) -> list[Scenario]:
    scenarios = all_scenarios()
    if names is None:
        return scenarios
    wanted = list(names)
    known = {s.name for s in scenarios}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(known)}")
    return [s for s in scenarios if s.name in wanted]


def run_corpus(
    names: Iterable[str] | None = None,
    seeds: Sequence[int] = SEEDS,
    quick: bool = False,
    progress: bool = True,
) -> list[Outcome]:
    """Run every selected scenario for every seed on one thread, time and score each run.

    Args:
        names: scenario names to run (all when None).
        seeds: the seeds.
        quick: run the quick variants.
        progress: print one line per run.

    Returns:
        The outcomes, scenario by scenario, seed by seed.
    """
    scenarios = _select(names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outcomes = []
    try:
        for scenario in scenarios:
            for seed in seeds:
                start = time.perf_counter()
                run = scenario.run(seed, quick)
                seconds = time.perf_counter() - start
                outcome = replace(score(scenario, seed, quick, run), seconds=seconds)
                outcomes.append(outcome)
                if progress:
                    print(_progress_line(outcome), flush=True)
    finally:
        torch.set_num_threads(threads)
    return outcomes


def _progress_line(o: Outcome) -> str:
    verdict = "ok" if o.passed else "FAIL"
    label = "healthy" if o.healthy else "pathological"
    return (
        f"{o.scenario} seed {o.seed}{' quick' if o.quick else ''}: {label}, {o.steps} steps, "
        f"{o.seconds:.1f}s, {len(o.raised)} counted event(s), {o.info_events} info: {verdict}"
    )


# --- totals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """Corpus-wide figures.

    ``precision`` is right detections over all counted events (None with no counted
    event); ``recall`` detected pathological runs over all of them; ``layer_accuracy``
    the detections naming the right layer over the layer-local runs with a detection.
    """

    runs: int
    healthy_runs: int
    healthy_clean: int
    healthy_false_alarms: int
    pathological_runs: int
    detected: int
    counted_events: int
    right_events: int
    precision: float | None
    recall: float | None
    layer_checked: int
    layer_correct: int
    layer_accuracy: float | None
    median_delay: float | None
    cause_checked: int = 0
    cause_right: int = 0
    cause_unknown: int = 0
    cause_wrong: int = 0
    evidence_checked: int = 0
    evidence_right: int = 0
    events_cause_right: int = 0
    events_cause_unknown: int = 0
    events_cause_other: int = 0

    @property
    def cause_accuracy(self) -> float | None:
        """Right causes over the detections that have a cause label."""
        return _ratio(self.cause_right, self.cause_checked)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def totals(outcomes: Sequence[Outcome]) -> Totals:
    """Sum the outcomes into corpus-wide false alarms, precision, recall, layer accuracy."""
    healthy = [o for o in outcomes if o.healthy]
    sick = [o for o in outcomes if not o.healthy]
    detected = [o for o in sick if o.detected is not None]
    counted = sum(len(o.raised) for o in outcomes)
    right = sum(o.right for o in outcomes)
    layer_checked = [o for o in detected if o.layer_ok is not None]
    layer_correct = sum(bool(o.layer_ok) for o in layer_checked)
    delays = [o.delay for o in detected if o.delay is not None]
    return Totals(
        runs=len(outcomes),
        healthy_runs=len(healthy),
        healthy_clean=sum(o.passed for o in healthy),
        healthy_false_alarms=sum(o.false_alarms for o in healthy),
        pathological_runs=len(sick),
        detected=len(detected),
        counted_events=counted,
        right_events=right,
        precision=_ratio(right, counted),
        recall=_ratio(len(detected), len(sick)),
        layer_checked=len(layer_checked),
        layer_correct=layer_correct,
        layer_accuracy=_ratio(layer_correct, len(layer_checked)),
        median_delay=statistics.median(delays) if delays else None,
        cause_checked=sum(o.cause is not None for o in sick),
        cause_right=sum(o.cause == "right" for o in sick),
        cause_unknown=sum(o.cause == "unknown" for o in sick),
        cause_wrong=sum(o.cause == "wrong" for o in sick),
        evidence_checked=sum(o.evidence_ok is not None for o in sick),
        evidence_right=sum(bool(o.evidence_ok) for o in sick),
        **_event_causes(sick),
    )


def _event_causes(sick: Sequence[Outcome]) -> dict[str, int]:
    """Every counted event at or after the onset of a labelled run, by its cause's verdict."""
    verdicts = [
        _cause_verdict(r.cause, o.expect.causes)
        for o in sick
        if o.expect is not None and o.expect.causes
        for r in o.raised
        if r.step >= o.expect.onset
    ]
    return {
        "events_cause_right": verdicts.count("right"),
        "events_cause_unknown": verdicts.count("unknown"),
        "events_cause_other": verdicts.count("wrong"),
    }


def scenario_verdicts(outcomes: Sequence[Outcome]) -> dict[str, tuple[int, int]]:
    """Per scenario, (runs that met the criterion, runs), in the outcomes' order."""
    verdicts: dict[str, tuple[int, int]] = {}
    for o in outcomes:
        passed, runs = verdicts.get(o.scenario, (0, 0))
        verdicts[o.scenario] = (passed + o.passed, runs + 1)
    return verdicts


# --- markdown ----------------------------------------------------------------------------


def _expected(o: Outcome) -> str:
    if o.expect is None:
        return "nothing"
    e = o.expect
    text = f"{'/'.join(e.kinds)} from {e.onset}, within {e.within}"
    if e.layer is not None:
        text += f", layer {e.layer}"
    return text + (", before non-finite" if e.before_nonfinite else "")


def _raised_cell(raised: Sequence[Raised]) -> str:
    if not raised:
        return "none"
    shown = ", ".join(str(r) for r in raised[:_MAX_RAISED_SHOWN])
    more = len(raised) - _MAX_RAISED_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _fmt(value: float | int | bool | None, spec: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def to_markdown(outcomes: Sequence[Outcome]) -> str:
    """The outcomes as markdown: a row per scenario and seed, then the totals."""
    lines = [
        "| scenario | seed | label | expected | raised (warning/error) <cause> | delay | "
        "false alarms | layer ok | cause | info | met | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        label = "healthy" if o.healthy else "pathological"
        lines.append(
            f"| {o.scenario}{' (quick)' if o.quick else ''} | {o.seed} | {label} | "
            f"{_expected(o)} | {_raised_cell(o.raised)} | {_fmt(o.delay)} | "
            f"{o.false_alarms} | {_fmt(o.layer_ok)} | {o.cause or '–'} | {o.info_events} | "
            f"{_fmt(o.passed)} | {o.seconds:.1f} |"
        )
    t = totals(outcomes)
    lines += [
        "",
        f"- Healthy runs with no counted event: {t.healthy_clean} / {t.healthy_runs} "
        f"({t.healthy_false_alarms} false alarm(s) in all).",
        f"- Recall: {t.detected} / {t.pathological_runs} pathological runs detected "
        f"({_fmt(t.recall, '.0%')}); median delay {_fmt(t.median_delay, '.0f')} steps.",
        f"- Precision: {t.right_events} / {t.counted_events} counted events are right "
        f"detections ({_fmt(t.precision, '.0%')}).",
        f"- Layer accuracy: {t.layer_correct} / {t.layer_checked} layer-local detections "
        f"name the layer ({_fmt(t.layer_accuracy, '.0%')}).",
        f"- Cause: right on {t.cause_right} / {t.cause_checked} detections "
        f"({_fmt(t.cause_accuracy, '.0%')}), unknown on {t.cause_unknown}, wrong on "
        f"{t.cause_wrong}.",
        f"- Batch id and outlier examples named: {t.evidence_right} / {t.evidence_checked} "
        "runs that ask for them.",
        f"- Cause of every counted event from the onset on (consequences included): the "
        f"run's labelled cause on {t.events_cause_right}, unknown on "
        f"{t.events_cause_unknown}, another on {t.events_cause_other}.",
        "",
        "| scenario | criterion met (runs) |",
        "|---|---|",
    ]
    for name, (passed, runs) in scenario_verdicts(outcomes).items():
        mark = "pass" if passed == runs else "FAIL"
        lines.append(f"| {name} | {mark} ({passed} / {runs}) |")
    return "\n".join(lines) + "\n"


def describe_corpus() -> str:
    """Markdown listing every scenario with its description and the reason for its label."""
    lines = []
    for healthy, title in ((True, "Healthy runs"), (False, "Pathological runs")):
        lines += [f"## {title}", ""]
        for s in all_scenarios():
            if s.healthy != healthy:
                continue
            lines += [f"### `{s.name}`", "", s.description, ""]
            if s.expect is not None:
                lines += [f"Expected: {_expected_label(s.expect)}.", ""]
                if s.quick_expect is not None:
                    lines += [f"Quick variant: {_expected_label(s.quick_expect)}.", ""]
            lines += [f"Why this label: {s.label_reason}", ""]
    return "\n".join(lines)


def _expected_label(e: Expect) -> str:
    text = f"{' or '.join(e.kinds)} at or after step {e.onset}, known within {e.within} steps"
    if e.layer is not None:
        text += f", naming `{e.layer}` first"
    text += ", before the first non-finite step" if e.before_nonfinite else ""
    if e.causes:
        text += f"; cause `{'` or `'.join(e.causes)}`"
    if e.batch is not None:
        text += f", batch {e.batch} and its outlier examples named"
    return text


DOC = Path(__file__).resolve().parents[1] / "docs" / "detection.md"

_DOC_INTRO = """\
# Detection benchmark

What the guard's default detectors (`detectors="default"`, no arguments) report on a
labelled corpus of real training runs: small models trained for real on one CPU thread,
each labelled with what a careful engineer would say happened, and why. The corpus is
the test the defaults are held to; a detector tuned to it and nothing else would fail
on the next model, so every rule is stated in [guard.md](guard.md) with its reason.

Run it from a checkout installed editable (`pip install -e .`; the benchmarks live in
`benchmarks/`, not in the wheel):

```bash
gradguard bench detection                 # 23 scenarios x 3 seeds, about 80 s
gradguard bench detection --quick --seeds 1 --only lr_burst_early
python benchmarks/detection.py --doc docs/detection.md   # rewrites this page
```

## How a run is scored

Only events of `warning` or `error` severity count: they ask the user to act. `info`
events are log lines (a loss scaler backing off, a spike with no lasting effect) and never
count, for or against.

- **Healthy run**: any counted event is a false alarm. The criterion is none.
- **Pathological run**: detected when a counted event of an expected kind has its `step`
  at or after the labelled onset and is known (its `extra["detected_at"]`, else its
  `step`) within the allowed delay: within 10 steps of the onset for blow-ups, three
  drains (30 steps) for vanishing gradients and dead units, the exact step for a poisoned
  batch, `log(0)` and fp16 overflow, and before the first non-finite step for a slow
  divergence. A counted event before the onset is a false alarm.
- **Layer-local runs** (the first layers of a deep sigmoid MLP, the dead layers of a
  ReLU net, the one layer whose LR is far too high): the detecting event must name the
  labelled layer first in its `layers`.
- **Precision** is over all counted events: those that are the right detection of their
  run, over all of them. Events that follow a detected blow-up (an overflow after the
  explosion it came from, a divergence after a bad batch) count against it.
- **Cause**: every pathological run is labelled with the causes that are right for it
  (`Event.cause`: `saturation` for the deep sigmoid MLP, `initialization` for N(0, 1),
  radius-3 and small-init weights, `dead_units`, `lr_too_high` for the LR bursts, the
  ramp, Adam at LR 1 and the one layer's LR, `bad_batch`, `nonfinite_loss` for `log(0)`,
  `overflow` for fp16). The detecting event's cause is *right*, *unknown* (an honest
  answer, counted apart) or *wrong*. The corpus passes each step's index as
  `guard.step(batch=...)` and, for the classifiers, the per-example losses as
  `sample_losses=`; the poisoned batch and `log(0)` runs must also carry that batch id
  and name the examples that stand out.

"""


def doc_page(outcomes: Sequence[Outcome]) -> str:
    """The docs page: how runs are scored, the measured table, then every label's reason."""
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    when = time.strftime("%Y-%m-%d")
    seeds = sorted({o.seed for o in outcomes})
    return (
        _DOC_INTRO
        + f"## Results\n\nMeasured {when} on this machine ({machine}, 1 thread), seeds "
        + f"{', '.join(map(str, seeds))}.\n\n"
        + to_markdown(outcomes)
        + "\n# The corpus and how each label was decided\n\n"
        + describe_corpus()
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the corpus (all of it by default) and print the table; ``--help`` for options."""
    parser = argparse.ArgumentParser(description="Score gradguard's detectors on the corpus.")
    parser.add_argument("--quick", action="store_true", help="run the quick variants")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run this scenario (repeatable)"
    )
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1 (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument(
        "--doc", type=Path, default=None, help=f"write the whole docs page here (e.g. {DOC})"
    )
    args = parser.parse_args(argv)
    outcomes = run_corpus(args.only, seeds=tuple(range(args.seeds)), quick=args.quick)
    table = to_markdown(outcomes)
    print()
    print(table)
    if args.out is not None:
        args.out.write_text(table, encoding="utf-8")
        print(f"wrote {args.out}")
    if args.doc is not None:
        args.doc.write_text(doc_page(outcomes), encoding="utf-8")
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
