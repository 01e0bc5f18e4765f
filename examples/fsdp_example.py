"""FSDP2 (``fully_shard``) with gradguard: global norms from local shards, one all-reduce.

    torchrun --nproc-per-node 2 examples/fsdp_example.py --steps 100

Each rank holds a shard of every gradient; gradguard sums the shards' squared norms (and
the loss) in ONE all-reduce per step, so every rank clips by the same global norm, skips
the same steps and rolls back together. Uses gloo on the CPU (NCCL with CUDA).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradguard as gg


def main() -> None:
    """Train a sharded MLP for ``--steps`` steps; one rank gets a NaN in its shard mid-run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    if cuda:
        model.cuda()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gg.Guard(
        model, optimizer, clip=gg.ZClip(), recovery=gg.Rollback(every=20), log_every=10
    )
    device = torch.device("cuda") if cuda else torch.device("cpu")
    generator = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=generator).to(device)
        y = x[:, :1] * 2 - x[:, 1:2]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == args.steps // 2 and rank == 0:  # one rank's shard, after reduce-scatter
            model[0].weight.grad._local_tensor.view(-1)[0] = float("nan")
        report = guard.step(loss)
    guard.close()
    skipped = [e.step for e in guard.events if e.kind == "nonfinite"]
    print(f"rank {rank}: global grad norm {report.grad_norm.item():.4f}, skipped steps {skipped}")
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
