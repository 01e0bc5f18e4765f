"""Experiment ``residual``: plain vs residual nets, and residual nets without normalization.

He et al. (2016) found that deeper plain networks reach a *higher* training error than
shallower ones (plain-56 above plain-20 on CIFAR-10, Fig. 1 and Fig. 6), although every
layer has BatchNorm, and that identity shortcuts remove this degradation. They argue that
it is not caused by vanishing gradients: BN keeps the forward signal alive and the
backward gradients "exhibit healthy norms". Yang et al. (2019) showed that deep plain BN
nets in fact make the gradient *explode* toward the input at initialization. Zhang,
Dauphin & Ma (2019, Fixup) showed that a residual net without normalization explodes
under the usual (He) initialization, because every block adds its variance to the
signal's, and that rescaling the init (Fixup) lets it train without normalization. This
experiment measures all three on the bundled digits, at the scale of a laptop CPU.

Setup (the reference setup). MLPs of width 64 on the digits: a stem Linear, then
``n`` blocks, then a Linear classifier: ``2 + 2n`` weight layers, so 8 layers is 3 blocks
and 32 layers 15 blocks. Four block types:

* ``plain``: Linear-BN-ReLU-Linear-BN-ReLU (the stem is Linear-BN-ReLU);
* ``residual``: the same with an identity shortcut, ReLU(x + BN(Linear(ReLU(BN(Linear x)))));
* ``he``: the residual block without BN (stem Linear-ReLU), He init;
* ``fixup``: the same block under Fixup: the last Linear of every branch and the
  classifier zero, the first Linear of every branch He-initialized and scaled by
  ``n^(-1/2)`` (Fixup's L^(-1/(2m-2)) with m = 2 layers per branch), and a scalar
  multiplier (init 1) on every branch. Deviation: the paper adds scalar biases before
  each layer; here every Linear keeps its own (zero-initialized) bias instead, which can
  represent the same shifts (W(x + a) + b = Wx + (Wa + b)) at a third of the cost.

Weights are initialized by :func:`gradguard.init.initialize` (``"auto"``: He before the
ReLUs, Xavier for the classifier, biases 0, BN weight 1 and bias 0) under the model seed;
Fixup's rescaling is applied on top. Cross-entropy, SGD with momentum 0.9 at LR 0.05,
batches of 64 from shuffled epochs, 400 steps in the quick variant and 800 in the full
one (the reference setup used 800; 56-layer nets do not fit the time budget, so the deep nets
here have 32 layers). Every step goes through a :class:`gradguard.Guard` (default
detectors, no clip policy: it measures without changing the step); a sink keeps the
loss, the global gradient norm and each block's gradient norm. The ``he`` net is stopped
at its first non-finite loss or gradient. Step 1's norms are those at initialization:
their first-block over last-block ratio is the gradient-flow measure. The training loss
and test accuracy are measured on the full splits after training (BN in eval mode).

The criteria come from the reference setup (fixed before the runs; for 32 layers,
where E6 measured plain losses of 0.71-2.71 against <= 0.003 at 8 layers, the degradation
margin is 0.3). Every claim held on each of the seeds 0-8 in the full variant and 0-6 in
the quick one; the closest calls were plain-32 minus plain-8 at 0.57 (> 0.3) and the
residual-32 loss at 0.019 in a 400-step run (< 0.05).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard import init
from gradguard.guard import Guard
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
from gradguard.records import Event, Window, severity_of

WIDTH = 64
BATCH_SIZE = 64
LR = 0.05
MOMENTUM = 0.9
SHALLOW, DEEP = 8, 32
QUICK_STEPS, FULL_STEPS = 400, 800
LOG_EVERY = 10
FULL_SEEDS = 3
BLOWUP_WITHIN = 10

KINDS = ("plain", "residual", "he", "fixup")
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


def batches(seed: int) -> Iterator[Tensor]:
    """Yield index batches of the training split, shuffled epoch after epoch (seed 1000+s)."""
    generator = data_generator(seed)
    while True:
        order = torch.randperm(N_TRAIN, generator=generator)
        for start in range(0, N_TRAIN - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


class _Recorder:
    """A sink that keeps every drained step: loss, norms, finiteness and events."""

    def __init__(self) -> None:
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.finite: list[bool] = []
        self.per_layer: list[list[float]] = []
        self.layer_names: tuple[str, ...] = ()
        self.events: list[Event] = []

    def open(self, meta: Mapping[str, Any]) -> None:
        """Nothing to set up."""

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Append the window's steps."""
        self.loss += window.loss.tolist()
        self.grad_norm += window.grad_norm.tolist()
        self.finite += window.finite.tolist()
        self.per_layer += window.per_layer.tolist()
        self.layer_names = window.layer_names
        self.events += events

    def close(self) -> None:
        """Nothing to release."""


