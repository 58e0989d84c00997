"""Planners by name (``-pl``): 'default' / 'ExperimentPlanner' / 'autosslPlans' and 'cpu' / 'CPUPlanner'."""
from __future__ import annotations

from autossl.planning.cpu_planner import CPUPlanner
from autossl.planning.default_planner import ExperimentPlanner

PLANNERS: dict[str, type[ExperimentPlanner]] = {
    "default": ExperimentPlanner,
    "ExperimentPlanner": ExperimentPlanner,
    "autosslPlans": ExperimentPlanner,
    "cpu": CPUPlanner,
    "CPUPlanner": CPUPlanner,
    "autosslPlansCPU": CPUPlanner,
}


def get_planner(name: str) -> type[ExperimentPlanner]:
    """The planner class for a ``-pl`` name (case-insensitive for the short names)."""
    if name in PLANNERS:
        return PLANNERS[name]
    lowered = {k.lower(): v for k, v in PLANNERS.items()}
    if str(name).lower() in lowered:
        return lowered[str(name).lower()]
    raise ValueError(f"unknown experiment planner {name!r}; known: {sorted(PLANNERS)}")
