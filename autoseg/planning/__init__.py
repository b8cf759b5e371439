"""Planning: from a fingerprint and a device budget to a :class:`autoseg.plans.Plans`."""

from autoseg.planning.planner import make_plan

__all__ = ["make_plan"]
