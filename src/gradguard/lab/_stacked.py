"""The side-by-side training of digits MLPs behind the ``initialization`` and ``selu`` experiments.

Holds the MLP's layers (:func:`mlp_layers`, :func:`linears`, the :data:`ACTIVATIONS`), each
seed's probe and batch indices (:func:`data_stream`), and :func:`train_stacked`, which trains
K initialized networks as one :class:`StackedMLP` (layer ``i`` of all K a ``(K, in, out)``
tensor, each network on its own batches, SGD with momentum) and cuts the logs into one
:class:`Trace` per network, with the constants these share (batch size, momentum, logging
intervals). ``initialization`` builds, probes and trains its settings with it (``selu`` runs
its setting through :func:`gradguard.lab.initialization.run_setting`), and
``depth-activation`` builds its networks with :func:`mlp_layers`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn

from gradguard.lab._harness import data_generator
from gradguard.lab._training import index_batches
from gradguard.lab.data import N_CLASSES, N_FEATURES, N_TRAIN, load_digits

MOMENTUM = 0.9
BATCH_SIZE = 64
PROBE_SIZE = 256
LOG_EVERY = 5
LAYER_LOG_EVERY = 50
TICK_EVERY = 50

ACTIVATIONS: Mapping[str, tuple[Callable[[], nn.Module], Callable[[Tensor], Tensor]]] = {
    "relu": (nn.ReLU, torch.relu),
    "selu": (nn.SELU, torch.selu),
    "tanh": (nn.Tanh, torch.tanh),
}
"""Activation name: (module for the nn.Sequential, function for the stacked forward)."""


def mlp_layers(depth: int, width: int, make_activation: Callable[[], nn.Module]) -> nn.Sequential:
    """The layers of a digits MLP, built on the meta device and left uninitialized on the CPU."""
    layers: list[nn.Module] = []
    fan_in = N_FEATURES
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width, device="meta"), make_activation()]
        fan_in = width
    layers.append(nn.Linear(fan_in, N_CLASSES, device="meta"))
    return nn.Sequential(*layers).to_empty(device="cpu")


def linears(model: nn.Sequential) -> list[nn.Linear]:
    """The Linear layers of ``model``, input to output."""
    return [m for m in model if isinstance(m, nn.Linear)]


def data_stream(seed: int, steps: int) -> tuple[Tensor, Tensor]:
    """The probe indices and the batch indices ``(steps, BATCH_SIZE)`` of model seed ``seed``.

    From data seed ``1000 + seed``: first a permutation whose first :data:`PROBE_SIZE`
    images are the probe (and LSUV) batch, then epoch after epoch of full batches.
    """
    generator = data_generator(seed)
    probe_rows = torch.randperm(N_TRAIN, generator=generator)[:PROBE_SIZE]
    batches = index_batches(N_TRAIN, BATCH_SIZE, generator)
    return probe_rows, torch.stack([next(batches) for _ in range(steps)])


class StackedMLP:
    """K initialized MLPs of one architecture as one: layer ``i`` of all K is ``(K, in, out)``.

    The models are copied, not changed. ``x`` of shape ``(K, batch, 64)`` gives logits
    ``(K, batch, 10)``. Weights are stored input-major, so the forward pass is
    ``bmm(h, w) + b`` without a transpose (about 10 % faster on CPU).
    """

    def __init__(self, models: Sequence[nn.Sequential], activations: Sequence[str]) -> None:
        stacks = list(zip(*(linears(m) for m in models), strict=True))
        # Runs of networks with one activation: (function, first, end); usually just one.
        self.groups: list[tuple[Callable[[Tensor], Tensor], int, int]] = []
        for name, members in itertools.groupby(activations):
            first = self.groups[-1][2] if self.groups else 0
            self.groups.append((ACTIVATIONS[name][1], first, first + len(list(members))))
        self.weights = [
            torch.stack([layer.weight.detach().t() for layer in layers])
            .contiguous()
            .requires_grad_()
            for layers in stacks
        ]
        self.biases = [
            torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1).requires_grad_()
            for layers in stacks
        ]

    def parameters(self) -> list[Tensor]:
        """Weights and biases, layer by layer (weight first)."""
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def __call__(self, x: Tensor) -> Tensor:
        """Return the logits of every network."""
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.bmm(h, w) + b
            if i < last:
                h = self.activate(h)
        return h

    def activate(self, h: Tensor) -> Tensor:
        """Apply each network's activation to its block of ``h``."""
        if len(self.groups) == 1:
            return self.groups[0][0](h)
        return torch.cat([fn(h[first:end]) for fn, first, end in self.groups])

    def layer_grad_norms(self) -> Tensor:
        """Per-layer gradient norm (weight and bias) of every network, ``(layers, K)``, fp64.

        fp64 because an exploding network's squared gradients overflow fp32.
        """
        squares = [
            w.grad.double().square().sum(dim=(1, 2)) + b.grad.double().square().sum(dim=(1, 2))
            for w, b in zip(self.weights, self.biases, strict=True)
            if w.grad is not None and b.grad is not None
        ]
        return torch.stack(squares).sqrt()


