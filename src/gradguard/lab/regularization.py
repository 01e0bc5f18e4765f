"""Experiment ``regularization``: what L2 weight decay and dropout do to weights and gradients.

Tests the guides' "regularization keeps gradients from growing" next to Krogh & Hertz 1992
and Srivastava et al. 2014, on clean and on noisy labels. See docs/lab/regularization.md
for the setup, the papers' numbers and the criteria.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradguard.lab._figures import block_means, finish, new_figure
from gradguard.lab._harness import LabExperiment
from gradguard.lab._records import BySeed, Claim, Criterion, Table, cell, listed
from gradguard.lab._training import DigitsRun, digit_batches, train_loop
from gradguard.lab.data import N_CLASSES, N_FEATURES, N_TRAIN, load_digits
from gradguard.stats import grad_stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH, DEPTH = 256, 2
BATCH_SIZE, LR, MOMENTUM, STEPS = 64, 0.05, 0.9, 1500
WEIGHT_DECAY, DROPOUT = 5e-4, 0.5
NORM_EVERY = 10
"""||θ|| is measured every this many steps."""
LATE_FRACTION = 0.1
"""The late (early) gradient norm is the mean over the last (first) tenth of the steps."""
# The gradient-growth regime: noisy labels (see docs/lab/regularization.md).
GROWTH_DEPTH, GROWTH_WIDTH, GROWTH_STEPS = 6, 128, 600
LABEL_NOISE, LABEL_NOISE_SEED_OFFSET = 0.3, 2000
GROWTH_MIN, RESTRAIN_MAX = 2.0, 0.8
"""Criteria: unregularized late / early gradient norm above, regularized / unregularized below."""

CLEAN_ARMS = ("none", "l2", "dropout")
NOISY_ARMS = ("noisy-none", "noisy-l2", "noisy-dropout")
ARMS = CLEAN_ARMS + NOISY_ARMS
ARM_LABELS: Mapping[str, str] = {
    "none": "no regularization",
    "l2": f"L2 weight decay {WEIGHT_DECAY:g}",
    "dropout": f"dropout {DROPOUT:g}",
    "noisy-none": f"noisy labels, depth {GROWTH_DEPTH}: no regularization",
    "noisy-l2": f"noisy labels, depth {GROWTH_DEPTH}: L2 weight decay {WEIGHT_DECAY:g}",
    "noisy-dropout": f"noisy labels, depth {GROWTH_DEPTH}: dropout {DROPOUT:g}",
}


def regularizer(arm: str) -> str:
    """Return ``none``, ``l2`` or ``dropout``: the arm's regularizer, whatever its regime.

    Example:
        >>> regularizer("noisy-l2"), regularizer("dropout")
        ('l2', 'dropout')
    """
    return arm.removeprefix("noisy-")


def is_noisy(arm: str) -> bool:
    """Return whether ``arm`` belongs to the gradient-growth (noisy-label) regime."""
    return arm.startswith("noisy-")


def noisy_labels(seed: int) -> Tensor:
    """Return the training labels with :data:`LABEL_NOISE` of them redrawn uniformly at random.

    The rows to redraw and their new classes come from seed ``2000 + seed`` (a redrawn label
    may equal the true one, so about 27 % end up wrong).
    """
    digits = load_digits()
    generator = torch.Generator().manual_seed(LABEL_NOISE_SEED_OFFSET + seed)
    labels = digits.y_train.clone()
    redraw = torch.rand(N_TRAIN, generator=generator) < LABEL_NOISE
    labels[redraw] = torch.randint(0, N_CLASSES, (int(redraw.sum()),), generator=generator)
    return labels


def build_model(arm: str, seed: int) -> nn.Sequential:
    """Return the arm's MLP (2 x 256, or 6 x 128 for the noisy-label arms), default init.

    Dropout arms get dropout after each hidden ReLU; the global RNG is forked and kept.
    """
    depth, width = (GROWTH_DEPTH, GROWTH_WIDTH) if is_noisy(arm) else (DEPTH, WIDTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        fan_in = N_FEATURES
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            if regularizer(arm) == "dropout":
                layers.append(nn.Dropout(DROPOUT))
            fan_in = width
        layers.append(nn.Linear(fan_in, N_CLASSES))
        return nn.Sequential(*layers)


def parameter_norm(model: nn.Module) -> float:
    """Return ||θ||, the L2 norm over every parameter (weights and biases)."""
    with torch.no_grad():
        return math.sqrt(sum(float(p.pow(2).sum()) for p in model.parameters()))


@dataclass(frozen=True)
class Run(DigitsRun):
    """One arm of one seed.

    Dropout masks draw from the data seed; losses and accuracies are in eval mode, on the
    true labels; gradient norms are of the data loss only.
    """

    arm: str
    """A name in :data:`ARMS`."""
    test_loss: float
    train_accuracy: float
    late_grad_norm: float
    """Mean global gradient norm of the last 10 % of the steps."""
    early_grad_norm: float
    """Mean global gradient norm of the first 10 % of the steps."""
    full_grad_norm: float
    """Gradient norm of the data loss on the whole training split, at the end."""
    norm_steps: tuple[int, ...]
    """The steps of ``param_norm`` (0 is the initialization)."""
    param_norm: tuple[float, ...]

    @property
    def gap(self) -> float:
        """Test minus train cross-entropy."""
        return self.test_loss - self.train_loss

    @property
    def final_param_norm(self) -> float:
        """||θ|| at the end of training."""
        return self.param_norm[-1]

    @property
    def weight_growth(self) -> float:
        """||θ|| at the end over ||θ|| at initialization."""
        return self.param_norm[-1] / self.param_norm[0]

    @property
    def gradient_growth(self) -> float:
        """Late over early mean gradient norm (last and first 10 % of the steps)."""
        return self.late_grad_norm / self.early_grad_norm

    @property
    def accuracy_gap(self) -> float:
        """Train minus test accuracy (clean labels on both splits)."""
        return self.train_accuracy - self.test_accuracy


def _evaluate(model: nn.Module, labels: Tensor) -> dict[str, float]:
    """Eval-mode losses and accuracies (true labels), and ``full_grad_norm`` on ``labels``."""
    digits = load_digits()
    model.eval()
    with torch.no_grad():
        out_train, out_test = model(digits.x_train), model(digits.x_test)
    result = {
        "train_loss": float(nn.functional.cross_entropy(out_train, digits.y_train)),
        "test_loss": float(nn.functional.cross_entropy(out_test, digits.y_test)),
        "train_accuracy": float((out_train.argmax(dim=1) == digits.y_train).float().mean()),
        "test_accuracy": float((out_test.argmax(dim=1) == digits.y_test).float().mean()),
    }
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(digits.x_train), labels)
    loss.backward()  # type: ignore[no-untyped-call]
    result["full_grad_norm"] = float(grad_stats(model).total)
    model.zero_grad(set_to_none=True)
    model.train()
    return result


def train(arm: str, seed: int) -> Run:
    """Train one arm (:data:`STEPS` steps, or :data:`GROWTH_STEPS` for the noisy-label arms)."""
    digits = load_digits()
    model = build_model(arm, seed)
    steps = GROWTH_STEPS if is_noisy(arm) else STEPS
    labels = noisy_labels(seed) if is_noisy(arm) else digits.y_train
    decay = WEIGHT_DECAY if regularizer(arm) == "l2" else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=decay)
    losses: list[float] = []
    norms: list[float] = []
    param_norms = [parameter_norm(model)]
    # The data loss's gradient, read before the step adds the decay (CPU: reading costs no sync).
    optimizer.register_step_pre_hook(lambda *_: norms.append(float(grad_stats(model).total)))

    def after(step: int, loss: Tensor, report: object) -> None:
        losses.append(loss.item())
        if step % NORM_EVERY == 0:
            param_norms.append(parameter_norm(model))

    def loss_of(model: nn.Module, index: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(digits.x_train[index]), labels[index])

    batches = digit_batches(seed, BATCH_SIZE)
    # Dropout masks come from the global RNG: fork it and seed it with the data stream's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 + seed)
        train_loop(model, optimizer, batches, loss_of, steps, after_step=after)
    window = int(steps * LATE_FRACTION)
    return Run(
        arm=arm,
        seed=seed,
        **_evaluate(model, labels),
        late_grad_norm=statistics.fmean(norms[-window:]),
        early_grad_norm=statistics.fmean(norms[:window]),
        loss=tuple(losses),
        grad_norm=tuple(norms),
        norm_steps=tuple(range(0, steps + 1, NORM_EVERY)),
        param_norm=tuple(param_norms),
    )


def claims(runs: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every arm and seed."""
    r = BySeed(runs, seeds, key=lambda x: (x.arm,))

    def ratio(arm: str, field: str, base: str = "none") -> tuple[float, ...]:
        """``field`` of ``arm`` over that of ``base``, per seed (NaN where it is 0)."""
        pairs = zip(r.get(arm), r.get(base), strict=True)
        return tuple(_divide(getattr(a, field), getattr(b, field)) for a, b in pairs)

    def versus(arm: str, text: Callable[[Run], str]) -> str:
        pairs = zip(r.get(arm), r.get("none"), strict=True)
        return ", ".join(f"{text(a)} vs {text(b)}" for a, b in pairs)

    n = f"{len(seeds)} seed(s)"
    late = f"mean gradient norm over the last {LATE_FRACTION:.0%} of steps"
    guides = "regularization 'helps prevent the gradients from becoming too large' (no number)"
    regime = f"{LABEL_NOISE:.0%} noisy labels, {GROWTH_DEPTH} x {GROWTH_WIDTH} MLP"
    growth = listed([x.gradient_growth for x in r.get("noisy-none")])
    gap_sources = {
        "l2": ("Krogh & Hertz 1992", "weight decay improves generalization"),
        "dropout": (
            "Srivastava et al. 2014",
            "dropout reduces overfitting: lower test error on every benchmark tried "
            "(MNIST, CIFAR, ImageNet, ...; qualitative here)",
        ),
    }
    return (
        Claim(
            "weights-grow-without-regularization",
            "Soudry et al. 2018; practitioners' guides",
            "Without regularization the parameter norm grows during training.",
            "on separable data GD on the cross-entropy grows ||w|| like log t",
            f"||θ|| final / at init, no regularization, {n}, {STEPS} steps",
            tuple(x.weight_growth for x in r.get("none")),
            Criterion(low=1.05),
        ),
        Claim(
            "l2-restrains-weight-growth",
            "Krogh & Hertz 1992; practitioners' guides",
            "With L2 weight decay the final parameter norm is below 0.9x the unregularized run's.",
            "weight decay suppresses weight components the data does not need",
            f"final ||θ||, L2 / none, λ = {WEIGHT_DECAY:g}, {n}, {STEPS} steps",
            ratio("l2", "final_param_norm"),
            Criterion(high=0.9),
        ),
        Claim(
            "l2-gradient-at-equilibrium",
            "Krogh & Hertz 1992",
            "With L2 the data gradient settles where it balances the decay: "
            "||∇L|| = λ||θ|| within a factor 2.",
            "the minimum of L + λ/2 ||θ||² has ∇L = -λθ (the objective's definition)",
            f"||∇L|| on the full training split / (λ ||θ||) at the end, {n}, {STEPS} steps",
            tuple(x.full_grad_norm / (WEIGHT_DECAY * x.param_norm[-1]) for x in r.get("l2")),
            Criterion(low=0.5, high=2.0),
        ),
        *(
            Claim(
                f"{arm}-restrains-gradient-norm",
                "practitioners' guides",
                f"With {ARM_LABELS[arm]} the late-training gradient norm is lower "
                "than without regularization.",
                guides,
                f"{late}, {ARM_LABELS[arm]} / none, {n}",
                ratio(arm, "late_grad_norm"),
                Criterion(high=1.0),
                f"unregularized late norm {listed([x.late_grad_norm for x in r.get('none')])}",
            )
            for arm in ("l2", "dropout")
        ),
        *(
            Claim(
                f"{arm}-narrows-generalization-gap",
                f"{source}; practitioners' guides",
                f"{ARM_LABELS[arm].capitalize()} narrows the train/test "
                "cross-entropy gap to below 0.8x the unregularized one.",
                paper,
                f"(test - train cross-entropy), {ARM_LABELS[arm]} / none, {n}",
                ratio(arm, "gap"),
                Criterion(high=0.8),
                f"unregularized gap {listed([x.gap for x in r.get('none')])}; test "
                f"accuracy {versus(arm, lambda x: f'{x.test_accuracy:.3f}')} (this arm vs none)",
            )
            for arm, (source, paper) in gap_sources.items()
        ),
        Claim(
            "dropout-narrows-accuracy-gap",
            "Srivastava et al. 2014; practitioners' guides",
            "Dropout narrows the train/test accuracy gap (the paper's measure: "
            "classification error).",
            "dropout lowers the test error at equal training error (MNIST 1.60 % -> "
            "1.25 %, ...; qualitative here)",
            f"(train - test accuracy), {ARM_LABELS['dropout']} / none, {n}",
            ratio("dropout", "accuracy_gap"),
            Criterion(high=1.0),
            "train / test accuracy "
            + versus("dropout", lambda x: f"{x.train_accuracy:.3f}/{x.test_accuracy:.3f}")
            + " (dropout vs none)",
        ),
        Claim(
            "gradient-grows-without-regularization",
            "precondition of the two claims below",
            f"With {regime} and no regularization the training gradient norm grows: "
            f"late over early is above {GROWTH_MIN:g}.",
            "(the regime the guides' claim is about: gradients 'becoming too large')",
            f"{late} / the first {LATE_FRACTION:.0%}'s, {regime}, none, {n}, {GROWTH_STEPS} steps",
            tuple(x.gradient_growth for x in r.get("noisy-none")),
            Criterion(low=GROWTH_MIN),
        ),
        *(
            Claim(
                f"{arm}-restrains-gradient-growth",
                "practitioners' guides",
                f"Where the gradient grows, {ARM_LABELS[arm]} keeps the late "
                f"gradient norm below {RESTRAIN_MAX:g}x the unregularized run's.",
                guides,
                f"{late}, {regime}, {ARM_LABELS[arm]} / none, {n}, {GROWTH_STEPS} steps",
                ratio(f"noisy-{arm}", "late_grad_norm", base="noisy-none"),
                Criterion(high=RESTRAIN_MAX),
                f"unregularized growth (late / early) {growth}; this arm's "
                + listed([x.gradient_growth for x in r.get(f"noisy-{arm}")]),
            )
            for arm in ("l2", "dropout")
        ),
    )


