"""Dataset fingerprint: what experiment planning needs to know about a raw dataset.

As nnU-Net v2 (``DatasetFingerprintExtractor``), with unlabelled cases added:

- every case (``imagesTr`` with labels AND ``imagesTrUnlabeled``) is read and cropped to its
  nonzero region; its spacing, shape after cropping and relative size after cropping are recorded
  (labelled cases first, then unlabelled ones, each in sorted case order);
- foreground intensities come from labelled cases only (``seg > 0`` after cropping). Per case and
  channel, ``int(10e7 // n_labeled)`` voxels are drawn with replacement from a
  ``RandomState(1234)`` exactly as nnU-Net's ``rs.choice`` draws them; the per-channel statistics
  (mean, median, std, min, max, 0.5 / 99.5 percentiles) are those of all drawn samples together.

Workers return the draws as (distinct value, count) pairs instead of the 1e8 raw samples, which
keeps memory small; the statistics are the same as on the expanded sample array.
The result goes to ``$autossl_preprocessed/DatasetXXX_Name/dataset_fingerprint.json`` with
nnU-Net's keys plus ``n_labeled`` and ``n_unlabeled``.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autossl.preprocessing.cropping import crop_to_nonzero
from autossl.utilities.file_io import load_json, save_json

NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS = 10e7
SAMPLING_SEED = 1234
_DRAW_CHUNK = 1_000_000
FINGERPRINT_FILE = "dataset_fingerprint.json"


def sample_foreground_counts(values: np.ndarray, num_samples: int, rs: np.random.RandomState):
    """Draw ``num_samples`` of ``values`` with replacement, as ``rs.choice(values, num_samples)``
    would, and return the draws as ``(distinct sorted values, counts)``. Consumes ``rs`` identically."""
    n = values.size
    if n == 0 or num_samples <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    hits = np.zeros(n, np.int32)  # counts never exceed num_samples (<= 1e8)
    remaining = int(num_samples)
    while remaining > 0:
        k = min(remaining, _DRAW_CHUNK)
        hits += np.bincount(rs.randint(0, n, size=k), minlength=n).astype(np.int32)  # O(k), no sort
        remaining -= k
    drawn = hits > 0
    uniq, inverse = np.unique(values[drawn], return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=hits[drawn], minlength=uniq.size).astype(np.int64)
    return uniq, counts


def analyze_case(image_files: list[str], seg_file: str | None, reader_writer_class, num_samples: int) -> dict:
    """Read and crop one case; return its spacing, shapes and (labelled cases) foreground draws."""
    rw = reader_writer_class()
    images, props = rw.read_images(image_files)
    if np.isnan(images).any():
        raise ValueError(f"{image_files[0]}: the image contains NaN values")
    seg = None
    if seg_file is not None:
        seg, _ = rw.read_seg(seg_file)
        if tuple(seg.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(f"{seg_file}: label shape {tuple(seg.shape[1:])} differs from the image shape "
                             f"{tuple(images.shape[1:])} ({image_files[0]})")
        if np.issubdtype(seg.dtype, np.floating) and np.isnan(seg).any():
            raise ValueError(f"{seg_file}: the segmentation contains NaN values")
    shape_before = images.shape[1:]
    data, seg_c, _ = crop_to_nonzero(images, seg)
    out = {
        "spacing": [float(s) for s in props["spacing"]],
        "shape_after_crop": [int(s) for s in data.shape[1:]],
        "relative_size_after_cropping": float(np.prod(data.shape[1:]) / np.prod(shape_before)),
        "foreground": None,
    }
    if seg is not None:
        rs = np.random.RandomState(SAMPLING_SEED)
        mask = seg_c[0] > 0
        out["foreground"] = [sample_foreground_counts(data[c][mask], num_samples, rs) for c in range(len(data))]
    return out


def weighted_percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """``np.percentile`` (linear method) of the array in which ``values[i]`` appears ``counts[i]`` times."""
    n = int(counts.sum())
    pos = (n - 1) * q / 100.0
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    cum = np.cumsum(counts)
    v_lo = float(values[np.searchsorted(cum, lo, side="right")])
    v_hi = float(values[np.searchsorted(cum, hi, side="right")])
    return v_lo + (pos - lo) * (v_hi - v_lo)


def intensity_statistics(values: np.ndarray, counts: np.ndarray) -> dict:
    """nnU-Net's per-channel statistics of the expanded sample (values repeated by counts)."""
    if counts.sum() == 0:
        return {k: None for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}
    v = values.astype(np.float64)
    w = counts.astype(np.float64)
    mean = float(np.sum(v * w) / w.sum())
    std = float(np.sqrt(np.sum(w * (v - mean) ** 2) / w.sum()))
    return {
        "mean": mean,
        "median": weighted_percentile(values, counts, 50.0),
        "std": std,
        "min": float(values[counts > 0].min()),
        "max": float(values[counts > 0].max()),
        "percentile_99_5": weighted_percentile(values, counts, 99.5),
        "percentile_00_5": weighted_percentile(values, counts, 0.5),
    }


