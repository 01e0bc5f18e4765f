"""The ``gradguard`` command line: ``lab``, ``diagnose``, ``report`` and ``bench``."""

# typer reads the annotations at run time: no ``from __future__ import annotations`` here.

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

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
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run this experiment (repeat for several); as NAMES."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small, single-seed variants (seconds).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            help="Seeds per full variant: SEED to SEED+SEEDS-1 (default: each experiment's own).",
        ),
    ] = None,
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
        chosen = [*(names or ()), *(only or ())]
        result = lab_module.run(names=chosen or None, quick=quick, seed=seed, out=out, seeds=seeds)
    except GradGuardError as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from error
    lab_module.print_summary(result, console)
    console.print(f"Results: {result.run_dir}")
    if strict and not result.all_passed:
        raise typer.Exit(1)


@app.command()
def bench(
    which: Annotated[str, typer.Argument(help="overhead (the default) or detection.")] = "overhead",
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds (at least 30).")] = 30,
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny models and few rounds; the quick corpus.")
    ] = False,
    only: Annotated[
        list[str] | None, typer.Option(help="detection: run this scenario (repeatable).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="detection: seeds 0..N-1 per scenario.")] = 3,
    out: Annotated[
        Path | None, typer.Option(help="Also write the markdown table to this file.")
    ] = None,
) -> None:
    """Time the gradient post-processing against torch and peers, or score the detectors.

    ``detection`` trains the labelled corpus of healthy and pathological runs and prints
    each run's events against its label; it runs from a checkout (benchmarks/ beside src/).
    """
    if which == "detection":
        _bench_detection(quick=quick, only=only or [], seeds=seeds, out=out)
        return
    if which != "overhead":
        console.print(f"[red]error:[/red] unknown benchmark {which!r}: overhead or detection.")
        raise typer.Exit(2)
    from gradguard import bench as bench_module

    result = bench_module.run_overhead(rounds=rounds, quick=quick)
    bench_module.print_result(result)
    if out is not None:
        out.write_text(result.to_markdown())
        console.print(f"Wrote {out}")


def _bench_detection(*, quick: bool, only: list[str], seeds: int, out: Path | None) -> None:
    """Run ``benchmarks/detection.py`` of the checkout this package was installed from."""
    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (benchmarks / "detection.py").is_file():
        console.print(
            "[red]error:[/red] the detection benchmark runs from a checkout of gradguard "
            f"(installed editable): {benchmarks / 'detection.py'} does not exist."
        )
        raise typer.Exit(2)
    sys.path.insert(0, str(benchmarks))
    detection = importlib.import_module("detection")
    argv = ["--seeds", str(seeds)] + (["--quick"] if quick else [])
    argv += [arg for name in only for arg in ("--only", name)]
    argv += ["--out", str(out)] if out is not None else []
    try:
        detection.main(argv)
    except ValueError as error:  # an unknown scenario name
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error


class _UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def _import_target(spec: str) -> ModuleType:
    """Import ``package.module`` or execute ``path/to/file.py`` as a module."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise _UsageError(f"no such file: {spec}")
        name = f"_gradguard_target_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise _UsageError(f"cannot import {spec} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        loader_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as error:
        raise _UsageError(f"cannot import module {spec!r}: {error}") from error


def _load_model(target: str, seed: int) -> Any:
    """Resolve ``module:factory`` / ``file.py:factory`` and call the factory once."""
    import torch

    spec, colon, name = target.rpartition(":")
    if not colon or not spec or not name:
        raise _UsageError(
            f"TARGET must be package.module:factory or path/to/file.py:factory, got {target!r}"
        )
    try:
        module = _import_target(spec)
    except _UsageError:
        raise
    except Exception as error:
        raise _UsageError(f"importing {spec} failed: {type(error).__name__}: {error}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise _UsageError(
            f"{spec} has no factory {name!r}; callables there: {', '.join(public) or 'none'}"
        )
    torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as error:
        raise _UsageError(f"{target}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, torch.nn.Module):
        raise _UsageError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise _UsageError(
            f"--input-shape must be positive integers separated by commas, e.g. 64,784; "
            f"got {text!r}"
        )
    return shape


def _run_diagnosis(
    target: str, shape_text: str, classes: int | None, seed: int
) -> "gradguard.Diagnosis":
    import torch

    shape = _parse_shape(shape_text)
    if classes is not None and classes < 2:
        raise _UsageError(f"--classes must be at least 2, got {classes}")
    model = _load_model(target, seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=generator)
    targets = None
    if classes is not None:
        targets = torch.randint(0, classes, (shape[0],), generator=generator)
    return gradguard.diagnose(model, inputs, targets, seed=seed)


@app.command("diagnose")
def diagnose_command(
    target: Annotated[
        str,
        typer.Argument(
            help="package.module:factory or path/to/file.py:factory; the factory takes no "
            "arguments and returns the model."
        ),
    ],
    input_shape: Annotated[
        str,
        typer.Option("--input-shape", help="Shape of the random N(0, 1) input batch, e.g. 64,784."),
    ],
    classes: Annotated[
        int | None,
        typer.Option(
            help="Random integer targets in [0, CLASSES) and cross-entropy; without it the "
            "loss is a fixed random readout of the output."
        ),
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the diagnosis as JSON instead of tables.")
    ] = False,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML page here.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the factory, the inputs and targets.")] = 0,
) -> None:
    """Diagnose vanishing/exploding gradients of a model before training.

    Exit status: 0 healthy, 1 vanishing or exploding, 2 usage error.
    """
    errors = Console(stderr=True)
    try:
        diag = _run_diagnosis(target, input_shape, classes, seed)
    except (_UsageError, GradGuardError) as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from error
    if json_:
        typer.echo(diag.to_json())
    else:
        console.print(diag)
    if html_out is not None:
        diag.save_html(html_out)
        errors.print(f"Wrote {html_out}", highlight=False)
    raise typer.Exit(0 if diag.verdict == "healthy" else 1)


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A guarded run directory (run_dir=) or a lab run directory.")
    ],
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Exit with status 1 if the run logged a warning or an error event."
        ),
    ] = False,
) -> None:
    """Write RUN_DIR/report.html: timelines, the per-layer heatmap, events and verdict.

    Exit status: 0, or 1 with --strict when the run needs attention (an event of warning or
    error severity), 2 for a bad argument.
    """
    from gradguard.report import run_verdict, write_lab_report, write_report

    try:
        lab_run = (run_dir / "results.json").is_file()
        path = write_lab_report(run_dir) if lab_run else write_report(run_dir)
    except GradGuardError as error:
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from error
    console.print(f"Wrote {path}")
    if lab_run:
        return
    level, sentence = run_verdict(run_dir)
    colour = {"ok": "green", "warn": "yellow", "bad": "red"}[level]
    console.print(f"[{colour}]{sentence}[/{colour}]", soft_wrap=True)
    if strict and level != "ok":
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``gradguard`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
