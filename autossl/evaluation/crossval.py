"""Cross-validation results of a model folder, as nnU-Net v2 accumulates them.

Every ``fold_X/validation/`` holds that fold's held-out cases predicted by the fold's model. The
union over the folds covers every labelled case once; copied into
``<model folder>/crossval_results_folds_0_1_2_3_4/`` and evaluated against the preprocessing's
``gt_segmentations/`` it gives the cross-validation ``summary.json`` (nnU-Net's
``accumulate_cv_results``), whose ``foreground_mean`` Dice is what model selection compares.
``per_fold_dice`` splits such a summary back into the folds, for the spread over folds.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from autossl.utilities.file_io import atomic_path, load_json, save_json


def crossval_folder_name(folds: Sequence[int | str]) -> str:
    """``crossval_results_folds_0_1_2_3_4`` (nnU-Net's name)."""
    return f"crossval_results_folds_{'_'.join(str(f) for f in folds)}"


def folds_with_validation(model_folder: str | os.PathLike) -> list[int]:
    """The numbered folds of ``model_folder`` that have a ``validation/`` folder."""
    model_folder = Path(model_folder)
    return sorted(int(p.name[5:]) for p in model_folder.glob("fold_*")
                  if p.name[5:].isdigit() and (p / "validation").is_dir())


def _validation_files(model_folder: Path, fold: int | str, file_ending: str) -> list[Path]:
    val = model_folder / f"fold_{fold}" / "validation"
    files = sorted(p for p in val.glob(f"*{file_ending}") if not p.name.startswith(".")) if val.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{val}: no validation predictions ({file_ending}); train fold {fold} or run its "
                                f"final validation (autossl_train DATASET CONFIGURATION {fold} --val)")
    return files


def case_to_fold(model_folder: str | os.PathLike, folds: Sequence[int], file_ending: str) -> dict[str, int]:
    """{prediction file name: fold} over the folds' validation predictions; a case validated in
    two folds is an error (the folds do not come from one split)."""
    model_folder = Path(model_folder)
    out: dict[str, int] = {}
    for f in folds:
        for p in _validation_files(model_folder, f, file_ending):
            if p.name in out:
                raise ValueError(f"{model_folder}: case {p.name} is a validation case of fold {out[p.name]} and of "
                                 f"fold {f}; the folds do not come from one cross-validation split")
            out[p.name] = int(f)
    return out


def remove_stale_segmentations(folder: Path, file_ending: str, keep: set[str]) -> list[str]:
    """Delete the segmentations of ``folder`` (top level) that are not in ``keep``: a gathered
    folder left from other folds or another split must not enter the new evaluation."""
    stale = [p for p in folder.glob(f"*{file_ending}") if p.is_file() and p.name not in keep]
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def gather_crossval_predictions(model_folder: str | os.PathLike, folds: Sequence[int] | None, file_ending: str,
                                output_folder: str | os.PathLike | None = None) -> Path:
    """Copy every fold's validation segmentations into ``crossval_results_folds_<folds>``
    (default: inside ``model_folder``), with the model's dataset.json and plans.json."""
    model_folder = Path(model_folder)
    if folds is None:
        folds = folds_with_validation(model_folder)
    if not folds:
        raise FileNotFoundError(f"{model_folder}: no fold_X/validation/ folder; train and validate folds first")
    out = Path(output_folder) if output_folder is not None else model_folder / crossval_folder_name(folds)
    sources = [src for f in folds for src in _validation_files(model_folder, f, file_ending)]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_segmentations(out, file_ending, {src.name for src in sources})
    for src in sources:
        with atomic_path(out / src.name) as tmp:
            shutil.copyfile(src, tmp)
    for name in ("dataset.json", "plans.json"):
        if (model_folder / name).is_file():
            save_json(load_json(model_folder / name), out / name, sort_keys=False)
    return out


def accumulate_crossval_results(model_folder: str | os.PathLike, folds: Sequence[int], gt_folder: str | os.PathLike,
                                num_processes: int = 1) -> tuple[Path, dict]:
    """Gather the folds' validation predictions and evaluate them together into
    ``crossval_results_folds_<folds>/summary.json``; returns (that folder, the summary)."""
    from autossl.evaluation.evaluate import compute_metrics_on_folder_simple

    model_folder = Path(model_folder)
    dj_file = model_folder / "dataset.json"
    if not dj_file.is_file():
        raise FileNotFoundError(f"{dj_file} is missing; is {model_folder} a training output folder?")
    dataset_json = load_json(dj_file)
    plans = load_json(model_folder / "plans.json") if (model_folder / "plans.json").is_file() else None
    gt_folder = Path(gt_folder)
    if not gt_folder.is_dir():
        raise FileNotFoundError(f"{gt_folder} does not exist: the cross-validation is scored against the "
                                f"preprocessing's copy of the labels; rerun autossl_plan_and_preprocess")
    case_to_fold(model_folder, folds, dataset_json["file_ending"])  # one split: no case twice
    out = gather_crossval_predictions(model_folder, folds, dataset_json["file_ending"])
    summary = compute_metrics_on_folder_simple(gt_folder, out, dataset_json, plans, out / "summary.json",
                                               num_processes=num_processes, chill=True, allow_tqdm=False)
    return out, summary


def _foreground_dice(cases: list[dict]) -> float:
    from autossl.evaluation.evaluate import summarize

    return float(summarize(cases)["foreground_mean"].get("Dice", float("nan")))


def per_fold_dice(summary: dict, fold_of_case: dict[str, int]) -> dict[int, float]:
    """Foreground-mean Dice of each fold's cases in a (cross-validation) ``summary``: per label the
    NaN-ignoring mean over the fold's cases, then the mean over labels (as ``summary.json``)."""
    groups: dict[int, list[dict]] = {}
    for entry in summary.get("metric_per_case", []):
        name = Path(entry["prediction_file"]).name
        if name not in fold_of_case:
            raise ValueError(f"{entry['prediction_file']}: not a validation case of any fold")
        groups.setdefault(fold_of_case[name], []).append(entry)
    return {f: _foreground_dice(groups[f]) for f in sorted(groups)}


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (population, as numpy), min and max of the finite values."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
