"""Connected-component postprocessing, decided on cross-validation predictions (nnU-Net v2's rule).

1. Keep only the largest connected component of all foreground together; adopt this if it
   raises the foreground-mean Dice and lowers no label's (region's) mean Dice.
2. Then, label by label (region by region), keep only that label's largest component; adopt each
   step under the same rule, judged on that label's mean Dice, starting from what was adopted so far.

Components use full connectivity (26 in 3D, 8 in 2D, as nnU-Net via scikit-image); when several
components tie for the largest, all of them are kept. The decision is written to
``postprocessing.json`` (readable, and what ``apply_postprocessing`` and ``autossl_predict
--postprocess`` read) and ``postprocessing.pkl`` ((functions, kwargs), nnU-Net's format). In the
JSON each step's ``labels_or_regions`` is a list whose entries are a label (int) or a region (list).
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import cc3d
import numpy as np
from tqdm import tqdm

from autossl.evaluation.evaluate import compute_metrics_on_folder, label_or_region_to_key, \
    labels_or_regions_from_dataset_json
from autossl.evaluation.metrics import region_or_label_to_mask
from autossl.inference.export import reader_writer_for
from autossl.utilities.file_io import load_json, load_pickle, save_json, save_pickle
from autossl.utilities.label_handling import LabelManager

POSTPROCESSING_JSON = "postprocessing.json"
POSTPROCESSING_PKL = "postprocessing.pkl"


def remove_all_but_largest_component(mask: np.ndarray) -> np.ndarray:
    """Binary mask -> the largest connected component(s) (full connectivity)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if not mask.any():
        return mask
    squeezed = mask.reshape([s for s in mask.shape if s > 1] or [1])
    connectivity = {1: 2, 2: 8, 3: 26}.get(squeezed.ndim)
    if connectivity is None:
        raise ValueError(f"connected components need a 1D-3D mask, got shape {mask.shape}")
    if squeezed.ndim == 1:
        squeezed = squeezed[None]
        connectivity = 8
    labels = cc3d.connected_components(squeezed, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes == sizes.max())
    return np.isin(labels, keep).reshape(mask.shape)


def remove_all_but_largest_component_from_segmentation(segmentation: np.ndarray,
                                                       labels_or_regions: int | Sequence,
                                                       background_label: int = 0) -> np.ndarray:
    """Set voxels of ``labels_or_regions`` (together) outside their largest component to background."""
    if np.isscalar(labels_or_regions) or isinstance(labels_or_regions, tuple):
        labels_or_regions = [labels_or_regions]
    mask = np.zeros(segmentation.shape, dtype=bool)
    for lr in labels_or_regions:
        mask |= region_or_label_to_mask(segmentation, lr)
    keep = remove_all_but_largest_component(mask)
    out = np.copy(segmentation)
    out[mask & ~keep] = background_label
    return out


POSTPROCESSING_FUNCTIONS: dict[str, Callable] = {
    "remove_all_but_largest_component_from_segmentation": remove_all_but_largest_component_from_segmentation,
}


# ---------------------------------------------------------------------------- (de)serialising
def _lr_to_json(labels_or_regions) -> list:
    if np.isscalar(labels_or_regions) or isinstance(labels_or_regions, tuple):
        labels_or_regions = [labels_or_regions]
    return [int(x) if np.isscalar(x) else [int(i) for i in x] for x in labels_or_regions]


def _lr_from_json(value) -> list:
    return [x if np.isscalar(x) else tuple(x) for x in value]


