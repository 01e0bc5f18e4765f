"""The gated-rnn experiment: the adding problem, the batched RNN path, the claims, the figure."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LabRuns
from gradguard import lab
from gradguard.errors import ConfigError
from gradguard.lab import gated_rnn as gr
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> lab.LabResult:
    result: lab.LabResult = lab_runs.quick("gated-rnn")[0]
    return result


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: lab.LabResult) -> dict[str, Any]:
    return lab_runs.stored(quick)


def _records(stored: dict[str, Any]) -> list[gr.RunRecord]:
    return [gr.RunRecord.from_dict(m) for m in stored["measurements"]]


# --- the experiment --------------------------------------------------------------------------


def test_quick_run_reproduces_its_claims_but_one(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.seeds == (0,)
    verdicts = {c.id: c.passed for c in result.claims}
    assert list(verdicts) == [
        "rnn-stays-at-baseline",
        "lstm-solves-adding",
        "rnn-gradient-vanishes-through-time",
        "gated-gradient-survives-through-time",
    ]
    # Not reproduced, and reported as such: after training, seed 0's vanilla RNN no longer
    # lets the gradient vanish through time (decay ~0.4), yet it still fails the task
    # (seeds 1 and 2 of the full variant do vanish: 4e-6 and 1e-10).
    vanishing = next(c for c in result.claims if c.id == "rnn-gradient-vanishes-through-time")
    assert not vanishing.passed
    assert vanishing.values[0] > 1e-3
    assert all(passed for claim, passed in verdicts.items() if claim != vanishing.id), [
        (c.id, c.values, c.note) for c in result.claims
    ]


def test_records_hold_learning_curves_and_gradients_through_time(stored: dict[str, Any]) -> None:
    records = _records(stored)
    assert [(r.cell, r.length) for r in records] == [(a.cell, a.length) for a in gr.QUICK_ARMS]
    for r in records:
        assert r.val_steps == tuple(gr.CHECK_EVERY * (i + 1) for i in range(len(r.val_mse)))
        assert r.steps == r.val_steps[-1]
        assert len(r.grad_through_time_init) == len(r.grad_through_time_trained) == r.length
        decay = r.grad_through_time_trained[0] / r.grad_through_time_trained[-1]
        assert decay == pytest.approx(r.decay_trained)
    lstm = next(r for r in records if r.cell == "lstm")
    assert lstm.solved_step == lstm.steps
    assert lstm.val_mse[-1] < gr.SOLVED_MSE
    rnn = next(r for r in records if r.cell == "rnn")
    assert rnn.solved_step is None
    assert rnn.steps == gr.STEPS


def test_claims_round_trip_and_fail_when_contradicted(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    records = _records(stored)
    assert gr.claims(records) == result.claims
    assert gr.tables(records, (0,)) == result.tables
    learned = [dataclasses.replace(r, test_mse=0.01) for r in records]
    verdicts = {c.id: c.passed for c in gr.claims(learned)}
    assert verdicts["rnn-stays-at-baseline"] is False
    assert verdicts["lstm-solves-adding"] is True
    stuck = [dataclasses.replace(r, test_mse=0.16) for r in records]
    assert {c.id: c.passed for c in gr.claims(stuck)}["lstm-solves-adding"] is False


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "gated-rnn.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == ["gated-rnn.png"]


# --- the task and the models -----------------------------------------------------------------


def test_adding_problem_marks_one_value_per_half_and_sums_them() -> None:
    x, y = gr.adding(300, 50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 300, 2)
    values, markers = x[..., 0], x[..., 1]
    assert torch.equal(markers[:25].sum(0), torch.ones(300))
    assert torch.equal(markers[25:].sum(0), torch.ones(300))
    torch.testing.assert_close(y, (values * markers).sum(0))
    assert 0 <= float(values.min()) <= float(values.max()) <= 1
    # Predicting the mean scores the baseline the claims compare with.
    _, y_big = gr.adding(20_000, 50, torch.Generator().manual_seed(1))
    assert float((y_big - 1.0).square().mean()) == pytest.approx(gr.BASELINE_MSE, rel=0.05)
    with pytest.raises(ConfigError, match="at least 2"):
        gr.adding(4, 1, torch.Generator())


def test_batched_rnn_predictions_and_gradients_equal_each_model_alone() -> None:
    models = [gr.build_model("rnn", s) for s in (0, 1)]
    x = torch.rand(2, 12, 8, 2)
    predictions = gr.predict_all(models, x)
    predictions.square().sum().backward()  # type: ignore[no-untyped-call]
    fast = [[p.grad.clone() for p in m.parameters() if p.grad is not None] for m in models]
    for i, model in enumerate(models):
        model.zero_grad()
        alone = model(x[i])
        torch.testing.assert_close(predictions[i], alone)
        alone.square().sum().backward()  # type: ignore[no-untyped-call]
        for got, param in zip(fast[i], model.parameters(), strict=True):
            torch.testing.assert_close(got, param.grad)
    lstms = [gr.build_model("lstm", s) for s in (0, 1)]
    torch.testing.assert_close(
        gr.predict_all(lstms, x), torch.stack([m(x[i]) for i, m in enumerate(lstms)])
    )


def test_training_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    with single_thread():
        first = gr.train_arm(gr.Arm("gru", 10), (3,), steps=200)
        second = gr.train_arm(gr.Arm("gru", 10), (3,), steps=200)
    assert torch.equal(torch.get_rng_state(), state)
    assert first[0].val_mse == second[0].val_mse
    assert all(
        torch.equal(p, q)
        for p, q in zip(*(r[0].model.parameters() for r in (first, second)), strict=True)
    )


def test_models_are_the_torch_modules_with_default_init() -> None:
    torch.manual_seed(5)
    reference = nn.LSTM(2, gr.HIDDEN)
    state = torch.get_rng_state()
    model = gr.build_model("lstm", 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model.rnn.weight_hh_l0, reference.weight_hh_l0)
    with pytest.raises(ConfigError, match="'transformer'"):
        gr.AddingNet("transformer")
