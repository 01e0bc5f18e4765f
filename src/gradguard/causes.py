"""The causes an event can carry (``Event.cause``), with their labels for people.

Torch-free, like ``errors``: the guard's records and the report (which reads run
directories without torch) share this one table.
"""

from __future__ import annotations

#: Why an event happened: every warning and error carries one of these as ``Event.cause``,
#: with its label for people. ``unknown`` is an honest answer when the evidence is thin.
CAUSES: dict[str, str] = {
    "lr_too_high": "learning rate too high",
    "bad_batch": "a bad batch",
    "overflow": "overflow of a low-precision type",
    "nonfinite_loss": "a non-finite loss (e.g. log(0) or division by zero)",
    "nonfinite_forward": "non-finite values in the forward pass",
    "nonfinite_backward": "non-finite values born in the backward pass (e.g. sqrt or log at 0)",
    "saturation": "saturating activations",
    "dead_units": "dead units",
    "initialization": "weights initialised at the wrong scale",
    "layer_local": "one layer blowing up",
    "unknown": "unknown",
}
