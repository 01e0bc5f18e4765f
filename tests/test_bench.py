"""Smoke test of the overhead benchmark, ``benchmarks/overhead_bench.py``: it runs, fills
every row, and its arithmetic holds.

No timing is asserted: only that the ratios and goals are computed from the medians the
result reports, and that the markdown is well formed.
"""

from __future__ import annotations

import importlib.util
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from gradguard.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import overhead_bench as bench  # noqa: E402  # benchmarks/, not the wheel

ROUNDS = 3
PEERS_INSTALLED = {
    bench.ZCLIP_PACKAGE: importlib.util.find_spec("zclip") is not None,
    bench.AUTOCLIP_PACKAGE: importlib.util.find_spec("autoclip") is not None,
}


@pytest.fixture(scope="module")
def result() -> bench.OverheadResult:
    return bench.run_overhead(rounds=ROUNDS, quick=True)


def _medians(rows: tuple[bench.Row, ...]) -> dict[str, float]:
    return {row.name: row.median_us for row in rows if row.median_us is not None}


def test_every_model_row_is_timed_in_every_round(result: bench.OverheadResult) -> None:
    assert [t.key for t in result.models] == ["gpt", "mlp"]
    for table in result.models:
        assert tuple(row.name for row in table.rows) == bench.MODEL_ROWS
        assert table.num_params >= table.num_tensors > 0
        for row in table.rows:
            expected = PEERS_INSTALLED.get(row.name, True)
            assert row.ran is expected, row.name
            if row.ran:
                assert len(row.samples_us) == ROUNDS
                assert row.calls >= 1
                assert all(value > 0 for value in row.samples_us)


def test_ratios_are_medians_over_reference_medians(result: bench.OverheadResult) -> None:
    for table in result.models:
        medians = _medians(table.rows)
        baseline = medians[bench.BASELINE]
        step = medians[bench.TRAIN_STEP]
        assert table.row(bench.BASELINE).ratio == pytest.approx(1.0)
        assert table.row(bench.TRAIN_STEP).step_percent == pytest.approx(100.0)
        for row in table.rows:
            if not row.ran:
                assert row.ratio is None
                continue
            assert row.median_us == statistics.median(row.samples_us)
            assert row.min_us is not None
            assert row.max_us is not None
            assert row.min_us <= row.median_us <= row.max_us
            assert row.reference == bench.BASELINE
            assert row.ratio == pytest.approx(medians[row.name] / baseline)
            assert row.step_percent == pytest.approx(100.0 * medians[row.name] / step)


def test_guard_cost_is_the_difference_of_the_reported_medians(
    result: bench.OverheadResult,
) -> None:
    for table in result.models:
        medians = _medians(table.rows)
        baseline = medians[bench.BASELINE]
        assert [c.optimizer for c in table.guard_costs] == ["foreach", "fused"]
        for optimizer, step_row, clip_row, guard_row in bench.GUARD_ROWS:
            cost = table.guard_cost(optimizer)
            assert (cost.model, cost.step_row, cost.clip_row, cost.guard_row) == (
                table.key,
                step_row,
                clip_row,
                guard_row,
            )
            step, clip, guard = table.row(step_row), table.row(clip_row), table.row(guard_row)
            assert step.calls == clip.calls == guard.calls
            assert step.calls % bench.LOG_EVERY == 0  # whole drains in every guard block
            own = medians[guard_row] - medians[step_row]
            in_place = medians[clip_row] - medians[step_row]
            assert (cost.step_us, cost.clip_step_us, cost.guard_us, cost.baseline_us) == (
                medians[step_row],
                medians[clip_row],
                medians[guard_row],
                baseline,
            )
            assert cost.own_us == pytest.approx(own)
            assert cost.ratio == pytest.approx(own / baseline)
            assert cost.clip_before_step_us == pytest.approx(in_place)
            assert cost.ratio_before_step == pytest.approx(own / in_place)
            pairs = [g - s for g, s in zip(guard.samples_us, step.samples_us, strict=True)]
            assert cost.paired_us == pytest.approx(statistics.median(pairs))


def test_guard_cost_without_its_rows_is_not_measured() -> None:
    cost = bench.GuardCost(
        model="mlp",
        optimizer="fused",
        step_row="a",
        clip_row="b",
        guard_row="c",
        step_us=None,
        clip_step_us=None,
        guard_us=None,
        baseline_us=10.0,
        paired_us=None,
        note="no fused",
    )
    assert (cost.own_us, cost.ratio, cost.clip_before_step_us, cost.ratio_before_step) == (
        None,
        None,
        None,
        None,
    )
    _, rows = bench._guard_cost_cells(
        [bench.ModelTable("mlp", "t", "d", 1, 1, (), guard_costs=(cost,))]
    )
    assert rows == [["mlp", "fused", "no fused", *["—"] * 7]]


