"""A Lightning fit guarded by gradguard: one callback measures, clips, skips and logs.

A tiny regression MLP trains on synthetic data; every 10th step gets a fault injected
(a NaN gradient, an Inf gradient, a NaN loss in turn), and the guard skips those steps
exactly. The guard's scalars land in Lightning's CSV log. Run:

    python examples/lightning_example.py --steps 100 --out runs/lightning
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import gradguard as gg
from gradguard.integrations.lightning import GradGuardCallback
from gradguard.testing import FaultInjector


class Regressor(pl.LightningModule):
    """A small MLP fitting y = sin(x0) - x1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean squared error on one batch."""
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; the callback guards it."""
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class InjectFaults(pl.Callback):
    """Every 10th batch: a NaN gradient, an Inf gradient or a NaN loss (for the demo)."""

    def __init__(self, steps: int) -> None:
        kinds = ("nan", "inf", "loss")
        self.at: dict[int, Any] = {s: kinds[(s // 10 - 1) % 3] for s in range(10, steps + 1, 10)}
        self._context = contextlib.ExitStack()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the injector on the model being trained."""
        net = (
            pl_module.net
        )  # training_step calls the net, so its output is what a "loss" fault hits
        self.injector = FaultInjector(net, at=self.at, parameter="2.weight")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Arm this batch's fault, if any."""
        self._context.enter_context(self.injector.step())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Disarm it."""
        self._context.close()


def main() -> None:
    """Fit for ``--steps`` steps under the guard; print what was skipped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, torch.sin(x[:, :1]) - x[:, 1:2])
    torch.manual_seed(0)

    guard_callback = GradGuardCallback(clip=gg.ZClip(), log_every=10)  # the one line
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",  # supported; so are "32-true" and accumulate_grad_batches
        gradient_clip_val=None,  # the guard clips (and logs the norm before clipping)
        logger=CSVLogger(args.out, name="example"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[InjectFaults(args.steps), guard_callback],
    )
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))

    guard = guard_callback.guard
    assert guard is not None
    skipped = [e.step for e in guard.events if e.kind == "nonfinite"]
    with open(Path(trainer.log_dir or args.out) / "metrics.csv", newline="") as handle:
        logged = sum(float(r["gradguard/skipped"] or 0) for r in csv.DictReader(handle))
    # the guard numbers steps as Lightning logs them: the global_step of their training_step
    print(f"skipped steps: {skipped} ({int(logged)} in Lightning's log)")
    model = trainer.lightning_module
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with torch.no_grad():
        final = nn.functional.mse_loss(model.net(data.tensors[0]), data.tensors[1])
    print(f"final loss {float(final):.4f}; weights finite: {finite}")
    print(f"host syncs by the guard: {guard.sync_count} over {trainer.global_step} steps")


if __name__ == "__main__":
    main()
