"""Clipping policies: each maps one step's :class:`~gradguard.stats.GradStats` to a scale.

A policy is a small object with ``clip_(stats) -> scale``, ``state_dict()`` and
``load_state_dict()``. Everything happens on the device with no host sync; the scale is
a 0-d fp32 tensor in ``[0, 1]``: the factor by which the global gradient norm shrank.
A step whose norm is not finite is left to the guard (skip, zero or raise): policies
return a scale of 1 for it and keep it out of their state, so one NaN cannot poison an
EMA or a quantile sketch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradguard import _batched, _flat, _foreach
from gradguard._clip_state import NORM_EPS as NORM_EPS
from gradguard._clip_state import _check_keys, _choice, _DeviceState, _in_range, _positive
from gradguard._repr import arguments_repr
from gradguard._value_clip import HostValueClip
from gradguard.errors import ConfigError
from gradguard.protocols import ClipPolicy as ClipPolicy
from gradguard.stats import GradStats, NamedParameters, grad_stats, group_norms, layout_for

_get_grad = operator.attrgetter("grad")


def _scale_for(threshold: Tensor, total: Tensor) -> Tensor:
    """``min(1, threshold / (total + eps))``, and 1 where ``total`` is not finite."""
    scale = torch.clamp(threshold / (total + NORM_EPS), max=1.0)
    return torch.where(torch.isfinite(total), scale, torch.ones_like(scale))


def _norm(stats: GradStats) -> Tensor:
    """The global norm policies clip by: fp64 when some gradient is fp64, else fp32."""
    return stats.total if stats.total_fp64 is None else stats.total_fp64


def _scale_grads_(stats: GradStats, scale: Tensor) -> None:
    """Multiply every gradient by the 0-d ``scale`` in place.

    fp64 gradients take it in fp64 (``scale`` is then fp64): the factor of a norm beyond
    the fp32 range can be below fp32's smallest number. Every other dtype takes it in fp32.
    """
    if stats.total_fp64 is None:
        _foreach.scale_(stats.grad_groups, scale)
        return
    # CPU: reading the scale costs no sync, and skipping a multiply by exactly 1 saves a
    # pass: 3.35 ms a step on the GPT-like model in fp64, 0.60 ms on the 500-layer MLP,
    # 2.25x and 0.28x gg.clip_(model, NormClip(1.0)) (benchmarks/clip_paths.py;
    # _foreach.scale_ does the same for fp32: 1.09 ms and 0.47 ms).
    if scale.device.type == "cpu" and scale.item() == 1.0:
        return
    for group in stats.grad_groups:
        if group:
            dtype = torch.float64 if group[0].dtype == torch.float64 else torch.float32
            torch._foreach_mul_(group, scale.to(group[0].device, dtype, non_blocking=True))


class _GlobalNormPolicy:
    """Shared shape of the policies that scale every gradient by one factor."""

    def _threshold(self, total: Tensor) -> Tensor:
        """Observe ``total`` (when it is finite) and return this step's threshold.

        A 0-d tensor on ``total``'s device, of ``total``'s dtype or fp32.
        """
        raise NotImplementedError

    def _total(self, stats: GradStats) -> Tensor:
        return _norm(stats)

    def clip_(self, stats: GradStats) -> Tensor:
        """Scale every gradient by ``min(1, threshold / (norm + 1e-6))``; return that scale."""
        total = self._total(stats)
        # One path on every device: on the CPU, deciding in host floats would save 6-15 µs,
        # at most 1% of gg.clip_(model, NormClip or AutoClip) (benchmarks/clip_paths.py).
        scale = _scale_for(self._threshold(total), total)  # fp64 when the norm is (fp64 grads)
        _scale_grads_(stats, scale)
        return scale if scale.dtype == torch.float64 else scale.float()

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's state: empty for a stateless policy."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state; a stateless policy accepts only an empty mapping."""
        _check_keys(self, state_dict, set())