def _block_norms(names: Sequence[str], row: Sequence[float], n_blocks: int) -> list[float]:
    """Fold per-layer norms into per-block norms (root of the sum of squares)."""
    squares = [0.0] * n_blocks
    for name, norm in zip(names, row, strict=True):
        parts = name.split(".")
        if parts[0] == "blocks":
            squares[int(parts[1])] += norm * norm
    return [math.sqrt(s) for s in squares]


@dataclass(frozen=True)
class Run:
    """One trained net.

    Attributes:
        kind: ``plain``, ``residual``, ``he`` or ``fixup``.
        layers: weight layers (2 + 2 x blocks).
        seed: model seed (data seed ``1000 + seed``).
        steps: SGD steps planned.
        steps_run: SGD steps taken (fewer when the loss or gradient went non-finite).
        nonfinite_step: the first step with a non-finite loss or gradient, or None.
        train_loss: cross-entropy on the full training split after training (NaN if lost).
        test_accuracy: on the test split after training.
        init_ratio: first block's gradient norm over the last block's, at init.
        init_block_norms: every block's gradient norm at init (step 1).
        loss: the batch loss of every step taken.
        grad_norm: the global gradient norm of every step taken.
        block_steps: the steps of ``block_norms``.
        block_norms: every block's gradient norm at those steps.
        events: the guard's detector events, as ``Event.to_dict()``.
    """

    kind: str
    layers: int
    seed: int
    steps: int
    steps_run: int
    nonfinite_step: int | None
    train_loss: float
    test_accuracy: float
    init_ratio: float
    init_block_norms: tuple[float, ...]
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    block_steps: tuple[int, ...]
    block_norms: tuple[tuple[float, ...], ...]
    events: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        record = asdict(self)
        for key, value in record.items():
            if isinstance(value, tuple):
                record[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Run:
        """Rebuild a run from :meth:`to_dict` output (non-finite numbers may be text)."""
        fields = dict(record)
        for key in ("train_loss", "test_accuracy", "init_ratio"):
            fields[key] = float(fields[key])
        for key in ("init_block_norms", "loss", "grad_norm"):
            fields[key] = tuple(float(v) for v in fields[key])
        fields["block_steps"] = tuple(int(v) for v in fields["block_steps"])
        fields["block_norms"] = tuple(tuple(float(v) for v in row) for row in fields["block_norms"])
        fields["events"] = tuple(dict(e) for e in fields["events"])
        return cls(**fields)


def _evaluate(model: nn.Module) -> tuple[float, float]:
    """Return (training loss, test accuracy) with the model in eval mode."""
    digits = load_digits()
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(digits.x_train), digits.y_train))
        accuracy = float((model(digits.x_test).argmax(dim=1) == digits.y_test).float().mean())
    model.train()
    return loss, accuracy


def train(kind: str, layers: int, seed: int, steps: int) -> Run:
    """Train one net for ``steps`` SGD steps (fewer if it goes non-finite)."""
    digits = load_digits()
    model = build_model(kind, layers, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    recorder = _Recorder()
    guard = Guard(model, optimizer, log_every=LOG_EVERY, sinks=[recorder])
    stream = batches(seed)
    nonfinite_step = None
    for step in range(1, steps + 1):
        index = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(digits.x_train[index]), digits.y_train[index])
        loss.backward()  # type: ignore[no-untyped-call]
        report = guard.step(loss)
        if not (bool(report.finite) and math.isfinite(loss.item())):  # CPU: no device sync
            nonfinite_step = step
            break
    guard.close()
    train_loss, accuracy = _evaluate(model)
    n_blocks = len(model.blocks)
    per_block = [_block_norms(recorder.layer_names, row, n_blocks) for row in recorder.per_layer]
    first = per_block[0]
    return Run(
        kind=kind,
        layers=layers,
        seed=seed,
        steps=steps,
        steps_run=len(recorder.loss),
        nonfinite_step=nonfinite_step,
        train_loss=train_loss,
        test_accuracy=accuracy,
        init_ratio=first[0] / first[-1] if first[-1] > 0 else math.nan,
        init_block_norms=tuple(first),
        loss=tuple(recorder.loss),
        grad_norm=tuple(recorder.grad_norm),
        block_steps=tuple(range(1, len(per_block) + 1, LOG_EVERY)),
        block_norms=tuple(tuple(row) for row in per_block[::LOG_EVERY]),
        events=tuple(e.to_dict() for e in recorder.events),
    )


