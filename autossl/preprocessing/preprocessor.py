"""The per-case preprocessor and the dataset preprocessing run, as nnU-Net v2's ``DefaultPreprocessor``.

Per case: transpose -> crop to the nonzero region -> normalise (before resampling) -> resample to
the configuration's spacing -> sample foreground locations for oversampling (labelled cases only).

``run`` / ``run_configurations`` preprocess every labelled case into
``$autossl_preprocessed/DatasetXXX/<data_identifier>/`` and every unlabelled case
(``imagesTrUnlabeled``) into ``<data_identifier>_unlabeled/`` (no seg, ``class_locations = {}``).
Workers write their cases themselves (atomically, the ``.pkl`` last) and return only the case
name. A rerun skips finished cases; leftover temporary files are removed; a folder written with
different preprocessing settings (other spacing, normalisation, ...) is cleared and redone.
Configurations whose preprocessing is identical for a case (e.g. Hippocampus 2d and 3d_fullres,
both at the native 1 mm) are computed once and written to each folder.

Nothing here imports torch: preprocessing workers stay small and start fast.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from autossl.imageio.base import ImageReadError
from autossl.preprocessing import storage
from autossl.preprocessing.resampling import compute_new_shape, get_resampling_function
from autossl.utilities.file_io import atomic_path, load_json, save_json

RECIPE_FILE = ".autossl_preprocessing.json"
NUM_SAMPLES = 10000
MIN_PERCENT_COVERAGE = 0.01


class PreprocessingError(RuntimeError):
    """Preprocessing cannot run or a case failed; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------
# what a configuration needs, as plain picklable data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Everything needed to preprocess one case for one configuration (plain, picklable data)."""
    transpose_forward: tuple[int, ...]
    spacing: tuple[float, ...]  # the configuration's spacing (2 entries for 2d)
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple  # ((channel, ((key, value), ...)), ...)
    resampling_fn_data: str
    resampling_fn_data_kwargs: tuple
    resampling_fn_seg: str
    resampling_fn_seg_kwargs: tuple
    collect_for: tuple  # labels (int) or regions (tuple of int) to sample locations for

    def signature(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def case_key(self, spacing: Sequence[float]) -> tuple:
        """Two recipes with the same key give identical results for a case with this spacing."""
        return (self.transpose_forward, tuple(float(s) for s in self.target_spacing(spacing)),
                self.normalization_schemes, self.use_mask_for_norm, self.intensity_properties,
                self.resampling_fn_data, self.resampling_fn_data_kwargs, self.resampling_fn_seg,
                self.resampling_fn_seg_kwargs, self.collect_for)

    def original_spacing(self, spacing: Sequence[float]) -> list[float]:
        return [float(spacing[i]) for i in self.transpose_forward]

    def target_spacing(self, spacing: Sequence[float]) -> list[float]:
        original = self.original_spacing(spacing)
        target = [float(s) for s in self.spacing]
        if len(target) < len(original):  # 2d: the spacing between slices is not changed
            target = original[: len(original) - len(target)] + target
        return target


def _freeze(v: Any):
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.generic):
        return v.item()
    return v


def _collect_for(dataset_json: dict) -> tuple:
    """nnU-Net's LabelManager: foreground regions, or foreground labels; plus all labels with ignore."""
    labels = dataset_json["labels"]
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for k, v in labels.items() if k != "background")
    if has_regions:
        out = [tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)
               for k, v in labels.items() if k not in ("background", "ignore")]
    else:
        out = sorted({int(v[0]) if isinstance(v, (list, tuple)) else int(v)
                      for k, v in labels.items() if k not in ("background", "ignore")})
    if "ignore" in labels:
        all_labels = sorted({0, *(x for r in out for x in (r if isinstance(r, tuple) else (r,)))})
        out = list(out) + [tuple(all_labels)]
    return tuple(out)


_MISSING = object()


def _cfg(obj, key: str, default: Any = _MISSING, dict_attr: str = "configuration"):
    """A plans entry: from the manager's dict (nnU-Net keeps it in ``.configuration``/``.plans``),
    else its attribute, else ``default``."""
    d = getattr(obj, dict_attr, None)
    if isinstance(d, dict):
        if key in d:
            return d[key]
        if default is not _MISSING:
            return default
    v = getattr(obj, key, _MISSING)
    if v is _MISSING or (default is not _MISSING and callable(v)):
        if default is _MISSING:
            raise PreprocessingError(f"the plans have no entry {key!r}")
        return default
    return v


