"""Tracker sinks (MLflow, W&B offline) read back for real and compared with the run directory."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import wandb
from mlflow import MlflowClient
from torch import nn
from wandb.proto import wandb_internal_pb2

import gradguard as gg
from conftest import make_model
from gradguard.errors import ConfigError
from gradguard.records import Event, Window
from gradguard.report._data import merge_streaks
from gradguard.sinks import STEP_SCALARS, Sink, read_jsonl
from gradguard.testing import FaultInjector
from gradguard.trackers import (
    EVENT_COLUMNS,
    MLFLOW_EVENTS_ARTIFACT,
    MLFLOW_META_ARTIFACT,
    MlflowSink,
    WandbSink,
    _mlflow_keys,
    mlflow_key,
)

# W&B without an account, a network or a console: offline, quiet, no git/code/system stats.
QUIET_WANDB = {
    "console": "off",
    "silent": True,
    "disable_git": True,
    "save_code": False,
    "x_disable_stats": True,
    "x_disable_meta": True,
}
LOG_EVERY = 10
STEPS = 80
FAULTS = {12: "nan"}
INF_LOSS_STEP = 33  # the loss given to guard.step is +Inf there (the backward is finite)
SPIKE_STEP = 55  # a bad batch: the spike rolls the run back to step 40, so 41-60 repeat
LAYER_KEYS = ("layers/_/0", "layers/_/2", "layers/_/4")  # MLflow's keys of layers/*/N


def quiet_wandb_env(patch: pytest.MonkeyPatch, root: Path) -> None:
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    patch.setenv("WANDB_CONSOLE", "off")
    patch.setenv("WANDB_DISABLE_GIT", "true")
    patch.setenv("WANDB_DISABLE_CODE", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        patch.setenv(name, str(root / "wandb-home"))
    patch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    quiet_wandb_env(monkeypatch, tmp_path)
    yield
    assert wandb.run is None, "a test left a W&B run open"


def train(
    guard: gg.Guard,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    faults: Mapping[int, Any] | None = None,
    inf_loss: int | None = None,
    spike: int | None = None,
    first: int = 1,
) -> None:
    injector = FaultInjector(model, optimizer, at=dict(faults or {}), parameter="2.weight")
    for i in range(first, first + steps):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
        with injector.step():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), x[:, :1] - 2 * x[:, 1:2])
            if i == spike:
                loss = loss * 1000
            loss.backward()
            guard.step(loss.detach() * math.inf if i == inf_loss else loss)


def number(value: Any) -> float:
    """A metrics.jsonl value as a float ("nan", "inf" are strings there)."""
    return float(value)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def as_sql_store(value: float) -> float:
    """What MLflow's SQL store keeps: it has no Inf and stores +-Inf as +-the largest double.

    NaN is kept (a flag column); every finite double is kept exactly.
    """
    return math.copysign(sys.float_info.max, value) if math.isinf(value) else value


def canonical(rows: Any) -> str:
    """JSON text of rows, so NaN compares equal to NaN."""
    return json.dumps(rows, sort_keys=True)


def mlflow_series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's (step, value) pairs in logging order (drain time, then step)."""
    history = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def assert_same_series(got: Sequence[tuple[int, float]], want: Sequence[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, value), (_, expected) in zip(got, want, strict=True):
        assert same(value, expected), (step, value, expected)


# --- reading a W&B offline run back --------------------------------------------------------

_BLOCK = 32768  # the run file is a LevelDB log: 32 KiB blocks of checksummed records
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a ``run-*.wandb`` transaction log (W&B ships no reader for it).

    The file is a 7-byte header (``:W&B``, magic 0xBEE1, version) and LevelDB log records:
    a CRC-32 of type and data, the length, the type (full, first, middle, last), the data;
    a block's tail shorter than a record header is zero padding.
    """
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # padding up to the next block
            position += left
            continue
        if position + 7 + length > len(data):  # a record still being written
            return
        payload = data[position + 7 : position + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum
        position += 7 + length
        if kind == _FULL:
            yield wandb_internal_pb2.Record.FromString(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        else:
            assert kind == _LAST
            yield wandb_internal_pb2.Record.FromString(pending + payload)
            pending = b""


@dataclass
class WandbRun:
    """What an offline run's transaction log holds, decoded."""

    files: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[str, str, str]] = field(default_factory=list)  # name/glob, step metric

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(h["gradguard/step"]), float(h[key])) for h in self.history if key in h]


