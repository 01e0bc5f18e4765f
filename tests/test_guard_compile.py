"""Guard under torch.compile: a compiled train step (inductor, CPU) skips and logs as eagerly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gradguard as gg
from conftest import mlp
from gradguard.stats import grad_stats, own_name, uncompiled

# Dynamo reads the loss's .grad when it resumes after the backward() graph break: its own
# warning, raised as an error by the suite's filter, never reached by gradguard's code.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
)

NAN_STEP = 6  # the guard's step (1-based) whose batch holds a NaN
STEPS = 12


def make_model() -> nn.Module:
    return mlp(6, 16, 16, 1, activations=("tanh", "relu"))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(32, 6, generator=g)
    y = x[:, :1] - 0.5 * x[:, 1:2]
    if step == NAN_STEP:
        x[3, 2] = float("nan")
    return x, y


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


Weights = dict[str, torch.Tensor]


def train(run_dir: Path, compiled: bool) -> tuple[list[gg.StepReport], list[Weights]]:
    """Train STEPS steps; return the reports and the weights after each step."""
    model = make_model()
    net = torch.compile(model, backend="inductor") if compiled else model
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    guard = gg.Guard(
        net, optimizer, clip=gg.NormClip(0.5), log_every=4, run_dir=run_dir, tensorboard=True
    )

    def train_step(x: torch.Tensor, y: torch.Tensor) -> gg.StepReport:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return guard.step(loss)

    step_fn: Callable[..., gg.StepReport] = (
        torch.compile(train_step, backend="inductor") if compiled else train_step
    )
    reports, weights, graphs = [], [], []
    for step in range(1, STEPS + 1):
        reports.append(step_fn(*batch(step)))
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        graphs.append(counters["stats"]["unique_graphs"])
    guard.close()
    if compiled:
        # graphs were compiled, and none again after the first steps: no recompilation
        # per step (the guard's changing state never enters a graph)
        assert graphs[0] >= 1
        assert graphs[-1] == graphs[NAN_STEP + 1] == graphs[2], graphs
    return reports, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch._dynamo.reset()
    root = tmp_path_factory.mktemp("compile")
    eager = train(root / "eager", compiled=False)
    compiled = train(root / "compiled", compiled=True)
    return {"root": root, "eager": eager, "compiled": compiled}


@pytest.mark.slow
def test_compiled_train_step_skips_the_nan_step_and_keeps_the_weights(
    runs: dict[str, Any],
) -> None:
    reports, weights = runs["compiled"]
    skipped = [int(r.step) for r in reports if bool(r.skipped)]
    assert skipped == [NAN_STEP]
    before, after = weights[NAN_STEP - 2], weights[NAN_STEP - 1]
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert all(torch.isfinite(v).all() for v in weights[-1].values())
    # the steps around the skip did update the weights
    assert not torch.equal(weights[NAN_STEP]["0.weight"], weights[NAN_STEP - 1]["0.weight"])


@pytest.mark.slow
def test_compiled_run_logs_the_events_and_metrics_of_the_eager_run(runs: dict[str, Any]) -> None:
    eager_dir, compiled_dir = runs["root"] / "eager", runs["root"] / "compiled"
    eager_events = read_rows(eager_dir / "events.jsonl")
    compiled_events = read_rows(compiled_dir / "events.jsonl")
    assert [(e["step"], e["kind"], e.get("cause"), e["layers"]) for e in compiled_events] == [
        (e["step"], e["kind"], e.get("cause"), e["layers"]) for e in eager_events
    ]
    assert any(e["kind"] == "nonfinite" and e["step"] == NAN_STEP for e in compiled_events)
    eager_rows = read_rows(eager_dir / "metrics.jsonl")
    compiled_rows = read_rows(compiled_dir / "metrics.jsonl")
    assert [r["step"] for r in compiled_rows] == list(range(1, STEPS + 1))
    for e, c in zip(eager_rows, compiled_rows, strict=True):
        assert (c["step"], c["skipped"], c["finite"]) == (e["step"], e["skipped"], e["finite"])
        for field in ("loss", "grad_norm", "clipped_norm", "scale"):
            if e[field] == "nan":
                assert c[field] == "nan", (c["step"], field)
            else:
                # inductor fuses the forward and backward kernels: the same math, another
                # summation order, so values agree to float32 rounding, not bit for bit
                assert c[field] == pytest.approx(e[field], rel=1e-4, abs=1e-7), (c["step"], field)
    meta_eager = json.loads((eager_dir / "meta.json").read_text())
    meta_compiled = json.loads((compiled_dir / "meta.json").read_text())
    assert meta_compiled["layer_names"] == meta_eager["layer_names"] == ["0", "2", "4"]


@pytest.mark.slow
def test_no_compile_wrapper_name_anywhere_in_the_run_directory(runs: dict[str, Any]) -> None:
    files = [p for p in (runs["root"] / "compiled").rglob("*") if p.is_file()]
    assert any(p.parent.name == "tensorboard" for p in files)  # event files are searched too
    assert len(files) >= 5
    for path in files:
        assert b"_orig_mod" not in path.read_bytes(), path


def test_compiled_model_is_measured_under_its_own_names() -> None:
    model = make_model()
    compiled = torch.compile(model)
    assert uncompiled(compiled) is model
    assert uncompiled(model) is model
    x, y = batch(1)
    nn.functional.mse_loss(model(x), y).backward()
    stats = grad_stats(compiled)
    assert stats.names == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert torch.equal(stats.total, grad_stats(model).total)
    guard = gg.Guard(compiled, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.model is model
    assert guard.layer_names == ("0", "2", "4")
    guard.close()


def test_compiled_submodules_lose_the_wrapper_segment_in_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    model[0] = torch.compile(model[0])  # type: ignore[assignment]
    assert own_name("0._orig_mod.weight") == "0.weight"
    assert own_name("encoder._orig_mod_x.w") == "encoder._orig_mod_x.w"
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.tensor_names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert guard.layer_names == ("0", "2")
    model(torch.randn(3, 4)).sum().backward()
    report = guard.step()
    assert not bool(report.skipped)
    guard.close()


def test_guard_methods_stay_out_of_compiled_graphs() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, log_every=2)

    @torch.compile(backend="eager")
    def step_and_drain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
        events = guard.flush()
        return loss * len(events)

    for step in range(1, 4):
        optimizer.zero_grad()
        step_and_drain(*batch(step if step != 2 else NAN_STEP))
    assert guard.step_count == 3
    assert [e.kind for e in guard.events].count("nonfinite") == 1
    guard.close()
