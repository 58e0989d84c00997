"""``--verify_dataset_integrity``: find everything wrong with a raw dataset, one line per problem.

Errors (the dataset cannot be used as it is): dataset.json missing/invalid, file names without a
channel ID, missing or unlisted channels (a file ``CASE_XXXX`` holds the channels from XXXX on: one,
or three for an RGB PNG of ``NaturalImage2DIO``, nnU-Net's convention), a number of channels read
that differs from ``channel_names``, a case in imagesTr without a label, labels without
images, ``numTraining`` mismatch, a truncated or corrupt ``.nii.gz``/``.nii`` (checked on the
file's own bytes, see ``autossl.imageio.file_check``), unreadable files, NaN/inf in an image or
label (in NIfTI files from the file's bytes: SimpleITK reads them as 0), image/label shape or
spacing mismatch, image/label origin or direction mismatch (the label would lie mirrored or
shifted against its image in world coordinates), label values that dataset.json does not list.
Warnings: origin/direction mismatches with ``allow_geometry_mismatch=True``
(``--allow_geometry_mismatch``; nnU-Net v2 always only warns).
Unlabelled images (``imagesTrUnlabeled``) are checked for damage, readability, channels and NaN/inf.
Every line starts with the file it is about; nothing raises.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autossl.imageio.base import ImageReadError
from autossl.imageio.channel_files import assign_channel_files, group_case_files
from autossl.imageio.file_check import check_files, nonfinite_problems
from autossl.imageio.registry import reader_writer_class
from autossl.raw.dataset import DatasetError, RawDataset, label_values, validate_dataset_json
from autossl.utilities.file_io import load_json


@dataclass
class IntegrityReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _scan_images(folder: Path, ending: str, n_channels: int, problems: list[str], reader
                 ) -> tuple[dict[str, list[str]], set[str]]:
    """Group ``CASE_XXXX<ending>`` files by case; report bad names and missing/extra channels (a
    file holds the channels from XXXX on: one, or three for an RGB PNG, ``autossl.imageio.channel_files``).
    Returns the complete cases (channel files in order) and the names of all cases seen."""
    if not folder.is_dir():
        return {}, set()
    named = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if not f.name.endswith(ending):
            problems.append(f"{f}: file ending is not {ending!r} (dataset.json 'file_ending'); rename or remove it")
            continue
        named.append(f)
    cases, unnamed = group_case_files(named, ending)
    for f in unnamed:
        problems.append(f"{f}: image file names must end in _XXXX{ending} (4-digit channel ID), "
                        f"e.g. case_0000{ending}")
    out = {}
    for case, chans in sorted(cases.items()):
        files, found = assign_channel_files(case, chans, n_channels, reader, folder, ending)
        problems.extend(found)
        if files is not None:
            out[case] = files
    return out, set(cases)


def _structure(folder: Path, dj: dict, report: IntegrityReport, reader):
    """List labelled and unlabelled cases; report structural problems."""
    ending = dj["file_ending"]
    n_ch = len(dj["channel_names"])
    labeled: dict[str, dict] = {}
    if "dataset" in dj:  # explicit listing in dataset.json
        try:
            listed = RawDataset(folder).labeled
        except DatasetError as e:
            report.errors.extend(str(e).splitlines())
            listed = {}
        for case, d in listed.items():
            files = list(d["images"]) + [d["label"]]
            missing = [f for f in files if not Path(f).is_file()]
            for f in missing:
                report.errors.append(f"{f}: listed for case {case} in dataset.json 'dataset' but does not exist")
            if missing:
                continue
            try:  # an RGB file of NaturalImage2DIO holds three channels
                held = sum(int(reader.channels_in_file(f)) if reader.files_may_hold_several_channels else 1
                           for f in d["images"])
            except ImageReadError as e:
                report.errors.append(str(e))
                continue
            if held != n_ch:
                what = f"{len(d['images'])} image(s)" + (f" holding {held} channel(s)" if held != len(d["images"])
                                                         else "")
                report.errors.append(f"{folder / 'dataset.json'}: case {case} lists {what} "
                                     f"but 'channel_names' has {n_ch}")
            else:
                labeled[case] = d
    else:
        images, all_cases = _scan_images(folder / "imagesTr", ending, n_ch, report.errors, reader)
        label_dir = folder / "labelsTr"
        for case, files in images.items():
            lab = label_dir / f"{case}{ending}"
            if not lab.is_file():
                report.errors.append(f"{files[0]}: case {case} is in imagesTr but has no label ({lab} does not exist); "
                                     f"if it is unlabelled, move its images to imagesTrUnlabeled/")
                continue
            labeled[case] = {"images": files, "label": str(lab)}
        if label_dir.is_dir():
            for f in sorted(label_dir.iterdir()):
                if f.name.startswith(".") or f.is_dir():
                    continue
                if not f.name.endswith(ending):
                    report.errors.append(f"{f}: file ending is not {ending!r} (dataset.json 'file_ending')")
                elif f.name[: -len(ending)] not in all_cases:
                    report.errors.append(f"{f}: label without images (no {f.name[: -len(ending)]}_0000{ending} "
                                         f"in imagesTr)")
        elif images:
            report.errors.append(f"{label_dir}: folder not found")
        if not (folder / "imagesTr").is_dir():
            report.errors.append(f"{folder / 'imagesTr'}: folder not found")
        n_found = len(all_cases)
    unlabeled, _ = _scan_images(folder / "imagesTrUnlabeled", ending, n_ch, report.errors, reader)
    for case in sorted(set(unlabeled) & set(labeled)):
        report.errors.append(f"{unlabeled[case][0]}: case {case} is also a labelled case in imagesTr; "
                             f"give it another name or remove one copy")
        del unlabeled[case]

    if "dataset" in dj:
        n_found = len(dj["dataset"]) if isinstance(dj["dataset"], dict) else len(labeled)
    if isinstance(dj.get("numTraining"), int) and dj["numTraining"] != n_found:
        report.errors.append(f"{folder / 'dataset.json'}: numTraining is {dj['numTraining']} but {n_found} "
                             f"labelled case(s) were found in imagesTr")
    if "numUnlabeled" in dj and isinstance(dj["numUnlabeled"], int) and dj["numUnlabeled"] != len(unlabeled):
        report.errors.append(f"{folder / 'dataset.json'}: numUnlabeled is {dj['numUnlabeled']} but {len(unlabeled)} "
                             f"case(s) were found in imagesTrUnlabeled")
    return labeled, unlabeled


def _world_geometry(props: dict):
    """(origin, unit axis directions as columns, spacing) of the voxel grid, or None (e.g. PNG)."""
    st = props.get("sitk_stuff")
    if st and st.get("direction") is not None and st.get("origin") is not None:
        n = len(st["origin"])
        return (np.asarray(st["origin"], float), np.asarray(st["direction"], float).reshape(n, n),
                np.asarray(st["spacing"], float))
    nb = props.get("nibabel_stuff")
    if nb and nb.get("original_affine") is not None:
        a = np.asarray(nb["original_affine"], float)
        m = a[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        return a[:3, 3], m / np.where(spacing > 0, spacing, 1), spacing
    return None


_AXES = "xyz"
GEOMETRY_HINT = ("autossl, like nnU-Net, trains on the voxel arrays and ignores this geometry, so one of the two "
                 "files is wrong: if the label is right in world coordinates, its voxels {what} and training "
                 "would learn {where}; if the voxel arrays do correspond, the label's header is wrong. "
                 "Resample the label onto the image grid or give it the image's geometry, or pass "
                 "--allow_geometry_mismatch to accept it (then a warning)")


def _fmt(v) -> str:
    return str(np.round(np.asarray(v, float), 4).tolist())


def geometry_problems(label: str, image: str, img_props: dict, seg_props: dict) -> list[str]:
    """Lines for a label whose origin or direction differs from its image's, saying what it means."""
    gi, gs = _world_geometry(img_props), _world_geometry(seg_props)
    if gi is None or gs is None or gi[0].shape != gs[0].shape:
        return []
    (oi, di, si), (os_, ds, _) = gi, gs
    out = []
    if not np.allclose(di, ds, atol=1e-4):
        cos = np.sum(di * ds, axis=0)  # per voxel axis: cosine between the two directions
        mirrored = [_AXES[j] if j < 3 else str(j) for j in range(len(cos)) if cos[j] < -1 + 1e-3]
        if mirrored and all(c > 1 - 1e-3 or c < -1 + 1e-3 for c in cos):
            meaning = (f"in world coordinates the label is mirrored along the {' and '.join(mirrored)} axis of the "
                       f"voxel grid against the image")
            what, where = "mark the mirror image of the structures", "the wrong side"
        else:
            meaning = "in world coordinates the label's voxel grid is rotated or its axes are swapped against the image"
            what, where = "mark structures at other places", "the wrong places"
        out.append(f"{label}: label direction {_fmt(ds.ravel())} differs from image direction {_fmt(di.ravel())} "
                   f"({image}): {meaning}. " + GEOMETRY_HINT.format(what=what, where=where))
    tol = max(1e-4, 1e-2 * float(np.min(si))) if si.size else 1e-4
    shift = os_ - oi
    if np.any(np.abs(shift) > tol):
        try:
            vox = np.linalg.solve(di * si[None, :], shift)
            in_voxels = f" ({_fmt(vox)} voxels along the image's axes)"
        except np.linalg.LinAlgError:
            in_voxels = ""
        out.append(f"{label}: label origin {_fmt(os_)} differs from image origin {_fmt(oi)} ({image}) by "
                   f"{_fmt(shift)} mm{in_voxels}: in world coordinates the label lies shifted against the image. "
                   + GEOMETRY_HINT.format(what="are offset from the structures they mark", where="the wrong voxels"))
    return out


