"""gradguard keeps deep-network training stable.

It measures every gradient in one fused pass, clips with fixed or adaptive policies,
and reproduces the classic results about vanishing and exploding gradients in a lab.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from gradguard import init
from gradguard.clip import AGC, AutoClip, ClipPolicy, NormClip, ValueClip, ZClip, clip_
from gradguard.diagnose import Diagnosis, diagnose
from gradguard.errors import ConfigError, GradGuardError, UnsupportedModelError
from gradguard.guard import Guard, GuardedOptimizer
from gradguard.records import Event, StepReport, Window
from gradguard.recover import Rollback, load_latest_snapshot
from gradguard.stats import GradStats, grad_stats
from gradguard.trackers import MlflowSink, WandbSink

try:
    __version__ = version("gradguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "AGC",
    "AutoClip",
    "ClipPolicy",
    "ConfigError",
    "Diagnosis",
    "Event",
    "GradGuardError",
    "GradStats",
    "Guard",
    "GuardedOptimizer",
    "MlflowSink",
    "NormClip",
    "Rollback",
    "StepReport",
    "UnsupportedModelError",
    "ValueClip",
    "WandbSink",
    "Window",
    "ZClip",
    "__version__",
    "clip_",
    "diagnose",
    "grad_stats",
    "init",
    "load_latest_snapshot",
]
