"""Cross-validation splits over the LABELLED cases, as nnU-Net v2 makes them.

``splits_final.json`` in the preprocessed dataset folder is ``[{"train": [...], "val": [...]}, ...]``;
when missing it is created with ``KFold(5, shuffle=True, random_state=12345)`` over the sorted
case names (identical to nnU-Net, so both tools use the same folds). A fold beyond the file's
length gets a seeded random 80:20 split; fold ``all`` trains (and validates) on every case.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from autossl.utilities.file_io import load_json, save_json

SPLITS_FILE = "splits_final.json"


def generate_crossval_split(cases: list[str], seed: int = 12345, n_splits: int = 5) -> list[dict[str, list[str]]]:
    from sklearn.model_selection import KFold

    cases = sorted(cases)
    if len(cases) < 2:
        raise ValueError(f"cross-validation needs at least 2 labelled cases, found {len(cases)}; train fold 'all'")
    n_splits = min(n_splits, len(cases))
    kfold = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = []
    for train_idx, val_idx in kfold.split(cases):
        splits.append({"train": [cases[i] for i in train_idx], "val": [cases[i] for i in val_idx]})
    return splits


def load_or_create_splits(preprocessed_dataset_folder: str | os.PathLike, cases: list[str]) -> list[dict]:
    path = Path(preprocessed_dataset_folder) / SPLITS_FILE
    if path.is_file():
        splits = load_json(path)
        if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "val" in s for s in splits):
            raise ValueError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} entries")
        return splits
    splits = generate_crossval_split(cases)
    save_json(splits, path)
    return splits


def split_for_fold(preprocessed_dataset_folder: str | os.PathLike, cases: list[str],
                   fold: int | str) -> tuple[list[str], list[str]]:
    """(training cases, validation cases) for ``fold`` (an int or ``"all"``)."""
    if str(fold) == "all":
        return sorted(cases), sorted(cases)
    fold = int(fold)
    splits = load_or_create_splits(preprocessed_dataset_folder, cases)
    if fold < len(splits):
        return list(splits[fold]["train"]), list(splits[fold]["val"])
    rnd = np.random.RandomState(seed=12345 + fold)
    keys = np.sort(list(cases))
    idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
    tr = [str(keys[i]) for i in idx_tr]
    val = [str(keys[i]) for i in range(len(keys)) if i not in idx_tr]
    return tr, val
