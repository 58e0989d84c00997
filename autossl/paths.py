"""Where raw, preprocessed and results folders live.

Read lazily from ``autossl_raw`` / ``autossl_preprocessed`` / ``autossl_results``; when one is
unset, the nnU-Net v2 variable (``nnUNet_raw`` ...) is used so an nnU-Net user's datasets work
unchanged. Neither set gives a clear error naming both variables.
"""
from __future__ import annotations

import os
from pathlib import Path

_VARS = {
    "raw": ("autossl_raw", "nnUNet_raw"),
    "preprocessed": ("autossl_preprocessed", "nnUNet_preprocessed"),
    "results": ("autossl_results", "nnUNet_results"),
}


class PathNotConfiguredError(RuntimeError):
    pass


def _get(kind: str) -> Path:
    ours, theirs = _VARS[kind]
    value = os.environ.get(ours) or os.environ.get(theirs)
    if not value:
        raise PathNotConfiguredError(
            f"The {kind} folder is not configured: set the environment variable {ours} "
            f"(or nnU-Net's {theirs}), e.g. export {ours}=/data/autossl_{kind}"
        )
    return Path(value)


def raw_dir() -> Path:
    return _get("raw")


def preprocessed_dir() -> Path:
    return _get("preprocessed")


def results_dir() -> Path:
    return _get("results")
