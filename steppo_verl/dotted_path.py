"""The object a dotted path (``package.module.name``) names, for the options that take one: an environment's
``class``, an agent loop's ``_target_``, ``algorithm.steppo.oracle.function``.

Not hydra's ``get_object``, which logs an ERROR line of its own for every path it cannot import, even where the
caller reports the problem itself.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_dotted"]


def load_dotted(path: Any) -> Any:
    """The attribute ``name`` of module ``package.module`` for ``path`` = ``"package.module.name"``.

    Raises:
        ValueError: ``path`` has no module part.
        ImportError, AttributeError: the module cannot be imported (or raises ImportError itself, e.g. a missing
            optional dependency with its install hint), or has no such attribute; callers add what the path was for.
    """
    module_name, _, attribute = str(path).rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not a dotted path 'package.module.name'")
    return getattr(importlib.import_module(module_name), attribute)
