"""Hugging Face: a real ``Trainer.train`` skips injected NaN steps exactly, logs, adds no syncs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.errors import ConfigError
from gradguard.testing import FaultInjector

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models here are built from configs: never fetch
transformers = pytest.importorskip("transformers")
from gradguard.integrations.transformers import GradGuardCallback  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_example.py"
LOG_EVERY = 5
POISONED = "bert.encoder.layer.1.output.dense.weight"


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random 8-token sequences; the label says whether the first token is in the top half."""

    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] // 16}


def tiny_bert() -> nn.Module:
    """A 2-layer BERT classifier, randomly initialised from a config: nothing downloaded."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertForSequenceClassification(config)


class Faults(transformers.TrainerCallback):
    """Injects faults per optimizer step (into its first micro-batch, or into all of them).

    Records whether each optimizer step moved the weights or the optimizer state.
    """

    def __init__(self, injectors: list[FaultInjector], first_micro_batch_only: bool = False):
        self.injectors = injectors
        self.first_only = first_micro_batch_only
        self.changed: dict[int, bool] = {}
        self._context = contextlib.ExitStack()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for injector in self.injectors:
            self._context.enter_context(injector.step())
        self.before = snapshot(kwargs["model"], kwargs["optimizer"])

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first_only:
            self._context.close()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._context.close()
        after = snapshot(kwargs["model"], kwargs["optimizer"])
        moved = any(not torch.equal(a, b) for a, b in zip(self.before, after, strict=True))
        self.changed[state.global_step] = moved


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [
        v.detach().clone()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    ]
    return [p.detach().clone() for p in module.parameters()] + state


def train(
    tmp_path: Path, model: nn.Module, callbacks: list[Any], **kwargs: Any
) -> transformers.Trainer:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 15,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "max_grad_norm": 0.0,  # the guard measures (and would clip) the raw gradients
        "logging_nan_inf_filter": False,  # HF's filter would hide NaN losses (and syncs)
        "logging_steps": 5,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    args = transformers.TrainingArguments(**(options | kwargs))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=callbacks
    )
    trainer.train()
    return trainer


def guard_alone_sync_count(steps: int, bad: set[int], fused: bool) -> int:
    """What the guard by itself costs for ``steps`` steps with ``bad`` non-finite ones."""
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), fused=fused)
    guard = gg.Guard(model, optimizer, log_every=LOG_EVERY)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        if step in bad:
            model.weight.grad[0, 0] = float("nan")
        guard.step()
    guard.close()
    return guard.sync_count


def gradguard_rows(trainer: Any, key: str) -> list[dict[str, Any]]:
    return [row for row in trainer.state.log_history if key in row]


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_nan_steps_are_skipped_exactly_and_logged(
    tmp_path: Path, optim: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_bert()
    faults = Faults(
        [
            FaultInjector(model, at={4: "nan", 9: "inf"}, parameter=POISONED),
            FaultInjector(model.classifier, at={13: "loss"}),  # NaN logits: a NaN loss
        ]
    )
    callback = GradGuardCallback(log_every=LOG_EVERY)
    with caplog.at_level(logging.WARNING, logger="gradguard"):
        trainer = train(tmp_path, model, [faults, callback], optim=optim)
    guard = callback.guard
    assert guard is not None
    assert guard.fused is (optim == "adamw_torch_fused")
    # weights and optimizer state bitwise equal across each skipped step, moved at the others
    assert {step for step, moved in faults.changed.items() if not moved} == {4, 9, 13}
    assert len(faults.changed) == 15
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # the events, in the Trainer's log history and on the Python log
    nonfinite = [e for e in guard.events if e.kind == "nonfinite"]
    assert [e.step for e in nonfinite] == [4, 9, 13]
    assert "The loss itself is NaN/Inf" in nonfinite[2].message
    assert "The loss itself" not in nonfinite[0].message
    assert [r["step"] for r in gradguard_rows(trainer, "gradguard/event/nonfinite")] == [4, 9, 13]
    assert sum(r["gradguard/skipped"] for r in gradguard_rows(trainer, "gradguard/skipped")) == 3
    assert sum("nonfinite" in r.getMessage() for r in caplog.records) == 3
    # the NaN loss is not hidden: the Trainer's own logged loss shows it too
    trainer_losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    assert math.isnan(trainer_losses[15])
    assert not math.isnan(trainer_losses[10])
    # no host sync beyond the guard's own; the Trainer gets its optimizer back
    assert guard.sync_count == guard_alone_sync_count(15, {4, 9, 13}, guard.fused)
    assert not isinstance(trainer.optimizer.optimizer, gg.GuardedOptimizer)


def test_accumulation_counts_a_nan_in_any_micro_batch_under_bf16(tmp_path: Path) -> None:
    model = tiny_bert()
    faults = Faults(
        [FaultInjector(model, at={2: "nan", 5: "inf"}, parameter=POISONED)],
        first_micro_batch_only=True,  # the last three micro-batches of the step are clean
    )
    callback = GradGuardCallback(log_every=LOG_EVERY)
    train(
        tmp_path,
        model,
        [faults, callback],
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        bf16=True,
    )
    guard = callback.guard
    assert guard is not None
    assert {step for step, moved in faults.changed.items() if not moved} == {2, 5}
    assert len(faults.changed) == 6
    assert [e.step for e in guard.events if e.kind == "nonfinite"] == [2, 5]
    assert guard.sync_count == guard_alone_sync_count(6, {2, 5}, guard.fused)


def test_guard_should_stop_ends_training(tmp_path: Path) -> None:
    callback = GradGuardCallback(log_every=LOG_EVERY)

    class Diverged(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 5:  # what the Divergence detector does at a drain
                assert callback.guard is not None
                callback.guard.should_stop = True

    trainer = train(tmp_path, tiny_bert(), [Diverged(), callback])
    assert trainer.state.global_step == 5


def test_bad_configurations_fail_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lr_scheduler"):
        GradGuardCallback(scheduler=None)
    with pytest.raises(ConfigError, match="unknown option 'max_norm'"):
        GradGuardCallback(max_norm=1.0)
    model = tiny_bert()
    engine_stepped = torch.optim.SGD(model.parameters(), lr=0.1)  # e.g. DeepSpeed's own
    with pytest.raises(ConfigError, match="steps a SGD"):
        GradGuardCallback().on_train_begin(None, None, None, model=model, optimizer=engine_stepped)
    with pytest.raises(ConfigError, match="set max_grad_norm=0"):
        train(tmp_path, tiny_bert(), [GradGuardCallback(clip=gg.NormClip(1.0))], max_grad_norm=1.0)


def test_example_runs_and_reports_the_skipped_steps(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "10", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    assert "skipped steps: [5, 10]" in completed.stdout


def test_steps_match_the_trainer_log_and_a_resumed_run_continues_its_run_dir(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "gg"
    options: dict[str, Any] = {
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 8,
        "output_dir": str(tmp_path / "out"),
    }
    first = GradGuardCallback(log_every=LOG_EVERY, run_dir=run_dir, tensorboard=False)
    train(tmp_path, tiny_bert(), [first], max_steps=8, **options)
    # the resumed run: a NaN loss at its 4th step, the Trainer's global_step 12
    model = tiny_bert()
    faults = Faults([FaultInjector(model, at={4: "loss"})])
    resumed = GradGuardCallback(log_every=LOG_EVERY, run_dir=run_dir, tensorboard=False)
    args = transformers.TrainingArguments(
        max_steps=15,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        logging_nan_inf_filter=False,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **options,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[faults, resumed]
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8"))
    guard = resumed.guard
    assert guard is not None
    assert guard.step_count == trainer.state.global_step == 15
    nan_loss_steps = [
        r["step"] for r in trainer.state.log_history if "loss" in r and math.isnan(r["loss"])
    ]
    # the Trainer's running loss stays NaN once a NaN was added (it subtracts itself)
    assert nan_loss_steps == [12, 13, 14, 15]
    assert [e.step for e in guard.events if e.kind == "nonfinite"] == [12]
    assert [r["step"] for r in gradguard_rows(trainer, "gradguard/event/nonfinite")] == [12]
    # the run directory holds both sessions, numbered as the Trainer numbers its steps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 16))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "nonfinite"] == [12]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert [s["start_step"] for s in meta["sessions"]] == [0, 8]
