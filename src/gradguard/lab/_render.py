"""Show lab results: a markdown document for the run directory and rich tables for the console.

Both read :class:`LabResult` only; they compute nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from gradguard.lab._records import (
    NOT_AT_THIS_SCALE,
    REFUTED,
    REPRODUCED,
    Claim,
    ExperimentResult,
    LabResult,
    Table,
)

CLAIM_COLUMNS = ("claim", "paper", "measured", "criterion", "outcome")

STYLES = {REPRODUCED: "green", REFUTED: "magenta", NOT_AT_THIS_SCALE: "yellow"}
"""Console colour of each outcome: a refuted claim is a finding, not a failure."""

MEANING = {
    REPRODUCED: "the measurement meets the claim's criterion",
    REFUTED: "the measurement contradicts the claim at every scale tried: a finding",
    NOT_AT_THIS_SCALE: "this variant is too small to show it",
}


def _verdict(claim: Claim) -> str:
    """The outcome cell: a tick, or the outcome with the other scale's result beside it."""
    if claim.outcome == REPRODUCED:
        return "✓"
    beside = "; ".join(
        f"{s.variant} ({s.seeds} seed{'s' if s.seeds > 1 else ''}): {s.measured} "
        f"{'✓' if s.passed else '✗'}"
        for s in claim.elsewhere
    )
    if claim.outcome == NOT_AT_THIS_SCALE and not beside:
        beside = "no other scale on record"
    return f"✗ {claim.outcome} ({beside})"


def _criterion_text(claim: Claim) -> str:
    return f"{claim.criterion.describe()} ({claim.n_passed}/{len(claim.values)} pass)"


def _headline(result: LabResult) -> str:
    """One line: how many claims reproduced, and how many were refuted or left to scale."""
    by_outcome = result.outcomes()
    total = sum(map(len, by_outcome.values()))
    reproduced = len(by_outcome[REPRODUCED])
    if reproduced == total:
        return f"All {total} claims reproduced."
    rest = ", ".join(f"{len(c)} {o}" for o, c in by_outcome.items() if o != REPRODUCED and c)
    return f"{reproduced} of {total} claims reproduced; {rest}."


def summary_lines(result: LabResult) -> list[tuple[str, str]]:
    """The closing summary as ``(outcome, line)`` pairs: one line per outcome, claims named.

    Example line: ``2 not reproduced at this scale (this variant is too small to show it):
    residual/plain-degrades, ...``.
    """
    lines = []
    names = {id(c): e.name for e in result.experiments for c in e.claims}
    for outcome, claims in result.outcomes().items():
        if not claims:
            continue
        line = f"{len(claims):>3} {outcome} ({MEANING[outcome]})"
        if outcome != REPRODUCED:
            line += ": " + ", ".join(f"{names[id(c)]}/{c.id}" for c in claims)
        lines.append((outcome, line))
    if result.quick and result.outcomes()[NOT_AT_THIS_SCALE]:
        lines.append(("", "    The full lab (gradguard lab, a few minutes) runs them at scale."))
    return lines


def _md_row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _md_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return [_md_row(columns), "|" + "---|" * len(columns), *(_md_row(r) for r in rows)]


def _md_claim(claim: Claim) -> tuple[str, ...]:
    return (
        f"**{claim.source}**: {claim.statement} (on {claim.measured_on})",
        claim.paper,
        claim.measured_text(),
        _criterion_text(claim),
        _verdict(claim),
    )


def _md_experiment(experiment: ExperimentResult) -> list[str]:
    lines = [
        f"## {experiment.name}: {experiment.title}",
        "",
        f"Seeds: {', '.join(map(str, experiment.seeds))}. Duration: {experiment.duration_s:.1f} s.",
        "",
        f"Scale: {experiment.setting}",
        "",
        "References:",
        "",
        *(f"- {ref}" for ref in experiment.references),
        "",
        *_md_table(CLAIM_COLUMNS, [_md_claim(c) for c in experiment.claims]),
    ]
    for table in experiment.tables:
        lines += ["", f"### {table.title}", "", *_md_table(table.columns, list(table.rows))]
        if table.note:
            lines += ["", table.note]
    return [*lines, ""]


def to_markdown(result: LabResult) -> str:
    """Return ``results.md``: per experiment, the claims table and the result tables."""
    variant = "quick" if result.quick else "full"
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items() if k != "platform")
    lines = [
        "# gradguard lab results",
        "",
        f"{result.started_at}, {variant} run, base seed {result.seed}, "
        f"{result.duration_s:.1f} s. {versions}.",
        "",
        f"**{_headline(result)}**",
        "",
    ]
    lines += [f"- {line.strip()}" for _, line in summary_lines(result)] + [""]
    for experiment in result.experiments:
        lines += _md_experiment(experiment)
    return "\n".join(lines)


def _rich_table(table: Table) -> RichTable:
    out = RichTable(
        title=escape(table.title),
        title_justify="left",
        caption=escape(table.note) or None,
        caption_justify="left",
    )
    for i, column in enumerate(table.columns):
        out.add_column(escape(column), justify="left" if i < 2 else "right")
    for row in table.rows:
        out.add_row(*map(escape, row))
    return out


def _rich_claims(experiment: ExperimentResult) -> RichTable:
    title = escape(f"{experiment.name}: {experiment.title}")
    out = RichTable(title=title, title_justify="left")
    for column in CLAIM_COLUMNS:
        out.add_column(column, justify="center" if column == "reproduced" else "left")
    for claim in experiment.claims:
        style = STYLES[claim.outcome]
        out.add_row(
            escape(claim.statement),
            escape(f"{claim.source}: {claim.paper}"),
            escape(claim.measured_text()),
            escape(_criterion_text(claim)),
            f"[{style}]{_verdict(claim)}[/{style}]",
        )
    return out


def print_summary(result: LabResult, console: Console | None = None) -> None:
    """Print the claims and the result tables of every experiment as rich tables.

    The console shows each claim's statement; ``results.md`` also names the configurations
    behind each measurement.

    Args:
        result: what :func:`gradguard.lab.run` returned.
        console: where to print; a new stdout console by default.
    """
    console = console or Console()
    for experiment in result.experiments:
        console.print(_rich_claims(experiment))
        for table in experiment.tables:
            console.print(_rich_table(table))
        console.print()
    variant = "quick" if result.quick else "full"
    style = "bold green" if result.all_passed else "bold yellow"
    console.print(f"[bold]Lab summary[/bold] ({variant} variant, {result.duration_s:.1f} s)")
    for outcome, line in summary_lines(result):
        colour = STYLES.get(outcome, "dim")
        console.print(f"[{colour}]{escape(line)}[/{colour}]")
    console.print(f"[{style}]{escape(_headline(result))}[/{style}]")
