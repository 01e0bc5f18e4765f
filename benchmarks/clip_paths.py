"""Does a clipping policy's CPU shortcut pay for itself? Host floats against the tensor path.

On the CPU, reading a tensor costs no device sync, so a policy could decide its scale on
the host, in Python floats, instead of with the 0-d tensor kernels it must use on an
accelerator. gradguard's rule is one path per policy unless a number justifies a second;
this script gives the number. For NormClip, AutoClip and ZClip it times, on real
gradients of the two models of ``overhead_bench`` (the 9M-parameter GPT-like model and
the 500-layer MLP of small tensors):

* **host floats**: the global norm read with ``.item()``, the threshold and the scale
  computed in Python floats (ZClip's whole rule and state on floats), the multiply
  skipped when the scale is 1;
* **tensor path**: the threshold and the scale as 0-d tensors (what runs on an
  accelerator), the scale handed to ``_scale_grads_``;
* **as shipped**: the library's policy as it is, which should match one of the two;

each as the policy alone on precomputed statistics (``policy.clip_(stats)``) and as the
call a user makes (``gg.clip_(model, policy)``, the statistics measured too). A last pair
of rows times ``_scale_grads_``'s shortcut: a scale of exactly 1 read on the host and the
pass skipped, against multiplying every gradient by it, for fp32 and fp64 gradients. A
second table puts ``gg.clip_(model, ZClip())`` next to the ``zclip`` package (the goal of
``overhead.py``: at most 0.80× its time), with one more variant: ZClip's rule on floats
but the shared tensor decision.

The gradients have global norm 0.5, under every threshold, so every scale is 1 (the
common step, and the one where the decision is the largest share of the cost: a clipped
step adds the same multiply to both paths). AutoClip's sketch is restored before every
block to a history of heavy-tailed norms whose 10th percentile is above 0.5. The
contenders run in interleaved rounds in a shuffled order (``overhead_bench``'s timer),
one torch thread; medians are reported (``--stat min`` on a machine shared with other
jobs). "Δ µs" is the tensor path's extra time, measured on the policy alone (a few µs,
little noise), and "Δ share" that time over ``gg.clip_(model, policy)`` on the host path.
Takes about 30 seconds on a quiet 2-core CPU.

Usage, from a checkout:
``python benchmarks/clip_paths.py [--rounds N] [--quick] [--stat median|min]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
import overhead_bench as bench
from gradguard.clip import NORM_EPS, AutoClip, NormClip, ZClip, _scale_for, _scale_grads_
from gradguard.stats import GradStats, grad_stats

ROUNDS = 40
HISTORY = 10_000
PATHS = ("host floats", "tensor path", "as shipped")
SHORTCUT = ("skip (host read)", "always multiply")

# --------------------------------------------------------------------------- the two paths


class _HostPath:
    """Decide on the host, in floats: the CPU branch ``_GlobalNormPolicy.clip_`` once had.

    Mixed in before a policy class, whose ``_total`` it uses.
    """

    _total: Callable[[GradStats], Tensor]

    def _host_threshold(self, total: Tensor) -> float:
        raise NotImplementedError

    def clip_(self, stats: GradStats) -> Tensor:
        total = self._total(stats)
        threshold = self._host_threshold(total)
        norm = total.item()
        ratio = threshold / (norm + NORM_EPS) if math.isfinite(norm) else 1.0
        wide = total.dtype == torch.float64
        scale = torch.tensor(min(1.0, ratio), dtype=torch.float64 if wide else torch.float32)
        if ratio < 1.0:
            _scale_grads_(stats, scale)
        return scale


class _TensorPath:
    """Decide with 0-d tensors, the path an accelerator takes (mixed in like ``_HostPath``)."""

    _total: Callable[[GradStats], Tensor]

    def _device_threshold(self, total: Tensor) -> Tensor:
        raise NotImplementedError

    def clip_(self, stats: GradStats) -> Tensor:
        total = self._total(stats)
        scale = _scale_for(self._device_threshold(total), total)
        _scale_grads_(stats, scale)
        return scale if scale.dtype == torch.float64 else scale.float()


class HostNormClip(_HostPath, NormClip):
    """NormClip deciding in floats: the threshold is ``max_norm`` itself."""

    def _host_threshold(self, total: Tensor) -> float:
        return self.max_norm


class TensorNormClip(_TensorPath, NormClip):
    """NormClip deciding with tensors: ``max_norm`` uploaded once per device."""

    def _device_threshold(self, total: Tensor) -> Tensor:
        cached = getattr(self, "_max_norm_tensor", None)
        if cached is None:
            cached = self._max_norm_tensor = torch.tensor(self.max_norm, device=total.device)
        return cached


class HostAutoClip(_HostPath, AutoClip):
    """AutoClip whose sketch threshold is read on the host."""

    def _host_threshold(self, total: Tensor) -> float:
        self.observe(total)
        return float(self.threshold(total.device))


class TensorAutoClip(_TensorPath, AutoClip):
    """AutoClip whose sketch threshold stays a tensor."""

    def _device_threshold(self, total: Tensor) -> Tensor:
        self.observe(total)
        return self.threshold(total.device)


def _zclip_float_rule(
    p: ZClip, g: float, finite: bool, s: Mapping[str, float]
) -> tuple[dict[str, float], float]:
    """ZClip's rule on Python floats: the float mirror the library kept on the CPU."""
    warming = s["seen"] < p.warmup_steps
    seen = s["seen"] + 1
    delta = g - s["warmup_mean"]
    warmup_mean = s["warmup_mean"] + delta / seen
    warmup_m2 = s["warmup_m2"] + delta * (g - warmup_mean)
    mean, std = s["mean"], math.sqrt(s["var"])
    if p.mode == "percentile":
        spike_threshold = mean + p.z_thresh * std
        spike = g > spike_threshold
    else:
        z = (g - mean) / (std + p.eps)
        spike = z > p.z_thresh
        eta = z / p.z_thresh if spike else 1.0
        spike_threshold = (
            mean if p.clip_option == "mean" else (mean + p.z_thresh * std / eta) * p.clip_factor
        )
    value = spike_threshold if spike else g
    ema_mean = p.alpha * mean + (1 - p.alpha) * value
    ema_var = p.alpha * s["var"] + (1 - p.alpha) * (value - ema_mean) ** 2
    warm_update = finite and warming
    ema_update = finite and not warming and not (spike and p.skip_update_on_spike)
    state = dict(s)
    if warm_update:
        state.update(seen=seen, warmup_mean=warmup_mean, warmup_m2=warmup_m2)
        if seen >= p.warmup_steps:
            state.update(mean=warmup_mean, var=warmup_m2 / seen)
    elif ema_update:
        state.update(mean=ema_mean, var=ema_var)
    threshold = spike_threshold if spike and not warming else math.inf
    if p.max_grad_norm is not None:
        threshold = min(threshold, p.max_grad_norm)
    return state, threshold


