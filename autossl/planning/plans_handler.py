"""Read access to a plans file, mirroring nnU-Net v2's ``PlansManager`` / ``ConfigurationManager``.

``PlansManager(plans_dict_or_path)`` resolves ``inherits_from`` between configurations and exposes
the top-level entries; ``ConfigurationManager`` exposes one configuration (``.configuration`` is
the resolved dict). Resampling functions are stored by name and resolved lazily from
``autossl.preprocessing.resampling``. The dicts stay editable (``pm.plans[...]``), as in nnU-Net.
"""
from __future__ import annotations

import os
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Callable

from autossl.utilities.file_io import load_json, save_json


def _resampling_fn(name: str) -> Callable:
    from autossl.preprocessing import resampling

    fn = getattr(resampling, name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"the plans name the resampling function {name!r}, which autossl.preprocessing.resampling "
                         f"does not define")
    return fn


class ConfigurationManager:
    def __init__(self, configuration_dict: dict):
        if "architecture" not in configuration_dict:
            raise ValueError("this configuration has no 'architecture' entry (old nnU-Net plans format); "
                             "plan the dataset again with autossl_plan_experiment")
        self.configuration = configuration_dict

    def __repr__(self) -> str:
        return f"ConfigurationManager({self.configuration!r})"

    def _get(self, key: str):
        try:
            return self.configuration[key]
        except KeyError:
            where = self.configuration.get("data_identifier", "?")
            raise KeyError(f"the configuration {where} has no entry {key!r}") from None

    @property
    def data_identifier(self) -> str:
        return self._get("data_identifier")

    @property
    def preprocessor_name(self) -> str:
        return self._get("preprocessor_name")

    @property
    def batch_size(self) -> int:
        return self._get("batch_size")

    @property
    def patch_size(self) -> list[int]:
        return self._get("patch_size")

    @property
    def median_image_size_in_voxels(self) -> list[float]:
        return self._get("median_image_size_in_voxels")

    @property
    def spacing(self) -> list[float]:
        return self._get("spacing")

    @property
    def normalization_schemes(self) -> list[str]:
        return self._get("normalization_schemes")

    @property
    def use_mask_for_norm(self) -> list[bool]:
        return self._get("use_mask_for_norm")

    @property
    def batch_dice(self) -> bool:
        return self._get("batch_dice")

    # networks -------------------------------------------------------------------------------
    @property
    def architecture(self) -> dict:
        return self._get("architecture")

    @property
    def transformer_architecture(self) -> dict | None:
        """The transformer entry; None for plans without one (e.g. nnU-Net's own plans)."""
        return self.configuration.get("transformer_architecture")

    @property
    def network_arch_class_name(self) -> str:
        return self.architecture["network_class_name"]

    @property
    def network_arch_init_kwargs(self) -> dict:
        return self.architecture["arch_kwargs"]

    @property
    def network_arch_init_kwargs_req_import(self) -> list[str]:
        return self.architecture["_kw_requires_import"]

    @property
    def pool_op_kernel_sizes(self) -> list[list[int]]:
        return self.architecture["arch_kwargs"]["strides"]

    @property
    def strides(self) -> list[list[int]]:
        return self.pool_op_kernel_sizes

    # resampling -----------------------------------------------------------------------------
    @property
    def resampling_fn_data_kwargs(self) -> dict:
        return self._get("resampling_fn_data_kwargs")

    @property
    def resampling_fn_seg_kwargs(self) -> dict:
        return self._get("resampling_fn_seg_kwargs")

    @property
    def resampling_fn_probabilities_kwargs(self) -> dict:
        return self._get("resampling_fn_probabilities_kwargs")

    @property
    def resampling_fn_data(self) -> Callable:
        """``fn(data, new_shape, current_spacing, new_spacing)`` with the plans' kwargs bound."""
        return partial(_resampling_fn(self._get("resampling_fn_data")), **self.resampling_fn_data_kwargs)

    @property
    def resampling_fn_seg(self) -> Callable:
        return partial(_resampling_fn(self._get("resampling_fn_seg")), **self.resampling_fn_seg_kwargs)

    @property
    def resampling_fn_probabilities(self) -> Callable:
        return partial(_resampling_fn(self._get("resampling_fn_probabilities")),
                       **self.resampling_fn_probabilities_kwargs)

    # cascade --------------------------------------------------------------------------------
    @property
    def next_stage_names(self) -> list[str] | None:
        ret = self.configuration.get("next_stage")
        return [ret] if isinstance(ret, str) else ret

    @property
    def previous_stage_name(self) -> str | None:
        return self.configuration.get("previous_stage")


class PlansManager:
    def __init__(self, plans: dict | str | os.PathLike):
        self.plans = plans if isinstance(plans, dict) else load_json(plans)
        self._source = None if isinstance(plans, dict) else Path(plans)
        if "configurations" not in self.plans:
            raise ValueError(f"{self._source or 'plans'}: no 'configurations' entry; not a plans file")

    def __repr__(self) -> str:
        return f"PlansManager({self.plans.get('plans_name')!r} for {self.plans.get('dataset_name')!r})"

    def _resolve(self, name: str, visited: tuple[str, ...] = ()) -> dict:
        configs = self.plans["configurations"]
        if name not in configs:
            raise ValueError(f"{self._source or 'plans'}: configuration {name!r} does not exist; available: "
                             f"{list(configs)}")
        cfg = deepcopy(configs[name])
        parent = cfg.get("inherits_from")
        if parent is not None:
            if parent in visited or parent == name:
                raise RuntimeError(f"circular 'inherits_from' in the plans: {' -> '.join((*visited, name, parent))}")
            base = self._resolve(parent, (*visited, name))
            base.update(cfg)
            cfg = base
        return cfg

    def get_configuration(self, configuration_name: str) -> ConfigurationManager:
        return ConfigurationManager(self._resolve(configuration_name))

    @property
    def available_configurations(self) -> list[str]:
        return list(self.plans["configurations"])

    @property
    def dataset_name(self) -> str:
        return self.plans["dataset_name"]

    @property
    def plans_name(self) -> str:
        return self.plans["plans_name"]

    @property
    def original_median_spacing_after_transp(self) -> list[float]:
        return self.plans["original_median_spacing_after_transp"]

    @property
    def original_median_shape_after_transp(self) -> list[int]:
        return self.plans["original_median_shape_after_transp"]

    @property
    def image_reader_writer(self) -> str:
        return self.plans["image_reader_writer"]

    @property
    def image_reader_writer_class(self):
        from autossl.imageio.registry import READERS

        name = self.image_reader_writer
        if name not in READERS:
            raise ValueError(f"the plans name the image reader/writer {name!r}; known: {sorted(READERS)}")
        return READERS[name]

    @property
    def transpose_forward(self) -> list[int]:
        return self.plans["transpose_forward"]

    @property
    def transpose_backward(self) -> list[int]:
        return self.plans["transpose_backward"]

    @property
    def experiment_planner_name(self) -> str:
        return self.plans["experiment_planner_used"]

    @property
    def foreground_intensity_properties_per_channel(self) -> dict:
        p = self.plans
        old_key = "foreground_intensity_properties_by_modality"  # older nnU-Net plans
        if "foreground_intensity_properties_per_channel" not in p and old_key in p:
            return p[old_key]
        return p["foreground_intensity_properties_per_channel"]

    def get_label_manager(self, dataset_json: dict):
        from autossl.utilities.label_handling import LabelManager

        return LabelManager.from_dataset_json(dataset_json)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plans atomically (e.g. after editing a configuration)."""
        save_json(self.plans, path, sort_keys=False)
