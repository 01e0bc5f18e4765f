"""The Lightning and Hugging Face callbacks under DDP and FSDP2, 2 CPU processes (gloo).

Each scenario runs ``tests/integration_scenarios_distributed.py`` in its own session (it
spawns the 2 ranks) under a timeout that kills the whole session, so a rank that hangs
fails the test instead of the suite. A NaN hits one rank's forward pass at step 4 and
another rank's gradient at step 9: every rank must skip both steps. Which strategies run on
a CPU, and why the others cannot, is in ``docs/distributed.md``.
"""

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

from gradguard.errors import ConfigError

SCRIPT = Path(__file__).with_name("integration_scenarios_distributed.py")
STEPS = 12
SKIPPED = [4, 9]  # NAN_FORWARD and NAN_GRAD of the script
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)


def run(scenario: str, tmp_path: Path) -> dict[str, Any]:
    """Run one scenario; on a timeout, kill its session (the launcher and both ranks)."""
    out = tmp_path / f"{scenario}.json"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), scenario, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{scenario} hung for {TIMEOUT_S} s:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert len(result["ranks"]) == 2
    return result


def by_step(rows: dict[str, Any], key: str) -> list[str]:
    """A per-step column as text, so NaNs compare equal."""
    return [repr(rows[str(step)][key]) for step in range(1, STEPS + 1)]


def assert_every_rank_skips_together(result: dict[str, Any]) -> None:
    """The properties every strategy must give, checked on both ranks."""
    rank0, rank1 = result["ranks"]
    compared = result["compare"]
    # the guard's norms and (averaged) losses: identical on both ranks, step by step, and
    # equal to one process on the global batch
    assert by_step(rank0["steps"], "grad_norm") == by_step(rank1["steps"], "grad_norm")
    assert by_step(rank0["steps"], "loss") == by_step(rank1["steps"], "loss")
    assert compared["grad_norm_rel_err"] <= 1e-6
    assert compared["loss_rel_err"] <= 1e-6  # rank 0's and rank 1's mean, not their own
    assert compared["clipped"] >= 3  # the clip policy acted, from the same norms everywhere
    assert compared["skipped"] == SKIPPED
    for rank in (rank0, rank1):
        flags = [rank["steps"][str(s)]["skipped"] for s in range(1, STEPS + 1)]
        assert [s for s, flag in enumerate(flags, 1) if flag] == SKIPPED
        # rank 0's NaN loss at step 4 reaches rank 1's log through the averaging
        assert math.isnan(rank["steps"]["4"]["loss"])
        assert not math.isnan(rank["steps"]["9"]["loss"])  # a gradient-only fault
        # weights and optimizer state bitwise unchanged across the skips, moved otherwise
        assert [int(s) for s, m in rank["moved"].items() if not m] == SKIPPED
        assert len(rank["moved"]) == STEPS
        # the skip events, on every rank, in the guard and in what the callback logged
        assert [s for s, kind in rank["events"] if kind == "nonfinite"] == SKIPPED
        assert [s for s, kind in rank["logged_events"] if kind == "nonfinite"] == SKIPPED
        assert rank["finite"]
        assert rank["handed_back"]
    assert rank0["events"] == rank1["events"]  # every event, not only the skips
    assert rank0["weights_digest"] == rank1["weights_digest"]  # bitwise identical
    assert compared["weights_rel_err"] <= 1e-5  # and equal to the reference's


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "strategy", "wrapper", "sharded"),
    [
        ("lightning-ddp", "DDPStrategy", "DistributedDataParallel", False),
        ("lightning-fsdp2", "ModelParallelStrategy", "Regressor", True),
    ],
)
def test_lightning_ranks_skip_together_with_reference_norms(
    scenario: str, strategy: str, wrapper: str, sharded: bool, tmp_path: Path
) -> None:
    pytest.importorskip("lightning")
    result = run(scenario, tmp_path)
    assert_every_rank_skips_together(result)
    for rank in result["ranks"]:
        assert rank["strategy"] == strategy
        assert rank["wrapper"] == wrapper  # FSDP2 shards the module in place: no wrapper
        assert rank["dtensor_params"] is sharded
        # the loggers of every rank got the skipped steps (at Lightning's step numbers)
        assert rank["logged_skips"] == SKIPPED


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "wrapper", "sharded"),
    [
        ("hf-ddp", "DistributedDataParallel", False),
        ("hf-fsdp2", "FSDPBertForSequenceClassification", True),
    ],
)
def test_hf_trainer_ranks_skip_together_with_reference_norms(
    scenario: str, wrapper: str, sharded: bool, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    result = run(scenario, tmp_path)
    assert_every_rank_skips_together(result)
    for rank in result["ranks"]:
        assert rank["distributed_type"] == "MULTI_CPU"
        assert rank["wrapper"] == wrapper
        assert rank["dtensor_params"] is sharded
        assert rank["fused"]  # the default adamw_torch_fused: skips decided on the device
        assert rank["logged_skips"] == len(SKIPPED)  # the summary rows of every rank


def test_lightning_fsdp_strategy_needs_a_gpu_and_the_callback_refuses_it() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.strategies import FSDPStrategy

    from gradguard.integrations.lightning import _check_strategy

    # Lightning's own check (trainer/connectors/accelerator_connector.py), before any process
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp")
    # on a GPU the callback refuses FSDP1: per-rank flat shards, no DTensor to reduce
    with pytest.raises(ConfigError, match="ModelParallelStrategy"):
        _check_strategy(FSDPStrategy())