DEFAULT_DATA_KWARGS = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
DEFAULT_SEG_KWARGS = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}


def make_recipe(plans_manager, configuration_manager, dataset_json: dict) -> Recipe:
    """Pull what preprocessing needs out of the plans (works on PlansManager/ConfigurationManager)."""
    cm = configuration_manager
    fg = _cfg(plans_manager, "foreground_intensity_properties_per_channel", dict_attr="plans")
    return Recipe(
        transpose_forward=tuple(int(i) for i in _cfg(plans_manager, "transpose_forward", dict_attr="plans")),
        spacing=tuple(float(s) for s in _cfg(cm, "spacing")),
        normalization_schemes=tuple(_cfg(cm, "normalization_schemes")),
        use_mask_for_norm=tuple(bool(b) for b in _cfg(cm, "use_mask_for_norm")),
        intensity_properties=_freeze(fg),
        resampling_fn_data=str(_cfg(cm, "resampling_fn_data", "resample_data_or_seg_to_shape")),
        resampling_fn_data_kwargs=_freeze(_cfg(cm, "resampling_fn_data_kwargs", DEFAULT_DATA_KWARGS)),
        resampling_fn_seg=str(_cfg(cm, "resampling_fn_seg", "resample_data_or_seg_to_shape")),
        resampling_fn_seg_kwargs=_freeze(_cfg(cm, "resampling_fn_seg_kwargs", DEFAULT_SEG_KWARGS)),
        collect_for=_collect_for(dataset_json),
    )


def _thaw_kwargs(frozen: tuple) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in frozen}


def _intensity_props(recipe: Recipe, channel: int) -> dict:
    return dict(dict(recipe.intensity_properties).get(str(channel), ()))


# ----------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------
def sample_foreground_locations(seg: np.ndarray, classes_or_regions: Sequence, seed: int = 1234,
                                verbose: bool = False) -> dict:
    """Per class/region: ``min(10000, n)`` but at least 1% of its voxels (seed 1234), as nnU-Net."""
    rs = np.random.RandomState(seed)
    out: dict = {}
    for c in classes_or_regions:
        if isinstance(c, (tuple, list)):
            key = tuple(int(x) for x in c)
            mask = np.isin(seg, key)
        else:
            key = int(c)
            mask = seg == key
        locs = np.argwhere(mask)
        if len(locs) == 0:
            out[key] = []
            continue
        n = min(NUM_SAMPLES, len(locs))
        n = max(n, int(np.ceil(len(locs) * MIN_PERCENT_COVERAGE)))
        out[key] = locs[rs.choice(len(locs), n, replace=False)]
        if verbose:
            print(key, n)
    return out


def _normalize(data: np.ndarray, seg: np.ndarray, recipe: Recipe) -> np.ndarray:
    from autossl.preprocessing.normalization import get_normalization_class

    if len(recipe.normalization_schemes) != data.shape[0]:
        raise PreprocessingError(f"the plans list {len(recipe.normalization_schemes)} normalisation scheme(s) "
                                 f"but the case has {data.shape[0]} channel(s)")
    for c in range(data.shape[0]):
        normalizer = get_normalization_class(recipe.normalization_schemes[c])(
            use_mask_for_norm=recipe.use_mask_for_norm[c], intensityproperties=_intensity_props(recipe, c))
        data[c] = normalizer.run(data[c], seg[0])
    return data


