"""Shared pieces of the dataset converters.

Output folders (``$autossl_raw/DatasetXXX_Name`` plus label folders kept outside it), writing
cases with SimpleITK, ``dataset.json``, semi-supervised split files, ``-np`` parallelism and the
final check that the written dataset loads with :class:`autossl.raw.RawDataset`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from autossl import paths
from autossl.raw.dataset import DatasetError, RawDataset, validate_dataset_json
from autossl.utilities.file_io import atomic_path, load_json, save_json

FILE_ENDING = ".nii.gz"
ROLES = ("labeled", "unlabeled", "test", "val")
IMAGE_FOLDERS = {"labeled": "imagesTr", "unlabeled": "imagesTrUnlabeled", "test": "imagesTs", "val": "imagesVal"}
KNOWN_ENTRIES = set(IMAGE_FOLDERS.values()) | {"labelsTr", "dataset.json"}


class ConversionError(ValueError):
    """Bad converter input or output; the message names the file and what is wrong."""


# errors a converter's main() reports as one line instead of a traceback
CLI_ERRORS = (ConversionError, paths.PathNotConfiguredError)


# ----------------------------------------------------------------------------- names and folders
def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{id:03d}_{name}``, checking both parts."""
    if not 0 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset ID must be between 0 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or ""):
        raise ConversionError(f"dataset name {name!r} must be letters, digits, '_' or '-' (no spaces)")
    return f"Dataset{int(dataset_id):03d}_{name}"


def resolve_output_folder(dataset_id: int, name: str) -> Path:
    """``$autossl_raw/DatasetXXX_Name`` (falls back to ``nnUNet_raw``)."""
    return paths.raw_dir() / dataset_folder_name(dataset_id, name)


def default_labels_folder(output_folder: Path, kind: str = "test") -> Path:
    """Where held-out labels go by default: ``$autossl_raw/../DatasetXXX_Name_{kind}labels``.

    Outside the raw folder, so neither the dataset nor a dataset-ID lookup ever sees them."""
    output_folder = Path(output_folder).absolute()
    return output_folder.parent.parent / f"{output_folder.name}_{kind}labels"


@dataclass(frozen=True)
class Layout:
    """Where each case of each role goes. Unlabelled cases never get a label file."""

    folder: Path
    test_labels: Path | None = None
    val_labels: Path | None = None
    file_ending: str = FILE_ENDING

    def images_dir(self, role: str) -> Path:
        if role not in IMAGE_FOLDERS:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return self.folder / IMAGE_FOLDERS[role]

    def image_path(self, role: str, case: str, channel: int = 0) -> Path:
        return self.images_dir(role) / f"{case}_{channel:04d}{self.file_ending}"

    def label_path(self, role: str, case: str) -> Path | None:
        folder = {"labeled": self.folder / "labelsTr", "unlabeled": None,
                  "test": self.test_labels, "val": self.val_labels}[role]
        return None if folder is None else folder / f"{case}{self.file_ending}"


def _check_outside(label_folder: Path, dataset_folder: Path, what: str) -> None:
    lf, df = label_folder.resolve(), dataset_folder.resolve()
    if lf == df or lf.is_relative_to(df) or df.is_relative_to(lf):
        raise ConversionError(f"{label_folder}: the {what} labels folder must lie outside the raw dataset {dataset_folder}")
    try:
        raw = paths.raw_dir().resolve()
    except paths.PathNotConfiguredError:
        return
    if lf.parent == raw and lf.name.startswith("Dataset"):
        raise ConversionError(
            f"{label_folder}: a folder named Dataset* directly in the raw folder {raw} would be taken for a "
            f"dataset; put the {what} labels elsewhere (--{what}-labels-out)")


