"""Thin adapters that put a :class:`gradguard.Guard` inside trainers that step for you.

- :mod:`gradguard.integrations.lightning`: ``GradGuardCallback`` for ``lightning.Trainer``.
- :mod:`gradguard.integrations.transformers`: ``GradGuardCallback`` for
  ``transformers.Trainer``.
- :mod:`gradguard.integrations.accelerate`: ``prepare_guard`` for loops written with
  ``accelerate.Accelerator``, gradient accumulation included.

The two callbacks work the same way: when training starts they build the guard for the trainer's
model and optimizer and swap the optimizer the trainer steps for the guard's wrapped
one, so the trainer's own ``optimizer.step()`` runs ``guard.step(loss)``. Skips are then
the guard's exact skips. Neither adapter reads a device value on the host: the loss
reaches the guard as a device tensor and the logs are written at the guard's drains.
See ``docs/integrations.md``.

This module imports neither framework; each submodule imports its own. What the adapters
share (``check_guard_options``, ``LossFedOptimizer``, ...) is in the private
``gradguard.integrations._common`` and is not public API.
"""

from __future__ import annotations

from gradguard.integrations._common import LossFedOptimizer as LossFedOptimizer
from gradguard.integrations._common import check_guard_options as check_guard_options
