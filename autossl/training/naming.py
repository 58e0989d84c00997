"""How the trainer names its results folder (``<trainer>__<plans>__<configuration>``), in a
module of its own that imports nothing: predicting and model selection find a model by this name
without importing the trainer (and torch with it)."""
from __future__ import annotations


def trainer_name(ssl: str, network: str = "cnn") -> str:
    """``autosslTrainer`` (``--ssl none``), ``autosslTrainer_<method>``; ``_transformer`` appended
    for ``--network transformer``."""
    name = "autosslTrainer" if ssl in ("none", "", None) else f"autosslTrainer_{ssl}"
    return name + ("_transformer" if network == "transformer" else "")