def preprocess_array(data: np.ndarray, seg: np.ndarray | None, properties: dict, recipe: Recipe,
                     verbose: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """transpose -> crop -> normalise -> resample (-> foreground locations); updates ``properties``."""
    from autossl.preprocessing.cropping import crop_to_nonzero

    data = data.astype(np.float32)  # a copy: the caller's array is left alone
    has_seg = seg is not None
    if has_seg:
        if tuple(data.shape[1:]) != tuple(seg.shape[1:]):
            raise PreprocessingError(f"image shape {tuple(data.shape[1:])} and segmentation shape "
                                     f"{tuple(seg.shape[1:])} differ; run with --verify_dataset_integrity")
        seg = np.copy(seg)
    axes = [0, *[i + 1 for i in recipe.transpose_forward]]
    data = data.transpose(axes)
    if has_seg:
        seg = seg.transpose(axes)
    original_spacing = recipe.original_spacing(properties["spacing"])

    properties["shape_before_cropping"] = tuple(int(s) for s in data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data, seg)
    properties["bbox_used_for_cropping"] = [[int(a), int(b)] for a, b in bbox]
    properties["shape_after_cropping_and_before_resampling"] = tuple(int(s) for s in data.shape[1:])

    target_spacing = recipe.target_spacing(properties["spacing"])
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)

    data = _normalize(data, seg, recipe)  # before resampling, as nnU-Net: the mask still fits

    old_shape = data.shape[1:]
    fn_data = get_resampling_function(recipe.resampling_fn_data)
    data = fn_data(data, new_shape, original_spacing, target_spacing, **_thaw_kwargs(recipe.resampling_fn_data_kwargs))
    if verbose:
        print(f"old shape: {tuple(old_shape)}, new shape: {tuple(new_shape)}, old spacing: {original_spacing}, "
              f"new spacing: {target_spacing}")
    if not has_seg:
        properties["class_locations"] = {}
        return np.ascontiguousarray(data, dtype=np.float32), None
    fn_seg = get_resampling_function(recipe.resampling_fn_seg)
    seg = fn_seg(seg, new_shape, original_spacing, target_spacing, **_thaw_kwargs(recipe.resampling_fn_seg_kwargs))
    properties["class_locations"] = sample_foreground_locations(seg, recipe.collect_for, verbose=verbose)
    seg = seg.astype(np.int16 if seg.max(initial=0) > 127 else np.int8, copy=False)
    return np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(seg)


def reader_for(dataset_json: dict, plans_manager=None):
    """The reader/writer instance of a dataset: dataset.json's override, else the plans', else by file ending."""
    from autossl.imageio.registry import reader_writer_class

    name = None
    plans = getattr(plans_manager, "plans", None)
    if isinstance(plans, dict):
        name = plans.get("image_reader_writer")
    name = dataset_json.get("overwrite_image_reader_writer") or name
    try:
        return reader_writer_class(dataset_json["file_ending"], name)()
    except ValueError:  # a reader name from nnU-Net's plans we do not have: pick by file ending
        return reader_writer_class(dataset_json["file_ending"], dataset_json.get("overwrite_image_reader_writer"))()


_reader = reader_for


def read_case(rw, image_files: Sequence[str], seg_file: str | None = None):
    """Read a case with the reader ``rw`` after checking its NIfTI files' own bytes; returns
    (data, seg or None, properties).

    SimpleITK reads a truncated ``.nii.gz`` without an error (the missing voxels become 0) and
    NaN/inf voxels of NIfTI files as 0, so each NIfTI file is decompressed once and checked first
    (``autossl.imageio.file_check``); the arrays the reader returns (any format) must be finite
    too. A problem raises ``ImageFileError`` naming the file and what is wrong."""
    from autossl.imageio.file_check import ImageFileError, nonfinite_problems, raise_for_files

    image_files = [str(f) for f in image_files]
    raise_for_files(image_files, [str(seg_file)] if seg_file is not None else [])
    data, properties = rw.read_images(image_files)
    problems = nonfinite_problems(data, image_files)
    seg = None
    if seg_file is not None:
        seg = rw.read_seg(str(seg_file))[0]
        problems += nonfinite_problems(seg, [str(seg_file)], "label")
    if problems:
        raise ImageFileError("\n".join(problems))
    return data, seg, properties


def check_channel_count(data: np.ndarray, image_files: Sequence[str], dataset_json: dict) -> None:
    """The files read must hold as many channels as dataset.json lists (an RGB PNG holds three)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if isinstance(channels, dict) and data.shape[0] != len(channels):
        raise ImageReadError(f"{image_files[0]}: {len(image_files)} image file(s) hold {data.shape[0]} channel(s) but "
                             f"dataset.json 'channel_names' lists {len(channels)} ({', '.join(map(str, image_files))})")


class DefaultPreprocessor:
    """nnU-Net v2's preprocessor: ``run_case`` for one case, ``run`` for a whole dataset."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def run_case_npy(self, data: np.ndarray, seg: np.ndarray | None, properties: dict, plans_manager,
                     configuration_manager, dataset_json: dict | str):
        """Preprocess arrays read by a reader; returns (data, seg or None); ``properties`` is updated."""
        if isinstance(dataset_json, (str, os.PathLike)):
            dataset_json = load_json(dataset_json)
        recipe = make_recipe(plans_manager, configuration_manager, dataset_json)
        return preprocess_array(data, seg, properties, recipe, self.verbose)

    def run_case(self, image_files: Sequence[str], seg_file: str | None, plans_manager, configuration_manager,
                 dataset_json: dict | str):
        """Read and preprocess one case; returns (data, seg or None, properties)."""
        if isinstance(dataset_json, (str, os.PathLike)):
            dataset_json = load_json(dataset_json)
        rw = _reader(dataset_json, plans_manager)
        data, seg, properties = read_case(rw, image_files, seg_file)
        check_channel_count(data, image_files, dataset_json)
        data, seg = self.run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)
        return data, seg, properties

    def run(self, dataset: str | int, configuration: str, plans_identifier: str, num_processes: int,
            overwrite: bool = False) -> None:
        """Preprocess all labelled and unlabelled training cases of ``dataset`` for one configuration."""
        run_configurations(dataset, [configuration], plans_identifier, num_processes, overwrite, self.verbose)


