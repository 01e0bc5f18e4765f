"""Lightning: real ``Trainer.fit`` runs with injected faults skip exactly, log, add no syncs."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import Divergence
from gradguard.errors import ConfigError
from gradguard.testing import FaultInjector

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from gradguard.integrations.lightning import GradGuardCallback  # noqa: E402

pytestmark = [
    # Lightning 2.6 flattens the dataloaders with torch's LeafSpec, which torch 2.13
    # deprecates; it is Lightning's own call, harmless to the run.
    pytest.mark.filterwarnings(
        r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
    ),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_example.py"
STEPS = 50
LOG_EVERY = 10
POISONED = "net.2.weight"


class TinyRegressor(pl.LightningModule):
    def __init__(self, fused: bool = False, manual: bool = False, optimizers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fused = fused
        self.n_optimizers = optimizers
        self.automatic_optimization = not manual

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def configure_optimizers(self) -> Any:
        optimizers = [
            torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)
            for _ in range(self.n_optimizers)
        ]
        return optimizers[0] if self.n_optimizers == 1 else optimizers


def loader(n: int = 160) -> torch.utils.data.DataLoader[Any]:
    """``n / 4`` batches of 4: a multiple of 4, so every accumulation window is whole."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.sin(x[:, :1]) - x[:, 1:2]), batch_size=4
    )


class Faults(pl.Callback):
    """Injects faults per micro-batch; records whether each optimizer step changed anything."""

    def __init__(self, at: dict[int, Any]) -> None:
        self.at = at
        self.changed: dict[int, bool] = {}  # optimizer step (1-based) -> weights or state moved
        self._context: contextlib.ExitStack | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]  # the raw one: this callback runs before the guard's
        self.injector = FaultInjector(
            pl_module.net, optimizer, at=self.at, parameter=POISONED[4:], lr_factor=1e3
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._context = contextlib.ExitStack()
        self._context.enter_context(self.injector.step())
        if idx % trainer.accumulate_grad_batches == 0:
            self.before = snapshot(pl_module, trainer.optimizers[0])

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        assert self._context is not None
        self._context.close()
        if (idx + 1) % trainer.accumulate_grad_batches == 0:
            after = snapshot(pl_module, trainer.optimizers[0])
            moved = any(not torch.equal(a, b) for a, b in zip(self.before, after, strict=True))
            self.changed[trainer.global_step] = moved


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [
        v.detach().clone()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    ]
    return [p.detach().clone() for p in module.parameters()] + state


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": CSVLogger(tmp_path, name="run"),
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }
    return pl.Trainer(**(options | kwargs))


def csv_rows(fit: Any) -> list[dict[str, str]]:
    with open(Path(fit.logger.log_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], name: str) -> dict[int, float]:
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name)}


def guard_alone_sync_count(steps: int, bad: set[int], fused: bool) -> int:
    """What the guard by itself costs for ``steps`` steps with ``bad`` non-finite ones."""
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), fused=fused)
    guard = gg.Guard(model, optimizer, log_every=LOG_EVERY)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        if step in bad:
            model.weight.grad[0, 0] = float("nan")
        guard.step()
    guard.close()
    return guard.sync_count


def assert_skipped_exactly(fit: Any, faults: Faults, callback: Any, skipped: set[int]) -> None:
    guard = callback.guard
    module = fit.lightning_module
    assert fit.global_step == STEPS
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    # weights and optimizer state bitwise equal across each skipped step, moved at the others
    assert {step for step, moved in faults.changed.items() if not moved} == skipped
    assert len(faults.changed) == STEPS
    # Lightning logs optimizer step s (1-based) at step s - 1, training_step's own; the
    # guard numbers its steps, events and rows the same way
    rows = csv_rows(fit)
    flags = logged(rows, "gradguard/skipped")
    assert len(flags) == STEPS
    lightning_steps = {s - 1 for s in skipped}
    assert {step for step, flag in flags.items() if flag} == lightning_steps
    assert set(logged(rows, "gradguard/event/nonfinite")) == lightning_steps
    assert [e.step for e in guard.events if e.kind == "nonfinite"] == sorted(lightning_steps)
    assert set(logged(rows, "train_loss")) == set(range(STEPS))  # the steps Lightning logs
    # no host sync beyond the guard's own
    assert guard.sync_count == guard_alone_sync_count(STEPS, skipped, guard.fused)
    assert not isinstance(fit.optimizers[0], gg.GuardedOptimizer)  # handed back after fit


