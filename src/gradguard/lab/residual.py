"""Experiment ``residual``: plain vs residual nets, and residual nets without normalization.

Deep plain BN nets degrade and residual ones train (He et al. 2016); without BN, He init
blows up and Fixup trains (Zhang et al. 2019). See docs/lab/residual.md for the setup, the
papers' numbers and the criteria.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradguard import init
from gradguard.lab._figures import block_means, finish, new_figure, positive_or_nan
from gradguard.lab._harness import LabExperiment
from gradguard.lab._records import BySeed, Claim, Criterion, Table, cell, listed
from gradguard.lab._training import GuardedRun, first_over_last, train_guarded
from gradguard.lab.data import N_CLASSES, N_FEATURES
from gradguard.records import StepReport, severity_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH = 64
BATCH_SIZE = 64
LR = 0.05
MOMENTUM = 0.9
SHALLOW, DEEP = 8, 32
QUICK_STEPS, FULL_STEPS = 400, 800
LOG_EVERY = 10
BLOWUP_WITHIN = 10

KIND_LABELS: Mapping[str, str] = {
    "plain": "plain + BN",
    "residual": "residual + BN",
    "he": "residual, no norm, He init",
    "fixup": "residual, no norm, Fixup init",
}
ARMS: tuple[tuple[str, int], ...] = (
    ("plain", SHALLOW),
    ("residual", SHALLOW),
    ("plain", DEEP),
    ("residual", DEEP),
    ("he", DEEP),
    ("fixup", DEEP),
)
"""(block kind, weight layers) of every net trained per seed, in run order."""


class Block(nn.Module):
    """Two Linear layers of width :data:`WIDTH`, with or without BN and a shortcut."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        norm = kind in ("plain", "residual")
        self.l1 = nn.Linear(WIDTH, WIDTH)
        self.n1: nn.Module = nn.BatchNorm1d(WIDTH) if norm else nn.Identity()
        self.l2 = nn.Linear(WIDTH, WIDTH)
        self.n2: nn.Module = nn.BatchNorm1d(WIDTH) if norm else nn.Identity()
        self.scale = nn.Parameter(torch.ones(1)) if kind == "fixup" else None

    def forward(self, x: Tensor) -> Tensor:
        """Return ReLU(branch(x)), plus x for the residual kinds."""
        out = self.n2(self.l2(torch.relu(self.n1(self.l1(x)))))
        if self.scale is not None:
            out = out * self.scale
        if self.kind != "plain":
            out = out + x
        return torch.relu(out)


