"""Rollback: bitwise restore, real divergence recovered, a fault campaign, crash-safe disk."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError, GradGuardError
from gradguard.testing import FaultInjector


def digest(tree: Any) -> str:
    """A hash of every tensor and value in a nested structure."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(str((value.dtype, tuple(value.shape))).encode())
            h.update(
                value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                walk(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        else:
            h.update(repr(value).encode())

    walk(tree)
    return h.hexdigest()


def regression(seed: int = 0, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.tanh(x @ torch.randn(8, 1, generator=g))


def tanh_mlp(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["SGD-momentum", "AdamW"],
)
def test_rollback_restores_every_tensor_bitwise_and_the_rng_streams(make_optimizer: Any) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 1))
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    rollback = gg.Rollback(every=10, keep=2, nonfinite_streak=3, cooldown=5)
    guard = gg.Guard(
        model,
        optimizer,
        clip=gg.ZClip(warmup_steps=5),
        scheduler=scheduler,
        scaler=scaler,
        recovery=rollback,
        log_every=10,
    )
    x, y = regression(n=64)

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": (scaler._scale, scaler._growth_tracker),
            # the cool-down's LR factor is the one thing a rollback sets on purpose
            "guard": {k: v for k, v in guard.recovery_state().items() if k != "lr_factor"},
        }

    at_snapshot: dict[str, str] = {}
    for step in range(1, 31):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step in (22, 23, 24):  # a streak of skipped steps triggers the rollback
            model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
        guard.step(loss)
        if step == 20:
            at_snapshot = {k: digest(v) for k, v in state().items()}
            rng_at_snapshot = torch.get_rng_state()
            draws_after_snapshot = torch.rand(5)
    assert [e.kind for e in guard.events if e.kind == "rollback"] == ["rollback"]
    assert guard.step_count == 20
    assert guard.lr_factor == 0.5
    assert {k: digest(v) for k, v in state().items()} == at_snapshot
    assert torch.equal(torch.get_rng_state(), rng_at_snapshot)
    assert torch.equal(torch.rand(5), draws_after_snapshot)
    # The restored state owns its memory: the next snapshot must not write into it.
    buffers = {b.data_ptr() for m in rollback._mirrors for b in m._buffers.values()}
    restored = [p.data_ptr() for p in model.parameters()] + [
        v.data_ptr() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)
    ]
    assert not buffers & set(restored)


def train_with_lr_fault(
    recovery: gg.Rollback | None, fault: bool, steps: int = 1200, seed: int = 0
) -> tuple[float, gg.Guard]:
    model = tanh_mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    guard = gg.Guard(model, optimizer, recovery=recovery, scheduler=scheduler, log_every=10)
    injector = FaultInjector(model, optimizer, at={500: "lr"} if fault else {}, lr_factor=100)
    x, y = regression(seed)
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % x.shape[0]
        with injector.step():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            guard.step(loss)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y)), guard


def test_a_real_divergence_is_recovered_by_rollback() -> None:
    clean, _ = train_with_lr_fault(None, fault=False)
    hurt, _ = train_with_lr_fault(None, fault=True)  # the guard alone cannot undo it
    recovered, guard = train_with_lr_fault(gg.Rollback(every=50, cooldown=100), fault=True)
    assert math.isnan(hurt) or hurt >= 10 * clean, (hurt, clean)
    assert abs(recovered - clean) <= 0.10 * clean, (recovered, clean)
    kinds = [e.kind for e in guard.events]
    assert "spike" in kinds
    assert kinds.count("rollback") == 1
    assert "cooldown" in kinds
    rollback = next(e for e in guard.events if e.kind == "rollback")
    assert rollback.value < 500  # restored to a snapshot before the fault
    cooldown = next(e for e in guard.events if e.kind == "cooldown")
    assert cooldown.step == rollback.value + 100


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def campaign_run(name: str, seed: int, faults: bool, steps: int = 3000) -> tuple[float, int]:
    model = tanh_mlp(seed, width=32)
    optimizer = OPTIMIZERS[name](model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    # A fault every ~50 steps: snapshots at that rate and a cool-down shorter than it.
    rollback = gg.Rollback(every=50, cooldown=10, max_rollbacks=100)
    guard = gg.Guard(
        model, optimizer, clip=gg.ZClip(), recovery=rollback, scheduler=scheduler, log_every=10
    )
    injector = FaultInjector(
        model,
        optimizer,
        probability=0.02 if faults else 0.0,
        kinds=("nan", "inf", "spike", "loss", "lr"),
        seed=seed,
        lr_steps=5,
    )
    x, y = regression(seed)
    tensors = list(model.parameters())
    iteration = 0
    while guard.step_count < steps:  # optimizer steps: a rollback rewinds them
        iteration += 1
        idx = torch.arange(iteration * 32, iteration * 32 + 32) % x.shape[0]
        with injector.step():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            guard.step(loss)
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        assert all(bool(torch.isfinite(t).all()) for t in tensors + state), (name, seed, iteration)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y)), len(injector.log)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fault_campaign_every_run_finishes_finite_and_close_to_clean(name: str) -> None:
    for seed in range(3):
        clean, _ = campaign_run(name, seed, faults=False)
        faulty, injected = campaign_run(name, seed, faults=True)
        assert injected >= 40  # about one fault every 50 steps
        assert abs(faulty - clean) <= 0.10 * clean, (name, seed, faulty, clean)


