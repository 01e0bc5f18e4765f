"""Deterministic fault injection, to test a training loop against what goes wrong for real.

A :class:`FaultInjector` wraps each training step in a context. On the steps its schedule
names, it puts NaN or Inf into one gradient tensor, multiplies every gradient by a factor
(a spike), corrupts the loss (the model's output becomes NaN, so the loss and every
gradient do), or multiplies the learning rate for ``k`` optimizer steps (a real divergence,
not a synthetic one). Everything is done with hooks registered on entry and removed on
exit, so a disabled injector, or a step without a fault, leaves no trace.

The ``"loss"`` fault multiplies every floating-point tensor the model returns by NaN,
wherever it sits: a Tensor, tuples, lists and NamedTuples, dicts and other Mappings,
dataclasses, and Hugging Face ``ModelOutput`` (nested ones too). A model given labels
returns its loss among its outputs (``output.loss``): that loss becomes NaN too, and so
do the gradients ``loss.backward()`` computes from it (an embedding's in the rows the
batch used). The output is rebuilt, not mutated; ``None`` fields stay ``None`` and
integer or boolean tensors are left alone. An output with no floating-point tensor at all
is refused with a :class:`ConfigError`.

``injector.log`` holds only the faults that happened; a planned fault that could not (its
parameter got no gradient during the step, no backward ran, ...) goes to
``injector.missed`` instead, with a ``RuntimeWarning`` when the step ends::

    injector = FaultInjector(model, optimizer, probability=0.02, seed=0)
    for x, y in loader:
        with injector.step():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            guard.step(loss)
    injector.log  # [Fault(step=..., kind=..., target=...), ...]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradguard.errors import ConfigError

FaultKind = Literal["nan", "inf", "spike", "loss", "lr"]
KINDS: tuple[FaultKind, ...] = ("nan", "inf", "spike", "loss", "lr")


@dataclass(frozen=True)
class Fault:
    """One fault: the injector's step, the kind and what it hit.

    In :attr:`FaultInjector.log`, ``step`` is the step in which the fault took effect: the
    scheduled one, except for an ``lr`` fault whose first optimizer step came later.
    """

    step: int
    kind: FaultKind
    target: str = ""


class FaultInjector:
    """Inject faults into a model's gradients, loss or learning rate on a schedule.

    Each fault is logged (:attr:`log`) when it takes effect, never merely because it was
    scheduled:

    - ``nan``/``inf``: when the parameter's gradient is accumulated during the step (a
      parameter that gets no gradient that step is not hit: the fault is missed).
    - ``spike``: when the first gradient is accumulated; every parameter that gets one
      during the step is multiplied (none: missed).
    - ``loss``: when the model's forward returns during the step and its output is
      poisoned (see the module docstring); an output with no floating-point tensor raises
      :class:`ConfigError` from the forward call. No forward during the step: missed.
    - ``lr``: at the first optimizer step under the raised LR, which may fall in a later
      step context when this one runs none (with ``step`` set to that context's). A new
      ``lr`` fault before the previous one took effect replaces it (the old one is missed).
      Without an optimizer, ``lr`` faults are refused at construction.

    A missed fault goes to :attr:`missed` instead of :attr:`log`, with a ``RuntimeWarning``
    at the end of its step (no warning when the step raised).

    Args:
        model: the module being trained.
        optimizer: its optimizer (for LR faults; optional otherwise).
        at: explicit schedule ``{step: kind}`` (steps count from 1, one per
            :meth:`step` context).
        probability: otherwise, the chance of a fault at each step, with kinds drawn
            uniformly from ``kinds``.
        kinds: the kinds a random schedule draws from.
        seed: seeds the random schedule and the choice of target tensors.
        parameter: the parameter name to corrupt for NaN/Inf; random when None.
        spike_factor: gradient multiplier of a ``spike``.
        lr_factor: LR multiplier of an ``lr`` fault, held for ``lr_steps`` optimizer steps.
        lr_steps: how many optimizer steps an ``lr`` fault lasts.
        enabled: False makes every context a no-op.

    Attributes:
        log: the faults that took effect, in order.
        missed: the faults scheduled that could not take effect.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        at: Mapping[int, FaultKind] | None = None,
        probability: float = 0.0,
        kinds: Sequence[FaultKind] = ("nan", "inf", "spike", "loss"),
        seed: int = 0,
        parameter: str | None = None,
        spike_factor: float = 1e6,
        lr_factor: float = 100.0,
        lr_steps: int = 10,
        enabled: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.at = dict(at or {})
        for kind in [*self.at.values(), *kinds]:
            if kind not in KINDS:
                raise ConfigError(f"unknown fault kind {kind!r}; choose from {KINDS}.")
        if ("lr" in self.at.values() or "lr" in kinds) and optimizer is None:
            raise ConfigError("'lr' faults need the optimizer: FaultInjector(model, optimizer).")
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"probability must lie in [0, 1], got {probability!r}.")
        self.probability = probability
        self.kinds = tuple(kinds)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if parameter is not None and parameter not in self.names:
            raise ConfigError(
                f"parameter {parameter!r} is not a trainable parameter of the model; "
                f"choose from {self.names[:6]}{'...' if len(self.names) > 6 else ''}."
            )
        self.parameter = parameter
        self.spike_factor = float(spike_factor)
        self.lr_factor = float(lr_factor)
        if not isinstance(lr_steps, int) or lr_steps < 1:
            raise ConfigError(f"lr_steps must be an int >= 1, got {lr_steps!r}.")
        self.lr_steps = lr_steps
        self.enabled = enabled
        self.steps = 0
        self.log: list[Fault] = []
        self.missed: list[Fault] = []
        self._rng = random.Random(seed)
        self._lr_left = 0
        self._lr_pending: Fault | None = None
        self._fired = False

    def _planned(self) -> FaultKind | None:
        if self.steps in self.at:
            return self.at[self.steps]
        if self.probability and self._rng.random() < self.probability:
            return self._rng.choice(self.kinds)
        return None

    @contextlib.contextmanager
    def step(self) -> Iterator[Fault | None]:
        """A context around one training step; yields the fault it plans, if any.

        The fault is in :attr:`log` once it has taken effect, in :attr:`missed` if the
        step ends without it (see the class docstring).
        """
        self.steps += 1
        kind = self._planned() if self.enabled else None
        handles: list[RemovableHandle] = []
        fault: Fault | None = None
        self._fired = False
        if kind is not None:
            fault = self._arm(kind, handles)
        if self._lr_left > 0 and self.optimizer is not None:
            handles += self._arm_lr()
        completed = False
        try:
            yield fault
            completed = True
        finally:
            for handle in handles:
                handle.remove()
            if fault is not None and fault.kind != "lr" and not self._fired:
                self._miss(fault, _WHY_MISSED[fault.kind], warn=completed, stacklevel=4)

    def _record(self, fault: Fault) -> None:
        """Log ``fault`` the first time one of its hooks takes effect in this step."""
        if not self._fired:
            self._fired = True
            self.log.append(fault)

    def _miss(self, fault: Fault, why: str, *, warn: bool, stacklevel: int) -> None:
        self.missed.append(fault)
        if warn:
            warnings.warn(
                f"FaultInjector: the {fault.kind!r} fault of step {fault.step} "
                f"({fault.target}) did not happen: {why}. It is in injector.missed, "
                "not in injector.log.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def _arm(self, kind: FaultKind, handles: list[RemovableHandle]) -> Fault:
        params = dict(self.model.named_parameters())
        if kind in ("nan", "inf"):
            name = self.parameter or self._rng.choice(self.names)
            fault = Fault(self.steps, kind, name)
            hook = _poison(math.nan if kind == "nan" else math.inf, lambda: self._record(fault))
            handles.append(params[name].register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]
            return fault
        if kind == "spike":
            fault = Fault(self.steps, kind, "all gradients")
            for name in self.names:
                hook = _scale(self.spike_factor, lambda: self._record(fault))
                handles.append(params[name].register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]
            return fault
        if kind == "loss":
            fault = Fault(self.steps, kind, "model output")
            handles.append(
                self.model.register_forward_hook(_nan_output(lambda: self._record(fault)))
            )
            return fault
        fault = Fault(self.steps, kind, f"lr x{self.lr_factor:g} for {self.lr_steps} steps")
        if self._lr_pending is not None:
            self._miss(
                self._lr_pending,
                f"a new 'lr' fault at step {self.steps} replaced it before any optimizer step",
                warn=True,
                stacklevel=5,
            )
        self._lr_pending = fault
        self._lr_left = self.lr_steps
        return fault

    def _arm_lr(self) -> list[RemovableHandle]:
        """Multiply the LR during the optimizer step only, so schedulers never see it."""
        assert self.optimizer is not None
        saved: list[Any] = []

        def before(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            if self._lr_pending is not None:
                self.log.append(dataclasses.replace(self._lr_pending, step=self.steps))
                self._lr_pending = None
            saved[:] = [g["lr"] for g in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_factor

        def after(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            for group, lr in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = lr
            self._lr_left -= 1

        return [
            self.optimizer.register_step_pre_hook(before),
            self.optimizer.register_step_post_hook(after),
        ]


_WHY_MISSED: dict[str, str] = {
    "nan": "the parameter got no gradient during the step (no backward, or unused)",
    "inf": "the parameter got no gradient during the step (no backward, or unused)",
    "spike": "no parameter got a gradient during the step (no backward)",
    "loss": "the model's forward did not run during the step",
}

#: What the ``loss`` fault can poison, for its error message.
_HANDLED_OUTPUTS = (
    "a floating-point Tensor, or floating-point tensors inside tuples, lists, NamedTuples, "
    "dicts and other Mappings, dataclasses or transformers ModelOutput, nested"
)


def _poison(value: float, record: Callable[[], None]) -> Any:
    def hook(param: Tensor) -> None:
        if param.grad is not None:
            param.grad.view(-1)[0] = value
            record()

    return hook


def _scale(factor: float, record: Callable[[], None]) -> Any:
    def hook(param: Tensor) -> None:
        if param.grad is not None:
            param.grad.mul_(factor)
            record()

    return hook


def _nan_output(record: Callable[[], None]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        poisoned, count = _nan_tree(output)
        if count == 0:
            raise ConfigError(
                f"FaultInjector cannot inject a 'loss' fault: the output of "
                f"{type(module).__name__} is {_describe(output)}, with no floating-point "
                f"tensor to make NaN. It handles {_HANDLED_OUTPUTS}. Give the injector the "
                "submodule whose output the loss is computed from, e.g. "
                "FaultInjector(model.head, ...)."
            )
        record()
        return poisoned

    return hook


def _describe(output: Any) -> str:
    """``output``'s type, for an error message: ``a torch.Tensor of dtype torch.int64``."""
    if output is None:
        return "None"
    kind = type(output)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    if isinstance(output, Tensor):
        return f"a {name} of dtype {output.dtype}"
    return f"a {name}"


def _nan_tree(output: Any) -> tuple[Any, int]:
    """Return ``output`` with every floating-point tensor in it multiplied by NaN.

    Walks Tensors, tuples, lists, NamedTuples, Mappings, dataclasses and transformers
    ``ModelOutput`` (a dataclass that is also an ``OrderedDict``; its items and attributes
    stay in step), recursively. Containers are rebuilt, never mutated, and only when
    something in them changed; ``None`` and every other object are returned as they are.
    The product keeps the autograd graph: a NaN-poisoned loss gives NaN gradients.

    Args:
        output: what a module's forward returned.

    Returns:
        The poisoned output and how many tensors were poisoned (0: ``output`` itself).

    Raises:
        ConfigError: a Mapping that is neither mutable nor constructible from a dict holds
            a floating-point tensor.
    """
    if isinstance(output, Tensor):
        if output.is_floating_point() or output.is_complex():
            return output * math.nan, 1
        return output, 0
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return _nan_dataclass(output)
    if isinstance(output, tuple | list):
        return _nan_sequence(output)
    if isinstance(output, Mapping):
        changed, count = _nan_items(output.items())
        return (_rebuilt_mapping(output, changed), count) if count else (output, 0)
    return output, 0


def _nan_items(items: Iterable[tuple[Any, Any]]) -> tuple[dict[Any, Any], int]:
    """The poisoned values among ``(key, value)`` pairs, by key, and how many tensors."""
    changed: dict[Any, Any] = {}
    count = 0
    for key, value in items:
        new, n = _nan_tree(value)
        if n:
            changed[key], count = new, count + n
    return changed, count


def _nan_sequence(output: tuple[Any, ...] | list[Any]) -> tuple[Any, int]:
    """Poison a tuple, list or NamedTuple into a new one of the same type."""
    changed, count = _nan_items(enumerate(output))
    if count == 0:
        return output, 0
    values = [changed.get(i, value) for i, value in enumerate(output)]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a NamedTuple
        return type(output)(*values), count
    return type(output)(values), count  # subclasses are assumed to build like their base


def _nan_dataclass(output: Any) -> tuple[Any, int]:
    """Poison a dataclass's fields (and a ``ModelOutput``'s extra keys) into a copy."""
    fields = dataclasses.fields(output)
    changed, count = _nan_items((f.name, getattr(output, f.name)) for f in fields)
    extra: dict[Any, Any] = {}
    if isinstance(output, Mapping):  # a ModelOutput may hold keys that are not fields
        names = {f.name for f in fields}
        extra, n = _nan_items((k, v) for k, v in output.items() if k not in names)
        count += n
    if count == 0:
        return output, 0
    at_init = {f.name: changed[f.name] for f in fields if f.init and f.name in changed}
    rebuilt = dataclasses.replace(output, **at_init)
    for field in fields:
        if not field.init and field.name in changed:
            try:  # ModelOutput's __setattr__ keeps its item in step
                setattr(rebuilt, field.name, changed[field.name])
            except dataclasses.FrozenInstanceError:
                object.__setattr__(rebuilt, field.name, changed[field.name])
    if extra:
        rebuilt = _rebuilt_mapping(rebuilt, extra)
    return rebuilt, count


def _rebuilt_mapping(output: Mapping[Any, Any], changed: Mapping[Any, Any]) -> Any:
    """A copy of ``output`` with the ``changed`` items replaced, of the same type."""
    if isinstance(output, MutableMapping):
        rebuilt = copy.copy(output)  # keeps the type and a defaultdict's factory
        for key, value in changed.items():
            rebuilt[key] = value  # ModelOutput's __setitem__ sets the attribute too
        return rebuilt
    items = {**output, **changed}
    try:
        return type(output)(items)  # type: ignore[call-arg]
    except TypeError as error:
        raise ConfigError(
            f"FaultInjector cannot rebuild the read-only mapping {type(output).__qualname__} "
            f"with NaN tensors in it ({error}); it handles {_HANDLED_OUTPUTS}."
        ) from error
