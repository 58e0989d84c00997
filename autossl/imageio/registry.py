"""Pick a reader/writer by name or by file ending (nnU-Net's order: natural 2D, SimpleITK, nibabel)."""
from __future__ import annotations

from autossl.imageio.base import BaseReaderWriter
from autossl.imageio.natural_image_io import NaturalImage2DIO
from autossl.imageio.nibabel_io import NibabelIO
from autossl.imageio.simpleitk_io import SimpleITKIO

READERS: dict[str, type[BaseReaderWriter]] = {
    "NaturalImage2DIO": NaturalImage2DIO,
    "SimpleITKIO": SimpleITKIO,
    "NibabelIO": NibabelIO,
}


def reader_writer_class(file_ending: str, override: str | None = None) -> type[BaseReaderWriter]:
    if override:
        if override not in READERS:
            raise ValueError(f"unknown image reader/writer {override!r}; known: {sorted(READERS)}")
        return READERS[override]
    if file_ending.lower() in (".jpg", ".jpeg"):
        raise ValueError("JPEG is lossy and not supported as a file_ending; convert to .png")
    for cls in READERS.values():
        if file_ending.lower() in cls.supported_file_endings:
            return cls
    raise ValueError(f"no reader for file_ending {file_ending!r}; supported: "
                     f"{sorted({e for c in READERS.values() for e in c.supported_file_endings})}")
