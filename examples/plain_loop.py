"""A plain training loop guarded by gradguard: measure, clip, skip bad steps, log, detect.

Trains a small MLP on the digits data bundled with scikit-learn; one step in 50 gets a
NaN gradient injected, to show a skipped step. Run:

    python examples/plain_loop.py --steps 300   # logs to a new runs/plain-loop-<date>-<time>
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg


def main() -> None:
    """Train on digits for ``--steps`` steps under a guard, then report accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--run-dir", default=None, help="default: a new directory under runs/")
    args = parser.parse_args()
    args.run_dir = args.run_dir or time.strftime("runs/plain-loop-%Y%m%d-%H%M%S")

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    with gg.Guard(
        model,
        optimizer,
        clip=gg.ZClip(),  # adaptive: clips outliers against the run's own history
        scheduler=scheduler,  # stepped only after real optimizer steps
        log_every=25,
        run_dir=args.run_dir,
        on_event=lambda event: print(event),
    ) as guard:
        for step in range(args.steps):
            batch = torch.randint(0, len(x), (64,))
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            if step % 50 == 49:
                model[2].weight.grad[0, 0] = float("nan")  # a fault, to see a skipped step
            guard.step(loss)  # replaces optimizer.step()
            if guard.should_stop:
                break

    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean()
    skipped = sum(e.kind == "nonfinite" for e in guard.events)
    print(f"accuracy {accuracy:.3f}; {skipped} steps skipped; logs in {args.run_dir}")


if __name__ == "__main__":
    main()
