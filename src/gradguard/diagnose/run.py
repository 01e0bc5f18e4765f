"""``diagnose``: measure, decide, recommend; the model is left exactly as it was found."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._activations import Activation, followers, trace_followers
from gradguard.diagnose.measure import (
    Call,
    Record,
    Recorder,
    as_call,
    backward,
    build_layers,
    forward,
    infer_batch_dim,
    loss_of,
    measure_jacobian,
    out_grad_norms,
    param_grad_norms,
    trainable,
    unrun_owners,
)
from gradguard.diagnose.recommend import (
    Context,
    TypicalNorm,
    recommend,
    suggested_clip,
    typical_norm,
)
from gradguard.diagnose.records import (
    Diagnosis,
    JacobianDiagnosis,
    LayerDiagnosis,
    RecurrentDiagnosis,
)
from gradguard.diagnose.recurrent import measure_recurrent
from gradguard.diagnose.structure import Structure, graph_structure
from gradguard.diagnose.verdict import (
    gradient_ratio,
    reasons_for,
    signals_of,
    verdict_of,
)
from gradguard.stats import uncompiled


def diagnose(
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    jacobian: bool = True,
    batch_dim: int | None = None,
    samples: int = 4,
    seed: int = 0,
) -> Diagnosis:
    """Diagnose vanishing or exploding gradients of ``model`` on one batch, before training.

    Runs one forward pass with hooks, one backward pass with ``torch.autograd.grad`` (the
    model's ``.grad`` fields are never written), the Jacobian estimate and, for each
    RNN/LSTM/GRU, one pass through time; see :mod:`gradguard.diagnose` for what is measured
    and the thresholds of the verdict. The model is left exactly as it was found.

    The clipping threshold (``suggested_clip``, and the ``clip`` recommendation when the
    verdict is "exploding") is the smallest of these bounds, rounded down to 2
    significant figures:

    * √L times the median layer gradient norm, the global norm if every layer were
      typical: clipping there bounds outlier layers and leaves ordinary steps alone;
    * :data:`CLIP_FRACTION` (half) of the global norm G: a threshold at or above G would
      not clip the batch it was measured on, and where every layer is alike √L times the
      median is G itself;
    * when gradients explode, G divided by the amplification measured (the depth ratio or
      the decay through time, else the Jacobian's rms singular value): about the norm
      without the explosion, so steps keep the size the repaired network takes. A value
      read off the exploded norms (1e22 on a 30-layer ReLU network with N(0, 1) weights)
      would bound nothing; the fix there is the initialization, and the threshold to keep
      is the one diagnose measures after it.

    It is therefore always below G, positive and finite; when the norms, an activation or
    the loss overflow (inf/NaN) no fixed value is given and the advice is an adaptive
    threshold (``ZClip``, ``AutoClip``). The message says which bound the number is.

    Recommendations leave out what the model already has: normalization when it has a
    norm layer (torch's, a custom ``...Norm`` module, or a norm operator in the autograd
    graph), residual connections when the autograd graph holds an ``x + f(x)``, He
    initialization with zero biases for dead ReLUs whose feeding layers have both,
    Xavier initialization and input scaling for saturated units when the feeding layers
    follow Xavier and the inputs have unit std, a gated RNN for an LSTM or GRU, a Leaky
    ReLU for units that already leak (they are never flagged dead).

    Args:
        model: the network, in the mode to diagnose (a new model is in train mode).
        inputs: a tensor, a tuple/list of positional arguments or a dict of keyword
            arguments for ``model``.
        targets: optional targets: with no ``loss_fn``, integer targets get
            cross-entropy over dimension 1 (or the last) and float targets of the
            output's shape get the mean squared error.
        loss_fn: ``loss_fn(output, targets)`` (or ``loss_fn(output)`` without targets)
            returning a scalar tensor. Without it and without targets the loss is a
            fixed random readout ``mean(y * r)``, r ~ N(0, 1), of the output's first
            floating-point tensor ``y``: its gradient does not depend on ``y``'s scale.
        jacobian: estimate the input-output Jacobian (a few hundred products on a few
            examples; turn off to save time on large models).
        batch_dim: the batch dimension of inputs and outputs; by default 0, or 1 when the
            first module (in registration order) with a ``batch_first`` attribute has it
            False.
        samples: examples the Jacobian is averaged over.
        seed: seed of the readout, the Jacobian's directions and any dropout.

    Returns:
        The diagnosis.

    Raises:
        UnsupportedModelError: not a module, no parameters, or all parameters frozen.
        ConfigError: inputs the model does not accept, or targets without a default loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = [m for _ in range(20) for m in (nn.Linear(32, 32), nn.Sigmoid())]
        >>> diag = diagnose(nn.Sequential(*layers), torch.randn(16, 32))
        >>> diag.verdict, diag.flagged("vanishing")[0]
        ('vanishing', '0')
    """
    model = uncompiled(model)  # diagnosed eagerly, under the model's own names
    named = trainable(model)
    call = as_call(inputs)
    devices = sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})
    with ExitStack() as stack:
        stack.enter_context(_untouched(model))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        if devices and any(isinstance(m, nn.RNNBase) for m in model.modules()):
            stack.enter_context(_cudnn_disabled())
        torch.manual_seed(seed)
        measured = _measure(
            model,
            named,
            call,
            targets,
            loss_fn,
            jacobian=jacobian,
            batch_dim=infer_batch_dim(model) if batch_dim is None else batch_dim,
            samples=samples,
            seed=seed,
        )
        return _conclude(model, measured)


@dataclass(frozen=True)
class _Measured:
    """Everything one diagnosis measured, before the verdict.

    Attributes:
        layers: one entry per layer, in run order.
        jacobian: the input-output Jacobian, or None.
        recurrent: one entry per RNN/LSTM/GRU module.
        loss: the loss the gradients were taken of.
        grad_norm: the global L2 norm of the parameter gradients.
        typical: the global norm if every layer's gradient were typical, or None.
        followers: the activation after each weight layer, by name.
        structure: the skip connections and normalization in the autograd graph.
        batch_dim: the batch dimension used.
        notes: what could not be measured, and why.
    """

    layers: tuple[LayerDiagnosis, ...]
    jacobian: JacobianDiagnosis | None
    recurrent: tuple[RecurrentDiagnosis, ...]
    loss: float
    grad_norm: float
    typical: TypicalNorm | None
    followers: Mapping[str, Activation]
    structure: Structure
    batch_dim: int
    notes: tuple[str, ...]


def _measure(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    call: Call,
    targets: Any,
    loss_fn: Callable[..., Tensor] | None,
    *,
    jacobian: bool,
    batch_dim: int,
    samples: int,
    seed: int,
) -> _Measured:
    """One forward pass with hooks, one backward pass, the Jacobian, the recurrent modules."""
    with Recorder(model, batch_dim) as recorder:
        output = forward(model, call)
    records = unrun_owners(model, sorted(recorder.records.values(), key=lambda r: r.index))
    loss = loss_of(output, targets, loss_fn, seed=seed)
    outputs = [t for record in records for t in record.outputs]
    structure = graph_structure(loss)
    param_grads, out_grads = backward(loss, [p for _, p in named], outputs)
    del output, outputs
    param_norms, grad_norm = param_grad_norms(named, param_grads)
    followers = _followers(model, records)
    layers = build_layers(records, param_norms, out_grad_norms(records, out_grads), followers)
    for record in records:
        record.outputs.clear()  # free the activations before the Jacobian's passes
    notes = [f"{r.name}: {r.note}" for r in records if r.note and r.calls]
    jac, note = (
        measure_jacobian(model, call, batch_dim=batch_dim, samples=samples, seed=seed)
        if jacobian
        else (None, None)
    )
    notes += [note] if note else []
    recurrent, rnn_notes = measure_recurrent(records, seed)
    return _Measured(
        layers=tuple(layers),
        jacobian=jac,
        recurrent=tuple(recurrent),
        loss=float(loss.detach()),
        grad_norm=grad_norm,
        typical=typical_norm(param_norms),
        followers=followers,
        structure=structure,
        batch_dim=batch_dim,
        notes=tuple(notes + rnn_notes),
    )


def _followers(model: nn.Module, records: Sequence[Record]) -> dict[str, Activation]:
    """The activation after each weight layer: torch.fx if it traces, else run order."""
    order = [(r.name, r.module) for r in records if r.calls]
    try:
        return trace_followers(model, order=order)
    except Exception:  # noqa: BLE001 - an annotation only: never fail the diagnosis for it
        return followers(order)


def _conclude(model: nn.Module, measured: _Measured) -> Diagnosis:
    """The verdict, its reasons, the clipping threshold and the recommendations."""
    layers, jac, recurrent = measured.layers, measured.jacobian, measured.recurrent
    signals = signals_of(layers, jac, recurrent, loss=measured.loss, grad_norm=measured.grad_norm)
    verdict = verdict_of(signals)
    ratio = gradient_ratio(layers)
    clip = suggested_clip(measured.typical, measured.grad_norm, signals)
    context = Context(
        model=model,
        verdict=verdict,
        signals=tuple(signals),
        layers=layers,
        recurrent=recurrent,
        followers=measured.followers,
        clip=clip,
        grad_norm=measured.grad_norm,
        structure=measured.structure,
    )
    return Diagnosis(
        verdict=verdict,
        reasons=reasons_for(verdict, signals, ratio=ratio, jac=jac, recurrent=recurrent),
        layers=layers,
        jacobian=jac,
        recurrent=recurrent,
        recommendations=recommend(context),
        loss=measured.loss,
        grad_norm=measured.grad_norm,
        gradient_ratio=ratio,
        suggested_clip=clip.value,
        batch_dim=measured.batch_dim,
        notes=measured.notes,
    )


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore modes, buffers (objects and values), grads and requires_grad on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [
        (owner, name, buf, None if buf is None else buf.detach().clone())
        for owner in model.modules()
        for name, buf in owner._buffers.items()
    ]
    params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for owner, name, buf, copy in buffers:
                owner._buffers[name] = buf
                if buf is not None and copy is not None:
                    buf.copy_(copy)
        for param, grad, requires in params:
            param.grad = grad
            param.requires_grad_(requires)


@contextmanager
def _cudnn_disabled() -> Iterator[None]:
    """Use the native RNN kernels: cuDNN's have no backward in eval mode, no double backward."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled
