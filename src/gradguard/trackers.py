"""Experiment trackers as sinks: MLflow (:class:`MlflowSink`) and W&B (:class:`WandbSink`).

Both log what the TensorBoard sink logs, under the same names: the step scalars
``gradguard/<field>``, each layer's gradient norm as ``layers/<family>/<layer>``
(:func:`gradguard.sinks.layer_tag`) and the update ratios as
``update_ratio/<family>/<layer>``, one value per step of each drain; the events as a
table, the guard's configuration and versions once at :meth:`open`. They write at drains
only (``write``), never at a step between two drains. The packages are optional and
imported when a sink is built: ``pip install 'gradguard[mlflow]'`` or
``'gradguard[wandb]'``. ``docs/trackers.md`` describes what goes where.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradguard.errors import ConfigError
from gradguard.records import SEVERITIES, Event, Window, severity_of
from gradguard.report._data import merge_streaks
from gradguard.sinks import STEP_SCALARS, layer_tag

#: The artifact (MLflow) holding the run's events, one object per event (streaks merged).
MLFLOW_EVENTS_ARTIFACT = "gradguard/events.json"
#: The artifact (MLflow) holding the run's description: layers, configuration, versions.
MLFLOW_META_ARTIFACT = "gradguard/meta.json"
#: The W&B history key of the guard's own step number, the x-axis of every gradguard chart.
WANDB_STEP_KEY = "gradguard/step"
#: The W&B key of the events table.
WANDB_EVENTS_KEY = "gradguard/events"
#: The columns of the W&B events table.
EVENT_COLUMNS = (
    "first_step",
    "last_step",
    "count",
    "kind",
    "severity",
    "cause",
    "metric",
    "value",
    "threshold",
    "layers",
    "batch",
    "message",
    "evidence",
    "advice",
)

# MLflow's limits (mlflow.utils.validation): per log_batch call, and per key or value.
_MLFLOW_METRICS_PER_BATCH = 1000
_MLFLOW_TAGS_PER_BATCH = 100
_MLFLOW_KEY_LENGTH = 250
_MLFLOW_PARAM_LENGTH = 6000
_MLFLOW_TAG_LENGTH = 8000
# MLflow's key characters, less the colon (refused on Windows): the same keys everywhere.
_MLFLOW_BAD_CHARACTERS = re.compile(r"[^\w.\- /]")
_WANDB_MODES = ("online", "offline", "disabled", "shared")
_WANDB_RESUME = (True, False, "allow", "never", "must", "auto")


# --- what both trackers log ---------------------------------------------------------------


def _scalar_tags() -> list[str]:
    return [f"gradguard/{field}" for field in STEP_SCALARS]


def _ratio_tag(tag: str) -> str:
    """``layers/<family>/<layer>`` -> ``update_ratio/<family>/<layer>`` (as TensorBoard)."""
    return f"update_ratio/{tag.removeprefix('layers/')}"


def _step_values(window: Window, layer_tags: Sequence[str]) -> list[tuple[int, dict[str, float]]]:
    """Each step of a window with its values by tag, as the TensorBoard sink writes them.

    ``gradguard/<field>`` for :data:`STEP_SCALARS` (``loss`` only where one was given,
    ``skipped`` as 0 or 1), each layer's gradient norm, and on the window's last step the
    update ratios measured at this drain (finite ones only).
    """
    out: list[tuple[int, dict[str, float]]] = []
    for row, norms in zip(window.rows(), window.per_layer.tolist(), strict=True):
        values = {
            f"gradguard/{field}": float(row[field])
            for field in STEP_SCALARS
            if row[field] is not None
        }
        values.update(zip(layer_tags, norms, strict=True))
        out.append((int(row["step"]), values))
    if out and window.update_ratio is not None:
        out[-1][1].update(
            (_ratio_tag(tag), float(ratio))
            for tag, ratio in zip(layer_tags, window.update_ratio, strict=True)
            if np.isfinite(ratio)
        )
    return out


class _EventLog:
    """A run's events so far: every row the guard handed over, and one per event.

    The guard hands a growing streak over again (each time its count passes a power of
    two, and when it ends); :meth:`merged` keeps the last row of each, as the report does.
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self._rows: list[dict[str, Any]] = [dict(row) for row in rows]

    def add(self, events: Sequence[Event]) -> None:
        self._rows.extend(event.to_dict() for event in events)

    def merged(self) -> list[dict[str, Any]]:
        return merge_streaks(self._rows)

    @staticmethod
    def counts(merged: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Events per kind, per severity (``info``, ``warning``, ``error``) and in all."""
        counts: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        for row in merged:
            counts[str(row["kind"])] = counts.get(str(row["kind"]), 0) + 1
            counts[severity_of(dict(row))] += 1
        counts["total"] = len(merged)
        return counts


def _config_for_tracker(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the trackers record of ``meta``: configuration, versions, layers."""
    return {
        "config": dict(meta.get("config", {})),
        "versions": dict(meta.get("versions", {})),
        "layer_names": [str(name) for name in meta["layer_names"]],
    }


def _flat(prefix: str, value: Any) -> Iterable[tuple[str, str]]:
    """``{"a": {"b": 1}}`` -> ``("prefix.a.b", "1")``; lists as JSON."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flat(f"{prefix}.{key}", item)
    elif isinstance(value, str):
        yield prefix, value
    else:
        yield prefix, json.dumps(value)


def _number_text(value: Any) -> str:
    try:
        return f"{float(value):.6g}"
    except (TypeError, ValueError):
        return ""


def _check_str(name: str, value: Any, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        expected = "a non-empty string" + (" or None" if optional else "")
        raise ConfigError(f"{name} must be {expected}, got {value!r}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")


# --- MLflow -----------------------------------------------------------------------------


def mlflow_key(tag: str) -> str:
    """The MLflow key of a gradguard tag: its characters that MLflow refuses become ``_``.

    MLflow takes letters, digits, ``_ - . /`` and spaces (and ``:`` except on Windows;
    gradguard leaves it out so a run's keys are the same everywhere). A path segment
    MLflow would read as a directory (``.``, ``..``, empty) becomes ``_``.

    Examples:
        >>> mlflow_key("gradguard/grad_norm")
        'gradguard/grad_norm'
        >>> mlflow_key("layers/*/2"), mlflow_key("layers/(top)/fc1")
        ('layers/_/2', 'layers/_top_/fc1')
    """
    parts = [_MLFLOW_BAD_CHARACTERS.sub("_", part) for part in tag.split("/")]
    return "/".join("_" if part in ("", ".", "..") else part for part in parts)


def _mlflow_keys(tags: Sequence[str]) -> dict[str, str]:
    """One distinct MLflow key per tag, at most MLflow's 250 characters.

    A key taken already (two names that differ only in refused characters) or too long
    gets the tag's position as a suffix.
    """
    keys: dict[str, str] = {}
    taken: set[str] = set()
    for index, tag in enumerate(tags):
        key = mlflow_key(tag)
        if key in taken or len(key) > _MLFLOW_KEY_LENGTH:
            suffix = f"_{index}"
            key = key[: _MLFLOW_KEY_LENGTH - len(suffix)] + suffix
        keys[tag] = key
        taken.add(key)
    return keys


class MlflowSink:
    """Logs each drain to an MLflow run: step scalars, per-layer norms, events, config.

    Metrics are named as the TensorBoard tags (``gradguard/loss``,
    ``layers/<family>/<layer>``, ``update_ratio/<family>/<layer>``) made into MLflow keys
    by :func:`mlflow_key` (``layers/*/2`` becomes ``layers/_/2``), logged at the guard's
    step. A drain is one ``log_batch`` call per 1000 values (MLflow's limit), nothing is
    sent between drains. Events go to the ``gradguard/events.json`` artifact (one object
    per event, streaks merged; rewritten at each drain that has events) and to the run's
    tags ``gradguard.events.<kind>``, ``gradguard.events.<severity>``,
    ``gradguard.events.total`` and ``gradguard.last_event``. At :meth:`open`: the
    configuration as params ``gradguard.config.<name>``, versions as tags
    ``gradguard.versions.<package>``, and ``gradguard/meta.json`` (layers, their keys,
    configuration, versions).

    Which run: ``run_id`` logs into that run; otherwise, with no ``tracking_uri``, the
    active run of ``mlflow.start_run()`` if there is one; otherwise a new run in
    ``experiment`` (created if needed). :meth:`close` ends only a run the sink created.

    Args:
        tracking_uri: where runs go: a server (``http://host:5000``), a database
            (``sqlite:///mlflow.db``) or a ``file:`` directory; None for MLflow's own
            default (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the current
            directory).
        experiment: the experiment of a new run (by name).
        run_name: the name of a new run (MLflow makes one up when None).
        run_id: log into this existing run (a resumed training run, say).
        tags: tags of a new run.
        artifact_location: where a new experiment keeps its artifacts (MLflow's default,
            ``./mlruns`` for a local store, when None).
        synchronous: False queues the calls on MLflow's background thread, so a drain
            does not wait for a remote server; :meth:`close` waits for them.

    Raises:
        ConfigError: ``mlflow`` is not installed, or a bad argument.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "gradguard",
        run_name: str | None = None,
        run_id: str | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
        synchronous: bool = True,
    ) -> None:
        _check_str("tracking_uri", tracking_uri)
        _check_str("experiment", experiment, optional=False)
        _check_str("run_name", run_name)
        _check_str("run_id", run_id)
        _check_str("artifact_location", artifact_location)
        _check_bool("synchronous", synchronous)
        if run_id is not None and run_name is not None:
            raise ConfigError("run_name names a new run, run_id an existing one: give one of them.")
        if tags is not None and (
            not isinstance(tags, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
        ):
            raise ConfigError(f"tags must be a mapping of str to str, got {tags!r}.")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.artifact_location = artifact_location
        self.synchronous = synchronous
        self._mlflow = _import_mlflow()
        self._client: Any = None
        self._run_id: str | None = None
        self._owns_run = False
        self._keys: dict[str, str] = {}
        self._layer_tags: tuple[str, ...] = ()
        self._events = _EventLog()
        self._pending: list[Any] = []

    @property
    def active_run_id(self) -> str | None:
        """The id of the run being logged to (None before :meth:`open` and after close)."""
        return self._run_id

    def open(self, meta: Mapping[str, Any]) -> None:
        """Find or create the run and log the configuration, versions and layers.

        Raises:
            ConfigError: MLflow refused: an unknown ``run_id``, a tracking URI it cannot
                use, a deleted experiment.
        """
        if self._run_id is not None:
            return
        mlflow, error_type = self._mlflow, self._mlflow.exceptions.MlflowException
        names = [str(name) for name in meta["layer_names"]]
        self._layer_tags = tuple(layer_tag(name) for name in names)
        self._keys = _mlflow_keys(
            [*_scalar_tags(), *self._layer_tags, *map(_ratio_tag, self._layer_tags)]
        )
        try:
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
            self._run_id = self._find_run()
            self._describe(meta)
        except error_type as error:
            self._abandon()
            raise ConfigError(f"MLflow: {error.message}") from error
        except BaseException:
            self._abandon()
            raise

    def _find_run(self) -> str:
        """The run to log into: ``run_id``, the active run, or a new one."""
        client = self._client
        if self.run_id is not None:
            return str(client.get_run(self.run_id).info.run_id)
        active = self._mlflow.active_run() if self.tracking_uri is None else None
        if active is not None:
            return str(active.info.run_id)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
        elif experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} is deleted: restore it "
                "(mlflow experiments restore) or give another experiment name."
            )
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self._owns_run = True
        return str(run.info.run_id)

    def _describe(self, meta: Mapping[str, Any]) -> None:
        """Params, tags and ``gradguard/meta.json``; an existing run keeps its params."""
        client, run_id = self._client, self._require_run()
        entities = self._mlflow.entities
        described = _config_for_tracker(meta)
        existing = client.get_run(run_id).data.params
        params = [
            entities.Param(mlflow_key(key)[:_MLFLOW_KEY_LENGTH], value[:_MLFLOW_PARAM_LENGTH])
            for key, value in _flat("gradguard.config", described["config"])
        ]
        params = [p for p in params if p.key not in existing]  # params never change in MLflow
        tags = {
            mlflow_key(key): value
            for key, value in _flat("gradguard.versions", described["versions"])
        }
        tags["gradguard.layers"] = str(len(described["layer_names"]))
        for start in range(0, len(params), _MLFLOW_TAGS_PER_BATCH):
            chunk = params[start : start + _MLFLOW_TAGS_PER_BATCH]
            client.log_batch(run_id, params=chunk, synchronous=True)
        self._log_tags(tags)
        layers = [
            {"name": name, "family_tag": tag, "key": self._keys[tag]}
            for name, tag in zip(described["layer_names"], self._layer_tags, strict=True)
        ]
        client.log_dict(run_id, {**dict(meta), "mlflow_layers": layers}, MLFLOW_META_ARTIFACT)
        if not self._owns_run:  # a resumed run: its events so far stay in the table
            self._events = _EventLog(self._logged_events())

    def _logged_events(self) -> list[dict[str, Any]]:
        client, run_id = self._client, self._require_run()
        folder = MLFLOW_EVENTS_ARTIFACT.rsplit("/", 1)[0]
        if not any(f.path == MLFLOW_EVENTS_ARTIFACT for f in client.list_artifacts(run_id, folder)):
            return []
        with tempfile.TemporaryDirectory() as scratch:
            path = client.download_artifacts(run_id, MLFLOW_EVENTS_ARTIFACT, scratch)
            rows = json.loads(Path(path).read_text(encoding="utf-8"))
        return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Log one drain: its metrics in batches of 1000, then its events, if any."""
        client, run_id = self._client, self._require_run()
        self._wait()  # at most one drain in flight when not synchronous
        entities, keys = self._mlflow.entities, self._keys
        now = int(time.time() * 1000)
        metrics = [
            entities.Metric(keys[tag], value, now, step)
            for step, values in _step_values(window, self._layer_tags)
            for tag, value in values.items()
        ]
        for start in range(0, len(metrics), _MLFLOW_METRICS_PER_BATCH):
            chunk = metrics[start : start + _MLFLOW_METRICS_PER_BATCH]
            operation = client.log_batch(run_id, metrics=chunk, synchronous=self.synchronous)
            if operation is not None:
                self._pending.append(operation)
        if events:
            self._log_events(events)

    def _log_events(self, events: Sequence[Event]) -> None:
        self._events.add(events)
        merged = self._events.merged()
        tags = {f"gradguard.events.{k}": str(n) for k, n in _EventLog.counts(merged).items()}
        attention = [event for event in events if event.needs_attention]
        if attention:
            tags["gradguard.last_event"] = str(attention[-1])[:_MLFLOW_TAG_LENGTH]
        self._log_tags(tags)
        self._client.log_dict(self._require_run(), merged, MLFLOW_EVENTS_ARTIFACT)

    def _log_tags(self, tags: Mapping[str, str]) -> None:
        entities = self._mlflow.entities
        items = [entities.RunTag(k, v) for k, v in tags.items()]
        for start in range(0, len(items), _MLFLOW_TAGS_PER_BATCH):
            chunk = items[start : start + _MLFLOW_TAGS_PER_BATCH]
            self._client.log_batch(self._require_run(), tags=chunk, synchronous=True)

    def _require_run(self) -> str:
        if self._run_id is None:
            raise ConfigError("MlflowSink used before open() or after close(); the guard opens it.")
        return self._run_id

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for operation in pending:
            operation.wait()

    def _abandon(self) -> None:
        """After a failed open: end a run this sink created, as failed."""
        if self._owns_run and self._run_id is not None:
            with contextlib.suppress(Exception):  # the open's own error is the one to raise
                self._client.set_terminated(self._run_id, status="FAILED")
        self._run_id, self._owns_run = None, False

    def close(self) -> None:
        """Wait for queued calls; end the run if this sink created it. Safe to call twice."""
        if self._run_id is None:
            return
        try:
            self._wait()
        finally:
            if self._owns_run:
                self._client.set_terminated(self._run_id, status="FINISHED")
            self._run_id, self._owns_run = None, False


def _import_mlflow() -> Any:
    """The ``mlflow`` module with its client and entities, imported on first use."""
    try:
        import mlflow
        import mlflow.entities
        import mlflow.exceptions
    except ImportError:
        raise ConfigError(
            "MLflow logging needs the mlflow package: pip install 'gradguard[mlflow]' "
            "(mlflow-skinny, with sqlalchemy and alembic for a local sqlite:// store)."
        ) from None
    return mlflow


# --- Weights & Biases ---------------------------------------------------------------------


class WandbSink:
    """Logs each drain to a W&B run: step scalars, per-layer norms, events, config.

    Each step of a drain is one history row (one ``run.log`` call) holding
    ``gradguard/step`` (the guard's step number), the step scalars ``gradguard/<field>``,
    the layers' gradient norms ``layers/<family>/<layer>`` and, on a drain's last step,
    the update ratios ``update_ratio/<family>/<layer>``: the TensorBoard tags. Every
    gradguard chart uses ``gradguard/step`` as its x-axis (``define_metric``), not W&B's
    own step: the guard's step goes back after a rollback and W&B drops rows whose step
    is below its own, so the sink never passes ``step=``. Events go to the table
    ``gradguard/events`` (one row per event, streaks merged; logged again at each drain
    that has events) and to the summary ``gradguard/event_counts/<kind or severity>``;
    the configuration, versions and layer names to ``config["gradguard"]``.

    Which run: ``run`` if given, else the active one (``wandb.run``), else a new one
    (``wandb.init`` with the arguments below, at :meth:`open`); the arguments of a new run
    are refused while another run is active. :meth:`close` finishes only a run the sink
    started. A run shared with your own logging must not be given ``step=`` by your code
    either (W&B drops a row whose step is below its own, and the sink's rows advance it):
    log your own step as a value and ``define_metric`` it, as the sink does.

    Args:
        run: a run from ``wandb.init()`` to log into.
        project: the project of a new run.
        entity: its team or user (W&B's default when None).
        name: its display name.
        dir: the directory for W&B's files (``dir/wandb``), relative to the current
            directory when the guard is built; created if needed.
        mode: ``"online"``, ``"offline"`` (no account or network needed; ``wandb sync``
            uploads it later), ``"disabled"`` or ``"shared"``; None follows
            ``WANDB_MODE``.
        id: the run id, to resume a run with ``resume``.
        resume: as ``wandb.init``'s: ``"allow"``, ``"must"``, ``"never"``, ``"auto"``,
            True or False.
        tags: tags of a new run.
        settings: ``wandb.Settings`` (or a dict of them) for a new run.

    Raises:
        ConfigError: ``wandb`` is not installed, or a bad argument.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        project: str = "gradguard",
        entity: str | None = None,
        name: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        mode: str | None = None,
        id: str | None = None,
        resume: bool | str | None = None,
        tags: Sequence[str] | None = None,
        settings: Any = None,
    ) -> None:
        if run is not None and not (callable(getattr(run, "log", None)) and hasattr(run, "config")):
            raise ConfigError(f"run must be a W&B run (from wandb.init()) or None, got {run!r}.")
        _check_str("project", project, optional=False)
        for label, value in (("entity", entity), ("name", name), ("id", id)):
            _check_str(label, value)
        if dir is not None and not isinstance(dir, str | os.PathLike):
            raise ConfigError(f"dir must be a path (str or os.PathLike) or None, got {dir!r}.")
        if mode is not None and mode not in _WANDB_MODES:
            raise ConfigError(f"mode must be one of {_WANDB_MODES} or None, got {mode!r}.")
        if resume is not None and not any(
            resume is choice or (isinstance(resume, str) and resume == choice)
            for choice in _WANDB_RESUME
        ):
            raise ConfigError(f"resume must be one of {_WANDB_RESUME} or None, got {resume!r}.")
        if tags is not None and (
            isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags)
        ):
            raise ConfigError(f"tags must be a sequence of strings, got {tags!r}.")
        self._wandb = _import_wandb()
        if settings is not None and not isinstance(settings, Mapping | self._wandb.Settings):
            raise ConfigError(f"settings must be a wandb.Settings or a dict, got {settings!r}.")
        if run is not None and any(
            value is not None for value in (entity, name, dir, mode, id, resume, tags, settings)
        ):
            raise ConfigError(
                "entity, name, dir, mode, id, resume, tags and settings start a new run: "
                "give them to wandb.init() for the run you pass, or pass no run."
            )
        self.run = run
        self._init_args: dict[str, Any] = {
            "project": project,
            "entity": entity,
            "name": name,
            "dir": None if dir is None else os.fspath(dir),
            "mode": mode,
            "id": id,
            "resume": resume,
            "tags": None if tags is None else list(tags),
            "settings": settings,
        }
        self._run: Any = None
        self._owns_run = False
        self._layer_tags: tuple[str, ...] = ()
        self._events = _EventLog()
        self._last_step = 0

    @property
    def active_run(self) -> Any:
        """The run being logged to (None before :meth:`open` and after close)."""
        return self._run

    def open(self, meta: Mapping[str, Any]) -> None:
        """Find or start the run, record the configuration and set the step metric.

        Raises:
            ConfigError: W&B refused to start the run (bad settings, no login for an
                online run), or a new run's arguments while another run is active.
        """
        if self._run is not None:
            return
        wandb = self._wandb
        self._layer_tags = tuple(layer_tag(str(name)) for name in meta["layer_names"])
        described = {"gradguard": _config_for_tracker(meta)}
        run = self.run if self.run is not None else wandb.run
        starts_run = {k: v for k, v in self._init_args.items() if k != "project" and v is not None}
        if self.run is None and run is not None and starts_run:
            raise ConfigError(
                f"a W&B run is active already ({run.id}), and {', '.join(starts_run)} would "
                "start a new one: pass the active run (WandbSink(run=wandb.run)), or finish "
                "it first (wandb.finish())."
            )
        if run is None:
            arguments = {k: v for k, v in self._init_args.items() if v is not None}
            if "dir" in arguments:
                # Absolute: W&B's writer process would resolve a relative dir against its
                # own working directory, not this process's current one.
                arguments["dir"] = os.path.abspath(arguments["dir"])
                Path(arguments["dir"]).mkdir(parents=True, exist_ok=True)
            try:
                run = wandb.init(config=described, **arguments)
            except (wandb.errors.Error, ValueError) as error:  # settings: pydantic's ValueError
                raise ConfigError(f"W&B could not start the run: {error}") from error
            self._owns_run = True
        else:
            run.config.update(described, allow_val_change=True)
        run.define_metric(WANDB_STEP_KEY)
        for prefix in ("gradguard", "layers", "update_ratio"):
            run.define_metric(f"{prefix}/*", step_metric=WANDB_STEP_KEY)
        self._run = run

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Log one drain: a history row per step; the events table when there are events."""
        run = self._run
        if run is None:
            raise ConfigError("WandbSink used before open() or after close(); the guard opens it.")
        rows = _step_values(window, self._layer_tags)
        if rows:
            self._last_step = rows[-1][0]
        table = self._events_table(events) if events else None
        for i, (step, values) in enumerate(rows):
            values[WANDB_STEP_KEY] = step
            if table is not None and i == len(rows) - 1:
                values[WANDB_EVENTS_KEY] = table
            run.log(values)
        if table is not None and not rows:  # events of a window of no step (close, rollback)
            run.log({WANDB_STEP_KEY: self._last_step, WANDB_EVENTS_KEY: table})

    def _events_table(self, events: Sequence[Event]) -> Any:
        self._events.add(events)
        merged = self._events.merged()
        self._run.summary.update(
            {f"gradguard/event_counts/{k}": n for k, n in _EventLog.counts(merged).items()}
        )
        data = [_table_row(row) for row in merged]
        return self._wandb.Table(columns=list(EVENT_COLUMNS), data=data, log_mode="MUTABLE")

    def close(self) -> None:
        """Finish the run if this sink started it. Safe to call twice."""
        run, self._run = self._run, None
        if run is not None and self._owns_run:
            run.finish()
        self._owns_run = False


def _table_row(row: Mapping[str, Any]) -> list[Any]:
    """One merged event as a row of :data:`EVENT_COLUMNS` (one type per column)."""
    evidence = row.get("evidence")
    advice = row.get("advice") or []
    return [
        int(row["first_step"]),
        int(row["last_step"]),
        int(row["count"]),
        str(row["kind"]),
        severity_of(dict(row)),
        str(row.get("cause", "")),
        str(row.get("metric", "")),
        _number_text(row.get("value")),
        _number_text(row.get("threshold")),
        ", ".join(str(layer) for layer in row.get("layers", [])),
        "" if row.get("batch") is None else json.dumps(row["batch"]),
        str(row.get("message", "")),
        str(evidence.get("summary", "")) if isinstance(evidence, Mapping) else "",
        "\n".join(
            f"{i}. {a.get('text', '') if isinstance(a, Mapping) else a}"
            for i, a in enumerate(advice, 1)
        ),
    ]


def _import_wandb() -> Any:
    """The ``wandb`` module, imported on first use (an optional extra)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "W&B logging needs the wandb package: pip install 'gradguard[wandb]'."
        ) from None
    return wandb


__all__ = [
    "EVENT_COLUMNS",
    "MLFLOW_EVENTS_ARTIFACT",
    "MLFLOW_META_ARTIFACT",
    "WANDB_EVENTS_KEY",
    "WANDB_STEP_KEY",
    "MlflowSink",
    "WandbSink",
    "mlflow_key",
]
