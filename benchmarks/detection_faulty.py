"""The pathological half of the detection corpus: real small CPU runs that go wrong for real.

Every scenario trains a real model on CPU (the bundled digits, or the adding problem for
the RNN), seeded from ``seed`` (``torch.manual_seed`` for the weights, a
``torch.Generator`` for the data), with a :class:`gradguard.Guard` built with its default
detectors and ``log_every=LOG_EVERY``. ``guard.step(loss)`` replaces ``optimizer.step()``
at every step (the guard skips non-finite steps itself) and the guard is closed at the end.
Each run returns its loss curve, its first non-finite step and, in ``notes``, the
measurements that show the pathology is real (read by ``tests/test_detection_faulty.py``
without looking at any detector). Each label's ``label_reason`` says how it was decided.

The measurements behind each label come from the runs themselves (seed 0 unless said
otherwise); ``python benchmarks/detection_faulty.py`` prints every scenario's notes, its
time and the events the current detectors raise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import gradguard as gg
from detection_common import LOG_EVERY, Expect, RunResult, Scenario, as_float
from gradguard.lab.data import load_digits

Batch = tuple[Tensor, Tensor]
StepFn = Callable[[int], "Tensor | tuple[Tensor, Tensor]"]  # step -> loss (and per-example)
ProbeFn = Callable[[int], None]  # called after backward, before guard.step

#: Cross-entropy of a uniform guess over the ten digit classes.
CHANCE_LOSS = math.log(10.0)
BATCH = 64


# --- shared pieces ----------------------------------------------------------------------


def _seeded(seed: int) -> torch.Generator:
    """Seed the weights (global RNG) and return the data-order generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _digit_batches(generator: torch.Generator, batch: int = BATCH) -> Iterator[Batch]:
    """Endless shuffled mini-batches of the digits training split, epoch after epoch."""
    data = load_digits()
    n = data.x_train.shape[0]
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            index = order[start : start + batch]
            yield data.x_train[index], data.y_train[index]


def _mlp(sizes: list[int], activation: type[nn.Module], *, he: bool = False) -> nn.Sequential:
    """Linear layers (at the even indices ``"0"``, ``"2"``, ...) with activations between.

    ``he`` re-draws every weight from He/Kaiming normal (fan-in) with zero biases;
    otherwise the PyTorch default init is kept.
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(n_in, n_out)
        if he:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each layer's gradients (a layer: the module owning the parameters).

    Computed here in fp64, independently of gradguard, in registration order, so the
    keys match ``guard.layer_names``.
    """
    squares: dict[str, float] = {}
    for name, param in model.named_parameters():
        layer = name.rpartition(".")[0]
        grad = 0.0 if param.grad is None else float(param.grad.double().square().sum())
        squares[layer] = squares.get(layer, 0.0) + grad
    return {layer: math.sqrt(value) for layer, value in squares.items()}


def _grads_finite(model: nn.Module) -> bool:
    """Whether every gradient element of ``model`` is finite."""
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@dataclass
class _Trace:
    """Per-step measurements a probe collects: per-layer gradient norms."""

    layers: list[dict[str, float]] = field(default_factory=list)

    def probe(self, model: nn.Module) -> ProbeFn:
        """A probe recording ``model``'s per-layer gradient norms at every step."""

        def record(_step: int) -> None:
            self.layers.append(_layer_grad_norms(model))

        return record

    def series(self, layer: str) -> list[float]:
        """One layer's gradient norm, step by step."""
        return [row[layer] for row in self.layers]


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    step_fn: StepFn,
    probe: ProbeFn | None = None,
) -> RunResult:
    """Run ``steps`` guarded steps; ``step_fn`` does the forward and backward pass.

    The gradients are cleared before each ``step_fn`` call. The run's first non-finite
    step is read here (loss or any gradient element), not from the guard.
    """
    guard = gg.Guard(model, optimizer, log_every=LOG_EVERY)
    losses: list[float] = []
    first_nonfinite: int | None = None
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        out = step_fn(step)
        loss, per_example = out if isinstance(out, tuple) else (out, None)
        if probe is not None:
            probe(step)
        finite = _grads_finite(model)
        guard.step(loss, batch=step, sample_losses=per_example)
        losses.append(as_float(loss))
        if first_nonfinite is None and not (finite and math.isfinite(losses[-1])):
            first_nonfinite = step
    guard.close()
    return RunResult(
        events=list(guard.events),
        losses=losses,
        layer_names=guard.layer_names,
        first_nonfinite_step=first_nonfinite,
    )