def _divide(a: float, b: float) -> float:
    """Return a / b, NaN where b is 0 (a claim on it then fails rather than crashing)."""
    return a / b if b != 0 else math.nan


_COLUMNS: tuple[tuple[str, Callable[[Run], float]], ...] = (
    ("||θ|| init", lambda x: x.param_norm[0]),
    ("||θ|| final", lambda x: x.param_norm[-1]),
    ("grad norm, first 10 %", lambda x: x.early_grad_norm),
    ("grad norm, last 10 %", lambda x: x.late_grad_norm),
    ("train CE", lambda x: x.train_loss),
    ("test CE", lambda x: x.test_loss),
    ("train acc", lambda x: x.train_accuracy),
    ("test acc", lambda x: x.test_accuracy),
)
"""The columns of the table after the arm's name, and what each shows of a run."""
_COLORS = {"none": "#d62728", "l2": "#1f77b4", "dropout": "#2ca02c"}


class RegularizationExperiment(LabExperiment):
    """The ``regularization`` experiment (practitioners' guides; Krogh & Hertz; Srivastava)."""

    name = "regularization"
    title = "L2 weight decay and dropout: weight norm, gradient norm, train/test gap"
    references = (
        "Krogh & Hertz 1992, A Simple Weight Decay Can Improve Generalization (NIPS 4)",
        "Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, Dropout: A Simple "
        "Way to Prevent Neural Networks from Overfitting (JMLR 15)",
        "Soudry, Hoffer, Nacson, Gunasekar & Srebro 2018, The Implicit Bias of Gradient "
        "Descent on Separable Data (JMLR 19)",
    )
    setting = (
        "Papers: MNIST, CIFAR, ImageNet nets trained for hundreds of epochs (dropout), "
        f"linear models (Krogh & Hertz). Here: a {DEPTH} x {WIDTH} ReLU MLP on 8x8 digits, "
        f"{STEPS} SGD steps of {BATCH_SIZE} images (67 epochs); for gradient growth a "
        f"{GROWTH_DEPTH} x {GROWTH_WIDTH} one on {LABEL_NOISE:.0%} noisy labels, "
        f"{GROWTH_STEPS} steps."
    )
    record_type = Run

    def config(self, quick: bool) -> dict[str, Any]:
        """The same settings in both variants (quick runs one seed)."""
        return {
            "model": f"ReLU MLP 64-{WIDTH}x{DEPTH}-10, PyTorch default init",
            "optimizer": f"SGD(lr={LR:g}, momentum={MOMENTUM:g})",
            "weight_decay": WEIGHT_DECAY,
            "dropout": DROPOUT,
            "batch_size": BATCH_SIZE,
            "steps": STEPS,
            "growth_regime": {
                "model": f"ReLU MLP 64-{GROWTH_WIDTH}x{GROWTH_DEPTH}-10, PyTorch default init",
                "label_noise": LABEL_NOISE,
                "label_noise_seed": f"{LABEL_NOISE_SEED_OFFSET} + seed",
                "steps": GROWTH_STEPS,
                "growth_min": GROWTH_MIN,
                "restrain_max": RESTRAIN_MAX,
            },
            "late_fraction": LATE_FRACTION,
            "param_norm_every": NORM_EVERY,
        }

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Callable[[], Run]]:
        """One training per seed and arm."""
        return [partial(train, arm, s) for s in seeds for arm in ARMS]

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """See :func:`claims`."""
        return claims(records, seeds)

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """One row per arm: norms, losses, accuracies."""
        r = BySeed(records, seeds, key=lambda x: (x.arm,))
        rows = tuple(
            (ARM_LABELS[arm], *(cell([f(x) for x in r.get(arm)]) for _, f in _COLUMNS))
            for arm in ARMS
        )
        spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
        return (
            Table(
                title=f"After {STEPS} steps (noisy-label arms: {GROWTH_STEPS})" + spread,
                columns=("arm", *(name for name, _ in _COLUMNS)),
                rows=rows,
                note="Gradient norms are of the data loss's minibatch gradient (the optimizer "
                "adds weight decay after the measurement). Without regularization the net "
                "fits the training set, its weights keep growing and its gradient decays "
                "toward 0; weight decay holds it at λ||θ||, dropout's noise keeps it high. "
                f"The noisy-label arms train a {GROWTH_DEPTH} x {GROWTH_WIDTH} MLP on labels "
                f"{LABEL_NOISE:.0%} redrawn at random: the loss cannot reach 0 and the "
                "gradient grows with the weights; their CE and accuracy use the true labels.",
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Parameter norm, gradient norm and batch loss over training, per arm (first seed)."""
        first_seed = min(r.seed for r in records)
        chosen = {r.arm: r for r in records if r.seed == first_seed}
        fig, (weights, grads, losses, growth) = new_figure(1, 4, figsize=(20, 4))
        smooth = 25

        def steps(values: Sequence[float]) -> list[float]:
            return [smooth * (i + 0.5) for i in range(len(values))]

        for arm in CLEAN_ARMS:
            run, color = chosen[arm], _COLORS[arm]
            label = f"{ARM_LABELS[arm]} (test CE {run.test_loss:.3f}, acc {run.test_accuracy:.3f})"
            weights.plot(run.norm_steps, run.param_norm, color=color, label=label)
            grad = block_means(run.grad_norm, smooth)
            grads.plot(steps(grad), grad, color=color, label=ARM_LABELS[arm])
            loss = block_means(run.loss, smooth)
            losses.plot(steps(loss), loss, color=color, label=ARM_LABELS[arm])
            if arm == "l2":
                full = "full-batch ||∇L|| at the end"
                grads.plot([STEPS], [run.full_grad_norm], "o", color=color, label=full)
                equilibrium = WEIGHT_DECAY * run.param_norm[-1]
                grads.axhline(equilibrium, color=color, ls=":", lw=0.8, label="λ||θ||")
        for arm in NOISY_ARMS:
            grad = block_means(chosen[arm].grad_norm, smooth)
            growth.plot(steps(grad), grad, color=_COLORS[regularizer(arm)], label=ARM_LABELS[arm])
        grad_label = "global gradient norm (mean of 25 steps)"
        weights.set(ylabel="||θ|| (all parameters)")
        grads.set(ylabel=grad_label, yscale="log")
        losses.set(ylabel="batch loss (mean of 25 steps)", yscale="log")
        growth.set(ylabel=grad_label, yscale="log")
        weights.set_title("parameter norm", fontsize=10)
        grads.set_title("gradient norm of the data loss", fontsize=10)
        losses.set_title("training loss", fontsize=10)
        regime = f"{LABEL_NOISE:.0%} noisy labels, {GROWTH_DEPTH} x {GROWTH_WIDTH} MLP"
        growth.set_title(f"gradient growth: {regime}", fontsize=10)
        for ax in (weights, grads, losses, growth):
            ax.set_xlabel("SGD step")
        title = f"L2 weight decay and dropout on a digits MLP (seed {first_seed})"
        return finish(fig, title, (weights, grads, losses, growth), legend=7)


EXPERIMENT = RegularizationExperiment()
