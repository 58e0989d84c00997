"""Ensemble prediction folders written with ``--save_probabilities`` (nnU-Net v2's ``ensemble``).

For every case present (as ``<case>.npz`` + ``<case>.pkl``) in all input folders, the
``probabilities`` are averaged, turned into a segmentation (argmax, or regions in
``regions_class_order``) and written with the geometry stored in the first folder's ``.pkl``.
The input folders must come from the same dataset (identical ``labels`` in their dataset.json).
The output folder gets dataset.json and plans.json, like nnU-Net.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from autossl.inference.export import reader_writer_for, save_npz_atomic
from autossl.utilities.file_io import load_json, load_pickle, save_json, save_pickle
from autossl.utilities.label_handling import LabelManager


class EnsembleError(ValueError):
    """Inputs that cannot be ensembled; the message names the folder or file."""


def _load_probabilities(path: Path) -> np.ndarray:
    try:
        with np.load(path) as f:
            if "probabilities" not in f:
                raise EnsembleError(f"{path}: has no 'probabilities' array (keys {list(f.keys())})")
            return f["probabilities"]
    except (OSError, ValueError) as e:
        if isinstance(e, EnsembleError):
            raise
        raise EnsembleError(f"{path}: cannot be read ({e})") from None


def average_probabilities(files: Sequence[str | os.PathLike]) -> np.ndarray:
    """Mean of the ``probabilities`` of several ``.npz`` files (float32); shapes must agree."""
    acc = None
    first = None
    for f in files:
        p = _load_probabilities(Path(f)).astype(np.float32, copy=False)
        if acc is None:
            acc, first = p.copy(), f
        else:
            if p.shape != acc.shape:
                raise EnsembleError(f"{f}: probabilities of shape {p.shape} do not match {first} {acc.shape}")
            acc += p
    acc /= len(files)
    return acc


def merge_files(files: Sequence[str | os.PathLike], properties_file: str | os.PathLike,
                output_file_truncated: str | os.PathLike, dataset_json: dict, plans: dict | None,
                save_merged_probabilities: bool = False) -> str:
    probs = average_probabilities(files)
    props = load_pickle(properties_file)
    lm = LabelManager.from_dataset_json(dataset_json)
    seg = np.asarray(lm.probabilities_to_segmentation(probs))
    max_label = max([0, *lm.foreground_labels])
    seg = seg.astype(np.uint8 if max_label < 255 else np.uint16)
    out = str(output_file_truncated)
    if save_merged_probabilities:
        save_npz_atomic(out + ".npz", probabilities=probs)
        save_pickle(props, out + ".pkl")
    target = out + dataset_json["file_ending"]
    reader_writer_for(dataset_json, plans).write_seg(seg, target, props)
    return target


def _check_compatible(folders: list[Path]) -> tuple[dict, dict | None]:
    dataset_json = plans = None
    for f in folders:
        dj_file = f / "dataset.json"
        if dj_file.is_file():
            dj = load_json(dj_file)
            if dataset_json is None:
                dataset_json, first = dj, f
            elif dj.get("labels") != dataset_json.get("labels") or \
                    dj.get("regions_class_order") != dataset_json.get("regions_class_order"):
                raise EnsembleError(f"{dj_file}: labels {dj.get('labels')} differ from {first / 'dataset.json'} "
                                    f"{dataset_json.get('labels')}; these predictions cannot be ensembled")
            elif dj.get("file_ending") != dataset_json.get("file_ending"):
                raise EnsembleError(f"{dj_file}: file_ending {dj.get('file_ending')!r} differs from "
                                    f"{first / 'dataset.json'} {dataset_json.get('file_ending')!r}")
        if plans is None and (f / "plans.json").is_file():
            plans = load_json(f / "plans.json")
    return dataset_json, plans


def ensemble_folders(list_of_input_folders: Sequence[str | os.PathLike], output_folder: str | os.PathLike,
                     save_merged_probabilities: bool = False, num_processes: int = 2,
                     dataset_json_file_or_dict: dict | str | None = None,
                     plans_json_file_or_dict: dict | str | None = None, allow_tqdm: bool = True) -> list[str]:
    """Average the probabilities of the cases common to all folders; returns the written files."""
    folders = [Path(f) for f in list_of_input_folders]
    if len(folders) < 2:
        raise EnsembleError("ensembling needs at least two input folders")
    for f in folders:
        if not f.is_dir():
            raise EnsembleError(f"input folder {f} does not exist")
    dataset_json, plans = _check_compatible(folders)
    if dataset_json_file_or_dict is not None:
        dataset_json = (dataset_json_file_or_dict if isinstance(dataset_json_file_or_dict, dict)
                        else load_json(dataset_json_file_or_dict))
    if plans_json_file_or_dict is not None:
        plans = plans_json_file_or_dict if isinstance(plans_json_file_or_dict, dict) else load_json(plans_json_file_or_dict)
    if dataset_json is None:
        raise EnsembleError(f"none of {[str(f) for f in folders]} has a dataset.json (autossl_predict writes one); "
                            f"pass it explicitly")
    cases_per_folder = [{p.name[:-4] for p in f.glob("*.npz") if not p.name.startswith(".")} for f in folders]
    for f, cases in zip(folders, cases_per_folder):
        if not cases:
            raise EnsembleError(f"{f}: no .npz probabilities; predict with --save_probabilities")
    common = sorted(set.intersection(*cases_per_folder))
    if not common:
        raise EnsembleError(f"the input folders have no case in common: {[str(f) for f in folders]}")
    if any(len(c) != len(common) for c in cases_per_folder):
        print(f"not every folder has the same cases; ensembling the {len(common)} common ones")
    for c in common:
        for f in folders:
            if not (f / f"{c}.pkl").is_file():
                raise EnsembleError(f"{f / (c + '.pkl')} is missing (written next to {c}.npz by --save_probabilities)")
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    save_json(dataset_json, output_folder / "dataset.json", sort_keys=False)
    if plans is not None:
        save_json(plans, output_folder / "plans.json", sort_keys=False)
    jobs = [([folders_i / f"{c}.npz" for folders_i in folders], folders[0] / f"{c}.pkl", output_folder / c)
            for c in common]
    n = max(1, min(int(num_processes), len(jobs)))
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(merge_files, files, pkl, out, dataset_json, plans, save_merged_probabilities)
                   for files, pkl, out in jobs]
        written = [f.result() for f in tqdm(futures, desc="ensembling", disable=not allow_tqdm)]
    return written

