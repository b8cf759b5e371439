"""Planning: from a fingerprint and a device budget to a :class:`autoseg.plans.Plans`.

``make_plan`` is imported lazily: the planner needs the network's cost model (and so torch), while
preprocessing workers only need :mod:`autoseg.planning.spacing` and should not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_plan", "CONFIGURATIONS"]


def __getattr__(name: str) -> Any:
    if name in ("make_plan", "CONFIGURATIONS"):
        from autoseg.planning import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'autoseg.planning' has no attribute {name!r}")
