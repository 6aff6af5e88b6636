"""Old import paths for names that moved to a module which imports their old home.

`value_jax.data.loaders`, `collate` and `ablation_data` were split; the new modules
(`relation_loader`, `batch_plan`, `ablation_loader`) import the old ones, so the old ones cannot
import them back at load time (the cycle would fail for whichever is imported first). Instead
each old module sets `__getattr__ = moved_names(__name__, {new module: names})` (PEP 562): a
name is imported from its new module when first asked for, and is the very same object.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence


def moved_names(module: str, moved: Mapping[str, Sequence[str]]) -> Callable[[str], object]:
    """A module `__getattr__` that finds each name in `moved[new module]` in that module."""
    home = {name: new for new, names in moved.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in home:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    return __getattr__


__all__ = ["moved_names"]
