"""The deep networks of the ``isometry`` experiment's Part 1 and the exact Jacobian spectrum.

Holds the network families (:class:`Network`, with :func:`tanh_critical_point` for the tanh
critical line), their construction layer by layer from one generator
(:func:`build_network`), their Gaussian inputs (:func:`network_input`), and every singular
value of the input-output Jacobian at one input (:func:`singular_values`, the exact mode of
:func:`gradguard._jacobian.estimate`), with the width :data:`N` they share. Used by the
``isometry`` experiment, which measures and judges the spectra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gradguard import _jacobian
from gradguard.lab._harness import data_generator

N = 256
DIAGNOSE_BATCH = 8


def tanh_critical_point(q: float, points: int = 101) -> tuple[float, float]:
    """Return (σ_w, σ_b) of the tanh critical line at pre-activation variance ``q``.

    Solves ``σ_w² E[tanh'(√q z)²] = 1`` (χ = 1) and ``q = σ_w² E[tanh(√q z)²] + σ_b²``
    (``q`` is the fixed point) with Gauss-Hermite quadrature, z ~ N(0, 1).

    Example:
        >>> [round(v, 3) for v in tanh_critical_point(1.0)]
        [1.467, 0.389]
    """
    z, w = np.polynomial.hermite_e.hermegauss(points)
    w = w / w.sum()
    t = np.tanh(math.sqrt(q) * z)
    sw2 = 1.0 / float(np.sum(w * (1 - t**2) ** 2))
    sb2 = q - sw2 * float(np.sum(w * t**2))
    return math.sqrt(sw2), math.sqrt(max(sb2, 0.0))


@dataclass(frozen=True)
class Network:
    """One family of deep networks of Part 1 (``sigma_w``: std × √N, or orthogonal gain)."""

    name: str
    label: str
    activation: str
    """``linear``, ``tanh`` or ``relu``."""
    weights: str
    """``gaussian`` or ``orthogonal``."""
    sigma_w: float
    sigma_b: float
    q: float
    """Input variance per unit."""


_ACTIVATIONS: Mapping[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}


def build_network(network: Network, depth: int, seed: int) -> nn.Sequential:
    """``depth`` layers of ``network``'s family, drawn in order from one generator of ``seed``.

    A shallower net is therefore the first layers of a deeper one.
    """
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(N, N, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            if network.weights == "orthogonal":
                nn.init.orthogonal_(linear.weight, gain=network.sigma_w, generator=generator)
            else:
                std = network.sigma_w / math.sqrt(N)
                nn.init.normal_(linear.weight, 0.0, std, generator=generator)
            nn.init.normal_(linear.bias, 0.0, network.sigma_b, generator=generator)
        layers += [linear, _ACTIVATIONS[network.activation]()]
    return nn.Sequential(*layers)


def network_input(network: Network, seed: int) -> Tensor:
    """``DIAGNOSE_BATCH`` inputs ~ N(0, q* I) from data seed ``1000 + seed``; row 0 is probed."""
    z = torch.randn(DIAGNOSE_BATCH, N, generator=data_generator(seed))
    return z * math.sqrt(network.q)


def singular_values(model: nn.Module, x: Tensor, seed: int) -> Tensor:
    """All singular values of the Jacobian of ``model`` at ``x`` (one row), descending.

    :func:`gradguard._jacobian.estimate` with ``top`` equal to the width forms the Jacobian
    exactly from basis vectors (its exact mode) and returns every singular value.
    """
    spectrum = _jacobian.estimate(model, [x], samples=1, top=N, probes=1, seed=seed)
    if not spectrum.exact:  # the estimator's own rule: min(m, n) <= top + probes
        raise RuntimeError("expected the exact Jacobian")
    return torch.tensor(spectrum.top, dtype=torch.float64)
