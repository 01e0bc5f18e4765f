"""Two-process (gloo, CPU) runs of the Lightning and Hugging Face callbacks; run as a script.

    python tests/integration_scenarios_distributed.py SCENARIO OUT_JSON

Scenarios:

- ``lightning-ddp``: ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``;
- ``lightning-fsdp2``: ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``;
- ``hf-ddp``: ``transformers.Trainer(use_cpu=True, ddp_backend="gloo")``, which wraps in DDP;
- ``hf-fsdp2``: the same Trainer with a model that transformers shards with FSDP2 at load
  time, ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``.

Each rank trains ``STEPS`` optimizer steps with the gradguard callback (``NormClip``) while
two faults hit ONE rank each: a NaN in rank 0's forward pass at step ``NAN_FORWARD`` (its
inputs, or its logits for BERT) and a NaN in rank 1's gradient at step ``NAN_GRAD`` (through
a gradient hook, before DDP's all-reduce; in rank 1's own shard, after the reduce-scatter,
under FSDP2). The ranks' records are gathered, and rank 0 replays the same steps in one
process on each step's global batch (both ranks' batches, concatenated): the
single-process reference. Rank 0 writes both to OUT_JSON.

The ranks share a file store, not a TCP port (the frameworks find the process group
initialised and use it); collectives time out after ``TIMEOUT``; each rank leaves with
``os._exit`` once the results are written, because gloo's teardown can abort.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import gradguard as gg
from gradguard import _distributed
from gradguard.records import Event, Window

WORLD = 2
STEPS = 12
BATCH = 4  # per rank
LOG_EVERY = 4
CLIP = 0.5
NAN_FORWARD = (4, 0)  # (optimizer step, rank): a NaN in that rank's forward pass only
NAN_GRAD = (9, 1)  # (optimizer step, rank): a NaN in that rank's gradient only
TIMEOUT = datetime.timedelta(seconds=60)
# BERT's attention key bias gets a zero gradient in exact arithmetic (softmax ignores a
# shift shared by every key), so its gradient is rounding noise that AdamW scales to
# full-size steps: its weights are pure noise and are left out of the weight comparison.
NOISE_ONLY = ".attention.self.key.bias"


class Recorder:
    """A gradguard sink that keeps every drained step on this rank."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}

    def open(self, meta: Mapping[str, Any]) -> None:
        """Nothing to open."""

    def write(self, window: Window, events: Sequence[Event]) -> None:
        """Keep each step's norm, loss and skip flag."""
        for i, step in enumerate(window.steps):
            self.rows[int(step)] = {
                "grad_norm": float(window.grad_norm[i]),
                "loss": float(window.loss[i]),
                "skipped": bool(window.skipped[i]),
            }

    def close(self) -> None:
        """Nothing to close."""


def full(t: Tensor) -> Tensor:
    """The whole tensor (a collective under FSDP2: every rank calls it)."""
    return t.full_tensor() if _distributed.is_dtensor(t) else t  # type: ignore[attr-defined]


def local_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Copies of this rank's own parameters (shards) and optimizer state."""
    state = [
        _distributed.local(v).detach().clone()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, Tensor)
    ]
    return [_distributed.local(p).detach().clone() for p in module.parameters()] + state


