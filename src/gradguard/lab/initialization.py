"""Experiment ``initialization``: a 30-layer ReLU MLP under seven initializations.

He et al. (2015) derived that a ReLU layer multiplies the variance of the signal by
``½ · n · Var[w]`` (forward, ``n`` the fan-in) and of the back-propagated gradient by the
same factor with the fan-out, so that only ``Var[w] = 2/n`` keeps a deep rectifier net's
signal alive; their 30-layer net stalled under the "Xavier" scale ``1/n`` and trained under
``2/n`` (Fig. 3). Before that, Gaussian weights of a fixed std 0.01 made nets deeper than
about 8 layers fail to converge (Simonyan & Zisserman 2015, quoted by He et al.).
Mishkin & Matas (2016) proposed LSUV: orthonormal weights, then each layer rescaled on one
batch until its output has unit variance. This experiment puts all of them side by side
on the bundled digits.

Setup. 64 → 30 × [Linear(64), ReLU] → Linear(10) (30 hidden layers, 31 weight layers),
biases 0, cross-entropy, SGD with momentum 0.9 at LR 0.005, batches of 64 drawn epoch by
epoch from data seed ``1000 + seed``, 600 steps (the LR of the reference setup: at 0.02 the
He net was unstable). Seven initializations (the six usual ones, orthogonal at two gains),
the weights drawn from model seed ``seed``:

* ``normal-0.01``: N(0, 0.01²) (×0.0032 per layer in variance: the signal underflows);
* ``normal-1``: N(0, 1) (×32 per layer: std 1e22 after 30 layers, and the first update
  overflows);
* ``xavier``: ``gradguard.init.initialize(model, "xavier")``, Xavier uniform, gain 1
  (``Var[w] = 1/n`` on square layers: ×½ per layer);
* ``he``: ``initialize(model, "he")``, N(0, 2/n) (×1);
* ``orthogonal``: ``initialize(model, "orthogonal")``, orthogonal with the rectifier's
  gain √2 before each ReLU (×1);
* ``orthogonal-unit``: orthogonal with gain 1 (×½), LSUV's starting point;
* ``lsuv``: ``gradguard.init.lsuv(model, batch)`` on 256 training images, the paper's
  ``Tol_var = 0.1`` and ``T_max = 10``.

Before training, :func:`gradguard.diagnose.diagnose` probes each network on the same 256
images: its verdict, the ratio of the gradient at the first layer's output to the last
layer's, the per-layer activation statistics and the Jacobian. A control at depth 10 and
LR 0.02 (Xavier and He) shows that Xavier's stall is a matter of depth.

The networks of one run are trained side by side: layer ``i`` of every network is one
``(K, in, out)`` tensor and the forward pass is a batched matrix product (``bmm``), each
network on its own batch. The loss is the sum of the networks' losses, so each network's
slice of the gradient is its own gradient, and SGD with momentum acts element by element:
the K runs are independent (a network that turns NaN leaves the others alone) and cost
about as much as a few single runs. Subnormal floats are flushed to zero while the
experiment runs (:func:`flush_denormals`): the N(0, 0.01²) network computes with them, and
x86 CPUs do so tens of times slower.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn

from gradguard import init as gg_init
from gradguard.diagnose import diagnose
from gradguard.errors import ConfigError
from gradguard.lab._harness import data_generator, seeds_for, single_thread
from gradguard.lab._records import (
    Claim,
    Criterion,
    ExperimentResult,
    Progress,
    Table,
    format_value,
)
from gradguard.lab.data import N_CLASSES, N_FEATURES, N_TRAIN, load_digits

DEPTH = 30
WIDTH = 64
LR = 0.005
MOMENTUM = 0.9
BATCH_SIZE = 64
STEPS = 600
PROBE_SIZE = 256
LOG_EVERY = 5
LAYER_LOG_EVERY = 50
TICK_EVERY = 50
CONTROL_DEPTH = 10
CONTROL_LR = 0.02
FULL_SEEDS = 3
CHANCE_LOSS = math.log(N_CLASSES)

INITS = ("normal-0.01", "normal-1", "xavier", "he", "orthogonal", "orthogonal-unit", "lsuv")
"""The initializations of the depth-30 networks, in table order."""

CONTROL_INITS = ("xavier", "he")

INIT_LABELS: Mapping[str, str] = {
    "normal-0.01": "N(0, 0.01²)",
    "normal-1": "N(0, 1)",
    "xavier": "Xavier U(±√(6/(n_in+n_out)))",
    "he": "He N(0, 2/n_in)",
    "orthogonal": "orthogonal, gain √2",
    "orthogonal-unit": "orthogonal, gain 1",
    "lsuv": "LSUV (orthogonal, then unit variance)",
    "lecun": "LeCun N(0, 1/n_in)",
}

EXPECTED_VERDICTS: Mapping[str, str] = {
    "normal-0.01": "vanishing",
    "normal-1": "exploding",
    "xavier": "vanishing",
    "he": "healthy",
    "orthogonal": "healthy",
    "orthogonal-unit": "vanishing",
    "lsuv": "healthy",
}
"""What the variance argument predicts per layer (×0.0032, ×32, ×½, ×1, ×1, ×½, ×1) over 30
layers, against :func:`gradguard.diagnose.diagnose`'s band of 10³."""

