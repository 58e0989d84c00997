"""Experiment planning: topology, the default (nnU-Net v2) planner, the CPU preset, plans access."""
from autossl.planning.cpu_planner import CPUPlanner
from autossl.planning.default_planner import ExperimentPlanner
from autossl.planning.plans_handler import ConfigurationManager, PlansManager
from autossl.planning.registry import get_planner

__all__ = ["ExperimentPlanner", "CPUPlanner", "PlansManager", "ConfigurationManager", "get_planner"]
