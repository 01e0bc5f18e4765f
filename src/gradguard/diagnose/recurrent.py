"""Gradient through time for RNN/LSTM/GRU modules: decay, spectral radii, forget gate.

For each recurrent module the hooks saw, its first call is run again on a detached copy
of the input: the gradient of a random readout of the last output step reaches every
input step, and its norm per step shows whether the first steps are forgotten (Bengio
et al. 1994; Pascanu et al. 2013).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.diagnose.measure import Call, Record
from gradguard.diagnose.records import ForgetGate, RecurrentDiagnosis
from gradguard.diagnose.verdict import time_flags
from gradguard.errors import UnsupportedModelError

_GATE_NAMES = {"LSTM": "ifgo", "GRU": "rzn", "RNN_TANH": "h", "RNN_RELU": "h"}


def _rnn_mode(module: nn.Module) -> str:
    mode = getattr(module, "mode", None)
    if isinstance(mode, str):
        return mode
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_TANH"


def spectral_radii(module: nn.RNNBase | nn.RNNCellBase) -> dict[str, float]:
    """Largest |eigenvalue| of each square recurrent weight block, per layer and gate."""
    gates = _GATE_NAMES[_rnn_mode(module)]
    radii = {}
    for name, param in module.named_parameters(recurse=False):
        if not name.startswith("weight_hh"):
            continue
        suffix = name.removeprefix("weight_hh").removeprefix("_")
        layer = suffix.replace("_reverse", "r") or "l0"
        for gate, block in zip(gates, param.detach().double().chunk(len(gates)), strict=True):
            if block.shape[0] == block.shape[1]:
                radii[f"{layer}.{gate}"] = float(torch.linalg.eigvals(block).abs().max())
    return radii


def _time_grads(module: nn.RNNBase, call: Call, seed: int) -> tuple[Tensor, int]:
    """‖∂(u · h_T)/∂x_t‖ for every input step t, and the time dimension of the input."""
    args, kwargs = call.args, call.kwargs
    x = args[0].detach().clone().requires_grad_(True)
    hx = _detached(args[1] if len(args) > 1 else kwargs.get("hx"))
    time_dim = 1 if module.batch_first and x.dim() == 3 else 0
    with torch.enable_grad():
        out = module(x, hx)[0]
        hidden = module.proj_size or module.hidden_size
        last = out.select(time_dim, -1)[..., :hidden]  # the forward direction's last state
        generator = torch.Generator().manual_seed(seed)
        u = torch.randn(last.shape, generator=generator, dtype=torch.float32)
        (grad,) = torch.autograd.grad((last * u.to(last.device, last.dtype)).sum(), x)
    norms = grad.detach().double().movedim(time_dim, 0).reshape(x.shape[time_dim], -1).norm(dim=1)
    return norms.cpu(), time_dim


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _param(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise UnsupportedModelError(f"{type(module).__name__}.{name} is not a tensor")
    return value.detach()


def forget_gate_stats(module: nn.LSTM, x: Tensor, time_dim: int, hx: Any = None) -> ForgetGate:
    """Unroll layer 0 (forward direction) of an LSTM on ``x`` and collect its forget gate."""
    hidden = module.hidden_size
    w_ih, w_hh = _param(module, "weight_ih_l0"), _param(module, "weight_hh_l0")
    bias = torch.zeros(4 * hidden, dtype=x.dtype, device=x.device)
    if module.bias:
        bias = _param(module, "bias_ih_l0") + _param(module, "bias_hh_l0")
    steps = x.detach().movedim(time_dim, 0)
    shape = (*steps.shape[1:-1], module.proj_size or hidden)
    h = torch.zeros(shape, dtype=x.dtype, device=x.device)
    c = torch.zeros((*steps.shape[1:-1], hidden), dtype=x.dtype, device=x.device)
    if isinstance(hx, tuple) and hx[0] is not None:
        h, c = hx[0][0].detach(), hx[1][0].detach()
    forget = []
    for x_t in steps:
        i, f, g, o = (x_t @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=-1)
        f = torch.sigmoid(f)
        forget.append(f)
        c = f * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if module.proj_size:
            h = h @ _param(module, "weight_hr_l0").T
    gates = torch.stack(forget).double()
    bias_f = float(bias[hidden : 2 * hidden].double().mean())
    return ForgetGate(float(gates.mean()), float(gates.std()), bias_f)


def _recurrent_one(record: Record, seed: int) -> RecurrentDiagnosis:
    module = record.module
    kind = type(module).__name__
    radii = spectral_radii(module) if isinstance(module, nn.RNNBase | nn.RNNCellBase) else {}
    if not isinstance(module, nn.RNNBase):
        note = "a cell run step by step: gradient through time not measured"
        return _unmeasured(record.name, kind, radii, note)
    call = record.rnn_call
    if call is None or not isinstance(call.args[0], Tensor):
        note = "packed or non-tensor input: gradient through time not measured"
        return _unmeasured(record.name, kind, radii, note)
    norms, time_dim = _time_grads(module, call, seed)
    values = tuple(float(v) for v in norms)
    decay = values[0] / values[-1] if values[-1] > 0 else math.inf
    forget = None
    if isinstance(module, nn.LSTM):
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        forget = forget_gate_stats(module, call.args[0], time_dim, hx)
    return RecurrentDiagnosis(
        name=record.name,
        kind=kind,
        steps=len(values),
        time_grad_norms=values,
        decay=decay,
        spectral_radius=radii,
        forget_gate=forget,
        flags=time_flags(decay, steps=len(values)),
    )


def _unmeasured(name: str, kind: str, radii: dict[str, float], note: str) -> RecurrentDiagnosis:
    return RecurrentDiagnosis(
        name=name,
        kind=kind,
        steps=None,
        time_grad_norms=None,
        decay=None,
        spectral_radius=radii,
        forget_gate=None,
        note=note,
    )


def measure_recurrent(
    records: Sequence[Record], seed: int
) -> tuple[list[RecurrentDiagnosis], list[str]]:
    """One entry per RNN/LSTM/GRU module (and cell), and notes on what failed to measure."""
    found, notes = [], []
    for record in records:
        if not isinstance(record.module, nn.RNNBase | nn.RNNCellBase):
            continue
        try:
            found.append(_recurrent_one(record, seed))
        except Exception as error:  # noqa: BLE001 - report, never crash the diagnosis
            notes.append(f"{record.name}: gradient through time not measured: {error}")
    return found, notes
