"""Snapshot faults: torn, foreign or missing files, failing writes, and SIGKILL mid-write.

Every fault here is one a long run meets sooner or later. None may crash ``guard.step``
with a raw exception or lose the snapshots still good: a rollback falls back to the next
older usable snapshot and says which it skipped and why, a failed write is a
``snapshot_failed`` event and the next snapshot tries again, and after a crash the newest
finished snapshot loads whole.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError, GradGuardError
from gradguard.recover import PAYLOAD_KEYS, load_latest_snapshot

ROOT = os.geteuid() == 0  # root ignores file modes: permission faults are simulated there


def tiny_model(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))


@dataclass
class Run:
    """A guard with a disk Rollback, and the state seen right after each snapshot step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    rollback: gg.Rollback
    guard: gg.Guard
    path: Path
    weights: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    moments: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def steps(self, n: int, bad: bool = False) -> None:
        """``n`` training steps; ``bad`` puts a NaN in a gradient (a skipped step)."""
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x.sum(1, keepdim=True))
        for _ in range(n):
            self.optimizer.zero_grad()
            nn.functional.mse_loss(self.model(x), y).backward()
            if bad:
                self.model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
            self.guard.step()
            step = self.guard.step_count
            if step % 10 == 0 and step not in self.weights:  # first time only: not a replay
                self.weights[step] = [p.detach().clone() for p in self.model.parameters()]
                self.moments[step] = optimizer_tensors(self.optimizer)

    def file(self, step: int) -> Path:
        return self.path / f"snapshot-{step:09d}.pt"

    def events(self, kind: str) -> list[gg.Event]:
        return [e for e in self.guard.events if e.kind == kind]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        v.detach().clone()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    ]


def build(path: Path, keep: int = 3, **kwargs: Any) -> Run:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=15, gamma=0.5)
    rollback = gg.Rollback(
        every=10,
        keep=keep,
        storage="disk",
        path=path,
        nonfinite_streak=2,
        cooldown=5,
        **kwargs,
    )
    guard = gg.Guard(model, optimizer, scheduler=scheduler, recovery=rollback, log_every=10)
    return Run(model, optimizer, rollback, guard, path)


def assert_state(run: Run, step: int) -> None:
    """Weights and optimizer state are exactly those right after ``step``, and finite."""
    assert run.guard.step_count == step
    params = list(run.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, run.weights[step], strict=True))
    moments = optimizer_tensors(run.optimizer)
    assert len(moments) == len(run.moments[step])
    assert all(torch.equal(a, b) for a, b in zip(moments, run.moments[step], strict=True))
    assert all(bool(torch.isfinite(t).all()) for t in params + moments)


def no_temporary_files(path: Path) -> bool:
    return not [p for p in path.iterdir() if p.name.endswith(".tmp")]


# --- unusable snapshots: the rollback falls back to the next older one ----------------------

Fault = Callable[[Path, pytest.MonkeyPatch], None]


def truncate(file: Path, _: pytest.MonkeyPatch) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def garbage(file: Path, _: pytest.MonkeyPatch) -> None:
    size = file.stat().st_size
    file.write_bytes(random.Random(0).randbytes(size))


def empty(file: Path, _: pytest.MonkeyPatch) -> None:
    file.write_bytes(b"")


