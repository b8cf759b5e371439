"""Planning: from a fingerprint and a device budget to a :class:`autoseg.plans.Plans`.

``make_plan`` is imported lazily: the planner needs the network's cost model (and so torch), while
preprocessing workers only need :mod:`autoseg.planning.spacing` and should not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_plan", "CONFIGURATIONS"]


def __getattr__(name: str) -> Any:
    if name == "CONFIGURATIONS":
        from autoseg.plans import CONFIGURATIONS

        return CONFIGURATIONS
    if name == "make_plan":
        from autoseg.planning import planner

        return planner.make_plan
    raise AttributeError(f"module 'autoseg.planning' has no attribute {name!r}")
