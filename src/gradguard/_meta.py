"""The description of a guarded run that sinks write once (``meta.json``, run params)."""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gradguard.guard import Guard


def guard_meta(guard: Guard) -> dict[str, Any]:
    """The run's description for the sinks: layers, the configuration, the versions."""
    from gradguard import __version__

    return {
        "layer_names": list(guard.layer_names),
        "layer_depth": {name: i for i, name in enumerate(guard.layer_names)},
        "tensor_names": list(guard.tensor_names),
        "config": {
            "clip": repr(guard.clip),
            "nonfinite": guard.nonfinite,
            "detectors": [repr(d) for d in guard.detectors],
            "recovery": repr(guard.recovery),
            "log_every": guard.log_every,
            "optimizer": type(guard.optimizer).__name__,
            "param_groups": [_group_settings(g) for g in guard.optimizer.param_groups],
            "accumulation_steps": (
                guard.accumulation_steps
                if isinstance(guard.accumulation_steps, int)
                else "function"
            ),
            "fused": guard.fused,
            "scheduler": type(guard.scheduler).__name__ if guard.scheduler else None,
            "scaler": guard.scaler is not None,
        },
        "versions": {
            "gradguard": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def _group_settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter group's hyperparameters as JSON values (its LR, weight decay, betas...).

    Read once, when the guard is built: a tensor LR is read on the host here.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value)  # sync: once, for the run's configuration
        if isinstance(value, bool | int | str) or value is None:
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return repr(value)

    settings: dict[str, Any] = {"params": len(group["params"])}
    settings.update((key, plain(value)) for key, value in group.items() if key != "params")
    return settings
