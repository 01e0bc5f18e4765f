"""docs/triage.md shows what examples/triage.py prints, and the page's code runs as shown.

The example runs once, with the arguments the page gives (none: the defaults), from a
fresh directory. What the page pastes is parsed with the same parser as the run's output:
the events (step, kind, severity, cause, batch, the examples that stand out, what a
rollback undid), the verdicts and the clip threshold applied must agree, and the fixed
run must hold the measures the page states.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from gradguard.causes import CAUSES

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "triage.md"
EXAMPLE = ROOT / "examples" / "triage.py"
RUNS = ("no fault", "run 1, as is", "run 2, fixed")


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("triage_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def blocks(language: str, text: str | None = None) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text() if text is None else text, re.S)


def block_with(language: str, marker: str, text: str | None = None) -> str:
    found = [b for b in blocks(language, text) if marker in b]
    assert len(found) == 1, f"docs/triage.md: one ```{language} block holding {marker!r}"
    return found[0]


def text_after(code: str) -> str:
    """The ```text block that follows the code block ``code`` in the page."""
    doc = DOC.read_text()
    rest = doc[doc.index(code) + len(code) :]
    match = re.search(r"```text\n(.*?)```", rest, re.S)
    assert match is not None
    return match.group(1)


@dataclass(frozen=True)
class Shown:
    """One warning or error as the example prints it, without the numbers that float."""

    run: str
    step: int
    end: int
    severity: str
    kind: str
    cause: str
    batch: str | None
    examples: tuple[int, ...]
    undone: str | None
    skipped: int | None


@dataclass
class Printed:
    verdicts: list[tuple[str, str]]
    events: list[Shown]
    clip: str | None
    summary: dict[str, tuple[float, float, float, int, int]]


EVENT = re.compile(r"^step (\d+)(?: \(to step (\d+)\))?: (\w+) (.+)$")
SUMMARY = re.compile(
    r"^(no fault|run 1, as is|run 2, fixed):\s+loss ([\d.]+) before, ([\d.]+) after; test "
    r"accuracy ([\d.]+) after (\d+) steps \((\d+) batches drawn\)$"
)


def parse(output: str) -> Printed:  # noqa: C901 - one branch per kind of line
    printed = Printed([], [], None, {})
    run = ""
    fields: dict[str, Any] = {}

    def close() -> None:
        if fields:
            printed.events.append(Shown(run=run, **fields))
            fields.clear()

    for line in output.splitlines():
        if line.startswith("== run"):
            close()
            run = line.split(":")[0].removeprefix("== ")
            clip = re.search(r"gg\.NormClip\(([^)]*)\)", line)
            printed.clip = clip.group(1) if clip else printed.clip
        elif verdict := re.match(r"^verdict \((\w+)\): (.*)$", line):
            printed.verdicts.append((verdict.group(1), verdict.group(2)))
        elif event := EVENT.match(line):
            close()
            step = int(event.group(1))
            end = int(event.group(2) or step)
            fields.update(step=step, end=end, severity=event.group(3), kind=event.group(4))
            fields.update(cause="", batch=None, examples=(), undone=None, skipped=None)
        elif line.startswith("  cause: "):
            fields["cause"] = line.split()[1]
        elif line.startswith("  batch: "):
            fields["batch"] = line.removeprefix("  batch: ")
        elif line.startswith("  examples that stand out: "):
            fields["examples"] = tuple(int(i) for i in re.findall(r"(\d+) \(loss", line))
        elif line.startswith("  steps undone: "):
            fields["undone"] = line.removeprefix("  steps undone: ")
        elif line.startswith("  batches skipped: "):
            fields["skipped"] = int(line.split()[2].rstrip(","))
        elif summary := SUMMARY.match(line):
            close()
            before, after, accuracy, steps, drawn = summary.groups()[1:]
            printed.summary[summary.group(1)] = (
                float(before),
                float(after),
                float(accuracy),
                int(steps),
                int(drawn),
            )
    close()
    return printed


def pasted() -> str:
    return block_with("text", "== run 1")


@dataclass(frozen=True)
class Run:
    output: str  # what the example printed
    root: Path  # the directory it ran in


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``python examples/triage.py`` as the page runs it: defaults, from a fresh directory."""
    root = tmp_path_factory.mktemp("triage")
    out = io.StringIO()
    with working_directory(root), contextlib.redirect_stdout(out):
        load_example().main([])
    (written,) = (root / "runs").glob("triage-*")  # a new directory, named by the time
    for name in ("as-is", "fixed"):
        assert (written / name / "report.html").is_file()
    return Run(out.getvalue(), root)


def test_the_page_pastes_a_run_of_the_documented_command() -> None:
    command = block_with("bash", "examples/triage.py")
    assert command.split("#")[0].split() == ["python", "examples/triage.py"]
    assert "== run 2" in pasted()
    assert "== what the fault cost" in pasted()
    assert parse(pasted()).events, "the pasted block holds events"


@pytest.mark.slow
def test_the_events_the_page_pastes_are_reproduced(example_run: Run) -> None:
    doc, run = parse(pasted()), parse(example_run.output)
    assert run.events == doc.events
    assert run.clip == doc.clip
    assert [level for level, _ in run.verdicts] == [level for level, _ in doc.verdicts]
    assert run.verdicts == doc.verdicts
    # The story the page tells: the corrupted records are named, at the fault's step.
    first = doc.events[0]
    assert (first.step, first.kind, first.cause) == (150, "spike (loss)", "bad_batch")
    assert len(first.examples) == 4
    assert any(e.kind == "rollback" and e.undone == "101 to 150" for e in doc.events)


@pytest.mark.slow
def test_the_named_examples_are_the_corrupted_records(example_run: Run) -> None:
    """The outliers' ids are the last four dataset indices of the 150th batch."""
    example = load_example()
    x, _, _, _ = example.load_data()
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, len(x), (example.BATCH_SIZE,), generator=generator)
    corrupted = set(batch[-example.BAD_RECORDS :].tolist())
    first = parse(example_run.output).events[0]
    assert set(first.examples) == corrupted
    assert first.batch is not None
    assert first.batch.startswith("[" + ", ".join(str(i) for i in batch[:4].tolist()))


@pytest.mark.slow
def test_the_fix_holds_by_the_pages_measures(example_run: Run) -> None:
    doc, run = parse(pasted()).summary, parse(example_run.output).summary
    assert set(run) == set(doc) == set(RUNS)
    for name in RUNS:  # the page's numbers are what the run measured
        for measured, shown in zip(run[name], doc[name], strict=True):
            assert measured == pytest.approx(shown, rel=0.05, abs=0.011), name
    clean, as_is, fixed = (run[name] for name in RUNS)
    accuracy, after = 2, 1
    # The measures the page states: with the advice applied, the fault no longer damages
    # the run; without it, it does.
    assert clean[accuracy] - fixed[accuracy] <= 0.02
    assert clean[accuracy] - as_is[accuracy] >= 0.3
    assert fixed[after] < 1.0
    assert as_is[after] > 100
    assert fixed[4] == clean[4] + 50  # the rollback skipped 50 batches
    prose = " ".join(DOC.read_text().split())  # the page's lines wrap anywhere
    assert f"{clean[accuracy] - fixed[accuracy]:.3f} below the run" in prose
    assert f"run 1 lost {clean[accuracy] - as_is[accuracy]:.3f}" in prose
    for name, column in zip(RUNS, (clean, as_is, fixed), strict=True):
        assert f"{column[accuracy]:.3f}" in prose.split("| test accuracy at the end")[1], name


@pytest.mark.slow
def test_the_run_directory_snippet_prints_what_the_page_shows(example_run: Run) -> None:
    snippet = block_with("python", "events.jsonl")
    out = io.StringIO()
    with working_directory(example_run.root), contextlib.redirect_stdout(out):
        exec(compile(snippet, str(DOC), "exec"), {})
    assert out.getvalue() == text_after(snippet)


def test_a_comparison_with_a_changed_page_fails(tmp_path: Path) -> None:
    """The comparison can fail: a page naming another example or step does not match."""
    text = pasted()
    original = parse(text)
    first = original.events[0]
    named = str(first.examples[0])
    wrong_example = text.replace(f"{named} (loss", f"{int(named) + 1} (loss", 1)
    wrong_step = text.replace(f"\nstep {first.step}", f"\nstep {first.step + 10}", 1)
    assert parse(wrong_example).events != original.events
    assert parse(wrong_step).events != original.events


def test_a_nan_streak_is_one_event_with_a_count() -> None:
    code = block_with("python", 'float("nan")')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    assert out.getvalue() == text_after(code)
    kind, first, last, count = out.getvalue().split()[:4]
    assert (kind, int(first), int(last), int(count)) == ("nonfinite", 40, 69, 30)


def test_the_cause_table_lists_every_cause() -> None:
    section = DOC.read_text().split("## The causes")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert listed == list(CAUSES)


def test_the_starting_configuration_runs(tmp_path: Path) -> None:
    code = block_with("python", "gg.Rollback()")
    assert len(code.splitlines()) == 12
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 8, generator=data), torch.randint(0, 3, (256,), generator=data)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            indices = torch.randint(0, 256, (32,), generator=data)
            yield indices, x[indices], y[indices]

    names = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=100),
        "total_steps": 60,
        "batches": batches(),
    }
    with working_directory(tmp_path):
        exec(compile(code, str(DOC), "exec"), names)
    guard = names["guard"]
    assert guard.step_count == 60
    assert (tmp_path / "runs" / "my-run" / "metrics.jsonl").is_file()
