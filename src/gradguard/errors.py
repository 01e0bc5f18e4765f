"""Errors raised by gradguard: each names the argument or parameter at fault and the fix."""

from __future__ import annotations


class GradGuardError(Exception):
    """Base class of every error gradguard raises on purpose."""


class ConfigError(GradGuardError, ValueError):
    """A constructor or function argument is invalid; raised at construction, not mid-training."""


class UnsupportedModelError(GradGuardError, TypeError):
    """The object given as a model cannot be measured: no trainable parameter, or no names."""


def check_state_keys(owner: object, found: set[str], keys: set[str], kind: str) -> None:
    """Refuse a ``load_state_dict`` whose keys (``found``) are not ``keys``: another ``kind``'s."""
    if found != keys:
        raise ConfigError(
            f"{type(owner).__name__}.load_state_dict expects keys {sorted(keys)}, got "
            f"{sorted(found)}: was this state saved from another {kind}?"
        )
