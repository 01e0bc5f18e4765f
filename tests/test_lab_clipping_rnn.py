"""The clipping-rnn experiment: the task, the batched recurrence, the claims and the figure."""

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
from gradguard.lab import clipping_rnn as cr
from gradguard.lab._harness import single_thread
from gradguard.lab.plots import write_plots


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> lab.LabResult:
    result: lab.LabResult = lab_runs.quick("clipping-rnn")[0]
    return result


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: lab.LabResult) -> dict[str, Any]:
    return lab_runs.stored(quick)


# --- the experiment --------------------------------------------------------------------------


def test_quick_run_reproduces_its_claims(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == [
        "norm-clip-widens-lr-range",
        "norm-clip-does-not-hurt",
        "autoclip-widens-lr-range",
    ]
    assert result.all_passed, [(c.id, c.values, c.note) for c in result.claims if not c.passed]


def test_every_run_is_recorded_with_its_traces(stored: dict[str, Any]) -> None:
    records = [cr.RunRecord.from_dict(m) for m in stored["measurements"]]
    (population,) = cr.QUICK_PLAN
    assert {(r.method, r.lr) for r in records} == {
        (m, lr) for m in population.methods for lr in population.lrs
    }
    for r in records:
        assert 0 < r.steps <= cr.STEPS
        assert len(r.trace_steps) == len(r.trace_max_norm) == len(r.trace_loss)
        assert r.trace_steps[-1] == r.steps
        assert r.solved == (r.solved_step is not None)
        if r.solved:
            assert r.accuracy >= cr.SOLVED_ACCURACY
        if r.method == "none":
            assert r.clip_fraction == 0.0
    # A solved run stops at a held-out check (or at the end).
    assert all(r.steps % cr.CHECK_EVERY == 0 for r in records if r.solved)


def test_claims_round_trip_and_fail_when_contradicted(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    records = [cr.RunRecord.from_dict(m) for m in stored["measurements"]]
    assert cr.claims(records, (0,)) == result.claims
    assert cr.tables(records, (0,)) == result.tables

    # If plain SGD solved everywhere, clipping would widen nothing.
    everywhere = [
        dataclasses.replace(r, solved=True, solved_step=100) if r.method == "none" else r
        for r in records
    ]
    verdicts = {c.id: c.passed for c in cr.claims(everywhere, (0,))}
    assert verdicts["norm-clip-widens-lr-range"] is False
    assert verdicts["autoclip-widens-lr-range"] is False
    # If clipping failed where plain SGD works, it would hurt.
    hurt = [dataclasses.replace(r, solved=r.method != "norm", solved_step=100) for r in records]
    assert {c.id: c.passed for c in cr.claims(hurt, (0,))}["norm-clip-does-not-hurt"] is False


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "clipping-rnn.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "clipping-rnn.png"
    ]


def test_three_seeds_judge_every_policy_and_ask_more_of_norm_clipping(
    stored: dict[str, Any],
) -> None:
    one = [cr.RunRecord.from_dict(m) for m in stored["measurements"]]
    three = [dataclasses.replace(r, seed=s) for r in one for s in (0, 1, 2)]
    judged = {c.id: c for c in cr.claims(three, (0, 1, 2))}
    assert list(judged) == [
        "norm-clip-widens-lr-range",
        "norm-clip-does-not-hurt",
        "value-clip-widens-lr-range",
        "autoclip-widens-lr-range",
        "zclip-widens-lr-range",
    ]
    assert judged["norm-clip-widens-lr-range"].criterion.low == 1.5
    assert judged["autoclip-widens-lr-range"].criterion.low == 0.5


def test_training_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    population = cr.Population(20, ("none", "autoclip"), (0.3,))
    state = torch.get_rng_state()
    with single_thread():
        first = cr.train_population(population, (5,), steps=60)
        second = cr.train_population(population, (5,), steps=60)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first, second, strict=True):
        assert a.loss == b.loss
        assert a.grad_norm == b.grad_norm
        assert a.scale == b.scale
    assert first[1].scale[-1] < 1.0  # AutoClip clips
    assert set(first[0].scale) == {1.0}


# --- the task and the model ------------------------------------------------------------------


def test_temporal_order_follows_pascanus_generator() -> None:
    length = 40
    x, y = cr.temporal_order(500, length, torch.Generator().manual_seed(0))
    assert x.shape == (length, 500, 6)
    assert torch.equal(x.sum(-1), torch.ones(length, 500))  # one-hot
    symbols = x.argmax(-1)
    relevant = symbols < 2  # A or B
    assert torch.equal(relevant.sum(0), torch.full((500,), 2))
    first = relevant[:20].float().argmax(0)
    second = 20 + relevant[20:].float().argmax(0)
    assert (int(first.min()), int(first.max())) == (4, 7)  # [L/10, 2L/10)
    assert (int(second.min()), int(second.max())) == (20, 23)  # [5L/10, 6L/10)
    columns = torch.arange(500)
    assert torch.equal(y, symbols[first, columns] + 2 * symbols[second, columns])
    assert set(y.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="at least 10"):
        cr.temporal_order(2, 5, torch.Generator())


def test_model_is_seeded_at_spectral_radius_one_without_touching_the_global_rng() -> None:
    state = torch.get_rng_state()
    model = cr.build_model(3)
    assert torch.equal(torch.get_rng_state(), state)
    radius = torch.linalg.eigvals(model.rnn.weight_hh_l0.detach().double()).abs().max()
    assert float(radius) == pytest.approx(cr.SPECTRAL_RADIUS, rel=1e-5)
    again = cr.build_model(3)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_batched_recurrence_equals_nn_rnn_forward_and_backward() -> None:
    """The fast population path against the slow reference: each model's own nn.RNN."""
    models = [cr.build_model(s) for s in range(3)]
    x = torch.randn(3, 20, 5, 6)
    y = torch.randint(0, 4, (3, 5))
    logits = cr.readout([m.out for m in models], cr.elman_last_state([m.rnn for m in models], x))
    losses = nn.functional.cross_entropy(logits.reshape(-1, 4), y.reshape(-1), reduction="none")
    losses.sum().backward()  # type: ignore[no-untyped-call]
    fast = [[p.grad.clone() for p in m.parameters() if p.grad is not None] for m in models]
    for i, model in enumerate(models):
        model.zero_grad()
        reference = model(x[i])
        torch.testing.assert_close(logits[i], reference)
        nn.functional.cross_entropy(reference, y[i], reduction="sum").backward()  # type: ignore[no-untyped-call]
        for got, param in zip(fast[i], model.parameters(), strict=True):
            torch.testing.assert_close(got, param.grad)


def test_batched_recurrence_passes_gradcheck_in_float64() -> None:
    u = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(2, 4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(cr._ElmanLastState.apply, (u, w))


def test_held_out_accuracy_matches_each_model_alone() -> None:
    models = [cr.build_model(s) for s in (0, 1)]
    x, y = cr.held_out(20)
    batched = cr.accuracies(models, x[:, :200], y[:200])
    for model, accuracy in zip(models, batched, strict=True):
        with torch.no_grad():
            alone = float((model(x[:, :200]).argmax(-1) == y[:200]).float().mean())
        assert accuracy == pytest.approx(alone)
    assert cr.accuracies([], x, y) == []


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'adam'.*none, norm"):
        cr.make_policy("adam")
