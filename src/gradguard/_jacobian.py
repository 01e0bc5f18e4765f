"""Randomized singular values of a network's per-example input-output Jacobian.

The Jacobian of example ``i`` is ``J_i = d y_i / d x_i``: the output row of that example
with respect to its own input row, every other example of the batch held fixed. For a
network that treats examples independently this is the Jacobian of the network applied to
one example; under BatchNorm in training mode it is the diagonal block of the batch
Jacobian (the other examples still set the normalization statistics).

``J_i`` is never materialised unless it is small. Its largest singular values come from
block power (subspace) iteration on ``J_iᵀ J_i`` and its mean squared singular value
``‖J_i‖_F² / min(m, n)`` from a Hutchinson trace estimate in which the top singular
subspace found by the power iteration is counted exactly and only the rest is sampled
(the idea of Hutch++, Meyer et al. 2021), with orthonormal probes. ``Jᵀ u`` is a call of
the function ``torch.func.vjp`` returns (one forward pass, reused); ``J v`` is the vjp of
that function, which is linear in ``u`` (reverse over reverse: exact, and several times
faster on CPU than ``torch.func.jvp``, which re-runs the forward pass). An adjoint check,
``<u, J v> = <Jᵀ u, v>``, guards it; an operator without a double backward, or one that
fails the check, switches ``J v`` to ``torch.func.jvp`` (forward mode).

Batching. A cross-sample check (one jvp with a tangent in example 0 only) tells whether
examples interact. When they do not, the chosen examples are replicated ``r`` times in a
small batch and ``r`` directions per example go through one call. When they do (BatchNorm
in training mode), the full batch is kept and the directions are vmapped, each direction
non-zero in one example only, so that ``J_i`` is exactly the diagonal block.

References:
    Halko, Martinsson, Tropp (2011), "Finding structure with randomness", SIAM Review.
    Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix".
    Meyer, Musco, Musco, Woodruff (2021), "Hutch++: optimal stochastic trace estimation".
    Pennington, Schoenholz, Ganguli (2017), "Resurrecting the sigmoid in deep learning
    through dynamical isometry", arXiv 1711.04735.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from gradguard.errors import ConfigError

TensorFn = Callable[..., Tensor]

PROBE_CHUNK = 8
"""Directions vmapped together in the per-sample mode: bounds the memory of one call."""

ADJOINT_TOLERANCE = 1e-3
"""Largest relative gap between ``<u, J v>`` and ``<Jᵀ u, v>`` accepted (fp32 round-off
is about 1e-6); beyond it ``J v`` is recomputed in forward mode."""


@dataclass(frozen=True)
class Spectrum:
    """Singular values of the per-example Jacobian, averaged over the examples probed.

    Attributes:
        top: the largest singular values, descending, each the mean over the examples.
        mean_sq: the mean squared singular value ``‖J_i‖_F² / min(m, n)``, mean over
            the examples; 1 for an isometry.
        sample_top: the largest singular value of each example.
        sample_mean_sq: the mean squared singular value of each example.
        in_features: ``n``, the size of one example's (floating-point) input.
        out_features: ``m``, the size of one example's output.
        samples: examples probed.
        products: Jacobian-vector products spent (``J v`` and ``Jᵀ u`` both count).
        exact: the Jacobian was small enough to be formed exactly from basis vectors.
        mode: ``"replicated"`` (independent examples), ``"per-sample"`` (examples
            interact) or ``"whole"`` (the output has no batch dimension: one example,
            the whole batch).
        matvec: how ``J v`` was computed: ``"vjp-of-vjp"`` (reverse over reverse, the
            default) or ``"jvp"`` (forward mode, the fallback).
    """

    top: tuple[float, ...]
    mean_sq: float
    sample_top: tuple[float, ...]
    sample_mean_sq: tuple[float, ...]
    in_features: int
    out_features: int
    samples: int
    products: int
    exact: bool
    mode: str
    matvec: str


@dataclass
class _Choice:
    """How ``J v`` is computed, shared by every linearization of one estimate.

    The default, the vjp of the vjp (reverse over reverse), reuses one forward pass and
    runs in C++; ``torch.func.jvp`` (forward mode) re-runs the forward pass through
    Python decompositions and is 3-7 times slower on an MLP. Forward mode is the fallback
    for an operator without a double backward, or whose double backward disagrees with
    its backward (the adjoint check in :func:`_operator`).
    """

    forward: bool = False

    @property
    def name(self) -> str:
        return "jvp" if self.forward else "vjp-of-vjp"


class _Linearization:
    """``J`` and ``Jᵀ`` of ``fn`` at fixed primals, for one tangent or a vmapped stack."""

    def __init__(
        self, fn: TensorFn, primals: tuple[Tensor, ...], seed: int, choice: _Choice
    ) -> None:
        self.fn = fn
        self.primals = primals
        self.seed = seed
        self.choice = choice
        self._vjp_fn: tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]] | None = None
        self._jvp_via_vjp: Callable[[tuple[Tensor, ...]], tuple[Tensor]] | None = None

    def _vjp(self) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
        """The output and its vjp function: one forward pass, reused for every product."""
        if self._vjp_fn is None:
            torch.manual_seed(self.seed)  # the same dropout masks in every evaluation
            result = torch.func.vjp(self.fn, *self.primals)
            self._vjp_fn = (result[0], result[1])
        return self._vjp_fn

    def _reverse_jvp(self) -> Callable[[tuple[Tensor, ...]], tuple[Tensor]]:
        """``v -> J v`` as the vjp of ``u -> Jᵀ u``, which is linear in ``u``: exact."""
        if self._jvp_via_vjp is None:
            out, pull = self._vjp()
            self._jvp_via_vjp = torch.func.vjp(pull, torch.zeros_like(out))[1]
        return self._jvp_via_vjp

    def jvp(self, tangents: tuple[Tensor, ...], *, vmapped: bool) -> Tensor:
        """``J v`` for one tangent, or for a leading stack of tangents when ``vmapped``."""
        if not self.choice.forward:
            try:
                reverse = self._reverse_jvp()
                if vmapped:
                    return torch.func.vmap(lambda *t: reverse(t)[0])(*tangents)
                return reverse(tangents)[0]
            except (RuntimeError, NotImplementedError):  # no double backward: forward mode
                self.choice.forward = True
        return self._forward_mode(tangents, vmapped=vmapped)

    def _forward_mode(self, tangents: tuple[Tensor, ...], *, vmapped: bool) -> Tensor:
        def push(*t: Tensor) -> Tensor:
            return cast(Tensor, torch.func.jvp(self.fn, self.primals, t)[1])

        torch.manual_seed(self.seed)
        if vmapped:
            return torch.func.vmap(push, randomness="same")(*tangents)
        return push(*tangents)

    def vjp(self, cotangent: Tensor, *, vmapped: bool) -> tuple[Tensor, ...]:
        """``Jᵀ u`` for one cotangent, or for a leading stack when ``vmapped``."""
        _, pull = self._vjp()
        if vmapped:
            return tuple(torch.func.vmap(pull)(cotangent))
        return tuple(pull(cotangent))


@dataclass(frozen=True)
class _Problem:
    """The function in a layout with the batch first, and the sizes of one example."""

    fn: TensorFn
    inputs: tuple[Tensor, ...]  # batch first
    out_shape: tuple[int, ...]  # batch first
    whole: bool  # the output has no batch dimension: the whole batch is one example
    seed: int

    @property
    def batch(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def in_sizes(self) -> list[int]:
        return [math.prod(x.shape[1:]) for x in self.inputs]

    @property
    def n(self) -> int:
        return sum(self.in_sizes)

    @property
    def m(self) -> int:
        return math.prod(self.out_shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.inputs[0].dtype

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device

    @property
    def work_dtype(self) -> torch.dtype:
        """fp64 for the directions and their QR, except on MPS, which has no fp64."""
        return torch.float32 if self.device.type == "mps" else torch.float64

    def randn(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Gaussian directions drawn on the CPU (reproducible anywhere), then moved."""
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return z.to(self.device, self.work_dtype)

    def eye(self, size: int, copies: int) -> Tensor:
        return torch.eye(size, dtype=self.work_dtype, device=self.device).expand(copies, -1, -1)