def test_history_rows_are_relative_to_their_step_10(result: bench.OverheadResult) -> None:
    history = result.history
    medians = _medians(history.rows)
    assert history.row(history.autoclip_young).ratio == pytest.approx(1.0)
    assert history.steps == result.settings.history
    for row in history.rows:
        if row.ran:
            assert row.ratio == pytest.approx(medians[row.name] / medians[row.reference])
    packages = [row for row in history.rows if row.name.startswith("autoclip")]
    assert len(packages) == 3
    assert all(row.ran is PEERS_INSTALLED[bench.AUTOCLIP_PACKAGE] for row in packages)


def test_goals_use_the_reported_numbers(result: bench.OverheadResult) -> None:
    goals = {goal.name: goal for goal in result.goals}
    assert len(goals) == 21
    for table in result.models:
        for optimizer in ("foreach", "fused"):
            guard = goals[
                f"guard.step own cost vs torch clip_grad_norm_ before the same AdamW "
                f"{optimizer} step, {table.key}"
            ]
            cost = table.guard_cost(optimizer)
            assert guard.measured == cost.ratio_before_step
            if cost.own_us is not None and cost.clip_before_step_us:
                assert guard.measured == pytest.approx(cost.own_us / cost.clip_before_step_us)
            assert guard.target == pytest.approx(1.15)
        norm = goals[f"grad_stats + NormClip vs torch clip_grad_norm_, {table.key}"]
        assert norm.measured == table.row(bench.NORM_CLIP).ratio
        assert norm.target == pytest.approx(1.10)
        zclip = goals[f"ZClip vs the zclip package, {table.key}"]
        ours, theirs = table.row(bench.Z_CLIP).median_us, table.row(bench.ZCLIP_PACKAGE).median_us
        if theirs is None:
            assert zclip.measured is None
            assert zclip.met is None
        else:
            assert ours is not None
            assert zclip.measured == pytest.approx(ours / theirs)
        key = table.key

        def median(name: str, t: bench.ModelTable = table) -> float:
            value = t.row(name).median_us
            assert value is not None
            return value

        value = goals[f"ValueClip vs torch clip_grad_value_, {key}"]
        assert value.measured == pytest.approx(median(bench.VALUE_CLIP) / median(bench.VALUE_PEER))
        assert value.target == 1.0
        restore = median(bench.RESTORE)
        clipping = goals[f"ValueClip vs torch clip_grad_value_, every gradient clipped, {key}"]
        net = (median(bench.VALUE_CLIPPING) - restore) / (
            median(bench.VALUE_PEER_CLIPPING) - restore
        )
        assert clipping.measured is None or clipping.measured == pytest.approx(net)
        agc_torch = goals[f"AGC vs torch clip_grad_norm_, {key}"]
        assert agc_torch.measured == table.row(bench.AGC_CLIP).ratio
        assert agc_torch.target == 2.0
        agc_timm = goals[f"AGC vs timm adaptive_clip_grad, {key}"]
        if table.row(bench.AGC_PEER).ran:
            ratio = median(bench.AGC_CLIP) / median(bench.AGC_PEER)
            assert agc_timm.measured == pytest.approx(ratio)
        flat = goals[f"grad_stats with per-layer norms, flat buffer, vs the floor, {key}"]
        assert flat.measured == pytest.approx(median(bench.FLAT_STATS) / median(bench.FLOOR))
        assert flat.target == (5.0 if key == "mlp" else 1.3)
    history = result.history
    auto = goals[f"AutoClip per-step cost at step {history.steps:,} vs step 10"]
    assert auto.measured == history.row(history.autoclip_old).ratio
    for goal in result.goals:
        if goal.measured is not None:
            assert goal.met is (goal.measured <= goal.target)


def _tables(markdown: str) -> list[list[str]]:
    tables: list[list[str]] = []
    previous_was_table = False
    for line in markdown.splitlines():
        is_table = line.startswith("|")
        if is_table and not previous_was_table:
            tables.append([])
        if is_table:
            tables[-1].append(line)
        previous_was_table = is_table
    return tables