def _classifier_step(
    model: nn.Module, batches: Iterator[Batch], loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> StepFn:
    """A step function: next batch, forward, ``loss_fn(logits, labels)``, backward."""

    def step_fn(_step: int) -> Tensor | tuple[Tensor, Tensor]:
        x, y = next(batches)
        logits = model(x)
        if loss_fn is _ce:  # per-example losses too, for the guard's sample_losses
            per_example = nn.functional.cross_entropy(logits.float(), y, reduction="none")
            loss = per_example.mean()
            loss.backward()
            return loss, per_example.detach()
        loss = loss_fn(logits, y)
        loss.backward()
        return loss

    return step_fn


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.float(), labels)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _steps(quick: bool, full: int, fast: int) -> int:
    return fast if quick else full


# --- 1. deep sigmoid MLP: vanishing gradients ------------------------------------------

SIGMOID_DEPTH = 20
SIGMOID_WIDTH = 32


def run_deep_sigmoid_mlp(seed: int, quick: bool) -> RunResult:
    """A 20-layer sigmoid MLP (default init) on digits with SGD: vanishing from step 1."""
    generator = _seeded(seed)
    sizes = [64] + [SIGMOID_WIDTH] * (SIGMOID_DEPTH - 1) + [10]
    model = _mlp(sizes, nn.Sigmoid)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = _Trace()
    result = _train(
        model,
        optimizer,
        _steps(quick, 300, 60),
        _classifier_step(model, _digit_batches(generator), _ce),
        trace.probe(model),
    )
    first, last = trace.series("0"), trace.series(str(2 * (SIGMOID_DEPTH - 1)))
    ratios = [f / max(lst, 1e-300) for f, lst in zip(first, last, strict=True)]
    result.notes = {
        "first_over_last_grad_max": max(ratios),
        "first_grad_norm_max": max(first),
        "last_grad_norm_min": min(last),
        "loss_last20": _mean(result.losses[-20:]),
    }
    return result


# --- 2. deep ReLU MLP with N(0, 1) weights: exploding from the start -----------------------

NORMAL_DEPTH = 10


def run_deep_relu_normal(seed: int, quick: bool) -> RunResult:
    """A 10-layer ReLU MLP whose weights are N(0, 1) (not fan-in scaled), SGD lr 1e-3."""
    generator = _seeded(seed)
    model = _mlp([64] + [64] * (NORMAL_DEPTH - 1) + [10], nn.ReLU)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    trace = _Trace()
    probe = trace.probe(model)
    bias_grads: list[float] = []  # step 1: the back-propagated signal, layer by layer

    def probe_step1(step: int) -> None:
        probe(step)
        if step == 1:
            bias_grads.extend(
                float(m.bias.grad.double().norm())
                for m in model
                if isinstance(m, nn.Linear) and m.bias.grad is not None
            )

    result = _train(
        model,
        optimizer,
        _steps(quick, 100, 30),
        _classifier_step(model, _digit_batches(generator), _ce),
        probe_step1,
    )
    norms = list(trace.layers[0].values())
    result.notes = {
        "loss_step1": result.losses[0],
        "grad_norm_step1": math.sqrt(sum(v * v for v in norms)),
        "largest_layer_index_step1": float(norms.index(max(norms))),
        "first_over_largest_step1": norms[0] / max(norms),
        "smallest_layer_grad_step1": min(norms),
        "first_bias_grad_step1": bias_grads[0],
        "last_bias_grad_step1": bias_grads[-1],
    }
    return result


# --- 3. tanh RNN with recurrent spectral radius 3: exploding -------------------------------

RNN_HIDDEN = 64
RNN_LENGTH = 40
RNN_RADIUS = 3.0


class _AddingRNN(nn.Module):
    """A tanh ``nn.RNN`` and a linear read-out of its last hidden state."""

    def __init__(self, hidden: int, radius: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh")
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            weight = self.rnn.weight_hh_l0
            weight.mul_(radius / torch.linalg.eigvals(weight).abs().max())

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1]).squeeze(-1)


