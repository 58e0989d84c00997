"""SimpleITK reader/writer: .nii.gz, .nii, .nrrd, .mha, .mhd, .gipl."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from autossl.imageio.base import BaseReaderWriter, ImageReadError, check_same_geometry
from autossl.imageio.file_check import damaged_file_error
from autossl.utilities.file_io import atomic_path


class SimpleITKIO(BaseReaderWriter):
    supported_file_endings = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gipl")

    def _read(self, f: str):
        try:
            img = sitk.ReadImage(str(f))
        except RuntimeError as e:
            damaged = damaged_file_error(str(f))
            if damaged is not None:
                raise damaged from None
            first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
            raise ImageReadError(f"{f}: cannot be read ({first})") from None
        arr = sitk.GetArrayFromImage(img)  # z, y, x
        ndim = img.GetDimension()
        if ndim == 2:
            arr = arr[None]
            spacing = (999.0,) + tuple(img.GetSpacing()[::-1])
        elif ndim == 3:
            spacing = tuple(img.GetSpacing()[::-1])
        else:
            raise ImageReadError(f"{f}: {ndim}D images are not supported (2D or 3D expected)")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ImageReadError(f"{f}: vector images are not supported; store channels as _0000, _0001, ...")
        props = {
            "sitk_stuff": {
                "spacing": img.GetSpacing(),
                "origin": img.GetOrigin(),
                "direction": img.GetDirection(),
            },
            "spacing": list(spacing),
        }
        return arr, props

    def read_images(self, files: Sequence[str]):
        arrays, props_all = [], []
        for f in files:
            a, p = self._read(f)
            arrays.append(a)
            props_all.append(p)
        check_same_geometry(files, [a.shape for a in arrays], [p["spacing"] for p in props_all])
        return np.stack(arrays).astype(np.float32, copy=False), props_all[0]

    def read_seg(self, file: str):
        a, p = self._read(file)
        return a[None], p

    def write_seg(self, seg: np.ndarray, file: str, properties: dict) -> None:
        self._write(seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.int16, copy=False), file, properties)

    def write_image(self, image: np.ndarray, file: str, properties: dict) -> None:
        self._write(image, file, properties)

    def _write(self, arr: np.ndarray, file: str, properties: dict) -> None:
        if arr.ndim == 3 and len(properties["sitk_stuff"]["spacing"]) == 2:
            assert arr.shape[0] == 1, "2D image stored as (1, x, y)"
            arr = arr[0]
        itk = sitk.GetImageFromArray(arr)
        st = properties["sitk_stuff"]
        itk.SetSpacing(st["spacing"])
        itk.SetOrigin(st["origin"])
        itk.SetDirection(st["direction"])
        ending = next((e for e in self.supported_file_endings if str(file).endswith(e)), "")
        with atomic_path(file, suffix=ending) as tmp:
            sitk.WriteImage(itk, str(tmp), True)
