"""Resolve ``-d 4`` / ``Dataset004_Hippocampus`` to a dataset folder name."""
from __future__ import annotations

from pathlib import Path

from autossl import paths


def find_dataset_name(dataset: str | int) -> str:
    s = str(dataset)
    if s.startswith("Dataset"):
        return s
    try:
        ident = int(s)
    except ValueError:
        raise ValueError(f"dataset must be an integer ID or a DatasetXXX_Name, got {dataset!r}") from None
    prefix = f"Dataset{ident:03d}_"
    candidates = set()
    for getter in (paths.raw_dir, paths.preprocessed_dir, paths.results_dir):
        try:
            base = getter()
        except paths.PathNotConfiguredError:
            continue
        if base.is_dir():
            candidates.update(p.name for p in base.iterdir() if p.name.startswith(prefix) and p.is_dir())
    if not candidates:
        raise FileNotFoundError(
            f"no dataset with ID {ident} ({prefix}*) in the raw, preprocessed or results folders"
        )
    if len(candidates) > 1:
        raise RuntimeError(f"more than one dataset with ID {ident}: {sorted(candidates)}")
    return candidates.pop()


def raw_dataset_folder(dataset: str | int) -> Path:
    return paths.raw_dir() / find_dataset_name(dataset)


def preprocessed_dataset_folder(dataset: str | int) -> Path:
    return paths.preprocessed_dir() / find_dataset_name(dataset)