ACTIVATIONS: Mapping[str, tuple[Callable[[], nn.Module], Callable[[Tensor], Tensor]]] = {
    "relu": (nn.ReLU, torch.relu),
    "selu": (nn.SELU, torch.selu),
    "tanh": (nn.Tanh, torch.tanh),
}
"""Activation name: (module for the nn.Sequential, function for the stacked forward)."""

_NORMAL_STD = {"normal-0.01": 0.01, "normal-1": 1.0}
_LIBRARY_SCHEMES = ("xavier", "he", "orthogonal", "lecun")


# --- building and initializing ----------------------------------------------------------------


def build_mlp(depth: int, activation: str, width: int = WIDTH) -> nn.Sequential:
    """Return ``64 → depth × [Linear(width), activation] → Linear(10)``, not yet initialized.

    Built on the meta device and materialized uninitialized: call :func:`initialize_mlp`.
    """
    make_activation = ACTIVATIONS[activation][0]
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


def initialize_mlp(
    model: nn.Sequential, scheme: str, seed: int, batch: Tensor
) -> list[gg_init.LsuvRecord]:
    """Initialize ``model`` in place with ``scheme``, drawing from seed ``seed``.

    The global random state is forked, so the caller's is left as it was. The library's
    schemes (``xavier``, ``he``, ``orthogonal``, ``lecun``, ``lsuv``) come from
    :mod:`gradguard.init`; the fixed Gaussians and the unit-gain orthogonal init are
    applied here. Every bias is zero.

    Args:
        model: the network.
        scheme: a key of :data:`INIT_LABELS`.
        seed: seed of the draws.
        batch: the inputs LSUV rescales on (unused by other schemes).

    Returns:
        LSUV's record of each layer; empty for the other schemes.

    Raises:
        ConfigError: an unknown scheme.
    """
    if scheme not in INIT_LABELS:
        raise ConfigError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(INIT_LABELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if scheme == "lsuv":
            return gg_init.lsuv(model, batch)
        if scheme in _LIBRARY_SCHEMES:
            gg_init.initialize(model, scheme)
            return []
        with torch.no_grad():
            for layer in linears(model):
                if scheme == "orthogonal-unit":
                    nn.init.orthogonal_(layer.weight)
                else:
                    nn.init.normal_(layer.weight, 0.0, _NORMAL_STD[scheme])
                nn.init.zeros_(layer.bias)
    return []


# --- data ------------------------------------------------------------------------------------


def data_stream(seed: int, steps: int) -> tuple[Tensor, Tensor]:
    """Return the probe indices and the batch indices ``(steps, BATCH_SIZE)`` of ``seed``.

    Both come from data seed ``1000 + seed``: first a permutation whose first
    :data:`PROBE_SIZE` images are the probe (and LSUV) batch, then epoch after epoch a
    permutation cut into batches (the last, partial batch of an epoch is dropped).
    """
    generator = data_generator(seed)
    probe = torch.randperm(N_TRAIN, generator=generator)[:PROBE_SIZE]
    per_epoch = N_TRAIN // BATCH_SIZE
    epochs = -(-steps // per_epoch)
    batches = [
        torch.randperm(N_TRAIN, generator=generator)[: per_epoch * BATCH_SIZE].view(
            per_epoch, BATCH_SIZE
        )
        for _ in range(epochs)
    ]
    return probe, torch.cat(batches)[:steps]


# --- probing at initialization -----------------------------------------------------------------


def probe(model: nn.Sequential, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
    """Diagnose ``model`` at initialization with :func:`gradguard.diagnose.diagnose`.

    Returns:
        ``verdict``, ``gradient_ratio`` (gradient at the first layer's output over the last
        layer's), ``jacobian_rms`` (root mean squared singular value of the input-output
        Jacobian), ``hidden_mean``/``hidden_std`` (each activation module's output) and
        ``relative_grad`` (each Linear's output gradient over the last Linear's).
    """
    diag = diagnose(model, x, y, seed=seed)
    hidden = [layer for layer in diag.layers if layer.kind not in ("Linear", "Sequential")]
    weights = [layer for layer in diag.layers if layer.kind == "Linear"]
    return {
        "verdict": diag.verdict,
        "gradient_ratio": _number(diag.gradient_ratio),
        "jacobian_rms": math.nan if diag.jacobian is None else diag.jacobian.rms_singular_value,
        "hidden_mean": tuple(_number(layer.activation_mean) for layer in hidden),
        "hidden_std": tuple(_number(layer.activation_std) for layer in hidden),
        "relative_grad": tuple(_number(layer.relative_grad) for layer in weights),
    }


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


# --- training side by side ---------------------------------------------------------------------


class StackedMLP:
    """K MLPs of one architecture as one: layer ``i`` of all K is a ``(K, in, out)`` tensor.

    Built from initialized ``nn.Sequential`` models (copied, transposed; the models are not
    changed). ``x`` of shape ``(K, batch, 64)`` gives logits ``(K, batch, 10)``, network
    ``k`` on row block ``k``. The weights are stored input-major so that the forward pass
    is ``bmm(h, w) + b`` without a transpose (about 10 % faster on CPU).
    """

    def __init__(self, models: Sequence[nn.Sequential], activations: Sequence[str]) -> None:
        stacks = list(zip(*(linears(m) for m in models), strict=True))
        # Runs of networks with one activation: (function, first, end); usually just one.
        self.groups: list[tuple[Callable[[Tensor], Tensor], int, int]] = []
        for k, name in enumerate(activations):
            if self.groups and activations[k - 1] == name:
                fn, first, _ = self.groups[-1]
                self.groups[-1] = (fn, first, k + 1)
            else:
                self.groups.append((ACTIVATIONS[name][1], k, k + 1))
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
    """One network's training run, as :func:`train_stacked` recorded it.

    Attributes:
        final_loss: cross-entropy on the whole training set after training.
        test_accuracy: accuracy on the test set after training.
        first_nonfinite: the first step (1-based) whose batch loss was inf or NaN; None if
            none was.
        log_steps: the steps whose batch loss and gradient norm are kept.
        loss: batch loss at each of ``log_steps``, before that step's update.
        grad_norm: global gradient norm at each of ``log_steps``.
        layer_log_steps: the steps whose per-layer gradient norms are kept.
        layer_grad_norms: per-layer gradient norms (input to output) at each of those.
    """

    final_loss: float
    test_accuracy: float
    first_nonfinite: int | None
    log_steps: tuple[int, ...]
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    layer_log_steps: tuple[int, ...]
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

    Args:
        models: the initialized networks (left unchanged; their weights are copied).
        activations: each network's hidden activation, a key of :data:`ACTIVATIONS`.
        seeds: the model seed of each network; its batches come from :func:`data_stream`.
        steps: optimizer steps.
        lr: learning rate (momentum :data:`MOMENTUM`, batches of :data:`BATCH_SIZE`).
        tick: called every :data:`TICK_EVERY` steps (progress).

    Returns:
        One trace per network, in order.
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
    k = losses.shape[1]
    steps = losses.shape[0]
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


# --- one record per network --------------------------------------------------------------------


def _floats(values: Sequence[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Run:
    """One network of the experiment: its probe at initialization and its training.

    Attributes:
        activation: hidden activation (``relu``, ``selu``, ``tanh``).
        init: initialization, a key of :data:`INIT_LABELS`.
        depth: hidden layers.
        lr: learning rate.
        seed: model seed (data seed ``1000 + seed``).
        verdict: :func:`gradguard.diagnose.diagnose`'s verdict at initialization.
        gradient_ratio: gradient at the first layer's output over the last layer's.
        jacobian_rms: root mean squared singular value of the input-output Jacobian.
        hidden_mean: mean of each hidden activation's output at initialization.
        hidden_std: standard deviation of each hidden activation's output.
        relative_grad: each Linear's output gradient over the last Linear's.
        lsuv_std: output std of each layer after LSUV (empty for other inits).
        lsuv_iterations: LSUV's rescalings of each layer.
        final_loss, test_accuracy, first_nonfinite, log_steps, loss, grad_norm,
        layer_log_steps, layer_grad_norms: the training run, see :class:`Trace`.
    """

    activation: str
    init: str
    depth: int
    lr: float
    seed: int
    verdict: str
    gradient_ratio: float
    jacobian_rms: float
    hidden_mean: tuple[float, ...]
    hidden_std: tuple[float, ...]
    relative_grad: tuple[float, ...]
    lsuv_std: tuple[float, ...]
    lsuv_iterations: tuple[int, ...]
    final_loss: float
    test_accuracy: float
    first_nonfinite: int | None
    log_steps: tuple[int, ...]
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    layer_log_steps: tuple[int, ...]
    layer_grad_norms: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        record = asdict(self)
        record["layer_grad_norms"] = [list(r) for r in self.layer_grad_norms]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Run:
        """Rebuild a run from :meth:`to_dict` output, e.g. read back from results.json.

        Non-finite numbers stored as ``"nan"``/``"inf"`` text are read back as floats.
        """
        fields = dict(record)
        for key in ("lr", "gradient_ratio", "jacobian_rms", "final_loss", "test_accuracy"):
            fields[key] = float(fields[key])
        for key in ("hidden_mean", "hidden_std", "relative_grad", "lsuv_std", "loss", "grad_norm"):
            fields[key] = _floats(fields[key])
        for key in ("lsuv_iterations", "log_steps", "layer_log_steps"):
            fields[key] = tuple(int(v) for v in fields[key])
        fields["layer_grad_norms"] = tuple(_floats(r) for r in fields["layer_grad_norms"])
        return cls(**fields)


@dataclass(frozen=True)
class Setting:
    """Networks trained together: one depth and LR; (activation, init) pairs; seeds."""

    depth: int
    lr: float
    steps: int
    configs: tuple[tuple[str, str], ...]


def run_setting(
    setting: Setting, seeds: Sequence[int], progress: Callable[[], None] | None = None
) -> list[Run]:
    """Build, probe and train every (activation, init, seed) network of ``setting``.

    The runs come back seed by seed, each in the order of ``setting.configs``.
    ``progress`` is called after each probe and every :data:`TICK_EVERY` training steps.
    """
    digits = load_digits()
    keys = [(a, i, s) for s in seeds for a, i in setting.configs]
    probe_rows = {s: data_stream(s, setting.steps)[0] for s in seeds}
    models, probes, lsuv_records = [], [], []
    for activation, scheme, seed in keys:
        x, y = digits.x_train[probe_rows[seed]], digits.y_train[probe_rows[seed]]
        model = build_mlp(setting.depth, activation)
        lsuv_records.append(initialize_mlp(model, scheme, seed, x))
        probes.append(probe(model, x, y, seed))
        models.append(model)
        if progress is not None:
            progress()
    traces = train_stacked(
        models,
        [a for a, _, _ in keys],
        [s for _, _, s in keys],
        steps=setting.steps,
        lr=setting.lr,
        tick=progress,
    )
    return [
        Run(
            activation=activation,
            init=scheme,
            depth=setting.depth,
            lr=setting.lr,
            seed=seed,
            **probed,
            lsuv_std=tuple(r.std for r in records),
            lsuv_iterations=tuple(r.iterations for r in records),
            **asdict(trace),
        )
        for (activation, scheme, seed), probed, records, trace in zip(
            keys, probes, lsuv_records, traces, strict=True
        )
    ]


def progress_units(setting: Setting, n_seeds: int) -> int:
    """How many times :func:`run_setting` calls ``progress`` for ``n_seeds`` seeds."""
    return len(setting.configs) * n_seeds + setting.steps // TICK_EVERY


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero in the body, then turn flushing off again.

    A vanishing network computes with subnormal numbers (below 1.2e-38 in fp32), which x86
    CPUs process tens of times slower than normal ones: with them the N(0, 0.01²) network
    alone doubles the training time. Flushing changes only values that small. PyTorch
    has no getter for the flag; its default, off, is what is restored.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


# --- claims ------------------------------------------------------------------------------------

MAIN = Setting(DEPTH, LR, STEPS, tuple(("relu", i) for i in INITS))
CONTROL = Setting(CONTROL_DEPTH, CONTROL_LR, STEPS, tuple(("relu", i) for i in CONTROL_INITS))


class Runs:
    """The runs of one experiment, indexed by (activation, init, depth, seed)."""

    def __init__(self, runs: Sequence[Run], seeds: tuple[int, ...]) -> None:
        self.by_key = {(r.activation, r.init, r.depth, r.seed): r for r in runs}
        self.seeds = seeds

    def of(self, init: str, depth: int = DEPTH, activation: str = "relu") -> list[Run]:
        """The runs of one configuration, one per seed."""
        return [self.by_key[(activation, init, depth, s)] for s in self.seeds]


def share(values: Sequence[float], criterion: Criterion) -> float:
    """The fraction of ``values`` that meet ``criterion`` (for "at least 2 of 3 seeds")."""
    return sum(criterion.holds(v) for v in values) / len(values)


def listed(values: Sequence[float]) -> str:
    """``values`` formatted and joined, e.g. ``0.2, 0.38, nan``."""
    return ", ".join(format_value(v) for v in values)


def _stall_claim(claim_id: str, source: str, statement: str, paper: str, runs: list[Run]) -> Claim:
    n = len(runs)
    init = runs[0].init
    return Claim(
        id=claim_id,
        source=source,
        statement=statement,
        paper=paper,
        measured_on=(
            f"final training loss, {INIT_LABELS[init]}, {DEPTH} × {WIDTH} ReLU, LR {LR}, "
            f"{STEPS} steps, {n} seed(s); chance is ln 10 = {CHANCE_LOSS:.3f}"
        ),
        values=tuple(r.final_loss for r in runs),
        criterion=Criterion(low=2.2),
        note="diagnose at init: " + ", ".join(r.verdict for r in runs),
    )


def _trains_claim(claim_id: str, source: str, statement: str, paper: str, runs: list[Run]) -> Claim:
    losses = [r.final_loss for r in runs]
    below = Criterion(high=1.0)
    return Claim(
        id=claim_id,
        source=source,
        statement=statement,
        paper=paper,
        measured_on=(
            f"share of seeds with final training loss < 1.0 (pass: more than half), "
            f"{INIT_LABELS[runs[0].init]}, {DEPTH} × {WIDTH} ReLU, LR {LR}, {STEPS} steps, "
            f"{len(runs)} seed(s)"
        ),
        values=(share(losses, below),),
        criterion=Criterion(low=0.5),
        note=f"final loss {listed(losses)}; test accuracy "
        + listed([r.test_accuracy for r in runs]),
    )


def _vanishing_claims(r: Runs) -> list[Claim]:
    he, xavier = r.of("he"), r.of("xavier")
    ratio = [h.hidden_std[-1] / x.hidden_std[-1] for h, x in zip(he, xavier, strict=True)]
    return [
        _stall_claim(
            "normal-0.01-vanishes",
            "He et al. 2015 (sec. 2.2), quoting Simonyan & Zisserman 2015",
            "Gaussian weights of a fixed std 0.01 leave a deep net untrainable from scratch.",
            "std 0.01: models deeper than 8 conv layers have difficulties to converge",
            r.of("normal-0.01"),
        ),
        Claim(
            id="he-xavier-std-ratio",
            source="He et al. 2015 (eq. 10)",
            statement=(
                "Xavier's variance 1/n halves the signal's variance at every ReLU layer; "
                "He's 2/n keeps it: after 30 layers their stds differ by 2^15."
            ),
            paper="variance ×½·n·Var[w] per layer; 2^15 = 3.3e4 after 30 layers (derived)",
            measured_on=(
                f"last hidden layer's activation std at init, He / Xavier, {len(he)} seed(s)"
            ),
            values=tuple(ratio),
            criterion=Criterion(low=1e3),
        ),
        _stall_claim(
            "xavier-stalls",
            "He et al. 2015 (Fig. 3)",
            "A 30-layer rectifier net under the Xavier scale stalls.",
            "30 layers: 'Xavier' completely stalls, with diminishing gradients",
            xavier,
        ),
        _stall_claim(
            "orthogonal-unit-stalls",
            "He et al. 2015 (eq. 10); Mishkin & Matas 2016 (LSUV's starting point)",
            "Orthonormal weights with gain 1 halve the variance at every ReLU: they stall too.",
            "variance ×½ per ReLU layer (derived); LSUV starts from here",
            r.of("orthogonal-unit"),
        ),
    ]


def _exploding_claim(r: Runs) -> Claim:
    runs = r.of("normal-1")
    return Claim(
        id="normal-1-explodes",
        source="He et al. 2015 (sec. 2.2, eq. 10)",
        statement=(
            "Unit-variance Gaussian weights magnify the signal ×√32 per layer: the first "
            "update overflows and training turns to NaN at once."
        ),
        paper="an init off 2/n reduces or magnifies the signal exponentially (qualitative)",
        measured_on=(
            f"first step with a non-finite loss (steps + 1 = never), {INIT_LABELS['normal-1']}, "
            f"{DEPTH} × {WIDTH} ReLU, LR {LR}, {len(runs)} seed(s)"
        ),
        values=tuple(
            float(STEPS + 1 if x.first_nonfinite is None else x.first_nonfinite) for x in runs
        ),
        criterion=Criterion(high=10),
        note="last hidden std at init " + listed([x.hidden_std[-1] for x in runs]),
    )


def _training_claims(r: Runs) -> list[Claim]:
    return [
        _trains_claim(
            "he-trains",
            "He et al. 2015 (Fig. 3)",
            "The same 30-layer net under He init converges.",
            "30 layers: He init converges; Xavier does not",
            r.of("he"),
        ),
        _trains_claim(
            "orthogonal-trains",
            "Saxe et al. 2014; He et al. 2015 (gain)",
            "Orthogonal weights scaled by the rectifier's gain √2 train like He init.",
            "orthogonal init with the nonlinearity's gain trains deep nets (qualitative)",
            r.of("orthogonal"),
        ),
        _trains_claim(
            "lsuv-trains",
            "Mishkin & Matas 2016",
            "LSUV makes the stalled orthonormal init train, without normalization layers.",
            "thin 17-19-layer nets train with LSUV, matching or beating other inits "
            "(CIFAR-10, ≈94 % [recalled])",
            r.of("lsuv"),
        ),
    ]


def _lsuv_claim(r: Runs) -> Claim:
    runs = r.of("lsuv")
    iterations = max(max(x.lsuv_iterations) for x in runs)
    return Claim(
        id="lsuv-unit-variance",
        source="Mishkin & Matas 2016 (Alg. 1)",
        statement=(
            "LSUV brings every layer's output variance within Tol_var of 1 in at most "
            "T_max rescalings per layer."
        ),
        paper="Tol_var = 0.1, T_max = 10; the cost is negligible",
        measured_on=(
            f"largest |std² - 1| over the {DEPTH + 1} Linear outputs after gradguard.init.lsuv "
            f"on {PROBE_SIZE} images, {len(runs)} seed(s)"
        ),
        values=tuple(max(abs(s * s - 1) for s in x.lsuv_std) for x in runs),
        criterion=Criterion(high=0.1),
        note=f"at most {iterations} rescaling(s) per layer",
    )


def _verdict_claim(r: Runs) -> Claim:
    mismatches = [
        f"{x.init} seed {x.seed}: {x.verdict}"
        for init in INITS
        for x in r.of(init)
        if x.verdict != EXPECTED_VERDICTS[init]
    ]
    return Claim(
        id="diagnose-verdicts",
        source="gradguard.diagnose; He et al. 2015 (eq. 10)",
        statement=(
            "diagnose() calls each init what the variance argument predicts: vanishing, "
            "exploding or healthy."
        ),
        paper="×0.0032, ×32, ×½, ×1, ×1, ×½, ×1 per layer for the seven inits (derived)",
        measured_on=f"verdicts that differ from the prediction, {len(INITS)} inits × "
        f"{len(r.seeds)} seed(s)",
        values=(float(len(mismatches)),),
        criterion=Criterion(high=0.5),
        note="; ".join(mismatches) if mismatches else "all as predicted",
    )


def _control_claim(r: Runs) -> Claim:
    runs = [x for init in CONTROL_INITS for x in r.of(init, depth=CONTROL_DEPTH)]
    return Claim(
        id="shallow-control-trains",
        source="He et al. 2015 (Fig. 2)",
        statement="At moderate depth both Xavier and He init train: the stall is about depth.",
        paper="22 layers: both converge, He earlier",
        measured_on=(
            f"final training loss, Xavier and He, {CONTROL_DEPTH} × {WIDTH} ReLU, "
            f"LR {CONTROL_LR}, {STEPS} steps, {len(r.seeds)} seed(s)"
        ),
        values=tuple(x.final_loss for x in runs),
        criterion=Criterion(high=0.1),
    )


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every configuration and seed."""
    r = Runs(runs, seeds)
    return (
        *_vanishing_claims(r),
        _exploding_claim(r),
        *_training_claims(r),
        _lsuv_claim(r),
        _verdict_claim(r),
        _control_claim(r),
    )


# --- tables ------------------------------------------------------------------------------------


def cell(values: Sequence[float]) -> str:
    """One value, or mean [min, max] of several (non-finite values shown as such)."""
    if len(values) == 1:
        return format_value(values[0])
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return listed(values)
    mean = statistics.fmean(values)
    return f"{format_value(mean)} [{format_value(min(values))}, {format_value(max(values))}]"


def _first_nonfinite_cell(runs: Sequence[Run]) -> str:
    steps = [r.first_nonfinite for r in runs]
    return ", ".join("never" if s is None else str(s) for s in steps)


def _row(label: str, runs: Sequence[Run]) -> tuple[str, ...]:
    verdicts = sorted({r.verdict for r in runs})
    return (
        label,
        "/".join(verdicts),
        cell([r.hidden_std[-1] for r in runs]),
        cell([r.gradient_ratio for r in runs]),
        cell([r.final_loss for r in runs]),
        cell([r.test_accuracy for r in runs]),
        _first_nonfinite_cell(runs),
    )


TABLE_COLUMNS = (
    "init",
    "diagnose",
    "last hidden std at init",
    "grad ratio first/last",
    "final train loss",
    "test accuracy",
    "first non-finite step",
)


def tables(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
    """The depth-30 table and the depth-10 control table."""
    r = Runs(runs, seeds)
    spread = "" if len(seeds) == 1 else f"; mean [min, max] over {len(seeds)} seeds"
    return (
        Table(
            title=f"{DEPTH} × {WIDTH} ReLU MLP, SGD momentum {MOMENTUM}, LR {LR}, "
            f"{STEPS} steps{spread}",
            columns=TABLE_COLUMNS,
            rows=tuple(_row(INIT_LABELS[i], r.of(i)) for i in INITS),
            note="diagnose: gradguard.diagnose's verdict at init (band 10³); grad ratio: "
            "gradient at the first layer's output over the last layer's.",
        ),
        Table(
            title=f"Control: {CONTROL_DEPTH} × {WIDTH} ReLU MLP, LR {CONTROL_LR}{spread}",
            columns=TABLE_COLUMNS,
            rows=tuple(_row(INIT_LABELS[i], r.of(i, depth=CONTROL_DEPTH)) for i in CONTROL_INITS),
        ),
    )


# --- the experiment ----------------------------------------------------------------------------


class Initialization:
    """The ``initialization`` experiment (He et al. 2015; Mishkin & Matas 2016)."""

    name = "initialization"
    title = (
        "30-layer ReLU MLP under seven initializations: vanish, explode or train (He 2015, LSUV)"
    )
    references = (
        "He, Zhang, Ren & Sun 2015, Delving deep into rectifiers (arXiv 1502.01852)",
        "Mishkin & Matas 2016, All you need is a good init (arXiv 1511.06422)",
        "Saxe, McClelland & Ganguli 2014, Exact solutions to the nonlinear dynamics of "
        "learning in deep linear neural networks (arXiv 1312.6120)",
        "Simonyan & Zisserman 2015, Very deep convolutional networks for large-scale image "
        "recognition (arXiv 1409.1556)",
    )
    setting = (
        "Papers: 22- and 30-layer conv nets on ImageNet (He), 17-19-layer FitNets on CIFAR-10 "
        f"(LSUV). Here: {DEPTH} × {WIDTH} ReLU MLPs on 8×8 digits, {STEPS} SGD steps of "
        f"{BATCH_SIZE} images, a few seconds of CPU."
    )

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Probe and train every configuration; quick uses 1 seed, full :data:`FULL_SEEDS`.

        Both variants run every init and the control: the networks train side by side.
        """
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        total = sum(progress_units(s, len(seeds)) for s in (MAIN, CONTROL))
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        start = time.perf_counter()
        with single_thread(), flush_denormals():
            runs = run_setting(MAIN, seeds, tick) + run_setting(CONTROL, seeds, tick)
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config={
                "depth": DEPTH,
                "width": WIDTH,
                "lr": LR,
                "momentum": MOMENTUM,
                "batch_size": BATCH_SIZE,
                "steps": STEPS,
                "probe_size": PROBE_SIZE,
                "inits": {i: INIT_LABELS[i] for i in INITS},
                "control": {"depth": CONTROL_DEPTH, "lr": CONTROL_LR, "inits": CONTROL_INITS},
                "lsuv": {"tol": 0.1, "max_iter": 10},
                "log_every": LOG_EVERY,
                "layer_log_every": LAYER_LOG_EVERY,
            },
            seeds=seeds,
            claims=claims(runs, seeds),
            tables=tables(runs, seeds),
            measurements=tuple(r.to_dict() for r in runs),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = Initialization()


# --- the figure --------------------------------------------------------------------------------

_INIT_COLORS = {
    "normal-0.01": "#8c564b",
    "normal-1": "#d62728",
    "xavier": "#ff7f0e",
    "he": "#1f77b4",
    "orthogonal": "#17becf",
    "orthogonal-unit": "#bcbd22",
    "lsuv": "#2ca02c",
}


_LOSS_TOP = 30.0  # the loss axis ends here: N(0, 1)'s first loss is about 1e23


def _positive(values: Sequence[Any]) -> list[float]:
    """Floats for a log axis: zero, negative and non-finite values become gaps."""
    out = []
    for v in values:
        x = float(v)
        out.append(x if x > 0 and math.isfinite(x) else math.nan)
    return out


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Activation std and gradient by layer at init, loss and gradient norm in training.

    One line per init, the first seed, depth 30. Zero (underflowed) and non-finite values
    leave gaps; a run that turned NaN is marked with an × at its last finite loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in experiment_data["measurements"] if r["depth"] == DEPTH]
    first_seed = min(r["seed"] for r in rows)
    chosen = {r["init"]: r for r in rows if r["seed"] == first_seed}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (std_ax, grad_ax), (loss_ax, norm_ax) = axes
    for init, row in chosen.items():
        style = {"color": _INIT_COLORS.get(init), "label": INIT_LABELS.get(init, init)}
        std = _positive(row["hidden_std"])
        std_ax.plot(range(1, len(std) + 1), std, marker=".", **style)
        rel = _positive(row["relative_grad"])
        grad_ax.plot(range(1, len(rel) + 1), rel, marker=".", **style)
        loss_ax.plot(row["log_steps"], _positive(row["loss"]), lw=1, **style)
        if row["first_nonfinite"] is not None:
            loss_ax.plot(row["first_nonfinite"], _LOSS_TOP, marker="x", ms=10, color=style["color"])
        norm_ax.plot(row["log_steps"], _positive(row["grad_norm"]), lw=1, **style)
    std_ax.set(xlabel="hidden layer (input → output)", ylabel="activation std at init")
    grad_ax.set(xlabel="Linear layer", ylabel="output gradient / last layer's, at init")
    loss_ax.set(xlabel="step", ylabel="batch loss (×: the step it turned NaN)")
    loss_ax.set_ylim(1e-3, _LOSS_TOP * 2)
    norm_ax.set(xlabel="step", ylabel="global gradient norm")
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    loss_ax.axhline(CHANCE_LOSS, color="#7f7f7f", ls="--", lw=0.8)
    std_ax.legend(fontsize=8)
    fig.suptitle(
        f"{DEPTH}-layer ReLU MLP on digits under seven initializations (seed {first_seed})"
    )
    fig.tight_layout()
    path = out_dir / "initialization.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
