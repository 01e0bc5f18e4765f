"""Misuse never costs data: each case ends in a clear error or in correct handling."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from conftest import mlp
from gradguard.errors import ConfigError, GradGuardError
from gradguard.sinks import JsonlSink, TensorBoardSink


def _model(seed: int = 0) -> nn.Sequential:
    return mlp(4, 8, 1, activations=("relu",), seed=seed)


def _backward(model: nn.Module, nan_in: nn.Parameter | None = None) -> torch.Tensor:
    loss = model(torch.randn(6, 4)).square().mean()
    loss.backward()
    if nan_in is not None:
        assert nan_in.grad is not None
        nan_in.grad.fill_(math.nan)
    return loss


def _sgd_guard(model: nn.Module, **kwargs: Any) -> gg.Guard:
    return gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- the guard measures what the optimizer steps -------------------------------------------


def test_an_optimizer_over_another_model_is_refused_naming_the_tensors() -> None:
    model, other = _model(), _model(1)
    with pytest.raises(ConfigError, match=r"steps 4 tensor\(s\) that are not parameters"):
        gg.Guard(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_an_optimizer_over_part_of_the_model_is_accepted() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)  # fine-tuning the head
    guard = gg.Guard(model, optimizer, detectors=None)
    _backward(model)
    guard.step()
    assert guard.step_count == 1


def test_a_param_group_of_another_model_added_later_is_refused_before_the_step() -> None:
    model, other = _model(), _model(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    optimizer.add_param_group({"params": list(other.parameters())})
    _backward(model)
    _backward(other, nan_in=other[0].weight)
    before = _weights(other)
    with pytest.raises(ConfigError, match="not parameters of the model"):
        guard.step()
    assert _unchanged(other, before)  # the NaN never reached the other model's weights
    assert guard.step_count == 0


def test_a_group_added_through_the_wrapped_optimizer_is_checked_too() -> None:
    model, other = _model(), _model(1)
    guard = gg.Guard(model, torch.optim.SGD(model[0].parameters(), lr=0.1), detectors=None)
    wrapped = guard.wrap()
    wrapped.add_param_group({"params": list(model[2].parameters())})  # the model's: fine
    _backward(model)
    wrapped.step()
    wrapped.add_param_group({"params": list(other.parameters())})
    _backward(model)
    with pytest.raises(ConfigError, match="not parameters of the model"):
        wrapped.step()


def test_a_module_added_after_the_guard_is_refused_before_its_nan_reaches_the_weights() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    _backward(model)
    guard.step()
    head = nn.Linear(1, 1)
    model.append(head)
    optimizer.add_param_group({"params": list(head.parameters())})
    optimizer.zero_grad()
    _backward(model, nan_in=head.weight)
    before = _weights(model)
    with pytest.raises(ConfigError, match=r"parameters the guard was not built with: 3\.weight"):
        guard.step()
    assert _unchanged(model, before)


def test_a_module_built_before_the_guard_and_added_after_is_noticed() -> None:
    model = _model()
    head = nn.Linear(1, 1)  # its parameters were registered before the guard existed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    model.add_module("head", head)
    _backward(model)
    with pytest.raises(ConfigError, match="head.weight"):
        guard.step()


def test_a_replaced_parameter_is_noticed() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, optimizer, detectors=None)
    model[0].weight = nn.Parameter(torch.zeros(8, 4))
    _backward(model)
    with pytest.raises(ConfigError) as info:
        guard.step()
    assert "0.weight" in str(info.value)


def test_modules_made_elsewhere_cost_nothing_but_one_check() -> None:
    model = _model()
    guard = _sgd_guard(model, detectors=None)
    _model(3)  # an unrelated model built mid-run (e.g. for evaluation)
    for _ in range(3):
        guard.optimizer.zero_grad()
        _backward(model)
        guard.step()
    assert guard.step_count == 3


def test_the_refusal_is_a_gradguard_error() -> None:
    assert issubclass(ConfigError, GradGuardError)


def test_a_step_without_backward_is_refused_and_not_counted() -> None:
    model = _model()
    guard = _sgd_guard(model, log_every=2)
    with pytest.raises(GradGuardError, match=r"no gradients: was backward\(\) called\?"):
        guard.step()
    assert guard.step_count == 0
    _backward(model)
    guard.step()
    guard.optimizer.zero_grad(set_to_none=True)
    with pytest.raises(GradGuardError, match="step 2: no gradients"):
        guard.step()
    guard.close()
    assert guard.step_count == 1
    assert not any(e.cause == "dead_units" for e in guard.events)


# --- every step mode leaves a true record ---------------------------------------------------


def _rows(run_dir: object) -> list[dict[str, object]]:
    from gradguard.sinks import read_jsonl

    return read_jsonl(f"{run_dir}/metrics.jsonl")


def _logged_guard(model: nn.Module, nonfinite: Any, log_every: int, run_dir: object) -> gg.Guard:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return gg.Guard(
        model, optimizer, nonfinite=nonfinite, log_every=log_every, run_dir=run_dir,
        tensorboard=False,
    )  # fmt: skip


def test_raise_caught_by_the_loop_keeps_the_log_numbered_and_records_the_step(
    tmp_path: object,
) -> None:
    model = _model()
    guard = _logged_guard(model, "raise", 4, tmp_path)
    for step in range(1, 11):
        guard.optimizer.zero_grad()
        _backward(model, nan_in=model[0].bias if step == 3 else None)
        before = _weights(model)
        if step != 3:
            guard.step()
            continue
        with pytest.raises(GradGuardError, match="step 3: non-finite gradients"):
            guard.step()  # the loop catches it and goes on
        assert _unchanged(model, before)  # skipped: nothing stepped
    guard.close()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11)) == list(range(1, guard.step_count + 1))
    assert (rows[2]["skipped"], rows[2]["finite"]) == (True, False)
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert event.step == 3


def test_zero_mode_records_the_step_as_non_finite_and_zeroed_with_an_event(
    tmp_path: object,
) -> None:
    model = _model()
    guard = _logged_guard(model, "zero", 2, tmp_path)
    for step in range(1, 5):
        guard.optimizer.zero_grad()
        _backward(model, nan_in=model[2].weight if step == 2 else None)
        guard.step()
    guard.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = _rows(tmp_path)
    assert (rows[1]["finite"], rows[1]["skipped"], rows[1].get("zeroed")) == (False, False, True)
    assert "zeroed" not in rows[0]
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert (event.step, event.severity, event.layers) == (2, "warning", ("2.weight",))
    assert "zeroed" in event.message


# --- objects that belong to one guard ---------------------------------------------------------


def test_one_rollback_for_two_guards_is_refused() -> None:
    rollback = gg.Rollback(every=10)
    first, second = _model(), _model(1)
    gg.Guard(first, torch.optim.SGD(first.parameters(), lr=0.1), recovery=rollback)
    with pytest.raises(ConfigError, match="Rollback already belongs to another Guard"):
        gg.Guard(second, torch.optim.SGD(second.parameters(), lr=0.1), recovery=rollback)


def test_two_open_guards_on_one_optimizer_are_refused_until_the_first_closes() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gg.Guard(model, optimizer, detectors=None)
    with pytest.raises(ConfigError, match="optimizer .*already belongs to another Guard"):
        gg.Guard(model, optimizer, detectors=None)
    first.close()
    second = gg.Guard(model, optimizer, detectors=None)  # a closed guard lets go
    _backward(model)
    second.step()
    assert second.step_count == 1


@pytest.mark.parametrize("what", ["detector", "sink"])
def test_a_detector_or_sink_shared_by_two_guards_is_refused(what: str, tmp_path: object) -> None:
    from gradguard.detect import Spike

    shared: dict[str, object] = {
        "detector": {"detectors": [Spike()]},
        "sink": {"sinks": [JsonlSink(f"{tmp_path}/run")]},
    }
    kwargs: Any = shared[what]
    first, second = _model(), _model(1)
    owner = gg.Guard(first, torch.optim.SGD(first.parameters(), lr=0.1), **kwargs)
    with pytest.raises(ConfigError, match=f"this {what} .*already belongs to another Guard"):
        gg.Guard(second, torch.optim.SGD(second.parameters(), lr=0.1), **kwargs)
    owner.close()


def test_a_dropped_guard_in_a_reference_cycle_lets_its_optimizer_go() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gg.Guard(model, optimizer, detectors=None, recovery=gg.Rollback(every=10))  # a cycle
    guard = gg.Guard(model, optimizer, detectors=None)  # the loop's new guard
    _backward(model)
    guard.step()
    assert guard.step_count == 1


# --- run directories have an owner ------------------------------------------------------------


def _train(guard: gg.Guard, steps: int) -> None:
    for _ in range(steps):
        guard.optimizer.zero_grad(set_to_none=True)
        _backward(guard.model)
        guard.step()


def _guard_on(run_dir: object, model: nn.Module | None = None, **kwargs: Any) -> gg.Guard:
    model = _model() if model is None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return gg.Guard(model, optimizer, log_every=5, run_dir=run_dir, tensorboard=False, **kwargs)


def test_a_fresh_run_into_another_runs_directory_is_refused_before_anything_changes(
    tmp_path: Path,
) -> None:
    first = _guard_on(tmp_path)
    _train(first, 10)
    first.close()
    log = (tmp_path / "metrics.jsonl").read_bytes()
    meta = (tmp_path / "meta.json").read_bytes()
    second = _guard_on(tmp_path)
    _backward(second.model)
    before = _weights(second.model)
    with pytest.raises(ConfigError) as refused:
        second.step()
    message = str(refused.value)
    assert str(tmp_path) in message
    assert "10 steps" in message
    for option in ("load_state_dict", "overwrite_run_dir=True", "new run_dir"):
        assert option in message
    assert _unchanged(second.model, before)
    assert second.step_count == 0
    second.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == log  # nothing appended
    assert (tmp_path / "meta.json").read_bytes() == meta  # still describes its own rows


def test_overwrite_run_dir_replaces_the_old_logs_and_tensorboard_files(tmp_path: Path) -> None:
    first = _guard_on(tmp_path)
    _train(first, 10)
    first.close()
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.old").write_text("old")
    second = _guard_on(tmp_path, overwrite_run_dir=True)
    _train(second, 5)
    second.close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "tensorboard").exists()


def test_a_resumed_run_goes_on_and_meta_lists_its_sessions(tmp_path: Path) -> None:
    first = _guard_on(tmp_path, clip=gg.NormClip(1.0))
    _train(first, 10)
    saved = first.state_dict()
    first.close()
    second = _guard_on(tmp_path, first.model, clip=gg.NormClip(2.0))
    second.load_state_dict(saved)
    _train(second, 5)
    second.close()
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 16))
    meta = json.loads((tmp_path / "meta.json").read_text())
    sessions = meta["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 10]
    assert sessions[0]["config"]["clip"] == "NormClip(max_norm=1.0, norm_type=2.0)"
    assert meta["config"] == sessions[1]["config"]  # the rows after it were written by it
    assert "2.0" in meta["config"]["clip"]


def test_a_resumed_run_cuts_the_line_a_crash_tore(tmp_path: Path) -> None:
    first = _guard_on(tmp_path)
    _train(first, 10)
    saved = first.state_dict()
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 11, "loss": 0.')  # what a kill during a write leaves
    second = _guard_on(tmp_path, first.model)
    second.load_state_dict(saved)
    _train(second, 5)
    second.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 16))


def test_two_open_guards_on_one_run_directory_are_refused(tmp_path: Path) -> None:
    first = _guard_on(tmp_path)
    with pytest.raises(ConfigError, match=rf"{os.getpid()}.*another run_dir"):
        _guard_on(tmp_path)
    first.close()
    _guard_on(tmp_path).close()  # closing gave the directory back


def test_a_guard_refused_at_construction_lets_its_optimizer_and_detectors_go(
    tmp_path: Path,
) -> None:
    holder = _guard_on(tmp_path)
    model = _model(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spike = gg.detect.Spike()
    with pytest.raises(ConfigError, match="being written by another open Guard"):
        gg.Guard(model, optimizer, detectors=[spike], run_dir=tmp_path)
    guard = gg.Guard(model, optimizer, detectors=[spike], run_dir=tmp_path / "other")
    _train(guard, 1)
    guard.close()
    holder.close()


_HOLD_LOCK = """
import sys, time, torch, gradguard as gg
model = torch.nn.Linear(2, 1)
guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=sys.argv[1],
                 tensorboard=False)
