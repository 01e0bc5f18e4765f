"""Building the opt-in flat gradient buffer (:class:`gradguard._flat.FlatGrads`) for a model.

Above :mod:`gradguard.stats`, whose parameter layout it follows; ``grad_stats`` finds the
buffer through :mod:`gradguard._flat`, below it.
"""

from __future__ import annotations

import torch
from torch import nn

from gradguard import _distributed, _flat
from gradguard._flat import FlatGrads
from gradguard.errors import ConfigError
from gradguard.stats import layout_for, named_modules


def flatten_grads_(model: nn.Module) -> FlatGrads:
    """Make each trainable parameter's ``.grad`` a view into one flat buffer per (device, dtype).

    Opt-in, as DDP's ``gradient_as_bucket_view`` and Megatron's contiguous gradient
    buffer: the buffers hold the gradients in parameter order, and autograd accumulates
    into the views in place (plain backward, accumulation over several backwards,
    autocast). :func:`grad_stats` then measures the per-tensor norms with a few strided
    reductions over the buffers instead of one fused kernel over every tensor, and clip
    policies scale or clamp each buffer in one kernel: this pays off with many small
    tensors (a 500-layer MLP), and changes little for a few large ones.

    Gradients already present are copied into the buffers; a parameter without one gets
    zeros. A parameter that gets no gradient in a step keeps a zero gradient (as with
    ``zero_grad(set_to_none=False)``), so optimizers step it (AdamW's moments decay).
    Zero the gradients with :meth:`FlatGrads.zero_`, ``guard.zero_grad()`` or
    ``optimizer.zero_grad(set_to_none=False)``. ``set_to_none=True`` (torch's default),
    ``model.zero_grad()`` and ``backward(create_graph=True)`` drop the views: the next
    measurement warns once and measures tensor by tensor, correctly; ``zero_()`` attaches
    them again.

    Returns:
        The :class:`FlatGrads` (``grad_stats`` finds it by itself: keeping it is optional).

    Raises:
        ConfigError: what the buffer cannot hold: sparse gradients (``nn.Embedding(...,
            sparse=True)``), sharded parameters (FSDP2 ``fully_shard``, DTensors), a DDP
            wrapper with ``gradient_as_bucket_view=True`` (its buckets already are flat),
            or parameters on the meta device.
        UnsupportedModelError: no trainable parameter.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> flat = flatten_grads_(model)
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> model.bias.grad.data_ptr() == flat.buffers[0][6:].data_ptr()
        True
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"flatten_grads_ expects an nn.Module, got {type(model).__name__}: pass the "
            "model (or its DDP wrapper)."
        )
    if getattr(model, "gradient_as_bucket_view", False):
        raise ConfigError(
            "flatten_grads_: this DDP model was built with gradient_as_bucket_view=True, "
            "which makes each .grad a view into DDP's own buckets and would replace the "
            "flat buffer's views at the first backward. Build DDP with "
            "gradient_as_bucket_view=False (its default) to use flatten_grads_."
        )
    layout = layout_for(model)
    if any(_distributed.is_dtensor(p) for p in layout.params):
        raise ConfigError(
            "flatten_grads_ does not support sharded parameters (FSDP2 fully_shard, "
            "DTensor): their gradients are DTensors that FSDP allocates itself. Measure "
            "such a model without a flat buffer."
        )
    sparse = next(
        (
            name
            for name, module in named_modules(model)
            if isinstance(module, nn.Embedding | nn.EmbeddingBag)
            and module.sparse
            and module.weight.requires_grad
        ),
        None,
    )
    for name, param in zip(layout.names, layout.params, strict=True):
        if param.device.type == "meta":
            raise ConfigError(
                f"flatten_grads_: parameter {name!r} is on the meta device; materialize "
                "the model (model.to_empty(device=...)) first."
            )
        grad = param.grad
        if sparse is None and grad is not None and grad.layout != torch.strided:
            sparse = name
    if sparse is not None:
        raise ConfigError(
            f"flatten_grads_ does not support sparse gradients ({sparse!r} has or makes "
            "one): a dense buffer would hold every row. Use sparse=False, or measure the "
            "model without a flat buffer."
        )
    positions = [group.positions for group in layout.groups]
    flat = FlatGrads(layout.params, layout.names, positions, layout.device)
    _flat.register(flat)
    return flat
