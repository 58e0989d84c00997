"""Reader/writer interface, identical in spirit to nnU-Net v2's ``BaseReaderWriter``.

``read_images(files)`` -> (array (c, x, y, z) float32, props with at least ``spacing``);
``read_seg(file)`` -> ((1, x, y, z), props); ``write_seg(seg (x, y, z), file, props)``.
2D images are stored as (c, 1, x, y) with spacing (999, sx, sy).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class ImageReadError(ValueError):
    """An image or label file cannot be read; the message names the file."""


class BaseReaderWriter(ABC):
    supported_file_endings: tuple[str, ...] = ()
    #: True when one image file can hold several channels (RGB PNGs); see ``channels_in_file``
    files_may_hold_several_channels: bool = False

    def channels_in_file(self, file: str) -> int:
        """How many channels of a case ``file`` holds (from its header where that is cheap)."""
        return 1

    @abstractmethod
    def read_images(self, files: Sequence[str]) -> tuple[np.ndarray, dict]:
        ...

    @abstractmethod
    def read_seg(self, file: str) -> tuple[np.ndarray, dict]:
        ...

    @abstractmethod
    def write_seg(self, seg: np.ndarray, file: str, properties: dict) -> None:
        ...

    def write_image(self, image: np.ndarray, file: str, properties: dict) -> None:
        """Write one channel (x, y, z) with the geometry in ``properties``; converters use it."""
        self.write_seg(image, file, properties)


def check_same_geometry(files: Sequence[str], shapes, spacings) -> None:
    for f, s, sp in zip(files[1:], shapes[1:], spacings[1:]):
        if tuple(s) != tuple(shapes[0]):
            raise ImageReadError(f"{f}: shape {tuple(s)} differs from {files[0]} {tuple(shapes[0])}")
        if not np.allclose(sp, spacings[0], rtol=1e-3):
            raise ImageReadError(f"{f}: spacing {tuple(sp)} differs from {files[0]} {tuple(spacings[0])}")
