"""Conventions shared by every lab experiment: seeds and threads (the reference setup)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

DATA_SEED_OFFSET = 1000
"""Data-stream seed of model seed ``s`` is ``1000 + s``: batches never share the init's stream."""


FULL_SEED_COUNT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "full_seed_count", default=None
)
"""How many seeds full variants run (``gradguard lab --seeds``); None: each experiment's own."""


def seeds_for(seed: int, *, quick: bool, n_full: int) -> tuple[int, ...]:
    """Return the model seeds of a run: ``(seed,)`` when quick, else ``n_full`` consecutive ones.

    ``n_full`` gives way to :data:`FULL_SEED_COUNT` when it is set.

    Example:
        >>> seeds_for(7, quick=True, n_full=3), seeds_for(7, quick=False, n_full=3)
        ((7,), (7, 8, 9))
    """
    if quick:
        return (seed,)
    count = FULL_SEED_COUNT.get()
    return tuple(range(seed, seed + (n_full if count is None else count)))


def data_generator(seed: int) -> torch.Generator:
    """Return the generator of the data stream that goes with model seed ``seed``."""
    return torch.Generator().manual_seed(DATA_SEED_OFFSET + seed)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, then restore the previous count.

    One thread makes CPU results bit-identical from run to run on one machine and lets two
    experiments share a 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