def load_postprocessing(file: str | os.PathLike) -> tuple[list[Callable], list[dict]]:
    """Read ``postprocessing.json`` (or nnU-Net-style ``postprocessing.pkl``)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"postprocessing file {file} does not exist")
    if file.suffix == ".pkl":
        # nnU-Net's format names its functions: only the known ones are accepted, by name (never imported)
        fns, kwargs = load_pickle(file, functions=POSTPROCESSING_FUNCTIONS)
        return list(fns), [dict(k) for k in kwargs]
    d = load_json(file)
    fns, kwargs = [], []
    for name, kw in zip(d["postprocessing_fns"], d["postprocessing_kwargs"]):
        if name not in POSTPROCESSING_FUNCTIONS:
            raise ValueError(f"{file}: unknown postprocessing function {name!r}")
        fns.append(POSTPROCESSING_FUNCTIONS[name])
        kw = dict(kw)
        if "labels_or_regions" in kw:
            kw["labels_or_regions"] = _lr_from_json(kw["labels_or_regions"])
        kwargs.append(kw)
    return fns, kwargs


def save_postprocessing(folder: str | os.PathLike, fns: Sequence[Callable], kwargs: Sequence[dict],
                        extra: dict | None = None) -> None:
    folder = Path(folder)
    save_pickle((list(fns), [dict(k) for k in kwargs]), folder / POSTPROCESSING_PKL)
    js_kwargs = [{k: (_lr_to_json(v) if k == "labels_or_regions" else v) for k, v in kw.items()} for kw in kwargs]
    save_json({"postprocessing_fns": [f.__name__ for f in fns], "postprocessing_kwargs": js_kwargs, **(extra or {})},
              folder / POSTPROCESSING_JSON)


# ---------------------------------------------------------------------------- applying
def apply_postprocessing(segmentation: np.ndarray, fns: Sequence[Callable], kwargs: Sequence[dict]) -> np.ndarray:
    for fn, kw in zip(fns, kwargs):
        segmentation = fn(segmentation, **kw)
    return segmentation


def _process_file(in_file: str, out_file: str, rw, fns, kwargs) -> str:
    seg, props = rw.read_seg(in_file)
    seg = apply_postprocessing(seg[0], fns, kwargs)
    rw.write_seg(seg, out_file, props)
    return out_file


def apply_postprocessing_to_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                                   pp_file_or_steps: str | os.PathLike | tuple, dataset_json: dict | None = None,
                                   plans: dict | None = None, num_processes: int = 2,
                                   allow_tqdm: bool = True) -> list[str]:
    """Postprocess every segmentation of ``input_folder`` into ``output_folder`` (same names).

    ``pp_file_or_steps``: postprocessing.json/.pkl or (fns, kwargs). dataset.json/plans.json
    default to the input folder's (autossl_predict writes them) and are copied along; a
    postprocessing file is written along too (postprocessing.json/.pkl, with ``applied_from``
    naming it), so that the output folder says what was done to it."""
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if dataset_json is None:
        if not (input_folder / "dataset.json").is_file():
            raise FileNotFoundError(f"{input_folder / 'dataset.json'} is missing; pass dataset_json")
        dataset_json = load_json(input_folder / "dataset.json")
    if plans is None and (input_folder / "plans.json").is_file():
        plans = load_json(input_folder / "plans.json")
    from_file = isinstance(pp_file_or_steps, (str, os.PathLike))
    fns, kwargs = load_postprocessing(pp_file_or_steps) if from_file else pp_file_or_steps
    fe = dataset_json["file_ending"]
    files = sorted(f.name for f in input_folder.iterdir()
                   if f.is_file() and f.name.endswith(fe) and not f.name.startswith("."))
    output_folder.mkdir(parents=True, exist_ok=True)
    save_json(dataset_json, output_folder / "dataset.json", sort_keys=False)
    if plans is not None:
        save_json(plans, output_folder / "plans.json", sort_keys=False)
    rw = reader_writer_for(dataset_json, plans)
    n = max(1, min(int(num_processes), len(files) or 1))
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_process_file, str(input_folder / f), str(output_folder / f), rw, fns, kwargs)
                   for f in files]
        written = [f.result() for f in tqdm(futures, desc="postprocessing", disable=not allow_tqdm)]
    source = Path(pp_file_or_steps).resolve() if from_file else None
    if source is not None and source.parent != output_folder.resolve():  # never overwrite the decision itself
        extra = {}
        if source.suffix == ".json":  # keep what the decision recorded (Dice before/after, folders)
            extra = {k: v for k, v in load_json(source).items()
                     if k not in ("postprocessing_fns", "postprocessing_kwargs")}
        save_postprocessing(output_folder, fns, kwargs, {**extra, "applied_from": str(source)})
    return written


# ---------------------------------------------------------------------------- deciding
def _improves(new: dict, old: dict, judged_on: str | None) -> bool:
    """nnU-Net's criterion on mean Dice (``judged_on`` None: the foreground mean)."""
    if judged_on is None:
        better = new["foreground_mean"]["Dice"] > old["foreground_mean"]["Dice"]
    else:
        better = new["mean"][judged_on]["Dice"] > old["mean"][judged_on]["Dice"]
    if not better:
        return False
    return not any(new["mean"][k]["Dice"] < old["mean"][k]["Dice"] for k in old["mean"])