def deny_reading(file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file.chmod(0)
    if ROOT:  # the mode is not enforced for root: fail the open the way the OS would
        real = torch.load

        def load(f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(f, str | os.PathLike) and Path(f) == file:
                raise PermissionError(errno.EACCES, "Permission denied", str(f))
            return real(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", load)


def delete(file: Path, _: pytest.MonkeyPatch) -> None:
    file.unlink()


def not_a_dict(file: Path, _: pytest.MonkeyPatch) -> None:
    torch.save([1, 2, 3], file)


def incomplete(file: Path, _: pytest.MonkeyPatch) -> None:
    payload = torch.load(file, weights_only=False)
    del payload["optimizer"], payload["rng"]
    torch.save(payload, file)


def rewrite(file: Path, change: Callable[[dict[str, Any]], None]) -> None:
    payload = torch.load(file, weights_only=False)
    change(payload)
    torch.save(payload, file)


def foreign_model(file: Path, _: pytest.MonkeyPatch) -> None:
    """A snapshot of another model: same layer names, other widths."""
    rewrite(file, lambda p: p.update(model=tiny_model(width=32).state_dict()))


def half_matching_model(file: Path, _: pytest.MonkeyPatch) -> None:
    """The first layer fits (with other values), the last does not: a partial load's trap."""

    def change(payload: dict[str, Any]) -> None:
        model = payload["model"]
        model["0.weight"] = torch.full_like(model["0.weight"], 7.0)
        model["2.weight"] = torch.zeros(1, 99)

    rewrite(file, change)


def missing_keys(file: Path, _: pytest.MonkeyPatch) -> None:
    rewrite(file, lambda p: p["model"].pop("2.bias"))


def foreign_optimizer_state(file: Path, _: pytest.MonkeyPatch) -> None:
    """Adam's moments of the wrong shape: optimizer.load_state_dict would accept them."""

    def change(payload: dict[str, Any]) -> None:
        state = payload["optimizer"]["state"][0]
        state["exp_avg"] = torch.zeros(3, 3)

    rewrite(file, change)


def broken_guard_state(file: Path, _: pytest.MonkeyPatch) -> None:
    """Checks pass, applying fails half-way (the guard's state lacks its detectors)."""
    rewrite(file, lambda p: p["guard"].pop("detectors"))


UNUSABLE: dict[str, tuple[Fault, str]] = {
    "truncated": (truncate, ""),  # torch's zip reader: OSError or RuntimeError, by where
    "garbage bytes": (garbage, ""),
    "zero-length": (empty, "EOFError"),
    "permission denied": (deny_reading, "PermissionError"),
    "deleted": (delete, "FileNotFoundError"),
    "not a dict": (not_a_dict, "holds a list"),
    "incomplete": (incomplete, "optimizer, rng missing"),
    "foreign model": (foreign_model, "does not match the model"),
    "half-matching model": (half_matching_model, "'2.weight' holds shape [1, 99]"),
    "missing keys": (missing_keys, "missing '2.bias'"),
    "foreign optimizer state": (foreign_optimizer_state, "'exp_avg' of parameter 0"),
    "broken guard state": (broken_guard_state, "could not be applied: KeyError"),
}


@pytest.fixture
def restore_modes(tmp_path: Path) -> Iterator[None]:
    """Give every file back its permissions, so that tmp_path can be cleaned up."""
    yield
    for entry in tmp_path.rglob("*"):
        if not entry.is_symlink():  # never through a link: /dev/full is not ours
            entry.chmod(0o700 if entry.is_dir() else 0o600)


@pytest.mark.usefixtures("restore_modes")
@pytest.mark.parametrize("fault", UNUSABLE, ids=list(UNUSABLE))
def test_an_unusable_snapshot_falls_back_to_the_next_older_one(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build(tmp_path)
    run.steps(33)
    assert run.rollback.snapshot_steps == [10, 20, 30]
    damage, reason = UNUSABLE[fault]
    bad = run.file(30)
    damage(bad, monkeypatch)
    run.steps(7, bad=True)  # a streak of skipped steps from 34: rolls back at the drain of 40
    assert_state(run, 20)  # the snapshot of step 30 is skipped, that of step 20 restored
    (rollback,) = run.events("rollback")
    assert rollback.value == 20
    assert rollback.severity == "warning"
    (skipped,) = rollback.extra["unreadable"]
    assert skipped["file"] == str(bad)
    assert skipped["step"] == 30
    assert skipped["error"]
    assert reason in skipped["error"]
    assert f"{bad.name} ({skipped['error']})" in rollback.message
    assert run.rollback.snapshot_steps == [10, 20]  # the bad one is not tried again
    run.steps(15)  # training goes on, and the next snapshots are taken as usual
    assert run.rollback.snapshot_steps == [10, 20, 30]
    monkeypatch.undo()  # the file is readable again, whatever the fault did
    assert torch.load(bad, weights_only=False)["guard"]["step_count"] == 30  # replaced


def apply_everywhere(run: Run, damage: Fault, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    files = [run.file(step) for step in run.rollback.snapshot_steps]
    for file in files:
        damage(file, monkeypatch)
    return files


@pytest.mark.parametrize("fault", ["half-matching model", "broken guard state", "deleted"])
def test_with_no_usable_snapshot_left_it_raises_naming_each_and_leaves_the_model_alone(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build(tmp_path)
    run.steps(33)
    before = [p.detach().clone() for p in run.model.parameters()]
    moments = optimizer_tensors(run.optimizer)
    files = apply_everywhere(run, UNUSABLE[fault][0], monkeypatch)
    with pytest.raises(GradGuardError, match="no snapshot could be restored") as raised:
        run.steps(7, bad=True)  # steps 34-40 are skipped: the weights stay those of step 33
    for file in files:
        assert file.name in str(raised.value)
    assert run.guard.step_count == 40  # nothing was applied, not even the guard's state
    params = list(run.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(optimizer_tensors(run.optimizer), moments, strict=True)
    )


def test_with_no_usable_snapshot_left_on_exhausted_stop_asks_the_loop_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build(tmp_path, on_exhausted="stop")
    run.steps(33)
    before = [p.detach().clone() for p in run.model.parameters()]
    files = apply_everywhere(run, half_matching_model, monkeypatch)
    run.steps(7, bad=True)
    assert run.guard.should_stop
    (rollback,) = run.events("rollback")
    assert rollback.severity == "error"
    assert math.isnan(rollback.value)
    assert [u["file"] for u in rollback.extra["unreadable"]] == [str(f) for f in files[::-1]]
    for file in files:
        assert file.name in rollback.message
    params = list(run.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


def test_a_snapshot_directory_deleted_before_a_rollback_is_reported_not_a_crash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshots"
    run = build(path, on_exhausted="stop")
    run.steps(33)
    shutil.rmtree(path)
    run.steps(7, bad=True)
    (rollback,) = run.events("rollback")
    assert rollback.severity == "error"
    assert run.guard.should_stop
    assert all("FileNotFoundError" in u["error"] for u in rollback.extra["unreadable"])
    assert all(p.isfinite().all() for p in run.model.parameters())


# --- failed writes: an event, the older snapshots kept, the next snapshot tries again ---------


def read_only_directory(path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    path.chmod(0o500)
    real = torch.save
    if ROOT:  # the mode is not enforced for root: fail the write the way the OS would

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(f, str | os.PathLike) and Path(f).parent == path:
                # what torch's C++ writer raises when it cannot open the file
                raise RuntimeError(f"File {f} cannot be opened.")
            real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)

    def lift() -> None:
        path.chmod(0o700)
        monkeypatch.setattr(torch, "save", real)

    return lift


def directory_replaced_by_a_file(path: Path, _: pytest.MonkeyPatch) -> Callable[[], None]:
    """The directory is moved away (an unmounted volume) and a file takes its name."""
    away = path.with_name("moved-away")
    path.rename(away)
    path.write_text("not a directory")

    def lift() -> None:
        path.unlink()
        away.rename(path)

    return lift


def disk_full(path: Path, _: pytest.MonkeyPatch) -> Callable[[], None]:
    """The next temporary file is /dev/full: every write to it fails with ENOSPC."""
    (path / "snapshot-000000020.pt.tmp").symlink_to("/dev/full")
    return lambda: None


def failing_call(name: str, code: int) -> Callable[[Path, pytest.MonkeyPatch], Callable[[], None]]:
    def fault(_: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
        real = getattr(os, name)

        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, name, fail)
        return lambda: monkeypatch.setattr(os, name, real)

    return fault


def directory_deleted(path: Path, _: pytest.MonkeyPatch) -> Callable[[], None]:
    shutil.rmtree(path)
    return lambda: None


WRITE_FAULTS: dict[str, tuple[Callable[..., Callable[[], None]], str]] = {
    "read-only directory": (read_only_directory, "RuntimeError"),
    "directory replaced by a file": (directory_replaced_by_a_file, "FileExistsError"),
    "disk full": (disk_full, "RuntimeError"),
    "fsync fails": (failing_call("fsync", errno.EIO), "OSError: [Errno 5]"),
    "rename fails": (failing_call("replace", errno.ENOSPC), "OSError: [Errno 28]"),
}


@pytest.mark.usefixtures("restore_modes")
@pytest.mark.parametrize("fault", WRITE_FAULTS, ids=list(WRITE_FAULTS))
def test_a_failed_snapshot_write_is_an_event_and_the_next_one_tries_again(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "snapshots"
    run = build(path, keep=2)
    run.steps(19)
    make, reason = WRITE_FAULTS[fault]
    lift = make(path, monkeypatch)
    run.steps(1)  # the snapshot of step 20 fails: no exception
    lift()
    assert run.rollback.snapshot_steps == [0, 10]  # the older ones are kept
    assert no_temporary_files(path)
    run.steps(3)
    run.steps(7, bad=True)  # a streak from step 24: rolls back at the drain of 30
    (failed,) = run.events("snapshot_failed")
    assert failed.severity == "warning"
    assert failed.step == 20
    assert failed.extra["file"] == str(run.file(20))
    assert not failed.extra["written"]
    assert reason in failed.extra["error"]
    assert str(run.file(20)) in failed.message
    # moved away with their directory, the older snapshots were missing at that moment
    moved = fault == "directory replaced by a file"
    assert failed.extra["kept"] == ([] if moved else [0, 10])
    assert failed.extra["lost"] == ([str(run.file(0)), str(run.file(10))] if moved else [])
    assert_state(run, 10)  # the snapshot of step 20 never was: back to step 10
    assert [e.value for e in run.events("rollback")] == [10]
    run.steps(10)  # the next snapshot of step 20 is written
    assert run.rollback.snapshot_steps == [10, 20]
    assert torch.load(run.file(20), weights_only=False)["guard"]["step_count"] == 20
    assert no_temporary_files(path)


def test_a_deleted_directory_is_recreated_and_the_snapshots_lost_with_it_reported(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snapshots"
    run = build(path, keep=2)
    run.steps(15)
    shutil.rmtree(path)
    run.steps(5)  # the snapshot of step 20 recreates the directory
    assert run.file(20).exists()
    run.steps(3)
    run.steps(7, bad=True)
    (lost,) = run.events("snapshot_failed")
    assert lost.severity == "warning"
    assert lost.extra["written"]
    assert lost.extra["recreated"]
    assert lost.extra["lost"] == [str(run.file(0)), str(run.file(10))]
    assert run.file(10).name in lost.message
    assert "vanished" in lost.message
    assert_state(run, 20)  # the snapshot written after the deletion is the one restored


def test_failed_writes_reach_the_run_directory_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradguard.report import run_verdict, write_report

    path, run_dir = tmp_path / "snapshots", tmp_path / "run"
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rollback = gg.Rollback(every=10, storage="disk", path=path)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10, run_dir=run_dir)
    run = Run(model, optimizer, rollback, guard, path)
    run.steps(19)
    disk_full(path, monkeypatch)
    run.steps(1)
    run.steps(20)
    guard.close()
    rows = (run_dir / "events.jsonl").read_text().splitlines()
    assert any('"snapshot_failed"' in row and "snapshot-000000020.pt" in row for row in rows)
    assert write_report(run_dir).exists()
    level, sentence = run_verdict(run_dir)
    assert level == "warn"
    assert "1 snapshot write failed (first at step 20" in sentence


# --- DDP: a fault on one rank changes the decision of every rank -----------------------------

DDP_RANK = textwrap.dedent(
    """
    import json, math, os, sys, torch
    import torch.distributed as dist
    from pathlib import Path
    from torch import nn
    import gradguard as gg

    rank, path, store, out = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rollback = gg.Rollback(
        every=10, keep=3, storage="disk", path=path, nonfinite_streak=2, cooldown=5
    )
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(rank))
    y = torch.tanh(x.sum(1, keepdim=True))
    weights = {}

    def steps(n, bad=False):
        for _ in range(n):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if bad:
                next(model.parameters()).grad[0, 0] = math.nan
            guard.step()
            if guard.step_count % 10 == 0:
                weights.setdefault(guard.step_count, [p.clone() for p in model.parameters()])

    steps(19)
    if rank == 1:  # only rank 1's disk is full when the snapshot of step 20 is written
        (path / "snapshot-000000020-rank1.pt.tmp").symlink_to("/dev/full")
    steps(14)
    held = rollback.snapshot_steps
    if rank == 1:  # only rank 1's newest snapshot is torn
        torn = path / "snapshot-000000030-rank1.pt"
        torn.write_bytes(torn.read_bytes()[:100])
    steps(7, bad=True)
    (rolled,) = [e for e in guard.events if e.kind == "rollback"]
    result = {
        "held_after_the_failed_write": held,
        "step_count": guard.step_count,
        "restored": rolled.value,
        "exact": all(
            torch.equal(a, b) for a, b in zip(model.parameters(), weights[10], strict=True)
        ),
        "unreadable": rolled.extra["unreadable"],
        "failed": [e.extra for e in guard.events if e.kind == "snapshot_failed"],
    }
    Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown under load
    """
)


def test_under_ddp_a_fault_on_one_rank_changes_the_decision_of_every_rank(
    tmp_path: Path,
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(DDP_RANK)
    path, store = tmp_path / "snapshots", tmp_path / "store"
    outs = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(path), str(store), str(outs[r])],
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for process in ranks:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr[-3000:]
    results = [json.loads(out.read_text()) for out in outs]
    for rank, result in enumerate(results):
        # rank 1's write of step 20 failed: every rank dropped that step
        assert result["held_after_the_failed_write"] == [0, 10, 30]
        # rank 1's snapshot of step 30 is torn: every rank fell back to step 10
        assert result["step_count"] == 10
        assert result["restored"] == 10
        assert result["exact"]
        (skipped,) = result["unreadable"]
        assert skipped["file"] == str(path / f"snapshot-000000030-rank{rank}.pt")
        (failed,) = result["failed"]
        assert not failed["written"]
        assert failed["file"] == str(path / f"snapshot-000000020-rank{rank}.pt")
    assert "unusable on another rank" in results[0]["unreadable"][0]["error"]
    assert "another rank's write failed" in results[0]["failed"][0]["error"]
    assert "RuntimeError" in results[1]["failed"][0]["error"]
    assert not (path / "snapshot-000000020-rank0.pt").exists()  # dropped with rank 1's
    assert no_temporary_files(path)


# --- crash safety -----------------------------------------------------------------------------


def test_attach_removes_what_an_interrupted_write_left(tmp_path: Path) -> None:
    (tmp_path / "snapshot-000000070.pt.tmp").write_bytes(b"torn")
    (tmp_path / "snapshot-000000080.tmp").mkdir()  # an FSDP2 checkpoint directory, half-written
    (tmp_path / "snapshot-000000080.tmp" / "__0_0.distcp").write_bytes(b"torn")
    (tmp_path / "notes.txt").write_text("keep me")
    finished = tmp_path / "snapshot-000000060.pt"
    torch.save({"kept": True}, finished)
    build(tmp_path)
    assert no_temporary_files(tmp_path)
    assert (tmp_path / "notes.txt").exists()
    assert torch.load(finished, weights_only=False) == {"kept": True}


def test_a_directory_that_cannot_be_written_fails_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot use that directory"):
        build(blocker / "snapshots")


def test_load_latest_snapshot_skips_damaged_files_with_a_warning(tmp_path: Path) -> None:
    run = build(tmp_path)
    run.steps(30)
    truncate(run.file(30), pytest.MonkeyPatch())
    with pytest.warns(UserWarning, match=r"snapshot-000000030\.pt \(\w+Error: "):
        file, payload = load_latest_snapshot(tmp_path)
    assert file == run.file(20)
    assert set(payload) == set(PAYLOAD_KEYS)
    assert payload["guard"]["step_count"] == 20
    model = tiny_model(seed=1)
    model.load_state_dict(payload["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), run.weights[20], strict=True))
    with pytest.raises(GradGuardError, match="does not match the model"):
        load_latest_snapshot(tmp_path, model=tiny_model(width=8))  # a foreign model fits none


def test_load_latest_snapshot_names_every_file_when_none_loads(tmp_path: Path) -> None:
    run = build(tmp_path)
    run.steps(20)
    for step in (0, 10, 20):
        empty(run.file(step), pytest.MonkeyPatch())
    with pytest.raises(GradGuardError, match="No usable snapshot") as raised:
        load_latest_snapshot(tmp_path)
    for step in (0, 10, 20):
        assert run.file(step).name in str(raised.value)
    with pytest.raises(GradGuardError, match="No snapshot file of rank 1"):
        load_latest_snapshot(tmp_path, rank=1)
    with pytest.raises(GradGuardError, match="Cannot list"):
        load_latest_snapshot(tmp_path / "missing")


# --- SIGKILL during snapshot writes -----------------------------------------------------------

CRASH_WIDTH = 768  # 0.64 M parameters: with AdamW's moments, 7.7 MB per snapshot

TRAINER = textwrap.dedent(
    f"""
    import sys, torch
    from torch import nn
    import gradguard as gg
    from gradguard.recover import load_latest_snapshot

    torch.set_num_threads(1)
    path = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, {CRASH_WIDTH}), nn.Tanh(), nn.Linear({CRASH_WIDTH}, {CRASH_WIDTH}),
        nn.Tanh(), nn.Linear({CRASH_WIDTH}, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    sys.stdin.readline()  # imported while the previous process trains: start when it is dead
    try:  # resume from the newest intact snapshot, as docs/recovery.md says
        _, payload = load_latest_snapshot(path)
    except gg.GradGuardError:  # the first start: no snapshot yet
        payload = None
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    rollback = gg.Rollback(every=10, keep=2, storage="disk", path=path)
    guard = gg.Guard(model, optimizer, recovery=rollback, log_every=10)
    if payload is not None:
        guard.load_recovery_state(payload["guard"])
        rollback.snapshot()
    print("ready", guard.step_count, flush=True)
    sys.stdin.readline()  # the test looks at the directory first
    while True:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
    """
)


def crash_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, CRASH_WIDTH),
        nn.Tanh(),
        nn.Linear(CRASH_WIDTH, CRASH_WIDTH),
        nn.Tanh(),
        nn.Linear(CRASH_WIDTH, 1),
    )


def temporary_files(path: Path) -> list[str]:
    with os.scandir(path) as entries:
        return [e.name for e in entries if e.name.endswith(".tmp")]


def finished_steps(path: Path) -> list[int]:
    return sorted(int(p.name[9:18]) for p in path.glob("snapshot-*.pt"))


def kill_during_a_write(process: subprocess.Popen[str], path: Path, rng: random.Random) -> bool:
    """SIGKILL a little after the n-th new temporary file appears; True if it appeared.

    ``n`` (1 to 3) and the delay (0 to 5 ms, within a write of 15 ms or more) are drawn from
    ``rng``; after 10 s without a temporary file, kill anyway.
    """
    wanted, seen = rng.randint(1, 3), set()
    deadline = time.monotonic() + 10.0
    while len(seen) < wanted and time.monotonic() < deadline:
        seen.update(temporary_files(path))
        time.sleep(0.001)
    time.sleep(rng.uniform(0.0, 0.005))
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return len(seen) == wanted


def check_newest_snapshot(path: Path) -> int:
    """The newest finished snapshot loads whole and fits the model; return its step."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rename is atomic: no finished file is torn
        file, payload = load_latest_snapshot(path)
    step = finished_steps(path)[-1]
    assert file == path / f"snapshot-{step:09d}.pt"
    assert set(payload) == set(PAYLOAD_KEYS)
    assert payload["guard"]["step_count"] == step
    model = crash_model()
    model.load_state_dict(payload["model"])  # strict: the complete model state
    torch.optim.AdamW(model.parameters()).load_state_dict(payload["optimizer"])
    return step


def test_sigkill_during_snapshot_writes_leaves_the_newest_finished_snapshot_loadable(
    tmp_path: Path,
) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    path = tmp_path / "snapshots"
    rng = random.Random(20240601)
    landed, resumed_at = 0, 0
    started = time.monotonic()

    def spawn() -> subprocess.Popen[str]:
        command = [sys.executable, str(script), str(path)]
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    # Each process imports torch before it waits for "start": three run ahead, so the
    # imports overlap the runs before them.
    processes = [spawn() for _ in range(3)]
    try:
        for kill in range(10):
            process = processes[kill]
            assert process.stdin is not None
            assert process.stdout is not None
            process.stdin.write("start\n")
            process.stdin.flush()
            ready = process.stdout.readline().split()
            assert ready == ["ready", str(resumed_at)]  # resumed from the newest snapshot
            assert temporary_files(path) == []  # the start removed what the last kill left
            process.stdin.write("go\n")
            process.stdin.flush()
            if len(processes) < 10:
                processes.append(spawn())
            seen = kill_during_a_write(process, path, rng)
            landed += seen and bool(temporary_files(path))  # killed mid-write: temp file stays
            step = check_newest_snapshot(path)
            assert step >= resumed_at
            resumed_at = step
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
    model = crash_model()
    gg.Guard(  # the next start, in this process: it removes the last kill's temp file
        model,
        torch.optim.AdamW(model.parameters()),
        recovery=gg.Rollback(every=10, storage="disk", path=path),
        log_every=10,
    ).close()
    assert temporary_files(path) == []
    assert landed >= 8, f"only {landed} of 10 kills landed during a write"
    assert resumed_at > 0
    print(f"crash test: {landed}/10 kills mid-write, {time.monotonic() - started:.1f} s")
