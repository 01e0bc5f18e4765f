"""A timm model trained under a guard whose clipping is gg.AGC, in place of timm's own AGC.

timm's training script clips with adaptive gradient clipping (Brock et al. 2021) between
the backward pass and the optimizer step::

    loss.backward()
    timm.utils.adaptive_clip_grad(model_parameters(model, exclude_head=True), 0.01)
    optimizer.step()

Here the guard does it, with the same rule and the same gradients (bitwise in fp32; see
docs/clipping.md), and measures, skips non-finite steps, logs and detects as well::

    guard = gg.Guard(model, optimizer, clip=gg.AGC(clipping=0.01))
    loss.backward()
    guard.step(loss)  # replaces optimizer.step()

Trains a timm ``resnet10t`` built with ``pretrained=False`` (no download) on the digits
bundled with scikit-learn, upscaled to 3x32x32. Needs ``pip install timm`` (and a
torchvision built for your torch). Run:

    python examples/timm_agc.py --steps 150   # logs to a new runs/timm-agc-<date>-<time>
    python examples/timm_agc.py --model nf_regnet_b0   # a normalizer-free net, AGC's home
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from sklearn.datasets import load_digits
from torch import nn

import gradguard as gg

TEST_SIZE = 297  # held out from the 1,797 digits, for the accuracy


def digits_as_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digits, standardised and upscaled to 3 channels of 32x32."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target)


def main() -> None:
    """Train ``--model`` for ``--steps`` steps under a guard clipping with AGC."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--model", default="resnet10t", help="any timm model name")
    parser.add_argument("--run-dir", default=None, help="default: a new directory under runs/")
    args = parser.parse_args()
    args.run_dir = args.run_dir or time.strftime("runs/timm-agc-%Y%m%d-%H%M%S")

    x, y = digits_as_images()
    torch.manual_seed(0)
    order = torch.randperm(len(x))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    clipped = 0
    with gg.Guard(
        model,
        optimizer,
        # timm's adaptive_clip_grad(..., clip_factor=0.01, eps=1e-3) over every parameter
        # but the classifier's, as its train.py does; exclude=() would clip the head too.
        clip=gg.AGC(clipping=0.01, eps=1e-3),
        log_every=25,
        run_dir=args.run_dir,
        on_event=lambda event: print(event),
    ) as guard:
        model.train()
        for _ in range(args.steps):
            batch = train[torch.randint(0, len(train), (64,))]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            report = guard.step(loss)  # replaces adaptive_clip_grad(...) + optimizer.step()
            clipped += int(report.scale < 1.0)  # reading it syncs: fine in an example
            if guard.should_stop:
                break

    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(dim=1) == y[test]).float().mean()
    print(
        f"{args.model}: test accuracy {accuracy:.3f} after {guard.step_count} steps; "
        f"AGC clipped at {clipped} of them; logs in {args.run_dir}"
    )


if __name__ == "__main__":
    main()