def _check_case(args) -> tuple[list[str], list[str]]:
    """Check one case; returns (errors, warnings). Never raises."""
    case, images, label, file_ending, reader_name, expected_labels, allow_geometry_mismatch, n_channels = args
    errors: list[str] = []
    warnings: list[str] = []
    try:
        # the files' own bytes first: SimpleITK reads a truncated .nii.gz without an error and NaN/inf as 0
        checks = check_files(images, [label] if label is not None else [])
        for c in checks:
            errors += c.problems
        if any(c.damaged for c in checks):
            return errors, warnings  # nothing read from a damaged file can be trusted
        reported = {c.path for c in checks if c.nonfinite}
        rw = reader_writer_class(file_ending, reader_name)()
        try:
            data, props = rw.read_images(images)
        except ImageReadError as e:
            return errors + [str(e)], warnings
        errors += nonfinite_problems(data, images, skip=reported)
        if data.shape[0] != n_channels:  # nnU-Net's "unexpected number of modalities"
            errors.append(f"{images[0]}: case {case} has {data.shape[0]} channel(s) in {len(images)} file(s) but "
                          f"dataset.json 'channel_names' lists {n_channels}")
        if label is None:
            return errors, warnings
        try:
            seg, seg_props = rw.read_seg(label)
        except ImageReadError as e:
            return errors + [str(e)], warnings
        errors += nonfinite_problems(seg, [label], "label", skip=reported)
        if tuple(seg.shape[1:]) != tuple(data.shape[1:]):
            errors.append(f"{label}: label shape {tuple(seg.shape[1:])} differs from image shape "
                          f"{tuple(data.shape[1:])} ({images[0]})")
        if not np.allclose(seg_props["spacing"], props["spacing"], rtol=1e-3, atol=1e-5):
            errors.append(f"{label}: label spacing {tuple(round(float(s), 6) for s in seg_props['spacing'])} differs "
                          f"from image spacing {tuple(round(float(s), 6) for s in props['spacing'])} ({images[0]})")
        geometry = geometry_problems(label, images[0], props, seg_props)
        (warnings if allow_geometry_mismatch else errors).extend(geometry)
        found = np.unique(seg[np.isfinite(seg)] if seg.dtype.kind == "f" else seg)
        unexpected = [v for v in found.tolist() if v not in expected_labels]
        if unexpected:
            shown = [int(v) if float(v).is_integer() else float(v) for v in unexpected]
            errors.append(f"{label}: label values {shown} are not in dataset.json 'labels' "
                          f"(expected a subset of {sorted(expected_labels)})")
    except Exception as e:  # anything unexpected is still reported as a line about this case
        errors.append(f"{images[0] if images else case}: checking case {case} failed ({type(e).__name__}: {e})")
    return errors, warnings


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and os.name == "posix" else "spawn")