def finished_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The run's records once its last one, ``exit``, is written.

    ``run.finish()`` can return before W&B's writer process has written the whole file
    (seen under load, offline), so the reader waits for the record that ends a run.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)


def read_wandb_run(run_dir: Path) -> WandbRun:
    (path,) = run_dir.glob("run-*.wandb")
    run = WandbRun(files=run_dir / "files")

    def key(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else str(item.key)

    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            run.config.update({key(i): json.loads(i.value_json) for i in updates})
        elif kind == "metric":
            metric = record.metric
            run.metrics.append((metric.name, metric.glob_name, metric.step_metric))
    return run


def wandb_run_dir(root: Path) -> Path:
    (found,) = (root / "wandb").glob("offline-run-*")
    return found


# --- one guarded run logged to MLflow (SQLite) and W&B (offline) ------------------------------


@dataclass
class Tracked:
    root: Path
    run_dir: Path
    uri: str
    run_id: str
    wandb: WandbRun


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A local MLflow store, MLflow's default kind (SQLite), shared by this module's tests.

    Creating one runs MLflow's database migrations (a few seconds), so it is made once.
    """
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow's default artifact root of a local store is ./mlruns
        yield root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, mlflow_store: tuple[Path, str]) -> Tracked:
    """80 steps, log_every 10: a NaN step (skipped), an Inf loss, a spike and a rollback."""
    root = tmp_path_factory.mktemp("tracked")
    _, uri = mlflow_store
    with pytest.MonkeyPatch.context() as patch:
        quiet_wandb_env(patch, root)
        ml = MlflowSink(
            uri, run_name="tracked", artifact_location=str(root / "artifacts"), tags={"t": "1"}
        )
        wb = WandbSink(project="gradguard-tests", dir=root, mode="offline", settings=QUIET_WANDB)
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = gg.Guard(
            model,
            optimizer,
            clip=gg.NormClip(1.0),
            recovery=gg.Rollback(every=20, cooldown=10),
            log_every=LOG_EVERY,
            run_dir=root / "run",
            tensorboard=False,
            sinks=[ml, wb],
        )
        run_id = ml.active_run_id
        assert run_id is not None
        train(
            guard, model, optimizer, STEPS, faults=FAULTS, inf_loss=INF_LOSS_STEP, spike=SPIKE_STEP
        )
        guard.close()
    return Tracked(root, root / "run", uri, run_id, read_wandb_run(wandb_run_dir(root)))


def test_the_run_has_what_the_comparisons_need(tracked: Tracked) -> None:
    rows = read_jsonl(tracked.run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == [*range(1, 61), *range(41, 61)]  # the rollback: 41-60 twice
    assert [r["step"] for r in rows if r["skipped"]] == [12]
    assert [r["step"] for r in rows if r["loss"] == "inf"] == [INF_LOSS_STEP]
    kinds = {e["kind"] for e in read_jsonl(tracked.run_dir / "events.jsonl")}
    assert {"nonfinite", "spike", "rollback"} <= kinds


# --- MLflow ---------------------------------------------------------------------------------


def test_mlflow_metrics_equal_metrics_jsonl(tracked: Tracked) -> None:
    """Every step scalar, at its step, as metrics.jsonl: exact (MLflow keeps doubles).

    The one difference is MLflow's SQL store's: +-Inf is stored as +-1.8e308.
    """
    client = MlflowClient(tracked.uri)
    rows = read_jsonl(tracked.run_dir / "metrics.jsonl")
    for name in STEP_SCALARS:
        want = [(r["step"], as_sql_store(number(r[name]))) for r in rows if r[name] is not None]
        assert_same_series(mlflow_series(client, tracked.run_id, f"gradguard/{name}"), want)
    loss = dict(mlflow_series(client, tracked.run_id, "gradguard/loss"))
    assert loss[INF_LOSS_STEP] == sys.float_info.max
    grad_norm = dict(mlflow_series(client, tracked.run_id, "gradguard/grad_norm"))
    assert math.isnan(grad_norm[12])
    skipped = mlflow_series(client, tracked.run_id, "gradguard/skipped")
    assert [s for s, v in skipped if v == 1.0] == [12]
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"  # the sink created the run, so it ended it
    assert run.info.run_name == "tracked"
    assert run.data.tags["t"] == "1"


def test_mlflow_layer_norms_and_update_ratios_equal_layers_jsonl(tracked: Tracked) -> None:
    client = MlflowClient(tracked.uri)
    layers = read_jsonl(tracked.run_dir / "layers.jsonl")
    meta = json.loads((tracked.run_dir / "meta.json").read_text())
    assert meta["layer_names"] == ["0", "2", "4"]
    keys = set(client.get_run(tracked.run_id).data.metrics)
    assert keys == {f"gradguard/{name}" for name in STEP_SCALARS} | set(LAYER_KEYS) | {
        key.replace("layers/", "update_ratio/") for key in LAYER_KEYS
    }
    ratios_seen = 0
    for j, key in enumerate(LAYER_KEYS):
        want = [(r["step"], number(r["norms"][j])) for r in layers]
        assert_same_series(mlflow_series(client, tracked.run_id, key), want)
        ratio_key = key.replace("layers/", "update_ratio/")
        want = [
            (r["step"], float(r["update_ratio"][j]))
            for r in layers
            if r.get("update_ratio") and r["update_ratio"][j] is not None
        ]
        assert_same_series(mlflow_series(client, tracked.run_id, ratio_key), want)
        ratios_seen += len(want)
    assert ratios_seen > 0


def test_mlflow_events_config_and_versions(tracked: Tracked) -> None:
    client = MlflowClient(tracked.uri)
    run = client.get_run(tracked.run_id)
    meta = json.loads((tracked.run_dir / "meta.json").read_text())
    params = run.data.params
    assert params["gradguard.config.clip"] == meta["config"]["clip"]
    assert params["gradguard.config.log_every"] == "10"
    assert params["gradguard.config.optimizer"] == "SGD"
    assert params["gradguard.config.nonfinite"] == "skip"
    for name in meta["config"]:  # every setting, nested ones as gradguard.config.a.b
        assert any(key.split(".")[2] == name for key in params), name
    assert json.loads(params["gradguard.config.detectors"]) == meta["config"]["detectors"]
    assert run.data.tags["gradguard.versions.torch"] == torch.__version__
    assert run.data.tags["gradguard.versions.gradguard"] == gg.__version__
    assert run.data.tags["gradguard.layers"] == "3"

    scratch = tracked.root / "downloaded"
    logged_meta = json.loads(
        Path(
            client.download_artifacts(tracked.run_id, MLFLOW_META_ARTIFACT, str(scratch))
        ).read_text()
    )
    assert logged_meta["layer_names"] == meta["layer_names"]
    assert [layer["key"] for layer in logged_meta["mlflow_layers"]] == list(LAYER_KEYS)

    # The events: one object per event (a streak's rows merged), as the report reads them.
    want = merge_streaks(read_jsonl(tracked.run_dir / "events.jsonl"))
    events = json.loads(
        Path(
            client.download_artifacts(tracked.run_id, MLFLOW_EVENTS_ARTIFACT, str(scratch))
        ).read_text()
    )
    assert canonical(events) == canonical(want)
    assert [e["first_step"] for e in events if e["kind"] == "nonfinite"] == [12]
    tags = run.data.tags
    for kind in {e["kind"] for e in want}:
        assert tags[f"gradguard.events.{kind}"] == str(sum(e["kind"] == kind for e in want))
    assert tags["gradguard.events.total"] == str(len(want))
    assert tags["gradguard.events.warning"] == str(sum(e["severity"] == "warning" for e in want))
    assert tags["gradguard.last_event"].startswith("step ")
    found = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`gradguard.events.nonfinite` = '1'"
    )
    assert [r.info.run_id for r in found] == [tracked.run_id]


def test_mlflow_writes_only_at_drains(mlflow_store: tuple[Path, str]) -> None:
    _, uri = mlflow_store
    client = MlflowClient(uri)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = MlflowSink(uri, experiment="drains")
    guard = gg.Guard(model, optimizer, log_every=5, sinks=[sink])
    run_id = sink.active_run_id
    assert run_id is not None
    train(guard, model, optimizer, 4)
    assert client.get_metric_history(run_id, "gradguard/grad_norm") == []
    assert client.get_run(run_id).info.status == "RUNNING"
    train(guard, model, optimizer, 1, first=5)  # the fifth step drains
    assert [m.step for m in client.get_metric_history(run_id, "gradguard/grad_norm")] == [
        1,
        2,
        3,
        4,
        5,
    ]
    train(guard, model, optimizer, 2, first=6)
    guard.close()  # the last two steps are drained by close()
    steps = [m.step for m in client.get_metric_history(run_id, "gradguard/grad_norm")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6, 7]
    assert client.get_run(run_id).info.status == "FINISHED"
    guard.close()
    sink.close()  # twice: nothing more


def test_mlflow_batches_stay_within_mlflow_limits(
    mlflow_store: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain of 150 layers x 8 steps is 1248 values: two log_batch calls, nothing lost."""
    _, uri = mlflow_store
    calls: list[int] = []
    real = MlflowClient.log_batch

    def counting(self: MlflowClient, run_id: str, metrics: Sequence[Any] = (), **kw: Any) -> Any:
        if metrics:
            calls.append(len(metrics))
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(150)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = MlflowSink(uri, experiment="wide")
    guard = gg.Guard(model, optimizer, log_every=8, sinks=[sink])
    run_id = sink.active_run_id
    assert run_id is not None
    for i in range(8):
        optimizer.zero_grad()
        model(
            torch.randn(4, 2, generator=torch.Generator().manual_seed(i))
        ).square().mean().backward()
        guard.step()  # no loss: 5 step scalars + 150 layers per step
    guard.close()
    client = MlflowClient(uri)
    ratios = sum("update_ratio" in key for key in client.get_run(run_id).data.metrics)
    assert calls == [1000, 8 * 155 + ratios - 1000]
    assert [m.step for m in client.get_metric_history(run_id, "layers/_/149")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run_id, "layers/_/0")] == list(range(1, 9))