class NormClip(_GlobalNormPolicy):
    """Rescale all gradients together so their global norm is at most ``max_norm``.

    The classic remedy for exploding gradients (Pascanu, Mikolov & Bengio 2013, "On the
    difficulty of training recurrent neural networks"): ``g <- g * min(1, max_norm /
    (||g|| + 1e-6))``, the same rule and epsilon as ``torch.nn.utils.clip_grad_norm_``.
    Choose it when you know a sensible bound (e.g. 1.0 for transformers). Unlike torch's,
    the norm accumulates in fp32: fp16 gradients whose fp16 norm overflows (1,000
    elements of 1e4) are scaled correctly instead of being zeroed. fp64 gradients are
    measured and scaled in fp64, as torch does, so a norm beyond the fp32 range (above
    3.4e38) is clipped too.

    Args:
        max_norm: the largest global norm allowed.
        norm_type: the p of the p-norm (2 uses the fused statistics; others, including
            ``math.inf``, cost one more pass over the gradients).
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = _positive("max_norm", max_norm)
        self.norm_type = _positive("norm_type", norm_type, allow_inf=True)
        self._threshold_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    __repr__ = arguments_repr

    def _total(self, stats: GradStats) -> Tensor:
        if self.norm_type == 2.0:
            return _norm(stats)
        wide = stats.total_fp64 is not None
        dtype = torch.float64 if wide else torch.float32
        device = stats.total.device
        norms = [
            group_norms(group, self.norm_type, wide).to(device, dtype)
            for group in stats.grad_groups
            if group
        ]
        local = torch.cat(norms) if norms else torch.zeros(1, dtype=dtype, device=device)
        if math.isinf(self.norm_type):
            return stats.all_reduce_(local.max(), op="max")
        # sum |g|^p over local shards, across ranks, then the p-th root
        powered = local.double().pow(self.norm_type).sum()
        return stats.all_reduce_(powered).pow(1.0 / self.norm_type).to(dtype)

    def _threshold(self, total: Tensor) -> Tensor:
        # In the norm's dtype: fp64 gradients are clipped by max_norm itself, as in torch.
        key = (total.device, total.dtype)
        cached = self._threshold_cache.get(key)
        if cached is None:
            cached = torch.tensor(self.max_norm, dtype=total.dtype, device=total.device)
            self._threshold_cache[key] = cached
        return cached


class ValueClip:
    """Clamp every gradient element to ``[-clip_value, clip_value]``.

    Value clipping ("gradient value clipping"; ``clip_grad_value_`` in torch)
    bounds each coordinate and so changes the gradient's direction; prefer
    :class:`NormClip` unless single coordinates explode. Costs one more pass than the
    others: the clipped norm is measured after clamping to report the scale.

    Args:
        clip_value: the largest absolute value an element may keep.
    """

    def __init__(self, clip_value: float) -> None:
        self.clip_value = _positive("clip_value", clip_value)
        self._host_key: tuple[Tensor, ...] | None = None
        self._host_plan = HostValueClip(())

    __repr__ = arguments_repr

    def clip_(self, stats: GradStats) -> Tensor:
        """Clamp in place; return the clipped global norm over the original, in [0, 1]."""
        # On the CPU, unless the gradients are one flat buffer (one clamp kernel then).
        by_tensor = any(len(group) > 1 for group in stats.grad_groups)
        if by_tensor and stats.total.device.type == "cpu" and stats.sharding is None:
            before = stats.per_tensor if stats.per_tensor_fp64 is None else stats.per_tensor_fp64
            return self._clip_on_host(stats.params, stats.grads, before, _norm(stats))
        _foreach.clamp_(stats.grad_groups, -self.clip_value, self.clip_value)
        device = stats.total.device
        norms = [_foreach.stacked_norms(g).to(device) for g in stats.grad_groups if g]
        local = (
            torch.cat(norms).double().square().sum() if norms else torch.zeros((), device=device)
        )
        return _batched.ratio(stats.all_reduce_(local).sqrt().float(), _norm(stats))

    def _host(self, params: tuple[Tensor, ...]) -> HostValueClip:
        """How the gradients of ``params`` are read on the CPU, kept per parameter tuple."""
        if self._host_key is not params:
            self._host_plan = HostValueClip(params)
            self._host_key = params
        return self._host_plan

    def _on_cpu(self, params: tuple[Tensor, ...]) -> bool:
        return self._host(params).on_cpu

    def _clip_on_host(
        self,
        params: tuple[Tensor, ...],
        grads: Sequence[Tensor | None],
        before: Tensor | None,
        total: Tensor | None,
    ) -> Tensor:
        """The CPU path (:mod:`gradguard._value_clip`): nothing is written unless needed.

        Numbers: the ValueClip rows of docs/performance.md.
        """
        return self._host(params).clip_(grads, self.clip_value, before, total)

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's state: value clipping keeps none."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state; only an empty mapping fits."""
        _check_keys(self, state_dict, set())


