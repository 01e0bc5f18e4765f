"""A Hugging Face Trainer run guarded by gradguard: one callback measures, clips, skips, logs.

A tiny 2-layer BERT classifier, randomly initialised from a config (nothing is
downloaded), learns a toy task: is the first token in the upper half of the vocabulary?
Every 5th step gets a NaN gradient injected; the guard skips those steps exactly and
logs them. Run:

    HF_HUB_OFFLINE=1 python examples/hf_trainer_example.py --steps 60 --out runs/hf
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from a config: never fetch

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradguard as gg  # noqa: E402
from gradguard.integrations.transformers import GradGuardCallback  # noqa: E402
from gradguard.testing import FaultInjector  # noqa: E402


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random 8-token sequences over a 32-token vocabulary, labelled by the first token."""

    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] // 16}


class InjectFaults(TrainerCallback):
    """A NaN gradient in one weight on every 5th optimizer step (for the demo)."""

    def __init__(self, injector: FaultInjector) -> None:
        self.injector = injector
        self._context = contextlib.ExitStack()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Arm this step's fault, if any."""
        self._context.enter_context(self.injector.step())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Disarm it."""
        self._context.close()


def main() -> None:
    """Train for ``--steps`` steps under the guard; print what was skipped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/hf")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    model = BertForSequenceClassification(config)
    faults = FaultInjector(
        model,
        at=dict.fromkeys(range(5, args.steps + 1, 5), "nan"),
        parameter="bert.encoder.layer.1.output.dense.weight",
    )
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        max_grad_norm=0.0,  # let the guard clip: it logs the norm before clipping
        logging_nan_inf_filter=False,  # never hide a NaN loss (and skip a sync per batch)
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    guard_callback = GradGuardCallback(clip=gg.NormClip(1.0), log_every=10)  # the one line
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Tokens(),
        callbacks=[InjectFaults(faults), guard_callback],
    )
    trainer.train()

    guard = guard_callback.guard
    assert guard is not None
    skipped = [e.step for e in guard.events if e.kind == "nonfinite"]
    history = trainer.state.log_history
    in_history = [r["step"] for r in history if "gradguard/event/nonfinite" in r]
    print(f"skipped steps: {skipped} (events at steps {in_history} in state.log_history)")
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"weights finite: {finite}; host syncs by the guard: {guard.sync_count}")


if __name__ == "__main__":
    main()
