"""How the guard steps an optimizer: skips decided on the device, priming, scheduler replay.

Fused optimizers (``fused=True``) honour a ``found_inf`` flag on the device, as they do for
``GradScaler``: a step whose flag is set changes nothing, so the guard can skip a
non-finite step without reading anything on the host. Two things make that exact:

- **priming**: a fused first step that ``found_inf`` cancels would still create the
  optimizer's state, so the state is created beforehand with a cancelled step;
- **scheduler replay**: the scheduler is stepped after every device-path step before
  anyone knows whether it was skipped; at the drain, a window that held a skip replays
  the scheduler from the window's start, once per step taken.

The LR cool-down of a recovery scales the groups' LR around the optimizer step only. A
non-finite step found on the host is skipped, raised or has its offending gradients zeroed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradguard._amp import merge_found_inf, scaler_found_inf
from gradguard._flat import FlatGrads
from gradguard.errors import GradGuardError
from gradguard.protocols import ClipPolicy
from gradguard.records import BoolArray
from gradguard.stats import GradStats, grad_stats


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose fused step honours ``found_inf`` on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_with_found_inf(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """One fused step that changes nothing where ``found_inf`` is set (no host read)."""
    opt: Any = optimizer
    opt.grad_scale, opt.found_inf = None, found_inf
    try:
        optimizer.step()
    finally:
        del opt.grad_scale, opt.found_inf


def prime_fused_state(optimizer: torch.optim.Optimizer, device: torch.device) -> bool:
    """Create the optimizer's state with a cancelled fused step; False where it cannot.

    A fused first step that ``found_inf`` cancels would still create state (and SGD's
    momentum buffers would hold uninitialised memory). Creating it beforehand with a
    cancelled step gives the state a real first step starts from: zero moments, step 0,
    and for SGD zero momentum buffers, which equal "no buffer yet" when ``dampening == 0``;
    with dampening the state cannot be primed (False: the first step reads the host).
    """
    missing = [
        p
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None and p not in optimizer.state
    ]
    if not missing:
        return True
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if is_sgd and any(g["momentum"] and g["dampening"] for g in optimizer.param_groups):
        return False
    step_with_found_inf(optimizer, torch.ones((), device=device))
    if is_sgd:
        for p in missing:
            buffer = optimizer.state[p].get("momentum_buffer")
            if buffer is not None:
                buffer.zero_()
    return True


@contextlib.contextmanager
def cooled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Scale every group's LR by ``factor`` for the optimizer step only.

    Schedulers never see the factor (chainable ones compute from the groups' current LR),
    so the schedule resumes untouched when a cool-down ends.
    """
    if factor == 1.0:
        yield
        return
    groups = optimizer.param_groups
    saved = [g["lr"] for g in groups]
    for group, lr in zip(groups, saved, strict=True):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(groups, saved, strict=True):
            group["lr"] = lr


