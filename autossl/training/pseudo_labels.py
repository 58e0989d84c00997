"""Pseudo-labels for offline methods (self-training): predict the preprocessed unlabelled cases
with the method's inference networks, and hand hard labels to the unlabelled loader.

Both functions take the fold's ``Trainer`` as an argument (never imported: the trainer imports
this module) and use its folders, loaders, DDP rank and ``make_predictor``."""
from __future__ import annotations

import shutil
import time
from typing import Any

import blosc2
import numpy as np
import torch

from autossl.components.dataloading.augmenter import BatchStream
from autossl.components.errors import TrainingError
from autossl.preprocessing import storage
from autossl.training import ddp
from autossl.utilities.file_io import atomic_path


def predict_unlabeled(trainer, cases: list[str] | None = None, mirroring: bool = True) -> dict[str, np.ndarray]:
    """Sliding-window probabilities (C, *spatial) of preprocessed unlabelled cases with the
    method's inference networks (softmax averaged). ``None`` predicts every unlabelled case.
    ``mirroring`` averages the mirrored passes as test-time prediction does (2^axes passes per
    tile); without it one pass per tile. Under DDP each rank predicts a share and all ranks
    receive every case."""
    all_cases = storage.list_cases(trainer.unlabeled_data_folder)
    cases = list(all_cases if cases is None else cases)
    missing = sorted(set(cases) - set(all_cases))
    if missing:
        raise TrainingError(f"predict_unlabeled: not preprocessed in {trainer.unlabeled_data_folder}: {missing[:5]}")
    mine = cases[trainer.dist.rank::trainer.dist.world_size]
    out: dict[str, np.ndarray] = {}
    if mine:
        t0 = time.time()
        predictor = trainer.make_predictor(use_mirroring=mirroring)
        probs = predictor.predict_preprocessed_cases(trainer.unlabeled_data_folder, mine)
        out = {c: p.astype(np.float16) if trainer.dist.is_ddp else p for c, p in probs.items()}
        count = trainer.pool_prediction  # this rank's work (the benchmark runs one process)
        count["predictions"] += 1
        count["network_inputs"] += predictor.network_inputs
        count["seconds"] += time.time() - t0
    if trainer.dist.is_ddp:
        merged: dict[str, np.ndarray] = {}
        for part in ddp.all_gather_objects(out):
            merged.update(part)
        out = {c: merged[c].astype(np.float32) for c in cases}
    return out

def hand_to_loader(trainer, labels: dict[str, Any]) -> None:
    """Hand {case: seg (1, *spatial) int, -1 = ignore} to the unlabelled loader; cases not
    given are all-ignore. Stored as blosc2 files under fold_X/pseudo_labels/ (removed at the end)."""
    loader = trainer._loaders.get("unlabeled")
    if loader is None:
        raise TrainingError(f"--ssl {trainer.ssl}: set_pseudo_labels needs the unlabelled loader "
                            f"(uses_unlabeled=True and --unlabeled-ratio > 0)")
    trainer._pseudo_label_sets += 1
    folder = trainer.output_folder / "pseudo_labels" / f"rank{trainer.dist.rank}" / f"set_{trainer._pseudo_label_sets:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for case, seg in labels.items():
        arr = seg.detach().cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
        if arr.ndim == len(loader.patch_size):
            arr = arr[None]
        data, _, _ = storage.load_case(trainer.unlabeled_data_folder, case, load_seg=False)
        if tuple(arr.shape[1:]) != tuple(data.shape[1:]):
            raise TrainingError(f"pseudo-label for {case}: shape {tuple(arr.shape)} does not match the "
                                f"preprocessed case {tuple(data.shape)}")
        path = folder / f"{case}.b2nd"
        with atomic_path(path, suffix=".b2nd") as tmp:
            tmp.unlink(missing_ok=True)
            blosc2.asarray(np.ascontiguousarray(arr.astype(np.int16)), urlpath=str(tmp), mode="w")
        files[case] = str(path)
    if "unlabeled" in trainer._streams:
        trainer._streams.pop("unlabeled").close()
    loader.set_pseudo_label_files(files)
    trainer._streams["unlabeled"] = BatchStream(loader, trainer.num_workers,
                                             trainer._stream_seeds("unlabeled", trainer.num_workers),
                                             trainer.device.type == "cuda")
    for old in sorted(folder.parent.glob("set_*")):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
