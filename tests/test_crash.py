"""A run killed at any moment (``kill -9``) loses at most the line it was writing.

A training process that logs to a run directory and checkpoints itself is killed ten
times at random moments and restarted each time. After every kill each JSON-lines file
parses to its last complete line and a fresh run on the directory is refused; every
restart resumes from the checkpoint, cuts a torn line and leaves no temporary file.

The runs are forked from one supervisor process that imported torch once, so ten kills
cost seconds, not ten interpreter starts; the supervisor copies the run directory after
each kill for the checks here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradguard as gg
from gradguard.errors import ConfigError
from gradguard.sinks import EVENTS_FILE, LAYERS_FILE, META_FILE, METRICS_FILE

KILLS = 10
ROW_FILES = (METRICS_FILE, LAYERS_FILE, EVENTS_FILE)
DEPTH = 60  # layers: a drain's layers.jsonl text spans several writes, so a kill can tear it

SUPERVISOR = """
import json, os, random, shutil, signal, sys, time
from pathlib import Path
import torch
import gradguard as gg

torch.set_num_threads(1)
root = Path(sys.argv[1])
run_dir, checkpoint = root / "run", root / "ckpt.pt"
kills, depth = int(sys.argv[2]), int(sys.argv[3])


def build():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(depth)]
    model = torch.nn.Sequential(*layers)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def train():
    model, optimizer = build()
    guard = gg.Guard(model, optimizer, log_every=5, run_dir=run_dir, tensorboard=False)
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        guard.load_state_dict(saved["guard"])
    while True:
        optimizer.zero_grad(set_to_none=True)
        loss = model(torch.randn(16, 8)).square().mean()
        loss.backward()
        guard.step(loss)
        if guard.step_count % 20 == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "guard": guard.state_dict()}
            torch.save(state, checkpoint.with_suffix(".part"))
            os.replace(checkpoint.with_suffix(".part"), checkpoint)


# Warm up before forking: what torch and gradguard import lazily is imported once here.
model, optimizer = build()
warm = gg.Guard(model, optimizer, log_every=5, run_dir=root / "warm-up", tensorboard=False)
for _ in range(10):
    optimizer.zero_grad(set_to_none=True)
    model(torch.randn(16, 8)).square().mean().backward()
    warm.step()
torch.save(warm.state_dict(), root / "warm-up" / "state.pt")
warm.close()
moments = random.Random(0)
for kill in range(kills + 1):
    pid = os.fork()
    if pid == 0:
        try:
            train()
        finally:
            os._exit(1)
    time.sleep(moments.uniform(0.05, 0.8))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"run {kill} ended by itself: {status}"
    shutil.copytree(run_dir, root / f"after-kill-{kill}")
print("done", flush=True)
"""


def complete_lines(path: Path) -> list[dict[str, object]]:
    """Every line that ends with a newline, parsed: each must be whole JSON."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def refuse_a_fresh_run(run_dir: Path) -> None:
    """A run that does not resume is refused at its first step, the logs left as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(DEPTH)])
    before = {name: (run_dir / name).read_bytes() for name in ROW_FILES}
    guard = gg.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir=run_dir, tensorboard=False
    )
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(ConfigError, match="already holds the logs of another run"):
        guard.step()
    guard.close()
    assert {name: (run_dir / name).read_bytes() for name in ROW_FILES} == before


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_at_most_the_line_being_written(tmp_path: Path) -> None:
    script = tmp_path / "supervise.py"
    script.write_text(SUPERVISOR)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(KILLS), str(DEPTH)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    torn = 0
    sessions: list[list[int]] = []
    for kill in range(KILLS + 1):
        copy = tmp_path / f"after-kill-{kill}"
        for name in ROW_FILES:
            complete_lines(copy / name)  # raises on a damaged complete line
        assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]
        torn += any((copy / name).read_bytes()[-1:] not in (b"", b"\n") for name in ROW_FILES)
        metrics = complete_lines(copy / METRICS_FILE)
        assert metrics, f"run {kill} was killed before it logged a step"
        meta = json.loads((copy / META_FILE).read_text())
        sessions.append([s["start_step"] for s in meta["sessions"]])
        if kill < KILLS:
            scratch = tmp_path / "scratch"
            shutil.copytree(copy, scratch)
            refuse_a_fresh_run(scratch)
            shutil.rmtree(scratch)
    # Every start after the first resumed from a checkpoint (a multiple of 20 steps) and
    # added its session to meta.json.
    assert [len(s) for s in sessions] == list(range(1, KILLS + 2))
    assert sessions[-1][0] == 0
    assert all(step % 20 == 0 for step in sessions[-1])
    assert max(sessions[-1]) > 0
    print(f"{KILLS + 1} kills, {torn} left a torn last line; sessions started at {sessions[-1]}")
