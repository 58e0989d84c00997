"""Plans entries that the networks package defines itself (no torch import: the planner writes
them)."""
from __future__ import annotations

SEMIFORMER = "autossl.networks.semiformer.Semiformer"


def hybrid_architecture() -> dict:
    """The ``hybrid_architecture`` entry of a configuration (and the one used for plans written
    before it existed): Semiformer built from the configuration's own CNN and transformer entries.
    ``_kw_plans_entries`` names the keyword arguments whose values are names of other entries of
    the same configuration (``networks.build.architecture_entry`` puts those entries in): they are
    references, not copies, so that an edit of the CNN or the transformer entry (a smaller network
    in a hand-written plans file) is the hybrid's too, and the plans hold each network once.
    ``fusion_stages``: the CNN encoder stages that exchange features with the transformer (None:
    every stage below full resolution); ``predict``: the output at test time (both | cnn |
    transformer)."""
    return {
        "network_class_name": SEMIFORMER,
        "arch_kwargs": {"cnn": "architecture", "transformer": "transformer_architecture",
                        "fusion_stages": None, "predict": "both"},
        "_kw_requires_import": [],
        "_kw_plans_entries": ["cnn", "transformer"],
    }