def prepare_output(layout: Layout, overwrite: bool) -> None:
    """Create the output folders; refuse to mix with an earlier conversion unless ``overwrite``."""
    folders = [(layout.folder, "dataset")]
    if layout.test_labels is not None:
        _check_outside(layout.test_labels, layout.folder, "test")
        folders.append((layout.test_labels, "test labels"))
    if layout.val_labels is not None:
        _check_outside(layout.val_labels, layout.folder, "val")
        folders.append((layout.val_labels, "val labels"))
    for folder, what in folders:
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            if not overwrite:
                raise ConversionError(
                    f"{folder}: the {what} folder already exists and is not empty; pass --overwrite to replace it")
            if folder.is_dir():
                shutil.rmtree(folder)
            else:
                folder.unlink()
    for folder, _ in folders:
        folder.mkdir(parents=True, exist_ok=True)


@contextmanager
def writing_output(layout: Layout, overwrite: bool) -> Iterator[None]:
    """``prepare_output``, then remove the output folders again if the conversion fails,
    so that a failed run leaves no partial dataset behind."""
    prepare_output(layout, overwrite)
    try:
        yield
    except BaseException:
        for folder in (layout.folder, layout.test_labels, layout.val_labels):
            if folder is not None and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- reading / writing
def read_image(path: str | os.PathLike) -> sitk.Image:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise ConversionError(f"{path}: cannot be read as an image ({last})") from None


def write_image(img: sitk.Image, path: str | os.PathLike) -> None:
    """Atomic, compressed write; the ending picks the format."""
    path = Path(path)
    ending = FILE_ENDING if path.name.endswith(FILE_ENDING) else path.suffix
    with atomic_path(path, suffix=ending) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"{src}: file not found")
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def array_to_image(arr: np.ndarray, spacing: Sequence[float], origin: Sequence[float] | None = None,
                   direction: Sequence[float] | None = None) -> sitk.Image:
    """A SimpleITK image from an array in SimpleITK order (z, y, x); geometry in (x, y, z) order."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    dim = img.GetDimension()
    if len(spacing) != dim:
        raise ValueError(f"{dim}D array needs {dim} spacing values, got {tuple(spacing)}")
    img.SetSpacing([float(s) for s in spacing])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    return img


def split_channels(img: sitk.Image, source: str | os.PathLike = "") -> list[sitk.Image]:
    """One 3D (or 2D) image per channel of a 4D or vector image; a 3D image is returned as is."""
    if img.GetNumberOfComponentsPerPixel() > 1:
        return [sitk.VectorIndexSelectionCast(img, c) for c in range(img.GetNumberOfComponentsPerPixel())]
    dim = img.GetDimension()
    if dim in (2, 3):
        return [img]
    if dim != 4:
        raise ConversionError(f"{source}: {dim}D image; expected 3D or 4D (channels last)")
    arr = sitk.GetArrayFromImage(img)  # (c, z, y, x)
    spacing, origin = img.GetSpacing()[:3], img.GetOrigin()[:3]
    direction = np.asarray(img.GetDirection()).reshape(4, 4)[:3, :3].ravel()
    return [array_to_image(arr[c], spacing, origin, direction) for c in range(arr.shape[0])]


def check_same_geometry(image: sitk.Image, label: sitk.Image, where: str) -> None:
    if image.GetSize() != label.GetSize():
        raise ConversionError(f"{where}: label size {label.GetSize()} differs from image size {image.GetSize()}")
    if not np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=1e-4, atol=1e-5):
        raise ConversionError(f"{where}: label spacing {label.GetSpacing()} differs from image spacing {image.GetSpacing()}")


def write_case(layout: Layout, role: str, case: str, images: Sequence[sitk.Image], label: sitk.Image | None) -> None:
    """Write a case's channels and, where its role keeps one, its label (uint8 when it fits)."""
    for c, img in enumerate(images):
        write_image(img, layout.image_path(role, case, c))
    dst = layout.label_path(role, case)
    if role == "labeled" and label is None:
        raise ConversionError(f"case {case}: a labelled case needs a label")
    if dst is None or label is None:
        return
    check_same_geometry(images[0], label, f"case {case}")
    write_image(label, dst)


