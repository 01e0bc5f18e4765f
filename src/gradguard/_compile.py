"""``torch.compile`` and the guard: its methods run eagerly when compiled code calls them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

_Method = TypeVar("_Method", bound=Callable[..., Any])


def eager(method: _Method) -> _Method:
    """Keep ``method`` out of ``torch.compile`` graphs: a compiled caller runs it eagerly.

    The guard's step reads host state, numpy and the file system, none of which a graph
    can hold, so under compilation the call is a graph break (``torch.compiler.disable``).
    Outside compilation it costs one flag check. The disabled function is made at the
    first compiled call: making it imports the compiler, which a loop that never
    compiles should not pay for (a second at import).
    """
    outside_graph: list[Callable[..., Any]] = []

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            if not outside_graph:
                outside_graph.append(torch.compiler.disable(method))  # type: ignore[no-untyped-call]
            return outside_graph[0](*args, **kwargs)
        return method(*args, **kwargs)

    return cast(_Method, call)
