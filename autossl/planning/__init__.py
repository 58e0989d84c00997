"""Experiment planning: topology, the default (nnU-Net v2) planner, the CPU preset, nnU-Net's
residual-encoder presets (ResEnc M / L), plans access."""
from autossl.planning.cpu_planner import CPUPlanner
from autossl.planning.default_planner import ExperimentPlanner
from autossl.planning.plans_handler import ConfigurationManager, PlansManager
from autossl.planning.registry import get_planner
from autossl.planning.resenc_planner import ResEncLPlanner, ResEncMPlanner, ResEncUNetPlanner

__all__ = ["ExperimentPlanner", "CPUPlanner", "ResEncUNetPlanner", "ResEncMPlanner", "ResEncLPlanner",
           "PlansManager", "ConfigurationManager", "get_planner"]