@pytest.mark.parametrize(
    ("precision", "fused"),
    [("32-true", False), ("32-true", True), ("bf16-mixed", False)],
    ids=["fp32", "fp32-fused", "bf16-mixed"],
)
def test_fit_skips_faulted_steps_exactly(
    tmp_path: Path, precision: str, fused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    faults = Faults({5: "nan", 17: "inf", 33: "loss"})
    callback = GradGuardCallback(log_every=LOG_EVERY)
    fit = trainer(tmp_path, [faults, callback], precision=precision)
    with caplog.at_level(logging.WARNING, logger="gradguard"):
        fit.fit(TinyRegressor(fused=fused), loader())
    assert_skipped_exactly(fit, faults, callback, {5, 17, 33})
    assert callback.guard.fused is fused
    assert sum("nonfinite" in r.getMessage() for r in caplog.records) == 3
    rows = csv_rows(fit)
    # the loss the guard logs is the one training_step logged, NaN included
    assert logged(rows, "gradguard/loss").keys() == logged(rows, "train_loss").keys()
    for step, loss in logged(rows, "train_loss").items():
        assert logged(rows, "gradguard/loss")[step] == pytest.approx(loss, nan_ok=True)
    assert str(logged(rows, "gradguard/loss")[32]) == "nan"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_accumulation_counts_faults_in_any_micro_batch(tmp_path: Path, precision: str) -> None:
    # micro-batches 9, 22 and 40 are the 1st, 2nd and 4th of optimizer steps 3, 6 and 10
    faults = Faults({9: "nan", 22: "inf", 40: "nan"})
    callback = GradGuardCallback(log_every=LOG_EVERY)
    fit = trainer(tmp_path, [faults, callback], precision=precision, accumulate_grad_batches=4)
    fit.fit(TinyRegressor(), loader())
    assert_skipped_exactly(fit, faults, callback, {3, 6, 10})
    assert callback.guard.step_count == STEPS - 1  # numbered from 0, as Lightning logs


def test_run_directory_steps_are_lightning_logged_steps(tmp_path: Path) -> None:
    faults = Faults({5: "loss"})  # optimizer step 5: training_step at global_step 4
    callback = GradGuardCallback(log_every=LOG_EVERY, run_dir=tmp_path / "gg", tensorboard=False)
    fit = trainer(tmp_path, [faults, callback])
    fit.fit(TinyRegressor(), loader())
    events_file = (tmp_path / "gg" / "events.jsonl").read_text()
    events = [json.loads(line) for line in events_file.splitlines()]
    nonfinite = [e["step"] for e in events if e["kind"] == "nonfinite"]
    rows = csv_rows(fit)
    nan_loss_steps = [s for s, v in logged(rows, "train_loss").items() if math.isnan(v)]
    assert nonfinite == nan_loss_steps == list(logged(rows, "gradguard/event/nonfinite")) == [4]
    metrics = (tmp_path / "gg" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(STEPS))


def test_manual_optimization_is_guarded_too(tmp_path: Path) -> None:
    faults = Faults({7: "nan"})
    callback = GradGuardCallback(log_every=LOG_EVERY)
    fit = trainer(tmp_path, [faults, callback])
    fit.fit(TinyRegressor(manual=True), loader())
    assert_skipped_exactly(fit, faults, callback, {7})


def test_divergence_stops_the_fit(tmp_path: Path) -> None:
    faults = Faults({21: "lr"})  # the LR x1000 from step 21 on: a real divergence
    callback = GradGuardCallback(
        log_every=LOG_EVERY, detectors=[Divergence(tolerance=0.5, patience=2)]
    )
    fit = trainer(tmp_path, [faults, callback])
    fit.fit(TinyRegressor(), loader())
    assert callback.guard is not None
    assert [e.kind for e in callback.guard.events] == ["divergence"]
    assert fit.global_step == 40  # the drain that raised it: two bad drains after step 20


def test_guard_state_rides_in_lightning_checkpoints(tmp_path: Path) -> None:
    faults = Faults({4: "nan"})
    first = GradGuardCallback(log_every=LOG_EVERY)
    fit = trainer(tmp_path, [faults, first], max_steps=20)
    fit.fit(TinyRegressor(), loader(80))  # one epoch: Lightning resumes cleanly from its end
    fit.save_checkpoint(tmp_path / "last.ckpt")
    resumed = GradGuardCallback(log_every=LOG_EVERY)
    again = trainer(tmp_path, [resumed], max_steps=30)
    again.fit(TinyRegressor(), loader(80), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.guard is not None
    assert resumed.guard.step_count == 29  # the last step's number: its training_step's
    assert [(e.step, e.kind) for e in resumed.guard.events] == [(3, "nonfinite")]
    steps = logged(csv_rows(again), "gradguard/skipped")
    assert min(steps) == 20  # Lightning's count goes on; the guard's agrees with it


def test_bad_configurations_fail_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheduler"):
        GradGuardCallback(scheduler=None)
    with pytest.raises(ConfigError, match="unknown option 'clipping'"):
        GradGuardCallback(clipping=gg.NormClip(1.0))
    clipped = trainer(tmp_path, [GradGuardCallback(clip=gg.NormClip(1.0))], gradient_clip_val=1.0)
    with pytest.raises(ConfigError, match="gradient_clip_val=None"):
        clipped.fit(TinyRegressor(), loader())
    several = trainer(tmp_path, [GradGuardCallback()])
    with pytest.raises(ConfigError, match="guards one optimizer; configure_optimizers returned 2"):
        several.fit(TinyRegressor(manual=True, optimizers=2), loader())
    # Trainer(precision="16-mixed") falls back to bf16 on a CPU; the plugin keeps fp16
    fp16 = trainer(tmp_path, [GradGuardCallback()], plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(ConfigError, match="bf16-mixed"):
        fp16.fit(TinyRegressor(), loader())


def test_example_runs_and_reports_the_skipped_steps(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "30", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    # batches 10, 20 and 30 ran their training_step at Lightning's steps 9, 19 and 29
    assert "skipped steps: [9, 19, 29] (3 in Lightning's log)" in completed.stdout