class _Runs:
    """The runs of one experiment, indexed by (kind, layers, seed)."""

    def __init__(self, runs: Sequence[Run], seeds: tuple[int, ...]) -> None:
        self.by_key = {(r.kind, r.layers, r.seed): r for r in runs}
        self.seeds = seeds

    def get(self, kind: str, layers: int) -> list[Run]:
        """Return the runs of ``kind`` at ``layers``, one per seed."""
        return [self.by_key[(kind, layers, s)] for s in self.seeds]

    def loss(self, kind: str, layers: int) -> list[float]:
        """Return the final training loss of every seed."""
        return [r.train_loss for r in self.get(kind, layers)]


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def _degradation_claims(r: _Runs, steps: int) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s), {steps} steps"
    plain_shallow, plain_deep = r.loss("plain", SHALLOW), r.loss("plain", DEEP)
    res_deep = r.loss("residual", DEEP)
    return [
        Claim(
            id="plain-degrades-with-depth",
            source="He et al. 2016",
            statement=f"The {DEEP}-layer plain BN net ends at a higher training loss than "
            f"the {SHALLOW}-layer one.",
            paper="plain-56 has higher training error than plain-20 on CIFAR-10 (Fig. 6)",
            measured_on=f"final train loss, plain {DEEP} minus plain {SHALLOW}, {n}",
            values=tuple(d - s for d, s in zip(plain_deep, plain_shallow, strict=True)),
            criterion=Criterion(low=0.3),
            note="plain-8 "
            + ", ".join(map(format_value, plain_shallow))
            + f"; plain-{DEEP} "
            + ", ".join(map(format_value, plain_deep)),
        ),
        Claim(
            id="residual-trains-deep",
            source="He et al. 2016",
            statement=f"The {DEEP}-layer residual BN net trains to a low loss.",
            paper="ResNet-56 trains below plain-56 and below ResNet-20 (Fig. 6)",
            measured_on=f"final train loss, residual {DEEP}, {n}",
            values=tuple(res_deep),
            criterion=Criterion(high=0.05),
        ),
        Claim(
            id="residual-beats-plain",
            source="He et al. 2016",
            statement=f"At {DEEP} layers the residual net's loss is at least 10x lower "
            "than the plain net's.",
            paper="ResNet-56 6.97 % vs plain-56 error far above plain-20's (Fig. 6)",
            measured_on=f"final train loss, plain {DEEP} / residual {DEEP}, {n}",
            values=tuple(_ratio(p, q) for p, q in zip(plain_deep, res_deep, strict=True)),
            criterion=Criterion(low=10.0),
        ),
    ]


def _gradient_claims(r: _Runs) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s)"
    return [
        Claim(
            id="plain-bn-explodes-backward",
            source="He et al. 2016; Yang et al. 2019",
            statement="In the deep plain BN net the gradient does not vanish: at init the "
            "first block's is over 30x the last block's (it explodes toward the input).",
            paper="He: 'healthy norms', not vanishing; Yang: BN nets explode at init",
            measured_on=f"first / last block gradient norm at init, plain {DEEP}, {n}",
            values=tuple(x.init_ratio for x in r.get("plain", DEEP)),
            criterion=Criterion(low=30.0),
        ),
        Claim(
            id="residual-gradient-flat",
            source="He et al. 2016",
            statement="With identity shortcuts the first block's gradient is within 30x of "
            "the last block's.",
            paper="shortcuts propagate the signal directly between blocks (qualitative)",
            measured_on=f"first / last block gradient norm at init, residual {DEEP}, {n}",
            values=tuple(x.init_ratio for x in r.get("residual", DEEP)),
            criterion=Criterion(low=0.1, high=30.0),
        ),
    ]