def test_mlflow_resumed_run_keeps_its_params_and_events(mlflow_store: tuple[Path, str]) -> None:
    _, uri = mlflow_store
    client = MlflowClient(uri)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    first = MlflowSink(uri, experiment="resume")
    guard = gg.Guard(model, optimizer, log_every=5, sinks=[first])
    run_id = first.active_run_id
    assert run_id is not None
    train(guard, model, optimizer, 10, faults={3: "nan"})
    saved = guard.state_dict()
    guard.close()

    again = MlflowSink(uri, run_id=run_id)  # another session, another log_every
    resumed = gg.Guard(model, optimizer, log_every=4, sinks=[again])
    resumed.load_state_dict(saved)
    train(resumed, model, optimizer, 8, faults={2: "nan"}, first=11)  # the NaN at step 12
    resumed.close()
    run = client.get_run(run_id)
    assert run.data.params["gradguard.config.log_every"] == "5"  # params never change
    steps = sorted(m.step for m in client.get_metric_history(run_id, "gradguard/grad_norm"))
    assert steps == list(range(1, 19))
    scratch = Path(mlflow_store[0]) / "resume-download"
    events = json.loads(
        Path(client.download_artifacts(run_id, MLFLOW_EVENTS_ARTIFACT, str(scratch))).read_text()
    )
    assert [(e["kind"], e["first_step"]) for e in events] == [("nonfinite", 3), ("nonfinite", 12)]
    assert run.data.tags["gradguard.events.nonfinite"] == "2"