def test_flat_bound_is_the_norm_and_the_reads_over_the_floor(
    result: bench.OverheadResult,
) -> None:
    header, rows = bench._flat_bound_cells(result.models)
    assert header[4] == "lower bound × floor"
    for table, cells in zip(result.models, rows, strict=True):
        median = {row.name: row.median_us for row in table.rows}
        floor = median[bench.FLOOR]
        assert floor is not None
        norm, reads = median[bench.NORM_FLOOR], median[bench.VIEW_READS]
        assert norm is not None
        assert reads is not None
        assert cells[0] == table.key
        assert cells[2] == f"{norm / floor:.2f}×"
        assert cells[3] == f"{reads / floor:.2f}×"
        assert cells[4] == f"{(norm + reads) / floor:.2f}×"
        assert cells[6] == f"≤ {bench.FLAT_GOALS[table.key]:.2f}×"


def test_markdown_tables_are_well_formed(result: bench.OverheadResult) -> None:
    markdown = result.to_markdown()
    tables = _tables(markdown)
    # models, guard cost, history, goals, the flat-buffer bound
    assert len(tables) == len(result.models) + 4
    for lines in tables:
        assert re.fullmatch(r"\|( -{3,}:? \|)+", lines[1]), lines[1]
        widths = {line.count("|") for line in lines}
        assert len(widths) == 1, lines
        assert all(line.endswith(" |") for line in lines)
    for table, lines in zip(result.models, tables, strict=False):
        assert len(lines) == 2 + len(bench.MODEL_ROWS)
        for row, line in zip(table.rows, lines[2:], strict=True):
            assert line.startswith(f"| {row.name} |")
    guard_lines = tables[len(result.models)]
    costs = [cost for table in result.models for cost in table.guard_costs]
    assert len(guard_lines) == 2 + len(costs)
    for cost, line in zip(costs, guard_lines[2:], strict=True):
        assert line.startswith(f"| {cost.model} | {cost.optimizer} |")
        assert cost.ratio is not None
        assert cost.ratio_before_step is not None
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[-3] == f"{cost.ratio:.2f}×"
        assert cells[-1] == f"{cost.ratio_before_step:.2f}×"
    assert len(tables[-2]) == 2 + len(result.goals)
    for goal, line in zip(result.goals, tables[-2][2:], strict=True):
        assert line.endswith({True: "| ✓ |", False: "| ✗ |", None: "| n/a |"}[goal.met])
    assert len(tables[-1]) == 2 + len(result.models)
    assert "Quick mode" in markdown


def test_report_and_console_output(result: bench.OverheadResult) -> None:
    report = bench.report_markdown(result)
    assert report.startswith("# Performance")
    assert "make bench" in report
    assert "python benchmarks/overhead.py" in report
    assert result.machine.cpu in report
    assert torch.__version__ in report
    assert report.endswith(result.to_markdown())
    console = Console(record=True, width=240)
    bench.print_result(result, console)
    text = console.export_text()
    for name in (bench.BASELINE, bench.TRAIN_STEP, "Guard cost per step", "Goals", "bounds"):
        assert name in text


def test_missing_peers_are_marked_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("zclip", "autoclip", "autoclip.torch", "timm", "timm.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    result = bench.run_overhead(rounds=1, quick=True)
    for table in result.models:
        for name in (bench.ZCLIP_PACKAGE, bench.AUTOCLIP_PACKAGE, bench.AGC_PEER):
            row = table.row(name)
            assert not row.ran
            assert row.ratio is None
            assert bench.NOT_INSTALLED in row.note
        assert table.row(bench.NORM_CLIP).ran
    assert [g.met for g in result.goals if g.name.startswith("ZClip")] == [None, None]
    assert [g.met for g in result.goals if "timm" in g.name] == [None] * 4
    assert "not installed" in result.to_markdown()


def test_leaves_threads_and_rng_as_found() -> None:
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    bench.run_overhead(rounds=1, quick=True, threads=threads + 1)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rounds": 0}, "rounds"), ({"rounds": 2.5}, "rounds"), ({"threads": 0}, "threads")],
)
def test_bad_arguments_fail_before_running(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        bench.run_overhead(**kwargs)  # type: ignore[arg-type]


def test_a_skipped_guard_step_fails_the_benchmark() -> None:
    model = torch.nn.Linear(3, 1)
    model.weight.grad, model.bias.grad = torch.ones(1, 3), torch.ones(1)
    guarded = bench._Guarded("foreach", ("bare", "clip", "guard"), model, torch.tensor(1.0))
    for contender in (guarded.bare, guarded.clipped, guarded.guarded):
        contender.fn()
    guarded.check_not_skipped()  # three real steps: fine
    model.weight.grad = torch.full((1, 3), float("nan"))
    guarded.guarded.fn()
    with pytest.raises(RuntimeError, match="made 3 steps in 2 bare calls and 2 guard calls"):
        guarded.check_not_skipped()
