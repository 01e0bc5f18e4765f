"""Two-process (gloo, CPU) scenarios for tests/test_distributed.py; run as a script.

    python tests/distributed_scenarios.py SCENARIO OUT_JSON

Each scenario runs on 2 ranks spawned here, checks itself against a single-process
reference computed in the same process, and rank 0 writes its findings to OUT_JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg
from gradguard import _distributed
from gradguard.detect import Spike

WORLD = 2
STEPS = 20


def make_model(seed: int = 0) -> nn.Module:
    """A small MLP whose one-output last layer leaves rank 1 empty shards under FSDP2."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 1)
    )


def full_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g)
    return x, torch.randn(8, 1, generator=g)


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = full_batch(step)
    half = x.shape[0] // WORLD
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return shard(model)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _distributed.is_dtensor(t) else t  # type: ignore[attr-defined]


def gathered_equal(t: torch.Tensor) -> bool:
    """Bitwise equal on every rank (weights must not desynchronise)."""
    value = full(t).detach().contiguous()
    others = [torch.empty_like(value) for _ in range(WORLD)]
    dist.all_gather(others, value)
    return all(torch.equal(others[0], o) for o in others)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element-wise relative error (for norms, which are far from 0)."""
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-12)).max())


def tensor_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the error of a weight or gradient tensor as a whole."""
    diff = torch.linalg.vector_norm(a.detach().double() - b.detach().double())
    return float(diff / torch.linalg.vector_norm(b.detach().double()).clamp(min=1e-12))


def norms_match(kind: str, rank: int) -> dict[str, Any]:
    """Global and per-layer norms equal the single-process ones; 20 clipped steps agree."""
    reference, model = make_model(), wrap(kind, make_model())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_guard = gg.Guard(reference, ref_opt, clip=gg.NormClip(0.5), detectors=None)
    guard = gg.Guard(model, opt, clip=gg.NormClip(0.5), detectors=None)
    out: dict[str, Any] = {"total": 0.0, "per_layer": 0.0, "per_tensor": 0.0, "loss": 0.0}
    for step in range(STEPS):
        x, y = full_batch(step)
        ref_opt.zero_grad()
        ref_loss = nn.functional.mse_loss(reference(x), y)
        ref_loss.backward()
        ref_stats = gg.grad_stats(reference)
        xl, yl = local_batch(step, rank)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xl), yl)
        loss.backward()
        stats = gg.grad_stats(model, loss=loss)
        out["total"] = max(out["total"], rel_err(stats.total, ref_stats.total))
        out["per_layer"] = max(out["per_layer"], rel_err(stats.per_layer, ref_stats.per_layer))
        out["per_tensor"] = max(out["per_tensor"], rel_err(stats.per_tensor, ref_stats.per_tensor))
        assert stats.loss is not None
        out["loss"] = max(out["loss"], rel_err(stats.loss, ref_loss.detach()))
        ref_report = ref_guard.step(ref_loss)
        report = guard.step(loss)
        out["clipped_steps"] = out.get("clipped_steps", 0) + int(float(ref_report.scale) < 1)
        out["scale"] = max(out.get("scale", 0.0), rel_err(report.scale, ref_report.scale))
        pairs = zip(model.parameters(), reference.parameters(), strict=True)
        out["grads"] = max(
            out.get("grads", 0.0),
            max(tensor_rel_err(full(p.grad), r.grad) for p, r in pairs),  # type: ignore[arg-type]
        )
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    out["weights"] = max(tensor_rel_err(full(p), r) for p, r in pairs)
    out["layer_names"] = list(stats.layer_names)
    out["replicas_equal"] = all(gathered_equal(p) for p in model.parameters())
    return out


