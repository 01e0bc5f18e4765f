"""Rollback's snapshot cost, amortised per step, against a training step of the GPT-like model.

Goal (the recovery issue): with ``every=100`` and in-memory storage, the snapshot cost per
step is at most 2 % of a training step. Both are timed in the same process, interleaved,
median over rounds. Run: ``python benchmarks/snapshot_overhead.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

import gradguard as gg
from overhead_bench import _gpt_case

ROUNDS = 15
EVERY = 100


def main() -> None:
    """Time snapshots and training steps in alternation; print the amortised ratio."""
    torch.set_num_threads(1)
    case = _gpt_case(quick=False, gen=torch.Generator().manual_seed(0))
    model = case.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rollback = gg.Rollback(every=EVERY, keep=2)
    guard = gg.Guard(model, optimizer, recovery=rollback, detectors=None, log_every=EVERY)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = case.loss(model)
        loss.backward()
        optimizer.step()

    train_step()  # optimizer state exists from here on: snapshots are full size
    rollback.snapshot()
    step_times, snapshot_times = [], []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        train_step()
        step_times.append(time.perf_counter() - start)
        guard.step_count += EVERY  # a new step index, so the snapshot is taken
        start = time.perf_counter()
        rollback.snapshot()
        snapshot_times.append(time.perf_counter() - start)
    step = statistics.median(step_times)
    snapshot = statistics.median(snapshot_times)
    share = snapshot / EVERY / step
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT-like model: {params:,} parameters; {ROUNDS} interleaved rounds, 1 thread")
    print(f"training step (fwd + bwd + AdamW): median {step * 1e3:.1f} ms")
    print(
        f"in-memory snapshot: median {snapshot * 1e3:.1f} ms "
        f"({rollback.snapshot_nbytes / 2**20:.0f} MiB held for keep=2)"
    )
    verdict = "✓" if share <= 0.02 else "✗"
    print(f"amortised at every={EVERY}: {share:.3%} of a training step (goal ≤ 2%) {verdict}")


if __name__ == "__main__":
    main()
