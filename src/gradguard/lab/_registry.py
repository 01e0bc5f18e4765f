"""The registry of lab experiments and the validation of experiment names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from gradguard.errors import ConfigError
from gradguard.lab import depth_activation, recovery
from gradguard.lab._records import Experiment

EXPERIMENTS: Mapping[str, Experiment] = MappingProxyType(
    {e.name: e for e in (depth_activation.EXPERIMENT, recovery.EXPERIMENT)}
)
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