def moved(before: list[Tensor], after: list[Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def weights_of(module: nn.Module) -> dict[str, Any]:
    """Whole weights by name, their digest (bitwise identity) and whether all are finite."""
    weights = {name: full(p).detach() for name, p in module.named_parameters()}
    h = hashlib.sha256()
    for w in weights.values():
        h.update(w.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "weights": {name: w.tolist() for name, w in weights.items()},
        "weights_digest": h.hexdigest(),
        "finite": all(bool(torch.isfinite(w).all()) for w in weights.values()),
        "dtensor_params": all(_distributed.is_dtensor(p) for p in module.parameters()),
    }


def poison_gradient(param: Tensor) -> Callable[[], None]:
    """NaN into this rank's gradient of ``param`` before DDP averages it; returns the undo."""
    handle = param.register_hook(lambda g: g * math.nan)
    return handle.remove


def poison_shard(param: Tensor) -> None:
    """NaN into this rank's shard of ``param``'s gradient, after FSDP2's reduce-scatter."""
    assert param.grad is not None
    _distributed.local(param.grad).view(-1)[0] = math.nan


class GradientFault:
    """Rank ``NAN_GRAD[1]``'s NaN gradient at optimizer step ``NAN_GRAD[0]``, on no other rank.

    Under DDP a gradient hook armed before the backward pass poisons the gradient before
    the all-reduce averages it; under FSDP2 the rank's own shard is poisoned after the
    reduce-scatter. ``param`` is a getter: FSDP2 replaces the parameters when it shards.
    """

    def __init__(self, param: Callable[[], Tensor], rank: int, sharded: bool) -> None:
        self.param, self.rank, self.sharded = param, rank, sharded
        self._undo: Callable[[], None] = lambda: None

    def before_backward(self, step: int) -> None:
        if (step, self.rank) == NAN_GRAD and not self.sharded:
            self._undo = poison_gradient(self.param())

    def after_backward(self, step: int) -> None:
        self._undo()
        self._undo = lambda: None
        if (step, self.rank) == NAN_GRAD and self.sharded:
            poison_shard(self.param())


def nan_input(x: Tensor, step: int, rank: int) -> Tensor:
    """Rank ``NAN_FORWARD[1]``'s inputs with a NaN at step ``NAN_FORWARD[0]``."""
    if (step, rank) != NAN_FORWARD:
        return x
    x = x.clone()
    x[0, 0] = math.nan
    return x


def nan_output(module: nn.Module, step: int, rank: int) -> Callable[[], None]:
    """NaN outputs of ``module`` on rank ``NAN_FORWARD[1]`` at that step; returns the undo."""
    if (step, rank) != NAN_FORWARD:
        return lambda: None
    return module.register_forward_hook(lambda m, args, out: out * math.nan).remove


# --- Lightning ------------------------------------------------------------------------


def make_net() -> nn.Sequential:
    """Every tensor has at least 2 rows, so each rank's FSDP2 shard of it is non-empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))


def loader() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH * WORLD, 4, generator=g)
    y = torch.stack([torch.sin(x[:, 0]) - x[:, 1], torch.cos(x[:, 2])], dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def shard(net: nn.Sequential, mesh: Any) -> None:
    """FSDP2: each Linear, then the whole net, as ``configure_model`` should."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def strategy_for(sharded: bool) -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    if sharded:  # all ranks shard one model: 2 data-parallel ranks, no tensor parallelism
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    return "ddp"


def logged_by_lightning(rows: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """Skipped steps and events a logger got; Lightning's step of optimizer step s is s - 1."""
    return {
        "logged_skips": sorted(s + 1 for s, row in rows if row.get("gradguard/skipped")),
        "logged_events": sorted(
            (s + 1, name.rsplit("/", 1)[1])
            for s, row in rows
            for name in row
            if name.startswith("gradguard/event/")
        ),
    }


def lightning_observers() -> tuple[Any, Any]:
    """A logger that keeps its rows on every rank, and a callback that sees steps move."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers.logger import Logger

    class EveryRankLogger(Logger):
        """Keeps what it is given, on every rank (Lightning's own loggers write on rank 0)."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "every-rank"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            self.rows.append((int(step or 0), dict(metrics)))

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    class Moves(pl.Callback):
        """Whether each optimizer step moved this rank's weights or optimizer state."""

        def __init__(self) -> None:
            self.moved: dict[int, bool] = {}
            self.wrapper = ""

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            self.wrapper = type(trainer.strategy.model).__name__  # unwrapped again at the end
            self.before = local_state(module, trainer.optimizers[0])

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int
        ) -> None:
            after = local_state(module, trainer.optimizers[0])
            self.moved[trainer.global_step] = moved(self.before, after)

    return EveryRankLogger, Moves


def lightning_run(rank: int, sharded: bool) -> dict[str, Any]:
    """``Trainer(accelerator="cpu", devices=2)`` with DDP, or ModelParallelStrategy + FSDP2."""
    import lightning.pytorch as pl

    from gradguard.integrations.lightning import GradGuardCallback

    EveryRankLogger, Moves = lightning_observers()

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()
            self.batches: list[tuple[list[Any], list[Any]]] = []
            self.fault = GradientFault(lambda: self.net[0].weight, rank, sharded)

        def configure_model(self) -> None:  # ModelParallelStrategy calls it in its setup
            if sharded:
                shard(self.net, self.device_mesh["data_parallel"])

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            x = nan_input(x, self.global_step + 1, self.global_rank)
            self.batches.append((x.tolist(), y.tolist()))
            self.fault.before_backward(self.global_step + 1)
            return nn.functional.mse_loss(self.net(x), y)

        def on_after_backward(self) -> None:
            self.fault.after_backward(self.global_step + 1)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    recorder, moves, logger = Recorder(), Moves(), EveryRankLogger()
    callback = GradGuardCallback(clip=gg.NormClip(CLIP), log_every=LOG_EVERY, sinks=[recorder])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy_for(sharded),
        max_steps=STEPS,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[moves, callback],
    )
    module = Regressor()
    trainer.fit(module, loader())
    assert callback.guard is not None
    return {
        "strategy": type(trainer.strategy).__name__,
        "wrapper": moves.wrapper,
        # the guard numbers optimizer step s as Lightning logs it, s - 1: held to the
        # optimizer steps of the other scenarios, as logged_by_lightning does
        "steps": {step + 1: row for step, row in recorder.rows.items()},
        "events": [(e.step + 1, e.kind) for e in callback.guard.events],
        "moved": moves.moved,
        "batches": module.batches,
        "handed_back": not isinstance(trainer.optimizers[0], gg.GuardedOptimizer),
        **logged_by_lightning(logger.rows),
        **weights_of(module),
    }


def reference_step(guard: gg.Guard, loss: torch.Tensor) -> dict[str, Any]:
    """Step the single-process reference's guard; return what the ranks' logs are held to."""
    report = guard.step(loss)
    return {
        "grad_norm": float(report.grad_norm),
        "loss": float(loss.detach()),
        "skipped": bool(report.skipped),
    }


def lightning_reference(ranks: list[dict[str, Any]], tmp: str) -> dict[str, Any]:
    """The same steps in one process, on each step's global batch (both ranks' batches)."""
    net = make_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    guard = gg.Guard(net, optimizer, clip=gg.NormClip(CLIP), log_every=LOG_EVERY)
    steps: dict[int, dict[str, Any]] = {}
    for step in range(1, STEPS + 1):
        parts = [r["batches"][step - 1] for r in ranks]
        x = torch.tensor([row for part in parts for row in part[0]])
        y = torch.tensor([row for part in parts for row in part[1]])
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        if step == NAN_GRAD[0]:
            assert net[0].weight.grad is not None
            net[0].weight.grad.view(-1)[0] = math.nan
        steps[step] = reference_step(guard, loss)
    guard.close()
    return {"steps": steps, "weights": {f"net.{n}": p.tolist() for n, p in net.named_parameters()}}


# --- Hugging Face ---------------------------------------------------------------------

HF_LR = 1e-2
POISONED = "bert.encoder.layer.1.output.dense.weight"


def tiny_bert_config() -> Any:
    """A 2-layer BERT without dropout, so one process can replay the ranks' steps exactly."""
    import transformers

    return transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


class Tokens(torch.utils.data.Dataset[dict[str, Tensor]]):
    """Random 8-token sequences; the label says whether the first token is in the top half."""

    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] // 16}


def logged_by_hf(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Skipped steps (summed over the summary rows) and events in the Trainer's history."""
    return {
        "logged_skips": sum(r["gradguard/skipped"] for r in history if "gradguard/skipped" in r),
        "logged_events": sorted(
            (r["step"], k.rsplit("/", 1)[1])
            for r in history
            for k in r
            if k.startswith("gradguard/event/")
        ),
    }


def load_bert(rank: int, sharded: bool, tmp: str) -> Any:
    """Rank 0 saves a tiny BERT; every rank loads it (sharded by transformers under FSDP2)."""
    import transformers

    model_dir = os.path.join(tmp, "bert")
    if rank == 0:
        torch.manual_seed(0)
        transformers.BertForSequenceClassification(tiny_bert_config()).save_pretrained(model_dir)
    dist.barrier()
    options: dict[str, Any] = {}
    if sharded:
        plan = {"bert.encoder.layer.*": "free_full_weight"}  # and the root, always
        options["distributed_config"] = transformers.DistributedConfig(
            fsdp_size=WORLD, fsdp_plan=plan
        )
    return transformers.BertForSequenceClassification.from_pretrained(model_dir, **options)


def hf_run(rank: int, sharded: bool, tmp: str) -> dict[str, Any]:
    """``transformers.Trainer`` on 2 CPU processes: DDP, or FSDP2 applied by transformers."""
    import transformers

    from gradguard.integrations.transformers import GradGuardCallback

    model = load_bert(rank, sharded, tmp)
    inputs: list[dict[str, Any]] = []

    def record(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            inputs.append(
                {k: kwargs[k].tolist() for k in ("input_ids", "attention_mask", "labels")}
            )

    model.register_forward_pre_hook(record, with_kwargs=True)
    fault = GradientFault(lambda: model.get_parameter(POISONED), rank, sharded)

    class Faults(transformers.TrainerCallback):
        """The two one-rank faults, and whether each step moved this rank's state."""

        def __init__(self) -> None:
            self.moved: dict[int, bool] = {}
            self._undo: Callable[[], None] = lambda: None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # NaN logits on one rank: a NaN loss there only
            self._undo = nan_output(model.classifier, state.global_step + 1, rank)
            fault.before_backward(state.global_step + 1)
            self.before = local_state(model, kwargs["optimizer"])

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._undo()
            fault.after_backward(state.global_step + 1)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            after = local_state(model, kwargs["optimizer"])
            self.moved[state.global_step] = moved(self.before, after)

    recorder, faults = Recorder(), Faults()
    callback = GradGuardCallback(clip=gg.NormClip(CLIP), log_every=LOG_EVERY, sinks=[recorder])
    args = transformers.TrainingArguments(
        output_dir=os.path.join(tmp, "out"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=HF_LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # the guard clips, and measures the norm before clipping
        # True multiplies the loss by the world size for models whose forward takes **kwargs,
        # expecting a loss summed over tokens; BERT's classification loss is a batch mean,
        # so DDP's gradient would be twice the global batch's and no reference would match.
        average_tokens_across_devices=False,
        logging_nan_inf_filter=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[faults, callback]
    )
    trainer.train()
    assert callback.guard is not None
    return {
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "wrapper": type(trainer.model_wrapped).__name__,
        "fused": callback.guard.fused,
        "steps": recorder.rows,
        "events": [(e.step, e.kind) for e in callback.guard.events],
        "moved": faults.moved,
        "inputs": inputs,
        "handed_back": not isinstance(trainer.optimizer.optimizer, gg.GuardedOptimizer),
        **logged_by_hf(trainer.state.log_history),
        **weights_of(model),
    }


def hf_reference(ranks: list[dict[str, Any]], tmp: str) -> dict[str, Any]:
    """The same steps in one process, on each step's global batch (both ranks' batches)."""
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(os.path.join(tmp, "bert"))
    model.train()
    # what TrainingArguments' defaults build: fused AdamW, no weight decay, a constant LR
    optimizer = torch.optim.AdamW(model.parameters(), lr=HF_LR, weight_decay=0.0, fused=True)
    guard = gg.Guard(model, optimizer, clip=gg.NormClip(CLIP), log_every=LOG_EVERY)
    poisoned = dict(model.named_parameters())[POISONED]
    steps: dict[int, dict[str, Any]] = {}
    for step in range(1, STEPS + 1):
        batch = {
            key: torch.tensor([row for r in ranks for row in r["inputs"][step - 1][key]])
            for key in ("input_ids", "attention_mask", "labels")
        }
        optimizer.zero_grad()
        loss = model(**batch)["loss"]
        loss.backward()
        if step in (NAN_FORWARD[0], NAN_GRAD[0]):  # the replayed faults: skipped steps
            assert poisoned.grad is not None
            poisoned.grad.view(-1)[0] = math.nan
        steps[step] = reference_step(guard, loss)
    guard.close()
    return {"steps": steps, "weights": {n: p.tolist() for n, p in model.named_parameters()}}


# --- the harness ----------------------------------------------------------------------


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(ranks: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any]:
    """The largest relative differences between every rank's records and the reference."""
    norm_err = loss_err = weight_err = 0.0
    for r in ranks:
        for step, ref in reference["steps"].items():
            if not ref["skipped"]:
                norm_err = max(norm_err, rel_err(r["steps"][step]["grad_norm"], ref["grad_norm"]))
                loss_err = max(loss_err, rel_err(r["steps"][step]["loss"], ref["loss"]))
        for name, ref_w in reference["weights"].items():
            if name.endswith(NOISE_ONLY):
                continue
            a = torch.tensor(r["weights"][name], dtype=torch.float64)
            b = torch.tensor(ref_w, dtype=torch.float64)
            weight_err = max(weight_err, float(torch.linalg.vector_norm(a - b) / b.norm()))
    return {
        "grad_norm_rel_err": norm_err,
        "loss_rel_err": loss_err,
        "weights_rel_err": weight_err,
        "skipped": sorted(s for s, ref in reference["steps"].items() if ref["skipped"]),
        "clipped": sum(ref["grad_norm"] > CLIP for ref in reference["steps"].values()),
    }


SCENARIOS: dict[str, tuple[Callable[[int, str], dict[str, Any]], Callable[..., dict[str, Any]]]] = {
    "lightning-ddp": (lambda rank, tmp: lightning_run(rank, sharded=False), lightning_reference),
    "lightning-fsdp2": (lambda rank, tmp: lightning_run(rank, sharded=True), lightning_reference),
    "hf-ddp": (lambda rank, tmp: hf_run(rank, False, tmp), hf_reference),
    "hf-fsdp2": (lambda rank, tmp: hf_run(rank, True, tmp), hf_reference),
}


def worker(rank: int, scenario: str, tmp: str, out: str) -> None:
    torch.set_num_threads(1)
    # What a launcher sets; with LOCAL_RANK set, Lightning does not launch processes itself.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    store = f"file://{os.path.join(tmp, 'store')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=TIMEOUT)
    run, reference = SCENARIOS[scenario]
    result = run(rank, tmp)
    results: list[Any] = [None] * WORLD
    dist.all_gather_object(results, result)
    if rank == 0:
        compared = compare(results, reference(results, tmp))
        with open(out, "w") as handle:
            json.dump({"ranks": results, "compare": compared}, handle)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    scenario_name, out_path = sys.argv[1], sys.argv[2]
    # Import the framework once, then fork the ranks: they start without importing again.
    if scenario_name.startswith("lightning"):
        import lightning.pytorch  # noqa: F401
    else:
        import transformers  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp_dir:
        args = (scenario_name, tmp_dir, out_path)
        mp.start_processes(worker, args=args, nprocs=WORLD, start_method="fork")
