"""``Name(argument=value, ...)`` reprs, read back from the arguments a class is built with.

Run logs record the clip policy, the detectors and the recovery by their reprs, so a repr
that forgets an argument hides a setting from the log. Deriving the repr from the
signature of ``__init__`` keeps every argument in it, including those added later.
"""

from __future__ import annotations

import inspect

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_ARGUMENTS: dict[type, tuple[str, ...]] = {}


def _argument_names(cls: type) -> tuple[str, ...]:
    names = _ARGUMENTS.get(cls)
    if names is None:
        parameters = inspect.signature(cls).parameters.values()
        names = _ARGUMENTS[cls] = tuple(p.name for p in parameters if p.kind in _NAMED)
    return names


def arguments_repr(obj: object) -> str:
    """``Name(a=..., b=...)``: each argument of ``type(obj).__init__``, as its attribute now.

    An argument the object keeps under another name (a subclass's own) is left out.
    """
    cls = type(obj)
    values = (
        f"{name}={getattr(obj, name)!r}" for name in _argument_names(cls) if hasattr(obj, name)
    )
    return f"{cls.__name__}({', '.join(values)})"
