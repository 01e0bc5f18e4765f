"""FaultInjector: each fault does what it says, on schedule, and leaves no trace."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from gradguard.errors import ConfigError
from gradguard.testing import Fault, FaultInjector


def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    optimizer.zero_grad()
    loss = model(torch.ones(3, 4)).pow(2).mean()
    loss.backward()
    return loss


def hooks_left(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    count = len(model._forward_hooks)
    for p in model.parameters():
        count += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return (
        count + len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
    )


@pytest.mark.parametrize(("kind", "check"), [("nan", math.isnan), ("inf", math.isinf)])
def test_nan_and_inf_go_into_the_named_gradient_only(kind: Any, check: Any) -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={1: kind}, parameter="2.weight")
    with injector.step() as fault:
        one_step(model, optimizer)
    assert fault == Fault(1, kind, "2.weight")
    for name, p in model.named_parameters():
        assert p.grad is not None
        bad = [check(v) for v in p.grad.flatten().tolist()]
        assert sum(bad) == (1 if name == "2.weight" else 0), name
    assert hooks_left(model, optimizer) == 0


def test_spike_multiplies_every_gradient() -> None:
    model, optimizer = setup()
    one_step(model, optimizer)
    clean = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    injector = FaultInjector(model, optimizer, at={1: "spike"}, spike_factor=1e3)
    with injector.step():
        one_step(model, optimizer)
    for p, g in zip(model.parameters(), clean, strict=True):
        torch.testing.assert_close(p.grad, g * 1e3)


def test_loss_fault_makes_the_output_the_loss_and_the_gradients_nan() -> None:
    model, optimizer = setup()
    with FaultInjector(model, optimizer, at={1: "loss"}).step():
        loss = one_step(model, optimizer)
    assert math.isnan(float(loss.detach()))
    assert all(bool(p.grad.isnan().all()) for p in model.parameters() if p.grad is not None)
    assert hooks_left(model, optimizer) == 0


def test_lr_fault_lasts_k_optimizer_steps_and_only_during_the_step() -> None:
    model, optimizer = setup()
    seen: list[float] = []
    optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    injector = FaultInjector(model, optimizer, at={2: "lr"}, lr_factor=100, lr_steps=3)
    for _ in range(6):
        with injector.step():
            one_step(model, optimizer)
            optimizer.step()
        assert optimizer.param_groups[0]["lr"] == 0.1  # restored after every step
    # our post-hook runs before the injector's (registered later): it sees the raised LR
    assert seen == pytest.approx([0.1, 10.0, 10.0, 10.0, 0.1, 0.1])
    assert hooks_left(model, optimizer) == 1  # only the test's own hook


def test_random_schedule_is_reproducible_and_disabled_leaves_no_trace() -> None:
    def schedule(seed: int, enabled: bool = True) -> list[Fault]:
        model, optimizer = setup()
        injector = FaultInjector(
            model, optimizer, probability=0.2, seed=seed, enabled=enabled, kinds=("nan", "spike")
        )
        for _ in range(100):
            with injector.step():
                one_step(model, optimizer)
        assert hooks_left(model, optimizer) == 0
        return injector.log

    first = schedule(3)
    assert first == schedule(3)
    assert first != schedule(4)
    assert 10 <= len(first) <= 30
    assert schedule(3, enabled=False) == []


def test_no_fault_step_registers_nothing() -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={5: "nan"})
    with injector.step() as fault:
        assert fault is None
        assert hooks_left(model, optimizer) == 0
        one_step(model, optimizer)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"at": {1: "boom"}}, "unknown fault kind 'boom'"),
        ({"probability": 1.5}, r"probability must lie in \[0, 1\]"),
        ({"parameter": "nope"}, "not a trainable parameter"),
        ({"lr_steps": 0}, "lr_steps must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    model, optimizer = setup()
    with pytest.raises(ConfigError, match=message):
        FaultInjector(model, optimizer, **kwargs)


def test_lr_faults_need_the_optimizer() -> None:
    model, _ = setup()
    with pytest.raises(ConfigError, match="need the optimizer"):
        FaultInjector(model, at={1: "lr"})


# --- the loss fault on structured outputs -------------------------------------------------


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0
    )
    config.eos_token_id = 0
    model: nn.Module = transformers.GPT2LMHeadModel(config)
    return model


def test_loss_fault_on_a_transformers_model_with_labels() -> None:
    model = tiny_gpt2()
    injector = FaultInjector(model, at={3: "loss"})
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    for step in range(1, 6):
        with injector.step():
            model.zero_grad()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert len(grads) == len(list(model.parameters()))
        if step != 3:
            assert math.isfinite(float(out.loss.detach()))
            assert all(bool(g.isfinite().all()) for g in grads.values())
            continue
        # a ModelOutput still, items and attributes agreeing; the None fields stay None
        assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
        assert math.isnan(float(out.loss.detach()))
        assert bool(out.logits.isnan().all())
        assert out["loss"] is out.loss
        assert out.to_tuple()[0] is out.loss
        assert out["logits"] is out.logits
        assert out.hidden_states is None
        assert "hidden_states" not in out
        # the NaN loss gives NaN gradients: all of them, except the position embedding
        # rows that the batch's 8 positions did not use
        for name, grad in grads.items():
            if name == "transformer.wpe.weight":
                assert bool(grad[:8].isnan().all())
                assert bool(grad[8:].eq(0).all())
            else:
                assert bool(grad.isnan().all()), name
    assert injector.log == [Fault(3, "loss", "model output")]
    assert injector.missed == []
    assert len(model._forward_hooks) == 0


class Pair(NamedTuple):
    logits: torch.Tensor
    ids: torch.Tensor


@dataclass
class Plain:
    logits: torch.Tensor
    ids: torch.Tensor
    extra: torch.Tensor | None = None
    label: str = "plain"


@dataclass(frozen=True)
class Frozen:
    logits: torch.Tensor
    doubled: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "doubled", self.logits.detach() * 2)


class Structured(nn.Module):
    """A linear layer whose output ``wrap`` puts into some structure."""

    def __init__(self, wrap: Any) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> Any:
        return self.wrap(self.linear(x))


IDS = torch.arange(3)


def floats(output: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a nest of the structures below."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Plain | Frozen):
        output = vars(output)
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [t for item in output for t in floats(item)]
    return []


STRUCTURES: dict[str, tuple[Any, Any]] = {
    # name: (wrap, the logits in the wrapped output)
    "tuple": (lambda y: (y, IDS, None, "text"), lambda o: o[0]),
    "list": (lambda y: [IDS, y], lambda o: o[1]),
    "dict": (lambda y: {"logits": y, "ids": IDS, "aux": None}, lambda o: o["logits"]),
    "ordered": (lambda y: OrderedDict(ids=IDS, logits=y), lambda o: o["logits"]),
    "dataclass": (lambda y: Plain(y, IDS), lambda o: o.logits),
    "frozen": (lambda y: Frozen(y), lambda o: o.logits),
    "namedtuple": (lambda y: Pair(y, IDS), lambda o: o.logits),
    "nested": (
        lambda y: {"out": (Pair(y, IDS), [Plain(y * 2, IDS, extra=y.sum())]), "n": 3},
        lambda o: o["out"][0].logits,
    ),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_loss_fault_poisons_every_float_tensor_of_a_structured_output(name: str) -> None:
    wrap, logits_of = STRUCTURES[name]
    torch.manual_seed(0)
    model = Structured(wrap)
    originals: list[Any] = []
    model.register_forward_hook(lambda module, args, output: originals.append(output))
    injector = FaultInjector(model, at={2: "loss"})
    for step in (1, 2, 3):
        with injector.step():
            model.zero_grad()
            out = model(torch.ones(2, 4))
            logits_of(out).pow(2).mean().backward()
        assert type(out) is type(originals[-1])
        assert len(floats(out)) == len(floats(originals[-1])) > 0
        weight_grad = model.linear.weight.grad
        assert weight_grad is not None
        if step == 2:
            assert all(bool(t.isnan().all()) for t in floats(out))
            assert bool(weight_grad.isnan().all())
            assert out is not originals[-1]  # a copy: what the forward returned is intact
        else:
            assert out is originals[-1]
            assert bool(weight_grad.isfinite().all())
        assert all(bool(t.isfinite().all()) for t in floats(originals[-1]))
    assert injector.log == [Fault(2, "loss", "model output")]
    assert len(model._forward_hooks) == 1  # only the test's own


def test_loss_fault_leaves_none_ints_and_other_objects_as_they_are() -> None:
    torch.manual_seed(0)
    model = Structured(lambda y: (Plain(y, IDS), {"ids": IDS, "mask": IDS > 0, "note": None}))
    with FaultInjector(model, at={1: "loss"}).step():
        plain, info = model(torch.ones(2, 4))
    assert bool(plain.logits.isnan().all())
    assert plain.ids is IDS
    assert plain.extra is None
    assert plain.label == "plain"
    assert info["ids"] is IDS
    assert info["note"] is None
    assert info["mask"].dtype == torch.bool


def test_loss_fault_keeps_a_model_outputs_extra_keys_and_fields_in_step() -> None:
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.SequenceClassifierOutput(
        logits=torch.ones(2, 3, requires_grad=True)
    )
    out["aux"] = torch.ones(2)  # a key that is not a field: ModelOutput allows it
    model = Structured(lambda y: out)
    with FaultInjector(model, at={1: "loss"}).step():
        poisoned = model(torch.ones(2, 4))
    assert type(poisoned) is type(out)
    assert list(poisoned.keys()) == ["logits", "aux"]
    assert poisoned.loss is None
    assert poisoned.hidden_states is None
    assert bool(poisoned.logits.isnan().all())
    assert poisoned["logits"] is poisoned.logits
    assert bool(poisoned["aux"].isnan().all())
    assert poisoned.aux is poisoned["aux"]
    assert bool(out.logits.isfinite().all())
    assert bool(out["aux"].isfinite().all())


@pytest.mark.parametrize(
    ("wrap", "described"),
    [
        (lambda y: y.argmax(dim=1), "a torch.Tensor of dtype torch.int64"),
        (lambda y: "a string", "a str"),
        (lambda y: None, "None"),
        (lambda y: {"ids": IDS, "labels": [IDS]}, "a dict"),
    ],
)
def test_loss_fault_refuses_an_output_with_no_float_tensor(wrap: Any, described: str) -> None:
    model = Structured(wrap)
    injector = FaultInjector(model, at={1: "loss"})
    with pytest.raises(ConfigError) as error, injector.step():
        model(torch.ones(2, 4))
    message = str(error.value)
    assert f"output of Structured is {described}, with no floating-point tensor" in message
    assert "dataclasses or transformers ModelOutput" in message
    assert injector.log == []
    assert injector.missed == [Fault(1, "loss", "model output")]
    assert len(model._forward_hooks) == 0


# --- the log holds what happened ------------------------------------------------------------


def test_nan_fault_on_a_parameter_without_gradient_is_missed_not_logged() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 1), "unused": nn.Linear(4, 1)})
    injector = FaultInjector(model, at={1: "nan", 2: "nan"}, parameter="unused.weight")
    missed = r"'nan' fault of step 1 \(unused.weight\) did not happen"
    with pytest.warns(RuntimeWarning, match=missed), injector.step() as fault:
        model["used"](torch.ones(2, 4)).sum().backward()
    assert fault == Fault(1, "nan", "unused.weight")  # what was planned
    assert model["unused"].weight.grad is None
    assert injector.log == []
    assert injector.missed == [fault]
    with injector.step():  # now it gets a gradient: the fault happens
        model["unused"](torch.ones(2, 4)).sum().backward()
    assert injector.log == [Fault(2, "nan", "unused.weight")]
    assert injector.missed == [fault]


def test_spike_and_loss_faults_without_backward_or_forward_are_missed() -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={1: "spike", 2: "loss"})
    for step in (1, 2):
        with pytest.warns(RuntimeWarning, match=f"of step {step}"), injector.step():
            pass  # e.g. a step that was skipped before the forward
    assert injector.log == []
    assert [f.kind for f in injector.missed] == ["spike", "loss"]
    assert hooks_left(model, optimizer) == 0


def test_faults_are_logged_once_per_step_however_often_their_hooks_fire() -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={1: "nan", 2: "spike", 3: "loss"})
    for _ in range(3):
        with injector.step():
            for _ in range(2):  # two micro-batches
                model(torch.ones(3, 4)).pow(2).mean().backward()
    assert [(f.step, f.kind) for f in injector.log] == [(1, "nan"), (2, "spike"), (3, "loss")]


def test_lr_fault_is_logged_when_the_first_optimizer_step_takes_it() -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={1: "lr", 3: "lr", 4: "lr"}, lr_steps=2)

    def update() -> None:
        one_step(model, optimizer)
        optimizer.step()

    with injector.step() as fault:  # no optimizer step in this one (say, a skipped step)
        one_step(model, optimizer)
    assert fault is not None
    assert injector.log == []
    with injector.step():
        update()
    assert injector.log == [Fault(2, "lr", "lr x100 for 2 steps")]
    with injector.step():  # step 3 plans a new one, step 4 replaces it before it took effect
        one_step(model, optimizer)
    replaced = "new 'lr' fault at step 4 replaced it"
    with pytest.warns(RuntimeWarning, match=replaced), injector.step():
        update()
    assert [f.step for f in injector.log] == [2, 4]
    assert [f.step for f in injector.missed] == [3]
    assert injector.missed[0].kind == "lr"


def test_a_step_that_raises_does_not_warn_about_its_fault() -> None:
    model, optimizer = setup()
    injector = FaultInjector(model, optimizer, at={1: "nan"})
    with pytest.raises(KeyError), injector.step():
        raise KeyError("boom")
    assert injector.log == []
    assert len(injector.missed) == 1
    assert hooks_left(model, optimizer) == 0
