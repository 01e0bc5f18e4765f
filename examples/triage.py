"""Triage a loss spike: read what the guard explains, apply its advice, run again.

Trains a small MLP on the digits data bundled with scikit-learn (standardised inputs,
SGD with momentum). At batch 150 a data-pipeline bug hands the model four records that
were never normalised (inputs x1000) and carry the wrong labels: the loss spikes.

The first run uses a bare guard (no clipping, no recovery). The script writes its report
and prints the guard's verdict and, for each warning or error, the cause, the evidence,
the batch and the examples that stand out, and the numbered advice. The second run
applies that advice (a ``NormClip`` at the threshold the clip advice names, and
``Rollback``), meets the same fault on the same batch, and the script prints what the
fault cost each run. Run:

    python examples/triage.py --run-dir runs/my-triage
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg
from gradguard.causes import CAUSES
from gradguard.report import run_verdict, write_report

BATCH_SIZE = 64
BAD_RECORDS = 4  # how many records of the faulty batch the bug corrupts
TEST_SIZE = 297  # held out from the 1,797 digits, for the accuracy
RUNS = ("as-is", "fixed", "no-fault")  # the run directories written under --run-dir


@dataclass
class Outcome:
    """What one run measured."""

    run_dir: Path
    events: list[gg.Event]
    loss_before: float  # median batch loss over the 10 batches before the fault
    loss_after: float  # median batch loss over the 10 batches after it
    accuracy: float  # on the held-out digits, at the end
    steps: int  # optimizer steps taken
    batches: int  # batches drawn (more than steps when a rollback skipped some)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits, standardised with the training split's mean and std; (x, y, x_test, y_test)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))  # blank pixels stay 0
    return x[train], y[train], x[test], y[test]


def corrupt(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline bug: the last records of the batch unnormalised (x1000), labels shifted."""
    x, y = x.clone(), y.clone()
    x[-BAD_RECORDS:] *= 1000.0
    y[-BAD_RECORDS:] = (y[-BAD_RECORDS:] + 1) % 10
    return x, y


