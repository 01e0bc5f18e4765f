"""The recovery experiment: a real divergence, the guard alone, and the guard with Rollback."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import LabRuns
from gradguard import lab
from gradguard.lab import recovery as rc
from gradguard.lab.plots import write_plots
from gradguard.lab.recovery import _kept_and_abandoned


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> lab.LabResult:
    result: lab.LabResult = lab_runs.quick("recovery")[0]
    return result


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: lab.LabResult) -> dict[str, Any]:
    return lab_runs.stored(quick)


def _arms(experiment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["arm"]: m for m in experiment["measurements"]}


def test_quick_run_reproduces_its_claims(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.name == "recovery"
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == [
        "guard-alone-cannot-undo",
        "rollback-recovers",
        "rollback-predates-fault",
    ]
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_results_json_holds_every_arms_curves_and_events(stored: dict[str, Any]) -> None:
    arms = _arms(stored)
    assert list(arms) == list(rc.ARMS)
    for arm in arms.values():
        assert len(arm["steps"]) == len(arm["loss"]) == len(arm["grad_norm"]) == arm["iterations"]
        assert arm["optimizer_steps"] == rc.STEPS
        assert arm["skipped_steps"] == 0  # an LR fault leaves every gradient finite
    for name in ("clean", "guard"):
        assert arms[name]["steps"] == list(range(1, rc.STEPS + 1))
        assert not any(e["kind"] == "rollback" for e in arms[name]["events"])
    assert arms["clean"]["events"] == []
    assert arms["guard"]["should_stop"] is True  # Divergence asked the loop to stop

    rolled = arms["rollback"]
    # Spike at 501 (the loss after the first update at 100x), rollback at the drain of
    # step 510 to the newest snapshot before the fault (450), cool-down over 100 steps later.
    assert rolled["steps"] == [*range(1, 511), *range(451, rc.STEPS + 1)]
    assert rolled["iterations"] == rc.STEPS + 60
    kinds = [e["kind"] for e in rolled["events"]]
    assert kinds.count("rollback") == 1
    assert kinds.count("cooldown") == 1
    rollback = next(e for e in rolled["events"] if e["kind"] == "rollback")
    cooldown = next(e for e in rolled["events"] if e["kind"] == "cooldown")
    first_spike = next(e for e in rolled["events"] if e["kind"] == "spike")
    assert (first_spike["step"], rollback["step"], rollback["value"]) == (501, 510, 450.0)
    assert cooldown["step"] == 450 + rc.COOLDOWN
    assert rolled["snapshot_nbytes"] > 0
    # The curves carry the story: the spike is in the guard-only arm and undone by rollback.
    guard_loss = dict(zip(arms["guard"]["steps"], arms["guard"]["loss"], strict=True))
    clean_loss = dict(zip(arms["clean"]["steps"], arms["clean"]["loss"], strict=True))
    assert float(guard_loss[505]) > 100 * float(clean_loss[505])


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "recovery.png"
    assert figure.is_file()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    written = write_plots({"experiments": [stored]}, tmp_path)
    assert [p.name for p in written] == ["recovery.png"]


def test_kept_and_abandoned_split_a_rewound_step_sequence() -> None:
    kept, abandoned = _kept_and_abandoned([1, 2, 3, 4, 2, 3, 5], [1, 2, 3, 4, 20, 30, 50])
    assert kept == {1: 1, 2: 20, 3: 30, 4: 4, 5: 50}
    assert abandoned == [[(2, 2), (3, 3), (4, 4)]]
    assert _kept_and_abandoned([1, 2], [1.0, 2.0]) == ({1: 1.0, 2: 2.0}, [])


def test_quick_runs_are_deterministic_single_threaded_and_leave_global_rngs_alone(
    quick: lab.LabResult,
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    states = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(legacy=False)["state"]["key"].copy(),
    )
    threads: list[int] = []
    try:
        again = rc.EXPERIMENT.run(
            quick=True, seed=0, progress=lambda d, t: threads.append(torch.get_num_threads())
        )
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads == [1, 1, 1]
    assert after == 2
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state(legacy=False)["state"]["key"], states[2])
    (first,) = quick.experiments
    assert again.measurements == first.measurements
    assert [c.values for c in again.claims] == [c.values for c in first.claims]
    assert again.tables == first.tables


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    arms = [rc.Arm.from_dict(m) for m in stored["measurements"]]  # read back from JSON
    assert rc.claims(arms, (0,)) == result.claims
    by_name = {a.arm: a for a in arms}
    clean = by_name["clean"].final_loss

    def verdicts(**changes: rc.Arm) -> dict[str, bool]:
        changed = [changes.get(a.arm, a) for a in arms]
        return {c.id: c.passed for c in rc.claims(changed, (0,))}

    mild = dataclasses.replace(by_name["guard"], final_loss=5 * clean)
    assert verdicts(guard=mild)["guard-alone-cannot-undo"] is False
    lost = dataclasses.replace(by_name["guard"], final_loss=math.nan)
    assert verdicts(guard=lost)["guard-alone-cannot-undo"] is True  # NaN: ruined

    worse = dataclasses.replace(by_name["rollback"], final_loss=1.2 * clean)
    assert verdicts(rollback=worse) == {
        "guard-alone-cannot-undo": True,
        "rollback-recovers": False,
        "rollback-predates-fault": True,
    }
    late = [
        dict(e, value=500.0) if e["kind"] == "rollback" else e for e in by_name["rollback"].events
    ]
    none = [e for e in by_name["rollback"].events if e["kind"] != "rollback"]
    for events in (late, none):
        changed = dataclasses.replace(by_name["rollback"], events=tuple(events))
        assert verdicts(rollback=changed)["rollback-predates-fault"] is False