def _build_problem(fn: TensorFn, inputs: Sequence[Tensor], batch_dim: int, seed: int) -> _Problem:
    xs = tuple(x.detach() for x in inputs)
    if not xs or any(not x.is_floating_point() for x in xs):
        raise ConfigError("the Jacobian needs at least one floating-point input tensor")
    torch.manual_seed(seed)
    with torch.no_grad():
        y = fn(*xs)
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ConfigError("the Jacobian needs a floating-point output tensor")
    sizes = {x.shape[batch_dim] if x.dim() > batch_dim else -1 for x in xs}
    if len(sizes) == 1 and y.dim() > batch_dim and y.shape[batch_dim] in sizes:

        def moved(*xm: Tensor) -> Tensor:
            return fn(*(x.movedim(0, batch_dim) for x in xm)).movedim(batch_dim, 0)

        inputs_moved = tuple(x.movedim(batch_dim, 0) for x in xs)
        return _Problem(moved, inputs_moved, tuple(y.movedim(batch_dim, 0).shape), False, seed)

    def whole(*xm: Tensor) -> Tensor:
        return fn(*(x.squeeze(0) for x in xm)).reshape(1, -1)

    return _Problem(whole, tuple(x.unsqueeze(0) for x in xs), (1, y.numel()), True, seed)