def per_network_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each network: ``(K, batch, 10)``, ``(K, batch)`` → ``(K,)``."""
    k, b, c = logits.shape
    return (
        F.cross_entropy(logits.reshape(k * b, c), y.reshape(k * b), reduction="none")
        .view(k, b)
        .mean(dim=1)
    )


@dataclass(frozen=True)
class Trace:
    """One network's training run, as :func:`train_stacked` recorded it."""

    final_loss: float
    """Cross-entropy on the whole training set after training."""
    test_accuracy: float
    first_nonfinite: int | None
    """The first step (1-based) whose batch loss was inf or NaN; None if none was."""
    log_steps: tuple[int, ...]
    """The steps whose batch loss (before the update) and global gradient norm are kept."""
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    layer_log_steps: tuple[int, ...]
    """The steps whose per-layer gradient norms (input to output) are kept."""
    layer_grad_norms: tuple[tuple[float, ...], ...]


def _logged(step: int, steps: int, every: int) -> bool:
    """Whether ``step`` of ``steps`` is kept: the first, the last and every ``every``-th."""
    return step in (1, steps) or step % every == 0


def train_stacked(
    models: Sequence[nn.Sequential],
    activations: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    lr: float,
    tick: Callable[[], None] | None = None,
) -> list[Trace]:
    """Train K initialized MLPs side by side with SGD and momentum; network k on seed k's data.

    ``activations`` are keys of :data:`ACTIVATIONS`; network ``k``'s batches come from
    :func:`data_stream` of ``seeds[k]``. ``tick`` is called every :data:`TICK_EVERY` steps.
    Returns one trace per network, in order.
    """
    digits = load_digits()
    streams = {s: data_stream(s, steps)[1] for s in dict.fromkeys(seeds)}
    index = torch.stack([streams[s] for s in seeds], dim=1)  # (steps, K, batch)
    net = StackedMLP(models, activations)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM, foreach=True)
    losses, norms, layer_norms = [], [], []
    for step in range(1, steps + 1):
        rows = index[step - 1]
        loss = per_network_loss(net(digits.x_train[rows]), digits.y_train[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # type: ignore[no-untyped-call]
        losses.append(loss.detach())
        if _logged(step, steps, LOG_EVERY):  # gradient norms only where kept: they cost a third
            per_layer = net.layer_grad_norms()
            norms.append(per_layer.square().sum(dim=0).sqrt())
            if _logged(step, steps, LAYER_LOG_EVERY):
                layer_norms.append(per_layer)
        optimizer.step()
        if tick is not None and step % TICK_EVERY == 0:
            tick()
    return _traces(net, torch.stack(losses), torch.stack(norms), torch.stack(layer_norms))


def _traces(net: StackedMLP, losses: Tensor, norms: Tensor, layer_norms: Tensor) -> list[Trace]:
    """Evaluate every network and cut the stacked logs into one trace per network."""
    digits = load_digits()
    steps, k = losses.shape
    with torch.no_grad():
        train_logits = net(digits.x_train.expand(k, -1, -1))
        final = per_network_loss(train_logits, digits.y_train.expand(k, -1))
        test_logits = net(digits.x_test.expand(k, -1, -1))
        accuracy = (test_logits.argmax(dim=2) == digits.y_test).double().mean(dim=1)
    log_steps = [s for s in range(1, steps + 1) if _logged(s, steps, LOG_EVERY)]
    layer_steps = tuple(s for s in range(1, steps + 1) if _logged(s, steps, LAYER_LOG_EVERY))
    rows = torch.tensor(log_steps) - 1
    finite = torch.isfinite(losses)
    traces = []
    for j in range(k):
        bad = (~finite[:, j]).nonzero()
        traces.append(
            Trace(
                final_loss=float(final[j]),
                test_accuracy=float(accuracy[j]),
                first_nonfinite=int(bad[0, 0]) + 1 if len(bad) else None,
                log_steps=tuple(log_steps),
                loss=tuple(losses[rows, j].tolist()),
                grad_norm=tuple(norms[:, j].tolist()),
                layer_log_steps=layer_steps,
                layer_grad_norms=tuple(tuple(r) for r in layer_norms[:, :, j].tolist()),
            )
        )
    return traces
