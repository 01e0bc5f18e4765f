"""Reprs name every argument a policy, detector or recovery was built with, as logs read them."""

from __future__ import annotations

import inspect
from pathlib import Path, PosixPath, WindowsPath
from typing import Any

import pytest

import gradguard as gg
from gradguard import detect
from gradguard._repr import arguments_repr

BUILT: dict[str, Any] = {
    "NormClip": lambda: gg.NormClip(0.5, norm_type=1.0),
    "ValueClip": lambda: gg.ValueClip(0.25),
    "AutoClip": lambda: gg.AutoClip(25.0, bins_per_octave=16),
    "ZClip": lambda: gg.ZClip(alpha=0.9, skip_update_on_spike=True, max_grad_norm=3.0, eps=1e-5),
    "AGC": lambda: gg.AGC(0.02, exclude=("head.*",)),
    "Exploding": lambda: detect.Exploding(growth=20.0, loss_rise=0.5),
    "Spike": lambda: detect.Spike(window=32, metrics=("loss",)),
    "Vanishing": lambda: detect.Vanishing(threshold=1e-4, ignore_zero=True),
    "NonFinite": lambda: detect.NonFinite(scaler_streak=7),
    "Overflow": detect.Overflow,
    "Divergence": lambda: detect.Divergence(patience=9),
    "Rollback": lambda: gg.Rollback(
        every=50, storage="disk", path="ckpt", on_exhausted="stop", spike_metrics=("grad_norm",)
    ),
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_repr_names_every_argument_and_rebuilds_the_same_object(name: str) -> None:
    obj = BUILT[name]()
    text = repr(obj)
    assert text.startswith(f"{type(obj).__name__}(")
    for argument in inspect.signature(type(obj)).parameters:
        assert f"{argument}={getattr(obj, argument)!r}" in text
    namespace = {**vars(gg), **vars(detect), "PosixPath": PosixPath, "WindowsPath": WindowsPath}
    assert repr(eval(text, namespace)) == text  # noqa: S307 - our own repr, in a test


def test_non_default_settings_reach_the_repr() -> None:
    assert "skip_update_on_spike=True" in repr(BUILT["ZClip"]())
    rollback = repr(BUILT["Rollback"]())
    assert f"path={Path('ckpt')!r}" in rollback
    assert "on_exhausted='stop'" in rollback


def test_an_argument_kept_under_another_name_is_left_out() -> None:
    class Tighter(gg.NormClip):
        def __init__(self, factor: float) -> None:
            super().__init__(1.0 / factor)

    assert arguments_repr(Tighter(4.0)) == "Tighter()"
    assert repr(gg.NormClip(2.0)) == "NormClip(max_norm=2.0, norm_type=2.0)"