class _Operator:
    """``J_i`` of several examples at once: directions shaped (s, r, n) -> (s, r, m)."""

    mode = ""
    products = 0
    choice: _Choice

    def matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def rmatvec(self, u: Tensor) -> Tensor:
        raise NotImplementedError


def _split_inputs(problem: _Problem, v: Tensor, lead: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Cut the last dimension of ``v`` into one tangent per input, shaped ``lead + row``."""
    parts = torch.split(v, problem.in_sizes, dim=-1)
    return tuple(
        p.reshape(*lead, *x.shape[1:]).to(problem.dtype)
        for p, x in zip(parts, problem.inputs, strict=True)
    )


class _Replicated(_Operator):
    """Independent examples: each example repeated ``r`` times in a small batch."""

    mode = "replicated"

    def __init__(self, problem: _Problem, index: Tensor) -> None:
        self.problem = problem
        self.index = index
        self.choice = _Choice()
        self._by_r: dict[int, _Linearization] = {}

    def _linearization(self, r: int) -> _Linearization:
        if r not in self._by_r:
            rows = self.index.repeat_interleave(r)
            primals = tuple(x.index_select(0, rows) for x in self.problem.inputs)
            self._by_r[r] = _Linearization(self.problem.fn, primals, self.problem.seed, self.choice)
        return self._by_r[r]

    def matvec(self, v: Tensor) -> Tensor:
        s, r, _ = v.shape
        tangents = _split_inputs(self.problem, v, (s * r,))
        y = self._linearization(r).jvp(tangents, vmapped=False)
        self.products += s * r
        return y.detach().reshape(s, r, -1).to(v.dtype)

    def rmatvec(self, u: Tensor) -> Tensor:
        s, r, _ = u.shape
        cot = u.reshape(s * r, *self.problem.out_shape[1:]).to(self.problem.dtype)
        grads = self._linearization(r).vjp(cot, vmapped=False)
        self.products += s * r
        return torch.cat([g.detach().reshape(s, r, -1) for g in grads], dim=-1).to(u.dtype)


class _PerSample(_Operator):
    """Interacting examples: the full batch, directions vmapped, each in one example."""

    def __init__(self, problem: _Problem, index: Tensor) -> None:
        self.problem = problem
        self.index = index
        self.mode = "whole" if problem.whole else "per-sample"
        self.choice = _Choice()
        self.lin = _Linearization(problem.fn, problem.inputs, problem.seed, self.choice)

    def _scatter(self, v: Tensor, shape: tuple[int, ...]) -> Tensor:
        """(s, r, row) -> (s * r, batch, row...), zero except row ``index[i]`` of sample i."""
        s, r = v.shape[:2]
        out = v.new_zeros(s, r, shape[0], math.prod(shape[1:]))
        for i, row in enumerate(self.index.tolist()):
            out[i, :, row] = v[i]
        return out.reshape(s * r, *shape).to(self.problem.dtype)

    def _gather(self, y: Tensor, s: int, r: int) -> Tensor:
        y = y.reshape(s, r, y.shape[1], -1)
        rows = self.index.view(s, 1, 1, 1).expand(s, r, 1, y.shape[-1])
        return y.detach().gather(2, rows).squeeze(2).to(self.problem.work_dtype)

    def _chunked(self, w: Tensor, step: Callable[[Tensor], Tensor]) -> Tensor:
        return torch.cat([step(c) for c in torch.split(w, PROBE_CHUNK, dim=1)], dim=1)

    def matvec(self, v: Tensor) -> Tensor:
        def step(c: Tensor) -> Tensor:
            s, r, _ = c.shape
            flat = torch.split(c, self.problem.in_sizes, dim=-1)
            tangents = tuple(
                self._scatter(f, tuple(x.shape))
                for f, x in zip(flat, self.problem.inputs, strict=True)
            )
            self.products += s * r
            return self._gather(self.lin.jvp(tangents, vmapped=True), s, r)

        return self._chunked(v, step)

    def rmatvec(self, u: Tensor) -> Tensor:
        def step(c: Tensor) -> Tensor:
            s, r, _ = c.shape
            grads = self.lin.vjp(self._scatter(c, self.problem.out_shape), vmapped=True)
            self.products += s * r
            return torch.cat([self._gather(g, s, r) for g in grads], dim=-1)

        return self._chunked(u, step)


def _examples_interact(problem: _Problem, generator: torch.Generator) -> bool:
    """One ``J v`` with ``v`` in example 0 only: does any other example's output move?"""
    if problem.batch == 1:
        return False
    lin = _Linearization(problem.fn, problem.inputs, problem.seed, _Choice())
    tangents = []
    for x in problem.inputs:
        t = torch.zeros_like(x)
        t[0] = problem.randn(tuple(x.shape[1:]), generator).to(x.dtype)
        tangents.append(t)
    y = lin.jvp(tuple(tangents), vmapped=False).detach()
    return bool((y[1:] != 0).any())  # sync: a host decision, once per diagnosis


def _adjoint_gap(op: _Operator, problem: _Problem, s: int, generator: torch.Generator) -> float:
    """``|<u, J v> - <Jᵀ u, v>|`` relative to its scale: about 1e-7 when J v and Jᵀ u agree."""
    v = problem.randn((s, 1, problem.n), generator)
    u = problem.randn((s, 1, problem.m), generator)
    jv, jtu = op.matvec(v), op.rmatvec(u)
    left, right = (u * jv).sum(), (jtu * v).sum()
    scale = float(u.norm() * jv.norm() + jtu.norm() * v.norm())
    return float((left - right).abs()) / scale if scale > 0 else 0.0


def _checked_operator(op: _Operator, problem: _Problem, s: int, g: torch.Generator) -> _Operator:
    """Run the adjoint check; switch to forward mode if reverse-over-reverse disagrees."""
    if _adjoint_gap(op, problem, s, g) <= ADJOINT_TOLERANCE:
        return op
    if not op.choice.forward:
        op.choice.forward = True
        if _adjoint_gap(op, problem, s, g) <= ADJOINT_TOLERANCE:
            return op
    raise ConfigError(
        "J v and Jᵀ u of the model disagree (an autograd.Function whose backward or "
        "forward-mode derivative is wrong?): the Jacobian cannot be estimated."
    )


def _operator(problem: _Problem, samples: int, generator: torch.Generator) -> _Operator:
    s = min(samples, problem.batch)
    index = torch.arange(s, device=problem.device)
    if problem.whole or _examples_interact(problem, generator):
        return _checked_operator(_PerSample(problem, index), problem, s, generator)
    try:
        return _checked_operator(_Replicated(problem, index), problem, s, generator)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a model tied to its batch size: keep the full batch
        return _checked_operator(_PerSample(problem, index), problem, s, generator)


def _orthonormal_rows(a: Tensor) -> Tensor:
    """Rows of each (r, d) slice made orthonormal (QR of the transpose)."""
    q, _ = torch.linalg.qr(a.transpose(1, 2))
    return cast(Tensor, q.transpose(1, 2))


class _NonFinite(Exception):
    """A product overflowed: the Jacobian is too large for the input dtype."""


def _checked(t: Tensor) -> Tensor:
    if not bool(torch.isfinite(t).all()):  # sync: stop at the first overflow
        raise _NonFinite
    return t


def _exact(problem: _Problem, op: _Operator, s: int) -> tuple[Tensor, Tensor]:
    """Singular values (s, min(m, n)) and squared Frobenius norms, from basis vectors."""
    n, m = problem.n, problem.m
    if n <= m:
        jt = _checked(op.matvec(problem.eye(n, s)))  # (s, n, m): row j is J e_j, i.e. Jᵀ
    else:
        jt = _checked(op.rmatvec(problem.eye(m, s)))  # (s, m, n): row j is Jᵀ e_j: J
    return torch.linalg.svdvals(jt), jt.square().sum(dim=(1, 2))


def _randomized(
    problem: _Problem,
    op: _Operator,
    shape: tuple[int, int],
    iters: int,
    probes: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Top-k singular values (s, k) by subspace iteration, ``‖J‖_F²`` (s,) by Hutch++."""
    (s, k), n = shape, problem.n
    v = _orthonormal_rows(problem.randn((s, k, n), generator))
    for _ in range(iters):
        u = _orthonormal_rows(_checked(op.matvec(v)))
        v = _orthonormal_rows(_checked(op.rmatvec(u)))
    jv = _checked(op.matvec(v))  # (s, k, m): J on the top right singular subspace
    # Hutchinson on the complement of span(v), with an orthonormal frame of probes there:
    # E[(n - k) / p * sum ‖J q‖²] = ‖J (I - V Vᵀ)‖_F², exact when p = n - k.
    z = problem.randn((s, probes, n), generator)
    q = _orthonormal_rows(z - (z @ v.transpose(1, 2)) @ v)
    rest = _checked(op.matvec(q)).square().sum(dim=(1, 2)) * ((n - k) / probes)
    return torch.linalg.svdvals(jv), jv.square().sum(dim=(1, 2)) + rest


def _spectrum(
    problem: _Problem, op: _Operator, measured: tuple[Tensor, Tensor], k: int, exact: bool
) -> Spectrum:
    svals, frob = measured
    mean_sq = (frob / min(problem.n, problem.m)).double().cpu()
    svals = svals.double().cpu()
    return Spectrum(
        top=tuple(float(x) for x in svals[:, :k].mean(dim=0)),
        mean_sq=float(mean_sq.mean()),
        sample_top=tuple(float(x) for x in svals[:, 0]),
        sample_mean_sq=tuple(float(x) for x in mean_sq),
        in_features=problem.n,
        out_features=problem.m,
        samples=svals.shape[0],
        products=op.products,
        exact=exact,
        mode=op.mode,
        matvec=op.choice.name,
    )


def estimate(
    fn: TensorFn,
    inputs: Sequence[Tensor],
    *,
    batch_dim: int = 0,
    samples: int = 4,
    top: int = 3,
    iters: int = 20,
    probes: int = 32,
    seed: int = 0,
) -> Spectrum:
    """Estimate the singular values of the per-example Jacobian of ``fn`` at ``inputs``.

    The cost is bounded: ``samples * (top * (2 * iters + 1) + probes)`` products, plus
    ``2 * samples`` for the adjoint check and one for the cross-sample check; when
    ``min(m, n) <= top + probes`` the Jacobian is instead formed exactly from
    ``min(m, n)`` basis vectors per example. The global
    random state is left as it was (``fn`` runs with ``seed``, the same in every call, so
    dropout masks agree between products).

    Args:
        fn: maps the input tensors (positionally) to one output tensor.
        inputs: floating-point tensors, all with the batch size along ``batch_dim``.
        batch_dim: the batch dimension of the inputs and of the output.
        samples: examples probed (the first ones of the batch); results are their mean.
        top: how many of the largest singular values to estimate.
        iters: power (subspace) iterations, each one ``J v`` and one ``Jᵀ u`` per vector.
        probes: Hutchinson probes for the part of ``‖J‖_F²`` outside the top subspace.
        seed: seed of the random directions and of any randomness inside ``fn``.

    Returns:
        The estimate; every singular value is ``inf`` if a product overflowed.

    Raises:
        ConfigError: no floating-point input or output, or a count below 1.
    """
    if min(samples, top, iters, probes) < 1:
        raise ConfigError(
            f"samples, top, iters and probes must be at least 1, got {samples}, {top}, "
            f"{iters}, {probes}"
        )
    devices = [x.device for x in inputs if x.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # functorch's note that an operator lacks a batching rule: slower, still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        # torch scripts its forward-AD decompositions on first use, with a deprecated API.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
        generator = torch.Generator().manual_seed(seed)
        problem = _build_problem(fn, inputs, batch_dim, seed)
        op = _operator(problem, samples, generator)
        s = min(samples, problem.batch)
        k = min(top, problem.n, problem.m)
        exact = min(problem.n, problem.m) <= k + probes
        try:
            if exact:
                measured = _exact(problem, op, s)
            else:
                measured = _randomized(problem, op, (s, k), iters, probes, generator)
        except _NonFinite:
            measured = (torch.full((s, k), math.inf), torch.full((s,), math.inf))
    return _spectrum(problem, op, measured, k, exact)