def scheduler_state(scheduler: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The scheduler and the groups' settings at a window's start, for :func:`replay_scheduler`."""
    return {
        "scheduler": scheduler.state_dict(),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    }


def replay_scheduler(
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    start: dict[str, Any],
    skipped: BoolArray,
    skipped_on_device: BoolArray,
) -> None:
    """After a skipped device-path step: rewind to ``start``, step once per step taken.

    A device-path step steps the scheduler before anyone knows whether it was skipped;
    the replay leaves the scheduler where skip-aware stepping would have.
    """
    if not np.any(skipped_on_device):
        return
    scheduler.load_state_dict(start["scheduler"])
    for group, saved in zip(optimizer.param_groups, start["groups"], strict=True):
        group.update(saved)  # schedulers chain from the groups' current values
    for _ in range(int((~skipped).sum())):
        scheduler.step()


def bad_tensors(stats: GradStats) -> list[str]:
    """The names of the tensors whose gradient norm is not finite (one host read)."""
    positions = torch.nonzero(~torch.isfinite(stats.per_tensor)).flatten().tolist()
    return [stats.names[i] for i in positions]


def nonfinite_message(step: int, names: Sequence[str]) -> str:
    """The error of ``nonfinite="raise"``: where the NaN/Inf is, and what to do."""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (
        f"step {step}: non-finite gradients (NaN/Inf) in {shown}. Lower the "
        "learning rate or clip gradients (e.g. clip=gg.NormClip(1.0)); check the loss for "
        "log(0) or division by zero; under fp16 use a GradScaler or bf16. Use "
        "nonfinite='skip' to skip such steps instead of raising."
    )


def zero_nonfinite(
    stats: GradStats, names: Sequence[str], model: nn.Module, process_group: Any = None
) -> GradStats:
    """Zero the gradients of the tensors ``names`` only (``nonfinite="zero"``); measure again."""
    bad = set(names)
    for name, grad in zip(stats.names, stats.grads, strict=True):
        if grad is not None and name in bad:
            grad.zero_()
    return grad_stats(
        model, resolve=True, loss=stats.loss, process_group=process_group, fingerprint=False
    )


class StepPaths:
    """The guard's two ways to step the optimizer, as part of :class:`gradguard.Guard`.

    The device path (a fused optimizer, ``nonfinite="skip"``) clips and steps with
    ``found_inf`` and reads nothing on the host; the read path reads one flag per step and
    then skips, raises, or zeroes the offending gradients (``nonfinite``), as
    ``GradScaler.step`` does. Both leave weights and optimizer state bitwise unchanged on
    a skipped step. The attributes are the guard's.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    clip: ClipPolicy | None
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    nonfinite: str
    process_group: Any
    device: torch.device
    lr_factor: float
    sync_count: int
    step_count: int
    _raise_after: GradGuardError | None
    _zeroed: Tensor | None
    _one: Tensor
    _zero: Tensor
    _true: Tensor
    _false: Tensor
    flat_grads: FlatGrads | None

    def zero_grad(self) -> None:
        """Zero the gradients before the next backward.

        With ``flat_grads=True``: zero each flat buffer in one kernel and keep every
        ``.grad`` its view (re-attaching any view a ``set_to_none`` zeroing dropped).
        Otherwise ``optimizer.zero_grad()``: gradients set to None, torch's default.
        """
        if self.flat_grads is not None:
            self.flat_grads.zero_()
        else:
            self.optimizer.zero_grad()

    def _clip(self, stats: GradStats) -> Tensor:
        return self._one if self.clip is None else self.clip.clip_(stats)

    def _step_on_device(self, stats: GradStats) -> tuple[Tensor, Tensor]:
        """Fused path: clip and step with ``found_inf``; nothing is read on the host."""
        scale = self._clip(stats)
        found_inf = self._zero if stats.finite is self._true else (~stats.finite).float()
        if self.scaler is not None:
            found_inf = merge_found_inf(self.scaler, self.optimizer, found_inf)
            with cooled_lr(self.optimizer, self.lr_factor):
                self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            with cooled_lr(self.optimizer, self.lr_factor):
                step_with_found_inf(self.optimizer, found_inf)
        if self.scheduler is not None:
            self.scheduler.step()  # undone at the drain if this step turns out skipped
        return found_inf > 0, scale

    def _step_with_read(self, stats: GradStats) -> tuple[GradStats, Tensor, Tensor]:
        """Non-fused path (and raise/zero modes): one host read decides the step."""
        self.sync_count += 1
        if self.scaler is None and stats.finite_on_host:  # read already (CPU): no kernel
            bad = False
        else:
            flags = ~stats.finite
            if self.scaler is not None:
                flags = flags | (scaler_found_inf(self.scaler, self.optimizer, self.device) > 0)
            bad = bool(flags)  # sync: the one read per step, as GradScaler.step makes
        if bad:
            stats, proceed = self._nonfinite_step(stats)
            if not proceed:
                if self.scaler is not None:
                    self.scaler.update()
                return stats, self._true, self._one
        scale = self._clip(stats)
        with cooled_lr(self.optimizer, self.lr_factor):
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return stats, self._false, scale

    def _nonfinite_step(self, stats: GradStats) -> tuple[GradStats, bool]:
        """Rare path, after the read said something is off: decide whether to step."""
        stats = stats.resolve()  # sync: tells NaN/Inf elements from an overflowed norm
        self.sync_count += 1
        if not stats.finite_on_host:
            if self.nonfinite == "raise":  # skipped and logged first, raised after the record
                names = bad_tensors(stats)  # sync: only on a non-finite step
                self.sync_count += 1
                self._raise_after = GradGuardError(nonfinite_message(self.step_count, names))
                return stats, False
            if self.nonfinite == "skip":
                return stats, False
            self._zeroed = stats.per_tensor  # the log keeps what was seen, and the event
            names = bad_tensors(stats)  # sync: only on a non-finite step
            self.sync_count += 1
            stats = zero_nonfinite(stats, names, self.model, self.process_group)
        if self.scaler is not None and bool(
            scaler_found_inf(self.scaler, self.optimizer, self.device) > 0
        ):  # sync: rare path
            self.sync_count += 1
            return stats, False
        return stats, True
