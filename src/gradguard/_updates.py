"""Per-layer update ratios, ||w_after - w_before|| / ||w_before||, within a memory budget.

On a drained step the guard copies the weights of a subset of layers before the optimizer
step and measures, after it, how far each moved relative to its own size. The subset
rotates from drain to drain and its total size never exceeds the largest layer's, so the
extra memory of a drained step is at most one layer's parameters, whatever the model's
size; every layer is measured once per cycle of drains. The difference is taken in place
in the copies and reduced with the fused norm: no host sync, a few kernels per drain.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._foreach import stacked_norms
from gradguard.stats import layer_norms, layer_of, layout_for


class UpdateProbe:
    """Measures the update ratio of a rotating subset of layers on one step per drain.

    Args:
        params: the trainable parameters, in depth order.
        layer_of_param: the layer index of each parameter.
        n_layers: how many layers there are.
        device: where the ratios are returned (the guard's device).
    """

    def __init__(
        self,
        params: tuple[Tensor, ...],
        layer_of_param: list[int],
        n_layers: int,
        device: torch.device,
    ) -> None:
        self.params = params
        self.n_layers = n_layers
        self.device = device
        self.layer_of_param = list(layer_of_param)
        self.tensors_of: list[list[int]] = [[] for _ in range(n_layers)]
        for position, layer in enumerate(layer_of_param):
            self.tensors_of[layer].append(position)
        self.layer_bytes = [
            sum(params[i].numel() * params[i].element_size() for i in positions)
            for positions in self.tensors_of
        ]
        #: the most bytes a drained step copies: the largest layer's parameters
        self.budget = max(self.layer_bytes, default=0)
        self._cursor = 0
        self._saved: tuple[list[int], list[Tensor], list[int]] | None = None
        # Device-side indices per subset, made once: the subsets repeat from cycle to cycle.
        self._indices: dict[tuple[int, ...], tuple[list[Tensor], Tensor]] = {}

    def next_layers(self) -> list[int]:
        """The layers the next measurement covers: from the cursor, within the budget."""
        chosen: list[int] = []
        total = 0
        for k in range(self.n_layers):
            layer = (self._cursor + k) % self.n_layers
            size = self.layer_bytes[layer]
            if chosen and total + size > self.budget:
                break
            if self.tensors_of[layer]:
                chosen.append(layer)
                total += size
        return chosen

    def before_step(self) -> None:
        """Copy the chosen layers' weights (call just before the optimizer step)."""
        layers = self.next_layers()
        self._cursor = (layers[-1] + 1) % self.n_layers if layers else 0
        positions = [i for layer in layers for i in self.tensors_of[layer]]
        with torch.no_grad():
            copies = [self.params[i].detach().clone() for i in positions]
        self._saved = (layers, copies, positions)

    def after_step(self) -> Tensor | None:
        """The ratios of this step (NaN for layers not measured), or None without a copy."""
        if self._saved is None:
            return None
        layers, copies, positions = self._saved
        self._saved = None
        if not copies:
            return None
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for k, copy in enumerate(copies):
            groups[(copy.device, copy.dtype)].append(k)
        indices, measured = self._device_indices(layers, positions, list(groups.values()))
        old_sq = torch.zeros(self.n_layers, dtype=torch.float64, device=self.device)
        diff_sq = torch.zeros_like(old_sq)
        with torch.no_grad():
            for members, index in zip(groups.values(), indices, strict=True):
                mine = [copies[k] for k in members]
                old = stacked_norms(mine).to(self.device, torch.float64).square()
                torch._foreach_sub_(mine, [self.params[positions[k]] for k in members])
                diff = stacked_norms(mine).to(self.device, torch.float64).square()
                old_sq.index_add_(0, index, old)
                diff_sq.index_add_(0, index, diff)
        del copies
        ratio = (diff_sq.sqrt() / old_sq.sqrt()).float()
        return torch.where(measured & (old_sq > 0), ratio, torch.full_like(ratio, math.nan))

    def _device_indices(
        self, layers: list[int], positions: list[int], groups: list[list[int]]
    ) -> tuple[list[Tensor], Tensor]:
        """The layer index of each group's tensors and the measured-layer mask, on device."""
        key = tuple(positions)
        if key not in self._indices:
            index = [
                torch.tensor([self.layer_of_param[positions[k]] for k in members]).to(self.device)
                for members in groups
            ]
            mask = torch.zeros(self.n_layers, dtype=torch.bool)
            mask[layers] = True
            self._indices[key] = (index, mask.to(self.device))
        return self._indices[key]


def layer_weight_norms(
    model: nn.Module, layer_names: Sequence[str], process_group: Any = None
) -> Tensor | None:
    """Per-layer parameter norms on the device (fp32 values, fp64 sums), for the detectors.

    One fused norm per (device, dtype) group. Parameters sharded across ranks would need a
    reduction of their own, and a model whose layers changed is not the one measured: the
    detectors then go without (None).
    """
    layout = layout_for(model, process_group)
    if layout.layer_names != tuple(layer_names) or (
        layout.sharding is not None and layout.sharding.sharded
    ):
        return None
    dtype = layout.accumulate_dtype  # fp64, except on MPS
    with torch.no_grad():
        if layout.in_order:  # one (device, dtype) group in parameter order: no scatter
            squares = stacked_norms(list(layout.params)).to(dtype).square()
        else:
            squares = torch.zeros(len(layout.params), dtype=dtype, device=layout.device)
            for group in layout.groups:
                norms = stacked_norms([layout.params[i] for i in group.positions])
                squares.index_copy_(0, group.index, norms.to(layout.device, dtype).square())
    return layer_norms(squares, layout.layer_index, len(layout.layer_names))


def update_probe(layout: Any, layer_names: Sequence[str]) -> UpdateProbe | None:
    """The update-ratio probe of a layout, or None where the weights are sharded."""
    if not layout.params or (layout.sharding is not None and layout.sharding.sharded):
        return None
    index = {name: i for i, name in enumerate(layer_names)}
    layers = [index[layer_of(name)] for name in layout.names]
    return UpdateProbe(layout.params, layers, len(layer_names), layout.device)
