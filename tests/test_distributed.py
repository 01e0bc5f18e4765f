"""DDP and FSDP2 with 2 CPU processes (gloo): reduced statistics and one decision everywhere.

Each test runs `tests/distributed_scenarios.py` in a subprocess (it spawns the 2 ranks) under
a timeout, so a rank that hangs fails the test instead of the suite.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("distributed_scenarios.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)


def run(scenario: str, kind: str, tmp_path: Path) -> list[dict[str, Any]]:
    out = tmp_path / f"{scenario}-{kind}.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, kind, str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks: list[dict[str, Any]] = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    return ranks


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_norms_equal_a_single_process_reference_and_so_do_20_clipped_steps(
    kind: str, tmp_path: Path
) -> None:
    for rank in run("norms", kind, tmp_path):
        assert rank["total"] <= 1e-6
        assert rank["per_layer"] <= 1e-6
        assert rank["per_tensor"] <= 1e-6
        assert rank["loss"] <= 1e-6  # the loss is averaged over the ranks
        assert rank["clipped_steps"] >= 10  # the clip really acted
        assert rank["scale"] <= 1e-5
        assert rank["grads"] <= 1e-5  # clipped gradients, every step
        assert rank["weights"] <= 1e-5  # after 20 steps
        assert rank["replicas_equal"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_is_skipped_on_every_rank(kind: str, tmp_path: Path) -> None:
    ranks = run("nan", kind, tmp_path)
    for rank in ranks:
        assert rank["skipped"] == [i == 6 for i in range(10)]
        assert rank["unchanged_across_skip"]
        assert rank["replicas_equal"]
        assert rank["finite"]
        assert rank["events"] == [[7, "nonfinite"]]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_a_spike_on_one_rank_rolls_back_every_rank_to_the_same_snapshot(
    kind: str, tmp_path: Path
) -> None:
    ranks = run("rollback", kind, tmp_path)
    assert ranks[0]["events"] == ranks[1]["events"]
    for rank in ranks:
        assert [k for _, k in rank["events"]] == ["spike", "rollback"]
        assert rank["step_count"] == 30
        assert rank["restored_bitwise"]  # own shards and optimizer state, as at the snapshot
        assert rank["replicas_equal"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_exactly_one_all_reduce_per_step(kind: str, tmp_path: Path) -> None:
    for rank in run("allreduce", kind, tmp_path):
        assert rank["all_reduces_per_step"] == [1] * 12  # squared norms and the loss, together
        assert rank["sync_count"] == 0  # fused AdamW: no host read between drains


@pytest.mark.parametrize("name", ["ddp_example.py", "fsdp_example.py"])
def test_examples_run_under_torchrun_and_ranks_agree(name: str) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / name
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(example), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # the two ranks print concurrently: their lines may run together
    found = dict(re.findall(r"rank (\d): (.*?skipped steps \[[\d, ]*\])", completed.stdout))
    assert sorted(found) == ["0", "1"], completed.stdout
    assert found["0"] == found["1"]  # the same numbers and the same skips on both ranks
    assert found["0"].endswith("skipped steps [16]")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_disk_snapshots_roll_back_every_rank(kind: str, tmp_path: Path) -> None:
    ranks = run("rollback-disk", kind, tmp_path)
    for rank in ranks:
        assert [k for _, k in rank["events"]] == ["spike", "rollback"]
        assert rank["restored_bitwise"]
        assert rank["replicas_equal"]
    files = ranks[0]["snapshot_files"]
    if kind == "fsdp":  # torch.distributed.checkpoint directories, renamed into place
        assert files == ["snapshot-000000020", "snapshot-000000030"]
    else:  # one torch.save file per rank
        assert files == [f"snapshot-0000000{s}-rank{r}.pt" for s in (20, 30) for r in (0, 1)]
