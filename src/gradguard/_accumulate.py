"""Gradient accumulation: what the micro-batches before an optimizer step leave behind.

With ``Guard(accumulation_steps=...)`` every micro-batch calls ``guard.step``; the calls
before the last only keep their loss (summed on the device), batch id and per-example
losses here, for the optimizer step that completes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class MicroBatches:
    """What the micro-batches of the optimizer step being accumulated left: on the device."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the kept micro-batches (a step consumed them, or they were abandoned)."""
        self.count = 0
        self.loss_sum: Tensor | None = None
        self.losses = 0
        self.batches: list[Any] = []
        self.sample_losses: list[Tensor] = []

    def accumulates(self, accumulation_steps: int | Callable[[], bool]) -> bool:
        """Whether this ``guard.step`` call is a micro-batch that only accumulates."""
        if isinstance(accumulation_steps, int):
            return self.count + 1 < accumulation_steps
        return not accumulation_steps()

    def add(self, loss: Tensor | None, batch: Any, sample_losses: Tensor | None) -> None:
        """Keep one micro-batch's loss (summed on the device), batch id and sample losses."""
        self.count += 1
        if loss is not None:
            loss = loss.reshape(())
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.losses += 1
        self.batches.append(batch)
        if sample_losses is not None:
            self.sample_losses.append(sample_losses.detach().reshape(-1))

    def merge(
        self, loss: Tensor | None, batch: Any, sample_losses: Tensor | None
    ) -> tuple[Tensor | None, Any, Tensor | None]:
        """The last micro-batch's values joined with the kept ones; forget the kept ones.

        The loss is the mean of the given losses (a NaN in any micro-batch makes it NaN),
        the batch id the list of the micro-batches' ids (None when none had one), and the
        per-example losses all the micro-batches' together.
        """
        self.add(None if loss is None else loss.detach().float(), batch, sample_losses)
        mean = None if self.loss_sum is None else self.loss_sum / self.losses
        batches = self.batches if any(b is not None for b in self.batches) else None
        samples = torch.cat(self.sample_losses) if self.sample_losses else None
        self.clear()
        return mean, batches, samples