class HostZClip(_HostPath, ZClip):
    """ZClip with its rule and state on Python floats."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._floats = dict.fromkeys(("seen", "warmup_mean", "warmup_m2", "mean", "var"), 0.0)

    def _host_threshold(self, total: Tensor) -> float:
        g = total.item()
        finite = math.isfinite(g)
        self._floats, threshold = _zclip_float_rule(
            self, g if finite else 0.0, finite, self._floats
        )
        return threshold


class TensorZClip(_TensorPath, ZClip):
    """ZClip with its rule and state on 0-d tensors."""

    def _device_threshold(self, total: Tensor) -> Tensor:
        return ZClip._threshold(self, total)


class HostRuleZClip(_TensorPath, HostZClip):
    """ZClip's rule on floats, its scale decided with tensors (the shared decision)."""

    def _device_threshold(self, total: Tensor) -> Tensor:
        return torch.full_like(total, self._host_threshold(total))


MIXED = "host rule, tensor decision"
VARIANTS: dict[str, tuple[type, type, type]] = {
    "NormClip(1.0)": (HostNormClip, TensorNormClip, NormClip),
    "AutoClip()": (HostAutoClip, TensorAutoClip, AutoClip),
    "ZClip()": (HostZClip, TensorZClip, ZClip),
}