def determine_postprocessing(folder_predictions: str | os.PathLike, folder_ref: str | os.PathLike,
                             dataset_json: dict | str | os.PathLike, plans: dict | str | os.PathLike | None = None,
                             output_folder: str | os.PathLike | None = None, num_processes: int = 2,
                             keep_postprocessed_files: bool = False, allow_tqdm: bool = True) -> dict:
    """Decide the postprocessing on (cross-validation) predictions against references.

    Writes postprocessing.json/.pkl to ``output_folder`` (default: ``folder_predictions``) and the
    evaluation of the raw predictions to ``folder_predictions/summary.json``; returns the JSON content.
    Candidates are written to ``<output_folder>/postprocessed`` (removed at the end unless
    ``keep_postprocessed_files``)."""
    folder_predictions = Path(folder_predictions)
    output_folder = Path(output_folder) if output_folder is not None else folder_predictions
    dj = dataset_json if isinstance(dataset_json, dict) else load_json(dataset_json)
    pl = plans if isinstance(plans, dict) or plans is None else load_json(plans)
    lm = LabelManager.from_dataset_json(dj)
    labels_or_regions = labels_or_regions_from_dataset_json(dj)
    rw = reader_writer_for(dj, pl)
    fe = dj["file_ending"]

    def evaluate(pred_folder: Path, out_file: Path | None, distances: bool = False) -> dict:
        return compute_metrics_on_folder(folder_ref, pred_folder, out_file, rw, fe, labels_or_regions,
                                         lm.ignore_label, num_processes, chill=True, distances=distances,
                                         allow_tqdm=False)

    # the decision uses Dice only; the summary of the raw predictions gets every metric
    baseline = evaluate(folder_predictions, folder_predictions / "summary.json", distances=True)
    start_dice = baseline["foreground_mean"]["Dice"]
    work = output_folder / "postprocessed"
    candidate = output_folder / ".postprocessing_candidate"
    fns: list[Callable] = []
    kwargs: list[dict] = []
    source = folder_predictions
    steps = [(list(labels_or_regions), None)] + [(lr, label_or_region_to_key(lr)) for lr in labels_or_regions]
    try:
        for lr, judged_on in tqdm(steps, desc="postprocessing candidates", disable=not allow_tqdm):
            if candidate.exists():
                shutil.rmtree(candidate)
            step = (remove_all_but_largest_component_from_segmentation, {"labels_or_regions": lr})
            apply_postprocessing_to_folder(source, candidate, ([step[0]], [step[1]]), dj, pl, num_processes,
                                           allow_tqdm=False)
            result = evaluate(candidate, None)
            if _improves(result, baseline, judged_on):
                fns.append(step[0])
                kwargs.append(step[1])
                baseline = result
                if work.exists():
                    shutil.rmtree(work)
                candidate.rename(work)
                source = work
    finally:
        if candidate.exists():
            shutil.rmtree(candidate)
    if fns and keep_postprocessed_files:
        save_json(baseline, work / "summary.json")
    elif work.exists():
        shutil.rmtree(work)
    extra = {"input_folder": str(folder_predictions), "reference_folder": str(folder_ref),
             "dice_before": start_dice, "dice_after": baseline["foreground_mean"]["Dice"]}
    save_postprocessing(output_folder, fns, kwargs, extra)
    return load_json(output_folder / POSTPROCESSING_JSON)
