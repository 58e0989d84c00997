"""nibabel reader/writer for .nii.gz / .nii (affine kept as read, no reorientation)."""
from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np

from autossl.imageio.base import BaseReaderWriter, ImageReadError, check_same_geometry
from autossl.imageio.file_check import damaged_file_error
from autossl.utilities.file_io import atomic_path


class NibabelIO(BaseReaderWriter):
    supported_file_endings = (".nii.gz", ".nii")

    def _read(self, f: str):
        try:
            img = nib.load(str(f))
            arr = np.asanyarray(img.dataobj)
        except Exception as e:  # nibabel raises many types
            damaged = damaged_file_error(str(f))
            if damaged is not None:
                raise damaged from None
            raise ImageReadError(f"{f}: cannot be read ({e})") from None
        if arr.ndim != 3:
            raise ImageReadError(f"{f}: expected a 3D image, got {arr.ndim}D")
        arr = arr.transpose((2, 1, 0))  # to z, y, x like SimpleITK
        spacing = [float(abs(v)) for v in img.header.get_zooms()[:3][::-1]]
        return arr, {"nibabel_stuff": {"original_affine": img.affine}, "spacing": spacing}

    def read_images(self, files: Sequence[str]):
        arrays, props = zip(*(self._read(f) for f in files))
        check_same_geometry(files, [a.shape for a in arrays], [p["spacing"] for p in props])
        return np.stack(arrays).astype(np.float32, copy=False), props[0]

    def read_seg(self, file: str):
        a, p = self._read(file)
        return a[None], p

    def write_seg(self, seg: np.ndarray, file: str, properties: dict) -> None:
        self.write_image(seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.int16), file, properties)

    def write_image(self, image: np.ndarray, file: str, properties: dict) -> None:
        img = nib.Nifti1Image(np.ascontiguousarray(image.transpose((2, 1, 0))), properties["nibabel_stuff"]["original_affine"])
        ending = ".nii.gz" if str(file).endswith(".nii.gz") else ".nii"
        with atomic_path(file, suffix=ending) as tmp:
            nib.save(img, str(tmp))
