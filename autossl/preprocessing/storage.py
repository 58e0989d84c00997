"""Preprocessed cases on disk, in nnU-Net v2's blosc2 layout.

A labelled case: ``<case>.b2nd`` (float32 data, c x spatial), ``<case>_seg.b2nd`` (int16 seg,
1 x spatial) and ``<case>.pkl`` (properties). An unlabelled case has no ``_seg`` file and lives
in the sibling folder ``<data_identifier>_unlabeled`` so that nnU-Net reading our folder never
sees a case without a segmentation. Every file is written under a temporary name and renamed,
the ``.pkl`` last: a case counts as finished only when its ``.pkl`` exists.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import blosc2
import numpy as np

from autossl.utilities.file_io import atomic_path, load_pickle, save_pickle

UNLABELED_SUFFIX = "_unlabeled"


def unlabeled_folder(labeled_folder: str | os.PathLike) -> Path:
    p = Path(labeled_folder)
    return p.with_name(p.name + UNLABELED_SUFFIX)


def _chunks(shape: tuple[int, ...], patch_size, itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """nnU-Net's rule: blocks <= 1.5x patch per axis and small; chunks <= 6 MiB."""
    spatial = shape[1:]
    patch = tuple(patch_size)[-len(spatial):] if patch_size is not None else spatial
    block = [min(s, max(1, int(math.ceil(1.5 * p)))) for s, p in zip(spatial, patch)]
    l1 = 32 * 1024  # aim blocks at L1/L2 sized pieces
    while np.prod(block) * itemsize > 8 * l1 and max(block) > 1:
        i = int(np.argmax(block))
        block[i] = max(1, block[i] // 2)
    chunk = [min(s, max(b, int(math.ceil(1.5 * p)))) for s, b, p in zip(spatial, block, patch)]
    while np.prod(chunk) * itemsize * shape[0] > 6 * 1024 ** 2 and max(chunk) > 1:
        i = int(np.argmax(chunk))
        chunk[i] = max(1, chunk[i] // 2)
    block = [min(b, c) for b, c in zip(block, chunk)]
    return (1, *block), (shape[0], *chunk)


def _save_array(arr: np.ndarray, path: Path, patch_size) -> None:
    blocks, chunks = _chunks(arr.shape, patch_size, arr.itemsize)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1}
    with atomic_path(path, suffix=".b2nd") as tmp:
        tmp.unlink(missing_ok=True)
        blosc2.asarray(np.ascontiguousarray(arr), urlpath=str(tmp), chunks=chunks, blocks=blocks,
                       cparams=cparams, mode="w")


def save_case(folder: str | os.PathLike, case: str, data: np.ndarray, seg: np.ndarray | None,
              properties: dict, patch_size=None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_array(data.astype(np.float32, copy=False), folder / f"{case}.b2nd", patch_size)
    if seg is not None:
        _save_array(seg.astype(np.int16, copy=False), folder / f"{case}_seg.b2nd", patch_size)
    save_pickle(properties, folder / f"{case}.pkl")


def case_is_complete(folder: str | os.PathLike, case: str, labeled: bool = True) -> bool:
    folder = Path(folder)
    files = [folder / f"{case}.pkl", folder / f"{case}.b2nd"] + ([folder / f"{case}_seg.b2nd"] if labeled else [])
    return all(f.is_file() for f in files)


def list_cases(folder: str | os.PathLike) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f.name[:-4] for f in folder.iterdir() if f.name.endswith(".pkl") and not f.name.startswith("."))


def load_case(folder: str | os.PathLike, case: str, mmap: bool = True, load_seg: bool = True):
    """Return (data, seg or None, properties). With ``mmap`` the arrays are blosc2 NDArrays
    (slice them to read); otherwise numpy arrays. ``load_seg=False`` never opens a seg file."""
    folder = Path(folder)
    props = load_pickle(folder / f"{case}.pkl")
    dparams = {"nthreads": 1}
    data = blosc2.open(str(folder / f"{case}.b2nd"), mode="r", dparams=dparams)
    seg_path = folder / f"{case}_seg.b2nd"
    seg = blosc2.open(str(seg_path), mode="r", dparams=dparams) if load_seg and seg_path.is_file() else None
    if not mmap:
        data = data[:]
        seg = seg[:] if seg is not None else None
    return data, seg, props
