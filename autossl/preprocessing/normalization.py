"""Intensity normalisation schemes, as nnU-Net v2 defines them, found by class name.

The planner picks a scheme per channel from the channel name in dataset.json
(:func:`normalization_scheme_for_channel`) and writes the class name into the plans; the
preprocessor builds it with ``get_normalization_class(name)(use_mask_for_norm, intensityproperties)``
and calls ``.run(image, seg)`` on one channel.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class ImageNormalization(ABC):
    """One channel's normalisation. ``intensityproperties`` is that channel's entry of the
    fingerprint's ``foreground_intensity_properties_per_channel`` (mean, std, percentiles...)."""

    #: whether voxels outside the nonzero mask stay 0 when ``use_mask_for_norm`` is True;
    #: the planner only enables the mask for schemes where this is True
    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true: bool = False

    def __init__(self, use_mask_for_norm: bool | None = None, intensityproperties: dict | None = None,
                 target_dtype=np.float32):
        if use_mask_for_norm is not None and not isinstance(use_mask_for_norm, (bool, np.bool_)):
            raise TypeError(f"use_mask_for_norm must be True, False or None, got {use_mask_for_norm!r}")
        if intensityproperties is not None and not isinstance(intensityproperties, dict):
            raise TypeError(f"intensityproperties must be a dict, got {type(intensityproperties).__name__}")
        self.use_mask_for_norm = None if use_mask_for_norm is None else bool(use_mask_for_norm)
        self.intensityproperties = intensityproperties if intensityproperties is not None else {}
        self.target_dtype = target_dtype

    @abstractmethod
    def run(self, image: np.ndarray, seg: np.ndarray | None = None) -> np.ndarray:
        """``image`` and ``seg`` have the same shape (one channel); ``seg < 0`` marks outside the mask."""


class ZScoreNormalization(ImageNormalization):
    """(x - mean) / std per image; with ``use_mask_for_norm`` only inside ``seg >= 0`` (outside stays 0)."""

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = True

    def run(self, image, seg=None):
        image = image.astype(self.target_dtype, copy=False)
        if seg is not None and self.use_mask_for_norm:
            if seg.shape != image.shape:
                raise ValueError(f"ZScoreNormalization: seg shape {seg.shape} differs from image shape {image.shape}")
            mask = seg >= 0
            values = image[mask]
            mean = values.mean()
            std = values.std()
            image[mask] = (values - mean) / max(std, 1e-8)
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= max(std, 1e-8)
        return image


class CTNormalization(ImageNormalization):
    """Clip to the dataset's foreground [0.5, 99.5] percentiles, then (x - fg mean) / fg std."""

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def run(self, image, seg=None):
        props = self.intensityproperties
        missing = [k for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k not in props]
        if missing:
            raise ValueError(f"CTNormalization needs the foreground intensity properties {missing} "
                             f"(from dataset_fingerprint.json / the plans); got keys {sorted(props)}")
        image = image.astype(self.target_dtype, copy=False)
        np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
        image -= props["mean"]
        image /= max(props["std"], 1e-8)
        return image


class NoNormalization(ImageNormalization):
    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def run(self, image, seg=None):
        return image.astype(self.target_dtype, copy=False)


class RescaleTo01Normalization(ImageNormalization):
    """Per image min-max rescaling to [0, 1]."""

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def run(self, image, seg=None):
        image = image.astype(self.target_dtype, copy=False)
        image -= image.min()
        image /= np.clip(image.max(), a_min=1e-8, a_max=None)
        return image


class RGBTo01Normalization(ImageNormalization):
    """8-bit images: x / 255."""

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def run(self, image, seg=None):
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"RGBTo01Normalization expects 8-bit values in [0, 255], found [{lo}, {hi}]; "
                             f"use another channel name in dataset.json (e.g. 'rescale_to_0_1')")
        image = image.astype(self.target_dtype, copy=False)
        image /= 255.0
        return image


NORMALIZATION_CLASSES: dict[str, type[ImageNormalization]] = {
    c.__name__: c for c in (ZScoreNormalization, CTNormalization, NoNormalization,
                            RescaleTo01Normalization, RGBTo01Normalization)
}

#: casefolded channel name -> scheme (nnU-Net v2's map_channel_name_to_normalization)
CHANNEL_NAME_TO_SCHEME: dict[str, str] = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}


def normalization_scheme_for_channel(channel_name: str) -> str:
    """Class name of the scheme for a dataset.json channel name; unknown names get ZScore."""
    return CHANNEL_NAME_TO_SCHEME.get(str(channel_name).casefold(), "ZScoreNormalization")


def get_normalization_class(name: str) -> type[ImageNormalization]:
    try:
        return NORMALIZATION_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown normalization scheme {name!r} in the plans; "
                         f"known: {sorted(NORMALIZATION_CLASSES)}") from None
