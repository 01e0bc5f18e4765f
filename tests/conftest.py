"""Fixtures shared across the test files."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(*widths: int, activations: tuple[str, ...] = ("tanh",), seed: int = 0) -> nn.Sequential:
    """A seeded MLP through ``widths``; hidden layer ``i`` uses ``activations[i % len]``.

    ``mlp(5, 16, 16, 1, activations=("tanh", "relu"))`` is
    ``Linear(5, 16), Tanh, Linear(16, 16), ReLU, Linear(16, 1)`` under ``manual_seed(0)``.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        if i:
            layers.append(ACTIVATIONS[activations[(i - 1) % len(activations)]]())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def make_model(seed: int = 0) -> nn.Module:
    """A 3-layer tanh MLP (6 -> 16 -> 16 -> 1), seeded: the model the sink tests log."""
    return mlp(6, 16, 16, 1, seed=seed)


class LabRuns:
    """Quick lab runs for the experiments' tests: one ``lab.run`` and its ``results.json``."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory

    def quick(self, name: str, spy: ModuleType | None = None) -> tuple[Any, list[int]]:
        """Run experiment ``name`` quickly; with ``spy``, record the torch thread count
        inside every call of ``spy.train`` (the lab pins one thread per training)."""
        from gradguard import lab

        threads: list[int] = []
        with pytest.MonkeyPatch.context() as patch:
            if spy is not None:
                original = spy.train

                def train(*args: Any) -> Any:
                    threads.append(torch.get_num_threads())
                    return original(*args)

                patch.setattr(spy, "train", train)
            result = lab.run([name], quick=True, out=self._tmp.mktemp(name), progress=False)
        self.check_reference(result)
        return result, threads

    @staticmethod
    def check_reference(result: Any) -> None:
        """The lab's record (``reference.json``) knows every claim of the run, and its quick
        verdicts are this run's: otherwise ``make lab-reference`` is due."""
        from gradguard.lab._reference import load_reference

        reference = load_reference()
        for experiment in result.experiments:
            for claim in experiment.claims:
                key = f"{experiment.name}/{claim.id}"
                assert key in reference, f"{key} is not in reference.json: make lab-reference"
                recorded = reference[key]["quick"].passed
                assert recorded == claim.passed, f"{key}: reference.json is stale"

    @staticmethod
    def stored(result: Any) -> dict[str, Any]:
        """The run's one experiment as ``results.json`` holds it."""
        data = json.loads((result.run_dir / "results.json").read_text(encoding="utf-8"))
        (experiment,) = data["experiments"]
        assert isinstance(experiment, dict)
        return experiment


@pytest.fixture(scope="session")
def lab_runs(tmp_path_factory: pytest.TempPathFactory) -> LabRuns:
    """Runs lab experiments quickly and reads back what they stored."""
    return LabRuns(tmp_path_factory)