def nan_on_one_rank(kind: str, rank: int) -> dict[str, Any]:
    """A NaN in rank 0's gradient only: every rank skips; weights stay identical and unchanged."""
    model = wrap(kind, make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, log_every=5)
    skipped = []
    for step in range(10):
        xl, yl = local_batch(step, rank)
        opt.zero_grad()
        if kind == "ddp" and step == 6 and rank == 0:  # before DDP's all-reduce
            handle = next(model.parameters()).register_hook(lambda g: g * float("nan"))
        loss = nn.functional.mse_loss(model(xl), yl)
        loss.backward()
        if kind == "ddp" and step == 6 and rank == 0:
            handle.remove()
        if kind == "fsdp" and step == 6 and rank == 0:  # after reduce-scatter: one shard
            # The last layer's weight has one row: rank 0 holds it and rank 1 an empty shard.
            grad = list(model.parameters())[-2].grad
            assert grad is not None
            _distributed.local(grad).view(-1)[0] = float("nan")
        before = [full(p).detach().clone() for p in model.parameters()]
        report = guard.step(loss)
        skipped.append(bool(report.skipped))
        if step == 6:
            unchanged = all(
                torch.equal(b, full(p)) for b, p in zip(before, model.parameters(), strict=True)
            )
    guard.close()
    return {
        "skipped": skipped,
        "unchanged_across_skip": unchanged,
        "replicas_equal": all(gathered_equal(p) for p in model.parameters()),
        "events": [(e.step, e.kind) for e in guard.events],
        "finite": all(bool(torch.isfinite(full(p)).all()) for p in model.parameters()),
    }