def train(
    run_dir: Path,
    steps: int,
    seed: int,
    fault_at: int,
    fault: bool = True,
    fixed_clip: float | None = None,
) -> Outcome:
    """Train for ``steps`` optimizer steps; ``fixed_clip`` set: with the advice applied.

    With ``fault``, the batch drawn ``fault_at``-th (counting from 1) is corrupted; the
    losses are compared around that batch either way.
    """
    x, y, x_test, y_test = load_data()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    advice_applied: dict[str, Any] = {}
    if fixed_clip is not None:
        advice_applied = {"clip": gg.NormClip(fixed_clip), "recovery": gg.Rollback()}
    # The data order has its own generator: a rollback rewinds the global RNG, and the
    # loader must move on past the batches it skips.
    data = torch.Generator().manual_seed(seed)
    losses: list[float] = []  # the loss of every batch drawn, in order
    drawn = 0
    with gg.Guard(model, optimizer, log_every=10, run_dir=run_dir, **advice_applied) as guard:
        while guard.step_count < steps:  # optimizer steps: a rollback rewinds the counter
            drawn += 1
            batch = torch.randint(0, len(x), (BATCH_SIZE,), generator=data)
            inputs, labels = x[batch], y[batch]
            if fault and drawn == fault_at:
                inputs, labels = corrupt(inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            sample_losses = nn.functional.cross_entropy(model(inputs), labels, reduction="none")
            loss = sample_losses.mean()
            loss.backward()
            guard.step(loss, batch=batch.tolist(), sample_losses=sample_losses.detach())
            # A real loop would also `break` on guard.should_stop (set on divergence); this
            # one trains on so that the runs can be compared after the same number of steps.
            losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return Outcome(
        run_dir=run_dir,
        events=guard.events,
        loss_before=_median(losses[max(fault_at - 11, 0) : max(fault_at - 1, 0)]),
        loss_after=_median(losses[fault_at : fault_at + 10]),
        accuracy=accuracy,
        steps=guard.step_count,
        batches=drawn,
    )


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def short(batch: Any, shown: int = 4) -> str:
    """A batch id (a list of dataset indices) in a few characters."""
    if not isinstance(batch, list):
        return str(batch)
    head = ", ".join(str(i) for i in batch[:shown])
    return f"[{head}, ...] ({len(batch)} ids)" if len(batch) > shown else f"[{head}]"


def print_triage(outcome: Outcome) -> float | None:
    """Print the verdict and every warning or error; return the clip advice's max_norm."""
    level, sentence = run_verdict(outcome.run_dir)
    print(f"verdict ({level}): {sentence}")
    print(f"report: {write_report(outcome.run_dir)}")
    max_norm = None
    for event in outcome.events:
        if not event.needs_attention:
            continue
        span = f" (to step {event.end_step})" if event.end_step > event.step else ""
        what = f"{event.kind} ({event.metric})" if event.kind == "spike" else event.kind
        print(f"\nstep {event.step}{span}: {event.severity} {what}")
        label = CAUSES.get(event.cause, event.cause)
        print(f"  cause: {event.cause}" + (f" ({label})" if label != event.cause else ""))
        if event.evidence.get("summary"):
            print(f"  evidence: {event.evidence['summary']}")
        if event.batch is not None:
            print(f"  batch: {short(event.batch)}")
        outliers = event.evidence.get("outliers") or []
        if outliers:
            named = ", ".join(f"{o['id']} (loss {float(o['loss']):.4g})" for o in outliers)
            print(f"  examples that stand out: {named}")
        undone = event.evidence.get("skipped_steps")
        if undone:
            print(f"  steps undone: {undone[0]} to {undone[1]}")
        skipped = event.evidence.get("skipped_batches") or []
        if skipped:
            print(f"  batches skipped: {len(skipped)}, the first {short(skipped[0])}")
        for i, advice in enumerate(event.advice, 1):
            print(f"  {i}. {advice.text}")
            if advice.action == "clip" and max_norm is None:
                max_norm = float(advice.setting["max_norm"])
    return max_norm


def main(argv: Sequence[str] | None = None) -> None:
    """Train with the fault, print the triage, then train again with the advice applied."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir",
        default=None,
        help="where the three runs go (default: a new runs/triage-<date>-<time>)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-at", type=int, default=150, help="the batch the bug corrupts")
    args = parser.parse_args(argv)
    # One thread: as fast for so small a model, immune to busy cores, and the same numbers
    # on every machine (the result of a sum depends on how it is split across threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_all(args)
    finally:
        torch.set_num_threads(threads)


def run_all(args: argparse.Namespace) -> None:
    """The two runs with the fault, their triage, and the run without it for reference."""
    root = Path(args.run_dir or time.strftime("runs/triage-%Y%m%d-%H%M%S"))
    print(f"run directories: {root}/{{{','.join(RUNS)}}}")

    print(f"== run 1: a bare guard; batch {args.fault_at} has {BAD_RECORDS} corrupted records")
    first = train(root / RUNS[0], args.steps, args.seed, args.fault_at)
    max_norm = print_triage(first)
    if max_norm is None:
        print("\nno clip advice was given: nothing to apply")
        return

    print(f"\n== run 2: the advice applied: clip=gg.NormClip({max_norm:g}), recovery=gg.Rollback()")
    fixed = train(root / RUNS[1], args.steps, args.seed, args.fault_at, fixed_clip=max_norm)
    print_triage(fixed)

    clean = train(root / RUNS[2], args.steps, args.seed, args.fault_at, fault=False)
    print(
        f"\n== what the fault cost: median batch loss over the 10 batches before batch "
        f"{args.fault_at} and the 10 after it; accuracy on {TEST_SIZE} held-out digits"
    )
    for name, outcome in (("no fault", clean), ("run 1, as is", first), ("run 2, fixed", fixed)):
        print(
            f"{name + ':':<14}loss {outcome.loss_before:.3f} before, {outcome.loss_after:.3f} "
            f"after; test accuracy {outcome.accuracy:.3f} after {outcome.steps} steps "
            f"({outcome.batches} batches drawn)"
        )


if __name__ == "__main__":
    main()