# ----------------------------------------------------------------------------------------------
# the whole dataset
# ----------------------------------------------------------------------------------------------
@dataclass
class _Output:
    recipe: Recipe
    folder: str
    patch_size: tuple[int, ...]


def _copy_atomic(src: str, dst: Path, force: bool = False) -> None:
    s = os.stat(src)
    if dst.is_file() and not force:
        d = os.stat(dst)
        if d.st_size == s.st_size and d.st_mtime >= s.st_mtime:
            return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _process_case(job: tuple) -> str:
    """Worker: read one case once, preprocess it for every output that needs it, write the results."""
    case, images, label, outputs, dataset_json, gt_folder, overwrite = job
    try:
        rw = _reader(dataset_json)
        data, seg, props = read_case(rw, images, label)
        check_channel_count(data, images, dataset_json)
        done: dict[tuple, tuple] = {}
        for out in outputs:
            key = out.recipe.case_key(props["spacing"])
            if key not in done:
                p = deepcopy(props)
                d, s = preprocess_array(data, seg, p, out.recipe)
                done[key] = (d, s, p)
            d, s, p = done[key]
            storage.save_case(out.folder, case, d, s, p, out.patch_size)
        if label is not None and gt_folder is not None:
            _copy_atomic(label, Path(gt_folder) / f"{case}{dataset_json['file_ending']}", force=overwrite)
    except ImageReadError as e:  # the message names the file and what is wrong with it
        raise PreprocessingError(f"case {case}: {e}") from None
    except Exception as e:
        files = ", ".join([*images, *([label] if label else [])])
        raise PreprocessingError(f"case {case} ({files}): {type(e).__name__}: {e}") from None
    return case


def _remove_temporaries(folder: Path) -> None:
    if folder.is_dir():
        for f in folder.iterdir():
            if f.name.startswith(".") and ".tmp" in f.name:
                f.unlink(missing_ok=True)


def _prepare_folder(folder: Path, recipe: Recipe, patch_size, overwrite: bool, wanted: set[str]) -> None:
    """Clear the folder when asked, or when it holds cases made with other settings; drop leftovers."""
    marker = folder / RECIPE_FILE
    # as it reads back from JSON (tuples become lists), so that equal settings compare equal
    signature = json.loads(json.dumps({"recipe": recipe.signature(), "patch_size": list(patch_size)}))
    if folder.is_dir():
        old = None
        if marker.is_file():
            try:
                old = load_json(marker)
            except ValueError:
                old = None
        if overwrite or old != signature:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(folder)
    for case in storage.list_cases(folder):  # cases no longer in the raw dataset
        if case not in wanted:
            for f in (f"{case}.pkl", f"{case}.b2nd", f"{case}_seg.b2nd"):
                (folder / f).unlink(missing_ok=True)
    save_json(signature, marker)


def _pool_context():
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["autossl.preprocessing.preprocessor", "autossl.preprocessing.cropping",
                                    "autossl.preprocessing.normalization", "autossl.imageio.registry"])
        return ctx
    return multiprocessing.get_context("spawn")


def run_jobs(jobs: list, num_processes: int, desc: str, verbose: bool = False) -> None:
    """Run ``_process_case`` over ``jobs`` with a process pool and a progress bar."""
    if not jobs:
        return
    n = max(1, min(int(num_processes), len(jobs)))
    bar = tqdm(total=len(jobs), desc=desc, disable=verbose)
    try:
        if n == 1:
            for j in jobs:
                _process_case(j)
                bar.update()
            return
        with cf.ProcessPoolExecutor(n, mp_context=_pool_context()) as ex:
            futures = [ex.submit(_process_case, j) for j in jobs]
            try:
                for f in cf.as_completed(futures):
                    f.result()
                    bar.update()
            except cf.process.BrokenProcessPool:
                raise PreprocessingError(
                    "a preprocessing worker died without an error message; this usually means the system ran "
                    f"out of memory. Try fewer processes (-np, now {n}).") from None
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()