print("ready", flush=True)
time.sleep(60)
"""


def test_another_process_writing_the_directory_is_named_and_its_death_frees_it(
    tmp_path: Path,
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            with pytest.raises(ConfigError, match=rf"pid {child.pid} on "):
                _guard_on(tmp_path, nn.Linear(2, 1))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    _guard_on(tmp_path, nn.Linear(2, 1)).close()  # a killed holder leaves no stuck lock


def test_a_damaged_meta_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text('{"layer_names": [')
    with pytest.raises(ConfigError, match=r"meta\.json cannot be read.*overwrite_run_dir"):
        _guard_on(tmp_path)
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a run description"):
        _guard_on(tmp_path)
    guard = _guard_on(tmp_path, overwrite_run_dir=True)
    _train(guard, 5)
    guard.close()
    assert json.loads((tmp_path / "meta.json").read_text())["layer_names"] == ["0", "2"]


def test_a_run_dir_that_is_a_file_is_refused_without_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be created or written"):
        _guard_on(tmp_path / "file" / "run")


def test_a_temporary_file_a_crash_left_is_removed_at_the_next_start(tmp_path: Path) -> None:
    (tmp_path / "meta.json.tmp").write_text('{"half')
    guard = _guard_on(tmp_path)
    _train(guard, 5)
    guard.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", "events.jsonl", "layers.jsonl", "meta.json", "metrics.jsonl",
    ]  # fmt: skip


def test_a_guard_closed_without_steps_leaves_the_directory_untouched(tmp_path: Path) -> None:
    first = _guard_on(tmp_path)
    _train(first, 5)
    first.close()
    rows = (tmp_path / "metrics.jsonl").read_bytes()
    _guard_on(tmp_path).close()  # built and closed: no step, so nothing to refuse or write
    assert (tmp_path / "metrics.jsonl").read_bytes() == rows


def test_a_jsonl_sink_used_alone_still_refuses_appending_a_fresh_run(tmp_path: Path) -> None:
    first = _guard_on(tmp_path)
    _train(first, 5)
    first.close()
    sink = JsonlSink(tmp_path)
    model = _model()
    guard = _sgd_guard(model, sinks=[sink])
    _backward(model)
    with pytest.raises(ConfigError, match="already holds the logs"):
        guard.step()
    guard.close()


# --- steps that would apply an update twice ------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_second_step_on_the_same_gradients_is_refused(set_to_none: bool) -> None:
    model = _model()
    guard = _sgd_guard(model, clip=gg.NormClip(1.0))
    _backward(model)
    guard.step()
    after_one = _weights(model)
    with pytest.raises(GradGuardError, match="step 2: these are the gradients step 1 already"):
        guard.step()
    assert _unchanged(model, after_one)
    assert guard.step_count == 1
    guard.optimizer.zero_grad(set_to_none=set_to_none)
    _backward(model)
    guard.step()  # a new backward, in place or into new tensors: a new step
    assert guard.step_count == 2


def test_a_step_on_a_closed_guard_is_refused() -> None:
    model = _model()
    guard = _sgd_guard(model)
    guard.close()
    _backward(model)
    with pytest.raises(GradGuardError, match="closed"):
        guard.step()


# --- constructors and load_state_dict validate their input ---------------------------------


def _bad_guard_args(model: nn.Module) -> dict[str, tuple[dict[str, Any], str]]:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(_model(1).parameters(), lr=0.1)
    return {
        "lbfgs": ({"optimizer": torch.optim.LBFGS(model.parameters())}, "needs a closure"),
        "plateau": (
            {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(sgd)},
            r"scheduler\.step\(val_loss\)",
        ),
        "scheduler of another optimizer": (
            {"scheduler": torch.optim.lr_scheduler.StepLR(other, 1)},
            "built for another optimizer",
        ),
        "scheduler not a scheduler": ({"scheduler": object()}, "must be a torch.optim"),
        "log_every 0": ({"log_every": 0}, r"log_every must be an int in \[1, 10000\]"),
        "log_every huge": ({"log_every": 10**6}, "that many steps of statistics"),
        "log_every bool": ({"log_every": True}, "log_every must be an int"),
        "log_every float": ({"log_every": 2.5}, "log_every must be an int"),
        "nonfinite": ({"nonfinite": "ignore"}, "'skip', 'raise' or 'zero'"),
        "clip a number": ({"clip": 1.0}, r"gg\.NormClip\(1\.0\)"),
        "detectors a string": ({"detectors": "all"}, "'default', a list or None"),
        "detectors not detectors": ({"detectors": [len]}, "detector objects"),
        "recovery": ({"recovery": "rollback"}, r"gg\.Rollback\(\)"),
        "on_event": ({"on_event": 3}, "callable"),
        "model": ({"model": "net"}, "nn.Module"),
        "optimizer": ({"optimizer": "adam"}, "torch.optim.Optimizer"),
        "tensorboard without run_dir": ({"tensorboard": True}, "pass run_dir"),
        "overwrite not a bool": ({"overwrite_run_dir": "yes"}, "True or False"),
        "run_dir not a path": ({"run_dir": 42}, "run_dir must be a path"),
    }


@pytest.mark.parametrize("case", list(_bad_guard_args(nn.Linear(1, 1))))
def test_bad_guard_arguments_are_refused_naming_the_argument_and_the_fix(case: str) -> None:
    model = _model()
    kwargs, message = _bad_guard_args(model)[case]
    arguments: dict[str, Any] = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        **kwargs,
    }
    with pytest.raises(ConfigError, match=message):
        gg.Guard(arguments.pop("model"), arguments.pop("optimizer"), **arguments)


def test_a_guarded_optimizer_given_as_the_optimizer_is_refused() -> None:
    model = _model()
    guard = _sgd_guard(model)
    with pytest.raises(ConfigError, match="not a guarded one"):
        gg.Guard(model, guard.wrap())


def test_parameters_on_the_meta_device_are_refused_with_the_fix() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match=r"'meta' device.*to_empty"):
        _sgd_guard(model)


def test_complex_parameters_are_refused_naming_the_parameter() -> None:
    model = nn.Linear(3, 2, dtype=torch.complex64)
    with pytest.raises(ConfigError, match=r"parameter weight is complex.*view_as_real"):
        _sgd_guard(model)


def _saved_state(**kwargs: Any) -> tuple[gg.Guard, dict[str, Any]]:
    model = _model()
    guard = _sgd_guard(model, **kwargs)
    _train(guard, 3)
    return guard, guard.state_dict()


def _wrong_states() -> dict[str, tuple[Any, Any, str]]:
    """(guard builder arguments, state, expected message) per wrong state."""
    return {
        "another model": (
            lambda: gg.Guard(
                wide := nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)),
                torch.optim.SGD(wide.parameters(), lr=0.1),
            ),
            lambda: _saved_state()[1],
            "another model",
        ),
        "the model's state dict": (
            lambda: _saved_state()[0],
            lambda: _model().state_dict(),
            r"not a saved guard state \(missing",
        ),
        "not a mapping": (lambda: _saved_state()[0], lambda: [1, 2], "got list"),
        "other detectors": (
            lambda: _saved_state(detectors=[gg.detect.Spike(), gg.detect.NonFinite()])[0],
            lambda: _saved_state(detectors=[gg.detect.NonFinite(), gg.detect.Spike()])[1],
            "same detectors, in the same order",
        ),
        "other clip policy": (
            lambda: _saved_state(clip=gg.ZClip())[0],
            lambda: _saved_state(clip=gg.NormClip(1.0))[1],
            "clipped with NormClip",
        ),
        "clip policy missing": (
            lambda: _saved_state()[0],
            lambda: _saved_state(clip=gg.NormClip(1.0))[1],
            "differ in having a clip policy",
        ),
    }


@pytest.mark.parametrize("case", list(_wrong_states()))
def test_a_wrong_state_dict_is_refused_and_leaves_the_guard_as_it_was(case: str) -> None:
    build, state, message = _wrong_states()[case]
    guard = build()
    before = (guard.step_count, list(guard.events), [d.state_dict() for d in guard.detectors])
    with pytest.raises(ConfigError, match=message):
        guard.load_state_dict(state())
    after = (guard.step_count, list(guard.events), [d.state_dict() for d in guard.detectors])
    assert repr(after) == repr(before)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: gg.NormClip(-1.0), "max_norm must be a positive number"),
        (lambda: gg.NormClip(math.nan), "max_norm must be a positive number"),
        (lambda: gg.NormClip(1.0, norm_type=0), "norm_type must be a positive number"),
        (lambda: gg.ValueClip(0), "clip_value must be a positive number"),
        (lambda: gg.AGC(-1), "clipping must be a positive number"),
        (lambda: gg.ZClip(alpha=2), "alpha must lie strictly between"),
        (lambda: gg.detect.Spike(window=0), "window must be an int >= 2"),
        (lambda: gg.detect.Divergence(patience=0), "patience must be an int >= 1"),
        (lambda: gg.detect.Vanishing(min_update=-1), "min_update must be a number"),
        (lambda: gg.Rollback(every=0), "every must be an int >= 1"),
        (lambda: gg.Rollback(lr_factor=2), r"lr_factor must lie in \(0, 1\]"),
        (lambda: gg.Rollback(on=["nan"]), "unknown trigger 'nan'"),
        (lambda: gg.Rollback(storage="disk"), "needs path="),
        (lambda: TensorBoardSink("tb", flush_secs=-1), "flush_secs must be a positive"),
        (lambda: JsonlSink("run", overwrite=1), "overwrite must be True or False"),
        (lambda: JsonlSink(42), "run_dir must be a path"),
        (lambda: gg.Rollback(spike_metrics=["los"]), "spike_metrics must be a list of"),
        (lambda: gg.Rollback(spike_metrics="loss"), "spike_metrics must be a list of"),
    ],
)
def test_bad_constructor_arguments_are_refused_naming_the_argument(
    build: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_a_rollback_whose_cadence_misses_the_drains_is_refused() -> None:
    model = _model()
    with pytest.raises(ConfigError, match="must be a multiple of the guard's log_every=10"):
        gg.Guard(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            recovery=gg.Rollback(every=15),
            log_every=10,
        )


# --- the command line: one line, a documented exit code, never a traceback --------------------


def _finished_run(run_dir: Path) -> Path:
    guard = _guard_on(run_dir)
    _train(guard, 10)
    guard.close()
    return run_dir


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    (tmp / "not-a-run").mkdir()
    (tmp / "file.txt").write_text("x")
    bad_meta = _finished_run(tmp / "bad-meta")
    (bad_meta / "meta.json").write_text("{oops")
    torn = _finished_run(tmp / "torn")
    with (torn / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 11, "lo')
    return {
        "report of a missing directory": (["report", str(tmp / "nope")], 2, "nope"),
        "report of a file": (["report", str(tmp / "file.txt")], 2, "file.txt"),
        "report of an empty directory": (
            ["report", str(tmp / "not-a-run")],
            2,
            "not a run directory",
        ),
        "report of a run with a damaged meta.json": (["report", str(bad_meta)], 0, "report"),
        "report of a run with a torn metrics line": (["report", str(torn)], 0, "report"),
        "diagnose of a target that does not exist": (
            ["diagnose", "no_such_module:build", "--input-shape", "4,3"],
            2,
            "no_such_module",
        ),
        "diagnose with a malformed shape": (
            ["diagnose", "torch.nn:Identity", "--input-shape", "4,x"],
            2,
            "input-shape",
        ),
        "lab with an unknown experiment": (["lab", "--only", "no-such-lab"], 2, "no-such-lab"),
        "lab with a negative seed": (["lab", "--seed", "-1"], 2, "seed"),
        "an unknown command": (["train"], 2, "train"),
    }


CLI_CASES = (
    "report of a missing directory",
    "report of a file",
    "report of an empty directory",
    "report of a run with a damaged meta.json",
    "report of a run with a torn metrics line",
    "diagnose of a target that does not exist",
    "diagnose with a malformed shape",
    "lab with an unknown experiment",
    "lab with a negative seed",
    "an unknown command",
)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_misuse_ends_with_one_line_and_a_documented_exit_code(
    case: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from gradguard.cli import EXIT_CODE_MEANINGS, app

    args, code, named = _cli_cases(tmp_path)[case]
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code == code, output
    assert code in EXIT_CODE_MEANINGS
    assert "Traceback" not in output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert named in output


# --- statistics know their source; numbers beyond fp32 ------------------------------------------


def test_clip_refuses_statistics_of_another_model() -> None:
    model, other = _model(), _model(1)
    _backward(model)
    _backward(other)
    stats = gg.grad_stats(other)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(ConfigError):
        gg.clip_(model, gg.NormClip(0.01), stats)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("set_to_none", [True, False])
def test_clip_refuses_statistics_of_gradients_since_replaced(set_to_none: bool) -> None:
    model = _model()
    _backward(model)
    stale = gg.grad_stats(model)
    model.zero_grad(set_to_none=set_to_none)
    _backward(model)
    fresh = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(ConfigError):
        gg.clip_(model, gg.NormClip(0.01), stale)
    assert all(torch.equal(p.grad, fresh[n]) for n, p in model.named_parameters())
    gg.clip_(model, gg.NormClip(0.01), gg.grad_stats(model))  # measured anew: clipped
    reference = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(reference) == pytest.approx(0.01, rel=1e-5)


def test_fp64_gradients_beyond_fp32_are_clipped_by_the_guard_as_torch_clips_them() -> None:
    model = _model().double()
    twin = _model().double()
    twin.load_state_dict(model.state_dict())
    for net in (model, twin):
        net(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        for p in net.parameters():
            p.grad = torch.full_like(p, 1e40)  # the norm overflows fp32, not fp64
    guard = _sgd_guard(model, clip=gg.NormClip(1.0))
    report = guard.step()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    assert not bool(report.skipped)
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert float(report.clipped_norm) == pytest.approx(1.0, rel=1e-6)
