"""Skip connections and normalization, read from the loss's autograd graph.

The recommendations leave out a remedy the model already has: a residual connection when
the graph holds an ``x + f(x)``, normalization when a norm operator ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Structure:
    """What the loss's autograd graph shows of the architecture.

    Attributes:
        skip: an identity path around a parametrized branch (``x + f(x)``) ran; None when
            that cannot be settled: none found, but a custom ``autograd.Function`` (a
            reentrant checkpoint, say) hides part of the graph, or the graph was larger
            than :data:`_GRAPH_BUDGET` nodes.
        norm: a batch, layer, group, instance or RMS normalization operator ran (also one
            called as a function, or inside a custom module).
    """

    skip: bool | None
    norm: bool


_JOINS = frozenset({"AddBackward0", "SubBackward0"})
_RESHAPES = frozenset(
    {
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0",
        "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
        "SqueezeBackward1", "CloneBackward0", "ToCopyBackward0",
    }
)  # fmt: skip
_NORM_OPS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RmsNorm")
_GRAPH_BUDGET = 200_000
"""Graph nodes visited (in all) looking for skip connections before giving up."""


@dataclass
class _Budget:
    """Graph nodes left to visit, shared by every join's search."""

    left: int


def graph_structure(loss: Tensor) -> Structure:
    """Skip connections and normalization in the autograd graph of ``loss``.

    The graph records what ran, whatever the model's code looks like (no tracing, no
    data-dependent control flow to trip on): a skip connection is a sum (or difference)
    of two tensors one of which is computed from the other through parameters, the
    ``x + f(x)`` of a residual block. A plain layer's ``x @ w + b`` is not one: ``b`` is a
    parameter, not computed from ``x @ w``.
    """
    nodes: list[Any] = []
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    norm = any(op in type(node).__name__ for node in nodes for op in _NORM_OPS)
    budget = _Budget(_GRAPH_BUDGET)
    for node in nodes:
        if type(node).__name__ in _JOINS and _is_skip(node, budget):
            return Structure(True, norm)
        if budget.left <= 0:
            return Structure(None, norm)
    opaque = any(isinstance(node, torch.autograd.function.BackwardCFunction) for node in nodes)
    return Structure(None if opaque else False, norm)


def _is_leaf(node: Any) -> bool:
    return not hasattr(node, "_sequence_nr") or type(node).__name__ == "AccumulateGrad"


def _reshaped_from(node: Any) -> tuple[set[int], int]:
    """``node`` and what it reshapes (``x.view(...) + f(x)`` is a skip too), the oldest's number."""
    chain = {id(node)}
    while type(node).__name__ in _RESHAPES:
        inner = [c for c, _ in node.next_functions if c is not None and not _is_leaf(c)]
        if len(inner) != 1:
            break
        node = inner[0]
        chain.add(id(node))
    return chain, node._sequence_nr()


def _is_skip(join: Any, budget: _Budget) -> bool:
    """Whether one operand of ``join`` is computed from the other through parameters.

    Walks back from the later operand; nodes created before the earlier one cannot lead
    to it (autograd numbers nodes in creation order) and are not visited.
    """
    operands = [child for child, _ in join.next_functions if child is not None]
    operands = [child for child in operands if not _is_leaf(child)]
    if len(operands) != 2:
        return False
    early, late = sorted(operands, key=lambda node: node._sequence_nr())
    targets, floor = _reshaped_from(early)
    found = parametrized = False
    seen: set[int] = set()
    stack = [late]
    while stack and budget.left > 0:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        budget.left -= 1
        for child, _ in node.next_functions:
            if child is None:
                continue
            if type(child).__name__ == "AccumulateGrad":
                parametrized = True
            elif id(child) in targets:
                found = True
            elif not _is_leaf(child) and child._sequence_nr() > floor:
                stack.append(child)
    return found and parametrized
