"""Planners by name (``-pl``): 'default' / 'ExperimentPlanner' / 'autosslPlans', 'cpu' / 'CPUPlanner',
and nnU-Net's residual-encoder presets 'nnUNetPlannerResEncM' / 'nnUNetPlannerResEncL' (also 'resenc_m',
'ResEncM', their plans names and nnU-Net's plans names ``nnUNetResEncUNet{M,L}Plans``)."""
from __future__ import annotations

from autossl.planning.cpu_planner import CPUPlanner
from autossl.planning.default_planner import ExperimentPlanner
from autossl.planning.resenc_planner import ResEncLPlanner, ResEncMPlanner

PLANNERS: dict[str, type[ExperimentPlanner]] = {
    "default": ExperimentPlanner,
    "ExperimentPlanner": ExperimentPlanner,
    "autosslPlans": ExperimentPlanner,
    "cpu": CPUPlanner,
    "CPUPlanner": CPUPlanner,
    "autosslPlansCPU": CPUPlanner,
    "nnUNetPlannerResEncM": ResEncMPlanner,
    "ResEncMPlanner": ResEncMPlanner,
    "ResEncM": ResEncMPlanner,
    "resenc_m": ResEncMPlanner,
    "autosslResEncUNetMPlans": ResEncMPlanner,
    "nnUNetResEncUNetMPlans": ResEncMPlanner,
    "nnUNetPlannerResEncL": ResEncLPlanner,
    "ResEncLPlanner": ResEncLPlanner,
    "ResEncL": ResEncLPlanner,
    "resenc_l": ResEncLPlanner,
    "autosslResEncUNetLPlans": ResEncLPlanner,
    "nnUNetResEncUNetLPlans": ResEncLPlanner,
}


def get_planner(name: str) -> type[ExperimentPlanner]:
    """The planner class for a ``-pl`` name (case-insensitive for the short names)."""
    if name in PLANNERS:
        return PLANNERS[name]
    lowered = {k.lower(): v for k, v in PLANNERS.items()}
    if str(name).lower() in lowered:
        return lowered[str(name).lower()]
    raise ValueError(f"unknown experiment planner {name!r}; known: {sorted(PLANNERS)}")
