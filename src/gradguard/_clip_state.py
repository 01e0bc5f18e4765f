"""The clip policies' helpers: argument checks and state tensors kept on the device.

Private to :mod:`gradguard.clip`, split out to keep that module short; it needs only torch
and :mod:`gradguard.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradguard.errors import ConfigError, check_state_keys

#: Added to the norm before dividing, as torch's ``clip_grad_norm_`` does.
NORM_EPS = 1e-6


def _positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and (value > 0 and (allow_inf or math.isfinite(value))):
        return float(value)
    expect = "a positive number" + (" or math.inf" if allow_inf else "")
    raise ConfigError(f"{name} must be {expect}, got {value!r}.")


def _in_range(name: str, value: float, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not low < value < high:
        raise ConfigError(f"{name} must lie strictly between {low} and {high}, got {value!r}.")
    return float(value)


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def _check_keys(policy: object, state_dict: Mapping[str, Any], keys: set[str]) -> None:
    check_state_keys(policy, set(state_dict), keys, "policy")


def _on(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """``dtype``, except fp64 becomes fp32 on MPS, which has no fp64."""
    return torch.float32 if device.type == "mps" and dtype == torch.float64 else dtype


class _DeviceState:
    """Named state tensors created on the device at first use; round-trip through dicts."""

    def __init__(self, factory: dict[str, tuple[tuple[int, ...], torch.dtype, float]]) -> None:
        self._factory = factory
        self._tensors: dict[str, Tensor] = {}

    def get(self, device: torch.device) -> dict[str, Tensor]:
        if not self._tensors or next(iter(self._tensors.values())).device != device:
            if self._tensors:
                self._tensors = {
                    k: v.to(device, _on(device, v.dtype)) for k, v in self._tensors.items()
                }
            else:
                self._tensors = {
                    k: torch.full(shape, fill, dtype=_on(device, dtype), device=device)
                    for k, (shape, dtype, fill) in self._factory.items()
                }
        return self._tensors

    def set(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def state_dict(self) -> dict[str, Tensor]:
        if not self._tensors:
            self.get(torch.device("cpu"))
        return {k: v.detach().clone() for k, v in self._tensors.items()}

    def load_state_dict(self, owner: object, state_dict: Mapping[str, Any]) -> None:
        _check_keys(owner, state_dict, set(self._factory))
        loaded: dict[str, Tensor] = {}
        for key, (shape, dtype, _) in self._factory.items():
            value = torch.as_tensor(state_dict[key])
            if tuple(value.shape) != shape:
                raise ConfigError(
                    f"{type(owner).__name__} state {key!r} has shape {tuple(value.shape)}, "
                    f"expected {shape}: it was saved with a different configuration."
                )
            loaded[key] = value.detach().clone().to(dtype)
        self._tensors = loaded
