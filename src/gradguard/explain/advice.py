"""The advice on an event: values from this run that would act on its cause."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gradguard.explain.causes import _Causes
from gradguard.explain.facts import (
    TARGET_UPDATE_RATIO,
    _listed,
    _Row,
    _short,
    _sig,
)
from gradguard.records import Advice, Event, Window


class _Advice(_Causes):
    """The advice rules of :class:`~gradguard.explain.Explainer`, one per cause."""

    # --- advice ----------------------------------------------------------------------

    def _advice(
        self, cause: str, window: Window, event: Event, evidence: dict[str, Any]
    ) -> tuple[Advice, ...]:
        row = self._row(window, int(event.extra.get("onset", event.step)))
        rules: dict[str, Callable[[], list[Advice | None]]] = {
            "lr_too_high": lambda: [
                self._lr_advice(window, event, evidence, row),
                self._clip_advice(row),
            ],
            "bad_batch": lambda: [
                self._inspect_advice(event, evidence),
                self._clip_advice(row),
                self._rollback_advice(),
            ],
            "overflow": self._overflow_advice,
            "nonfinite_loss": lambda: [
                self._epsilon_advice("loss"),
                self._inspect_advice(event, evidence),
            ],
            "nonfinite_backward": lambda: [self._epsilon_advice("backward")],
            "nonfinite_forward": lambda: [
                self._inspect_advice(event, evidence),
                Advice(
                    "inspect_batch",
                    "Check the inputs for NaN/Inf before the forward pass "
                    "(torch.isfinite(x).all()) and look for 0/0 in the model.",
                    {"check": "torch.isfinite"},
                ),
            ],
            "initialization": lambda: [self._init_advice(evidence)],
            "saturation": lambda: self._saturation_advice(evidence),
            "dead_units": lambda: self._dead_advice(window, event),
            "layer_local": lambda: [
                self._layer_advice(window, evidence, row),
                self._clip_advice(row),
            ],
        }
        if event.kind == "vanishing" and cause == "unknown":
            rules["unknown"] = lambda: self._normalization_advice()
        steps = rules.get(cause, lambda: [self._clip_advice(row)])()
        if cause in ("lr_too_high", "layer_local", "unknown") and event.kind != "vanishing":
            steps.append(self._rollback_advice())
        kept: list[Advice] = []
        for item in steps:
            if item is not None and all(item.text != k.text for k in kept):
                kept.append(item)
        return tuple(kept)

    def healthy_clip(self) -> float | None:
        """A clip threshold from the healthy history: its 95th percentile gradient norm."""
        if len(self._norms) < 8:
            return None
        return _sig(float(np.quantile(np.asarray(self._norms), 0.95)))

    def _clip_advice(self, row: _Row | None) -> Advice | None:
        threshold = self.healthy_clip()
        if threshold is None or row is None:
            return None
        norm = row.grad_norm
        if math.isfinite(norm) and not threshold < norm:
            return None  # it would not have acted on this step
        current = self.facts.clip_max_norm
        if current is not None and current <= threshold:
            return None  # the run already clips at least as hard
        typical = float(np.median(np.asarray(self._norms)))
        seen = f"{norm:.3g}" if math.isfinite(norm) else "non-finite"
        return Advice(
            "clip",
            f"Clip the global gradient norm at {threshold:g} (gg.NormClip({threshold:g})): the "
            f"95th percentile of this run's healthy steps (median {typical:.3g}); this step's "
            f"norm was {seen}.",
            {"max_norm": threshold, "healthy_median": _sig(typical)},
        )

    def _lr_advice(
        self, window: Window, event: Event, evidence: dict[str, Any], row: _Row | None
    ) -> Advice | None:
        if "layer_lr" in evidence:
            layer_lr, other = float(evidence["layer_lr"]), float(evidence["other_lr"])
            new = _sig(max(other, layer_lr / 10))
            if new < layer_lr:
                return Advice(
                    "group_lr",
                    f"Lower the learning rate of the param group holding layer "
                    f"{evidence['layer']} from {layer_lr:g} to {new:g} (the other layers use "
                    f"{other:g}).",
                    {"layer": evidence["layer"], "lr": new, "from": layer_lr},
                )
        current = row.lr if row is not None else float(window.lr[-1])
        if not (math.isfinite(current) and current > 0):
            return None
        if "lr_before" in evidence:
            new = _sig(float(evidence["lr_before"]))
            reason = "the value it had while training was healthy"
            current = float(evidence.get("lr", current))
        else:
            ratio = self._update
            top = float(np.nanmax(ratio)) if ratio is not None and np.isfinite(ratio).any() else 0
            factor = min(0.5, TARGET_UPDATE_RATIO / top) if top > 0 else 0.1
            new = _sig(current * factor)
            reason = (
                f"so the largest update ratio, {top:.3g}, comes near {TARGET_UPDATE_RATIO:g}"
                if top > 0
                else "a tenth, until the updates stay small"
            )
        if not new < current:
            return None
        return Advice(
            "lr",
            f"Lower the learning rate from {current:g} to {new:g}: {reason}.",
            {"lr": new, "from": current},
        )

    def _inspect_advice(self, event: Event, evidence: dict[str, Any]) -> Advice | None:
        batch = event.batch
        outliers = evidence.get("outliers") or []
        if batch is None and not outliers:
            return None
        names = [
            o["id"] if o.get("id") is not None else f"position {o['position']}" for o in outliers
        ]
        who = f" examples {_listed([str(n) for n in names])}" if names else " its examples"
        where = f"batch {_short(batch)}" if batch is not None else "the batch"
        return Advice(
            "inspect_batch",
            f"Inspect {where}:{who} stand out; fix or drop them.",
            {"batch": batch, "examples": names},
        )

    def _rollback_advice(self) -> Advice | None:
        if self.facts.recovery:
            return None
        return Advice(
            "rollback",
            "Add recovery=gg.Rollback(): it restores the weights from before such a step and "
            "skips the batches in between.",
            {"recovery": "Rollback"},
        )

    def _epsilon_advice(self, where: str) -> Advice:
        eps = 1e-4 if self.facts.low_precision == "float16" else 1e-7
        if where == "loss":
            text = (
                f"Keep the loss finite: log(p.clamp_min({eps:g})) instead of log(p), or work in "
                "log space (F.log_softmax, F.cross_entropy); guard divisions the same way."
            )
        else:
            text = (
                f"Keep the backward finite: sqrt(x + {eps:g}) and log(x + {eps:g}) instead of "
                "sqrt(x) and log(x) where x can be 0; avoid 0/0."
            )
        return Advice("epsilon", text, {"epsilon": eps})

    def _overflow_advice(self) -> list[Advice | None]:
        steps: list[Advice | None] = []
        if self.facts.low_precision == "float16" and not self.facts.scaler:
            steps.append(
                Advice(
                    "bf16",
                    "Keep the weights in fp32 and compute in bfloat16 (torch.autocast(..., "
                    "dtype=torch.bfloat16)): its range is fp32's, 3.4e38 against fp16's 65504.",
                    {"dtype": "bfloat16"},
                )
            )
            steps.append(
                Advice(
                    "scaler",
                    "Or stay in fp16 with autocast and torch.amp.GradScaler(), passed as "
                    "Guard(scaler=...): it lowers the loss scale when gradients overflow.",
                    {"scaler": "GradScaler"},
                )
            )
        elif not self.facts.scaler:
            steps.append(
                Advice(
                    "scaler",
                    "Use torch.amp.GradScaler() (Guard(scaler=...)) to scale the loss "
                    "dynamically: a fixed scale overflows fp16's 65504.",
                    {"scaler": "GradScaler"},
                )
            )
        else:
            steps.append(
                Advice(
                    "bf16",
                    "The GradScaler could not bring the gradients into fp16's range: compute "
                    "in bfloat16 (fp32's range) instead.",
                    {"dtype": "bfloat16"},
                )
            )
        return steps

    def _init_advice(self, evidence: dict[str, Any]) -> Advice | None:
        if "weight_std" not in evidence:
            return None
        fan_in, std = int(evidence["fan_in"]), float(evidence["weight_std"])
        he, xavier = math.sqrt(2.0 / fan_in), math.sqrt(1.0 / fan_in)
        target = xavier if self.facts.saturating else he
        scheme = (
            "Xavier (gg.init, nn.init.xavier_normal_)"
            if self.facts.saturating
            else ("He (nn.init.kaiming_normal_)")
        )
        return Advice(
            "init",
            f"Initialise layer {evidence['layer']} and its like with {scheme}: std "
            f"{_sig(target):g} for fan-in {fan_in}, not {std:.3g}; or gg.init.lsuv "
            "to measure it on a batch.",
            {"layer": evidence["layer"], "std": _sig(target), "from": std},
        )

    def _saturation_advice(self, evidence: dict[str, Any]) -> list[Advice | None]:
        used = _listed(list(self.facts.saturating))
        first = evidence.get("first_layer_norm")
        measured = f": the first layer's gradient is {first:.3g} here" if first is not None else ""
        steps: list[Advice | None] = [
            Advice(
                "activation",
                f"Replace {used} in the hidden layers with ReLU or GELU, whose slope is 1 "
                f"where active{measured}.",
                {"activation": "ReLU", "from": list(self.facts.saturating)},
            )
        ]
        if not self.facts.normalized:
            steps.append(
                Advice(
                    "normalization",
                    "Or add LayerNorm/BatchNorm before each activation, which keeps the "
                    "inputs in the activation's steep range.",
                    {"normalization": "LayerNorm"},
                )
            )
        return steps

    def _normalization_advice(self) -> list[Advice | None]:
        if self.facts.normalized:
            return []
        return [
            Advice(
                "normalization",
                "Standardise the inputs (mean 0, std 1 per feature) and add LayerNorm or "
                "BatchNorm between layers, so that each layer sees inputs of unit scale.",
                {"normalization": "LayerNorm"},
            )
        ]

    def _dead_advice(self, window: Window, event: Event) -> list[Advice | None]:
        lr = float(window.lr[-1])
        steps: list[Advice | None] = [
            Advice(
                "activation",
                "Use LeakyReLU(0.01) (or GELU) so that units with negative inputs still pass "
                "a gradient and can come back.",
                {"activation": "LeakyReLU", "negative_slope": 0.01},
            )
        ]
        if math.isfinite(lr) and lr > 0:
            steps.append(
                Advice(
                    "lr",
                    f"Lower the learning rate from {lr:g} to {_sig(lr / 10):g}: large steps "
                    "push the biases of ReLU units below zero for every input.",
                    {"lr": _sig(lr / 10), "from": lr},
                )
            )
        return steps

    def _layer_advice(
        self, window: Window, evidence: dict[str, Any], row: _Row | None
    ) -> Advice | None:
        name = evidence.get("layer")
        if name is None:
            return None
        lr = row.lr if row is not None else float(window.lr[-1])
        ratio = float(evidence.get("update_ratio", math.nan))
        factor = min(0.5, TARGET_UPDATE_RATIO / ratio) if ratio > 0 else 0.1
        new = _sig(lr * factor)
        if not new < lr:
            return None
        return Advice(
            "group_lr",
            f"Give layer {name} its own param group with learning rate {new:g} (now {lr:g}): "
            f"its update ratio is {ratio:.3g}.",
            {"layer": name, "lr": new, "from": lr},
        )
