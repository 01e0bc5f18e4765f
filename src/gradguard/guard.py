"""Guard: the drop-in replacement for ``optimizer.step()``, and the one composition root.

Per step, on the device: measure (``grad_stats``), clip (a policy), step or skip the
optimizer, and write the step's statistics into a fixed ring buffer. Every ``log_every``
steps the buffer is copied to the host once (a drain) and handed to the detectors, the
recovery and the sinks. Host syncs are counted in ``guard.sync_count``; each one carries a
``# sync:`` comment with its reason: the drain's copy here, the read path's one read per
step and the rare non-finite reads in ``_stepping``.
"""

from __future__ import annotations

import os
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradguard._accumulate import MicroBatches
from gradguard._amp import unscale_once
from gradguard._checks import MAX_LOG_EVERY as MAX_LOG_EVERY
from gradguard._checks import (
    _check_accumulation,
    _check_optimizer_params,
    _check_parameters,
    _check_saved_state,
    _detectors,
    _optimizer_shape,
    _Registrations,
    _validate,
    check_parameter_set,
)
from gradguard._compile import eager as _eager
from gradguard._flatten import flatten_grads_
from gradguard._guarded_optimizer import GuardedOptimizer as GuardedOptimizer
from gradguard._meta import guard_meta
from gradguard._ownership import claim, release
from gradguard._ring import StepBuffer, check_sample_losses
from gradguard._run_facts import run_facts
from gradguard._stepping import (
    StepPaths,
    prime_fused_state,
    replay_scheduler,
    scheduler_state,
    supports_found_inf,
)
from gradguard._updates import layer_weight_norms, update_probe
from gradguard.errors import ConfigError, GradGuardError
from gradguard.explain import Explainer, Streaks, jsonable
from gradguard.protocols import ClipPolicy, Detector, Sink
from gradguard.protocols import Recovery as Recovery
from gradguard.records import Event, StepReport, Window
from gradguard.sinks import run_dir_sinks
from gradguard.stats import (
    grad_stats,
    layout_for,
    uncompiled,
)

NonFiniteMode = Literal["skip", "raise", "zero"]
#: batch ids kept for the log of a rollback (the steps it undoes)
_BATCH_HISTORY = 4096


