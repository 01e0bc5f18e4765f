"""What the explainer is told about a run: the model's layers and the training setup.

Read once when the guard is built (the LR per layer and a layer's weight scale are read
later, only when an event needs them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from gradguard.clip import NormClip
from gradguard.explain import LayerScale, RunFacts
from gradguard.stats import ROOT_LAYER, layer_of, named_modules, named_parameters

if TYPE_CHECKING:
    from gradguard.guard import Guard

_SATURATING = ("Sigmoid", "Tanh", "Softsign", "Hardtanh", "Hardsigmoid", "LogSigmoid")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def run_facts(guard: Guard) -> RunFacts:
    """What the explainer needs to know about the model and the training setup.

    A layer's weight scale is read on the host only when an event needs it; each read
    counts in ``guard.sync_count``.
    """
    model, optimizer = guard.model, guard.optimizer
    types = {type(m).__name__ for m in model.modules()}
    saturating = [t for t in _SATURATING if t in types]
    if any(isinstance(m, nn.RNN) and m.nonlinearity == "tanh" for m in model.modules()):
        saturating.append("RNN(tanh)")
    dtypes = [p.dtype for p in model.parameters() if p.requires_grad]
    common = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    low = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(common)
    names = guard.layer_names
    first_param: dict[str, Tensor] = {}
    for name, param in named_parameters(model):
        first_param.setdefault(layer_of(name), param)

    def group_lr() -> list[float]:
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        return [float(lr_of.get(id(first_param[n]), math.nan)) for n in names]

    def layer_scale(name: str) -> LayerScale | None:
        guard.sync_count += 1  # one read of the weights, only to explain an event
        return _layer_scale(model, name)

    return RunFacts(
        clip_max_norm=guard.clip.max_norm if isinstance(guard.clip, NormClip) else None,
        clipping=guard.clip is not None,
        scaler=guard.scaler is not None,
        recovery=guard.recovery is not None,
        low_precision=low,
        saturating=tuple(saturating),
        rectified=bool(types & {"ReLU", "ReLU6", "Threshold"}),
        normalized=any(isinstance(m, _NORMS) for m in model.modules()),
        group_lr=group_lr,
        layer_scale=layer_scale,
    )


def _layer_scale(model: nn.Module, name: str) -> LayerScale | None:
    """The std and fan-in of a layer's weight matrix (its recurrent one for an RNN).

    Read on the host: called only when an event needs it.
    """
    module = model if name == ROOT_LAYER else dict(named_modules(model)).get(name)
    if module is None:
        return None
    matrices = [
        (n, p) for n, p in module.named_parameters(recurse=False) if p.dim() >= 2 and p.numel() > 1
    ]
    if not matrices:
        return None
    recurrent = [p for n, p in matrices if n.startswith("weight_hh")]
    weight = recurrent[0] if recurrent else matrices[0][1]
    fan_in = int(weight.shape[1]) * int(np.prod(weight.shape[2:], dtype=np.int64))
    with torch.no_grad():
        std = float(weight.detach().float().std())  # sync: only to explain an event
    return LayerScale(std=std, fan_in=fan_in)
