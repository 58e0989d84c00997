"""Preprocessed cases of one folder, opened lazily (blosc2 memory maps, nothing loaded up front)."""
from __future__ import annotations

import os
from pathlib import Path

from autossl.preprocessing import storage


class PreprocessedCases:
    """The cases of a ``<data_identifier>`` (labelled) or ``<data_identifier>_unlabeled`` folder.

    ``labeled=False`` never opens a ``_seg`` file, even where one exists: unlabelled training
    must not see labels.
    """

    def __init__(self, folder: str | os.PathLike, identifiers: list[str] | None = None, labeled: bool = True):
        self.folder = Path(folder)
        self.labeled = labeled
        available = storage.list_cases(self.folder)
        if identifiers is None:
            identifiers = available
        else:
            missing = sorted(set(identifiers) - set(available))
            if missing:
                raise FileNotFoundError(
                    f"{self.folder}: {len(missing)} case(s) named in the split are not preprocessed "
                    f"(e.g. {missing[:3]}); rerun the preprocessing or fix splits_final.json")
        self.identifiers = list(identifiers)
        if labeled:
            incomplete = [c for c in self.identifiers if not storage.case_is_complete(self.folder, c, labeled=True)]
            if incomplete:
                raise FileNotFoundError(f"{self.folder}: case(s) without data or segmentation: {incomplete[:5]}")

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, case: str):
        """(data (c, *spatial), seg (1, *spatial) or None, properties); arrays are blosc2 NDArrays."""
        return storage.load_case(self.folder, case, mmap=True, load_seg=self.labeled)
