"""Sinks: the JSONL run directory (resume, torn lines) and TensorBoard, read back for real."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import gradguard as gg
from conftest import make_model
from gradguard.errors import ConfigError
from gradguard.sinks import (
    STEP_SCALARS,
    JsonlSink,
    TensorBoardSink,
    layer_family,
    layer_tag,
    read_jsonl,
)
from gradguard.testing import FaultInjector


def train(
    guard: gg.Guard,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    faults: dict[int, Any] | None = None,
    no_loss: frozenset[int] = frozenset(),
) -> None:
    injector = FaultInjector(model, optimizer, at=faults or {}, parameter="2.weight")
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=g)
        y = x[:, :1] - 2 * x[:, 1:2]
        with injector.step():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            guard.step(None if step in no_loss else loss)


def accumulator(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# --- TensorBoard -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real guarded run: clipping, an LR schedule, two NaN steps, steps without a loss."""
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)
    guard = gg.Guard(
        model, optimizer, clip=gg.NormClip(0.5), scheduler=scheduler, log_every=8, run_dir=run_dir
    )
    train(guard, model, optimizer, 43, faults={12: "nan", 30: "inf"}, no_loss=frozenset({5, 6, 40}))
    guard.close()
    return run_dir


def test_guard_with_run_dir_writes_tensorboard_by_default(tb_run: Path) -> None:
    files = list((tb_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1


def test_tensorboard_scalars_equal_metrics_jsonl(tb_run: Path) -> None:
    """The Must-show: every step scalar read back by EventAccumulator equals metrics.jsonl.

    TensorBoard stores scalars as fp32; every statistic is fp32 already (the guard's ring
    buffer), so they compare exactly; the LR, a host float, compares at fp32 precision.
    """
    rows = read_jsonl(tb_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 44))
    assert sum(r["skipped"] for r in rows) == 2
    assert sum(r["scale"] < 1.0 for r in rows) > 5  # clipping happened: clipped_norm differs
    assert len({r["lr"] for r in rows}) > 3
    acc = accumulator(tb_run / "tensorboard")
    for field in STEP_SCALARS:
        expected = [
            (r["step"], float(np.float32(float(r[field])))) for r in rows if r[field] is not None
        ]
        got = [(e.step, e.value) for e in acc.Scalars(f"gradguard/{field}")]
        assert [s for s, _ in got] == [s for s, _ in expected], field
        for (step, value), (_, want) in zip(got, expected, strict=True):
            assert same(value, want), (field, step, value, want)
    loss_steps = [e.step for e in acc.Scalars("gradguard/loss")]
    assert {5, 6, 40}.isdisjoint(loss_steps)
    assert len(loss_steps) == 40
    assert [e.value for e in acc.Scalars("gradguard/skipped")].count(1.0) == 2


def test_tensorboard_layer_norms_equal_layers_jsonl(tb_run: Path) -> None:
    meta = json.loads((tb_run / "meta.json").read_text())
    layers = read_jsonl(tb_run / "layers.jsonl")
    acc = accumulator(tb_run / "tensorboard")
    for j, name in enumerate(meta["layer_names"]):
        got = acc.Scalars(layer_tag(name))
        assert [e.step for e in got] == [r["step"] for r in layers]
        for event, row in zip(got, layers, strict=True):
            assert same(event.value, float(np.float32(float(row["norms"][j]))))
    nan_row = next(r for r in layers if r["step"] == 12)
    assert nan_row["norms"][1] == "nan"  # the NaN went into layer "2"
    assert math.isnan(acc.Scalars("layers/*/2")[11].value)


def test_tensorboard_events_as_text_and_family_layout(tb_run: Path) -> None:
    events = read_jsonl(tb_run / "events.jsonl")
    assert [e["step"] for e in events if e["kind"] == "nonfinite"] == [12, 30]
    acc = accumulator(tb_run / "tensorboard")
    texts = {
        t.step: t.tensor_proto.string_val[0].decode()
        for t in acc.Tensors("gradguard/events/text_summary")
    }
    assert sorted(texts) == sorted({e["step"] for e in events})
    for event in events:
        assert f"**{event['kind']}**" in texts[event["step"]]
    assert "**nonfinite** in `2.weight`" in texts[12]
    assert "**nonfinite** in `2.weight` (warning):" in texts[12]
    config = acc.Tensors("gradguard/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "NormClip(max_norm=0.5" in config
    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    charts = {c.title: [chart.title for chart in c.chart] for c in layout.category}
    # a Sequential's layers are one family: one chart with a line per layer
    assert charts["gradient norm by layer family"] == ["*"]


def test_scalars_are_written_only_at_drains(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, log_every=10, run_dir=tmp_path)
    sink = guard.sinks[1]
    assert isinstance(sink, TensorBoardSink)
    train(guard, model, optimizer, 9)
    sink.flush()
    assert "gradguard/grad_norm" not in accumulator(tmp_path / "tensorboard").Tags()["scalars"]
    train(guard, model, optimizer, 1)  # the tenth step drains
    sink.flush()
    steps = [e.step for e in accumulator(tmp_path / "tensorboard").Scalars("gradguard/grad_norm")]
    assert steps == list(range(1, 11))
    guard.close()


def test_histograms_every_n_drains(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = TensorBoardSink(tmp_path / "tb", histograms_every=2)
    guard = gg.Guard(model, optimizer, log_every=5, sinks=[sink])
    train(guard, model, optimizer, 30, faults={10: "nan"})  # the NaN is the 2nd drain's last
    guard.close()
    histograms = accumulator(tmp_path / "tb").Histograms("layers/log10_grad_norm")
    assert [h.step for h in histograms] == [10, 20, 30]
    assert [(e.step, e.kind) for e in guard.events] == [(10, "nonfinite")]
    assert histograms[0].histogram_value.num == 2  # the NaN layer is left out of the three
    assert histograms[1].histogram_value.num == 3


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("encoder.layers.11.self_attn.out_proj", "encoder.layers.*.self_attn.out_proj"),
        ("encoder.layers.0.linear1", "encoder.layers.*.linear1"),
        ("encoder.norm", "encoder"),
        ("lm_head", "(top)"),
        ("(root)", "(top)"),
        ("4", "*"),
        ("blocks.2.0", "blocks.*.*"),
    ],
)
def test_layer_family(name: str, family: str) -> None:
    assert layer_family(name) == family
    assert layer_tag(name) == f"layers/{family}/{name}"


def test_transformer_families_keep_the_dashboard_small() -> None:
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        model = nn.Transformer(
            d_model=8, nhead=2, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=16
        )
    names = gg.stats.layout_for(model).layer_names
    families = {layer_family(n) for n in names}
    assert len(names) == 6 * 6 + 6 * 9 + 2
    assert len(families) == 6 + 9 + 2  # one chart per kind of layer, a line per depth


def test_tensorboard_false_never_and_true_without_run_dir_refused(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, run_dir=tmp_path, tensorboard=False)
    assert not (tmp_path / "tensorboard").exists()
    assert [type(s) for s in guard.sinks] == [JsonlSink]
    guard.close()
    with pytest.raises(ConfigError, match="run_dir"):
        gg.Guard(model, optimizer, tensorboard=True)
    with pytest.raises(ConfigError, match="histograms_every"):
        TensorBoardSink(tmp_path, histograms_every=-1)


def test_missing_tensorboard_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, run_dir=tmp_path / "auto")
    assert [type(s) for s in guard.sinks] == [JsonlSink]  # None: only when installed
    guard.close()
    with pytest.raises(ConfigError, match=r"pip install 'gradguard\[tensorboard\]'"):
        gg.Guard(model, optimizer, run_dir=tmp_path / "required", tensorboard=True)


# --- JSONL ---------------------------------------------------------------------------------


def test_jsonl_resume_appends_fresh_run_refused_overwrite_replaces(tmp_path: Path) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, optimizer, log_every=5, run_dir=tmp_path, tensorboard=False)
    train(guard, model, optimizer, 10)
    saved = guard.state_dict()
    guard.close()
    fresh = gg.Guard(model, optimizer, log_every=5, run_dir=tmp_path, tensorboard=False)
    with pytest.raises(ConfigError, match=r"already holds the logs of another run \(10 steps\)"):
        train(fresh, model, optimizer, 1)
    fresh.close()
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 10  # nothing appended
    resumed = gg.Guard(model, optimizer, log_every=5, run_dir=tmp_path, tensorboard=False)
    resumed.load_state_dict(saved)
    train(resumed, model, optimizer, 5)
    resumed.close()
    steps = [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 16))
    assert len(read_jsonl(tmp_path / "layers.jsonl")) == 15
    sessions = json.loads((tmp_path / "meta.json").read_text())["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 10]
    replaced = gg.Guard(
        model, optimizer, log_every=5, run_dir=tmp_path, tensorboard=False, overwrite_run_dir=True
    )
    train(replaced, model, optimizer, 5)
    replaced.close()
    assert [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [s["start_step"] for s in meta["sessions"]] == [0]
    other = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ConfigError, match="another model"):
        gg.Guard(other, torch.optim.SGD(other.parameters(), lr=0.1), run_dir=tmp_path)


def test_read_jsonl_ignores_a_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_jsonl_write_before_open_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="before open"):
        JsonlSink(tmp_path).write(None, [])  # type: ignore[arg-type]
