"""The ``gradguard`` command line: ``lab``, ``diagnose``, ``report`` and ``bench``.

Every command ends with one of the exit statuses of :class:`ExitCode`. An error the user
can cause (a bad argument, a missing, unreadable or malformed file, a target that cannot
be imported, a file that cannot be written, Ctrl-C) is printed as one line on stderr,
``gradguard COMMAND: error: ...`` naming what is wrong and the fix, never a traceback.
"""

# typer reads the annotations at run time: no ``from __future__ import annotations`` here.

import errno
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

import gradguard
from gradguard.errors import GradGuardError


class ExitCode(IntEnum):
    """The exit statuses of every ``gradguard`` command; ``EXIT_CODE_MEANINGS`` says each.

    1 is kept for a finding about the model or the run, so a script can tell "the
    network is unhealthy" from "the command could not run" (2) and from "a lab claim did
    not reproduce" (3).
    """

    OK = 0
    PATHOLOGY = 1
    USAGE = 2
    CLAIMS_FAILED = 3
    INTERRUPTED = 130


#: What each exit status means, as ``gradguard --help`` and docs/diagnose.md list them.
EXIT_CODE_MEANINGS = {
    ExitCode.OK: "ok",
    ExitCode.PATHOLOGY: "a pathology found (diagnose: vanishing or exploding gradients; "
    "report --strict: the run logged a warning or error event)",
    ExitCode.USAGE: "usage or input error (a bad argument; a file or directory that is "
    "missing, unreadable, malformed or cannot be written; a diagnose target that cannot "
    "be imported or built)",
    ExitCode.CLAIMS_FAILED: "a lab claim was not reproduced at this scale (lab --strict)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}
EXIT_CODES_HELP = "Exit status: " + "; ".join(
    f"{int(code)} {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items()
)

MAX_SEED = 2**31 - 1  # every seeded generator (torch, numpy, offsets added) takes it

app = typer.Typer(
    name="gradguard",
    help="Keep deep-network training stable: measure, clip, diagnose, and see the classics.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

#: What to do about an OSError, by errno; the line printed names the file and the reason.
_OS_ERROR_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOSPC: "free some disk space and run again",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "it exists already: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}
if hasattr(errno, "EDQUOT"):  # a full disk quota; not defined on every platform
    _OS_ERROR_FIXES[errno.EDQUOT] = "free some disk space (a quota is full) and run again"


class _UsageError(Exception):
    """A bad command line or input: printed as one line, exit status 2."""


def _fail(command: str, message: str, code: ExitCode) -> NoReturn:
    """Print ``gradguard COMMAND: error: MESSAGE`` on stderr, one line, and exit with ``code``."""
    label = typer.style("error:", fg="red", bold=True)
    typer.echo(f"gradguard {command}: {label} {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def _os_error_text(error: OSError, output: Path | None = None) -> str:
    """An OSError as one line: the file, the reason and what to do about it.

    An error raised while writing an open file (a full disk) names no file: ``output``,
    the file the command writes, is named instead.
    """
    reason = error.strerror or str(error) or type(error).__name__
    fix = _OS_ERROR_FIXES.get(error.errno or 0, "check the path and its permissions")
    path = error.filename if error.filename is not None else output
    where = f"{path}: " if path is not None else ""
    return f"{where}{reason}; {fix}."


@contextmanager
def _user_errors(command: str, output: Path | None = None) -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and a documented status.

    gradguard's own errors (``GradGuardError``, ``ConfigError``), bad arguments, files
    that cannot be read or written (``OSError``: missing, permission denied, disk full;
    ``output`` is the file named when the error names none) and malformed JSON exit
    with 2; Ctrl-C exits with 130. Anything else is a bug in gradguard and keeps its
    traceback.
    """
    try:
        yield
    except KeyboardInterrupt:
        _fail(command, "interrupted.", ExitCode.INTERRUPTED)
    except (_UsageError, GradGuardError) as error:
        _fail(command, str(error), ExitCode.USAGE)
    except OSError as error:
        _fail(command, _os_error_text(error, output), ExitCode.USAGE)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        _fail(command, f"malformed input: {error}.", ExitCode.USAGE)


def _check_output_file(option: str, path: Path | None) -> None:
    """Refuse an output path whose directory is missing, before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise _UsageError(f"{option} {path} is a directory: give a file path.")
    parent = path.parent
    if not parent.is_dir():
        raise _UsageError(
            f"{option} {path}: the directory {parent} does not exist; create it first."
        )


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
    seed: Annotated[int, typer.Option(help="Base seed.", min=0, max=MAX_SEED)] = 0,
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
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Experiments run at once, one process each (default 0: one per CPU core, "
            "up to 4). The numbers do not depend on it.",
            min=0,
        ),
    ] = 0,
    list_: Annotated[bool, typer.Option("--list", help="List the experiments and exit.")] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit with status 3 if a claim is not reproduced at this scale "
            "(refuted claims, contradicted at every scale, do not count).",
        ),
    ] = False,
) -> None:
    """Reproduce classic results about vanishing and exploding gradients on this CPU.

    Each claim ends reproduced, refuted (the measurement contradicts it at every scale
    tried: a finding) or not reproduced at this scale (the other scale's result is shown
    beside it). Exit status: 0, or 3 with --strict when a claim is not reproduced at this
    scale; 2 for a bad argument or an output directory that cannot be written; 130
    interrupted.
    """
    with _user_errors("lab", out):
        from gradguard import lab as lab_module

        if list_:
            for name, description in lab_module.list_experiments():
                console.print(f"[bold]{name}[/bold]  {description}")
            return
        chosen = [*(names or ()), *(only or ())]
        result = lab_module.run(
            names=chosen or None, quick=quick, seed=seed, out=out, seeds=seeds, jobs=jobs
        )
        lab_module.print_summary(result, console)
        typer.echo(f"Results: {result.run_dir}")
    if strict and not result.as_expected:
        raise typer.Exit(ExitCode.CLAIMS_FAILED)


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

    ``overhead`` times gradguard against torch's clip and the peer packages;
    ``detection`` trains the labelled corpus of healthy and pathological runs and prints
    each run's events against its label. Both run from a checkout of gradguard installed
    editable (benchmarks/ beside src/): the benchmarks are not in the wheel.

    Exit status: 0; 2 for a bad argument, an output file that cannot be written or no
    checkout; 130 interrupted.
    """
    with _user_errors("bench", out):
        if which not in ("overhead", "detection"):
            raise _UsageError(f"unknown benchmark {which!r}: overhead or detection.")
        _check_output_file("--out", out)
        if which == "detection":
            _bench_detection(quick=quick, only=only or [], seeds=seeds, out=out)
            return
        overhead = _checkout_benchmark("overhead_bench", "the overhead benchmark")
        result = overhead.run_overhead(rounds=rounds, quick=quick)
        overhead.print_result(result)
        if out is not None:
            out.write_text(result.to_markdown())
            typer.echo(f"Wrote {out}")


#: The benchmarks of the checkout this package was installed from (editable): not in the wheel.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _checkout_benchmark(module: str, what: str) -> ModuleType:
    """Import ``benchmarks/MODULE.py`` of the checkout; a usage error where there is none."""
    path = BENCHMARKS / f"{module}.py"
    if not path.is_file():
        raise _UsageError(
            f"{what} runs from a checkout of gradguard installed editable (pip install -e . "
            f"in the checkout), as the benchmarks are not in the wheel: {path} does not exist."
        )
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(module)


def _bench_detection(*, quick: bool, only: list[str], seeds: int, out: Path | None) -> None:
    """Run ``benchmarks/detection.py`` of the checkout this package was installed from."""
    detection = _checkout_benchmark("detection", "the detection benchmark")
    argv = ["--seeds", str(seeds)] + (["--quick"] if quick else [])
    argv += [arg for name in only for arg in ("--only", name)]
    argv += ["--out", str(out)] if out is not None else []
    try:
        detection.main(argv)
    except ValueError as error:  # an unknown scenario name
        raise _UsageError(str(error)) from error


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


def _user_code_error(what: str, error: BaseException) -> _UsageError:
    """A usage error for an exception raised by the user's module or factory."""
    if isinstance(error, SystemExit):  # sys.exit() or argparse in the target's code
        return _UsageError(
            f"{what} called sys.exit({error.code!r}); a factory module must not exit "
            "when it is imported or called"
        )
    return _UsageError(f"{what} failed: {type(error).__name__}: {error}")


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
    except (Exception, SystemExit) as error:
        raise _user_code_error(f"importing {spec}", error) from error
    factory = getattr(module, name, None)
    if not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise _UsageError(
            f"{spec} has no factory {name!r}; callables there: {', '.join(public) or 'none'}"
        )
    torch.manual_seed(seed)
    try:
        model = factory()
    except (Exception, SystemExit) as error:
        raise _user_code_error(f"{target}()", error) from error
    if not isinstance(model, torch.nn.Module):
        raise _UsageError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _parse_shape(text: str) -> tuple[int, ...]:
    """``64,784`` as ``(64, 784)``; anything but positive integers is a usage error."""
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
    """Build the target's model, a random batch of ``shape_text`` and diagnose it."""
    import torch

    shape = _parse_shape(shape_text)
    if classes is not None and classes < 2:
        raise _UsageError(f"--classes must be at least 2, got {classes}")
    model = _load_model(target, seed)
    generator = torch.Generator().manual_seed(seed)
    try:
        inputs = torch.randn(shape, generator=generator)
    except (RuntimeError, MemoryError) as error:  # too large to allocate
        raise _UsageError(
            f"--input-shape {shape_text}: cannot make a batch of that shape "
            f"({type(error).__name__}: {error}); give a smaller shape"
        ) from None
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
    seed: Annotated[
        int,
        typer.Option(help="Seed of the factory, the inputs and targets.", min=0, max=MAX_SEED),
    ] = 0,
) -> None:
    """Diagnose vanishing/exploding gradients of a model before training.

    Exit status: 0 healthy, 1 vanishing or exploding, 2 usage error (bad target, shape
    or --html path), 130 interrupted.
    """
    errors = Console(stderr=True)
    with _user_errors("diagnose", html_out):
        _check_output_file("--html", html_out)
        diag = _run_diagnosis(target, input_shape, classes, seed)
        if json_:
            typer.echo(diag.to_json())
        else:
            console.print(diag)
        if html_out is not None:
            diag.save_html(html_out)
            errors.print(f"Wrote {html_out}", highlight=False, markup=False)
    healthy = diag.verdict == "healthy"
    raise typer.Exit(ExitCode.OK if healthy else ExitCode.PATHOLOGY)


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

    Damaged files do not stop the report: what could not be read is listed under
    Reading notes. Exit status: 0, or 1 with --strict when the run needs attention (an
    event of warning or error severity); 2 when RUN_DIR is not a run directory or the
    report cannot be written; 130 interrupted.
    """
    with _user_errors("report", run_dir / "report.html"):
        from gradguard.report import run_verdict, write_lab_report, write_report

        lab_run = (run_dir / "results.json").is_file()
        path = write_lab_report(run_dir) if lab_run else write_report(run_dir)
        typer.echo(f"Wrote {path}")
        if lab_run:
            return
        level, sentence = run_verdict(run_dir)
        colour = {"ok": "green", "warn": "yellow", "bad": "red"}[level]
        console.print(sentence, style=colour, soft_wrap=True, markup=False, highlight=False)
    if strict and level != "ok":
        raise typer.Exit(ExitCode.PATHOLOGY)


def _reflowed(doc: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so the terminal wraps them, not the source.

    Double backticks (reStructuredText literals, for the API docs) are dropped.
    """
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).replace("``", "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


for _command in app.registered_commands:
    if _command.callback is not None:
        _command.callback.__doc__ = _reflowed(_command.callback.__doc__)


def main() -> None:
    """Entry point of the ``gradguard`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
