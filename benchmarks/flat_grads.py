"""What the opt-in flat gradient buffer (``gradguard.flatten_grads_``) saves, as ratios.

For both models of ``overhead_bench`` (the GPT-like transformer, a few large tensors, and
the 500-layer MLP, 1,000 small tensors) one process times, side by side in interleaved
rounds on 1 thread: the floor (one ``sum()`` over the gradient bytes), ``grad_stats`` with
per-layer norms on ordinary gradients and on flat-buffer views, ``gradguard.clip_`` with
``NormClip`` both ways, and torch's ``clip_grad_norm_(foreach=True)``. The two copies of
the model hold bitwise the same gradients; the script checks that both paths measure the
same norms before timing. Goals (the project's): with the buffer, ``grad_stats`` with
per-layer norms within 5x the floor on the MLP and 1.3x on the GPT-like model. It also
times what any exact flat path must do, one ``linalg.vector_norm`` over the bytes (the
kernel behind torch's per-tensor norms, which keeps the results bitwise) and reading each
``p.grad`` and ``p.requires_grad`` (which proves the views are still the gradients), and
prints their sum over the floor: a lower bound that says whether the goal is reachable.

Run: ``.venv/bin/python benchmarks/flat_grads.py [--rounds N] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradguard as gg  # noqa: E402
import overhead_bench as ob  # noqa: E402 - benchmarks/ is put on the path just above

FLOOR = "floor: flat.sum()"
NORM = "  (one linalg.vector_norm over the same bytes)"
READ_GRADS = "  (read every p.grad and p.requires_grad)"
STATS = "grad_stats + per_layer, per-tensor path"
STATS_FLAT = "grad_stats + per_layer, flat buffer"
STATS_FLAT_NOFP = "  flat, fingerprint=False"
CLIP = "gg.clip_(model, NormClip(0.999 * norm)), per-tensor"
CLIP_FLAT = "gg.clip_(model, NormClip(0.999 * norm)), flat buffer"
CLIP_ONE = "gg.clip_(model, NormClip(1.0)) (scale 1), per-tensor"
CLIP_ONE_FLAT = "gg.clip_(model, NormClip(1.0)) (scale 1), flat buffer"
TORCH = "torch clip_grad_norm_(params, 1.0, foreach=True)"
GOALS = {"mlp": 5.0, "gpt": 1.3}


def _all_stats(model: nn.Module, fingerprint: bool = True) -> gg.GradStats:
    stats = gg.grad_stats(model, fingerprint=fingerprint)
    stats.per_layer  # noqa: B018 - computing it is the point
    return stats


def _check_same(plain: nn.Module, flat_model: nn.Module, flat: gg.FlatGrads) -> None:
    a, b = _all_stats(plain), _all_stats(flat_model)
    if not (flat.attached() and b.grad_groups == ([flat.buffers[0]],)):
        raise RuntimeError("the flat model's statistics did not take the flat path")
    for field in ("per_tensor", "total"):
        if not torch.equal(getattr(a, field), getattr(b, field)):
            raise RuntimeError(f"flat and per-tensor {field} differ")
    if not torch.allclose(a.per_layer, b.per_layer, rtol=1e-6, atol=0.0):
        raise RuntimeError("flat and per-tensor per-layer norms differ")


def _bench(case: ob._Case, settings: ob.Settings, rng: random.Random) -> list[str]:
    model = case.model
    torch.autograd.backward(case.loss(model))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = ob._prepare_grads(model, params)  # views of a buffer grad_stats does not know
    flat_model = copy.deepcopy(model)  # parameters only: deepcopy leaves .grad behind
    for source, param in zip(params, flat_model.parameters(), strict=True):
        param.grad = None if source.grad is None else source.grad.clone()
    flat = gg.flatten_grads_(flat_model)  # copies the gradients into its own buffer
    _check_same(model, flat_model, flat)
    pristine = plain.clone()
    buffer = flat.buffers[0]
    clip_tight = gg.NormClip(0.999 * ob.GRAD_NORM)  # scales every call, drifting 1e-6 per call
    clip_one = gg.NormClip(1.0)

    def restore() -> None:
        plain.copy_(pristine)
        buffer.copy_(pristine)

    def clip_with(target: nn.Module, policy: gg.NormClip) -> Callable[[], Tensor]:
        return lambda: gg.clip_(target, policy)

    contenders = [
        ob._Contender(FLOOR, plain.sum),
        ob._Contender(NORM, lambda: torch.linalg.vector_norm(plain)),
        ob._Contender(READ_GRADS, ob._reads_of(params)),
        ob._Contender(STATS, lambda: _all_stats(model)),
        ob._Contender(STATS_FLAT, lambda: _all_stats(flat_model)),
        ob._Contender(STATS_FLAT_NOFP, lambda: _all_stats(flat_model, fingerprint=False)),
        ob._Contender(CLIP, clip_with(model, clip_tight)),
        ob._Contender(CLIP_FLAT, clip_with(flat_model, clip_tight)),
        ob._Contender(CLIP_ONE, clip_with(model, clip_one)),
        ob._Contender(CLIP_ONE_FLAT, clip_with(flat_model, clip_one)),
        ob._Contender(TORCH, lambda: nn.utils.clip_grad_norm_(params, 1.0, foreach=True)),
    ]
    timings = ob._time_rounds(contenders, settings, rng, before_round=restore)
    if not flat.attached():
        raise RuntimeError("the flat model's views were dropped while timing")
    median = {name: statistics.median(values) for name, (values, _) in timings.items()}
    floor = median[FLOOR]
    lines = [
        f"{case.title} ({len(flat._groups[0].runs)} strided reductions for the flat path)",
        f"{'':56} {'median µs':>10} {'min-max µs':>17} {'x floor':>8} {'x torch':>8}",
    ]
    for contender in contenders:
        values, _ = timings[contender.name]
        m = median[contender.name]
        lines.append(
            f"{contender.name:56} {m:10.1f} {min(values):8.1f}-{max(values):<8.1f} "
            f"{m / floor:8.2f} {m / median[TORCH]:8.2f}"
        )
    goal = GOALS[case.key]
    reached = median[STATS_FLAT] / floor
    bound = (median[NORM] + median[READ_GRADS]) / floor
    lines.append(
        f"goal: flat grad_stats + per_layer <= {goal}x floor: {reached:.2f}x "
        f"({'met' if reached <= goal else 'missed'}); per-tensor path "
        f"{median[STATS] / floor:.2f}x; flat speed-up {median[STATS] / median[STATS_FLAT]:.1f}x"
    )
    lines.append(
        f"lower bound of an exact flat path (one vector_norm + the reads that prove the views "
        f"in place): {bound:.2f}x floor ({'below' if bound <= goal else 'above'} the goal)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = ob.Settings(
        rounds=args.rounds,
        quick=args.quick,
        threads=1,
        seed=args.seed,
        target_block_us=20_000.0 if not args.quick else 2_000.0,
        history=0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds")
    for case in (ob._gpt_case(args.quick, gen), ob._mlp_case(args.quick, gen)):
        print()
        print("\n".join(_bench(case, settings, rng)))


if __name__ == "__main__":
    main()