def _merge(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [p for p in pairs if p[0].size]
    if not pairs:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    vals = np.concatenate([p[0] for p in pairs])
    cnts = np.concatenate([p[1] for p in pairs])
    uniq, inverse = np.unique(vals, return_inverse=True)
    return uniq, np.bincount(inverse.ravel(), weights=cnts, minlength=uniq.size).astype(np.int64)


def _mp_context():
    """forkserver where available (workers fork from a server that imported this module once, so
    they start fast and share no threads with the parent), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        if __name__ != "__main__":
            ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_cases(jobs: list[tuple], num_processes: int) -> list[dict]:
    results: list[dict | None] = [None] * len(jobs)
    desc = "Extracting dataset fingerprint"
    if num_processes <= 1 or len(jobs) <= 1:
        for i, job in enumerate(tqdm(jobs, desc=desc)):
            results[i] = analyze_case(*job)
        return results
    ctx = _mp_context()
    try:
        with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs)), mp_context=ctx) as ex:
            futures = {ex.submit(analyze_case, *job): i for i, job in enumerate(jobs)}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc):
                results[futures[fut]] = fut.result()
    except BrokenProcessPool:
        raise RuntimeError("a fingerprint worker process died (look for a traceback above); without one, the "
                           "operating system most likely killed it for lack of memory: use fewer processes "
                           "(-np)") from None
    return results


def _raw_dataset(dataset: str | int):
    from autossl.raw.dataset import RawDataset
    from autossl.utilities.dataset_name import raw_dataset_folder

    return RawDataset(raw_dataset_folder(dataset))


def fingerprint_path(dataset: str | int) -> Path:
    from autossl import paths
    from autossl.utilities.dataset_name import find_dataset_name

    return paths.preprocessed_dir() / find_dataset_name(dataset) / FINGERPRINT_FILE


def extract_fingerprint(dataset: str | int, num_processes: int = 2, overwrite: bool = False) -> dict:
    """Compute (or load, unless ``overwrite``) the fingerprint of a raw dataset and write it atomically.

    An existing file whose ``n_labeled`` / ``n_unlabeled`` no longer match the raw dataset is recomputed."""
    raw = _raw_dataset(dataset)
    out_file = fingerprint_path(raw.name)
    n_lab, n_unl = len(raw.labeled), len(raw.unlabeled)
    if out_file.is_file() and not overwrite:
        existing = load_json(out_file)
        if existing.get("n_labeled", n_lab) == n_lab and existing.get("n_unlabeled", n_unl) == n_unl \
                and len(existing.get("spacings", [])) == n_lab + n_unl:
            return existing
        print(f"{out_file}: computed for a different set of cases; recomputing")
    if n_lab == 0:
        raise ValueError(f"{raw.folder}: no labelled cases (imagesTr + labelsTr); the fingerprint's intensity "
                         f"statistics and the training need at least one")
    rw_class = type(raw.reader_writer())
    num_samples = int(NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS // n_lab)
    jobs = [(d["images"], d["label"], rw_class, num_samples) for _, d in sorted(raw.labeled.items())]
    jobs += [(d["images"], None, rw_class, 0) for _, d in sorted(raw.unlabeled.items())]
    results = _run_cases(jobs, num_processes)

    n_channels = raw.num_channels
    intensity = {}
    for c in range(n_channels):
        values, counts = _merge([r["foreground"][c] for r in results[:n_lab]])
        intensity[str(c)] = intensity_statistics(values, counts)
        if intensity[str(c)]["mean"] is None:
            print(f"WARNING: {raw.folder}: no foreground voxels in any label file; channel {c} has no "
                  f"intensity statistics (CT normalisation will not work)")
    fingerprint = {
        "spacings": [r["spacing"] for r in results],
        "shapes_after_crop": [r["shape_after_crop"] for r in results],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(np.median([r["relative_size_after_cropping"] for r in results])),
        "n_labeled": n_lab,
        "n_unlabeled": n_unl,
    }
    save_json(fingerprint, out_file)
    return fingerprint