def integrity_report(raw_folder: str | os.PathLike, num_processes: int = 2, progress: bool = True,
                     allow_geometry_mismatch: bool = False) -> IntegrityReport:
    """Check a raw dataset; see the module docstring for what counts as an error or a warning.
    ``allow_geometry_mismatch`` turns image/label origin and direction differences into warnings."""
    folder = Path(raw_folder)
    report = IntegrityReport()
    if not folder.is_dir():
        report.errors.append(f"{folder}: dataset folder not found")
        return report
    dj_path = folder / "dataset.json"
    if not dj_path.is_file():
        report.errors.append(f"{dj_path}: dataset.json not found")
        return report
    try:
        dj = load_json(dj_path)
    except ValueError as e:
        report.errors.append(str(e))
        return report
    if not isinstance(dj, dict):
        report.errors.append(f"{dj_path}: must hold a JSON object")
        return report
    problems = validate_dataset_json(dj, str(dj_path))
    if problems:
        report.errors.extend(problems)
        return report
    try:
        reader_name = dj.get("overwrite_image_reader_writer")
        reader = reader_writer_class(dj["file_ending"], reader_name)()
    except ValueError as e:
        report.errors.append(f"{dj_path}: {e}")
        return report

    labeled, unlabeled = _structure(folder, dj, report, reader)
    if not report.errors:  # safety net: RawDataset must agree that the layout is usable
        try:
            RawDataset(folder)
        except DatasetError as e:
            report.errors.extend(str(e).splitlines())
    expected = set(label_values(dj))
    allow = bool(allow_geometry_mismatch)
    n_ch = len(dj["channel_names"])
    jobs = [(c, d["images"], d["label"], dj["file_ending"], reader_name, expected, allow, n_ch)
            for c, d in labeled.items()]
    jobs += [(c, imgs, None, dj["file_ending"], reader_name, expected, allow, n_ch) for c, imgs in unlabeled.items()]
    results = []
    if num_processes > 1 and len(jobs) > 1:
        with _pool_context().Pool(min(num_processes, len(jobs))) as pool:
            for r in tqdm(pool.imap(_check_case, jobs, chunksize=4), total=len(jobs), disable=not progress,
                          desc="verify dataset"):
                results.append(r)
    else:
        results = [_check_case(j) for j in tqdm(jobs, disable=not progress, desc="verify dataset")]
    for errs, warns in results:
        report.errors.extend(errs)
        report.warnings.extend(warns)
    return report


def verify_dataset_integrity(raw_folder: str | os.PathLike, num_processes: int = 2,
                             allow_geometry_mismatch: bool = False) -> list[str]:
    """Errors found in a raw dataset, one line each (empty when the dataset is usable)."""
    return integrity_report(raw_folder, num_processes, allow_geometry_mismatch=allow_geometry_mismatch).errors