def label_to_uint8(label: sitk.Image, allowed: Iterable[int], where: str) -> sitk.Image:
    """Cast a label map to uint8 after checking its values are in ``allowed``."""
    arr = sitk.GetArrayViewFromImage(label)
    values = np.unique(arr)
    bad = sorted(set(values.tolist()) - {float(a) for a in allowed})
    if bad:
        raise ConversionError(f"{where}: unexpected label values {bad[:10]}; expected a subset of {sorted(allowed)}")
    out = sitk.Cast(label, sitk.sitkUInt8) if label.GetPixelID() != sitk.sitkUInt8 else label
    return out


# ----------------------------------------------------------------------------- dataset.json
def generate_dataset_json(output_folder: str | os.PathLike, channel_names: dict, labels: dict,
                          num_training_cases: int, file_ending: str, **extra: Any) -> dict:
    """Write ``dataset.json`` (nnU-Net v2 format) atomically; returns it.

    ``channel_names`` {"0": "MRI"} (int keys are turned into strings), ``labels`` {"background": 0, ...};
    ``extra`` keys (``numUnlabeled``, ``name``, ...) are added as given."""
    dj = {
        "channel_names": {str(k): v for k, v in channel_names.items()},
        "labels": dict(labels),
        "numTraining": int(num_training_cases),
        "file_ending": file_ending,
    }
    dj.update(extra)
    path = Path(output_folder) / "dataset.json"
    problems = validate_dataset_json(dj, str(path))
    if problems:
        raise ConversionError("\n".join(problems))
    save_json(dj, path)
    return dj


# ----------------------------------------------------------------------------- splits
@dataclass
class Split:
    """Semi-supervised split: labelled cases, unlabelled cases and test cases."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    source: dict = field(default_factory=dict)

    def roles(self) -> dict[str, str]:
        out = {c: "labeled" for c in self.labeled}
        out.update({c: "unlabeled" for c in self.unlabeled})
        out.update({c: "test" for c in self.test})
        return out


def _str_list(d: dict, key: str, path: Path) -> list[str]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConversionError(f"{path}: '{key}' must be a list of case names")
    dup = sorted({x for x in v if v.count(x) > 1})
    if dup:
        raise ConversionError(f"{path}: '{key}' lists case {dup[0]} more than once")
    return list(v)


def load_split(path: str | os.PathLike, labeled_key: str) -> Split:
    """Read a split JSON with ``test``, ``train_pool`` and labelled lists (e.g. ``labeled_10``).

    ``labeled_key='all'`` labels the whole pool (the fully supervised upper bound)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: split file not found")
    d = load_json(path)
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object with 'test', 'train_pool' and labelled lists")
    for key in ("test", "train_pool"):
        if key not in d:
            raise ConversionError(f"{path}: missing key '{key}'")
    test, pool = _str_list(d, "test", path), _str_list(d, "train_pool", path)
    if labeled_key == "all":
        labeled = list(pool)
    else:
        if labeled_key not in d or labeled_key in ("test", "train_pool"):
            keys = [k for k, v in d.items() if isinstance(v, list) and k not in ("test", "train_pool")]
            raise ConversionError(f"{path}: no labelled list '{labeled_key}'; available: {keys + ['all']}")
        labeled = _str_list(d, labeled_key, path)
    overlap = sorted(set(test) & set(pool))
    if overlap:
        raise ConversionError(f"{path}: case {overlap[0]} is in both 'test' and 'train_pool'")
    outside = [c for c in labeled if c not in set(pool)]
    if outside:
        raise ConversionError(f"{path}: labelled case {outside[0]} ('{labeled_key}') is not in 'train_pool'")
    lab = set(labeled)
    return Split(labeled=labeled, unlabeled=[c for c in pool if c not in lab], test=test,
                 source={"file": str(path.resolve()), "labeled": labeled_key})


