"""Evaluate a folder of predictions against a folder of reference segmentations.

``summary.json`` has nnU-Net v2's layout:

    {"metric_per_case": [{"reference_file", "prediction_file", "metrics": {label: {metric: v}}}],
     "mean": {label: {metric: v}}, "foreground_mean": {metric: v},
     "valid_cases": {label: {metric: n}}}          # our addition

Labels are keys like nnU-Net's (``"1"``, regions ``"(1, 2)"``). Per label, ``mean`` is the
NaN-ignoring mean over cases (a case with empty reference and prediction has Dice NaN, a case
where either is empty has HD95/ASD NaN); ``valid_cases`` says how many cases entered each mean.
``foreground_mean`` is the plain mean over the labels' means (as nnU-Net). Metric definitions:
``autossl.evaluation.metrics``.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from autossl.evaluation.metrics import METRIC_KEYS, compute_label_metrics, region_or_label_to_mask
from autossl.imageio.base import BaseReaderWriter
from autossl.imageio.registry import reader_writer_class
from autossl.utilities.file_io import load_json, save_json
from autossl.utilities.label_handling import LabelManager


def label_or_region_to_key(label_or_region: int | Sequence[int]) -> str:
    if np.isscalar(label_or_region):
        return str(int(label_or_region))
    return str(tuple(int(i) for i in label_or_region))


def key_to_label_or_region(key: str) -> int | tuple[int, ...]:
    try:
        return int(key)
    except ValueError:
        return tuple(int(i) for i in key.strip("()").split(",") if i.strip())


def labels_or_regions_from_dataset_json(dataset_json: dict) -> list:
    """Foreground labels, or regions (a one-label region as the plain label, as nnU-Net keys it)."""
    lm = LabelManager.from_dataset_json(dataset_json)
    if not lm.has_regions:
        return list(lm.foreground_labels)
    return [int(r[0]) if len(r) == 1 else tuple(int(i) for i in r) for r in lm.foreground_regions]


def _as_reader(reader_writer) -> BaseReaderWriter:
    return reader_writer() if isinstance(reader_writer, type) else reader_writer


def compute_metrics(reference_file: str, prediction_file: str, reader_writer, labels_or_regions: Sequence,
                    ignore_label: int | None = None, distances: bool = True) -> dict:
    """Metrics of one case; the spacing comes from the reference image."""
    rw = _as_reader(reader_writer)
    seg_ref, props = rw.read_seg(reference_file)
    seg_pred, _ = rw.read_seg(prediction_file)
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(f"{prediction_file}: shape {seg_pred.shape[1:]} differs from the reference "
                         f"{reference_file} {seg_ref.shape[1:]}")
    seg_ref, seg_pred = seg_ref[0], seg_pred[0]
    ignore_mask = (seg_ref == ignore_label) if ignore_label is not None else None
    metrics = {}
    for r in labels_or_regions:
        metrics[label_or_region_to_key(r)] = compute_label_metrics(
            region_or_label_to_mask(seg_ref, r), region_or_label_to_mask(seg_pred, r),
            props.get("spacing"), ignore_mask, distances)
    return {"reference_file": str(reference_file), "prediction_file": str(prediction_file), "metrics": metrics}


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def summarize(results: list[dict]) -> dict:
    """Means per label, the foreground mean and the number of cases behind each mean."""
    means, valid = {}, {}
    if results:
        for key in results[0]["metrics"]:
            means[key], valid[key] = {}, {}
            for m in results[0]["metrics"][key]:
                vals = [r["metrics"][key][m] for r in results]
                means[key][m] = _nanmean(vals)
                valid[key][m] = int(np.sum(~np.isnan(np.asarray(vals, dtype=float))))
    metric_names = [m for m in METRIC_KEYS if means and m in next(iter(means.values()))]
    foreground_mean = {}
    for m in metric_names:
        vals = [means[k][m] for k in means if k != "0"]
        foreground_mean[m] = float(np.mean(vals)) if vals else float("nan")
    return {"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean, "valid_cases": valid}


def _files_with_ending(folder: Path, file_ending: str) -> list[str]:
    return sorted(f.name for f in folder.iterdir()
                  if f.is_file() and f.name.endswith(file_ending) and not f.name.startswith("."))


def compute_metrics_on_folder(ref_folder: str | os.PathLike, pred_folder: str | os.PathLike,
                              output_file: str | os.PathLike | None, reader_writer, file_ending: str,
                              labels_or_regions: Sequence, ignore_label: int | None = None,
                              num_processes: int = 2, chill: bool = False, distances: bool = True,
                              allow_tqdm: bool = True) -> dict:
    """Evaluate every prediction in ``pred_folder`` against the same-named file in ``ref_folder``.

    Without ``chill`` every reference case must have a prediction. Writes ``output_file``
    (summary.json layout, see the module docstring) when given and returns the same dict.
    """
    ref_folder, pred_folder = Path(ref_folder), Path(pred_folder)
    for folder, what in ((ref_folder, "reference"), (pred_folder, "prediction")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    files_pred = _files_with_ending(pred_folder, file_ending)
    files_ref = _files_with_ending(ref_folder, file_ending)
    if not files_pred:
        raise FileNotFoundError(f"{pred_folder}: no predictions ending in {file_ending!r}")
    missing_ref = [f for f in files_pred if f not in files_ref]
    if missing_ref:
        raise FileNotFoundError(f"{ref_folder}: no reference for the predictions {missing_ref[:5]}"
                                f"{' ...' if len(missing_ref) > 5 else ''}")
    if not chill:
        missing = [f for f in files_ref if f not in files_pred]
        if missing:
            raise FileNotFoundError(f"{pred_folder}: {len(missing)} reference cases have no prediction, e.g. "
                                    f"{missing[:5]} (use chill=True / --chill to evaluate only the predicted ones)")
    rw = _as_reader(reader_writer)
    labels_or_regions = [r if np.isscalar(r) else tuple(r) for r in labels_or_regions]
    jobs = [(str(ref_folder / f), str(pred_folder / f), type(rw), labels_or_regions, ignore_label, distances)
            for f in files_pred]
    num_processes = max(1, min(int(num_processes), len(jobs)))
    if num_processes == 1:
        results = [compute_metrics(j[0], j[1], rw, *j[3:])
                   for j in tqdm(jobs, desc="evaluating", disable=not allow_tqdm)]
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = list(tqdm(pool.imap(_compute_metrics_star, jobs), total=len(jobs), desc="evaluating",
                                disable=not allow_tqdm))
    summary = summarize(results)
    if output_file is not None:
        save_json(summary, output_file, sort_keys=False)
    return summary


def _compute_metrics_star(args) -> dict:
    return compute_metrics(*args)


def compute_metrics_on_folder_simple(ref_folder: str | os.PathLike, pred_folder: str | os.PathLike,
                                     dataset_json: dict | str | os.PathLike, plans: dict | str | os.PathLike | None = None,
                                     output_file: str | os.PathLike | None = None, num_processes: int = 2,
                                     chill: bool = False, allow_tqdm: bool = True) -> dict:
    """As :func:`compute_metrics_on_folder`, labels, ignore label, file ending and reader taken
    from dataset.json (and the plans' ``image_reader_writer`` when given). Default output:
    ``pred_folder/summary.json``."""
    dj = dataset_json if isinstance(dataset_json, dict) else load_json(dataset_json)
    pl = plans if isinstance(plans, dict) or plans is None else load_json(plans)
    file_ending = dj["file_ending"]
    rw_name = (pl or {}).get("image_reader_writer") or dj.get("overwrite_image_reader_writer")
    rw = reader_writer_class(file_ending, rw_name)()
    lm = LabelManager.from_dataset_json(dj)
    output_file = Path(pred_folder) / "summary.json" if output_file is None else output_file
    return compute_metrics_on_folder(ref_folder, pred_folder, output_file, rw, file_ending,
                                     labels_or_regions_from_dataset_json(dj), lm.ignore_label,
                                     num_processes, chill, allow_tqdm=allow_tqdm)