def digest(tree: Any) -> str:
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            v = _distributed.local(value).detach().contiguous().reshape(-1)
            h.update(v.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                walk(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        else:
            h.update(repr(value).encode())

    walk(tree)
    return h.hexdigest()


def rollback_on_every_rank(kind: str, rank: int, storage: str = "memory") -> dict[str, Any]:
    """A gradient spike on rank 0's shard: the same rollback on both ranks, state bitwise back."""
    model = wrap(kind, make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = os.environ.get("GG_SNAPSHOT_DIR") if storage == "disk" else None
    rollback = gg.Rollback(
        every=10,
        cooldown=5,
        spike_metrics=("grad_norm", "loss"),
        storage=storage,
        path=path,  # type: ignore[arg-type]
    )
    guard = gg.Guard(
        model,
        opt,
        detectors=[Spike(window=16, min_samples=8, sigma=6.0)],
        recovery=rollback,
        log_every=10,
    )
    at_snapshot = ""
    for step in range(1, 41):
        xl, yl = local_batch(step % 4, rank)
        opt.zero_grad()
        spike_here = step == 33 and rank == 0
        if spike_here and kind == "ddp":  # before DDP's all-reduce, as a real fault would be
            handle = next(model.parameters()).register_hook(lambda g: g * 1e4)
        loss = nn.functional.mse_loss(model(xl), yl)
        loss.backward()
        if spike_here and kind == "ddp":
            handle.remove()
        if spike_here and kind == "fsdp":  # one rank's shard, after reduce-scatter
            grad = next(model.parameters()).grad
            assert grad is not None
            _distributed.local(grad).mul_(1e4)
        guard.step(loss)
        if step == 30:
            at_snapshot = digest({"model": model.state_dict(), "optim": opt.state_dict()})
        if guard.events and guard.events[-1].kind == "rollback":
            break
    after = digest({"model": model.state_dict(), "optim": opt.state_dict()})
    return {
        "events": [(e.step, e.kind) for e in guard.events],
        "step_count": guard.step_count,
        "restored_bitwise": after == at_snapshot,
        "replicas_equal": all(gathered_equal(p) for p in model.parameters()),
        "snapshot_files": sorted(os.listdir(path)) if path else [],
    }


def rollback_from_disk(kind: str, rank: int) -> dict[str, Any]:
    """The same, with snapshots on disk (torch.distributed.checkpoint under FSDP2)."""
    return rollback_on_every_rank(kind, rank, storage="disk")


def one_all_reduce_per_step(kind: str, rank: int) -> dict[str, Any]:
    """Count every torch.distributed.all_reduce issued inside guard.step between drains."""
    model = wrap(kind, make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, opt, clip=gg.ZClip(warmup_steps=3), log_every=50)
    calls = [0]
    real = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    per_step = []
    for step in range(12):
        xl, yl = local_batch(step, rank)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xl), yl)
        loss.backward()
        calls[0] = 0
        dist.all_reduce = counting
        try:
            guard.step(loss)
        finally:
            dist.all_reduce = real
        per_step.append(calls[0])
    return {"all_reduces_per_step": per_step, "sync_count": guard.sync_count}


def flat_grads_match(kind: str, rank: int) -> dict[str, Any]:
    """DDP with flat gradient buffers: bitwise the per-tensor path, a NaN step skipped."""
    import warnings

    assert kind == "ddp"
    plain, flat_model = wrap(kind, make_model()), wrap(kind, make_model())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    flat_opt = torch.optim.SGD(flat_model.parameters(), lr=0.1, momentum=0.9)
    plain_guard = gg.Guard(plain, plain_opt, clip=gg.NormClip(0.5), detectors=None)
    flat_guard = gg.Guard(
        flat_model, flat_opt, clip=gg.NormClip(0.5), detectors=None, flat_grads=True
    )
    flat = flat_guard.flat_grads
    assert flat is not None
    out: dict[str, Any] = {"stats_equal": True, "grads_equal": True, "flat_path": True}
    skipped = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            xl, yl = local_batch(step, rank)
            losses = []
            for model, guard in ((plain, plain_guard), (flat_model, flat_guard)):
                guard.zero_grad()
                handle = None
                if step == 6 and rank == 0:  # a NaN on rank 0 only, before DDP's all-reduce
                    handle = next(model.parameters()).register_hook(lambda g: g * float("nan"))
                loss = nn.functional.mse_loss(model(xl), yl)
                loss.backward()
                if handle is not None:
                    handle.remove()
                losses.append(loss)
            a, b = gg.grad_stats(plain), gg.grad_stats(flat_model)
            out["flat_path"] &= b.grad_groups == ([flat.buffers[0]],) and flat.attached()
            out["stats_equal"] &= all(  # bitwise, NaN where NaN (the skipped step)
                torch.allclose(x, y, rtol=0.0, atol=0.0, equal_nan=True)
                for x, y in ((a.per_tensor, b.per_tensor), (a.total, b.total))
            )
            reports = [plain_guard.step(losses[0]), flat_guard.step(losses[1])]
            skipped.append([bool(r.skipped) for r in reports])
            pairs = zip(plain.parameters(), flat_model.parameters(), strict=True)
            out["grads_equal"] &= step == 6 or all(torch.equal(p.grad, q.grad) for p, q in pairs)  # type: ignore[arg-type]
    pairs = zip(plain.parameters(), flat_model.parameters(), strict=True)
    out["weights_equal"] = all(torch.equal(p, q) for p, q in pairs)
    out["skipped"] = skipped
    out["warnings"] = [str(w.message) for w in caught if "flat gradient" in str(w.message)]
    out["replicas_equal"] = all(gathered_equal(p) for p in flat_model.parameters())
    out["still_views"] = flat.attached()
    return out


SCENARIOS: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "norms": norms_match,
    "nan": nan_on_one_rank,
    "rollback": rollback_on_every_rank,
    "rollback-disk": rollback_from_disk,
    "allreduce": one_all_reduce_per_step,
    "flat": flat_grads_match,
}


def worker(rank: int, scenario: str, kind: str, store: str, out: str) -> None:
    torch.set_num_threads(1)
    # A file store, not a TCP port: no race for a free port with other processes.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    result = SCENARIOS[scenario](kind, rank)
    results: list[Any] = [None] * WORLD
    dist.all_gather_object(results, result)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"ranks": results}, handle)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without
    # an active exception", seen under load): the results are written, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    scenario_name, wrapper_kind, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    with tempfile.TemporaryDirectory() as tmp:
        store_file = os.path.join(tmp, "store")
        os.environ["GG_SNAPSHOT_DIR"] = os.path.join(tmp, "snapshots")
        mp.spawn(worker, args=(scenario_name, wrapper_kind, store_file, out_path), nprocs=WORLD)
