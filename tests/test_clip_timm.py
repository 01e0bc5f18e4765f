"""gg.AGC against timm's ``adaptive_clip_grad`` on real image models: the same gradients.

timm's rule (``timm/utils/agc.py``): per unit (dims 1..n of a weight with ndim > 1, the
whole tensor otherwise), ``max_norm = clamp(||W_i||, min=eps) * clip_factor`` and
``G_i <- G_i * max_norm / clamp(||G_i||, min=1e-6)`` unless ``||G_i|| < max_norm``. AGC
computes the same fp32 operations in the same order (``torch.linalg.vector_norm`` over
the same dimensions, the same clamps, one multiply), so fp32 gradients are compared for
exact equality: any difference would be a different rule, not rounding. Where AGC
differs by design (it excludes the classifier by default, norms of bf16/fp16 tensors are
taken in fp32, a unit holding a NaN is left alone), the difference is asserted below.

timm's package imports torchvision on start-up; where torchvision is missing or built for
another torch (a CUDA wheel beside a CPU torch), timm's ``agc.py``, which needs only torch,
is loaded alone and the models that need ``timm.create_model`` are skipped; a
``transformers`` ResNet (built locally, no download) stands in for them.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg

CLIP_FACTOR = 0.01  # timm's and AGC's default
EPS = 1e-3  # timm's and AGC's default


def load_timm_agc() -> ModuleType:
    """``timm.utils.agc``, through timm when it imports, else from its file alone."""
    try:
        from timm.utils import agc
    except Exception:  # noqa: BLE001 - no torchvision (ImportError), or a mismatched one (RuntimeError)
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("timm is not installed", allow_module_level=True)
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
        alone = importlib.util.spec_from_file_location("timm_agc_alone", path)
        assert alone is not None, path
        assert alone.loader is not None, path
        agc = importlib.util.module_from_spec(alone)
        alone.loader.exec_module(agc)
    return agc


TIMM_AGC = load_timm_agc()


def adaptive_clip_grad(params: Iterable[torch.Tensor]) -> None:
    """timm's AGC, as timm calls it: clip factor, eps and the 2-norm given explicitly."""
    TIMM_AGC.adaptive_clip_grad(list(params), clip_factor=CLIP_FACTOR, eps=EPS, norm_type=2.0)


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        try:
            import timm
        except Exception as error:  # noqa: BLE001 - see load_timm_agc
            pytest.skip(f"timm cannot be imported here ({type(error).__name__}: {error})")
        model: nn.Module = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return model

    return build


