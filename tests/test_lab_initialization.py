"""The initialization experiment: six inits of a 30-layer ReLU MLP, probed and trained."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import LabRuns
from gradguard import lab
from gradguard.errors import ConfigError
from gradguard.lab import initialization as ini
from gradguard.lab._harness import single_thread
from gradguard.lab.data import load_digits
from gradguard.lab.plots import write_plots

CLAIM_IDS = [
    "normal-0.01-vanishes",
    "he-xavier-std-ratio",
    "xavier-stalls",
    "orthogonal-unit-stalls",
    "normal-1-explodes",
    "he-trains",
    "orthogonal-trains",
    "lsuv-trains",
    "lsuv-unit-variance",
    "diagnose-verdicts",
    "shallow-control-trains",
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # As in the experiment: one thread gives the experiment's bits and no oversubscription.
    with single_thread():
        yield


@pytest.fixture(scope="module")
def quick(lab_runs: LabRuns) -> lab.LabResult:
    result: lab.LabResult = lab_runs.quick("initialization")[0]
    return result


@pytest.fixture(scope="module")
def stored(lab_runs: LabRuns, quick: lab.LabResult) -> dict[str, Any]:
    return lab_runs.stored(quick)


def _runs(experiment: dict[str, Any]) -> list[ini.Run]:
    return [ini.Run.from_dict(m) for m in experiment["measurements"]]


# --- the experiment ----------------------------------------------------------------------------


def test_quick_run_reproduces_its_claims(quick: lab.LabResult) -> None:
    (result,) = quick.experiments
    assert result.name == "initialization"
    assert result.seeds == (0,)
    assert [c.id for c in result.claims] == CLAIM_IDS
    assert result.all_passed, [(c.id, c.values) for c in result.claims if not c.passed]


def test_every_network_is_stored_with_its_probe_and_curves(stored: dict[str, Any]) -> None:
    runs = _runs(stored)
    keys = [(r.init, r.depth) for r in runs]
    assert keys == [(i, ini.DEPTH) for i in ini.INITS] + [
        (i, ini.CONTROL_DEPTH) for i in ini.CONTROL_INITS
    ]
    for run in runs:
        assert len(run.hidden_std) == len(run.hidden_mean) == run.depth
        assert len(run.relative_grad) == run.depth + 1
        assert run.relative_grad[-1] == pytest.approx(1.0)
        assert len(run.log_steps) == len(run.loss) == len(run.grad_norm)
        assert (run.log_steps[0], run.log_steps[-1]) == (1, ini.STEPS)
        assert len(run.layer_grad_norms) == len(run.layer_log_steps)
        assert all(len(norms) == run.depth + 1 for norms in run.layer_grad_norms)
    by_init = {r.init: r for r in runs if r.depth == ini.DEPTH}
    assert by_init["normal-1"].first_nonfinite is not None
    assert all(r.first_nonfinite is None for i, r in by_init.items() if i != "normal-1")
    lsuv = by_init["lsuv"]
    assert len(lsuv.lsuv_std) == ini.DEPTH + 1
    assert all(1 <= n <= 10 for n in lsuv.lsuv_iterations)
    assert by_init["he"].lsuv_std == ()


def test_the_figure_is_written_from_the_json_alone(
    quick: lab.LabResult, stored: dict[str, Any], tmp_path: Path
) -> None:
    figure = quick.run_dir / "initialization.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000
    assert [p.name for p in write_plots({"experiments": [stored]}, tmp_path)] == [
        "initialization.png"
    ]


def test_claims_round_trip_and_fail_when_the_measurement_contradicts_them(
    quick: lab.LabResult, stored: dict[str, Any]
) -> None:
    (result,) = quick.experiments
    runs = _runs(stored)  # read back from JSON, NaN losses included
    assert ini.claims(runs, (0,)) == result.claims

    def verdicts(init: str, **changes: Any) -> dict[str, bool]:
        changed = [
            dataclasses.replace(r, **changes) if (r.init, r.depth) == (init, ini.DEPTH) else r
            for r in runs
        ]
        return {c.id: c.passed for c in ini.claims(changed, (0,))}

    assert verdicts("xavier", final_loss=0.5)["xavier-stalls"] is False
    assert verdicts("he", final_loss=1.5)["he-trains"] is False
    assert verdicts("he", final_loss=math.nan)["he-trains"] is False
    assert verdicts("normal-1", first_nonfinite=None)["normal-1-explodes"] is False
    assert verdicts("lsuv", lsuv_std=(1.0, 0.9))["lsuv-unit-variance"] is False
    healthy = verdicts("normal-0.01", verdict="healthy")
    assert healthy.pop("diagnose-verdicts") is False
    assert all(healthy.values())


def test_same_seed_gives_the_same_numbers() -> None:
    setting = ini.Setting(4, 0.01, 12, (("relu", "he"), ("relu", "lsuv")))
    with ini.flush_denormals():
        first = [r.to_dict() for r in ini.run_setting(setting, (3,))]
        second = [r.to_dict() for r in ini.run_setting(setting, (3,))]
    assert first == second


def test_progress_counts_every_probe_and_training_tick() -> None:
    setting = ini.Setting(2, 0.01, 2 * ini.TICK_EVERY, (("relu", "he"), ("relu", "xavier")))
    calls: list[int] = []
    ini.run_setting(setting, (0, 1), lambda: calls.append(torch.get_num_threads()))
    assert len(calls) == ini.progress_units(setting, 2) == 2 * 2 + 2


# --- the machinery -----------------------------------------------------------------------------


def test_stacked_training_equals_training_each_network_alone() -> None:
    """The batched run against the slow reference: nn.Sequential, its own SGD, one by one."""
    steps, lr = 6, 0.02
    configs = [("relu", "he", 0), ("tanh", "xavier", 1), ("relu", "orthogonal", 1)]
    digits = load_digits()
    models = []
    for activation, scheme, seed in configs:
        model = ini.build_mlp(3, activation)
        ini.initialize_mlp(model, scheme, seed, digits.x_train[:256])
        models.append(model)
    traces = ini.train_stacked(
        models, [c[0] for c in configs], [c[2] for c in configs], steps=steps, lr=lr
    )
    for model, (_, _, seed), trace in zip(models, configs, traces, strict=True):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=ini.MOMENTUM)
        batches = ini.data_stream(seed, steps)[1]
        losses = []
        for index in batches:
            loss = nn.functional.cross_entropy(model(digits.x_train[index]), digits.y_train[index])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            losses.append(float(loss.detach()))
            optimizer.step()
        with torch.no_grad():
            final = float(nn.functional.cross_entropy(model(digits.x_train), digits.y_train))
        assert list(trace.loss) == pytest.approx([losses[0], losses[4], losses[5]], rel=1e-4)
        assert trace.final_loss == pytest.approx(final, rel=1e-4)


def test_a_network_that_turns_nan_leaves_the_others_alone() -> None:
    digits = load_digits()
    models = []
    for scheme in ("normal-1", "he"):
        model = ini.build_mlp(30, "relu")
        ini.initialize_mlp(model, scheme, 0, digits.x_train[:256])
        models.append(model)
    both = ini.train_stacked(models, ["relu"] * 2, [0, 0], steps=10, lr=ini.LR)
    alone = ini.train_stacked(models[1:], ["relu"], [0], steps=10, lr=ini.LR)
    assert both[0].first_nonfinite is not None
    assert both[1].first_nonfinite is None
    assert both[1].loss == pytest.approx(alone[0].loss, rel=1e-5)


@pytest.mark.parametrize(
    ("scheme", "hidden_std"),
    [
        ("normal-0.01", 0.01),
        ("normal-1", 1.0),
        ("xavier", math.sqrt(1 / 64)),
        ("he", math.sqrt(2 / 64)),
        ("orthogonal", math.sqrt(2 / 64)),
        ("orthogonal-unit", math.sqrt(1 / 64)),
    ],
)
def test_schemes_give_the_published_weight_scale_and_leave_the_global_rng(
    scheme: str, hidden_std: float
) -> None:
    state = torch.get_rng_state()
    model = ini.build_mlp(30, "relu")
    ini.initialize_mlp(model, scheme, 5, torch.zeros(1))
    assert torch.equal(torch.get_rng_state(), state)
    hidden = torch.cat([layer.weight.detach().flatten() for layer in ini.linears(model)[1:-1]])
    assert float(hidden.std()) == pytest.approx(hidden_std, rel=0.02)
    assert all(not layer.bias.any() for layer in ini.linears(model))
    if scheme.startswith("orthogonal"):
        w = ini.linears(model)[3].weight.detach()
        gain = hidden_std * 8
        torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(64), atol=1e-5, rtol=0)
    again = ini.build_mlp(30, "relu")
    ini.initialize_mlp(again, scheme, 5, torch.zeros(1))
    assert all(
        torch.equal(a.weight, b.weight)
        for a, b in zip(ini.linears(model), ini.linears(again), strict=True)
    )


def test_lsuv_gives_every_linear_output_unit_variance() -> None:
    x = load_digits().x_train[:256]
    model = ini.build_mlp(30, "relu")
    records = ini.initialize_mlp(model, "lsuv", 0, x)
    assert len(records) == 31
    h = x
    with torch.no_grad():
        for module in model:
            h = module(h)
            if isinstance(module, nn.Linear):
                assert float(h.var()) == pytest.approx(1.0, abs=0.1)


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'kaiming'.*normal-0.01"):
        ini.initialize_mlp(ini.build_mlp(2, "relu"), "kaiming", 0, torch.zeros(1))


def test_flush_denormals_is_switched_off_again() -> None:
    tiny = torch.tensor([1e-40])
    with ini.flush_denormals():
        assert float(tiny * 1) == 0.0
    assert float(tiny * 1) > 0.0