def _make(cls: type, name: str) -> Any:
    return cls(1.0) if name.startswith("NormClip") else cls()


# --------------------------------------------------------------------------- contenders


def _policy(cls: type, name: str, model: nn.Module, history: Mapping[str, Any]) -> Any:
    """A policy ready to time: AutoClip with a filled sketch, ZClip past its warm-up."""
    policy = _make(cls, name)
    if isinstance(policy, AutoClip):
        policy.load_state_dict(history)
    if isinstance(policy, ZClip):
        for _ in range(policy.warmup_steps + 5):
            gg.clip_(model, policy)
    return policy


def _contenders(
    model: nn.Module, stats: GradStats, history: Mapping[str, Any], stats64: GradStats
) -> list[bench._Contender]:
    out = []
    for name in VARIANTS:
        for path, cls in zip(PATHS, VARIANTS[name], strict=True):
            alone, whole = _policy(cls, name, model, history), _policy(cls, name, model, history)
            reset_alone = reset_whole = bench._noop
            if isinstance(alone, AutoClip):
                reset_alone = _restorer(alone, history)
                reset_whole = _restorer(whole, history)
            out.append(
                bench._Contender(f"{name}|alone|{path}", _bound(alone.clip_, stats), reset_alone)
            )
            out.append(
                bench._Contender(f"{name}|clip_|{path}", _bound_clip(model, whole), reset_whole)
            )
    mixed = _policy(HostRuleZClip, "ZClip()", model, history)
    out.append(bench._Contender(f"ZClip()|clip_|{MIXED}", _bound_clip(model, mixed)))
    out.append(bench._zclip_package(model))
    for label, s in (("fp32", stats), ("fp64", stats64)):
        one = torch.ones((), dtype=torch.float64 if s.total_fp64 is not None else torch.float32)
        out.append(bench._Contender(f"scale 1 {label}|{SHORTCUT[0]}", _scale_by(s, one)))
        out.append(bench._Contender(f"scale 1 {label}|{SHORTCUT[1]}", _multiplier(s, one)))
    return out


def _restorer(policy: AutoClip, state: Mapping[str, Any]) -> Callable[[], None]:
    return lambda: policy.load_state_dict(state)


def _bound(fn: Callable[[GradStats], Tensor], stats: GradStats) -> Callable[[], Tensor]:
    return lambda: fn(stats)


def _bound_clip(model: nn.Module, policy: Any) -> Callable[[], Tensor]:
    return lambda: gg.clip_(model, policy)


def _scale_by(stats: GradStats, one: Tensor) -> Callable[[], None]:
    return lambda: _scale_grads_(stats, one)


def _multiplier(stats: GradStats, one: Tensor) -> Callable[[], None]:
    def multiply() -> None:
        for group in stats.grad_groups:
            if group:
                torch._foreach_mul_(group, one)

    return multiply


# --------------------------------------------------------------------------- one model


