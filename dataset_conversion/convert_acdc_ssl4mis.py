"""ACDC in the SSL4MIS h5 layout -> ``Dataset027_ACDC`` (semi-supervised split of SSL4MIS).

Input (``-i``): ``train.list``/``val.list``/``test.list`` (volume names ``patientNNN_frameMM``),
``data/<volume>.h5`` whole volumes (val/test patients) and ``data/slices/<volume>_slice_K.h5``
2D slices (training patients; the volume is rebuilt by stacking slices in order of K).
h5 arrays are slices x H x W; the slice axis is written as z with the slice spacing.

Roles: the labelled patients' volumes -> imagesTr/labelsTr; the other train.list patients ->
imagesTrUnlabeled (no labels); test.list -> imagesTs with labels in ``--test-labels-out``;
val.list -> imagesVal with labels in ``--val-labels-out`` (or skipped with ``--val skip``).
The h5 files carry no spacing: a nominal 1.5625 x 1.5625 x 10 mm is written and recorded.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from dataset_conversion.common import (
    CLI_ERRORS, FILE_ENDING, ConversionError, Layout, add_common_arguments, array_to_image,
    default_labels_folder, generate_dataset_json, resolve_output_folder, run_jobs, summary,
    verify_output, writing_output, write_case,
)

LABELED_PATIENTS = {
    "3": ["038", "050", "099"],
    "7": ["021", "038", "049", "050", "058", "099", "100"],
}
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
NOMINAL_SPACING = (1.5625, 1.5625, 10.0)  # x, y (in-plane), z (slice)
VOLUME_RE = re.compile(r"^patient(\d{3})_frame\d+$")
SLICE_RE = re.compile(r"^(patient\d{3}_frame\d+)_slice_(\d+)\.h5$")


def read_list(path: Path) -> list[str]:
    """Volume names of a ``*.list`` file, each checked against ``patientNNN_frameMM``."""
    if not path.is_file():
        raise ConversionError(f"{path}: list file not found; is {path.parent} the SSL4MIS ACDC folder?")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    for n in names:
        if not VOLUME_RE.match(n):
            raise ConversionError(f"{path}: line {n!r} is not a volume name like patient001_frame01")
    return names


def patient_of(volume: str) -> str:
    return VOLUME_RE.match(volume).group(1)


def parse_patients(spec: str, what: str) -> list[str]:
    """'38,050, 99' -> ['038', '050', '099']."""
    out = []
    for tok in spec.replace(" ", "").split(","):
        if not tok:
            continue
        tok = tok.removeprefix("patient")
        if not tok.isdigit():
            raise ConversionError(f"{what}: {tok!r} is not a patient number (e.g. 038 or 38)")
        out.append(f"{int(tok):03d}")
    if not out:
        raise ConversionError(f"{what}: no patient numbers given")
    return out


def labeled_patients(setting: str, train_patients: Sequence[str]) -> list[str]:
    """Patients labelled in a setting: '3', '7' (the SSL4MIS subsets), 'all', or a comma list."""
    if setting == "all":
        return sorted(set(train_patients))
    chosen = LABELED_PATIENTS.get(setting) or parse_patients(setting, "--labeled-patients")
    unknown = [p for p in chosen if p not in set(train_patients)]
    if unknown:
        raise ConversionError(f"--labeled-patients: patient {unknown[0]} is not a training patient (train.list)")
    return sorted(chosen)


def index_slices(slices_dir: Path) -> dict[str, list[Path]]:
    """{volume: slice files in order of K}, checking K runs 1..n without gaps."""
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    if slices_dir.is_dir():
        for p in slices_dir.iterdir():
            m = SLICE_RE.match(p.name)
            if m:
                found[m.group(1)][int(m.group(2))] = p
    out = {}
    for vol, ks in found.items():
        missing = sorted(set(range(1, max(ks) + 1)) - set(ks))
        if missing:
            raise ConversionError(f"{slices_dir / f'{vol}_slice_{missing[0]}.h5'}: slice {missing[0]} of {vol} is missing "
                                  f"(found slices {min(ks)}..{max(ks)})")
        out[vol] = [ks[k] for k in sorted(ks)]
    return out


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of one h5 file, checked."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConversionError(f"{path}: cannot be read as HDF5 ({e})") from None
    with f:
        for key in ("image", "label"):
            if key not in f:
                raise ConversionError(f"{path}: missing h5 dataset '{key}' (found {sorted(f.keys())})")
        image, label = f["image"][()], f["label"][()]
    if image.shape != label.shape:
        raise ConversionError(f"{path}: 'image' shape {image.shape} differs from 'label' shape {label.shape}")
    return image, label


def load_volume(sources: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """A whole volume (slices x H x W) from one volume file or from its slice files in order."""
    if len(sources) == 1 and not SLICE_RE.match(sources[0].name):
        image, label = read_h5(sources[0])
        if image.ndim != 3:
            raise ConversionError(f"{sources[0]}: expected a 3D volume (slices x H x W), got shape {image.shape}")
        return image, label
    images, labels = [], []
    for p in sources:
        im, lab = read_h5(p)
        if im.ndim != 2:
            raise ConversionError(f"{p}: expected a 2D slice (H x W), got shape {im.shape}")
        if images and im.shape != images[0].shape:
            raise ConversionError(f"{p}: slice shape {im.shape} differs from {sources[0]} ({images[0].shape})")
        images.append(im)
        labels.append(lab)
    return np.stack(images), np.stack(labels)


def convert_volume(layout: Layout, role: str, volume: str, sources: list[Path], spacing: tuple[float, float, float]) -> tuple:
    """Write one volume; returns its (slices, H, W) shape."""
    image, label = load_volume(sources)
    bad = sorted(set(np.unique(label).tolist()) - set(LABELS.values()))
    if bad:
        raise ConversionError(f"{sources[0]}: unexpected label values {bad} (ACDC labels are 0..3)")
    img = array_to_image(image.astype(np.float32, copy=False), spacing)
    seg = array_to_image(label.astype(np.uint8, copy=False), spacing)
    write_case(layout, role, volume, [img], seg)
    return image.shape


def convert_acdc(input_folder: str | Path, labeled: str = "7", *, dataset_id: int = 27, name: str = "ACDC",
                 patients: Sequence[str] | None = None, val: str = "separate",
                 test_labels_out: str | Path | None = None, val_labels_out: str | Path | None = None,
                 spacing: Sequence[float] = NOMINAL_SPACING, num_processes: int = 1,
                 overwrite: bool = False) -> Path:
    """Convert the SSL4MIS ACDC folder; ``patients`` restricts the conversion to those patients."""
    root = Path(input_folder)
    if not root.is_dir():
        raise ConversionError(f"{root}: input folder not found")
    lists = {k: read_list(root / f"{k}.list") for k in ("train", "val", "test")}
    pats = {k: sorted({patient_of(v) for v in vols}) for k, vols in lists.items()}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        both = sorted(set(pats[a]) & set(pats[b]))
        if both:
            raise ConversionError(f"{root}: patient {both[0]} is in both {a}.list and {b}.list")
    lab_patients = labeled_patients(labeled, pats["train"])
    known = set(pats["train"]) | set(pats["val"]) | set(pats["test"])
    if patients is not None:
        unknown = [p for p in patients if p not in known]
        if unknown:
            raise ConversionError(f"--patients: patient {unknown[0]} is in none of train.list, val.list, test.list of {root}")
        keep = set(patients)
    else:
        keep = known
    if val not in ("separate", "skip"):
        raise ConversionError(f"--val must be 'separate' or 'skip', got {val!r}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConversionError(f"--spacing needs three positive values (x y z), got {spacing}")

    roles: dict[str, str] = {}
    for v in lists["train"]:
        roles[v] = "labeled" if patient_of(v) in lab_patients else "unlabeled"
    roles.update({v: "test" for v in lists["test"]})
    if val == "separate":
        roles.update({v: "val" for v in lists["val"]})
    roles = {v: r for v, r in roles.items() if patient_of(v) in keep}

    slices = index_slices(root / "data" / "slices")
    sources: dict[str, list[Path]] = {}
    for v in roles:
        whole = root / "data" / f"{v}.h5"
        if v in slices:
            sources[v] = slices[v]
        elif whole.is_file():
            sources[v] = [whole]
        else:
            raise ConversionError(f"{whole}: volume {v} not found (neither this file nor "
                                  f"{root / 'data' / 'slices' / f'{v}_slice_1.h5'} exists)")

    out = resolve_output_folder(dataset_id, name)
    test_labels = Path(test_labels_out) if test_labels_out else default_labels_folder(out, "test")
    val_labels = (Path(val_labels_out) if val_labels_out else default_labels_folder(out, "val")) if val == "separate" else None
    layout = Layout(out, test_labels=test_labels, val_labels=val_labels)
    note = (f"nominal spacing {spacing[0]} x {spacing[1]} x {spacing[2]} mm (x, y in-plane; z = slice axis); "
            f"the SSL4MIS h5 files carry no spacing (ACDC: in-plane about 1.37-1.68 mm, slices 5-10 mm)")
    print(f"Writing {note}")
    with writing_output(layout, overwrite):
        jobs = [(layout, r, v, sources[v], spacing) for v, r in roles.items()]
        run_jobs(convert_volume, jobs, num_processes, desc=f"ACDC -> {out.name}")

        by_role = {r: sorted(v for v, rr in roles.items() if rr == r) for r in ("labeled", "unlabeled", "test", "val")}
        generate_dataset_json(
            out, {"0": "cineMRI"}, LABELS, len(by_role["labeled"]), FILE_ENDING, name=name,
            numUnlabeled=len(by_role["unlabeled"]), numTest=len(by_role["test"]), numVal=len(by_role["val"]),
            nominal_spacing=list(spacing), spacing_note=note,
            labeled_patients=sorted({patient_of(v) for v in by_role["labeled"]}),
            split={"source": "SSL4MIS train.list / val.list / test.list", "folder": str(root.resolve()),
                   "labeled_patients": labeled, "test_labels_folder": str(test_labels.absolute()),
                   "val_labels_folder": str(val_labels.absolute()) if val_labels else None,
                   "val": "imagesVal/ (not used for training)" if val_labels else "not converted"},
            converted_from=str(root.resolve()), converter="autossl_convert_acdc",
            reference="Bernard et al., IEEE TMI 2018 (ACDC); SSL4MIS preprocessed layout",
        )
        ds = verify_output(layout, by_role)
    extra = f"Val labels (outside the raw dataset): {val_labels}" if val_labels and by_role["val"] else ""
    print(summary(layout, ds, extra))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="autossl_convert_acdc",
        description="Convert ACDC in the SSL4MIS h5 layout to $autossl_raw/Dataset027_ACDC with the "
                    "SSL4MIS semi-supervised split.")
    p.add_argument("-i", "--input", required=True, type=Path,
                   help="ACDC_ssl4mis folder (train.list, val.list, test.list, data/)")
    p.add_argument("--labeled-patients", default="7",
                   help="labelled training patients: 3 (038,050,099), 7 (021,038,049,050,058,099,100), "
                        "all, or a comma list of patient numbers (default: %(default)s)")
    add_common_arguments(p, 27, "ACDC")
    p.add_argument("--val", choices=("separate", "skip"), default="separate",
                   help="val.list volumes: 'separate' = imagesVal/ with labels in --val-labels-out (never "
                        "used for training), 'skip' = not converted (default: %(default)s)")
    p.add_argument("--val-labels-out", type=Path, default=None,
                   help="folder for the val labels (default: $autossl_raw/../DatasetXXX_Name_vallabels)")
    p.add_argument("--patients", default=None,
                   help="convert only these patients (comma list, e.g. 038,011); for quick checks")
    p.add_argument("--spacing", type=float, nargs=3, default=list(NOMINAL_SPACING), metavar=("X", "Y", "Z"),
                   help="spacing written to every volume, mm (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        pats = parse_patients(a.patients, "--patients") if a.patients else None
        convert_acdc(a.input, a.labeled_patients, dataset_id=a.dataset_id, name=a.name, patients=pats, val=a.val,
                     test_labels_out=a.test_labels_out, val_labels_out=a.val_labels_out, spacing=a.spacing,
                     num_processes=a.num_processes, overwrite=a.overwrite)
    except CLI_ERRORS as e:
        p.exit(1, f"autossl_convert_acdc: error: {e}\n")


if __name__ == "__main__":
    main()
