"""The registry of lab experiments and the validation of experiment names."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from gradguard.errors import ConfigError
from gradguard.lab._records import Experiment

MODULES = (
    "depth_activation",
    "initialization",
    "clipping_rnn",
    "gated_rnn",
    "normalization",
    "residual",
    "selu",
    "isometry",
    "adaptive_clipping",
    "optimizers_lr",
    "regularization",
    "recovery",
    "early_stopping",
)
"""The experiment modules under ``gradguard.lab``, in run order (the order of the lab table).

Each defines ``EXPERIMENT``; a module not written yet is skipped, so experiments can land
one at a time. A module may also define ``plot(experiment_data, out_dir) -> Path``.
"""


def _discover() -> dict[str, Experiment]:
    found: dict[str, Experiment] = {}
    for module_name in MODULES:
        try:
            module = importlib.import_module(f"gradguard.lab.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"gradguard.lab.{module_name}":
                raise  # a real import error inside the module
            continue
        experiment: Experiment = module.EXPERIMENT
        found[experiment.name] = experiment
    return found


EXPERIMENTS: Mapping[str, Experiment] = MappingProxyType(_discover())
"""Every experiment by name, in the order ``run()`` runs them."""


def list_experiments() -> list[tuple[str, str]]:
    """Return ``(name, title)`` of every experiment, in run order."""
    return [(name, e.title) for name, e in EXPERIMENTS.items()]


def select(names: str | Sequence[str] | None) -> list[Experiment]:
    """Return the experiments named, in the order given, without duplicates.

    Args:
        names: experiment names; ``None`` selects them all. A single string is one name.

    Raises:
        ConfigError: a name is not registered, or ``names`` is empty.
    """
    if names is None:
        return list(EXPERIMENTS.values())
    wanted = [names] if isinstance(names, str) else list(names)
    valid = ", ".join(EXPERIMENTS)
    if not wanted:
        raise ConfigError(
            f"names is empty: no experiment to run. Pass names=None to run all ({valid})."
        )
    unknown = [n for n in wanted if n not in EXPERIMENTS]
    if unknown:
        bad = ", ".join(repr(n) for n in unknown)
        raise ConfigError(f"unknown lab experiment {bad}; valid names: {valid}.")
    return [EXPERIMENTS[n] for n in dict.fromkeys(wanted)]
