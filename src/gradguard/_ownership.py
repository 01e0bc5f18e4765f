"""One owner per object: an optimizer, a detector or a sink belongs to one open guard.

Two guards stepping one optimizer, or sharing a detector's history or a sink's files,
would corrupt each other silently; the second is refused instead. The registry holds
weak references on both sides, so nothing leaks and the objects pickle as before.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterable
from typing import Any

from gradguard.errors import ConfigError

#: The guard each optimizer, detector and sink belongs to.
_OWNERS: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def claim(owner: Any, owned: object, what: str, fix: str) -> bool:
    """Mark ``owned`` as ``owner``'s; refuse it if another open guard has it.

    Returns False for an object that cannot be tracked (not weak-referenceable or not
    hashable).

    Raises:
        ConfigError: another guard that is still open owns it; ``fix`` says what to do.
    """
    try:
        ref = _OWNERS.get(owned)
    except TypeError:
        return False
    other = ref() if ref is not None else None
    if other is not None and other is not owner and not other.closed:
        del other
        gc.collect()  # a guard dropped by the loop may live on in a reference cycle
        other = ref() if ref is not None else None
    if other is not None and other is not owner and not other.closed:
        raise ConfigError(
            f"this {what} ({type(owned).__name__}) already belongs to another Guard that "
            f"is still open: {fix}."
        )
    _OWNERS[owned] = weakref.ref(owner)
    return True


def release(owner: Any, owned: Iterable[object]) -> None:
    """Give back what ``owner`` claimed (objects another guard took since stay its)."""
    for item in owned:
        with contextlib.suppress(KeyError, TypeError):
            if _OWNERS[item]() is owner:
                del _OWNERS[item]