def _fixup_claims(r: _Runs, steps: int) -> list[Claim]:
    n = f"{len(r.seeds)} seed(s), {steps} steps"
    he = r.get("he", DEEP)
    fixup = r.get("fixup", DEEP)
    never = steps + 1
    return [
        Claim(
            id="no-norm-he-init-blows-up",
            source="Zhang, Dauphin & Ma 2019",
            statement=f"Without normalization the He-initialized residual net's loss or "
            f"gradient goes non-finite within {BLOWUP_WITHIN} steps.",
            paper="the output variance grows exponentially with the number of blocks; "
            "such nets do not train without BN (sec. 2)",
            measured_on=f"first non-finite step, residual {DEEP} no norm, He init, {n} "
            f"({never} = never)",
            values=tuple(float(x.nonfinite_step or never) for x in he),
            criterion=Criterion(high=BLOWUP_WITHIN + 0.5),
        ),
        Claim(
            id="fixup-trains-without-norm",
            source="Zhang, Dauphin & Ma 2019",
            statement="Under Fixup init the same net trains without normalization.",
            paper="Fixup trains residual nets without BN at BN-like LRs (ResNet-110 on "
            "CIFAR-10 close to the BN result)",
            measured_on=f"final train loss, residual {DEEP} no norm, Fixup init, {n}",
            values=tuple(x.train_loss for x in fixup),
            criterion=Criterion(high=0.01),
        ),
        Claim(
            id="fixup-generalizes",
            source="Zhang, Dauphin & Ma 2019",
            statement="The Fixup net's test accuracy is that of a trained net.",
            paper="test error comparable to BN (CIFAR-10, ImageNet)",
            measured_on=f"test accuracy, residual {DEEP} no norm, Fixup init, {n}",
            values=tuple(x.test_accuracy for x in fixup),
            criterion=Criterion(low=0.9),
        ),
    ]


def claims(runs: Sequence[Run], seeds: tuple[int, ...], steps: int) -> tuple[Claim, ...]:
    """Judge the claims against the runs of every net and seed."""
    r = _Runs(runs, seeds)
    return (*_degradation_claims(r, steps), *_gradient_claims(r), *_fixup_claims(r, steps))


def _cell(values: Sequence[float]) -> str:
    if len(values) == 1:
        return format_value(values[0])
    low, high = format_value(min(values)), format_value(max(values))
    return f"{format_value(statistics.fmean(values))} [{low}, {high}]"


def _blowup_cell(runs: Sequence[Run]) -> str:
    steps = [str(x.nonfinite_step) if x.nonfinite_step is not None else "never" for x in runs]
    return ", ".join(steps)


def tables(runs: Sequence[Run], seeds: tuple[int, ...], steps: int) -> tuple[Table, ...]:
    """Return one table, a row per net: loss, accuracy, gradient ratio, blow-up step."""
    r = _Runs(runs, seeds)
    spread = "" if len(seeds) == 1 else f" (mean [min, max] over {len(seeds)} seeds)"
    rows = []
    for kind, layers in ARMS:
        rs = r.get(kind, layers)
        rows.append(
            (
                KIND_LABELS[kind],
                str(layers),
                _cell([x.train_loss for x in rs]),
                _cell([x.test_accuracy for x in rs]),
                _cell([x.init_ratio for x in rs]),
                _blowup_cell(rs),
                ", ".join(
                    sorted({str(e["kind"]) for x in rs for e in x.events if _needs_attention(e)})
                )
                or "none",
            )
        )
    return (
        Table(
            title=f"After {steps} SGD steps (momentum 0.9, LR {LR:g})" + spread,
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
            "and the branch multipliers have a gradient; its block ratio at init is NaN. Guard "
            "warnings are the default detectors' events of warning or error severity; the "
            "passing loss spikes of the healthy momentum-SGD nets are info events and are "
            "not listed.",
        ),
    )


def _needs_attention(event: dict[str, Any]) -> bool:
    """Whether a stored event (``Event.to_dict()``) is a warning or an error."""
    return severity_of(event) != "info"


