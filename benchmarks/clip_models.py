"""The clip policies against their peers on models unlike the two of ``overhead_bench``.

``overhead_bench`` times a GPT-like transformer (a few shapes, large tensors) and a
500-layer MLP (1,000 tensors of two shapes). Real models mix more shapes, and a policy
that only wins where shapes repeat would mislead. This script times, on a small ResNet
(62 tensors, 17 shapes), a 6-layer ``nn.TransformerEncoder`` (72 tensors) and an MLP of
200 layers of varied widths (400 tensors, 100 shapes), side by side in interleaved
rounds on 1 thread (``overhead_bench._time_rounds``: garbage collection paused):

- ``gg.clip_(model, ValueClip(1.0))`` against torch's ``clip_grad_value_(foreach=True)``,
  with no element beyond the bound (the gradients scaled to a largest magnitude of 0.5)
  and with every gradient beyond it (the same, x1e4);
- ``gg.clip_(model, AGC(exclude=()))`` against timm's ``adaptive_clip_grad`` and against
  torch's ``clip_grad_norm_(foreach=True)``;
- ``gg.clip_(model, NormClip)`` against ``clip_grad_norm_``.

Every call starts from the same gradients, restored by one fused copy that is timed on
its own and subtracted. Run: ``.venv/bin/python benchmarks/clip_models.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradguard as gg  # noqa: E402
import overhead_bench as ob  # noqa: E402 - benchmarks/ is put on the path just above


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm, a projected shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + self.shortcut(x))


def resnet() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)]
    cin = 16
    for cout, stride in [(16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]:
        layers.append(_Block(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    x = torch.randn(4, 3, 32, 32)
    return nn.Sequential(*layers), lambda m: m(x).square().sum()


def transformer() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    layer = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True)
    model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    x = torch.randn(2, 16, 128)
    return model, lambda m: m(x).square().sum()


def varied_mlp() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    model = nn.ModuleList(nn.Linear(8 + i % 50, 8 + i % 50) for i in range(200))
    inputs = [torch.randn(2, layer.in_features) for layer in model]

    def loss(m: nn.Module) -> Tensor:
        return torch.stack(
            [layer(x).square().sum() for layer, x in zip(m, inputs, strict=True)]
        ).sum()

    return model, loss


MODELS = {"resnet": resnet, "transformer": transformer, "varied-mlp": varied_mlp}


def _bench(name: str, settings: ob.Settings, rng: random.Random) -> list[str]:
    torch.manual_seed(settings.seed)
    model, loss = MODELS[name]()
    loss(model).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    peak = max(float(g.abs().max()) for g in grads)
    within = [g / (2 * peak) for g in grads]  # no element beyond 1.0
    beyond = [g * 1e4 for g in within]
    timm = ob._timm_agc()
    value, agc = gg.ValueClip(1.0), gg.AGC(exclude=())

    def from_(source: list[Tensor], fn: Callable[[], object] = ob._noop) -> Callable[[], None]:
        def call() -> None:
            torch._foreach_copy_(grads, source)
            fn()

        return call

    rows: dict[str, Callable[[], None]] = {
        "restore": from_(within),
        "restore x1e4": from_(beyond),
        "gg ValueClip, none beyond": from_(within, lambda: gg.clip_(model, value)),
        "torch clip_grad_value_, none beyond": from_(
            within, lambda: nn.utils.clip_grad_value_(params, 1.0, foreach=True)
        ),
        "gg ValueClip, all beyond": from_(beyond, lambda: gg.clip_(model, value)),
        "torch clip_grad_value_, all beyond": from_(
            beyond, lambda: nn.utils.clip_grad_value_(params, 1.0, foreach=True)
        ),
        "gg AGC": from_(within, lambda: gg.clip_(model, agc)),
        "gg NormClip": from_(within, lambda: gg.clip_(model, gg.NormClip(1.0))),
        "torch clip_grad_norm_": from_(
            within, lambda: nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        ),
    }
    if timm is not None:
        rows["timm adaptive_clip_grad"] = from_(within, lambda: timm.adaptive_clip_grad(params))
    contenders = [ob._Contender(key, fn) for key, fn in rows.items()]
    timings = ob._time_rounds(contenders, settings, rng)
    median = {key: statistics.median(values) for key, (values, _) in timings.items()}

    def net(key: str) -> float:
        return median[key] - median["restore x1e4" if "all beyond" in key else "restore"]

    def ratio(ours: str, theirs: str) -> str:
        return f"{net(ours) / net(theirs):.2f}x ({net(ours):,.0f} vs {net(theirs):,.0f} µs)"

    shapes = len({tuple(p.shape) for p in params})
    count = sum(p.numel() for p in params)
    lines = [
        f"{name}: {len(params)} tensors, {shapes} shapes, {count:,} parameters",
        "  ValueClip vs clip_grad_value_, none beyond: "
        + ratio("gg ValueClip, none beyond", "torch clip_grad_value_, none beyond"),
        "  ValueClip vs clip_grad_value_, all beyond:  "
        + ratio("gg ValueClip, all beyond", "torch clip_grad_value_, all beyond"),
        "  AGC vs clip_grad_norm_:                     " + ratio("gg AGC", "torch clip_grad_norm_"),
        "  NormClip vs clip_grad_norm_:                "
        + ratio("gg NormClip", "torch clip_grad_norm_"),
    ]
    if timm is not None:
        lines.append(
            "  AGC vs timm adaptive_clip_grad:             "
            + ratio("gg AGC", "timm adaptive_clip_grad")
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = ob.Settings(
        rounds=args.rounds,
        quick=False,
        threads=1,
        seed=args.seed,
        target_block_us=20_000.0,
        history=0,
    )
    rng = random.Random(args.seed)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds")
    for name in MODELS:
        print("\n".join(_bench(name, settings, rng)))


if __name__ == "__main__":
    main()
