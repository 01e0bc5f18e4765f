"""DDP with gradguard: every rank measures the same (already averaged) gradients.

    torchrun --nproc-per-node 2 examples/ddp_example.py --steps 100

Uses gloo on the CPU (NCCL when CUDA is available). A NaN injected into rank 0's gradient
before DDP's all-reduce reaches every rank, and every rank skips that step.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import gradguard as gg


def main() -> None:
    """Train a small regression net for ``--steps`` steps on every rank."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    guard = gg.Guard(ddp, optimizer, clip=gg.NormClip(1.0), log_every=10)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=generator).to(device)
        y = x[:, :1] * 2 - x[:, 1:2]
        optimizer.zero_grad(set_to_none=True)
        if step == args.steps // 2 and rank == 0:  # a fault on one rank, before the all-reduce
            hook = model[0].weight.register_hook(lambda g: g * float("nan"))
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        if step == args.steps // 2 and rank == 0:
            hook.remove()
        report = guard.step(loss)  # the loss is averaged over the ranks for the detectors
    guard.close()
    skipped = [e.step for e in guard.events if e.kind == "nonfinite"]
    assert report.loss is not None
    print(f"rank {rank}: mean loss {report.loss.item():.4f}, skipped steps {skipped}")
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
