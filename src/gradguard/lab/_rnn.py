"""The batched Elman recurrence of the RNN experiments: many tanh RNNs as one.

:func:`elman_last_state` runs a stack of independent single-layer tanh ``nn.RNN`` modules,
each on its own batch, through one recurrence and returns their last hidden states; its
backward pass through time is written by hand (:class:`_ElmanLastState`), and
:func:`readout` applies each network's own linear readout. Values and gradients equal those
of each module alone. Used by the ``clipping-rnn`` experiment (every run of a population,
and its held-out accuracies) and the ``gated-rnn`` experiment (the vanilla RNNs of all seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


class _ElmanLastState(torch.autograd.Function):
    """``h_t = tanh(u_t + h_{t-1} W_hhᵀ)`` for a stack of networks; returns ``h_T``.

    Runs the loop without recording and back-propagates through time by hand (one ``mul``
    and one ``bmm`` per step): two to three times faster than autograd on a CPU here.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, w_hh: Tensor) -> Tensor:
        """``u``: ``[models, time, batch, hidden]``; ``w_hh``: ``[models, hidden, hidden]``."""
        models, steps, batch, hidden = u.shape
        states = u.new_empty(steps, models, batch, hidden)
        w_t = w_hh.transpose(1, 2)
        h = u.new_zeros(models, batch, hidden)
        for t in range(steps):
            h = torch.tanh_(torch.baddbmm(u[:, t], h, w_t, out=states[t]))
        ctx.save_for_backward(states, w_hh)
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad_last: Tensor) -> tuple[Tensor, Tensor]:
        """Back-propagate through time; return the gradients of ``u`` and ``w_hh``."""
        states, w_hh = ctx.saved_tensors
        steps, models, batch, hidden = states.shape
        slope = 1 - states * states  # tanh' at every step
        grad_u = states.new_empty(models, steps, batch, hidden)
        carry = grad_last  # dL/dh_t
        for t in range(steps - 1, -1, -1):
            grad_a = torch.mul(carry, slope[t], out=grad_u[:, t])
            if t:
                carry = torch.bmm(grad_a, w_hh)
        n = (steps - 1) * batch  # dW_hh = sum over t >= 1 of grad_a_tᵀ h_{t-1}
        grad_w = torch.bmm(
            grad_u[:, 1:].reshape(models, n, hidden).transpose(1, 2),
            states[:-1].transpose(0, 1).reshape(models, n, hidden),
        )
        return grad_u, grad_w


def _stacked(rnns: Sequence[nn.RNN]) -> tuple[Tensor, Tensor, Tensor]:
    """``W_ih``, ``W_hh`` and ``b_ih + b_hh`` of every module, stacked along a new dim 0."""
    w_ih = torch.stack([r.get_parameter("weight_ih_l0") for r in rnns])
    w_hh = torch.stack([r.get_parameter("weight_hh_l0") for r in rnns])
    bias = torch.stack(
        [r.get_parameter("bias_ih_l0") + r.get_parameter("bias_hh_l0") for r in rnns]
    )
    return w_ih, w_hh, bias


def elman_last_state(rnns: Sequence[nn.RNN], x: Tensor) -> Tensor:
    """The last hidden state ``[models, batch, hidden]`` of each tanh ``nn.RNN`` on ``x[m]``.

    ``x`` is ``[len(rnns), time, batch, inputs]``. Values and the gradients sent to each
    module's parameters equal those of calling each module alone (up to float rounding).
    """
    models, steps, batch, n_inputs = x.shape
    w_ih, w_hh, bias = _stacked(rnns)
    flat = x.reshape(models, steps * batch, n_inputs)
    u = torch.baddbmm(bias[:, None, :], flat, w_ih.transpose(1, 2))
    last: Tensor = _ElmanLastState.apply(  # type: ignore[no-untyped-call]
        u.view(models, steps, batch, -1), w_hh
    )
    return last


def readout(layers: Sequence[nn.Linear], h: Tensor) -> Tensor:
    """Apply each ``nn.Linear`` to its own slice ``h[m]``: ``[models, batch, outputs]``."""
    weight = torch.stack([layer.weight for layer in layers])
    bias = torch.stack([layer.bias for layer in layers])
    return torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))
