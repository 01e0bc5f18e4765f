"""The residual experiment: plain vs residual BN nets, and residual nets without BN."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LabRuns
from gradguard import lab
from gradguard.lab import residual as rs
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots

CLAIM_IDS = [
    "plain-degrades-with-depth",
    "residual-trains-deep",
    "residual-beats-plain",
    "plain-bn-explodes-backward",
    "residual-gradient-flat",
    "no-norm-he-init-blows-up",
    "fixup-trains-without-norm",
    "fixup-generalizes",
]


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> tuple[lab.LabResult, list[int]]:
    """One quick run through ``lab.run``, recording the thread count inside every training."""
    result, threads = lab_runs.quick("residual", spy=rs)
    return result, threads


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: tuple[lab.LabResult, list[int]]) -> dict[str, Any]:
    return lab_runs.stored(quick[0])


def _runs(stored: dict[str, Any]) -> dict[tuple[str, int], rs.Run]:
    return {(r.kind, r.layers): r for r in map(rs.Run.from_dict, stored["measurements"])}


def test_quick_run_reproduces_its_claims(quick: tuple[lab.LabResult, list[int]]) -> None:
    (result,) = quick[0].experiments
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == CLAIM_IDS
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_every_net_is_trained_single_threaded_and_recorded(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    assert quick[1] == [1] * len(rs.ARMS)
    runs = _runs(stored)
    assert set(runs) == set(rs.ARMS)
    for key, run in runs.items():
        assert run.steps == rs.QUICK_STEPS
        assert len(run.loss) == len(run.grad_norm) == run.steps_run
        assert len(run.init_block_norms) == (key[1] - 2) // 2
        assert run.block_norms[0] == run.init_block_norms
    he = runs[("he", rs.DEEP)]
    assert he.nonfinite_step is not None
    assert he.steps_run == he.nonfinite_step
    assert math.isnan(he.train_loss)
    assert {"nonfinite", "overflow"} & {str(e["kind"]) for e in he.events}
    for key in set(rs.ARMS) - {("he", rs.DEEP)}:
        assert runs[key].steps_run == rs.QUICK_STEPS
        assert runs[key].nonfinite_step is None


def test_a_run_is_deterministic(stored: dict[str, Any]) -> None:
    first = next(
        m for m in stored["measurements"] if (m["kind"], m["layers"]) == ("plain", rs.SHALLOW)
    )
    with single_thread():
        again = rs.train("plain", rs.SHALLOW, 0, rs.QUICK_STEPS)
    assert again.to_dict() == first


def test_fixup_zeroes_branch_outputs_and_classifier_and_scales_the_first_layer() -> None:
    state = torch.get_rng_state()
    he = rs.build_model("he", rs.DEEP, seed=3)
    fixup = rs.build_model("fixup", rs.DEEP, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    n_blocks = len(fixup.blocks)
    assert n_blocks == 15
    for block_he, block_fixup in zip(he.blocks, fixup.blocks, strict=True):
        assert isinstance(block_he, rs.Block)
        assert isinstance(block_fixup, rs.Block)
        torch.testing.assert_close(block_fixup.l1.weight, block_he.l1.weight / math.sqrt(n_blocks))
        assert not block_fixup.l2.weight.any()
        assert block_fixup.scale is not None
        assert float(block_fixup.scale.detach()) == 1.0
        assert not isinstance(block_fixup.n1, nn.BatchNorm1d)
    assert not fixup.head.weight.any()
    assert not fixup.head.bias.any()
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert not fixup(x).any()  # the net is the zero function at init
        # He init: every block adds a branch of about the signal's variance.
        assert float(he(x).std()) > 100


def test_blocks_follow_the_paper_and_he_init_comes_from_gradguard_init() -> None:
    plain = rs.build_model("plain", rs.SHALLOW, seed=0)
    residual = rs.build_model("residual", rs.SHALLOW, seed=0)
    for a, b in zip(plain.parameters(), residual.parameters(), strict=True):
        assert torch.equal(a, b)  # same weights: only the shortcut differs
    first = plain.blocks[0]
    assert isinstance(first, rs.Block)
    assert isinstance(first.n1, nn.BatchNorm1d)
    assert float(first.l1.weight.detach().std()) == pytest.approx(math.sqrt(2 / rs.WIDTH), rel=0.05)
    assert not first.l1.bias.any()
    x = torch.randn(16, 64)
    plain.eval()
    residual.eval()
    with torch.no_grad():
        h = plain.stem(x)
        assert torch.equal(
            residual.blocks[0](h),
            torch.relu(first.n2(first.l2(torch.relu(first.n1(first.l1(h))))) + h),
        )


def test_the_figure_is_written_from_the_json_alone(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick[0].run_dir / "residual.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == ["residual.png"]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: tuple[lab.LabResult, list[int]], stored: dict[str, Any]
) -> None:
    (result,) = quick[0].experiments
    runs = list(_runs(stored).values())
    assert rs.claims(runs, (0,), rs.QUICK_STEPS) == result.claims

    def verdicts(key: tuple[str, int], **changes: Any) -> dict[str, bool]:
        changed = [
            dataclasses.replace(r, **changes) if (r.kind, r.layers) == key else r for r in runs
        ]
        return {c.id: c.passed for c in rs.claims(changed, (0,), rs.QUICK_STEPS)}

    deep_loss = next(r.train_loss for r in runs if (r.kind, r.layers) == ("plain", rs.DEEP))
    shallow_bad = verdicts(("plain", rs.SHALLOW), train_loss=deep_loss)
    assert shallow_bad.pop("plain-degrades-with-depth") is False
    assert all(shallow_bad.values())
    survived = verdicts(("he", rs.DEEP), nonfinite_step=None)
    assert survived.pop("no-norm-he-init-blows-up") is False
    assert all(survived.values())
    vanishing = verdicts(("plain", rs.DEEP), init_ratio=1e-4)
    assert vanishing.pop("plain-bn-explodes-backward") is False
    assert all(vanishing.values())