class ResidualExperiment:
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

    def run(self, *, quick: bool, seed: int, progress: Progress | None = None) -> ExperimentResult:
        """Train every net; quick: 1 seed, 400 steps; full: :data:`FULL_SEEDS` seeds, 800."""
        seeds = seeds_for(seed, quick=quick, n_full=FULL_SEEDS)
        steps = QUICK_STEPS if quick else FULL_STEPS
        grid = [(kind, layers, s) for s in seeds for kind, layers in ARMS]
        runs: list[Run] = []
        start = time.perf_counter()
        with single_thread():
            for done, (kind, layers, s) in enumerate(grid, start=1):
                runs.append(train(kind, layers, s, steps))
                if progress is not None:
                    progress(done, len(grid))
        return ExperimentResult(
            name=self.name,
            title=self.title,
            references=self.references,
            setting=self.setting,
            config={
                "width": WIDTH,
                "arms": [{"kind": k, "layers": n} for k, n in ARMS],
                "init": "gradguard.init.initialize(model, 'auto'); Fixup rescaling on top",
                "optimizer": f"SGD(lr={LR:g}, momentum={MOMENTUM:g})",
                "batch_size": BATCH_SIZE,
                "steps": steps,
                "guard": f"Guard(log_every={LOG_EVERY}, detectors='default', clip=None)",
                "block_norms_every": LOG_EVERY,
            },
            seeds=seeds,
            claims=claims(runs, seeds, steps),
            tables=tables(runs, seeds, steps),
            measurements=tuple(r.to_dict() for r in runs),
            duration_s=time.perf_counter() - start,
        )


EXPERIMENT = ResidualExperiment()

_COLORS = {
    ("plain", SHALLOW): "#ff9896",
    ("residual", SHALLOW): "#aec7e8",
    ("plain", DEEP): "#d62728",
    ("residual", DEEP): "#1f77b4",
    ("he", DEEP): "#ff7f0e",
    ("fixup", DEEP): "#2ca02c",
}


def _smooth(values: Sequence[float], width: int = 10) -> list[float]:
    """Mean over consecutive blocks of ``width`` steps (NaN where a block has none)."""
    out = []
    for i in range(0, len(values), width):
        block = [v for v in values[i : i + width] if math.isfinite(v)]
        out.append(statistics.fmean(block) if block else math.nan)
    return out


def plot(experiment_data: Mapping[str, Any], out_dir: Path) -> Path:
    """Loss curves of every net and the per-block gradient norm at init and over training.

    Drawn from the ``results.json`` data alone (first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Run.from_dict(m) for m in experiment_data["measurements"]]
    first_seed = min(r.seed for r in rows)
    chosen = {(r.kind, r.layers): r for r in rows if r.seed == first_seed}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    curves, flow, later = axes
    for key, run in chosen.items():
        label = f"{KIND_LABELS[run.kind]}, {run.layers}"
        smooth = _smooth(run.loss)
        xs = [LOG_EVERY * (i + 0.5) for i in range(len(smooth))]
        marker = "x" if run.nonfinite_step is not None else None
        curves.plot(xs, smooth, color=_COLORS[key], label=label, marker=marker)
    curves.set_yscale("log")
    curves.set_xlabel("SGD step")
    curves.set_ylabel("batch loss (mean of 10 steps)")
    curves.set_title("training loss", fontsize=10)
    curves.grid(True, which="major", alpha=0.3)
    curves.legend(fontsize=7)
    for ax, index, title in ((flow, 0, "at init (step 1)"), (later, -1, "at the last logged step")):
        for key in (("plain", DEEP), ("residual", DEEP), ("fixup", DEEP)):
            run = chosen[key]
            norms = [v if v > 0 else math.nan for v in run.block_norms[index]]
            ax.plot(range(1, len(norms) + 1), norms, marker=".", color=_COLORS[key])
            ax.plot([], [], color=_COLORS[key], label=KIND_LABELS[run.kind])
        ax.set_yscale("log")
        ax.set_xlabel("block (input → output)")
        ax.set_title(f"{DEEP} layers: gradient norm per block {title}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    flow.set_ylabel("gradient norm")
    fig.suptitle(f"Plain vs residual MLPs on digits, and residual without BN (seed {first_seed})")
    fig.tight_layout()
    path = out_dir / "residual.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
