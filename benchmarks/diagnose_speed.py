"""Time ``gradguard.diagnose`` on a 100-layer MLP of width 256 with a batch of 64.

The issue's budget is under 10 s on the project's 2-core CPU. Prints the seconds of each
of a few runs (the first includes torch.func's one-time set-up) and the verdict, so the
run can be pasted into docs/diagnose.md. One torch thread by default, as the lab and the
overhead benchmark use: the diagnosis is thousands of small kernels, which a second
OpenMP thread does not speed up and which stall badly when another process holds a core.

Usage: ``python benchmarks/diagnose_speed.py [--depth 100] [--width 256] [--batch 64]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import gradguard as gg

BUDGET_S = 10.0


def mlp(depth: int, width: int) -> nn.Sequential:
    """``depth`` Linear layers of ``width`` with ReLU between them, He-initialized."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, width))
    model = nn.Sequential(*layers)
    gg.init.initialize(model, "auto")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Time gradguard.diagnose.")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp(args.depth, args.width)
    x = torch.randn(args.batch, args.width)
    print(
        f"{args.depth}-layer MLP, width {args.width}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    times = []
    for run in range(args.runs):
        start = time.perf_counter()
        diag = gg.diagnose(model, x)
        times.append(time.perf_counter() - start)
        print(f"run {run}: {times[-1]:.2f} s  verdict {diag.verdict}")
    print(f"worst {max(times):.2f} s (budget {BUDGET_S:.0f} s)")


if __name__ == "__main__":
    main()