def _bench_model(
    case: bench._Case,
    settings: bench.Settings,
    rng: random.Random,
    history: Mapping[str, Any],
    stat: Callable[[Sequence[float]], float],
) -> tuple[str, list[list[str]], list[list[str]]]:
    model = case.model
    torch.autograd.backward(case.loss(model))
    params = [p for p in model.parameters() if p.requires_grad]
    flat = bench._prepare_grads(model, params)
    pristine = flat.clone()
    model64 = copy.deepcopy(model).double()
    for p64, p in zip(model64.parameters(), params, strict=True):
        p64.grad = p.grad.double()  # type: ignore[union-attr]
    stats = grad_stats(model, fingerprint=False)
    stats64 = grad_stats(model64, fingerprint=False)
    contenders = _contenders(model, stats, history, stats64)
    timings = bench._time_rounds(
        contenders, settings, rng, before_round=lambda: flat.copy_(pristine)
    )
    bench._check_normal([flat], "after timing")
    median = {name: stat(values) for name, (values, _) in timings.items()}
    rows = []
    for name in VARIANTS:
        # The difference is measured on the policy alone (a few µs, little noise) and
        # compared with the whole call on the host path (milliseconds, noisier).
        extra = median[f"{name}|alone|{PATHS[1]}"] - median[f"{name}|alone|{PATHS[0]}"]
        share = extra / median[f"{name}|clip_|{PATHS[0]}"]
        for what, label in (
            ("alone", f"{name}.clip_(stats)"),
            ("clip_", f"gg.clip_(model, {name})"),
        ):
            host, tensor, shipped = (median[f"{name}|{what}|{path}"] for path in PATHS)
            rows.append(_cells(label, host, tensor, shipped, extra, share))
    whole_norm = median[f"NormClip(1.0)|clip_|{PATHS[0]}"]
    for label in ("fp32", "fp64"):
        skip, multiply = (median[f"scale 1 {label}|{way}"] for way in SHORTCUT)
        share = (multiply - skip) / whole_norm
        rows.append(
            _cells(
                f"_scale_grads_ by 1, {label} grads", skip, multiply, None, multiply - skip, share
            )
        )
    goal = [
        [variant, f"{median[key]:,.1f}", _ratio(median[key], median.get(bench.ZCLIP_PACKAGE))]
        for variant, key in (
            *((path, f"ZClip()|clip_|{path}") for path in PATHS),
            (MIXED, f"ZClip()|clip_|{MIXED}"),
            (bench.ZCLIP_PACKAGE, bench.ZCLIP_PACKAGE),
        )
        if key in median
    ]
    return case.title, rows, goal


def _ratio(ours: float, theirs: float | None) -> str:
    return "" if theirs is None else f"{ours / theirs:.3f}×"


def _cells(
    label: str, host: float, tensor: float, shipped: float | None, extra: float, share: float
) -> list[str]:
    return [
        label,
        f"{host:,.1f}",
        f"{tensor:,.1f}",
        "" if shipped is None else f"{shipped:,.1f}",
        f"{tensor / host:.2f}×",
        f"{extra:+,.1f}",
        f"{100 * share:+.1f} %",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Host floats vs the tensor path, per policy.")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS}")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="per-contender statistic over the rounds (min: a machine shared with other jobs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    settings = bench.Settings(
        rounds=args.rounds,
        quick=args.quick,
        threads=1,
        seed=0,
        target_block_us=200.0 if args.quick else 5000.0,
        history=2_000 if args.quick else HISTORY,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    history = bench._filled_autoclip(bench._heavy_tailed_norms(settings.history, gen))
    state = history.state_dict()
    print(bench._machine(1).describe())
    stat = statistics.median if args.stat == "median" else min
    print(f"{settings.rounds} interleaved rounds; {args.stat} µs per call")
    header = [
        "contender",
        "host floats",
        "tensor path",
        "as shipped",
        "tensor / host",
        "Δ µs",
        "Δ share",
    ]
    for make in (bench._gpt_case, bench._mlp_case):
        title, rows, goal = _bench_model(make(settings.quick, gen), settings, rng, state, stat)
        print(f"\n{title}\n")
        print(bench._markdown_table(header, rows))
        print("\ngg.clip_(model, ZClip()) against the zclip package (overhead goal: ≤ 0.80×)\n")
        print(bench._markdown_table(["ZClip", "µs", "× zclip package"], goal))
    print(
        "\nΔ µs: the tensor path's extra time per step, measured on the policy alone; Δ share: "
        "that over gg.clip_(model, policy) on the host path. For the _scale_grads_ rows, "
        "'host floats' is the shortcut (scale read on the host, pass skipped), 'tensor path' "
        "multiplies every gradient by 1, and the share is of gg.clip_(model, NormClip(1.0))."
    )


if __name__ == "__main__":
    main()
