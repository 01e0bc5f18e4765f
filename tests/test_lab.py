"""The lab machinery: registry, run directory, results files, rendering, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from rich.console import Console

from gradguard import lab
from gradguard.errors import ConfigError, GradGuardError
from gradguard.lab import _registry
from gradguard.lab._records import (
    Claim,
    Criterion,
    ExperimentResult,
    Progress,
    Table,
    format_value,
)

CLAIM_KEYS = {
    "id",
    "source",
    "statement",
    "paper",
    "measured_on",
    "values",
    "mean",
    "std",
    "min",
    "max",
    "criterion",
    "threshold",
    "n_passed",
    "n",
    "passed",
    "outcome",
    "note",
    "elsewhere",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> lab.LabResult:
    # One experiment: each experiment's own behaviour is tested in its own test file.
    return lab.run(
        ["depth-activation"], quick=True, out=tmp_path_factory.mktemp("quick"), progress=False
    )


def test_registry_lists_every_experiment_under_its_own_name() -> None:
    assert "depth-activation" in lab.EXPERIMENTS
    for name, experiment in lab.EXPERIMENTS.items():
        assert experiment.name == name
    assert lab.list_experiments() == [(n, e.title) for n, e in lab.EXPERIMENTS.items()]
    assert all(title for _, title in lab.list_experiments())


def test_unknown_name_raises_config_error_naming_it_and_the_valid_ones(tmp_path: Path) -> None:
    out = tmp_path / "never-created"
    with pytest.raises(ConfigError) as info:
        lab.run(names=["depth-activation", "no-such-thing"], quick=True, out=out, progress=False)
    message = str(info.value)
    assert "'no-such-thing'" in message
    assert "depth-activation" in message.split("valid names:")[1]
    assert isinstance(info.value, GradGuardError)
    assert not out.exists(), "names must be checked before the run directory is created"


def test_empty_names_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(ConfigError, match="names=None"):
        lab.run(names=[], quick=True, progress=False)


def test_select_keeps_order_drops_duplicates_and_accepts_one_string() -> None:
    experiment = lab.EXPERIMENTS["depth-activation"]
    assert _registry.select(["depth-activation", "depth-activation"]) == [experiment]
    assert _registry.select("depth-activation") == [experiment]
    assert _registry.select(None) == list(lab.EXPERIMENTS.values())


def test_quick_run_writes_results_json_with_the_documented_structure(
    quick_run: lab.LabResult,
) -> None:
    data = json.loads((quick_run.run_dir / "results.json").read_text(encoding="utf-8"))
    assert data["quick"] is True
    assert data["seed"] == 0
    assert data["duration_s"] > 0
    assert data["versions"]["torch"] == torch.__version__.split("+")[0] or data["versions"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    assert "gradguard" in data["versions"]
    assert data["all_passed"] == quick_run.all_passed
    (experiment,) = data["experiments"]
    assert experiment["name"] == "depth-activation"
    assert experiment["seeds"] == [0]
    assert experiment["config"]["depths"] == [5, 10, 20, 30]
    assert experiment["claims"], "every experiment states claims"
    for claim in experiment["claims"]:
        assert set(claim) == CLAIM_KEYS
        assert claim["paper"]
        assert claim["criterion"]
        assert isinstance(claim["passed"], bool)
    # 6 activations x 2 inits x 4 depths, one seed, each with per-layer traces.
    assert len(experiment["measurements"]) == 48
    deepest = next(m for m in experiment["measurements"] if m["depth"] == 30)
    assert len(deepest["grad_norms"]) == len(deepest["layer_names"]) == 31
    assert len(deepest["activation_std"]) == 30
    assert len(deepest["backprop_std"]) == 31
    assert experiment["tables"][0]["columns"][2:] == ["depth 5", "depth 10", "depth 20", "depth 30"]
    assert len(experiment["tables"][0]["rows"]) == 12


def test_quick_run_writes_markdown_with_claims_and_ratio_table(quick_run: lab.LabResult) -> None:
    text = (quick_run.run_dir / "results.md").read_text(encoding="utf-8")
    assert "| claim | paper | measured | criterion | outcome |" in text
    assert "Gradient norm ratio, first layer / output layer" in text
    for claim in quick_run.experiments[0].claims:
        assert claim.statement in text
    ratio_rows = [line for line in text.splitlines() if line.startswith("| tanh | ")]
    assert len(ratio_rows) == 4  # default and Xavier, in the ratio and activation tables
    assert text.count("✓") + text.count("✗") == len(quick_run.experiments[0].claims)


def test_quick_runs_are_deterministic(quick_run: lab.LabResult, tmp_path: Path) -> None:
    again = lab.run(["depth-activation"], quick=True, out=tmp_path, progress=False)
    first, second = quick_run.experiments[0], again.experiments[0]
    assert first.measurements == second.measurements
    assert [c.values for c in first.claims] == [c.values for c in second.claims]
    assert first.tables == second.tables


def test_print_summary_shows_claims_verdicts_and_tables(quick_run: lab.LabResult) -> None:
    console = Console(record=True, width=600)  # wide enough that no cell wraps
    lab.print_summary(quick_run, console)
    text = console.export_text()
    for claim in quick_run.experiments[0].claims:
        assert claim.statement in text
    assert "mean [min" not in text  # quick: one seed, no spread
    assert "Gradient norm ratio" in text
    assert "claims reproduced" in text


class _FakeExperiment:
    """A stand-in experiment: one passing and one failing claim, one NaN measurement."""

    name = "fake"
    title = "A fake experiment for the runner tests"

    def __init__(self) -> None:
        self.calls: list[tuple[bool, int]] = []
        self.seed_counts: list[int | None] = []

    def run(
        self, *, quick: bool, seed: int, progress: Progress | None = None, seeds: int | None = None
    ) -> ExperimentResult:
        self.calls.append((quick, seed))
        self.seed_counts.append(seeds)
        if progress is not None:
            progress(1, 1)
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=("Nobody 2024",),
            setting="nowhere",
            config={"k": 1},
            seeds=(seed,),
            claims=(
                Claim("ok", "Nobody 2024", "ok", "1", "x", (0.5,), Criterion(high=1.0)),
                Claim("bad", "Nobody 2024", "bad", "1", "x", (math.nan,), Criterion(high=1.0)),
            ),
            tables=(Table("t", ("a", "b|c"), (("1", "2"),), note="n"),),
            measurements=({"value": math.inf},),
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> _FakeExperiment:
    experiment = _FakeExperiment()
    monkeypatch.setattr(_registry, "EXPERIMENTS", MappingProxyType({"fake": experiment}))
    return experiment


def test_failing_claim_is_reported_and_non_finite_values_stay_valid_json(
    fake: _FakeExperiment, tmp_path: Path
) -> None:
    result = lab.run(["fake"], quick=False, seed=3, out=tmp_path / "r", progress=True, seeds=4)
    assert fake.calls == [(False, 3)]
    assert fake.seed_counts == [4]  # --seeds reaches the experiment as an argument
    assert not result.all_passed
    assert [c.passed for c in result.experiments[0].claims] == [True, False]
    text = (result.run_dir / "results.json").read_text(encoding="utf-8")
    data = json.loads(text)  # strict JSON: NaN/Infinity would be rejected below
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["experiments"][0]["measurements"] == [{"value": "inf"}]
    assert data["experiments"][0]["claims"][1]["values"] == ["nan"]
    assert data["all_passed"] is False
    markdown = (result.run_dir / "results.md").read_text(encoding="utf-8")
    assert "1 of 2 claims reproduced" in markdown
    assert "| a | b\\|c |" in markdown  # a pipe in a cell does not split the column


def test_default_run_directory_is_timestamped_and_never_reused(
    fake: _FakeExperiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    first = lab.run(quick=True, progress=False)  # the fake experiment only
    second = lab.run(quick=True, progress=False)
    assert first.run_dir.parent == second.run_dir.parent == Path("runs")
    assert first.run_dir.name.startswith("lab-")
    assert first.run_dir != second.run_dir
    assert (first.run_dir / "results.json").is_file()
    assert (second.run_dir / "results.md").is_file()


def test_criterion_bounds_are_strict_and_reject_non_finite() -> None:
    inside = Criterion(low=0.1, high=10.0)
    assert inside.holds(1.0)
    assert not inside.holds(0.1)
    assert not inside.holds(10.0)
    assert not inside.holds(math.nan)
    assert not Criterion(high=1e-3).holds(-math.inf)
    assert Criterion(high=1e-3).holds(0.0)
    assert Criterion(low=0.5).describe() == "> 0.5"


def test_claim_summary_and_text() -> None:
    claim = Claim("c", "s", "st", "p", "on", (1.0, 2.0, 3.0), Criterion(high=2.5))
    assert claim.n_passed == 2
    assert not claim.passed
    assert claim.summary() == {
        "mean": 2.0,
        "std": pytest.approx(0.8165, abs=1e-4),
        "min": 1.0,
        "max": 3.0,
    }
    assert claim.measured_text() == "2 (range 1–3, n=3)"
    assert not Claim("c", "s", "st", "p", "on", (), Criterion()).passed
    assert format_value(3.0e-7) == "3.00e-07"


def test_claim_summary_of_several_values_with_an_infinite_one_has_no_spread() -> None:
    claim = Claim("c", "s", "st", "p", "on", (1.0, math.inf, 3.0), Criterion(low=0.0))
    summary = claim.summary()
    assert summary["mean"] == math.inf
    assert math.isnan(summary["std"])  # statistics.pstdev raises on inf
    assert (summary["min"], summary["max"]) == (1.0, math.inf)


def test_experiments_in_worker_processes_give_the_same_numbers_and_figures(
    quick_run: lab.LabResult, tmp_path: Path
) -> None:
    result = lab.run(
        ["depth-activation", "early-stopping"], quick=True, out=tmp_path, progress=False, jobs=2
    )
    assert [e.name for e in result.experiments] == ["depth-activation", "early-stopping"]
    parallel, alone = result.experiments[0], quick_run.experiments[0]
    assert parallel.measurements == alone.measurements
    assert [c.values for c in parallel.claims] == [c.values for c in alone.claims]
    assert (tmp_path / "depth-activation.png").is_file()
    assert (tmp_path / "early-stopping.png").is_file()


@pytest.mark.parametrize("jobs", [-1, 1.5, True])
def test_jobs_must_be_a_count(jobs: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jobs must be an int >= 0"):
        lab.run(["selu"], quick=True, out=tmp_path, jobs=jobs)  # type: ignore[arg-type]
