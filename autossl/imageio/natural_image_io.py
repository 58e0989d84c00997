"""2D natural images: .png, .bmp, .tif/.tiff. RGB(A) becomes separate channels.

As nnU-Net's ``NaturalImage2DIO``: an RGB file is (3, 1, H, W), RGBA (4, 1, H, W), a grey one
(1, 1, H, W); ``read_images`` stacks the files' channels in the given order, so one RGB
``case_0000.png`` is the case's three channels R, G, B (nnU-Net's convention, e.g. its
Dataset120_RoadSegmentation), and grey files split per channel work as well."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from autossl.imageio.base import BaseReaderWriter, ImageReadError
from autossl.utilities.file_io import atomic_path


class NaturalImage2DIO(BaseReaderWriter):
    supported_file_endings = (".png", ".bmp", ".tif", ".tiff")
    files_may_hold_several_channels = True

    def channels_in_file(self, file: str) -> int:
        """Channels of ``file`` from its header (the pixels are not decoded): 3 for RGB, 4 for
        RGBA, 2 for grey + alpha, 1 for grey or palette images (read as their indices)."""
        try:
            with Image.open(file) as im:
                return len(im.getbands())
        except Exception as e:
            raise ImageReadError(f"{file}: cannot be read ({e})") from None

    def _read(self, f: str) -> np.ndarray:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im)
        except Exception as e:
            raise ImageReadError(f"{f}: cannot be read ({e})") from None
        if arr.ndim == 2:
            return arr[None, None].astype(np.float32)
        if arr.ndim == 3:  # H, W, C -> C, 1, H, W
            return arr.transpose((2, 0, 1))[:, None].astype(np.float32)
        raise ImageReadError(f"{f}: unexpected image dimensions {arr.shape}")

    def read_images(self, files: Sequence[str]):
        if not len(files):
            raise ImageReadError("no image files given")
        arrays = [self._read(f) for f in files]
        for f, a in zip(files[1:], arrays[1:]):
            if a.shape[1:] != arrays[0].shape[1:]:
                raise ImageReadError(f"{f}: shape {a.shape[2:]} differs from {files[0]} {arrays[0].shape[2:]}")
        return np.concatenate(arrays).astype(np.float32), {"spacing": [999.0, 1.0, 1.0]}

    def read_seg(self, file: str):
        a = self._read(file)
        if a.shape[0] != 1:
            raise ImageReadError(f"{file}: a label image must have one channel, found {a.shape[0]}")
        return a, {"spacing": [999.0, 1.0, 1.0]}

    def write_seg(self, seg: np.ndarray, file: str, properties: dict) -> None:
        arr = seg[0] if seg.ndim == 3 else seg
        ending = "." + str(file).rsplit(".", 1)[-1]
        with atomic_path(file, suffix=ending) as tmp:
            Image.fromarray(arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16)).save(tmp)

    def write_image(self, image: np.ndarray, file: str, properties: dict) -> None:
        self.write_seg(image, file, properties)