def available_configurations(plans_manager) -> list[str]:
    plans = getattr(plans_manager, "plans", None)
    if isinstance(plans, dict):
        return list(plans.get("configurations", {}))
    return list(plans_manager.available_configurations)


def _plans_manager(plans_file: Path):
    from autossl.planning.plans_handler import PlansManager

    return PlansManager(str(plans_file))


def run_configurations(dataset: str | int, configurations: Sequence[str], plans_identifier: str,
                       num_processes: int, overwrite: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Preprocess labelled and unlabelled training cases for several configurations in one pass.

    Each case is read once; configurations with identical preprocessing share the computation.
    Returns {configuration: labelled output folder}."""
    from autossl import paths
    from autossl.raw.dataset import DatasetError, RawDataset
    from autossl.utilities.dataset_name import find_dataset_name

    name = find_dataset_name(dataset)
    raw_folder = paths.raw_dir() / name
    if not raw_folder.is_dir():
        raise PreprocessingError(f"{raw_folder}: raw dataset folder not found")
    pre_folder = paths.preprocessed_dir() / name
    plans_file = pre_folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise PreprocessingError(f"{plans_file}: plans not found; run autossl_plan_experiment -d {dataset} first")
    try:
        raw = RawDataset(raw_folder)
    except DatasetError as e:
        raise PreprocessingError(str(e)) from None
    dataset_json = raw.dataset_json
    pre_folder.mkdir(parents=True, exist_ok=True)
    _copy_atomic(str(raw_folder / "dataset.json"), pre_folder / "dataset.json")
    pm = _plans_manager(plans_file)

    outputs_lab: list[_Output] = []
    outputs_unl: list[_Output] = []
    result: dict[str, Path] = {}
    seen_ids: set[str] = set()
    for c in configurations:
        try:
            cm = pm.get_configuration(c)
        except (KeyError, ValueError, RuntimeError):
            raise PreprocessingError(f"{plans_file}: configuration {c!r} not found; available: "
                                     f"{available_configurations(pm)}") from None
        recipe = make_recipe(pm, cm, dataset_json)
        ident = _cfg(cm, "data_identifier")
        patch = tuple(int(p) for p in _cfg(cm, "patch_size"))
        patch = (1,) * (3 - len(patch)) + patch  # 2d cases are stored as (c, 1, x, y), like nnU-Net
        lab_folder = pre_folder / ident
        result[c] = lab_folder
        if ident in seen_ids:  # e.g. a cascade stage sharing 3d_fullres' data
            continue
        seen_ids.add(ident)
        unl_folder = storage.unlabeled_folder(lab_folder)
        _prepare_folder(lab_folder, recipe, patch, overwrite, set(raw.labeled))
        outputs_lab.append(_Output(recipe, str(lab_folder), patch))
        if raw.unlabeled:
            _prepare_folder(unl_folder, recipe, patch, overwrite, set(raw.unlabeled))
            outputs_unl.append(_Output(recipe, str(unl_folder), patch))
        elif unl_folder.is_dir():
            shutil.rmtree(unl_folder)

    gt_folder = pre_folder / "gt_segmentations"
    gt_folder.mkdir(exist_ok=True)
    jobs = []
    for case, d in raw.labeled.items():
        todo = [o for o in outputs_lab if not storage.case_is_complete(o.folder, case, labeled=True)]
        gt = gt_folder / f"{case}{raw.file_ending}"
        if todo or not gt.is_file() or overwrite:
            jobs.append((case, d["images"], d["label"], todo, dataset_json, str(gt_folder), overwrite))
    for case, d in raw.unlabeled.items():
        todo = [o for o in outputs_unl if not storage.case_is_complete(o.folder, case, labeled=False)]
        if todo:
            jobs.append((case, d["images"], None, todo, dataset_json, None, overwrite))
    n_total = len(raw.labeled) + len(raw.unlabeled)
    if verbose or len(jobs) < n_total:
        print(f"{name}: {len(jobs)} of {n_total} case(s) to preprocess for {', '.join(configurations)} "
              f"({len(raw.labeled)} labelled, {len(raw.unlabeled)} unlabelled)")
    run_jobs(jobs, num_processes, desc=f"preprocess {'+'.join(configurations)}", verbose=verbose)
    return result