DISK_WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import gradguard as gg
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rollback = gg.Rollback(every=10, keep=2, storage="disk", path=sys.argv[1])
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    print("ready", flush=True)
    while True:
        rollback.snapshot()
        guard.step_count += 10
    """
)


def test_sigkill_during_a_disk_snapshot_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(DISK_WRITER)
    for delay in (0.8, 1.3, 1.9):
        directory = tmp_path / f"snapshots-{delay}"
        process = subprocess.Popen(
            [sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        finished = sorted(directory.glob("snapshot-*.pt"))
        assert finished, "at least the first snapshot was complete"
        # keep=2; the oldest goes only after the newest is renamed in, so a kill between
        # the two leaves three, always the three newest steps in a row.
        steps = [int(file.stem.split("-")[1]) for file in finished]
        assert len(steps) <= 3
        assert steps == list(range(steps[0], steps[0] + 10 * len(steps), 10))
        newest = torch.load(finished[-1], weights_only=False)
        assert set(newest) == {"model", "optimizer", "scheduler", "scaler", "guard", "rng"}
        assert newest["guard"]["step_count"] == int(finished[-1].stem.split("-")[1])


@pytest.mark.parametrize("keep", [1, 2])
def test_a_disk_snapshot_is_deleted_only_after_its_successor_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    model = tanh_mlp(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rollback = gg.Rollback(every=10, keep=keep, storage="disk", path=tmp_path)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    finished_when_deleting: list[list[str]] = []
    unlink = Path.unlink

    def recording_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.suffix == ".pt":
            finished_when_deleting.append(sorted(f.name for f in tmp_path.glob("*.pt")))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", recording_unlink)
    for step in range(10, 50, 10):
        guard.step_count = step
        rollback.snapshot()
    assert len(finished_when_deleting) == 5 - keep  # the guard's first snapshot is at step 0
    for index, names in enumerate(finished_when_deleting):
        newest = f"snapshot-{10 * (index + keep):09d}.pt"
        assert names[-1] == newest
        assert len(names) == keep + 1
    assert sorted(f.name for f in tmp_path.glob("*.pt"))[0] == f"snapshot-{10 * (5 - keep):09d}.pt"


def test_disk_rollback_restores_and_keeps_only_keep_files(tmp_path: Path) -> None:
    model = tanh_mlp(width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rollback = gg.Rollback(every=10, keep=2, storage="disk", path=tmp_path, nonfinite_streak=2)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    x, y = regression(n=64)
    for step in range(1, 51):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step in (44, 45):
            model[0].weight.grad[0, 0] = math.inf  # type: ignore[index]
        guard.step()
        if step == 40:
            weights = [p.detach().clone() for p in model.parameters()]
    assert guard.step_count == 40
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert len(list(tmp_path.glob("snapshot-*.pt"))) <= 2
    assert not list(tmp_path.glob("*.tmp"))


def _steps(guard: gg.Guard, n: int, bad: bool) -> None:
    x, y = regression(n=32)
    for _ in range(n):
        guard.optimizer.zero_grad()
        nn.functional.mse_loss(guard.model(x), y).backward()
        if bad:
            guard.model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
        guard.step()


@pytest.mark.parametrize("on_exhausted", ["raise", "stop"])
def test_exhausted_rollbacks_raise_or_stop(on_exhausted: Any) -> None:
    model = tanh_mlp(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rollback = gg.Rollback(every=10, nonfinite_streak=2, max_rollbacks=1, on_exhausted=on_exhausted)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    _steps(guard, 20, bad=False)
    _steps(guard, 10, bad=True)  # the first streak: rolled back
    assert rollback.rollbacks == 1
    _steps(guard, 20, bad=False)
    if on_exhausted == "raise":
        with pytest.raises(GradGuardError, match="1 rollbacks used up"):
            _steps(guard, 10, bad=True)
    else:
        _steps(guard, 10, bad=True)
        assert guard.should_stop


def test_in_memory_snapshots_reuse_their_buffers() -> None:
    model = tanh_mlp(width=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rollback = gg.Rollback(every=10, keep=2)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    x, y = regression(n=32)
    sizes = []
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        guard.step()
        sizes.append(rollback.snapshot_nbytes)
    assert rollback.snapshot_steps == [50, 60]
    params = sum(p.numel() * 4 for p in model.parameters())
    rng = torch.get_rng_state().numel()
    assert sizes[-1] == sizes[25]  # buffers allocated once, then reused
    # weights + Adam's two moments + the torch RNG state (+ step counters), in 2 snapshots
    assert 2 * (3 * params + rng) <= sizes[-1] <= 2 * (3 * params + rng) + 512


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be an int >= 1"),
        ({"on": ("typo",)}, "unknown trigger 'typo'"),
        ({"lr_factor": 2.0}, r"lr_factor must lie in \(0, 1\]"),
        ({"storage": "disk"}, "needs path="),
        ({"storage": "cloud"}, "storage must be 'memory' or 'disk'"),
        ({"on_exhausted": "ignore"}, "on_exhausted"),
    ],
)
def test_bad_rollback_arguments_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        gg.Rollback(**kwargs)


def test_rollback_every_must_follow_the_drains() -> None:
    model = tanh_mlp(width=8)
    with pytest.raises(ConfigError, match="multiple of the guard's log_every=10"):
        gg.Guard(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            recovery=gg.Rollback(every=25),
            log_every=10,
        )


def test_a_resumed_run_never_rolls_back_to_before_its_checkpoint() -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, gg.Rollback, gg.Guard]:
        model = tanh_mlp(width=8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        rollback = gg.Rollback(every=100, nonfinite_streak=2)
        return model, optimizer, rollback, gg.Guard(model, optimizer, recovery=rollback)

    model, optimizer, _, guard = build()
    _steps(guard, 40, bad=False)
    saved = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "guard": guard.state_dict(),
    }
    model, optimizer, rollback, guard = build()  # snapshots the fresh model at step 0
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    guard.load_state_dict(saved["guard"])
    assert rollback.snapshot_steps == []  # the step-0 snapshot of the fresh model is gone
    _steps(guard, 10, bad=False)
    assert rollback.snapshot_steps == [50]  # a new one at the next drain
    _steps(guard, 10, bad=False)
    _steps(guard, 10, bad=True)
    assert guard.step_count == 50  # rolled back to the post-resume snapshot, not to step 0
    assert [e.kind for e in guard.events].count("rollback") == 1


def _drain_window(steps: int = 10) -> Any:
    import numpy as np

    from gradguard.records import Window

    ones, no = np.ones(steps), np.zeros(steps, bool)
    return Window(
        steps=np.arange(1, steps + 1),
        loss=ones,
        loss_given=~no,
        grad_norm=ones,
        clipped_norm=ones,
        scale=ones,
        skipped=no,
        finite=~no,
        overflow=no,
        lr=ones,
        per_layer=ones[:, None],
        per_tensor=ones[:, None],
        layer_names=("0",),
        tensor_names=("0.weight",),
    )


@pytest.mark.parametrize(
    ("metric", "severity", "spike_metrics", "triggers"),
    [
        ("loss", "warning", ("loss",), True),
        ("loss", "info", ("loss",), False),  # a passing spike near a low loss
        ("grad_norm", "info", ("loss",), False),
        ("grad_norm", "info", ("loss", "grad_norm"), True),  # opted in: every one
        ("shift", "info", ("loss",), True),  # the loss moved to a new level: undo it
    ],
)
def test_rollback_acts_on_warnings_and_on_gradient_spikes_it_was_asked_for(
    metric: str, severity: str, spike_metrics: tuple[str, ...], triggers: bool
) -> None:
    extra = {"shift": True} if metric == "shift" else {}
    spike = gg.Event(
        step=5,
        kind="spike",
        value=9.0,
        threshold=2.0,
        metric="loss" if metric == "shift" else metric,
        extra=extra,
        severity=severity,  # type: ignore[arg-type]
    )
    rollback = gg.Rollback(spike_metrics=spike_metrics)
    found = rollback._trigger(_drain_window(), [spike])
    assert (found is spike) is triggers


@pytest.mark.parametrize("first_step", [-1, 7, 23])
def test_snapshots_follow_drains_whatever_step_the_run_starts_at(first_step: int) -> None:
    # A trainer numbering from 0 (-1 before the first step) or a run resumed mid-window:
    # snapshots are taken every `every` steps taken, right after the guard's own drains.
    model = tanh_mlp(width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rollback = gg.Rollback(every=10, nonfinite_streak=2)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=5)
    guard.step_count = first_step
    _steps(guard, 30, bad=False)
    assert rollback.snapshot_steps == [first_step + 20, first_step + 30]  # keep=2
    _steps(guard, 5, bad=True)  # a NaN streak from the step after the last snapshot
    assert rollback.rollbacks == 1
    # the snapshot right before the onset may hold the damage: the one before it is used
    assert guard.step_count == first_step + 20
    _steps(guard, 10, bad=False)
    assert rollback.snapshot_steps[-1] == first_step + 30
    guard.close()
