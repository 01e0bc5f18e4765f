"""Causes, evidence and advice: each cause on a real run, each advice value one that acts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard.errors import ConfigError
from gradguard.explain import Explainer, RunFacts, Streaks
from gradguard.records import SAMPLE_COLUMNS, Event, Window

BATCH, FEATURES, CLASSES = 32, 16, 4


def _data(seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH * 64, FEATURES, generator=generator)
    w = torch.randn(FEATURES, CLASSES, generator=generator)
    return x, (x @ w).argmax(1)


@dataclass
class Run:
    """A guarded classification run and what it saw."""

    guard: gg.Guard
    norms: dict[int, float] = field(default_factory=dict)
    lrs: dict[int, float] = field(default_factory=dict)

    def attention(self) -> list[Event]:
        return [e for e in self.guard.events if e.needs_attention and e.kind != "rollback"]

    def first(self) -> Event:
        events = self.attention()
        assert events, [str(e) for e in self.guard.events]
        return events[0]


Hook = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    hook: Hook | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    before_step: Callable[[int], None] | None = None,
    samples: bool = True,
    **guard_kwargs: Any,
) -> Run:
    """Train ``steps`` steps on a synthetic task; ``hook`` may corrupt a step's batch."""
    guard = gg.Guard(model, optimizer, log_every=10, **guard_kwargs)
    result = Run(guard)
    x_all, y_all = _data(0)
    dtype = next(model.parameters()).dtype
    for step in range(1, steps + 1):
        start = (step * BATCH) % (len(x_all) - BATCH)
        x, y = x_all[start : start + BATCH].clone(), y_all[start : start + BATCH]
        if hook is not None:
            x, y = hook(step, x, y)
        if before_step is not None:
            before_step(step)
        logits = model(x.to(dtype)).float()
        per_example = (loss_fn or _ce)(logits, y)
        loss = per_example.mean()
        optimizer.zero_grad()
        loss.backward()
        result.lrs[step] = optimizer.param_groups[0]["lr"]
        ids = list(range(start, start + BATCH))
        report = guard.step(
            loss, batch=ids, sample_losses=per_example.detach() if samples else None
        )
        result.norms[step] = float(report.grad_norm)
    guard.close()
    return result


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def mlp(*sizes: int, activation: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


def advice_of(event: Event, action: str) -> dict[str, Any]:
    found = [a for a in event.advice if a.action == action]
    assert found, f"no {action} advice in {[a.text for a in event.advice]}"
    return found[0].setting


def assert_clip_acts(event: Event, result: Run) -> None:
    """A clip threshold below the norm of the step that hurt, above the healthy median."""
    setting = advice_of(event, "clip")
    onset = int(event.extra.get("onset", event.step))
    norm = result.norms[onset]
    assert setting["max_norm"] < norm or not math.isfinite(norm)
    healthy = [v for s, v in result.norms.items() if s < onset - 10 and math.isfinite(v)]
    assert setting["max_norm"] >= float(np.median(healthy))


# --- causes on real runs --------------------------------------------------------------


def test_a_raised_learning_rate_is_blamed_with_the_lr_it_had_and_a_clip_that_acts() -> None:
    model = mlp(FEATURES, 64, 64, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def burst(step: int) -> None:
        optimizer.param_groups[0]["lr"] = 0.05 * (60.0 if step >= 101 else 1.0)

    result = run(model, optimizer, 130, before_step=burst)
    event = result.first()
    assert event.step >= 101
    assert event.cause == "lr_too_high"
    assert event.evidence["lr_before"] == pytest.approx(0.05)
    setting = advice_of(event, "lr")
    assert setting["lr"] == pytest.approx(0.05)
    assert setting["lr"] < setting["from"] == 3.0
    assert_clip_acts(event, result)
    assert advice_of(event, "rollback")  # the run has no recovery


def test_a_batch_with_corrupt_examples_is_named_with_its_id_and_the_examples() -> None:
    model = mlp(FEATURES, 64, 64, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    bad = [3, 17, 29]

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step == 150:  # corrupt records: scaled inputs with wrong labels
            x[bad] *= 1e3
            y = y.clone()
            y[bad] = (y[bad] + 1) % CLASSES
        return x, y

    result = run(model, optimizer, 170, hook=corrupt)
    event = result.first()
    assert (event.step, event.kind, event.cause) == (150, "spike", "bad_batch")
    start = (150 * BATCH) % (len(_data(0)[0]) - BATCH)
    assert event.batch == list(range(start, start + BATCH))
    named = {o["position"] for o in event.evidence["outliers"]}
    assert named
    assert named <= set(bad)
    assert {o["id"] for o in event.evidence["outliers"]} == {start + p for p in named}
    inspect = advice_of(event, "inspect_batch")
    assert set(inspect["examples"]) == {start + p for p in named}
    assert_clip_acts(event, result)


def test_a_spike_with_no_evidence_is_unknown_not_guessed() -> None:
    model = mlp(FEATURES, 64, 64, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step == 150:
            return x * 1e3, (y + 1) % CLASSES
        return x, y

    result = run(model, optimizer, 170, hook=corrupt, samples=False)
    event = next(e for e in result.attention() if e.kind == "spike")
    assert (event.step, event.cause) == (150, "unknown")
    assert "summary" in event.evidence
    # what the spike wrecked (an exploding weight norm) is not guessed either
    assert {e.cause for e in result.attention()} == {"unknown"}
    assert_clip_acts(event, result)


def test_log_of_zero_is_a_nonfinite_loss_with_an_epsilon_and_the_example() -> None:
    model = mlp(FEATURES, 32, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def nll(logits: Tensor, y: Tensor) -> Tensor:
        if nll.step == 60:  # type: ignore[attr-defined]  # a mask bug: example 5's class out
            masked = (torch.arange(len(y)) == 5)[:, None] & (torch.arange(CLASSES) == y[5])
            logits = logits.masked_fill(masked, -math.inf)
        p = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        return -torch.log(p)

    def count(step: int) -> None:
        nll.step = step  # type: ignore[attr-defined]

    result = run(model, optimizer, 80, loss_fn=nll, before_step=count)
    event = result.first()
    assert (event.step, event.kind, event.cause) == (60, "nonfinite", "nonfinite_loss")
    assert [o["position"] for o in event.evidence["outliers"]] == [5]
    assert advice_of(event, "epsilon")["epsilon"] > 0
    # the epsilon acts: it makes this very loss finite
    eps = advice_of(event, "epsilon")["epsilon"]
    assert math.isfinite(-math.log(max(0.0, eps)))


def test_nan_in_an_input_is_a_nonfinite_forward_naming_the_example() -> None:
    model = mlp(FEATURES, 32, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step == 40:
            x[11, 2] = math.nan
        return x, y

    event = run(model, optimizer, 50, hook=corrupt).first()
    assert (event.step, event.cause) == (40, "nonfinite_forward")
    assert [o["position"] for o in event.evidence["outliers"]] == [11]


def test_sqrt_at_zero_is_a_nonfinite_backward_with_an_epsilon() -> None:
    model = mlp(FEATURES, 32, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def distance(logits: Tensor, y: Tensor) -> Tensor:
        target = nn.functional.one_hot(y, CLASSES).float()
        if distance.step == 30:  # type: ignore[attr-defined]
            target = torch.where(torch.arange(len(y))[:, None] == 0, logits.detach(), target)
        return (logits - target).square().sum(1).sqrt()

    def count(step: int) -> None:
        distance.step = step  # type: ignore[attr-defined]

    event = run(model, optimizer, 40, loss_fn=distance, before_step=count).first()
    assert (event.step, event.cause) == (30, "nonfinite_backward")
    assert advice_of(event, "epsilon")["epsilon"] > 0


def test_fp16_overflow_advises_bf16_or_a_scaler_the_run_lacks() -> None:
    model = mlp(FEATURES, 64, CLASSES).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)

    def scaled(logits: Tensor, y: Tensor) -> Tensor:
        loss = _ce(logits, y)
        return loss * (2.0**24) / (2.0**24) if scaled.step < 40 else _Scale.apply(loss)  # type: ignore[attr-defined]

    def count(step: int) -> None:
        scaled.step = step  # type: ignore[attr-defined]

    event = run(model, optimizer, 50, loss_fn=scaled, before_step=count).first()
    assert (event.step, event.cause) == (40, "overflow")
    actions = [a.action for a in event.advice]
    assert actions[:2] == ["bf16", "scaler"]


class _Scale(torch.autograd.Function):
    """Identity forward; the backward multiplies by 2^24 in fp16 (overflows) then divides."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return (grad.half() * 2.0**24).float() / 2.0**24


def test_a_scaler_already_in_use_is_never_advised_again() -> None:
    explainer = Explainer(RunFacts(scaler=True, low_precision="float16"))
    window = _window(loss=[1.0, 1.0], finite=[True, False], norms=[1.0, math.inf])
    (event,) = explainer.explain(window, [_event(2, "nonfinite")])
    assert event.cause == "overflow"
    assert [a.action for a in event.advice] == ["bf16"]


def test_n01_weights_are_an_initialization_cause_with_the_he_std() -> None:
    torch.manual_seed(0)
    model = mlp(FEATURES, *[64] * 8, CLASSES)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    event = run(model, optimizer, 20).first()
    assert event.cause == "initialization"
    setting = advice_of(event, "init")
    fan_in = event.evidence["fan_in"]
    assert setting["std"] == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert setting["from"] > 4 * setting["std"]  # the init it asks for differs: it acts


def test_deep_sigmoids_are_saturation_with_an_activation_change() -> None:
    model = mlp(FEATURES, *[32] * 14, CLASSES, activation=nn.Sigmoid)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    event = run(model, optimizer, 60).first()
    assert (event.kind, event.cause) == ("vanishing", "saturation")
    assert advice_of(event, "activation")["from"] == ["Sigmoid"]
    assert advice_of(event, "normalization")  # the model has none


def test_normalization_is_not_advised_to_a_model_that_has_it() -> None:
    explainer = Explainer(RunFacts(saturating=("Tanh",), normalized=True))
    window = _window(loss=[1.0] * 4, per_layer=[[1e-8, 1.0]] * 4)
    (event,) = explainer.explain(window, [_event(1, "vanishing", layers=("0",))])
    assert event.cause == "saturation"
    assert [a.action for a in event.advice] == ["activation"]


def test_dead_relus_are_dead_units_with_leaky_relu_and_a_lower_lr() -> None:
    model = mlp(FEATURES, 64, 64, CLASSES)
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    event = run(model, optimizer, 60).first()
    assert (event.kind, event.cause) == ("vanishing", "dead_units")
    assert advice_of(event, "activation")["activation"] == "LeakyReLU"
    lr = advice_of(event, "lr")
    assert lr["lr"] < lr["from"] == 0.1


def test_one_layer_with_a_huge_lr_gets_its_group_lowered() -> None:
    model = mlp(FEATURES, 64, 64, 64, CLASSES)
    groups = [
        {"params": list(m.parameters()), "lr": 100.0 if i == 2 else 0.01}
        for i, m in enumerate(model)
        if list(m.parameters())
    ]
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    event = run(model, optimizer, 40).first()
    assert event.cause == "lr_too_high"
    assert event.layers[0] == "2"
    setting = advice_of(event, "group_lr")
    assert setting["layer"] == "2"
    assert setting["lr"] < setting["from"] == 100.0


def test_remedies_the_run_has_are_not_advised() -> None:
    model = mlp(FEATURES, 64, 64, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step == 150:
            x[[1, 2]] *= 1e3
            y = y.clone()
            y[[1, 2]] = (y[[1, 2]] + 1) % CLASSES
        return x, y

    result = run(
        model, optimizer, 170, hook=corrupt, clip=gg.NormClip(1e-3), recovery=gg.Rollback()
    )
    event = next(e for e in result.guard.events if e.kind == "spike" and e.cause)
    actions = [a.action for a in event.advice]
    assert "clip" not in actions  # it already clips harder than any advice would
    assert "rollback" not in actions


# --- rollback, streaks, the log ---------------------------------------------------------


def test_a_rollback_lists_the_batches_it_skipped() -> None:
    model = mlp(FEATURES, 64, 64, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def corrupt(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step == 150:
            x[[4, 9]] *= 1e3
            y = y.clone()
            y[[4, 9]] = (y[[4, 9]] + 1) % CLASSES
        return x, y

    result = run(model, optimizer, 170, hook=corrupt, recovery=gg.Rollback(every=20))
    rollback = next(e for e in result.guard.events if e.kind == "rollback")
    first, last = rollback.evidence["skipped_steps"]
    assert first <= 150 <= last
    starts = [(s * BATCH) % (len(_data(0)[0]) - BATCH) for s in range(first, last + 1)]
    assert rollback.evidence["skipped_batches"] == [list(range(a, a + BATCH)) for a in starts]
    assert rollback.cause == "bad_batch"


def test_a_3000_step_nan_streak_is_one_event_and_a_small_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gradguard.report import write_report

    model = mlp(FEATURES, 16, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def poison(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if step > 20:
            x[0, 0] = math.nan
        return x, y

    result = run(model, optimizer, 3020, hook=poison, run_dir=tmp_path, tensorboard=False)
    nonfinite = [e for e in result.guard.events if e.kind == "nonfinite"]
    assert len(nonfinite) == 1
    (event,) = nonfinite
    assert (event.count, event.first_step, event.last_step) == (3000, 21, 3020)
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    streak_rows = [r for r in rows if r["kind"] == "nonfinite"]
    assert len(streak_rows) <= 16  # re-written at powers of two and at the end
    assert streak_rows[-1]["count"] == 3000
    assert write_report(tmp_path).stat().st_size < 300_000


def test_sample_losses_must_be_a_nonempty_tensor() -> None:
    model = mlp(FEATURES, CLASSES)
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(2, FEATURES)).sum().backward()
    with pytest.raises(ConfigError, match="reduction='none'"):
        guard.step(1.0, sample_losses=torch.zeros(0))


def test_streaks_merge_one_kind_and_cause_and_end_after_a_gap() -> None:
    streaks = Streaks(gap=10)
    first = _event(5, "nonfinite", cause="nonfinite_loss")
    new, updated = streaks.merge(
        [first, *(_event(s, "nonfinite", "info") for s in range(6, 9))], 10
    )
    assert len(new) == 1
    assert new[0].count == 4
    assert not updated
    new, updated = streaks.merge([_event(s, "nonfinite", "info") for s in range(9, 19)], 20)
    assert not new
    assert updated[0].count == 14
    assert updated[0].last_step == 18
    assert streaks.due(updated[0])  # the count passed 8 since its row was written at 4
    new, updated = streaks.merge([_event(19, "nonfinite", "info")], 25)
    assert updated[0].count == 15
    assert not streaks.due(updated[0])  # no power of two passed, not ended
    new, updated = streaks.merge([_event(20, "nonfinite", cause="overflow")], 30)
    assert [e.cause for e in new] == ["overflow"]  # another cause: another event
    assert updated[0].count == 15
    assert streaks.due(updated[0])  # the first one ended: its last row is owed
    new, _ = streaks.merge([_event(21, "overflow"), _event(23, "overflow")], 30)
    assert [e.count for e in new] == [1, 1]  # a step apart: not consecutive


# --- hand-made windows -------------------------------------------------------------------


def _window(
    loss: list[float],
    finite: list[bool] | None = None,
    norms: list[float] | None = None,
    per_layer: list[list[float]] | None = None,
) -> Window:
    n = len(loss)
    per_layer = per_layer or [[1.0, 1.0]] * n
    return Window(
        steps=np.arange(1, n + 1, dtype=np.int64),
        loss=np.asarray(loss, dtype=np.float64),
        loss_given=np.ones(n, dtype=bool),
        grad_norm=np.asarray(norms or [1.0] * n),
        clipped_norm=np.asarray(norms or [1.0] * n),
        scale=np.ones(n),
        skipped=~np.asarray(finite or [True] * n),
        finite=np.asarray(finite or [True] * n),
        overflow=np.zeros(n, dtype=bool),
        lr=np.full(n, 0.1),
        per_layer=np.asarray(per_layer, dtype=np.float64),
        per_tensor=np.asarray(per_layer, dtype=np.float64),
        layer_names=("0", "1"),
        tensor_names=("0.weight", "1.weight"),
        samples=None,
    )


def _event(
    step: int, kind: str, severity: str = "warning", cause: str = "", layers: tuple[str, ...] = ()
) -> Event:
    return Event(
        step=step,
        kind=kind,  # type: ignore[arg-type]
        value=math.nan,
        threshold=math.nan,
        severity=severity,  # type: ignore[arg-type]
        cause=cause,
        layers=layers,
    )


def test_sample_columns_are_documented_in_order() -> None:
    assert SAMPLE_COLUMNS[:4] == ("median", "mad", "nonfinite", "size")


def test_one_layer_far_outpacing_the_others_is_layer_local_with_its_own_lr() -> None:
    import dataclasses

    explainer = Explainer(RunFacts(group_lr=lambda: [0.1, 0.1]))
    window = dataclasses.replace(
        _window(loss=[1.0] * 4, norms=[1.0] * 4), update_ratio=np.array([1e-3, 0.5])
    )
    (event,) = explainer.explain(window, [_event(4, "exploding", layers=("1",))])
    assert (event.cause, event.evidence["layer"]) == ("layer_local", "1")
    setting = advice_of(event, "group_lr")
    assert setting["layer"] == "1"
    assert setting["lr"] < setting["from"] == 0.1
    # brought to the usual pace of 1e-3 per step: 0.1 x 1e-3 / 0.5
    assert setting["lr"] == pytest.approx(2e-4)