class Net(nn.Module):
    """Stem, ``(layers - 2) // 2`` blocks, classifier."""

    def __init__(self, kind: str, layers: int) -> None:
        super().__init__()
        norm = kind in ("plain", "residual")
        stem: list[nn.Module] = [nn.Linear(N_FEATURES, WIDTH)]
        stem += [nn.BatchNorm1d(WIDTH), nn.ReLU()] if norm else [nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.ModuleList(Block(kind) for _ in range((layers - 2) // 2))
        self.head = nn.Linear(WIDTH, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits."""
        h: Tensor = self.stem(x)
        for block in self.blocks:
            h = block(h)
        out: Tensor = self.head(h)
        return out


def build_model(kind: str, layers: int, seed: int) -> Net:
    """Return an initialized net; the global RNG is forked and left as it was.

    He init comes from :func:`gradguard.init.initialize`; ``fixup`` then zeroes every
    branch's last Linear and the classifier and scales every branch's first Linear.
    """
    with torch.random.fork_rng(devices=[]):
        model = Net(kind, layers)  # nn.Linear's own init draws are overwritten below
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init.initialize(model, "auto")
    if kind == "fixup":
        n_blocks = len(model.blocks)
        with torch.no_grad():
            for block in model.blocks:
                assert isinstance(block, Block)
                block.l1.weight.mul_(n_blocks ** (-0.5))
                block.l2.weight.zero_()
            model.head.weight.zero_()
            model.head.bias.zero_()
    return model


def _block_norms(names: Sequence[str], row: Sequence[float], n_blocks: int) -> list[float]:
    """Fold per-layer norms into per-block norms (root of the sum of squares)."""
    squares = [0.0] * n_blocks
    for name, norm in zip(names, row, strict=True):
        parts = name.split(".")
        if parts[0] == "blocks":
            squares[int(parts[1])] += norm * norm
    return [math.sqrt(s) for s in squares]


@dataclass(frozen=True)
class Run(GuardedRun):
    """One trained net; its gradient flow is per block."""

    kind: str
    """``plain``, ``residual``, ``he`` or ``fixup``."""
    layers: int
    """Weight layers (2 + 2 x blocks)."""
    steps: int
    """SGD steps planned."""
    steps_run: int
    """SGD steps taken (fewer when the loss or gradient went non-finite)."""
    nonfinite_step: int | None
    """The first step with a non-finite loss or gradient, or None."""
    init_block_norms: tuple[float, ...]
    """Every block's gradient norm at init (step 1)."""
    block_steps: tuple[int, ...]
    """The steps of ``block_norms`` (every :data:`LOG_EVERY` steps)."""
    block_norms: tuple[tuple[float, ...], ...]


def train(kind: str, layers: int, seed: int, steps: int) -> Run:
    """Train one net for ``steps`` SGD steps (fewer if it goes non-finite)."""
    model = build_model(kind, layers, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    nonfinite: list[int] = []

    def blew_up(step: int, loss: Tensor, report: StepReport | None) -> bool:
        assert report is not None
        if bool(report.finite) and math.isfinite(loss.item()):  # CPU: no device sync
            return False
        nonfinite.append(step)
        return True

    recorder, accuracy, train_loss = train_guarded(
        model,
        optimizer,
        seed,
        batch_size=BATCH_SIZE,
        steps=steps,
        log_every=LOG_EVERY,
        after_step=blew_up,
    )
    n_blocks = len(model.blocks)
    per_block = [_block_norms(recorder.layer_names, row, n_blocks) for row in recorder.per_layer]
    return Run(
        kind=kind,
        layers=layers,
        seed=seed,
        steps=steps,
        steps_run=len(recorder.loss),
        nonfinite_step=nonfinite[0] if nonfinite else None,
        train_loss=train_loss,
        test_accuracy=accuracy,
        init_ratio=first_over_last(per_block[0]),
        init_block_norms=tuple(per_block[0]),
        loss=tuple(recorder.loss),
        grad_norm=tuple(recorder.grad_norm),
        block_steps=tuple(range(1, len(per_block) + 1, LOG_EVERY)),
        block_norms=tuple(tuple(row) for row in per_block[::LOG_EVERY]),
        events=recorder.event_dicts(),
    )


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def claims(runs: Sequence[Run], seeds: tuple[int, ...], steps: int) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every net and seed."""
    r = BySeed(runs, seeds, key=lambda x: (x.kind, x.layers))
    n, n_steps = f"{len(seeds)} seed(s)", f"{len(seeds)} seed(s), {steps} steps"
    plain_shallow = [x.train_loss for x in r.get("plain", SHALLOW)]
    plain_deep = [x.train_loss for x in r.get("plain", DEEP)]
    res_deep = [x.train_loss for x in r.get("residual", DEEP)]
    he, fixup = r.get("he", DEEP), r.get("fixup", DEEP)
    never = steps + 1
    zhang = "Zhang, Dauphin & Ma 2019"
    return (
        Claim(
            "plain-degrades-with-depth",
            "He et al. 2016",
            f"The {DEEP}-layer plain BN net ends at a higher training loss than "
            f"the {SHALLOW}-layer one.",
            "plain-56 has higher training error than plain-20 on CIFAR-10 (Fig. 6)",
            f"final train loss, plain {DEEP} minus plain {SHALLOW}, {n_steps}",
            tuple(d - s for d, s in zip(plain_deep, plain_shallow, strict=True)),
            Criterion(low=0.3),
            f"plain-8 {listed(plain_shallow)}; plain-{DEEP} {listed(plain_deep)}",
        ),
        Claim(
            "residual-trains-deep",
            "He et al. 2016",
            f"The {DEEP}-layer residual BN net trains to a low loss.",
            "ResNet-56 trains below plain-56 and below ResNet-20 (Fig. 6)",
            f"final train loss, residual {DEEP}, {n_steps}",
            tuple(res_deep),
            Criterion(high=0.05),
        ),
        Claim(
            "residual-beats-plain",
            "He et al. 2016",
            f"At {DEEP} layers the residual net's loss is at least 10x lower than the plain net's.",
            "ResNet-56 6.97 % vs plain-56 error far above plain-20's (Fig. 6)",
            f"final train loss, plain {DEEP} / residual {DEEP}, {n_steps}",
            tuple(_ratio(p, q) for p, q in zip(plain_deep, res_deep, strict=True)),
            Criterion(low=10.0),
        ),
        Claim(
            "plain-bn-explodes-backward",
            "He et al. 2016; Yang et al. 2019",
            "In the deep plain BN net the gradient does not vanish: at init the "
            "first block's is over 30x the last block's (it explodes toward the input).",
            "He: 'healthy norms', not vanishing; Yang: BN nets explode at init",
            f"first / last block gradient norm at init, plain {DEEP}, {n}",
            tuple(x.init_ratio for x in r.get("plain", DEEP)),
            Criterion(low=30.0),
        ),
        Claim(
            "residual-gradient-flat",
            "He et al. 2016",
            "With identity shortcuts the first block's gradient is within 30x of the last block's.",
            "shortcuts propagate the signal directly between blocks (qualitative)",
            f"first / last block gradient norm at init, residual {DEEP}, {n}",
            tuple(x.init_ratio for x in r.get("residual", DEEP)),
            Criterion(low=0.1, high=30.0),
        ),
        Claim(
            "no-norm-he-init-blows-up",
            zhang,
            f"Without normalization the He-initialized residual net's loss or "
            f"gradient goes non-finite within {BLOWUP_WITHIN} steps.",
            "the output variance grows exponentially with the number of blocks; "
            "such nets do not train without BN (sec. 2)",
            f"first non-finite step, residual {DEEP} no norm, He init, {n_steps} ({never} = never)",
            tuple(float(x.nonfinite_step or never) for x in he),
            Criterion(high=BLOWUP_WITHIN + 0.5),
        ),
        Claim(
            "fixup-trains-without-norm",
            zhang,
            "Under Fixup init the same net trains without normalization.",
            "Fixup trains residual nets without BN at BN-like LRs (ResNet-110 on "
            "CIFAR-10 close to the BN result)",
            f"final train loss, residual {DEEP} no norm, Fixup init, {n_steps}",
            tuple(x.train_loss for x in fixup),
            Criterion(high=0.01),
        ),
        Claim(
            "fixup-generalizes",
            zhang,
            "The Fixup net's test accuracy is that of a trained net.",
            "test error comparable to BN (CIFAR-10, ImageNet)",
            f"test accuracy, residual {DEEP} no norm, Fixup init, {n_steps}",
            tuple(x.test_accuracy for x in fixup),
            Criterion(low=0.9),
        ),
    )


_PALETTE = ("#ff9896", "#aec7e8", "#d62728", "#1f77b4", "#ff7f0e", "#2ca02c")
_COLORS = dict(zip(ARMS, _PALETTE, strict=True))


class ResidualExperiment(LabExperiment):
    """The ``residual`` experiment (He et al. 2016; Yang et al. 2019; Zhang et al. 2019)."""

    name = "residual"
    title = "Plain vs residual nets with depth; residual without BN: He vs Fixup (He 2016)"
    references = (
        "He, Zhang, Ren & Sun 2016, Deep Residual Learning for Image Recognition "
        "(arXiv 1512.03385)",
        "Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, A Mean Field Theory of "
        "Batch Normalization (arXiv 1902.08129)",
        "Zhang, Dauphin & Ma 2019, Fixup Initialization: Residual Learning Without "
        "Normalization (arXiv 1901.09321)",
    )
    setting = (
        "Papers: 20-110-layer conv nets on CIFAR-10 and ImageNet. Here: width-64 MLPs of "
        f"{SHALLOW} and {DEEP} layers on 8x8 digits, {QUICK_STEPS} (quick) or {FULL_STEPS} "
        "(full) SGD steps."
    )
    record_type = Run

    def config(self, quick: bool) -> dict[str, Any]:
        """The quick variant trains :data:`QUICK_STEPS` steps, the full one :data:`FULL_STEPS`."""
        return {
            "width": WIDTH,
            "arms": [{"kind": k, "layers": n} for k, n in ARMS],
            "init": "gradguard.init.initialize(model, 'auto'); Fixup rescaling on top",
            "optimizer": f"SGD(lr={LR:g}, momentum={MOMENTUM:g})",
            "batch_size": BATCH_SIZE,
            "steps": QUICK_STEPS if quick else FULL_STEPS,
            "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
            "block_norms_every": LOG_EVERY,
        }

    def grid(self, quick: bool, seeds: tuple[int, ...]) -> list[Callable[[], Run]]:
        """One training per seed and arm."""
        steps = QUICK_STEPS if quick else FULL_STEPS
        return [partial(train, kind, layers, s, steps) for s in seeds for kind, layers in ARMS]

    def claims(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Claim, ...]:
        """See :func:`claims` (the steps are the runs' own)."""
        return claims(records, seeds, records[0].steps)

    def tables(self, records: Sequence[Run], seeds: tuple[int, ...]) -> tuple[Table, ...]:
        """One row per net: loss, accuracy, gradient ratio, blow-up step, guard warnings."""
        r = BySeed(records, seeds, key=lambda x: (x.kind, x.layers))
        rows = []
        for kind, layers in ARMS:
            rs = r.get(kind, layers)
            blowup = ", ".join(
                "never" if x.nonfinite_step is None else str(x.nonfinite_step) for x in rs
            )
            # Guard warnings: events of warning or error severity.
            warned = {str(e["kind"]) for x in rs for e in x.events if severity_of(e) != "info"}
            rows.append(
                (
                    KIND_LABELS[kind],
                    str(layers),
                    cell([x.train_loss for x in rs]),
                    cell([x.test_accuracy for x in rs]),
                    cell([x.init_ratio for x in rs]),
                    blowup,
                    ", ".join(sorted(warned)) or "none",
                )
            )
        spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
        return (
            Table(
                title=f"After {records[0].steps} SGD steps (momentum 0.9, LR {LR:g})" + spread,
                columns=(
                    "net",
                    "layers",
                    "train loss",
                    "test accuracy",
                    "first / last block gradient at init",
                    "first non-finite step",
                    "guard warnings",
                ),
                rows=tuple(rows),
                note="A net lost to NaN is evaluated as it is (NaN loss, chance accuracy). The "
                "Fixup net's branches and classifier start at 0, so at init only the classifier "
                "and the branch multipliers have a gradient; its block ratio at init is NaN. "
                "Guard warnings are the default detectors' events of warning or error severity; "
                "the passing loss spikes of the healthy momentum-SGD nets are info events and "
                "are not listed.",
            ),
        )

    def figure(self, records: Sequence[Run], data: Mapping[str, Any]) -> Figure:
        """Loss curves of every net and the per-block gradient norms (first seed)."""
        first_seed = min(r.seed for r in records)
        chosen = {(r.kind, r.layers): r for r in records if r.seed == first_seed}
        fig, (curves, flow, later) = new_figure(1, 3, figsize=(15, 4))
        for key, run in chosen.items():
            smooth = block_means(run.loss)
            xs = [LOG_EVERY * (i + 0.5) for i in range(len(smooth))]
            marker = "x" if run.nonfinite_step is not None else None
            label = f"{KIND_LABELS[run.kind]}, {run.layers}"
            curves.plot(xs, smooth, color=_COLORS[key], label=label, marker=marker)
        curves.set(yscale="log", xlabel="SGD step", ylabel="batch loss (mean of 10 steps)")
        curves.set_title("training loss", fontsize=10)
        for ax, index, when in (
            (flow, 0, "at init (step 1)"),
            (later, -1, "at the last logged step"),
        ):
            for key in (("plain", DEEP), ("residual", DEEP), ("fixup", DEEP)):
                norms = positive_or_nan(chosen[key].block_norms[index])
                ax.plot(range(1, len(norms) + 1), norms, marker=".", color=_COLORS[key])
                ax.plot([], [], color=_COLORS[key], label=KIND_LABELS[key[0]])
            ax.set(yscale="log", xlabel="block (input → output)")
            ax.set_title(f"{DEEP} layers: gradient norm per block {when}", fontsize=10)
        flow.set_ylabel("gradient norm")
        title = f"Plain vs residual MLPs on digits, and residual without BN (seed {first_seed})"
        return finish(fig, title, (curves, flow, later), legend=7)


EXPERIMENT = ResidualExperiment()
