"""The ``gradguard`` command line: ``lab``, ``bench`` and friends."""

# typer reads the annotations at run time: no ``from __future__ import annotations`` here.

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import gradguard
from gradguard.errors import GradGuardError

app = typer.Typer(
    name="gradguard",
    help="Keep deep-network training stable: measure, clip, diagnose, and see the classics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        console.print(f"gradguard {gradguard.__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Keep deep-network training stable: measure, clip, diagnose, and see the classics."""


@app.command()
def lab(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Experiments to run (default: all). See --list."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small, single-seed variants (seconds).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: runs/lab-<timestamp>).")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the experiments and exit.")] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit with status 1 if a claim does not reproduce.")
    ] = False,
) -> None:
    """Reproduce classic results about vanishing and exploding gradients on this CPU."""
    from gradguard import lab as lab_module

    if list_:
        for name, description in lab_module.list_experiments():
            console.print(f"[bold]{name}[/bold]  {description}")
        return
    try:
        result = lab_module.run(names=names or None, quick=quick, seed=seed, out=out)
    except GradGuardError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    lab_module.print_summary(result, console)
    console.print(f"Results: {result.run_dir}")
    if strict and not result.all_passed:
        raise typer.Exit(1)


@app.command()
def bench(
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds (at least 30).")] = 30,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny models, few rounds.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the markdown table to this file.")
    ] = None,
) -> None:
    """Time gradguard's gradient post-processing against torch and peer packages."""
    from gradguard import bench as bench_module

    result = bench_module.run_overhead(rounds=rounds, quick=quick)
    bench_module.print_result(result)
    if out is not None:
        out.write_text(result.to_markdown())
        console.print(f"Wrote {out}")


def main() -> None:
    """Entry point of the ``gradguard`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
