"""Mixed precision with a GradScaler, guarded: skipped steps agree with the scaler's.

The guard unscales, measures the true norms, clips, and skips the steps the scaler skips
(and non-finite ones it would miss), on CUDA or on the CPU.

    python examples/amp_loop.py --steps 200
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def main() -> None:
    """Train a small regression net under fp16 autocast for ``--steps`` steps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1)
    )
    model.to(device)
    fused = device == "cuda"  # the guard's sync-free path; fused AdamW also exists on the CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    # A large initial scale makes the first steps overflow in fp16: the scaler backs off.
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24)
    guard = gg.Guard(
        model, optimizer, clip=gg.NormClip(1.0), scaler=scaler, log_every=20, run_dir=args.run_dir
    )
    amp_dtype = torch.float16  # fp16 autocast runs on the CPU too (slowly); bf16 needs no scaler
    w = torch.randn(32, 1, device=device)
    skipped = 0
    for _ in range(args.steps):
        x = torch.randn(128, 32, device=device)
        target = torch.sin(x @ w)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=amp_dtype):
            loss = nn.functional.mse_loss(model(x).float(), target)
        scaler.scale(loss).backward()
        report = guard.step(loss)  # unscales, measures, clips, steps through the scaler
        skipped += int(report.skipped)  # reading it syncs: fine in an example
    guard.close()
    print(
        f"final loss {loss.item():.4f}; {skipped} steps skipped by the scaler and the guard; "
        f"scale now {scaler.get_scale():.0f}; host syncs {guard.sync_count}"
    )


if __name__ == "__main__":
    main()
