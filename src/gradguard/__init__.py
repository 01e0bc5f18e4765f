"""gradguard keeps deep-network training stable.

It measures every gradient in one fused pass, clips with fixed or adaptive policies,
and reproduces the classic results about vanishing and exploding gradients in a lab.

The public names load on first use (PEP 562): ``import gradguard`` alone does not import
torch, so ``gradguard.report`` and ``gradguard report RUN_DIR`` read a run directory
without it. ``gradguard.Guard``, ``from gradguard import Guard`` and the submodules
(``gradguard.lab``, ``gradguard.detect``, ...) work as if imported eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradguard import init
    from gradguard._flat import FlatGrads
    from gradguard._flatten import flatten_grads_
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

#: Each public name and the module that defines it; ``init`` is the submodule itself.
_SOURCES = {
    "AGC": "gradguard.clip",
    "AutoClip": "gradguard.clip",
    "ClipPolicy": "gradguard.clip",
    "NormClip": "gradguard.clip",
    "ValueClip": "gradguard.clip",
    "ZClip": "gradguard.clip",
    "clip_": "gradguard.clip",
    "Diagnosis": "gradguard.diagnose",
    "diagnose": "gradguard.diagnose",
    "ConfigError": "gradguard.errors",
    "GradGuardError": "gradguard.errors",
    "UnsupportedModelError": "gradguard.errors",
    "Guard": "gradguard.guard",
    "GuardedOptimizer": "gradguard.guard",
    "Event": "gradguard.records",
    "StepReport": "gradguard.records",
    "Window": "gradguard.records",
    "Rollback": "gradguard.recover",
    "load_latest_snapshot": "gradguard.recover",
    "GradStats": "gradguard.stats",
    "grad_stats": "gradguard.stats",
    "MlflowSink": "gradguard.trackers",
    "WandbSink": "gradguard.trackers",
    "FlatGrads": "gradguard._flat",
    "flatten_grads_": "gradguard._flatten",
}

__all__ = [
    "AGC",
    "AutoClip",
    "ClipPolicy",
    "ConfigError",
    "Diagnosis",
    "Event",
    "FlatGrads",
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
    "flatten_grads_",
    "grad_stats",
    "init",
    "load_latest_snapshot",
]


class _Package(types.ModuleType):
    """This package's module type: ``gradguard.diagnose`` stays the function.

    Importing the submodule ``gradguard.diagnose`` (as ``gradguard.lab`` does) makes the
    import system bind it to this package's attribute of the same name; the function of
    that name, the public API, is bound instead, as the eager imports used to leave it.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "diagnose" and isinstance(value, types.ModuleType):
            value = getattr(value, "diagnose", value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if not TYPE_CHECKING:  # type checkers read the imports above; names load on first use here

    def __getattr__(name: str) -> Any:
        """Import a public name, or a submodule (``gradguard.lab``), on first use."""
        source = _SOURCES.get(name)
        if source is not None:
            value = getattr(importlib.import_module(source), name)
        elif name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        else:
            try:
                value = importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{__name__}.{name}":
                    raise  # the submodule exists and lacks a dependency: say which
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
