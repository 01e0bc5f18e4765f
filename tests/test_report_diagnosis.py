"""A diagnosis page carries its plots: gradient flow, saturation, Jacobian spectrum."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import torch
from torch import nn

import gradguard as gg
from gradguard.report._diagnosis import (
    draw_activations,
    draw_gradient_flow,
    draw_jacobian,
    render_page,
    render_text,
)
from gradguard.report._html import CSP


def deep_tanh() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def test_saved_diagnosis_page_embeds_three_png_plots(tmp_path: Path) -> None:
    diagnosis = gg.diagnose(deep_tanh(), torch.randn(32, 16))
    page = diagnosis.save_html(tmp_path / "diagnosis.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == [
        "Gradient flow by depth",
        "Activation saturation and dead units",
        "Jacobian singular values",
    ]
    for _, encoded in images:
        assert base64.b64decode(encoded)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page
    assert "https://" not in page


def test_figures_are_left_out_when_their_data_is_missing() -> None:
    data = gg.diagnose(deep_tanh(), torch.randn(32, 16), jacobian=False).to_dict()
    assert draw_jacobian(data) is None
    assert draw_gradient_flow(data) is not None
    assert draw_activations({"layers": []}) is None
    assert draw_gradient_flow({"layers": [{"name": "a", "relative_grad": 1.0}]}) is None


def test_text_and_page_read_the_json_data_alone() -> None:
    """The report renders ``to_dict()`` data (also read back from JSON), not the object."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(16, 16), nn.ReLU())])
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=30.0)  # overflows: inf and nan in the data
    diagnosis = gg.diagnose(model, torch.randn(8, 16), jacobian=False)
    assert diagnosis.verdict == "exploding"
    data = json.loads(diagnosis.to_json())
    assert render_text(data) == str(diagnosis)
    assert "inf" in str(diagnosis) or "nan" in str(diagnosis)
    assert render_page(data) == diagnosis.to_html()


def test_page_uses_the_report_layout_and_marks_flagged_layers() -> None:
    page = gg.diagnose(deep_tanh(), torch.randn(32, 16) * 10, jacobian=False).to_html()
    assert f'content="{CSP}"' in page  # the shared page: no network, inline styles only
    assert '<div class="verdict' in page
    flagged = re.findall(r'<td class="(warn|fail)">([^<]*)</td></tr>', page)
    assert flagged
    assert all(flags for _, flags in flagged)