def test_mlflow_logs_into_the_active_run_and_leaves_it_open(
    mlflow_store: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with mlflow.start_run(run_name="mine") as active:
        mlflow.log_param("batch_size", 16)
        sink = MlflowSink()
        with gg.Guard(model, optimizer, log_every=5, sinks=[sink]) as guard:
            assert sink.active_run_id == active.info.run_id
            train(guard, model, optimizer, 5)
        assert mlflow.active_run() is not None
        run = MlflowClient(uri).get_run(active.info.run_id)
        assert run.info.status == "RUNNING"  # not the sink's run: not ended by it
        assert run.data.params["batch_size"] == "16"
        assert "gradguard.config.clip" in run.data.params
    assert MlflowClient(uri).get_run(active.info.run_id).info.status == "FINISHED"


def test_mlflow_asynchronous_logging_arrives_by_close(mlflow_store: tuple[Path, str]) -> None:
    root, uri = mlflow_store
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = MlflowSink(uri, experiment="async", synchronous=False)
    guard = gg.Guard(model, optimizer, log_every=5, run_dir=root / "async", sinks=[sink])
    run_id = sink.active_run_id
    assert run_id is not None
    train(guard, model, optimizer, 12, faults={7: "nan"})
    guard.close()
    rows = read_jsonl(root / "async" / "metrics.jsonl")
    want = [(r["step"], number(r["grad_norm"])) for r in rows]
    assert_same_series(mlflow_series(MlflowClient(uri), run_id, "gradguard/grad_norm"), want)


def test_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``file:`` store (MLflow keeps it for compatibility behind MLFLOW_ALLOW_FILE_STORE).

    It keeps Inf as Inf.
    """
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = MlflowSink(uri, run_name="files")
    guard = gg.Guard(model, optimizer, log_every=4, run_dir=tmp_path / "run", sinks=[sink])
    run_id = sink.active_run_id
    assert run_id is not None
    train(guard, model, optimizer, 10, faults={3: "nan"}, inf_loss=6)
    guard.close()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    client = MlflowClient(uri)
    for name in ("loss", "grad_norm"):
        want = [(r["step"], number(r[name])) for r in rows]
        assert_same_series(mlflow_series(client, run_id, f"gradguard/{name}"), want)
    assert dict(mlflow_series(client, run_id, "gradguard/loss"))[6] == math.inf
    assert client.get_run(run_id).info.status == "FINISHED"


def test_mlflow_unknown_run_id_is_refused_when_the_guard_is_built(
    mlflow_store: tuple[Path, str],
) -> None:
    _, uri = mlflow_store
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ConfigError, match="MLflow: .*0123456789abcdef"):
        gg.Guard(model, optimizer, sinks=[MlflowSink(uri, run_id="0123456789abcdef")])
    gg.Guard(model, optimizer).close()  # the failed guard kept nothing: the optimizer is free


def test_mlflow_keys() -> None:
    assert mlflow_key("layers/encoder.layers.*.linear1/encoder.layers.3.linear1") == (
        "layers/encoder.layers._.linear1/encoder.layers.3.linear1"
    )
    assert mlflow_key("layers/(top)/lm_head") == "layers/_top_/lm_head"
    assert mlflow_key("layers/../a:b") == "layers/_/a_b"
    long = "layers/x/" + "y" * 300
    keys = _mlflow_keys(["layers/*/a+b", "layers/*/a-b", "layers/*/a_b", long])
    assert (
        keys
        == {
            "layers/*/a+b": "layers/_/a_b",
            "layers/*/a-b": "layers/_/a-b",
            "layers/*/a_b": "layers/_/a_b_2",  # taken by a+b: the tag's position disambiguates
            long: long[:248] + "_3",
        }
    )
    assert all(len(key) <= 250 for key in keys.values())


# --- W&B (offline) ------------------------------------------------------------------------------


def test_wandb_history_equals_metrics_jsonl(tracked: Tracked) -> None:
    """Every step scalar, at the guard's step, as metrics.jsonl: exact (W&B keeps doubles).

    ``gradguard/step`` goes back after the rollback (41-60 twice) while W&B's own step
    only grows: no row is dropped.
    """
    run = tracked.wandb
    rows = read_jsonl(tracked.run_dir / "metrics.jsonl")
    for name in STEP_SCALARS:
        want = [(r["step"], number(r[name])) for r in rows if r[name] is not None]
        assert_same_series(run.series(f"gradguard/{name}"), want)
    assert dict(run.series("gradguard/loss"))[INF_LOSS_STEP] == math.inf
    wandb_steps = [h["_step"] for h in run.history]
    assert wandb_steps == list(range(len(run.history)))
    metric_rows = [h for h in run.history if "gradguard/grad_norm" in h]
    assert [h["gradguard/step"] for h in metric_rows] == [r["step"] for r in rows]
    assert ("gradguard/step", "", "") in run.metrics
    for prefix in ("gradguard", "layers", "update_ratio"):
        assert ("", f"{prefix}/*", "gradguard/step") in run.metrics


def test_wandb_layer_norms_and_update_ratios_equal_layers_jsonl(tracked: Tracked) -> None:
    run = tracked.wandb
    layers = read_jsonl(tracked.run_dir / "layers.jsonl")
    ratios_seen = 0
    for j, name in enumerate(["0", "2", "4"]):
        want = [(r["step"], number(r["norms"][j])) for r in layers]
        assert_same_series(run.series(f"layers/*/{name}"), want)
        want = [
            (r["step"], float(r["update_ratio"][j]))
            for r in layers
            if r.get("update_ratio") and r["update_ratio"][j] is not None
        ]
        assert_same_series(run.series(f"update_ratio/*/{name}"), want)
        ratios_seen += len(want)
    assert ratios_seen > 0


def test_wandb_events_table_summary_and_config(tracked: Tracked) -> None:
    run = tracked.wandb
    want = merge_streaks(read_jsonl(tracked.run_dir / "events.jsonl"))
    tables = [h for h in run.history if "gradguard/events/path" in h]
    assert tables  # logged at each drain with events
    latest = json.loads((run.files / tables[-1]["gradguard/events/path"]).read_text())
    assert latest["columns"] == list(EVENT_COLUMNS)
    got = [dict(zip(EVENT_COLUMNS, row, strict=True)) for row in latest["data"]]
    assert [(e["first_step"], e["last_step"], e["count"], e["kind"]) for e in got] == [
        (e["first_step"], e["last_step"], e["count"], e["kind"]) for e in want
    ]
    assert [e["severity"] for e in got] == [e["severity"] for e in want]
    assert [e["message"] for e in got] == [e["message"] for e in want]
    nonfinite = next(e for e in got if e["kind"] == "nonfinite")
    assert (nonfinite["first_step"], nonfinite["layers"], nonfinite["value"]) == (
        12,
        "2.weight",
        "nan",
    )
    assert nonfinite["cause"] == "nonfinite_backward"
    assert nonfinite["advice"].startswith("1. ")
    for kind in {e["kind"] for e in want}:
        count = sum(e["kind"] == kind for e in want)
        assert run.summary[f"gradguard/event_counts/{kind}"] == count
    assert run.summary["gradguard/event_counts/total"] == len(want)

    meta = json.loads((tracked.run_dir / "meta.json").read_text())
    logged = run.config["gradguard"]
    assert logged["config"]["clip"] == meta["config"]["clip"]
    assert logged["config"]["log_every"] == LOG_EVERY
    assert logged["versions"] == meta["versions"]
    assert logged["layer_names"] == meta["layer_names"]


def test_wandb_into_a_run_of_your_own_writes_only_at_drains(tmp_path: Path) -> None:
    run = wandb.init(
        project="mine",
        dir=tmp_path,
        mode="offline",
        config={"batch_size": 16},
        settings=QUIET_WANDB,
    )
    try:
        logged: list[dict[str, Any]] = []
        real_log = run.log

        def spy(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            logged.append(dict(data))
            real_log(data, *args, **kwargs)

        run.log = spy  # type: ignore[method-assign]
        sink = WandbSink(run)
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gg.Guard(model, optimizer, log_every=5, sinks=[sink])
        train(guard, model, optimizer, 4)
        assert logged == []
        train(guard, model, optimizer, 1, first=5)
        assert [row["gradguard/step"] for row in logged] == [1, 2, 3, 4, 5]
        guard.close()
        assert wandb.run is run  # not the sink's run: not finished by it
        run.log({"accuracy": 0.5})
    finally:
        run.finish()
    history = read_wandb_run(wandb_run_dir(tmp_path))
    assert history.config["batch_size"] == 16
    assert history.config["gradguard"]["config"]["log_every"] == 5
    assert [h.get("gradguard/step") for h in history.history] == [1, 2, 3, 4, 5, None]
    assert history.history[-1]["accuracy"] == 0.5


def test_wandb_refuses_to_start_a_run_while_one_is_active(tmp_path: Path) -> None:
    run = wandb.init(project="mine", dir=tmp_path, mode="offline", settings=QUIET_WANDB)
    try:
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with pytest.raises(ConfigError, match="a W&B run is active already"):
            gg.Guard(model, optimizer, sinks=[WandbSink(name="other", dir=tmp_path)])
        sink = WandbSink()  # no arguments of a new run: the active run it is
        gg.Guard(model, optimizer, sinks=[sink]).close()
        assert wandb.run is run
    finally:
        run.finish()


def test_wandb_relative_dir_after_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B's writer process, started in another directory, still writes where dir says."""
    monkeypatch.chdir(tmp_path)
    wandb.init(project="first", dir="first", mode="offline", settings=QUIET_WANDB).finish()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = WandbSink(dir="runs", mode="offline", settings=QUIET_WANDB)
    with gg.Guard(model, optimizer, log_every=5, sinks=[sink]) as guard:
        train(guard, model, optimizer, 5)
    run = read_wandb_run(wandb_run_dir(tmp_path / "elsewhere" / "runs"))
    assert [h["gradguard/step"] for h in run.history] == [1, 2, 3, 4, 5]


# --- missing packages, bad arguments ---------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "make", "extra"),
    [("mlflow", lambda: MlflowSink(), "mlflow"), ("wandb", lambda: WandbSink(), "wandb")],
)
def test_missing_package_is_a_config_error_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, package: str, make: Any, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"pip install 'gradguard\[{extra}\]'"):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MlflowSink(experiment=""), "experiment must be a non-empty string"),
        (lambda: MlflowSink(tracking_uri=5), "tracking_uri must be"),
        (lambda: MlflowSink(run_id="abc", run_name="x"), "give one of them"),
        (lambda: MlflowSink(tags={"a": 1}), "tags must be a mapping of str to str"),
        (lambda: MlflowSink(synchronous="no"), "synchronous must be True or False"),
        (lambda: WandbSink(mode="offlin"), "mode must be one of"),
        (lambda: WandbSink(run=object()), "run must be a W&B run"),
        (lambda: WandbSink(resume="sometimes"), "resume must be one of"),
        (lambda: WandbSink(tags="a,b"), "tags must be a sequence of strings"),
        (lambda: WandbSink(settings=5), "settings must be a wandb.Settings or a dict"),
        (lambda: WandbSink(project=""), "project must be a non-empty string"),
        (lambda: WandbSink(dir=3), "dir must be a path"),
    ],
)
def test_bad_arguments_are_config_errors(make: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_wandb_init_refusal_is_a_config_error_when_the_guard_is_built(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = WandbSink(dir=tmp_path, mode="offline", settings={"console": "nope"})
    with pytest.raises(ConfigError, match=r"(?s)W&B could not start the run: .*console"):
        gg.Guard(model, optimizer, sinks=[sink])
    assert wandb.run is None


def test_wandb_run_with_new_run_arguments_is_refused(tmp_path: Path) -> None:
    run = wandb.init(project="mine", dir=tmp_path, mode="disabled")
    try:
        with pytest.raises(ConfigError, match="give them to wandb.init"):
            WandbSink(run, mode="offline")
    finally:
        run.finish()


# --- a sink of your own -----------------------------------------------------------------------


class RecordingSink:
    """A sink of one's own, with the optional start(): keeps what the guard hands it."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] | None = None
        self.started_at: int | None = None
        self.windows: list[list[int]] = []
        self.grad_norms: list[float] = []
        self.events: list[Event] = []
        self.closed = 0

    def open(self, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)

    def start(self, step: int) -> None:
        self.started_at = step

    def write(self, window: Window, events: Sequence[Event]) -> None:
        self.windows.append(window.steps.tolist())
        self.grad_norms += window.grad_norm.tolist()
        self.events += events

    def close(self) -> None:
        self.closed += 1


def test_a_sink_of_your_own(tmp_path: Path) -> None:
    sink = RecordingSink()
    assert isinstance(sink, Sink)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, log_every=4, run_dir=tmp_path, sinks=[sink])
    assert sink.meta is not None
    assert sink.meta["layer_names"] == ["0", "2", "4"]
    assert sink.meta["config"]["log_every"] == 4
    assert sink.started_at is None
    assert sink.windows == []
    train(guard, model, optimizer, 3)
    assert sink.started_at == 0
    assert sink.windows == []
    train(guard, model, optimizer, 7, faults={2: "nan"}, first=4)  # the NaN at step 5
    assert sink.windows == [[1, 2, 3, 4], [5, 6, 7, 8]]
    guard.close()
    assert sink.windows == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]  # close drains the rest
    assert sink.closed == 1
    assert [(e.step, e.kind) for e in sink.events] == [(5, "nonfinite")]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert_same_series(
        list(enumerate(sink.grad_norms, 1)), [(r["step"], number(r["grad_norm"])) for r in rows]
    )


# --- docs/trackers.md ----------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "trackers.md"


def doc_programs() -> list[str]:
    """The complete programs of docs/trackers.md (its fragments do not import gradguard)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "import gradguard as gg" in block]


@pytest.mark.slow
def test_the_programs_in_docs_trackers_md_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each starts a run of its own: MLflow's first one creates mlflow.db (seconds)."""
    monkeypatch.chdir(tmp_path)
    programs = doc_programs()
    assert len(programs) == 3
    for program in programs:
        exec(compile(program, str(DOC), "exec"), {"__name__": "__doc__"})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("my-project").experiment_id])
    assert (run.info.run_name, run.info.status) == ("baseline", "FINISHED")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "gradguard/grad_norm")]
    assert sorted(steps) == list(range(1, 101))
    wandb_run = read_wandb_run(wandb_run_dir(tmp_path / "wandb-runs"))
    assert [h["gradguard/step"] for h in wandb_run.history] == list(range(1, 101))
    lines = (tmp_path / "steps.csv").read_text().splitlines()
    assert lines[0] == "step,loss,grad_norm,skipped,0,2"
    assert len(lines) == 21
