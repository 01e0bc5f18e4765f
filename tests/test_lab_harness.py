"""The lab harness: the experiment template, records, training pieces, figures, outcomes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import mlp
from gradguard import lab
from gradguard.guard import Guard
from gradguard.lab._figures import block_means, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment, seeds_for
from gradguard.lab._records import (
    NOT_AT_THIS_SCALE,
    REFUTED,
    REPRODUCED,
    BySeed,
    Claim,
    Criterion,
    ExperimentResult,
    LabResult,
    Record,
    ScaleResult,
    Table,
    cell,
    listed,
    share,
)
from gradguard.lab._reference import build_reference, load_reference, with_reference
from gradguard.lab._render import print_summary, summary_lines, to_markdown
from gradguard.lab._training import Recorder, index_batches, train_loop


@dataclass(frozen=True)
class Inner(Record):
    name: str
    value: float


@dataclass(frozen=True)
class Sample(Record):
    arm: str
    seed: int
    loss: float
    step: int | None
    curve: tuple[float, ...]
    grid: tuple[tuple[float, ...], ...]
    names: tuple[str, ...]
    events: tuple[dict[str, Any], ...]
    inner: Inner


def sample(seed: int = 0, loss: float = 0.5) -> Sample:
    return Sample(
        arm="a",
        seed=seed,
        loss=loss,
        step=None,
        curve=(1.0, math.inf),
        grid=((1.0,), (2.0, 3.0)),
        names=("x", "y"),
        events=({"kind": "spike", "step": 3},),
        inner=Inner("w", 2.5),
    )


def test_a_record_round_trips_through_json_text_with_non_finite_numbers() -> None:
    record = sample(loss=math.nan)
    data = record.to_dict()
    assert data["curve"] == [1.0, math.inf]
    assert data["grid"] == [[1.0], [2.0, 3.0]]
    assert list(data) == [
        "arm",
        "seed",
        "loss",
        "step",
        "curve",
        "grid",
        "names",
        "events",
        "inner",
    ]
    # results.json stores non-finite numbers as text
    text = json.loads(json.dumps(data).replace("NaN", '"nan"').replace("Infinity", '"inf"'))
    back = Sample.from_dict(text)
    assert math.isnan(back.loss)
    assert back.curve == (1.0, math.inf)
    assert back.grid == ((1.0,), (2.0, 3.0))
    assert isinstance(back.grid, tuple)
    assert back.names == ("x", "y")
    assert back.step is None
    assert back.inner == Inner("w", 2.5)
    assert back.events == ({"kind": "spike", "step": 3},)
    assert Sample.from_dict({**text, "step": 7}).step == 7


def test_cells_list_and_index_by_seed() -> None:
    assert cell([0.5]) == "0.5"
    assert cell([1.0, 2.0, 3.0]) == "2 [1, 3]"
    assert cell([1.0, math.nan]) == "1, nan"
    assert cell([2.0], "*") == "2*"
    assert listed([0.2, 0.38]) == "0.2, 0.38"
    assert share([1.0, 2.0, 3.0, 4.0], Criterion(low=2.5)) == 0.5
    runs = BySeed([sample(1, 0.1), sample(0, 0.2)], (0, 1), key=lambda r: (r.arm,))
    assert [r.loss for r in runs.get("a")] == [0.2, 0.1]


def test_seeds_of_the_two_variants() -> None:
    assert seeds_for(4, quick=True, n_full=3) == (4,)
    assert seeds_for(4, quick=False, n_full=2) == (4, 5)


class Toy(LabExperiment):
    """Two arms per seed; the claim holds when the arm's value is below 1."""

    name = "toy"
    title = "A toy experiment"
    references = ("Nobody 2026",)
    setting = "Here: nothing at all."
    full_seeds = 2
    record_type = Sample

    def __init__(self) -> None:
        self.threads: list[int] = []

    def config(self, quick: bool) -> Mapping[str, Any]:
        return {"quick": quick}

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Any]:
        return [lambda s=s, v=v: self._unit(s, v) for s in seeds for v in (0.5, 2.0)]

    def _unit(self, seed: int, value: float) -> Sample:
        self.threads.append(torch.get_num_threads())
        return sample(seed, value)

    def claims(self, records: Sequence[Any], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        values = tuple(r.loss for r in records if r.loss < 1)
        return (Claim("small", "Nobody 2026", "small", "< 1", "toy", values, Criterion(high=1)),)

    def tables(self, records: Sequence[Any], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        return (
            Table(
                "losses", ("seed", "loss"), tuple((str(r.seed), cell([r.loss])) for r in records)
            ),
        )

    def figure(self, records: Sequence[Any], data: Mapping[str, Any]) -> Any:
        fig, ax = new_figure(figsize=(3, 2))
        ax.plot([r.loss for r in records])
        return fig


def test_the_template_runs_the_grid_on_one_thread_with_progress_and_seeds() -> None:
    toy, seen = Toy(), []
    before = torch.get_num_threads()
    result = toy.run(quick=False, seed=3, progress=lambda d, t: seen.append((d, t)))
    assert result.seeds == (3, 4)
    assert result.config == {"quick": False}
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert set(toy.threads) == {1}
    assert torch.get_num_threads() == before
    assert [m["seed"] for m in result.measurements] == [3, 3, 4, 4]
    assert result.claims[0].values == (0.5, 0.5)
    assert result.name == "toy"
    assert toy.run(quick=False, seed=0, seeds=5).seeds == (0, 1, 2, 3, 4)
    assert toy.run(quick=True, seed=9).seeds == (9,)


def test_plot_saves_the_figure_without_pyplot_or_a_backend_change(tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    figures_before = pyplot.get_fignums() if pyplot else []
    data = Toy().run(quick=True, seed=0).to_dict()
    path = Toy().plot(data, tmp_path)
    assert path == tmp_path / "toy.png"
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend
    if pyplot:
        assert pyplot.get_fignums() == figures_before


def test_figure_helpers() -> None:
    assert block_means([1.0, 3.0, math.nan, 5.0], width=2) == [2.0, 5.0]
    assert all(math.isnan(v) for v in positive_or_nan([0, -1, math.inf]))
    assert positive_or_nan(["2.5"]) == [2.5]
    fig, axes = new_figure(1, 2, figsize=(4, 2), sharey=True)
    assert len(axes) == 2
    assert tuple(fig.get_size_inches()) == (4, 2)


def test_index_batches_cover_each_epoch_once_and_drop_the_short_batch() -> None:
    stream = index_batches(10, 4, torch.Generator().manual_seed(0))
    epoch = [next(stream) for _ in range(2)]
    assert all(len(b) == 4 for b in epoch)
    assert len(set(torch.cat(epoch).tolist())) == 8
    full = index_batches(10, 4, torch.Generator().manual_seed(0), drop_last=False)
    assert sorted(torch.cat([next(full) for _ in range(3)]).tolist()) == list(range(10))


def _model(seed: int = 0) -> nn.Module:
    return mlp(4, 8, 1, seed=seed)


X, Y = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 1)


def _mse(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(X[index]), Y[index])


def test_the_unguarded_loop_is_the_plain_loop() -> None:
    plain, looped = _model(), _model()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for index in [torch.arange(i, i + 8) for i in range(0, 24, 8)]:
        opt.zero_grad()
        _mse(plain, index).backward()
        opt.step()
    opt2 = torch.optim.SGD(looped.parameters(), lr=0.1)
    taken = train_loop(looped, opt2, (torch.arange(i, i + 8) for i in range(0, 24, 8)), _mse, 3)
    assert taken == 3
    for a, b in zip(plain.parameters(), looped.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_guarded_loop_steps_the_guards_scheduler_and_records() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    recorder = Recorder()
    guard = Guard(model, opt, scheduler=schedule, log_every=2, sinks=[recorder])
    stops = []
    taken = train_loop(
        model,
        opt,
        index_batches(32, 8, torch.Generator().manual_seed(0)),
        _mse,
        10,
        guard=guard,
        after_step=lambda step, loss, report: stops.append(step) or step == 4,
    )
    guard.close()
    assert taken == 4
    assert stops == [1, 2, 3, 4]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)
    assert recorder.steps == [1, 2, 3, 4]
    assert len(recorder.loss) == 4
    assert len(recorder.lr) == 4
    assert recorder.layer_names
    assert len(recorder.layer_columns(recorder.layer_names[:1])[0]) == 1


def test_the_loop_refuses_a_scheduler_the_guard_does_not_step() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(ValueError, match="pass the scheduler to the Guard"):
        train_loop(model, opt, iter([]), _mse, 1, guard=Guard(model, opt), scheduler=schedule)


def claim(values: tuple[float, ...], *elsewhere: ScaleResult, claim_id: str = "c") -> Claim:
    return Claim(
        claim_id,
        "Someone 1999",
        "it holds",
        "yes",
        "here",
        values,
        Criterion(high=1.0),
        "",
        elsewhere,
    )


FULL_OK = ScaleResult("full", True, "0.5 (< 1)", 3)
FULL_BAD = ScaleResult("full", False, "2 (< 1)", 3)


def test_the_three_outcomes() -> None:
    assert claim((0.5,)).outcome == REPRODUCED
    assert claim((0.5,), FULL_BAD).outcome == REPRODUCED
    assert claim((2.0,), FULL_BAD).outcome == REFUTED
    assert claim((2.0,), FULL_OK).outcome == NOT_AT_THIS_SCALE
    assert claim((2.0,)).outcome == NOT_AT_THIS_SCALE  # nothing else on record
    assert claim((2.0,), FULL_OK).to_dict()["elsewhere"] == [
        {"variant": "full", "passed": True, "measured": "0.5 (< 1)", "seeds": 3}
    ]


def _lab(*claims: Claim, quick: bool = True) -> LabResult:
    experiment = ExperimentResult("toy", "Toy", (), "", {}, (0,), claims, (), ())
    return LabResult(Path("."), (experiment,), 0, quick, 1.0, {}, "now")


def test_the_summary_names_each_outcome_and_the_claims_behind_it() -> None:
    result = _lab(
        claim((0.5,), claim_id="ok"),
        claim((2.0,), FULL_BAD, claim_id="finding"),
        claim((2.0,), FULL_OK, claim_id="small"),
    )
    assert result.outcomes()[REFUTED][0].id == "finding"
    assert not result.as_expected
    lines = [line for _, line in summary_lines(result)]
    assert lines[0].strip().startswith("1 reproduced")
    assert "1 refuted" in lines[1]
    assert "toy/finding" in lines[1]
    assert "not reproduced at this scale" in lines[2]
    assert "toy/small" in lines[2]
    assert "full lab" in lines[3]
    console = Console(record=True, width=200)
    print_summary(result, console)
    text = console.export_text()
    assert "full (3 seeds): 0.5 (< 1) ✓" in text
    assert text.rstrip().endswith(
        "1 of 3 claims reproduced; 1 refuted, 1 not reproduced at this scale."
    )
    assert "- 1 refuted" in to_markdown(result)
    assert _lab(claim((0.5,)), claim((2.0,), FULL_BAD)).as_expected


def test_the_reference_is_built_from_both_variants_and_attached_to_the_other(
    tmp_path: Path,
) -> None:
    quick = _lab(claim((2.0,), claim_id="small")).to_dict()
    full = _lab(claim((0.5, 0.7), claim_id="small"), quick=False).to_dict()
    reference = build_reference([quick, full])
    assert reference["claims"]["toy/small"]["full"] == {
        "passed": True,
        "measured": "0.6 (range 0.5–0.7, n=2) (< 1)",
        "seeds": 1,
    }
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(reference), encoding="utf-8")
    loaded = load_reference(path)
    (experiment,) = _lab(claim((2.0,), claim_id="small")).experiments
    attached = with_reference(experiment, quick=True, reference=loaded)
    assert attached.claims[0].outcome == NOT_AT_THIS_SCALE
    assert attached.claims[0].elsewhere[0].variant == "full"
    assert with_reference(experiment, quick=False, reference=loaded).claims[0].outcome == REFUTED


def test_the_shipped_reference_holds_every_claim_of_the_full_lab() -> None:
    """Every claim is on record at full scale; the quick ones too, checked by each quick run."""
    reference = load_reference()
    assert reference, "src/gradguard/lab/reference.json is missing"
    assert all("full" in by_variant for by_variant in reference.values())
    assert {key.split("/")[0] for key in reference} == set(lab.EXPERIMENTS)
    assert sum("quick" in v for v in reference.values()) < len(reference)  # full-only claims
