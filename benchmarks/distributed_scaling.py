"""FSDP2: the cost of grad_stats per step with 100, 1,000 and 10,000 small sharded tensors.

Two CPU processes (gloo). gradguard takes each DTensor gradient's local shard (no
communication, no ``torch.stack`` over DTensors), runs one fused norm pass and ONE
all-reduce; the cost should grow linearly with the number of tensors. Run:

    python benchmarks/distributed_scaling.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg
from gradguard import _distributed

COUNTS = (100, 1_000, 10_000)
ROUNDS = 20


class ManyTensors(nn.Module):
    """``count`` parameters of 8 x 4 elements, each sharded by fully_shard."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(8, 4)) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Touch every weight, so every one gets a gradient."""
        return sum((x @ w.t()).sum() for w in self.weights)  # type: ignore[return-value]


def measure(count: int) -> tuple[float, int]:
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(ManyTensors(count))
    model(torch.randn(2, 4)).backward()
    gg.grad_stats(model)  # builds and caches the layout
    before = _distributed.ALL_REDUCE_CALLS[0]
    times = []
    for _ in range(ROUNDS):
        dist.barrier()
        start = time.perf_counter()
        gg.grad_stats(model)
        times.append(time.perf_counter() - start)
    calls = (_distributed.ALL_REDUCE_CALLS[0] - before) // ROUNDS
    return statistics.median(times), calls


def worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    rows = [(count, *measure(count)) for count in COUNTS]
    if rank == 0:
        print("FSDP2 (2 ranks, gloo, CPU): grad_stats per step, median of", ROUNDS, "rounds")
        print(f"{'tensors':>8} {'ms/step':>9} {'us/tensor':>10} {'all-reduces':>12}")
        for count, seconds, calls in rows:
            print(f"{count:>8} {seconds * 1e3:>9.2f} {seconds * 1e6 / count:>10.2f} {calls:>12}")
        growth = rows[-1][1] / rows[0][1]
        print(f"100x more tensors cost {growth:.0f}x the time (linear would be 100x)")
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "store"),), nprocs=2)
    sys.exit(0)