def _adding_batches(generator: torch.Generator, length: int, batch: int) -> Iterator[Batch]:
    """The adding problem: sum the two marked values of a sequence of U(0, 1) values."""
    columns = torch.arange(batch)
    while True:
        values = torch.rand(length, batch, generator=generator)
        first = torch.randint(0, length // 2, (batch,), generator=generator)
        second = torch.randint(length // 2, length, (batch,), generator=generator)
        marks = torch.zeros(length, batch)
        marks[first, columns] = 1.0
        marks[second, columns] = 1.0
        yield torch.stack([values, marks], dim=-1), (values * marks).sum(0)


def run_tanh_rnn_radius3(seed: int, quick: bool) -> RunResult:
    """A tanh RNN whose recurrent weight has spectral radius 3, adding problem, SGD 0.1."""
    generator = _seeded(seed)
    model = _AddingRNN(RNN_HIDDEN, RNN_RADIUS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = _Trace()
    result = _train(
        model,
        optimizer,
        _steps(quick, 100, 40),
        _classifier_step(model, _adding_batches(generator, RNN_LENGTH, 32), nn.functional.mse_loss),
        trace.probe(model),
    )
    rnn = trace.series("rnn")
    head = trace.series("head")
    finite_norms = [math.hypot(a, b) for a, b in zip(rnn, head, strict=True)]
    finite_norms = [v for v in finite_norms if math.isfinite(v)]
    finite_losses = [v for v in result.losses if math.isfinite(v)]
    result.notes = {
        "rnn_grad_norm_step1": rnn[0],
        "head_grad_norm_step1": head[0],
        "grad_norm_max_finite": max(finite_norms),
        "loss_step1": result.losses[0],
        "loss_max_finite": max(finite_losses),
    }
    return result


# --- 4. dead ReLU layer ----------------------------------------------------------------

DEAD_LAYER = 1  # the second Linear, module "2"
DEAD_BIAS = -10.0


def run_dead_relu(seed: int, quick: bool) -> RunResult:
    """A ReLU MLP whose second hidden layer has bias -10: every unit is 0 for every input."""
    generator = _seeded(seed)
    model = _mlp([64, 64, 64, 64, 10], nn.ReLU)
    with torch.no_grad():
        model[2 * DEAD_LAYER].bias.fill_(DEAD_BIAS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trace = _Trace()
    result = _train(
        model,
        optimizer,
        _steps(quick, 300, 60),
        _classifier_step(model, _digit_batches(generator), _ce),
        trace.probe(model),
    )
    names = list(trace.layers[0])
    zero = [name for name in names if max(trace.series(name)) == 0.0]
    with torch.no_grad():  # layers "0" and "2" never move: their gradients are 0
        hidden = torch.relu(model[0](load_digits().x_train))
        preactivation = model[2](hidden)
    result.notes = {
        "dead_max_preactivation": float(preactivation.max()),
        "zero_grad_layers": float(len(zero)),
        "first_zero_grad_layer_index": float(names.index(zero[0])) if zero else math.nan,
        "dead_grad_max": max(max(trace.series(name)) for name in names[: DEAD_LAYER + 1]),
        "live_grad_min_of_max": min(max(trace.series(name)) for name in names[DEAD_LAYER + 1 :]),
        "loss_max_rel_dev_from_chance": max(
            abs(v - CHANCE_LOSS) / CHANCE_LOSS for v in result.losses
        ),
    }
    return result


# --- 5, 6. learning-rate bursts ----------------------------------------------------------

BURST_LR = 0.02
BURST_STEPS = 4
EARLY_BURST = 20
EARLY_FACTOR = 50.0
LATE_BURST = 350
LATE_FACTOR = 100.0


def _burst_run(seed: int, steps: int, onset: int, factor: float) -> RunResult:
    """He-init ReLU MLP, SGD momentum 0.9; the LR is x``factor`` for 4 steps from ``onset``."""
    generator = _seeded(seed)
    model = _mlp([64, 128, 128, 10], nn.ReLU, he=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=BURST_LR, momentum=0.9)
    base = _classifier_step(model, _digit_batches(generator), _ce)

    def step_fn(step: int) -> Tensor | tuple[Tensor, Tensor]:
        burst = onset <= step < onset + BURST_STEPS
        for group in optimizer.param_groups:
            group["lr"] = BURST_LR * (factor if burst else 1.0)
        return base(step)

    result = _train(model, optimizer, steps, step_fn)
    result.notes = _burst_notes(result.losses, onset)
    return result


def _burst_notes(losses: list[float], onset: int) -> dict[str, float]:
    """Loss before the burst, its peak after, and how long the run takes to get back."""
    before = _mean(losses[onset - 10 : onset])  # steps onset-9 .. onset
    peak_at = max(range(onset, min(onset + 20, len(losses))), key=lambda i: losses[i])
    recovered = math.nan  # NaN: the 10-step mean never gets back to ``before`` in the run
    for i in range(peak_at, len(losses) - 9):
        if _mean(losses[i : i + 10]) <= before:
            recovered = float(i + 1 - onset)
            break
    return {
        "loss_before": before,
        "loss_peak": losses[peak_at],
        "peak_step": float(peak_at + 1),
        "jump": losses[peak_at] / before,
        "steps_to_recover": recovered,
        "loss_last10": _mean(losses[-10:]),
        "loss_drop_10_steps_before": losses[onset - 11] - losses[onset - 1],
    }


def run_lr_burst_early(seed: int, quick: bool) -> RunResult:
    """LR x50 for 4 steps from step 20, while the loss still falls steeply."""
    return _burst_run(seed, _steps(quick, 400, 150), EARLY_BURST, EARLY_FACTOR)


def run_lr_burst_late(seed: int, quick: bool) -> RunResult:
    """LR x100 for 4 steps from step 350, when the loss has flattened out."""
    return _burst_run(seed, _steps(quick, 400, 380), LATE_BURST, LATE_FACTOR)


# --- 7. poisoned batch ----------------------------------------------------------------

POISON_STEP = 150
POISON_FACTOR = 1e3
SLOW_LR = 0.005  # SGD momentum 0.9: the digits MLP still errs on some examples mid-run


def _slow_mlp(seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer, Iterator[Batch]]:
    """Default-init ReLU MLP 64-128-128-10, SGD lr 0.005 momentum 0.9, digits batches."""
    generator = _seeded(seed)
    model = _mlp([64, 128, 128, 10], nn.ReLU)
    optimizer = torch.optim.SGD(model.parameters(), lr=SLOW_LR, momentum=0.9)
    return model, optimizer, _digit_batches(generator)


def run_poisoned_batch(seed: int, quick: bool) -> RunResult:
    """One batch's inputs multiplied by 1e3 at step 150 (a data bug)."""
    model, optimizer, batches = _slow_mlp(seed)
    errors: list[float] = []

    def step_fn(step: int) -> Tensor | tuple[Tensor, Tensor]:
        x, y = next(batches)
        if step == POISON_STEP:
            x = x * POISON_FACTOR
        logits = model(x)
        errors.append(float((logits.argmax(1) != y).sum()))
        per_example = nn.functional.cross_entropy(logits, y, reduction="none")
        loss = per_example.mean()
        loss.backward()
        return loss, per_example.detach()

    trace = _Trace()
    result = _train(model, optimizer, _steps(quick, 300, 200), step_fn, trace.probe(model))
    i = POISON_STEP - 1
    total = [math.sqrt(sum(v * v for v in row.values())) for row in trace.layers]
    result.notes = {
        "loss_before": result.losses[i - 1],
        "loss_poisoned": result.losses[i],
        "loss_ratio": result.losses[i] / result.losses[i - 1],
        "loss_ratio_to_mean10": result.losses[i] / _mean(result.losses[i - 10 : i]),
        "grad_norm_ratio_to_mean10": total[i] / _mean(total[i - 10 : i]),
        "errors_in_poisoned_batch": errors[i],
        "loss_after_max10": max(result.losses[i + 1 : i + 11]),
    }
    return result


# --- 8. log(0) in a hand-written loss --------------------------------------------------

LOG0_STEP = 120


def run_nan_log0(seed: int, quick: bool) -> RunResult:
    """A hand-written ``-log(softmax(z)[y])``; at step 120 a class mask zeroes one label's p."""
    model, optimizer, batches = _slow_mlp(seed)
    zero_probs: list[float] = []

    def step_fn(step: int) -> Tensor | tuple[Tensor, Tensor]:
        x, y = next(batches)
        logits = model(x)
        if step == LOG0_STEP:  # the mask bug: the first example's class is masked out
            logits = logits.masked_fill(torch.arange(10) == y[0], -math.inf)
        p_true = torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        zero_probs.append(float((p_true == 0).sum()))
        per_example = -torch.log(p_true)
        loss = per_example.mean()
        loss.backward()
        return loss, per_example.detach()

    result = _train(model, optimizer, _steps(quick, 300, 200), step_fn)
    i = LOG0_STEP - 1
    finite = [v for v in result.losses if math.isfinite(v)]
    result.notes = {
        "zero_probabilities_at_step": zero_probs[i],
        "zero_probabilities_elsewhere": sum(zero_probs) - zero_probs[i],
        "loss_at_step": result.losses[i],
        "nonfinite_losses": float(len(result.losses) - len(finite)),
        "loss_before": result.losses[i - 1],
        "loss_after_mean10": _mean(result.losses[i + 1 : i + 11]),
    }
    return result


# --- 9. fp16 overflow ------------------------------------------------------------------

FP16_STEP = 100
FP16_LOSS_SCALE = 2.0**24
FP16_MAX = float(torch.finfo(torch.float16).max)


def run_fp16_overflow(seed: int, quick: bool) -> RunResult:
    """An fp16 (``.half()``) MLP; from step 100 the loss is scaled by 2^24 with no check."""
    generator = _seeded(seed)
    model = _mlp([64, 128, 128, 10], nn.ReLU, he=True).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=BURST_LR, momentum=0.9)
    batches = _digit_batches(generator)
    max_grads: list[float] = []  # largest |element| of the fp16 gradients as computed

    def step_fn(step: int) -> Tensor | tuple[Tensor, Tensor]:
        x, y = next(batches)
        scale = FP16_LOSS_SCALE if step >= FP16_STEP else 1.0
        loss = _ce(model(x.half()), y)
        (loss * scale).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        max_grads.append(max(float(g.float().abs().max()) for g in grads))
        for grad in grads:
            grad.div_(scale)  # unscale; an element that overflowed stays inf
        return loss

    result = _train(model, optimizer, _steps(quick, 200, 130), step_fn)
    i = FP16_STEP - 1
    result.notes = {
        "max_grad_before": max(max_grads[:i]),
        "max_grad_at_step": max_grads[i],
        "loss_at_step": result.losses[i],
        "nonfinite_steps": float(sum(not math.isfinite(g) for g in max_grads)),
        "fp16_max": FP16_MAX,
    }
    return result


# --- 10. slow divergence under an LR ramp ----------------------------------------------

RAMP_LR0 = 0.01
RAMP_FACTOR = 1.02
RAMP_SMOOTH = 20


def run_slow_divergence(seed: int, quick: bool) -> RunResult:
    """A tanh MLP with SGD momentum 0.9 whose LR grows x1.02 per step from 0.01."""
    generator = _seeded(seed)
    model = _mlp([64, 128, 128, 10], nn.Tanh)
    optimizer = torch.optim.SGD(model.parameters(), lr=RAMP_LR0, momentum=0.9)
    base = _classifier_step(model, _digit_batches(generator), _ce)

    def step_fn(step: int) -> Tensor | tuple[Tensor, Tensor]:
        for group in optimizer.param_groups:
            group["lr"] = RAMP_LR0 * RAMP_FACTOR ** (step - 1)
        return base(step)

    result = _train(model, optimizer, _steps(quick, 500, 300), step_fn)
    result.notes = _divergence_notes(result.losses)
    return result


def _divergence_notes(losses: list[float]) -> dict[str, float]:
    """Where the 20-step moving average of the loss is lowest, and how far it then rises."""
    finite = [v for v in losses if math.isfinite(v)]
    n = len(finite) - RAMP_SMOOTH + 1
    averages = [_mean(finite[i : i + RAMP_SMOOTH]) for i in range(n)]
    best = min(range(n), key=averages.__getitem__)
    later = min(best + 100, n - 1)
    return {
        "ma_min_center_step": float(best + 1 + RAMP_SMOOTH // 2),
        "ma_100_steps_later_over_min": averages[later] / averages[best],
        "ma_min": averages[best],
        "ma_last": averages[-1],
        "rise": averages[-1] / averages[best],
        "lr_at_onset": RAMP_LR0 * RAMP_FACTOR ** (best + RAMP_SMOOTH // 2),
    }


# --- 11. one layer's LR 1000x the others' -------------------------------------------------

HOT_LAYER = "2"
HOT_FACTOR = 1000.0


def run_layer_lr_too_high(seed: int, quick: bool) -> RunResult:
    """He-init ReLU MLP; the middle Linear ``"2"`` has its own param group at 1000x the LR."""
    generator = _seeded(seed)
    model = _mlp([64, 128, 128, 128, 10], nn.ReLU, he=True)
    lr = 0.01
    groups = [
        {"params": list(module.parameters()), "lr": lr * (HOT_FACTOR if name == HOT_LAYER else 1)}
        for name, module in model.named_children()
        if isinstance(module, nn.Linear)
    ]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    trace = _Trace()
    weight_norm: list[float] = []
    hot = model.get_submodule(HOT_LAYER)
    assert isinstance(hot, nn.Linear)
    probe = trace.probe(model)

    def probe_both(step: int) -> None:
        probe(step)
        weight_norm.append(float(hot.weight.detach().norm()))

    result = _train(
        model,
        optimizer,
        _steps(quick, 300, 100),
        _classifier_step(model, _digit_batches(generator), _ce),
        probe_both,
    )
    growth = {
        name: max(trace.series(name)[:20]) / trace.series(name)[0] for name in trace.layers[0]
    }
    result.notes = {
        "hot_weight_norm_growth": max(weight_norm) / weight_norm[0],
        "hot_grad_growth_20": growth[HOT_LAYER],
        "other_grad_growth_20_min": min(v for k, v in growth.items() if k != HOT_LAYER),
        "loss_step1": result.losses[0],
        "loss_peak_20": max(result.losses[:20]),
        "loss_last20": _mean(result.losses[-20:]),
    }
    return result


# --- the labelled scenarios ------------------------------------------------------------


# --- beyond the list: held out while the rules were written ----------------------

TANH_DEPTH = 15
TANH_STD = 0.3 / 8  # 0.3 / sqrt(fan-in 64): each layer shrinks the signal about 3x


def run_tanh_small_init(seed: int, quick: bool) -> RunResult:
    """A 15-layer tanh MLP whose weights are drawn 3x too small, SGD lr 0.05."""
    generator = _seeded(seed)
    model = _mlp([64] * TANH_DEPTH + [10], nn.Tanh)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear) and module.out_features == 64:
                nn.init.normal_(module.weight, std=TANH_STD)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trace = _Trace()
    result = _train(
        model,
        optimizer,
        _steps(quick, 150, 60),
        _classifier_step(model, _digit_batches(generator), _ce),
        trace.probe(model),
    )
    first, last = trace.series("0"), trace.series(str(2 * (TANH_DEPTH - 1)))
    result.notes = {
        "first_over_last_grad_max": max(
            f / max(lst, 1e-300) for f, lst in zip(first, last, strict=True)
        ),
        "loss_last20": _mean(result.losses[-20:]),
    }
    return result


def run_adam_lr_too_high(seed: int, quick: bool) -> RunResult:
    """A He-initialised 64-128-128-10 ReLU MLP trained with Adam at lr 1.0 from step 1."""
    generator = _seeded(seed)
    model = _mlp([64, 128, 128, 10], nn.ReLU, he=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    result = _train(
        model,
        optimizer,
        _steps(quick, 150, 60),
        _classifier_step(model, _digit_batches(generator), _ce),
    )
    result.notes = {
        "loss_max_first10": max(result.losses[:10]),
        "loss_last20": _mean(result.losses[-20:]),
    }
    return result


SCENARIOS: list[Scenario] = [
    Scenario(
        name="deep_sigmoid_mlp",
        healthy=False,
        description=(
            "20-layer sigmoid MLP (width 32, PyTorch default init) on digits, SGD lr 0.1, "
            "300 steps (quick: 60)."
        ),
        label_reason=(
            "Vanishing from step 1: at every step the first Linear's gradient norm is "
            "0.8-2.3e-16 against the last Linear's 0.16-0.64 (ratio below 1e-15), and the loss "
            "stays at chance (2.31 = ln 10 over the last 20 steps), so the early layers never "
            "learn; within=30 allows three drains of 10 steps."
        ),
        run=run_deep_sigmoid_mlp,
        expect=Expect(kinds=("vanishing",), onset=1, within=30, layer="0", causes=("saturation",)),
    ),
    Scenario(
        name="deep_relu_normal",
        healthy=False,
        description=(
            "10-layer ReLU MLP (width 64) with every weight drawn from N(0, 1), not scaled "
            "by fan-in, on digits, SGD lr 1e-3, 100 steps (quick: 30)."
        ),
        label_reason=(
            "Each layer multiplies the activations by about sqrt(64/2): at step 1 the loss is "
            "1.0e8 and the gradient norm 1.4e8, both finite; the first update makes the loss "
            "inf at step 2 (gradient elements finite, their norm past the fp32 range) and NaN "
            "from step 3, so the onset is 1. No layer is labelled: every layer's gradient is "
            "1e7-1e8 at step 1, largest at layer '12' with the first Linear's 0.17x of it "
            "(the bias gradients, the back-propagated signal, do grow toward the input, 0.9 "
            "to 3.3e6), so the explosion is not local to one layer's gradient norm."
        ),
        run=run_deep_relu_normal,
        expect=Expect(
            kinds=("exploding", "overflow"), onset=1, within=10, causes=("initialization",)
        ),
    ),
    Scenario(
        name="tanh_rnn_radius3",
        healthy=False,
        description=(
            "tanh nn.RNN (hidden 64) with its recurrent weight rescaled to spectral radius 3, "
            "adding problem of length 40, batch 32, SGD lr 0.1, 100 steps (quick: 40)."
        ),
        label_reason=(
            "At step 1 the RNN's gradient norm is 5.1e4 (3.7e4-5e5 over seeds 0-4, against "
            "2.5-7.5 at spectral radius 0.9); the first update saturates the RNN and from "
            "step 2 the loss grows about 100x and the gradient norm about 12x per step (loss "
            "1.5 at step 1, 510 at step 3, 8.8e36 at step 19) until the loss is inf at step "
            "20 and NaN after, on every seed 0-4. Exploding from the start: onset 1."
        ),
        run=run_tanh_rnn_radius3,
        expect=Expect(kinds=("exploding",), onset=1, within=10, causes=("initialization",)),
    ),
    Scenario(
        name="dead_relu",
        healthy=False,
        description=(
            "ReLU MLP 64-64-64-64-10 (default init) whose second hidden layer ('2') has bias "
            "-10, on digits, SGD lr 0.1 momentum 0.9, 300 steps (quick: 60)."
        ),
        label_reason=(
            "Layer '2''s pre-activations are at most -6.5 over the whole training set, so its "
            "64 ReLUs output 0 for every input: the gradients of layers '0' and '2' are "
            "exactly 0 at every step (measured), and the loss stays within 1.3% of ln 10 for "
            "the whole run. Onset 1; layer '0' is the first layer with a zero gradient."
        ),
        run=run_dead_relu,
        expect=Expect(kinds=("vanishing",), onset=1, within=30, layer="0", causes=("dead_units",)),
    ),
    Scenario(
        name="lr_burst_early",
        healthy=False,
        description=(
            "He-init ReLU MLP 64-128-128-10 on digits, SGD lr 0.02 momentum 0.9; the LR is "
            "x50 for steps 20-23, then restored; 400 steps (quick: 150)."
        ),
        label_reason=(
            "The burst comes while the loss still falls fast (1.44 to 0.71 over the 10 steps "
            "before); the loss jumps from 0.71 (mean of steps 11-20) to 88 at step 23 (x124; "
            "x124-1560 over seeds 0-2) and needs 37 steps (25-53) to get back to 0.71. Onset "
            "= the first burst step, whose update is the first bad one."
        ),
        run=run_lr_burst_early,
        expect=Expect(kinds=("spike",), onset=EARLY_BURST, within=10, causes=("lr_too_high",)),
    ),
    Scenario(
        name="lr_burst_late",
        healthy=False,
        description=(
            "The same MLP and optimizer; the LR is x100 for steps 350-353, then restored; "
            "400 steps (quick: 380, same onset)."
        ),
        label_reason=(
            "Once the loss has flattened (0.0076), the burst lifts it to 11.6 at step 354 "
            "(x1500; x1500-2500 over seeds 0-2) and the run is still 40x its pre-burst level "
            "at step 400. The factor is 100, not the early burst's 50, because x50 at this "
            "point barely moves some seeds (seed 2: loss x1.4). Onset = the first burst step."
        ),
        run=run_lr_burst_late,
        expect=Expect(kinds=("spike",), onset=LATE_BURST, within=10, causes=("lr_too_high",)),
    ),
    Scenario(
        name="poisoned_batch",
        healthy=False,
        description=(
            "Default-init ReLU MLP 64-128-128-10 on digits, SGD lr 0.005 momentum 0.9; the "
            "batch of step 150 has its inputs multiplied by 1e3; 300 steps (quick: 200)."
        ),
        label_reason=(
            "The poisoned step's loss is 28.8 against 0.66 the step before (x44; x44-124 over "
            "seeds 0-2: the batch's 6-9 misclassified examples get 1000x margins) and its "
            "gradient norm 630x the previous 10 steps' mean; the update damages the model, "
            "whose loss stays at 10-20 for 20 steps. The spike is at that step: within=0."
        ),
        run=run_poisoned_batch,
        expect=Expect(
            kinds=("spike",),
            onset=POISON_STEP,
            within=0,
            causes=("bad_batch",),
            batch=POISON_STEP,
            examples=True,
        ),
    ),
    Scenario(
        name="nan_log0",
        healthy=False,
        description=(
            "Default-init ReLU MLP on digits with a hand-written -log(softmax(z)[y]) loss; at "
            "step 120 a class mask sets the first example's class logit to -inf for the whole "
            "batch; 300 steps (quick: 200)."
        ),
        label_reason=(
            "At step 120 the 5 examples of the masked class have a softmax probability of "
            "exactly 0, so the loss is -log(0) = inf and every gradient NaN at that step, and "
            "at no other (no other step has a zero probability). Onset = that step, within=0."
        ),
        run=run_nan_log0,
        expect=Expect(
            kinds=("nonfinite",),
            onset=LOG0_STEP,
            within=0,
            causes=("nonfinite_loss",),
            batch=LOG0_STEP,
            examples=True,
        ),
    ),
    Scenario(
        name="fp16_overflow",
        healthy=False,
        description=(
            "He-init ReLU MLP converted with .half() (fp16 weights, activations and gradients) "
            "on digits, SGD lr 0.02 momentum 0.9; from step 100 the loss is multiplied by 2^24 "
            "before backward and the gradients divided by it after, with no overflow check; "
            "200 steps (quick: 130)."
        ),
        label_reason=(
            "Plain fp16 training is fine up to step 99 (largest gradient element 0.48); from "
            "step 100 the fp16 logits' gradient, 2^24 (p - y) / 64, passes 65504 and becomes "
            "inf, so the output layer's gradients hold inf and the earlier layers' NaN (inf "
            "times 0) at step 100 and every step after, while the loss stays finite (0.067). "
            "Onset = step 100, within=0."
        ),
        run=run_fp16_overflow,
        expect=Expect(
            kinds=("overflow", "nonfinite"), onset=FP16_STEP, within=0, causes=("overflow",)
        ),
    ),
    Scenario(
        name="slow_divergence",
        healthy=False,
        description=(
            "tanh MLP 64-128-128-10 (default init) on digits, SGD momentum 0.9 with the LR "
            "multiplied by 1.02 every step from 0.01; 500 steps (quick: 300)."
        ),
        label_reason=(
            "The 20-step moving average of the loss is lowest over steps 132-151 (0.036, LR "
            "0.16), centred on step 142 (141-158 over seeds 0-3), and rises from there for "
            "good: 22x its minimum 100 steps later and 570 at step 500, with no NaN/Inf in "
            "the run. Onset = that centre; within=100, by which point the rise is unmistakable."
        ),
        run=run_slow_divergence,
        expect=Expect(
            kinds=("divergence",),
            onset=142,
            within=100,
            before_nonfinite=True,
            causes=("lr_too_high",),
        ),
    ),
    Scenario(
        name="layer_lr_too_high",
        healthy=False,
        description=(
            "He-init ReLU MLP 64-128-128-128-10 on digits, SGD momentum 0.9 at lr 0.01, with "
            "the middle Linear '2' in its own param group at lr 10 (1000x); 300 steps "
            "(quick: 100)."
        ),
        label_reason=(
            "Layer '2''s weight norm grows 39x and the loss goes from 3.1 to 55 by step 7; "
            "the run never gets healthy (1.4 over the last 20 steps, after a second blow-up "
            "near step 231). The layer to name is '2', the one whose updates are too large; "
            "its gradient does not show it (in a ReLU chain a layer's gradient scales with "
            "the other layers' weights, so the other layers' gradient norms grow 14x or more "
            "in the first 20 steps while layer '2''s grows 1.6x), its weights do. Onset 1."
        ),
        run=run_layer_lr_too_high,
        expect=Expect(
            kinds=("exploding", "spike"),
            onset=1,
            within=10,
            layer=HOT_LAYER,
            causes=("lr_too_high",),
        ),
    ),
    Scenario(
        name="tanh_small_init",
        healthy=False,
        description=(
            "15-layer tanh MLP, width 64, weights N(0, (0.3/8)^2), about a third of the "
            "Xavier scale, on digits; SGD lr 0.05, 150 steps (quick: 60). Added after the "
            "rules were written, to check they carry over."
        ),
        label_reason=(
            "Each layer shrinks the signal about threefold, forward and backward, so the "
            "first layer's gradient is many orders of magnitude below the last's from step 1 "
            "and the loss stays at chance (ln 10): vanishing gradients in the first layers."
        ),
        run=run_tanh_small_init,
        expect=Expect(
            kinds=("vanishing",), onset=1, within=30, layer="0", causes=("initialization",)
        ),
    ),
    Scenario(
        name="adam_lr_too_high",
        healthy=False,
        description=(
            "He-initialised 64-128-128-10 ReLU MLP on digits with Adam at lr 1.0, a hundred "
            "to a thousand times the usual, from the first step; 150 steps (quick: 60). "
            "Added after the rules were written."
        ),
        label_reason=(
            "Adam's first steps move every weight by about the LR, 1.0, against weights of "
            "about 0.1: the loss jumps far above chance within the first steps and the "
            "network never trains (its ReLUs die). Exploding from step 1."
        ),
        run=run_adam_lr_too_high,
        expect=Expect(
            kinds=("exploding", "spike", "divergence"), onset=1, within=10, causes=("lr_too_high",)
        ),
    ),
]


def main() -> None:
    """Run every scenario (seed 0) and print its time, notes and the events raised."""
    torch.set_num_threads(1)
    load_digits()
    for scenario in SCENARIOS:
        for quick in (False, True):
            start = time.perf_counter()
            result = scenario.run(0, quick)
            seconds = time.perf_counter() - start
            print(
                f"{scenario.name} quick={quick}: {seconds:.2f} s, {result.steps} steps, "
                f"first non-finite step {result.first_nonfinite_step}, "
                f"expect {scenario.expect_for(quick)}"
            )
            print("  notes: " + ", ".join(f"{k}={v:.4g}" for k, v in result.notes.items()))
            for event in result.events[:6]:
                known = event.extra.get("detected_at", event.step)
                print(
                    f"  {event.kind} step {event.step} (known {known}) "
                    f"{event.layers[:1]}: {event.message[:80]}"
                )
            if len(result.events) > 6:
                print(f"  ... {len(result.events)} events in all")


if __name__ == "__main__":
    main()