class Guard(StepPaths):
    """Measure, clip, skip non-finite steps, detect trouble and log, in place of ``step()``.

    Use ``guard.step(loss)`` where the loop called ``optimizer.step()`` (after
    ``loss.backward()``; call ``zero_grad`` as usual). For frameworks that call
    ``optimizer.step()`` themselves, pass ``guard.wrap()`` as their optimizer.

    Skipping is exact: on a skipped step parameters, optimizer state (moments, step
    counts) and the LR scheduler stay as they were. Fused optimizers (``fused=True``)
    skip on the device through ``found_inf``, as ``GradScaler`` does, with no host sync;
    the scheduler increment of a skipped step is then undone at the next drain (within
    ``log_every`` steps). Other optimizers cost one host read per step, as with
    ``GradScaler``. Before the first fused step the guard creates the optimizer's state
    with a cancelled step, so a skipped first step leaves the state a first step starts
    from (zero moments, step 0) rather than none.

    Args:
        model: the module being trained.
        optimizer: its optimizer.
        clip: a clipping policy (``gg.NormClip(1.0)``, ``gg.ZClip()``, ...) or None.
        nonfinite: ``"skip"`` the step, ``"raise"`` :class:`GradGuardError` naming the
            parameters, or ``"zero"`` the offending tensors' gradients and step.
            ``"raise"`` and ``"zero"`` read a flag on the host every step.
        detectors: ``"default"`` (:func:`gradguard.detect.default_detectors`), a list, or
            None for none.
        recovery: a recovery strategy such as ``gg.Rollback(...)``, or None.
        scheduler: an LR scheduler the guard steps after each real optimizer step.
        scaler: a ``torch.amp.GradScaler``; the guard unscales, steps through it and
            agrees with it on skipped steps.
        log_every: steps between drains (one device-to-host copy each).
        run_dir: a directory for the JSONL logs (``docs/run-format.md``). One open guard
            writes it at a time; a directory that holds another run's logs is refused at
            the first step unless this guard resumes that run (:meth:`load_state_dict`)
            or ``overwrite_run_dir`` is set.
        overwrite_run_dir: replace the logs another run left in ``run_dir``.
        on_event: called with every event, at the drain that raised it.
        sinks: extra sinks besides the run directory's.
        tensorboard: with ``run_dir``, also write TensorBoard event files to
            ``run_dir/tensorboard``: None when the package is installed, True always
            (:class:`ConfigError` when it is not installed), False never.
        process_group: the group (or 1-D device mesh) the statistics and the loss are
            reduced over (``grad_stats``'s argument); detected from DDP or the DTensor
            gradients otherwise. Give DDP's group when ``model`` is the module inside
            the DDP wrapper, so the loss is averaged over the ranks too.
        accumulation_steps: for gradient accumulation with ``guard.step`` called after
            every micro-batch's backward: the number of micro-batches per optimizer step,
            or a function called at each ``guard.step`` that returns True when this
            micro-batch completes the gradients (``lambda: accelerator.sync_gradients``).
            The other calls only keep the micro-batch's loss and batch id, on the device:
            the optimizer step is measured, clipped, skipped and logged once, with the
            mean loss of its micro-batches and their batch ids.
        flat_grads: every gradient a view into one buffer per (device, dtype)
            (:func:`gradguard.flatten_grads_`); zero them with :meth:`zero_grad`.

    Attributes:
        step_count: the number of the last step (0 before the first). A loop that
            numbers its steps otherwise (a trainer's ``global_step``, a resumed run) may
            set it before the first step; the next step is numbered ``step_count + 1``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip: ClipPolicy | None = None,
        nonfinite: NonFiniteMode = "skip",
        detectors: Literal["default"] | Sequence[Detector] | None = "default",
        recovery: Recovery | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        scaler: torch.amp.GradScaler | None = None,
        log_every: int = 10,
        run_dir: str | os.PathLike[str] | None = None,
        on_event: Callable[[Event], None] | None = None,
        sinks: Iterable[Sink] = (),
        tensorboard: bool | None = None,
        process_group: Any = None,
        overwrite_run_dir: bool = False,
        accumulation_steps: int | Callable[[], bool] = 1,
        flat_grads: bool = False,
    ) -> None:
        model = uncompiled(model)  # torch.compile(model): the same parameters, its own names
        _validate(model, optimizer, clip, nonfinite, recovery, scheduler, log_every, on_event)
        _check_accumulation(accumulation_steps)
        self.model = model
        self.optimizer = optimizer
        self.clip = clip
        self.nonfinite: NonFiniteMode = nonfinite
        self.detectors: list[Detector] = _detectors(detectors)
        self.recovery = recovery
        self.scheduler = scheduler
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.log_every = log_every
        self.on_event = on_event
        self.accumulation_steps = accumulation_steps
        self._micro = MicroBatches()
        self.sinks: list[Sink] = [*run_dir_sinks(run_dir, tensorboard, overwrite_run_dir), *sinks]
        self.run_dir = None if run_dir is None else os.fspath(run_dir)
        self.process_group = process_group
        _check_parameters(model)
        _check_optimizer_params(model, optimizer)
        _Registrations.install()
        self._registrations = _Registrations.count
        self._optimizer_shape = _optimizer_shape(optimizer)
        self.flat_grads = flatten_grads_(model) if flat_grads else None
        layout = layout_for(model, process_group)
        self.layer_names = layout.layer_names
        self.tensor_names = layout.names
        self.tensor_params = layout.params
        self.device = layout.device
        self.fused = supports_found_inf(optimizer)
        self.events: list[Event] = []
        self.should_stop = False
        self.sync_count = 0
        self.step_count = 0
        self._state_primed = False
        self.lr_factor = 1.0  # a recovery's cool-down; applied only around optimizer steps
        self._true, self._false = layout.true, layout.false
        self._steps = StepBuffer(
            log_every, self.layer_names, self.tensor_names, self.device, (self._true, self._false)
        )
        self._nan, self._one, self._zero = self._steps.nan, self._steps.one, self._steps.zero
        self._scheduler_at_window_start: dict[str, Any] | None = None
        self._raise_after: GradGuardError | None = None
        self._zeroed: Tensor | None = None  # per-tensor norms of a step whose NaN was zeroed
        self._batches: deque[tuple[int, Any]] = deque(maxlen=_BATCH_HISTORY)
        self._probe = update_probe(layout, self.layer_names)
        self._update_pending: Tensor | None = None
        self.explainer = Explainer(run_facts(self))
        self._streaks = Streaks(log_every)
        self._closed = False
        # The parameter norms the next drain compares with: on the host after a drain, on
        # the device (no sync) until then, copied with the first drain's rows.
        self._last_weight_norm: np.ndarray[Any, Any] | None = None
        self._weight_norm_pending = self._weight_norms()
        self._claimed: list[object] = []
        self._sinks_started = False
        # The first and last gradients the last step used, with their in-place versions.
        self._used_grads: list[tuple[weakref.ref[Tensor], int]] = []
        self._take_ownership()

    def _take_ownership(self) -> None:
        """Claim the optimizer, detectors and sinks, open the sinks, attach the recovery.

        A guard that fails to build owns nothing: the caller may retry with the same
        optimizer, detectors, sinks and run directory.
        """
        opened: list[Sink] = []
        try:
            self._claim(
                self.optimizer, "optimizer", "build one Guard per optimizer, or close() the other"
            )
            for detector in self.detectors:
                self._claim(detector, "detector", "give each Guard its own detector objects")
            for sink in self.sinks:
                self._claim(sink, "sink", "give each Guard its own sink objects")
            for sink in self.sinks:
                sink.open(guard_meta(self))
                opened.append(sink)
            if self.recovery is not None:
                self.recovery.attach(self)
        except BaseException:
            for sink in opened:
                sink.close()
            release(self, self._claimed)
            self._claimed = []
            raise

    # --- the step ---------------------------------------------------------------------

    @_eager
    def step(
        self,
        loss: Tensor | float | None = None,
        *,
        batch: Any = None,
        sample_losses: Tensor | None = None,
    ) -> StepReport:
        """Measure, clip, then step the optimizer or skip the step; return what happened.

        Args:
            loss: this step's loss (a scalar tensor or float), for spike and divergence
                detection and the logs; optional.
            batch: an id of this step's batch (indices, file names, the loader's step:
                anything JSON can hold, or a tensor); events at this step carry it and a
                rollback's event lists the ids it skipped. Kept as given, converted only
                for the events that need it.
            sample_losses: the per-example losses of the batch (``reduction="none"``),
                detached; a spike or NaN event then names the examples that stand out.
                Summarised on the device (median, spread, the largest four), no sync.

        Returns:
            A :class:`StepReport` of device tensors; with ``accumulation_steps``, a report
            with ``accumulating=True`` for the micro-batches that only accumulate.
        """
        self._check_open()
        if self.accumulation_steps != 1 and self._micro.accumulates(self.accumulation_steps):
            return self._keep_micro_batch(loss, batch, sample_losses)
        edge_grads, loss_tensor, samples = self._begin_step(loss, batch, sample_losses)
        measure_update = self._probe is not None and self._steps.count == self.log_every - 1
        if measure_update:
            assert self._probe is not None
            self._probe.before_step()
        stats = grad_stats(
            self.model,
            resolve=False,
            loss=loss_tensor,
            process_group=self.process_group,
            fingerprint=False,  # the guard clips what it just measured
        )
        if self.fused and not self._state_primed:
            self._state_primed = prime_fused_state(self.optimizer, self.device)
        no_sync = self.fused and self.nonfinite == "skip" and self._state_primed
        self._steps.on_device.append(no_sync)
        # The LR this step uses, read before the guard's scheduler steps it; a scheduler
        # updates a tensor LR in place, so that one is copied (one small kernel, no sync).
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None and isinstance(lr, Tensor):
            lr = lr.clone()
        if no_sync:
            skipped, scale = self._step_on_device(stats)
        else:
            stats, skipped, scale = self._step_with_read(stats)
        if measure_update:
            assert self._probe is not None
            self._update_pending = self._probe.after_step()
        report = StepReport(
            step=self.step_count,
            grad_norm=stats.total,
            # fp64 gradients: clipped from their fp64 norm, which may exceed fp32's range.
            clipped_norm=(
                stats.total * scale
                if stats.total_fp64 is None
                else (stats.total_fp64 * scale).float()
            ),
            scale=scale,
            skipped=skipped,
            finite=stats.finite,
            loss=stats.loss,  # averaged across ranks when the model is distributed
        )
        self._steps.record(report, stats, samples, lr * self.lr_factor, self._zeroed)
        self._zeroed = None
        if self._steps.count == self.log_every:
            self.flush()
        if self.recovery is not None:
            self.recovery.after_step(self)
        self._used_grads = [(weakref.ref(g), g._version) for g in edge_grads]
        if self._raise_after is not None:
            error, self._raise_after = self._raise_after, None
            raise error
        return report

    def _begin_step(
        self, loss: Tensor | float | None, batch: Any, sample_losses: Tensor | None
    ) -> tuple[tuple[Tensor, Tensor], Tensor | None, Tensor | None]:
        """Check the step may run, count it; return its edge gradients, loss and samples.

        The loss, batch id and per-example losses are the step's own, or joined with the
        micro-batches it completes.
        """
        edge_grads = self._check_ready()
        if self._micro.count:
            loss, batch, sample_losses = self._micro.merge(
                None if loss is None else self._loss_tensor(loss), batch, sample_losses
            )
        if not self._sinks_started:
            self._start_sinks()
        self.step_count += 1
        if self.fused and self._steps.count == 0 and self.scheduler is not None:
            self._scheduler_at_window_start = scheduler_state(self.scheduler, self.optimizer)
        if self.scaler is not None:
            unscale_once(self.scaler, self.optimizer)
        loss_tensor = None if loss is None else self._loss_tensor(loss)
        return edge_grads, loss_tensor, self._note_data(batch, sample_losses)

    @property
    def buffered(self) -> int:
        """Steps held on the device since the last drain (0 right after one)."""
        return self._steps.count

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: a closed guard takes no more steps."""
        return self._closed

    def _keep_micro_batch(
        self, loss: Tensor | float | None, batch: Any, sample_losses: Tensor | None
    ) -> StepReport:
        """Keep a micro-batch's loss, batch id and per-example losses for the step it ends in."""
        loss_tensor = None if loss is None else self._loss_tensor(loss).detach().float()
        if sample_losses is not None:
            check_sample_losses(sample_losses)  # summarised with the step it ends in
        self._micro.add(loss_tensor, batch, sample_losses)
        return StepReport(
            step=self.step_count + 1,
            grad_norm=self._nan,
            clipped_norm=self._nan,
            scale=self._one,
            skipped=self._false,
            finite=self._true,
            loss=None if loss_tensor is None else loss_tensor.reshape(()),
            accumulating=True,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise GradGuardError("this Guard was closed; build a new one to keep training.")

    def _check_ready(self) -> tuple[Tensor, Tensor]:
        """Refuse a step the guard would not measure truly; return the first and last grads.

        Refused (the guard is open): parameters it does not measure, no gradients, or the
        gradients the last step used. A backward replaces a gradient (``set_to_none=True``)
        or writes it in place, which bumps its version: the same first and last gradient at
        the same versions mean no backward since. O(1) unless the parameter set may have
        changed or the first parameters have no gradient.
        """
        if (
            _Registrations.count != self._registrations
            or _optimizer_shape(self.optimizer) != self._optimizer_shape
        ):
            self._check_parameter_set()
        params = self.tensor_params
        first = next((g for p in params if (g := p.grad) is not None), None)
        if first is None:
            raise GradGuardError(
                f"step {self.step_count + 1}: no gradients: was backward() called? Every "
                "parameter's .grad is None, so there is nothing to measure or step (call "
                "loss.backward() before guard.step(); zero_grad(set_to_none=True) after it)."
            )
        last = next(g for p in reversed(params) if (g := p.grad) is not None)
        if self._used_grads and all(
            ref() is grad and version == grad._version
            for (ref, version), grad in zip(self._used_grads, (first, last), strict=True)
        ):
            raise GradGuardError(
                f"step {self.step_count + 1}: these are the gradients step {self.step_count} "
                "already used (no backward() since): stepping again would apply the same "
                "update twice. Call zero_grad() and loss.backward() before each guard.step()."
            )
        return first, last

    def _start_sinks(self) -> None:
        """Tell the sinks the run begins (fresh, or resumed at ``step_count``)."""
        for sink in self.sinks:
            start = getattr(sink, "start", None)
            if callable(start):
                start(self.step_count)
        self._sinks_started = True

    def _note_data(self, batch: Any, sample_losses: Tensor | None) -> Tensor | None:
        """Keep the step's batch id (host) and its per-example loss summary (device)."""
        samples = None if sample_losses is None else self._steps.sample_summary(sample_losses)
        self._steps.note(batch, samples is not None)
        if batch is not None:
            self._batches.append((self.step_count, batch))
        return samples

    def _check_parameter_set(self) -> None:
        """After a model or optimizer change: refuse what the guard would not measure."""
        check_parameter_set(self.model, self.tensor_params, self.optimizer)
        self._registrations = _Registrations.count
        self._optimizer_shape = _optimizer_shape(self.optimizer)

    # --- the ring buffer and drains --------------------------------------------------

    def _loss_tensor(self, loss: Tensor | float) -> Tensor:
        """The loss for grad_stats, which detaches it and makes it a 0-d fp32 tensor."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ConfigError(
                    f"guard.step(loss) needs a scalar loss, got a tensor of shape "
                    f"{tuple(loss.shape)}; pass loss.mean() or loss.sum()."
                )
            return loss if loss.device == self.device else loss.detach().to(self.device)
        return torch.full((), float(loss), device=self.device)

    @_eager
    def flush(self) -> list[Event]:
        """Drain the buffered steps now: detectors, recovery and sinks; return new events."""
        return self._drain(final=False)

    def _drain(self, final: bool) -> list[Event]:
        """Copy the buffered steps to the host once, then judge, explain and log them.

        ``final`` closes every open streak of events (the guard is closing).
        """
        if self._steps.count == 0:
            closing = self._streaks.close_all() if final else []
            if closing:
                self._publish(self._empty_window(), [], closing)
            return []
        n = self._steps.count
        stopped_before = self.should_stop
        weights, pending = self._weight_norms(), self._weight_norm_pending
        update = self._update_pending if n == self.log_every else None
        self._update_pending = None
        parts = [self._steps.filled()]  # one transfer for the rows and the norms
        parts += [
            t.to(self.device, torch.float32) for t in (weights, pending, update) if t is not None
        ]
        flat = torch.cat(parts).cpu().double().numpy()  # sync: the drain, every log_every steps
        self.sync_count += 1
        self._steps.count = 0
        width = self._steps.width
        host, rest = flat[: n * width].reshape(n, width), flat[n * width :]
        update_ratio = None
        if update is not None:
            update_ratio, rest = rest[len(rest) - len(update) :], rest[: len(rest) - len(update)]
        if pending is not None:
            self._last_weight_norm = rest[len(rest) - len(pending) :]
            self._weight_norm_pending = None
        window = self._window(
            host,
            first_step=self.step_count - n + 1,
            weight_norm=None if weights is None else rest[: len(weights)],
            update_ratio=update_ratio,
        )
        self._last_weight_norm = window.weight_norm
        start, self._scheduler_at_window_start = self._scheduler_at_window_start, None
        on_device = np.asarray(self._steps.on_device, dtype=bool)
        self._steps.on_device = []
        if self.scheduler is not None and start is not None:
            replay_scheduler(
                self.scheduler, self.optimizer, start, window.skipped, window.skipped & on_device
            )
        events = [event for d in self.detectors for event in d.observe(window)]
        events.sort(key=lambda e: e.step)
        events = self.explainer.explain(window, events)
        last = int(window.steps[-1])
        # The drain's rows and events reach the sinks before the recovery acts: a recovery
        # that fails (or a process that dies while it loads a snapshot) loses nothing.
        merged = self._conclude(window, events, last, final, stopped_before)
        if self.recovery is not None:
            stopped = self.should_stop  # a recovery that gives up may request the stop
            recovered = [
                self._explain_rollback(event, events)
                for event in self.recovery.on_drain(self, window, events)
            ]
            if recovered:
                empty = self._empty_window()
                merged += self._conclude(empty, recovered, last, final, stopped)
        return merged

    def _conclude(
        self, window: Window, events: list[Event], last: int, final: bool, stopped: bool
    ) -> list[Event]:
        """Merge streaks, note a stop request, publish; return the new events."""
        merged, updated = self._streaks.merge(events, last, final=final)
        requested = any(e.kind == "divergence" for e in merged) or self.should_stop
        if requested and not stopped:
            reason = next((e for e in merged if e.kind in ("divergence", "rollback")), None)
            if reason is not None:
                reason.extra["stop_requested_at"] = last
        self.should_stop = requested
        self._publish(window, merged, updated)
        return merged

    def _publish(self, window: Window, new: list[Event], updated: list[Event]) -> None:
        """Keep the events (a streak's update replaces its row) and hand them to the sinks."""
        for event in updated:
            for i in range(len(self.events) - 1, -1, -1):
                if self._streaks.same(self.events[i], event):
                    self.events[i] = event
                    break
        self.events.extend(new)
        rows = [*new, *(e for e in updated if self._streaks.due(e))]
        for sink in self.sinks:
            sink.write(window, rows)
        if self.on_event is not None:
            for event in new:
                self.on_event(event)

    def _explain_rollback(self, event: Event, events: Sequence[Event]) -> Event:
        """A rollback's cause is its trigger's; its evidence lists the batches it skipped."""
        if event.kind != "rollback":
            return event
        trigger_step = event.extra.get("trigger_step")
        trigger = next(
            (
                e
                for e in events
                if e.kind == event.extra.get("trigger") and e.step == trigger_step and e.cause
            ),
            None,
        )
        undone = event.extra.get("undone")
        skipped: list[Any] = []
        if undone:
            first, last = int(undone[0]), int(undone[1])
            skipped = [jsonable(b) for s, b in self._batches if first <= s <= last]
            self._batches = deque(
                ((s, b) for s, b in self._batches if s < first), maxlen=_BATCH_HISTORY
            )
        return self.explainer.explain_rollback(event, trigger, skipped)

    def _weight_norms(self) -> Tensor | None:
        """Per-layer parameter norms on the device, for the detectors (at drains only)."""
        return layer_weight_norms(self.model, self.layer_names, self.process_group)

    def _window(
        self,
        host: np.ndarray[Any, Any],
        first_step: int,
        weight_norm: np.ndarray[Any, Any] | None = None,
        update_ratio: np.ndarray[Any, Any] | None = None,
    ) -> Window:
        return self._steps.window(
            host,
            first_step,
            weight_norm=weight_norm,
            weight_norm_before=self._last_weight_norm,
            update_ratio=update_ratio,
            loss_scaled=self.scaler is not None,
        )

    def _empty_window(self) -> Window:
        """A window of no steps, to hand sinks the events a closing guard still owes."""
        return self._window(np.zeros((0, self._steps.width)), first_step=self.step_count + 1)

    # --- state, lifecycle ----------------------------------------------------------------

    def wrap(self) -> GuardedOptimizer:
        """An optimizer whose ``step()`` runs this guard, for frameworks that step it."""
        return GuardedOptimizer(self)

    @_eager
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: drains pending steps first (one sync).

        The state a rollback restores (:meth:`recovery_state`), plus what identifies the
        run (layers, detector and clip types) and its history (events, syncs, the
        recovery's and the explainer's state).
        """
        self.flush()
        return {
            **self._core_state(),
            "layer_names": list(self.layer_names),
            "detector_types": [type(d).__name__ for d in self.detectors],
            "sync_count": self.sync_count,
            "clip_type": None if self.clip is None else type(self.clip).__name__,
            "events": [e.to_dict() for e in self.events],
            "recovery": getattr(self.recovery, "state_dict", dict)(),
            "explainer": self.explainer.state_dict(),
        }

    @_eager
    def recovery_state(self) -> dict[str, Any]:
        """The state a rollback restores: step counter, policy and detectors (no drain).

        Events are history and stay; call only between drains (nothing buffered).
        """
        if self._steps.count:
            raise GradGuardError(
                "recovery_state() needs an empty buffer: snapshot right after a drain "
                "(every a multiple of log_every)."
            )
        return self._core_state()

    @_eager
    def load_recovery_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`recovery_state`; pending buffered steps are discarded."""
        self._load_core_state(state)

    @_eager
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (same model and configuration).

        Everything is checked before anything changes: a state of another model, with
        other detectors or clip policy, or missing keys is refused and leaves the guard
        as it was.
        """
        _check_saved_state(self, state)
        self._load_core_state(state)
        self.sync_count = int(state["sync_count"])
        self.events = [Event.from_dict(e) for e in state["events"]]
        self.explainer.load_state_dict(state.get("explainer", {}))
        if self.recovery is not None and hasattr(self.recovery, "load_state_dict"):
            self.recovery.load_state_dict(state.get("recovery", {}))

    def _core_state(self) -> dict[str, Any]:
        """What both a checkpoint and a rollback snapshot hold of the guard."""
        last = self._last_weight_norm
        return {
            "step_count": self.step_count,
            "should_stop": self.should_stop,
            "lr_factor": self.lr_factor,
            "clip": None if self.clip is None else self.clip.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
            "weight_norm": None if last is None else [float(v) for v in last],
        }

    def _load_core_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`_core_state`; the buffered steps are dropped."""
        self._steps.discard()
        self._update_pending = None
        self._scheduler_at_window_start = None
        self._state_primed = False  # the restored optimizer state may predate the priming
        self.step_count = int(state["step_count"])
        self.should_stop = bool(state["should_stop"])
        self.lr_factor = float(state.get("lr_factor", 1.0))
        if self.clip is not None:
            self.clip.load_state_dict(state["clip"])
        for detector, detector_state in zip(self.detectors, state["detectors"], strict=True):
            detector.load_state_dict(detector_state)
        # The norms the next drain compares with: measured anew if none was saved.
        saved = state.get("weight_norm")
        self._last_weight_norm = None if saved is None else np.asarray(saved, dtype=np.float64)
        self._weight_norm_pending = self._weight_norms() if saved is None else None

    @_eager
    def close(self) -> None:
        """Drain what is buffered, close the sinks and release the objects it owned."""
        if self._closed:
            return
        self._micro.clear()  # micro-batches of a step never taken: nothing to log
        self._drain(final=True)
        for sink in self.sinks:
            sink.close()
        self._closed = True
        release(self, self._claimed)
        self._claimed = []

    def _claim(self, owned: object, what: str, fix: str) -> None:
        if claim(self, owned, what, fix):
            self._claimed.append(owned)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
