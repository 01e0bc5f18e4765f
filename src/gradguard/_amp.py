"""The guard's side of a ``torch.amp.GradScaler``: unscale once, share the skip decision.

The guard measures unscaled gradients, so it unscales them before measuring (unless the
loop already called ``scaler.unscale_``); on the device path it folds its own non-finite
flag into the scaler's, so ``scaler.step`` skips exactly the steps the guard skips and
``scaler.update`` backs off on both. These read the scaler's per-optimizer state, which
``GradScaler`` keeps in ``_per_optimizer_states`` (the same record its own ``step`` reads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _optimizer_state(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Any:
    states: dict[int, dict[str, Any]] = scaler._per_optimizer_states
    return states[id(optimizer)]


def unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the gradients unless the loop already did (``scaler.unscale_``) this step."""
    from torch.amp.grad_scaler import OptState

    if _optimizer_state(scaler, optimizer)["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def merge_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, found_inf: Tensor
) -> Tensor:
    """Make the scaler skip the guard's non-finite steps too; return the combined flag."""
    combined = found_inf
    for device_found in _optimizer_state(scaler, optimizer)["found_inf_per_device"].values():
        device_found.copy_(torch.maximum(device_found, found_inf.to(device_found.device)))
        combined = torch.maximum(combined, device_found.to(combined.device))
    return combined


def scaler_found_inf(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device
) -> Tensor:
    """The scaler's verdict for this step (> 0: an Inf or NaN), summed over devices."""
    found = list(_optimizer_state(scaler, optimizer)["found_inf_per_device"].values())
    if not found:
        return torch.zeros((), device=device)
    return torch.stack([f.to(device).reshape(()) for f in found]).sum()
