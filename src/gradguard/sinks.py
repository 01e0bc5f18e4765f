"""Where drained statistics and events go: the run directory (JSONL) and TensorBoard.

A sink reads records only (``Window``, ``Event``) and never the guard. The guard calls
``open`` once with the run's metadata when it is built, then ``write`` at every drain,
then ``close``. A sink that defines ``start(step)`` is also told, before the first step,
the step the run starts from (0, or the step count of a resumed run).
The run-directory format is documented in ``docs/run-format.md``; the TensorBoard tags
in ``docs/report.md``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from gradguard._files import write_text_atomic
from gradguard.causes import CAUSES
from gradguard.errors import ConfigError
from gradguard.protocols import Sink as Sink
from gradguard.records import Event, Window, _json_float

META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
LAYERS_FILE = "layers.jsonl"
EVENTS_FILE = "events.jsonl"
RUN_FORMAT_VERSION = 1
TENSORBOARD_DIR = "tensorboard"


LOCK_FILE = ".lock"
ROW_FILES = (METRICS_FILE, LAYERS_FILE, EVENTS_FILE)


class RunDirLock:
    """One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

    The operating system drops the lock when its holder closes it or dies, so a crash
    (even ``kill -9``) never leaves a run directory locked. The file holds the holder's
    process id and host, for the message another writer gets. Advisory: it keeps
    gradguard's own writers apart. Where ``fcntl`` does not exist (Windows), no lock is
    taken.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`ConfigError` naming the process that holds it."""
        if self._handle is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"run_dir {self.path.parent} is being written by another open Guard "
                f"({holder}): one run directory takes one writer at a time. Close that "
                "guard (guard.close(), or leave its with-block) or give this one another "
                "run_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        # A guard dropped without close() gives the directory back when it is collected.
        self._finalizer = weakref.finalize(self, handle.close)

    def release(self) -> None:
        """Give the lock back (closing the file releases it); safe to call twice."""
        if self._handle is not None:
            self._finalizer()
            self._handle = None


class JsonlSink:
    """The run directory: ``meta.json`` and three append-only JSON-lines files.

    Each drain appends its lines with one ``write`` per file and flushes, so a crash can
    tear at most the last line. A run directory has one writer at a time
    (:class:`RunDirLock`). A directory that already holds rows is never appended to by a
    fresh run: the first step is refused, naming the options, unless the guard resumes
    that run (its state loaded with ``Guard.load_state_dict``, so its step count goes
    on) or ``overwrite=True`` replaces the old logs. On resume a torn last line is cut
    off and ``meta.json`` records the new session (``sessions``).

    Args:
        run_dir: the directory.
        overwrite: remove the logs (and TensorBoard files) a previous run left there.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        if not isinstance(overwrite, bool):
            raise ConfigError(f"overwrite must be True or False, got {overwrite!r}.")
        if not isinstance(run_dir, str | os.PathLike):
            raise ConfigError(f"run_dir must be a path (str or os.PathLike), got {run_dir!r}.")
        self.run_dir = Path(run_dir)
        self.overwrite = overwrite
        self._files: dict[str, IO[str]] = {}
        self._lock = RunDirLock(self.run_dir)
        self._meta: dict[str, Any] | None = None
        self._started = False
        self._holds_rows = False  # rows of an earlier session are in the directory

    def open(self, meta: Mapping[str, Any]) -> None:
        """Take the directory (lock), and refuse a run of another model.

        Nothing is written yet: :meth:`start` does, at the first step, once it is known
        whether this run resumes the one already there.
        """
        if self._meta is not None:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except OSError as error:
            raise ConfigError(
                f"run_dir {self.run_dir} cannot be created or written ({error.strerror or error}): "
                "give a directory this process can write."
            ) from None
        try:
            self._take_directory(meta)
        except BaseException:
            self._lock.release()
            raise

    def _take_directory(self, meta: Mapping[str, Any]) -> None:
        for leftover in self.run_dir.glob("*.tmp"):  # a meta.json write a crash cut short
            leftover.unlink(missing_ok=True)
        if self.overwrite:
            for name in (META_FILE, *ROW_FILES):
                (self.run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
        existing = _read_meta(self.run_dir / META_FILE)
        if existing is not None and existing.get("layer_names") != list(meta["layer_names"]):
            raise ConfigError(
                f"run_dir {self.run_dir} holds a run of another model (its layers differ): "
                "give a new run_dir, or pass overwrite_run_dir=True to replace it."
            )
        paths = [self.run_dir / name for name in ROW_FILES]
        self._holds_rows = any(path.exists() and path.stat().st_size for path in paths)
        self._meta = {"format_version": RUN_FORMAT_VERSION, **meta}

    def start(self, step: int) -> None:
        """Begin writing before step ``step + 1``: a fresh run, or the resumption of one.

        A run that starts at step 0 (or below: a trainer numbering its first step 0) is
        fresh; a later start resumes the directory's run.

        Raises:
            ConfigError: the directory holds another run's rows and this run is fresh
                (neither resumed nor told to overwrite).
        """
        if self._started:
            return
        if self._meta is None:
            raise ConfigError("JsonlSink.start called before open(); the guard opens sinks.")
        if self._holds_rows and step <= 0:
            rows = _count_rows(self.run_dir / METRICS_FILE)
            raise ConfigError(
                f"run_dir {self.run_dir} already holds the logs of another run "
                f"({rows} steps): a fresh run is not appended to them. To "
                "continue that run, load its state first (guard.load_state_dict(saved) "
                "with the state guard.state_dict() returned); to replace its logs, pass "
                "overwrite_run_dir=True (JsonlSink(..., overwrite=True)); or give a new "
                "run_dir."
            )
        session = {
            "start_step": int(step),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self._meta.get("config", {}),
            "versions": self._meta.get("versions", {}),
        }
        body = dict(self._meta)
        if self._holds_rows:
            for name in ROW_FILES:
                _cut_torn_line(self.run_dir / name)
            previous = _read_meta(self.run_dir / META_FILE) or {}
            body["sessions"] = [*previous.get("sessions", []), session]
        else:
            body["sessions"] = [session]
        try:
            write_text_atomic(self.run_dir / META_FILE, json.dumps(body, indent=1) + "\n")
            for name in ROW_FILES:
                self._files[name] = (self.run_dir / name).open("a", encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"run_dir {self.run_dir} cannot be written ({error.strerror or error})."
            ) from None
        self._started = True

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append one drain: a metrics row and a layers row per step, one row per event."""
        if self._meta is None:
            raise ConfigError("JsonlSink.write called before open(); the guard opens sinks.")
        if not self._started:
            first = int(window.steps[0]) - 1 if len(window) else 0
            self.start(first)
        metrics = "".join(json.dumps(row) + "\n" for row in window.rows())
        layers = "".join(json.dumps(row) + "\n" for row in _layer_rows(window))
        self._append(METRICS_FILE, metrics)
        self._append(LAYERS_FILE, layers)
        if events:
            self._append(EVENTS_FILE, "".join(json.dumps(e.to_dict()) + "\n" for e in events))

    def _append(self, name: str, text: str) -> None:
        handle = self._files[name]
        handle.write(text)
        handle.flush()

    def close(self) -> None:
        """Close the files and give the directory back."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._lock.release()


def _read_meta(path: Path) -> dict[str, Any] | None:
    """``meta.json`` as a dict, None if absent; a broken one is refused with the fix."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path} cannot be read ({error}): this run directory's description is "
            "damaged; give a new run_dir, or pass overwrite_run_dir=True to replace it."
        ) from None
    if not isinstance(meta, dict):
        raise ConfigError(
            f"{path} is not a run description (a JSON object): give a new run_dir, or "
            "pass overwrite_run_dir=True to replace it."
        )
    return meta


def _count_rows(path: Path) -> int:
    """Complete lines in a JSON-lines file (0 if absent)."""
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def _cut_torn_line(path: Path) -> None:
    """Truncate a JSON-lines file after its last newline: a crash can tear the last line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        position = size
        while position > 0:
            step = min(1 << 16, position)
            handle.seek(position - step)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                position = position - step + newline + 1
                break
            position -= step
        if position != size:
            handle.truncate(position)


def _layer_rows(window: Window) -> list[dict[str, Any]]:
    """The ``layers.jsonl`` rows of a window; its last step carries the update ratios."""
    rows: list[dict[str, Any]] = [
        {"step": int(step), "norms": [_json_float(v) for v in window.per_layer[i]]}
        for i, step in enumerate(window.steps)
    ]
    if rows and window.update_ratio is not None:
        rows[-1]["update_ratio"] = [
            None if np.isnan(v) else _json_float(v) for v in window.update_ratio
        ]
    return rows


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file, ignoring a torn last line (what a crash can leave)."""
    rows: list[dict[str, Any]] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


# --- TensorBoard ------------------------------------------------------------------------

#: Scalar tags written once per step (``gradguard/<field>``), from the ``metrics.jsonl`` fields.
STEP_SCALARS = ("loss", "grad_norm", "clipped_norm", "scale", "skipped", "lr")
TOP_FAMILY = "(top)"


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (found without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def layer_family(name: str) -> str:
    """The chart a layer's gradient norm goes to on the TensorBoard dashboard.

    Rule: a layer repeated along the depth (a numeric index in its name) is grouped with
    the same layer of every other index, so one chart shows one kind of layer through the
    depth, one line per index: ``encoder.layers.3.linear1`` goes to
    ``encoder.layers.*.linear1``. A layer that is not repeated goes with its siblings under
    its parent module (``transformer.ln_f`` to ``transformer``), and top-level ones to
    ``(top)``.

    Examples:
        >>> layer_family("encoder.layers.3.self_attn.out_proj")
        'encoder.layers.*.self_attn.out_proj'
        >>> layer_family("2"), layer_family("transformer.ln_f"), layer_family("fc1")
        ('*', 'transformer', '(top)')
    """
    parts = ["*" if part.isdigit() else part for part in name.split(".")]
    if "*" in parts:
        return ".".join(parts)
    return ".".join(parts[:-1]) or TOP_FAMILY


def layer_tag(name: str) -> str:
    """The scalar tag of a layer's gradient norm: ``layers/<family>/<layer>``."""
    return f"layers/{layer_family(name)}/{name}"


class TensorBoardSink:
    """TensorBoard event files: step scalars, per-layer norms by family, events as text.

    At each drain, for every step of the window: ``gradguard/<field>`` scalars for
    :data:`STEP_SCALARS` (``loss`` only where one was given; ``skipped`` as 0 or 1) and
    ``layers/<family>/<layer>`` for each layer's gradient norm (:func:`layer_family`).
    A Custom Scalars layout draws each family as one chart, so a model with hundreds of
    layers still shows a few charts. Events go to the ``gradguard/events`` text at their
    step; with ``histograms_every=N`` the distribution of log10 per-layer norms of the
    window's last step goes to ``layers/log10_grad_norm`` every N drains. Values are
    stored as fp32 (TensorBoard's scalars), which every statistic already is except the
    learning rate.

    Nothing is written between drains. A drain builds one summary per step and queues
    it; TensorBoard's writer thread encodes it, writes it and flushes the file every
    ``flush_secs``, so a drain never waits for the disk. Queuing 10 steps of 500 layers
    takes about 4 ms (on a laptop CPU, writer thread idle), against about 0.14 s with
    one ``add_scalar`` call per value (each encoded and checksummed on its own while the
    caller waits on the writer's queue). :meth:`flush` and :meth:`close` write everything.

    Args:
        log_dir: the directory for the event files (``RUN_DIR/tensorboard`` by default
            with ``Guard(run_dir=...)``).
        histograms_every: write a histogram every this many drains; 0 for none.
        flush_secs: longest time a drained step waits before reaching the file.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed, or a bad argument.
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], histograms_every: int = 0, flush_secs: float = 5.0
    ) -> None:
        if (
            not isinstance(histograms_every, int)
            or isinstance(histograms_every, bool)
            or histograms_every < 0
        ):
            raise ConfigError(
                f"histograms_every must be an int >= 0 (0: no histograms), got "
                f"{histograms_every!r}."
            )
        if (
            not isinstance(flush_secs, int | float)
            or isinstance(flush_secs, bool)
            or not 0 < flush_secs < math.inf
        ):
            raise ConfigError(
                f"flush_secs must be a positive number of seconds, got {flush_secs!r}."
            )
        self.log_dir = Path(log_dir)
        self.histograms_every = histograms_every
        self.flush_secs = flush_secs
        self._summary_writer_cls, self._summary_cls = _import_tensorboard()
        self._writer: Any = None
        self._tags: tuple[str, ...] = ()
        self._drains = 0

    def open(self, meta: Mapping[str, Any]) -> None:
        """Create the writer, the per-family chart layout and the configuration text."""
        if self._writer is not None:
            return
        names = [str(n) for n in meta["layer_names"]]
        self._tags = tuple(layer_tag(n) for n in names)
        self._writer = self._summary_writer_cls(
            log_dir=str(self.log_dir), max_queue=1024, flush_secs=self.flush_secs
        )
        families = dict.fromkeys(layer_family(n) for n in names)
        layout = {
            "gradguard": {
                "loss": ["Multiline", ["^gradguard/loss$"]],
                "gradient norm (before and after clipping)": [
                    "Multiline",
                    ["^gradguard/grad_norm$", "^gradguard/clipped_norm$"],
                ],
            },
            "gradient norm by layer family": {
                family: ["Multiline", [f"^layers/{re.escape(family)}/"]] for family in families
            },
        }
        self._writer.add_custom_scalars(layout)
        config = json.dumps(dict(meta.get("config", {})), indent=1)
        self._writer.add_text("gradguard/config", _markdown_code(config), 0)

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Queue the window's scalars (one summary per step), its events, maybe a histogram."""
        if self._writer is None:
            raise ConfigError("TensorBoardSink.write called before open(); the guard opens sinks.")
        summary, value = self._summary_cls, self._summary_cls.Value
        file_writer = self._writer.file_writer
        for row, norms in zip(window.rows(), window.per_layer.tolist(), strict=True):
            values = [
                value(tag=f"gradguard/{field}", simple_value=float(row[field]))
                for field in STEP_SCALARS
                if row[field] is not None
            ]
            values += [
                value(tag=tag, simple_value=norm)
                for tag, norm in zip(self._tags, norms, strict=True)
            ]
            file_writer.add_summary(summary(value=values), row["step"])
        if window.update_ratio is not None and len(window):
            ratios = [
                value(tag=f"update_ratio/{tag.removeprefix('layers/')}", simple_value=float(r))
                for tag, r in zip(self._tags, window.update_ratio, strict=True)
                if np.isfinite(r)
            ]
            file_writer.add_summary(summary(value=ratios), int(window.steps[-1]))
        by_step: dict[int, list[str]] = {}
        for event in events:
            by_step.setdefault(event.step, []).append(_event_markdown(event))
        for step, lines in by_step.items():
            self._writer.add_text("gradguard/events", "\n\n".join(lines), step)
        self._drains += 1
        if self.histograms_every and self._drains % self.histograms_every == 0 and len(window):
            self._histogram(window)

    def _histogram(self, window: Window) -> None:
        norms = window.per_layer[-1]
        positive = norms[np.isfinite(norms) & (norms > 0)]
        if positive.size:  # a histogram of no value, or of NaN, is refused by the writer
            step = int(window.steps[-1])
            self._writer.add_histogram("layers/log10_grad_norm", np.log10(positive), step)

    def flush(self) -> None:
        """Write everything queued to the event file now (waits for the writer thread)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _import_tensorboard() -> tuple[Any, Any]:
    """``SummaryWriter`` and the ``Summary`` proto, imported on first use (an optional extra)."""
    if not tensorboard_available():
        raise ConfigError(
            "TensorBoard logging needs the tensorboard package: pip install "
            "'gradguard[tensorboard]' (or pass tensorboard=False to the Guard)."
        )
    from torch.utils.tensorboard import SummaryWriter, summary

    # The Summary proto class, from torch's own builder: tensorboard is reached only
    # through torch.utils.tensorboard, and one Summary per step holds all its values.
    return SummaryWriter, type(summary.scalar("", 0.0))  # type: ignore[no-untyped-call]


def _markdown_code(text: str) -> str:
    """Indent by four spaces: a code block in TensorBoard's markdown text view."""
    return "\n".join("    " + line for line in text.splitlines())


def _event_markdown(event: Event) -> str:
    """One event as a markdown paragraph for the text dashboard."""
    layers = f" in `{', '.join(event.layers[:4])}`" if event.layers else ""
    more = f" (+{len(event.layers) - 4} more)" if len(event.layers) > 4 else ""
    metric = f" {event.metric}" if event.metric else ""
    streak = f", {event.count} times to step {event.end_step}" if event.count > 1 else ""
    text = (
        f"**{event.kind}**{layers}{more} ({event.severity}{streak}):{metric} value "
        f"{event.value:.4g}, threshold {event.threshold:.4g}. {event.message}"
    )
    if event.cause:
        text += f"\n\n*Cause: {CAUSES.get(event.cause, event.cause)}.* "
        text += str(event.evidence.get("summary", ""))
    if event.batch is not None:
        text += f" Batch: `{json.dumps(event.batch)[:200]}`."
    for i, advice in enumerate(event.advice, 1):
        text += f"\n\n{i}. {advice.text}"
    return text


def run_dir_sinks(
    run_dir: object, tensorboard: bool | None, overwrite: object
) -> list[JsonlSink | TensorBoardSink]:
    """The sinks of ``Guard(run_dir=...)``: the JSON-lines logs, and TensorBoard's files.

    TensorBoard is written under ``RUN_DIR/tensorboard`` when ``tensorboard`` is True, or
    None and the package is installed.

    Raises:
        ConfigError: ``run_dir`` is not a path, ``overwrite`` not a bool, or
            ``tensorboard=True`` without a run directory.
    """
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite_run_dir must be True or False, got {overwrite!r}.")
    if run_dir is None:
        if tensorboard:
            raise ConfigError(
                "tensorboard=True writes under run_dir, which is None: pass run_dir=..., or "
                "sinks=[gradguard.sinks.TensorBoardSink(log_dir)]."
            )
        return []
    if not isinstance(run_dir, str | os.PathLike):
        raise ConfigError(f"run_dir must be a path (str or os.PathLike), got {run_dir!r}.")
    sinks: list[JsonlSink | TensorBoardSink] = [JsonlSink(run_dir, overwrite=overwrite)]
    if tensorboard or (tensorboard is None and tensorboard_available()):
        sinks.append(TensorBoardSink(os.path.join(run_dir, TENSORBOARD_DIR)))
    return sinks