class AutoClip(_GlobalNormPolicy):
    """Clip to the ``percentile``-th percentile of every global norm seen so far.

    Seetharaman, Wichern, Pardo, Le Roux 2020, "AutoClip: Adaptive gradient clipping for
    source separation networks": no threshold to tune, it follows the run's own scale.
    The history is kept in O(1) memory and O(1) time per step by a log-spaced histogram
    (``bins_per_octave`` bins per factor of 2 from 2^-128 to 2^128, linear
    interpolation in log space within a bin) instead of a growing list; its rank error
    is a fraction of one bin's mass. The current norm enters the history before the
    threshold is read, as in the paper's code. Choose it when you do not know a good
    fixed bound; 10 is the paper's default percentile.

    Args:
        percentile: in (0, 100].
        bins_per_octave: resolution of the sketch.
    """

    LOG2_LOW = -128.0
    LOG2_HIGH = 128.0

    def __init__(self, percentile: float = 10.0, bins_per_octave: int = 32) -> None:
        if not isinstance(percentile, int | float) or not 0 < percentile <= 100:
            raise ConfigError(f"percentile must lie in (0, 100], got {percentile!r}.")
        if not isinstance(bins_per_octave, int) or bins_per_octave < 1:
            raise ConfigError(f"bins_per_octave must be a positive int, got {bins_per_octave!r}.")
        self.percentile = float(percentile)
        self.bins_per_octave = bins_per_octave
        self.num_bins = int((self.LOG2_HIGH - self.LOG2_LOW) * bins_per_octave)
        self._state = _DeviceState(
            {
                "counts": ((self.num_bins,), torch.float64, 0.0),
                "count": ((), torch.float64, 0.0),
            }
        )

    __repr__ = arguments_repr

    def observe(self, total: Tensor) -> None:
        """Add one global norm to the history (ignored when not finite)."""
        state = self._state.get(total.device)
        finite = torch.isfinite(total)
        safe = torch.where(finite, total, torch.ones_like(total)).float()
        position = (torch.log2(safe.clamp(min=1e-38)) - self.LOG2_LOW) * self.bins_per_octave
        index = position.floor().clamp(0, self.num_bins - 1).long().reshape(1)
        state["counts"].index_add_(0, index, finite.double().reshape(1))
        state["count"].add_(finite.double())

    def threshold(self, device: torch.device) -> Tensor:
        """The current percentile of the history (``inf`` while it is empty)."""
        state = self._state.get(device)
        counts, count = state["counts"], state["count"]
        target = count * (self.percentile / 100.0)
        cumulative = counts.cumsum(0)
        k = torch.searchsorted(cumulative, target.reshape(1)).clamp(max=self.num_bins - 1)
        in_bin = counts[k]
        before = cumulative[k] - in_bin
        fraction = ((target - before) / in_bin.clamp(min=1.0)).clamp(0.0, 1.0)
        log2_value = self.LOG2_LOW + (k.double() + fraction) / self.bins_per_octave
        value = torch.exp2(log2_value).float().reshape(())
        return torch.where(count > 0, value, torch.full_like(value, math.inf))

    def _threshold(self, total: Tensor) -> Tensor:
        self.observe(total)
        return self.threshold(total.device)

    def state_dict(self) -> dict[str, Any]:
        """Return the histogram counts and the number of norms seen (constant size)."""
        return self._state.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a history saved by :meth:`state_dict` with the same ``bins_per_octave``."""
        self._state.load_state_dict(self, state_dict)


_TENSOR_OPS = SimpleNamespace(
    where=torch.where,
    sqrt=torch.sqrt,
    and_=operator.and_,
    not_=operator.invert,
    true=lambda like: torch.ones_like(like, dtype=torch.bool),
    inf=lambda like: torch.full_like(like, math.inf),
    cap=lambda value, high: value.clamp(max=high),
)
_FLOAT_OPS = SimpleNamespace(
    where=lambda condition, a, b: a if condition else b,
    sqrt=math.sqrt,
    and_=lambda a, b: a and b,
    not_=operator.not_,
    true=lambda like: True,
    inf=lambda like: math.inf,
    cap=min,
)


class ZClip(_GlobalNormPolicy):
    """Clip norms that are outliers against an EMA of mean and variance (z-score).

    Kumar, Owen, Ashraf et al. 2025, "ZClip: Adaptive spike mitigation for LLM
    pre-training". The first ``warmup_steps`` finite norms initialise the mean and
    (population) variance; after that, with ``z = (g - mean) / (std + 1e-6)``:

    * ``mode="zscore"``, ``clip_option="adaptive_scaling"`` (default): when
      ``z > z_thresh`` clip to ``clip_factor * (mean + z_thresh * std / (z / z_thresh))``,
      so larger outliers are clipped harder;
    * ``mode="zscore"``, ``clip_option="mean"``: clip outliers to the mean;
    * ``mode="percentile"``: clip whenever ``g > mean + z_thresh * std``.

    The EMA (``alpha``) is then updated with the clipped value (the raw norm when not
    clipped), unless ``skip_update_on_spike``. ``max_grad_norm``, if given, also caps the
    norm at every step, warm-up included. Defaults are the paper's. Choose it for long
    runs whose norm drifts, where spikes are rare events relative to the recent past.
    Unlike the ``zclip`` package, it never syncs with the host and a non-finite norm
    never enters the EMA.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: Literal["zscore", "percentile"] = "zscore",
        clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
        clip_factor: float = 1.0,
        max_grad_norm: float | None = None,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = _in_range("alpha", alpha, 0.0, 1.0)
        self.z_thresh = _positive("z_thresh", z_thresh)
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}.")
        self.warmup_steps = warmup_steps
        self.mode = _choice("mode", mode, ("zscore", "percentile"))
        self.clip_option = _choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = _positive("clip_factor", clip_factor)
        self.max_grad_norm = (
            None if max_grad_norm is None else _positive("max_grad_norm", max_grad_norm)
        )
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.eps = _positive("eps", eps)
        self._host_math_on_cpu = True  # False: the CPU takes the tensor path too (tests)
        self._host_values: dict[str, float] | None = None
        self._state = _DeviceState(
            dict.fromkeys(
                ("seen", "warmup_mean", "warmup_m2", "mean", "var"), ((), torch.float64, 0.0)
            )
        )

    __repr__ = arguments_repr

    def _outlier_threshold(self, g: Any, mean: Any, std: Any, ops: Any) -> tuple[Any, Any]:
        """Return (is_spike, threshold to clip a spike to)."""
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            return g > threshold, threshold
        z = (g - mean) / (std + self.eps)
        if self.clip_option == "mean":
            return z > self.z_thresh, mean
        spike = z > self.z_thresh
        eta = ops.where(spike, z / self.z_thresh, 1.0)  # >1 on a spike; 1 avoids dividing by 0
        return spike, (mean + self.z_thresh * std / eta) * self.clip_factor

    def _rule(
        self, g: Any, finite: Any, s: Mapping[str, Any], ops: Any
    ) -> tuple[dict[str, Any], Any]:
        """One step of ZClip, written once for tensors (on the device) and for floats (CPU).

        Returns the new state and the threshold (inf when the step is not clipped).
        """
        warming = s["seen"] < self.warmup_steps

        # Warm-up: Welford's running mean and M2 (the package keeps a list; same numbers).
        seen = s["seen"] + 1
        delta = g - s["warmup_mean"]
        warmup_mean = s["warmup_mean"] + delta / seen
        warmup_m2 = s["warmup_m2"] + delta * (g - warmup_mean)
        completes = seen >= self.warmup_steps

        # After warm-up: the z-score rule against the EMA.
        std = ops.sqrt(s["var"])
        spike, spike_threshold = self._outlier_threshold(g, s["mean"], std, ops)
        value = ops.where(spike, spike_threshold, g)
        ema_mean = self.alpha * s["mean"] + (1 - self.alpha) * value
        ema_var = self.alpha * s["var"] + (1 - self.alpha) * (value - ema_mean) ** 2
        update = ops.not_(spike) if self.skip_update_on_spike else ops.true(spike)

        warm_update = ops.and_(finite, warming)
        ema_update = ops.and_(ops.and_(finite, ops.not_(warming)), update)
        initialise = ops.and_(warm_update, completes)
        state = {
            "seen": ops.where(warm_update, seen, s["seen"]),
            "warmup_mean": ops.where(warm_update, warmup_mean, s["warmup_mean"]),
            "warmup_m2": ops.where(warm_update, warmup_m2, s["warmup_m2"]),
            "mean": ops.where(initialise, warmup_mean, ops.where(ema_update, ema_mean, s["mean"])),
            "var": ops.where(
                initialise, warmup_m2 / seen, ops.where(ema_update, ema_var, s["var"])
            ),
        }
        inf = ops.inf(g)
        threshold = ops.where(warming, inf, ops.where(spike, spike_threshold, inf))
        if self.max_grad_norm is not None:
            threshold = ops.cap(threshold, self.max_grad_norm)
        return state, threshold

    def clip_(self, stats: GradStats) -> Tensor:
        """Scale every gradient by ``min(1, threshold / (norm + 1e-6))``; return that scale."""
        total = _norm(stats)
        if total.device.type != "cpu" or not self._host_math_on_cpu:
            return super().clip_(stats)
        # CPU: a second path, on host floats (reading a CPU tensor costs no sync); the state
        # is mirrored in floats until someone asks for the tensors. The tensor path's ~55
        # 0-d kernels (+136 µs) make gg.clip_(model, ZClip()) 1.17x slower on the GPT-like
        # model (0.87x the zclip package's time: over the 0.80x goal) and 1.10x on the
        # 500-layer MLP; the float rule with the tensor decision is 1.04x
        # (benchmarks/clip_paths.py).
        if self._host_values is None:
            self._host_values = {k: v.item() for k, v in self._state.get(total.device).items()}
        g = total.item()
        finite = math.isfinite(g)
        self._host_values, threshold = self._rule(
            g if finite else 0.0, finite, self._host_values, _FLOAT_OPS
        )
        ratio = threshold / (g + NORM_EPS) if finite else 1.0
        scale = torch.tensor(min(1.0, ratio), dtype=total.dtype)  # fp64 for fp64 gradients
        if ratio < 1.0:
            _scale_grads_(stats, scale)
        return scale

    def _threshold(self, total: Tensor) -> Tensor:
        state = self._tensor_state(total.device)
        finite_t = torch.isfinite(total)
        g_t = torch.where(finite_t, total, torch.zeros_like(total))  # fp64 for fp64 grads
        new_t, threshold_t = self._rule(g_t, finite_t, state, _TENSOR_OPS)
        self._state.set(new_t)
        result: Tensor = threshold_t.to(total.dtype)
        return result

    def _tensor_state(self, device: torch.device) -> dict[str, Tensor]:
        """The state as tensors on ``device``, folding in the float mirror if it is newer."""
        state = self._state.get(device)
        if self._host_values is not None:
            for key, value in self._host_values.items():
                state[key].fill_(value)
            self._host_values = None
        return state

    @property
    def mean(self) -> Tensor:
        """EMA of the gradient norm (0 until warm-up completes)."""
        return self._public_state()["mean"]

    @property
    def var(self) -> Tensor:
        """EMA of the gradient norm's variance (0 until warm-up completes)."""
        return self._public_state()["var"]

    def _public_state(self) -> dict[str, Tensor]:
        if self._host_values is not None:
            self._tensor_state(torch.device("cpu"))
        return self._state.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Return warm-up progress and the EMA mean and variance (fp64: exact round trip)."""
        return dict(self._public_state())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        self._state.load_state_dict(self, state_dict)
        self._host_values = None


from gradguard._agc import AGC as AGC  # noqa: E402 - re-exported: AGC is a clip policy
from gradguard._agc import unitwise_norm as unitwise_norm  # noqa: E402

_CHECKED_POLICY_TYPES: set[type] = set()


def clip_(
    model: nn.Module | NamedParameters, policy: ClipPolicy, stats: GradStats | None = None
) -> Tensor:
    """Measure the gradients (unless ``stats`` is given) and apply ``policy`` in place.

    Given ``stats``, checks on the host that they describe ``model``'s gradients as they
    are now (:meth:`GradStats.check_source`): statistics of another model, or measured
    before a ``zero_grad()`` and ``backward()`` or any in-place write to a gradient, are
    refused, since clipping by them would scale by the wrong norm.

    Returns:
        The scale, a 0-d tensor in [0, 1] on the model's device.

    Raises:
        ConfigError: ``policy`` is not a clipping policy, or ``stats`` are stale or of
            another model.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> model.weight.grad = torch.tensor([[3.0, 4.0]])
        >>> scale = clip_(model, NormClip(1.0))
        >>> model.weight.grad
        tensor([[0.6000, 0.8000]])
    """
    if type(policy) not in _CHECKED_POLICY_TYPES:
        if not isinstance(policy, ClipPolicy):  # a Protocol check: slow, so once per type
            raise ConfigError(
                "policy must be a clipping policy such as NormClip(1.0), got "
                f"{type(policy).__name__}."
            )
        _CHECKED_POLICY_TYPES.add(type(policy))
    if stats is None:
        if isinstance(policy, AGC | ValueClip):  # they measure what they need themselves
            layout = layout_for(model)
            if layout.sharding is None and not layout.wide:
                params, grads = layout.params, list(map(_get_grad, layout.params))
                if isinstance(policy, AGC):
                    return policy._clip_direct(params, grads, layout.names, layout.device)
                if policy._on_cpu(params) and _flat.find(params[0]) is None:
                    return policy._clip_on_host(params, grads, None, None)
        return policy.clip_(grad_stats(model, fingerprint=False))
    stats.check_source(model)
    return policy.clip_(stats)