def hf_resnet() -> nn.Module:
    """A small transformers ResNet: conv stem, basic blocks with BatchNorm, linear head."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, layer_type="basic"
    )
    model: nn.Module = transformers.ResNetForImageClassification(config)
    return model


def deep_mlp() -> nn.Module:
    """Forty small tanh layers of one shape: gradguard measures and clips them stacked.

    Their gradient vanishes towards the input, so AGC clips the late units, not the early.
    """
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(3 * 32 * 32, 24), nn.Tanh()]
    for _ in range(40):
        layers += [nn.Linear(24, 24), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(24, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "deep-mlp": deep_mlp,  # 40 Linear(24, 24): weights and biases stacked by shape
    "timm-resnet10t": timm_model("resnet10t"),  # conv + BatchNorm + linear head
    "timm-nf_regnet_b0": timm_model("nf_regnet_b0"),  # normalizer-free: AGC's own setting
    "timm-vit_tiny": timm_model("vit_tiny_patch16_224", img_size=32),  # linear layers, 3-D
    "hf-resnet": hf_resnet,
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    return model


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def backward(model: nn.Module, seed: int = 1, dtype: torch.dtype = torch.float32) -> None:
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 32, 32, generator=data, dtype=dtype)
    y = torch.randint(0, 10, (8,), generator=data)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(logits(model, x).float(), y).backward()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if p.grad is not None:
            p.grad.copy_(saved[name])


def clipped_units(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int]:
    """How many units (rows of dims 1..n; one for a vector) changed, out of how many."""
    if before.ndim <= 1:
        return int(not torch.equal(before, after)), 1
    changed = (before != after).flatten(1).any(dim=1)
    return int(changed.sum()), changed.numel()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("head", ["clipped", "excluded"])
def test_agc_gives_timms_gradients_exactly(name: str, head: str) -> None:
    check_agc_against_timm(name, head)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", ["deep-mlp", "hf-resnet"])
def test_agc_measured_together_gives_timms_gradients_exactly_on_several_threads(
    name: str, threads: int
) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_agc_against_timm(name, "clipped")
    finally:
        torch.set_num_threads(previous)


def check_agc_against_timm(name: str, head: str) -> None:
    model = build(name)
    backward(model)
    raw = grads(model)
    params = [p for p in model.parameters() if p.grad is not None]
    assert len(params) == len(list(model.parameters()))
    head_names = [n for n, _ in model.named_parameters()][-2:]
    if head == "clipped":  # adaptive_clip_grad(model.parameters()) clips every tensor
        adaptive_clip_grad(params)
        policy = gg.AGC(clipping=CLIP_FACTOR, eps=EPS, exclude=())
    else:  # timm's train.py --clip-mode agc passes model_parameters(exclude_head=True)
        adaptive_clip_grad(params[:-2])
        policy = gg.AGC(clipping=CLIP_FACTOR, eps=EPS)  # the default excludes the classifier
    by_timm = grads(model)
    restore(model, raw)
    gg.clip_(model, policy)
    by_gradguard = grads(model)

    assert by_gradguard.keys() == by_timm.keys()
    for key, grad in by_gradguard.items():
        assert torch.equal(grad, by_timm[key]), (key, float((grad - by_timm[key]).abs().max()))
    # not vacuous: some units were clipped, some not, and the head only when asked
    units = [clipped_units(raw[k], by_timm[k]) for k in raw if k not in head_names]
    clipped, total = sum(c for c, _ in units), sum(t for _, t in units)
    assert 0 < clipped < total
    head_changed = [not torch.equal(raw[k], by_timm[k]) for k in head_names]
    assert any(head_changed) if head == "clipped" else not any(head_changed)


@pytest.mark.parametrize("name", ["timm-resnet10t", "hf-resnet"])
def test_a_guard_with_agc_trains_to_timms_weights(name: str) -> None:
    steps = 5
    timm_model_ = build(name)
    gg_model = copy.deepcopy(timm_model_)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 3, 32, 32, generator=data)
        return x, torch.randint(0, 10, (16,), generator=data)

    optimizer = torch.optim.AdamW(timm_model_.parameters(), lr=1e-3)
    for step in range(steps):  # timm's train.py, --clip-mode agc
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits(timm_model_, x), y).backward()
        adaptive_clip_grad(list(timm_model_.parameters())[:-2])
        optimizer.step()

    optimizer = torch.optim.AdamW(gg_model.parameters(), lr=1e-3)
    with gg.Guard(gg_model, optimizer, clip=gg.AGC(clipping=CLIP_FACTOR, eps=EPS)) as guard:
        for step in range(steps):
            x, y = batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(logits(gg_model, x), y)
            loss.backward()
            report = guard.step(loss)
            assert float(report.scale) < 1.0  # AGC clipped something at every step
    assert guard.step_count == steps

    start = build(name)
    moved = 0
    for (key, a), b, s in zip(
        timm_model_.state_dict().items(),
        gg_model.state_dict().values(),
        start.state_dict().values(),
        strict=True,
    ):
        # Bitwise: the same clipped gradients, the same optimizer (BatchNorm buffers too).
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)
        moved += int(not torch.equal(a, s))
    assert moved > len(start.state_dict()) // 2


def test_bf16_norms_are_taken_in_fp32_where_timm_uses_bf16() -> None:
    """AGC equals timm run on fp32 copies, rounded once to bf16; timm in bf16 differs."""
    model = build("hf-resnet").to(torch.bfloat16)
    backward(model, dtype=torch.bfloat16)
    raw = grads(model)
    gg.clip_(model, gg.AGC(clipping=CLIP_FACTOR, eps=EPS, exclude=()))
    by_gradguard = grads(model)

    wide = {n: nn.Parameter(p.detach().float()) for n, p in model.named_parameters()}
    for n, p in wide.items():
        p.grad = raw[n].float()
    adaptive_clip_grad(wide.values())
    restore(model, raw)
    adaptive_clip_grad(model.parameters())
    by_timm_bf16 = grads(model)

    differs = 0
    for n, grad in by_gradguard.items():
        wide_grad = wide[n].grad
        assert wide_grad is not None
        assert torch.equal(grad, wide_grad.bfloat16()), n
        differs += int(not torch.equal(grad, by_timm_bf16[n]))
    assert differs > 0  # timm's bf16 norms and factors round differently


def test_a_unit_holding_a_nan_is_left_alone_where_timm_makes_it_all_nan() -> None:
    model = build("hf-resnet")
    backward(model)
    name = next(n for n, p in model.named_parameters() if p.ndim == 4)
    weight = dict(model.named_parameters())[name]
    assert weight.grad is not None
    weight.grad[0, 0, 0, 0] = math.nan
    raw = grads(model)
    adaptive_clip_grad(model.parameters())
    by_timm = grads(model)
    restore(model, raw)
    gg.clip_(model, gg.AGC(clipping=CLIP_FACTOR, eps=EPS, exclude=()))
    by_gradguard = grads(model)

    assert bool(by_timm[name][0].isnan().all())  # timm: NaN norm, NaN factor, NaN unit
    assert int(by_gradguard[name][0].isnan().sum()) == 1  # AGC: unit 0 as it was
    torch.testing.assert_close(by_gradguard[name][0], raw[name][0], equal_nan=True)
    assert torch.equal(by_gradguard[name][1:], by_timm[name][1:])  # other units: the same
    assert all(torch.equal(g, by_timm[n]) for n, g in by_gradguard.items() if n != name)
