"""The numbers a diagnosis decides by: the verdict's band, unit flags, the clip, the SVD.

Each is explained where it is defined; :mod:`gradguard.diagnose` gives the measurements
behind :data:`RATIO`.
"""

from __future__ import annotations

VERDICTS = ("healthy", "vanishing", "exploding")

RATIO = 1e3
"""Factor between first and last layer (or time step) gradients beyond which gradients
vanish (below 1/RATIO) or explode (above RATIO); also the band for the Jacobian's root
mean squared singular value. See the :mod:`gradguard.diagnose` docstring for the
measurements behind it."""

SATURATION_DERIVATIVE = 0.05
"""A unit is saturated where its activation's derivative is below this fraction of the
derivative's peak: tanh |y| > 0.975, sigmoid y < 0.013 or y > 0.987."""

SATURATED_FRACTION = 0.5
"""A layer is flagged "saturated" when more than this fraction of its outputs are."""

DEAD_FRACTION = 0.5
"""A ReLU-family layer is flagged "dead" when more than this fraction of its units output
zero (or less) for every example of the batch."""

INIT_TOLERANCE = 1.25
"""A weight's std further than this factor from the std its activation's scheme gives
counts as mis-initialized in the recommendations; an input std further than this factor
from 1 counts as not unit-scaled."""

EXACT_SVD_MAX = 64
"""Largest singular values of weights with a side up to this are exact (``svdvals``);
larger ones come from :data:`POWER_ITERATIONS` power iterations (a lower bound, within
about 1 % on random matrices, where the top two singular values are close)."""

POWER_ITERATIONS = 50

CLIP_FRACTION = 0.5
"""A suggested clipping threshold is at most this fraction of the global gradient norm
measured: a threshold at or above that norm would not clip the batch it came from."""
