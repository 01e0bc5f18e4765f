"""Find vanishing and exploding gradients before training, say why, and name the remedy.

:func:`diagnose` runs a model once on a sample batch and measures what the chain rule
multiplies together:

* per layer, in the order the layers run: the mean and std of its output, the fraction
  of saturated units after sigmoid/tanh-like activations and of dead units after ReLU
  and ReLU6 (leaky, ELU, GELU or SiLU units pass gradient below zero and cannot die),
  the gradient norm of its parameters (gradient flow, through
  :func:`gradguard.stats.grad_stats`), the gradient norm at its output, its weight norm
  and largest singular value, and its gain (output std / input std);
* the per-example input-output Jacobian: its largest singular values and its mean
  squared singular value (1 at dynamical isometry), estimated with ``torch.func``;
* for RNN/LSTM/GRU modules: the gradient reaching each time step of the input from the
  last output, the spectral radius of the recurrent weights and, for LSTMs, the
  forget-gate statistics;

then gives a verdict (``"healthy"``, ``"vanishing"``, ``"exploding"``) by the thresholds
below, flags layers, and recommends remedies with their sources (:func:`diagnose` gives
the rule for the clipping threshold, and what is left out because the model has it).

Thresholds. One number decides all three signals: a factor of :data:`RATIO` = 10³
between where the gradient enters and where it leaves.

* Depth: the gradient at the output of the first parametrized layer over the gradient at
  the output of the last one. Below 1/RATIO the early layers learn a thousand times
  slower than the late ones under one learning rate: "vanishing". Above RATIO a step
  that suits the late layers is a thousand times too large for the early ones:
  "exploding". Measured on the canonical networks of the tests (width 64, seeds 0-2):
  20-layer sigmoid 7e-17 to 9e-17, 20-layer tanh (PyTorch init) 2e-5, 30-layer ReLU
  with N(0, 1) weights 4e21 to 8e21, 30-layer ReLU with He init 0.56 to 1.2, 50
  residual blocks with BatchNorm 40 to 55, 28 plain blocks with BatchNorm 7e4 to 9e4
  (exploding toward the input, as Yang et al. 2019 predict and the lab's E6 measures),
  4-layer Transformer encoder 0.84 to 1.1. Healthy networks sit within a factor 100 of
  1, broken ones beyond 10⁴: the threshold is the geometric middle.
* Jacobian: the root mean squared singular value of the per-example Jacobian, below
  1/RATIO or above RATIO. It is the same product of layer Jacobians seen end to end
  (Pennington et al. 2017), and it is the only signal for a model whose layers cannot be
  hooked. It depends on the units of the input and output, which the wide band absorbs.
* Time: for each recurrent module, the gradient reaching the first input step over the
  gradient reaching the last one (Bengio et al. 1994; Pascanu et al. 2013).

Any exploding signal makes the verdict "exploding" (the first step can then overflow),
otherwise any vanishing signal makes it "vanishing". A non-finite activation, loss or
gradient is "exploding".

The model is left exactly as found: parameters, buffers (BatchNorm running statistics
and counters), the train/eval mode of every module, every ``.grad`` (the gradients are
taken with ``torch.autograd.grad``), ``requires_grad`` flags and the global random state.
The forward passes run in the mode the model is in: a freshly built network is in train
mode, so BatchNorm normalizes with batch statistics, as in the first training steps.

The package's modules are its parts, in the order a diagnosis runs: ``measure`` (hooks,
forward and backward passes, per-layer statistics, the Jacobian), ``structure`` (skip
connections and normalization in the autograd graph), ``recurrent`` (gradient through
time), ``verdict`` (flags, signals, the verdict), ``recommend`` (remedies and the clipping
threshold), ``run`` (:func:`diagnose`, composing them), with the results in ``records``
and the numbers decided by in ``thresholds``. The names below are the public API. The
text and HTML renderings live in :mod:`gradguard.report._diagnosis`, the rich tables in
``console``; both are imported when a diagnosis is first printed or saved.
"""

from __future__ import annotations

from gradguard.diagnose.measure import largest_singular_value
from gradguard.diagnose.recommend import SOURCES
from gradguard.diagnose.records import (
    Diagnosis,
    ForgetGate,
    JacobianDiagnosis,
    LayerDiagnosis,
    Recommendation,
    RecurrentDiagnosis,
)
from gradguard.diagnose.recurrent import forget_gate_stats, spectral_radii
from gradguard.diagnose.run import diagnose

# The thresholds, documented where they are defined, are public too (outside __all__).
from gradguard.diagnose.thresholds import CLIP_FRACTION as CLIP_FRACTION
from gradguard.diagnose.thresholds import DEAD_FRACTION as DEAD_FRACTION
from gradguard.diagnose.thresholds import EXACT_SVD_MAX as EXACT_SVD_MAX
from gradguard.diagnose.thresholds import INIT_TOLERANCE as INIT_TOLERANCE
from gradguard.diagnose.thresholds import POWER_ITERATIONS as POWER_ITERATIONS
from gradguard.diagnose.thresholds import RATIO, VERDICTS
from gradguard.diagnose.thresholds import SATURATED_FRACTION as SATURATED_FRACTION
from gradguard.diagnose.thresholds import SATURATION_DERIVATIVE as SATURATION_DERIVATIVE

__all__ = [
    "RATIO",
    "SOURCES",
    "VERDICTS",
    "Diagnosis",
    "ForgetGate",
    "JacobianDiagnosis",
    "LayerDiagnosis",
    "Recommendation",
    "RecurrentDiagnosis",
    "diagnose",
    "forget_gate_stats",
    "largest_singular_value",
    "spectral_radii",
]
