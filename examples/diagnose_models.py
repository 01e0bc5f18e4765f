"""Models with known gradient health, as factories for ``gradguard diagnose``.

Each function takes no argument and returns a fresh model (in train mode, as built); the
command line seeds torch before calling it. Inputs are 784 features (a flattened 28x28
image) and outputs 10 classes, except the recurrent models (8 features per step).

    gradguard diagnose examples/diagnose_models.py:he_relu --input-shape 64,784 --classes 10
    gradguard diagnose examples/diagnose_models.py:deep_sigmoid --input-shape 64,784
    gradguard diagnose examples/diagnose_models.py:tanh_rnn --input-shape 16,100,8

Run this file to diagnose them all: ``python examples/diagnose_models.py``.
"""

from __future__ import annotations

import torch
from torch import nn

import gradguard as gg

IN_FEATURES = 784
CLASSES = 10
WIDTH = 128


def mlp(depth: int, activation: type[nn.Module], width: int = WIDTH) -> nn.Sequential:
    """``depth`` Linear layers (784 -> width -> ... -> 10) with PyTorch's default init."""
    layers: list[nn.Module] = []
    features = IN_FEATURES
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), activation()]
        features = width
    layers.append(nn.Linear(features, CLASSES))
    return nn.Sequential(*layers)


def deep_sigmoid() -> nn.Module:
    """20 sigmoid layers, default init: vanishing (Glorot & Bengio 2010)."""
    return mlp(20, nn.Sigmoid)


def deep_tanh() -> nn.Module:
    """20 tanh layers, default init U(±1/√n): vanishing; Xavier init fixes it."""
    return mlp(20, nn.Tanh)


def relu_normal() -> nn.Module:
    """30 ReLU layers with N(0, 1) weights: exploding (each layer multiplies by ~√(n/2))."""
    model = mlp(30, nn.ReLU)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def he_relu() -> nn.Module:
    """30 ReLU layers with He initialization: healthy (He et al. 2015)."""
    model = mlp(30, nn.ReLU)
    gg.init.initialize(model, "auto")
    return model


class ResidualBlock(nn.Module):
    """``relu(x + BN(W2 relu(BN(W1 x))))``, the block of He et al. (2016) as an MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the branch to the identity path."""
        return torch.relu(x + self.branch(x))


def residual_bn(blocks: int = 50, width: int = 64) -> nn.Module:
    """50 residual blocks with BatchNorm, He init: healthy (101 weight layers)."""
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, width),
        *(ResidualBlock(width) for _ in range(blocks)),
        nn.Linear(width, CLASSES),
    )
    gg.init.initialize(model, "auto")
    return model


class LastStep(nn.Module):
    """A recurrent layer read out at its last step: input (batch, steps, 8)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the sequence, classify from the last hidden state."""
        return self.head(self.rnn(x)[0][:, -1])


def tanh_rnn(radius: float = 2.0, hidden: int = 64) -> nn.Module:
    """A tanh RNN whose recurrent weights are orthogonal times ``radius``: 2 explodes."""
    rnn = nn.RNN(8, hidden, batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0)
        rnn.weight_hh_l0.mul_(radius)
    return LastStep(rnn)


def lstm(forget_bias: float = 0.0, hidden: int = 64) -> nn.Module:
    """An LSTM; at forget bias 0 the gradient decays through time at initialization."""
    cell = nn.LSTM(8, hidden, batch_first=True)
    if forget_bias:
        gg.init.set_forget_bias(cell, forget_bias)
    return LastStep(cell)


FEEDFORWARD = (deep_sigmoid, deep_tanh, relu_normal, he_relu, residual_bn)
RECURRENT = (tanh_rnn, lstm)


def main() -> None:
    """Diagnose every factory on a random batch and print one line each."""
    for factory in FEEDFORWARD + RECURRENT:
        torch.manual_seed(0)
        model = factory()
        shape = (16, 100, 8) if factory in RECURRENT else (64, IN_FEATURES)
        diag = gg.diagnose(model, torch.randn(shape))
        ratio = "-" if diag.gradient_ratio is None else f"{diag.gradient_ratio:.2g}"
        print(f"{factory.__name__:13s} {diag.verdict:10s} first/last gradient {ratio}")


if __name__ == "__main__":
    main()
