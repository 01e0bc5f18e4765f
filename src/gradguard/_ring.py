"""The guard's ring buffer: the statistics of the steps since the last drain, on the device.

Each step writes one fp32 row (the step's scalars, the per-layer and per-tensor norms, the
per-example loss summary) with device-to-device copies only; a drain copies the filled rows
to the host in one transfer and turns them into a :class:`~gradguard.records.Window`. What
is known on the host anyway (the LR when it is a float, the batch ids, which steps went
through the device path) is kept beside the rows, in plain lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradguard.errors import ConfigError
from gradguard.records import SAMPLE_COLUMNS, SAMPLE_TOP, StepReport, Window
from gradguard.stats import GradStats

_COLUMNS = ("loss", "loss_given", "grad_norm", "clipped_norm", "scale")
_FLAGS = ("skipped", "finite", "overflow", "zeroed")
_N_SCALARS = len(_COLUMNS) + len(_FLAGS) + 1  # + lr
_N_SAMPLES = len(SAMPLE_COLUMNS)


class StepBuffer:
    """Up to ``capacity`` steps of statistics on ``device``, and their host-side notes.

    Attributes:
        count: rows written since the last drain.
        on_device: per buffered step, whether its skip was decided on the device.
    """

    def __init__(
        self,
        capacity: int,
        layer_names: Sequence[str],
        tensor_names: Sequence[str],
        device: torch.device,
        constants: tuple[Tensor, Tensor],
    ) -> None:
        self.layer_names = tuple(layer_names)
        self.tensor_names = tuple(tensor_names)
        self.device = device
        n_layers = len(self.layer_names)
        width = _N_SCALARS + n_layers + len(self.tensor_names) + _N_SAMPLES
        self.rows = torch.zeros((capacity, width), dtype=torch.float32, device=device)
        # Each row as (scalars, per-layer, per-tensor, samples) views: no slicing per step.
        self._views = [
            (
                row[:_N_SCALARS],
                row[_N_SCALARS : _N_SCALARS + n_layers],
                row[_N_SCALARS + n_layers : -_N_SAMPLES],
                row[-_N_SAMPLES:],
            )
            for row in self.rows
        ]
        self.nan = torch.full((), math.nan, device=device)
        self.one = torch.ones((), device=device)
        self.zero = torch.zeros((), device=device)
        # The bool constants the statistics share (the layout's true and false): flags
        # that are these objects are written without a kernel.
        self._true, self._false = constants
        self.count = 0
        self.on_device: list[bool] = []
        self._lr: list[float] = []
        self._batch: list[Any] = []
        self._samples_given: list[bool] = []

    @property
    def width(self) -> int:
        """Values per row."""
        return int(self.rows.shape[1])

    def note(self, batch: Any, samples_given: bool) -> None:
        """Keep a step's batch id and whether it had per-example losses (host side)."""
        self._batch.append(batch)
        self._samples_given.append(samples_given)

    def record(
        self,
        report: StepReport,
        stats: GradStats,
        samples: Tensor | None,
        lr: Tensor | float,
        zeroed: Tensor | None,
    ) -> None:
        """Write one step's row: device copies only.

        ``lr`` is the first group's LR (already cooled); a float is kept on the host,
        exact in the logs. ``zeroed`` holds the per-tensor norms seen before the step's
        NaN gradients were zeroed (``nonfinite="zero"``).
        """
        flag = self._flag
        scalars, per_layer, per_tensor, sample_row = self._views[self.count]
        if isinstance(lr, Tensor):
            self._lr.append(math.nan)
            lr_value = lr.detach().reshape(()).to(self.device, torch.float32)
        else:
            self._lr.append(float(lr))
            lr_value = self.nan
        torch.stack(
            [
                self.nan if report.loss is None else report.loss.float(),
                self.zero if report.loss is None else self.one,
                report.grad_norm,
                report.clipped_norm,
                report.scale.float(),
                flag(report.skipped),
                flag(stats.finite) if zeroed is None else self.zero,
                flag(stats.overflow),
                self.zero if zeroed is None else self.one,
                lr_value,
            ],
            out=scalars,
        )
        per_layer.copy_(stats.per_layer)
        per_tensor.copy_(stats.per_tensor if zeroed is None else zeroed)
        if samples is not None:
            sample_row.copy_(samples)
        self.count += 1

    def _flag(self, flag: Tensor) -> Tensor:
        """A bool flag as fp32; the shared constants need no kernel."""
        if flag is self._true:
            return self.one
        if flag is self._false:
            return self.zero
        return flag.float()

    def filled(self) -> Tensor:
        """The rows written since the last drain, flattened (for the one drain transfer)."""
        return self.rows[: self.count].flatten()

    def window(
        self,
        host: np.ndarray[Any, Any],
        first_step: int,
        *,
        weight_norm: np.ndarray[Any, Any] | None,
        weight_norm_before: np.ndarray[Any, Any] | None,
        update_ratio: np.ndarray[Any, Any] | None,
        loss_scaled: bool,
    ) -> Window:
        """The host copy of the rows (``[n, width]``) as a Window; the notes are consumed."""
        n_layers = len(self.layer_names)
        host_lr = np.asarray(self._lr, dtype=np.float64)
        given = np.asarray(self._samples_given, dtype=bool)
        batch = tuple(self._batch)
        self._lr, self._batch, self._samples_given = [], [], []
        samples = None
        if given.any():
            samples = host[:, -_N_SAMPLES:].copy()
            samples[~given] = np.nan
        col = {name: host[:, i] for i, name in enumerate(_COLUMNS + _FLAGS)}
        return Window(
            steps=np.arange(first_step, first_step + host.shape[0], dtype=np.int64),
            loss=col["loss"],
            loss_given=col["loss_given"] > 0,
            grad_norm=col["grad_norm"],
            clipped_norm=col["clipped_norm"],
            scale=col["scale"],
            skipped=col["skipped"] > 0,
            finite=col["finite"] > 0,
            overflow=col["overflow"] > 0,
            zeroed=col["zeroed"] > 0,
            lr=np.where(np.isnan(host_lr), host[:, _N_SCALARS - 1], host_lr),
            per_layer=host[:, _N_SCALARS : _N_SCALARS + n_layers],
            per_tensor=host[:, _N_SCALARS + n_layers : -_N_SAMPLES],
            layer_names=self.layer_names,
            tensor_names=self.tensor_names,
            weight_norm=weight_norm,
            weight_norm_before=weight_norm_before,
            loss_scaled=loss_scaled,
            update_ratio=update_ratio,
            batch=batch if any(b is not None for b in batch) else None,
            samples=samples,
        )

    def discard(self) -> None:
        """Forget the buffered steps (a restored state replaces them)."""
        self.count = 0
        self.on_device, self._lr, self._batch, self._samples_given = [], [], [], []

    def sample_summary(self, sample_losses: Tensor) -> Tensor:
        """Median, spread, non-finite count, size and the largest losses, on the device."""
        check_sample_losses(sample_losses)
        values = sample_losses.detach().reshape(-1).to(self.device, torch.float32)
        n = values.numel()
        finite = torch.isfinite(values)
        kept = torch.where(finite, values, self.nan)
        median = torch.nanmedian(kept)
        spread = torch.nanmedian((kept - median).abs())
        k = min(SAMPLE_TOP, n)
        order = torch.where(torch.isnan(values), math.inf, values)
        positions = torch.topk(order, k).indices
        pad = self.nan.expand(SAMPLE_TOP - k)
        size = torch.full((), float(n), device=self.device)
        return torch.cat(
            [
                torch.stack([median, spread, (~finite).sum().float(), size]),
                values[positions],
                pad,
                positions.float(),
                pad,
            ]
        )


def check_sample_losses(sample_losses: object) -> None:
    """Refuse what :meth:`StepBuffer.sample_summary` could not summarise."""
    if not isinstance(sample_losses, Tensor) or sample_losses.numel() == 0:
        raise ConfigError(
            "sample_losses must be a non-empty tensor of per-example losses, e.g. "
            "F.cross_entropy(logits, y, reduction='none').detach()."
        )
