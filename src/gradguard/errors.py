"""Errors raised by gradguard: each names the argument or parameter at fault and the fix."""

from __future__ import annotations


class GradGuardError(Exception):
    """Base class of every error gradguard raises on purpose."""


class ConfigError(GradGuardError, ValueError):
    """A constructor or function argument is invalid; raised at construction, not mid-training."""


class UnsupportedModelError(GradGuardError, TypeError):
    """The object given as a model cannot be measured: no trainable parameter, or no names."""