def first_n_split(cases: Sequence[str], n_labeled: int | None, seed: int | None, what: str) -> tuple[list[str], list[str]]:
    """(labelled, unlabelled): all cases when ``n_labeled`` is None, the first N, or N drawn with ``seed``."""
    cases = list(cases)
    if n_labeled is None:
        return cases, []
    if not 1 <= n_labeled <= len(cases):
        raise ConversionError(f"--labeled {n_labeled}: {what} has {len(cases)} cases; choose 1..{len(cases)}")
    order = cases if seed is None else [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    lab = set(order[:n_labeled])
    return [c for c in cases if c in lab], [c for c in cases if c not in lab]


# ----------------------------------------------------------------------------- running
def default_num_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _star(item):
    fn, args = item
    return fn(*args)


def run_jobs(fn: Callable, jobs: Sequence[tuple], num_processes: int, desc: str) -> list:
    """``fn(*job)`` for every job, with ``num_processes`` workers and a tqdm bar; results in job order."""
    jobs = list(jobs)
    if num_processes <= 1 or len(jobs) <= 1:
        return [fn(*j) for j in tqdm(jobs, desc=desc, unit="case")]
    with Pool(min(num_processes, len(jobs))) as pool:
        return list(tqdm(pool.imap(_star, [(fn, j) for j in jobs]), total=len(jobs), desc=desc, unit="case"))


def add_common_arguments(parser: argparse.ArgumentParser, default_id: int | None, default_name: str | None,
                         held_out_labels: bool = True) -> None:
    """-d, --name, -np, --overwrite and (with held-out cases) --test-labels-out."""
    parser.add_argument("-d", "--dataset-id", type=int, default=default_id,
                        help=f"dataset ID of the output DatasetXXX_Name (default: {default_id if default_id is not None else 'from the input'})")
    parser.add_argument("--name", default=default_name,
                        help=f"dataset name of the output DatasetXXX_Name (default: {default_name or 'from the input'})")
    parser.add_argument("-np", "--num-processes", type=int, default=default_num_processes(),
                        help="parallel worker processes (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output dataset (and its held-out label folders)")
    if held_out_labels:
        parser.add_argument("--test-labels-out", type=Path, default=None,
                            help="folder for the test cases' labels, kept outside the raw dataset "
                                 "(default: $autossl_raw/../DatasetXXX_Name_testlabels)")


# ----------------------------------------------------------------------------- final check
def verify_output(layout: Layout, expected: dict[str, Iterable[str]]) -> RawDataset:
    """Load the written dataset with RawDataset and check it holds exactly the expected cases.

    No label may exist in the raw dataset for an unlabelled or test case."""
    try:
        ds = RawDataset(layout.folder)
    except DatasetError as e:
        raise ConversionError(f"the converted dataset does not load: {e}") from None
    found = {"labeled": set(ds.labeled), "unlabeled": set(ds.unlabeled), "test": set(ds.test)}
    for role, cases in found.items():
        want = set(expected.get(role, ()))
        if cases != want:
            diff = sorted(cases ^ want)
            raise ConversionError(f"{layout.images_dir(role)}: expected {len(want)} {role} cases, found {len(cases)} "
                                  f"(first difference: {diff[0]})")
    labels = {p.name[: -len(layout.file_ending)] for p in (layout.folder / "labelsTr").glob("*" + layout.file_ending)}
    if labels != found["labeled"]:
        extra = sorted(labels - found["labeled"])
        raise ConversionError(f"{layout.folder / 'labelsTr'}: holds labels of cases that are not labelled, e.g. {extra[:3]}")
    stray = sorted(p.name for p in layout.folder.iterdir() if p.name not in KNOWN_ENTRIES and not p.name.startswith("."))
    if stray:
        raise ConversionError(f"{layout.folder}: unexpected entries {stray}")
    return ds


def summary(layout: Layout, ds: RawDataset, extra: str = "") -> str:
    lines = [f"Wrote {layout.folder}: {len(ds.labeled)} labelled, {len(ds.unlabeled)} unlabelled, {len(ds.test)} test cases"]
    if layout.test_labels is not None and ds.test:
        lines.append(f"Test labels (outside the raw dataset): {layout.test_labels}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)
