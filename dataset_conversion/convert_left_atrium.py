"""Left Atrium 2018 in the UA-MT / SSL4MIS h5 layout -> ``Dataset101_LA``.

Input (``-i``): ``train.list`` and ``test.list`` (one case ID per line; a line holding a path
``.../<ID>/mri_norm2.h5`` is read as ``<ID>``) and ``<ID>/mri_norm2.h5`` files with datasets
``image`` (float) and ``label`` (0/1) in x, y, z order, 0.625 mm isotropic. The h5 files sit in
``-i`` itself, in ``-i/2018LA_Seg_Training Set/`` (UA-MT) or in ``--data-dir``.
The first ``--labeled N`` IDs of train.list are labelled (UA-MT: 8 or 16), the other training
IDs go to imagesTrUnlabeled; test.list -> imagesTs with labels outside the raw dataset.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

from dataset_conversion.common import (
    CLI_ERRORS, FILE_ENDING, ConversionError, Layout, add_common_arguments, array_to_image,
    default_labels_folder, first_n_split, generate_dataset_json, resolve_output_folder, run_jobs,
    summary, verify_output, writing_output, write_case,
)

H5_NAME = "mri_norm2.h5"
UAMT_SUBFOLDER = "2018LA_Seg_Training Set"
SPACING = (0.625, 0.625, 0.625)
LABELS = {"background": 0, "left_atrium": 1}


def read_id_list(path: Path) -> list[str]:
    """Case IDs of ``train.list`` / ``test.list``."""
    if not path.is_file():
        raise ConversionError(f"{path}: list file not found; is {path.parent} the Left Atrium folder?")
    ids = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s:
            continue
        p = Path(s)
        ident = p.parent.name if p.name == H5_NAME else p.name
        if not ident:
            raise ConversionError(f"{path}: cannot read a case ID from line {s!r}")
        ids.append(ident)
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConversionError(f"{path}: case {dup[0]} is listed more than once")
    if not ids:
        raise ConversionError(f"{path}: lists no cases")
    return ids


def find_data_dir(root: Path, first_id: str) -> Path:
    for cand in (root, root / UAMT_SUBFOLDER):
        if (cand / first_id / H5_NAME).is_file():
            return cand
    raise ConversionError(f"{root / first_id / H5_NAME}: not found (nor under {root / UAMT_SUBFOLDER}); "
                          f"give the folder holding <ID>/{H5_NAME} with --data-dir")


def convert_case(layout: Layout, role: str, case: str, h5_file: Path) -> tuple:
    """Write one case; returns its (x, y, z) shape."""
    if not h5_file.is_file():
        raise ConversionError(f"{h5_file}: file not found (case {case})")
    try:
        f = h5py.File(h5_file, "r")
    except OSError as e:
        raise ConversionError(f"{h5_file}: cannot be read as HDF5 ({e})") from None
    with f:
        for key in ("image", "label"):
            if key not in f:
                raise ConversionError(f"{h5_file}: missing h5 dataset '{key}' (found {sorted(f.keys())})")
        image, label = f["image"][()], f["label"][()]
    if image.ndim != 3 or image.shape != label.shape:
        raise ConversionError(f"{h5_file}: 'image' {image.shape} and 'label' {label.shape} must be 3D of equal shape")
    bad = sorted(set(np.unique(label).tolist()) - set(LABELS.values()))
    if bad:
        raise ConversionError(f"{h5_file}: unexpected label values {bad} (expected 0 and 1)")
    # h5 arrays are (x, y, z); SimpleITK arrays are (z, y, x)
    img = array_to_image(image.astype(np.float32, copy=False).transpose(2, 1, 0), SPACING)
    seg = array_to_image(label.astype(np.uint8, copy=False).transpose(2, 1, 0), SPACING)
    write_case(layout, role, case, [img], seg)
    return image.shape


def convert_left_atrium(input_folder: str | Path, labeled: int | None = 8, *, dataset_id: int = 101, name: str = "LA",
                        data_dir: str | Path | None = None, test_labels_out: str | Path | None = None,
                        num_processes: int = 1, overwrite: bool = False) -> Path:
    """Convert the LA h5 layout; ``labeled=None`` labels every training case."""
    root = Path(input_folder)
    if not root.is_dir():
        raise ConversionError(f"{root}: input folder not found")
    train, test = read_id_list(root / "train.list"), read_id_list(root / "test.list")
    both = sorted(set(train) & set(test))
    if both:
        raise ConversionError(f"{root}: case {both[0]} is in both train.list and test.list")
    data = Path(data_dir) if data_dir is not None else find_data_dir(root, train[0])
    missing = [i for i in train + test if not (data / i / H5_NAME).is_file()]
    if missing:
        raise ConversionError(f"{data / missing[0] / H5_NAME}: not found (case {missing[0]}); "
                              f"{len(missing)} listed case(s) missing")
    lab, unl = first_n_split(train, labeled, None, str(root / "train.list"))

    out = resolve_output_folder(dataset_id, name)
    test_labels = Path(test_labels_out) if test_labels_out else default_labels_folder(out, "test")
    layout = Layout(out, test_labels=test_labels)
    with writing_output(layout, overwrite):
        roles = {**{c: "labeled" for c in lab}, **{c: "unlabeled" for c in unl}, **{c: "test" for c in test}}
        run_jobs(convert_case, [(layout, r, c, data / c / H5_NAME) for c, r in roles.items()], num_processes,
                 desc=f"LA -> {out.name}")
        generate_dataset_json(
            out, {"0": "MRI"}, LABELS, len(lab), FILE_ENDING, name=name, numUnlabeled=len(unl), numTest=len(test),
            split={"source": "UA-MT train.list / test.list", "labeled": f"first {len(lab)} of train.list",
                   "test_labels_folder": str(test_labels.absolute())},
            converted_from=str(root.resolve()), converter="autossl_convert_la",
            reference="Xiong et al., Medical Image Analysis 2021 (2018 Atrial Segmentation Challenge); UA-MT h5 layout",
        )
        ds = verify_output(layout, {"labeled": lab, "unlabeled": unl, "test": test})
    print(summary(layout, ds))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="autossl_convert_la",
        description="Convert Left Atrium 2018 in the UA-MT/SSL4MIS h5 layout to $autossl_raw/Dataset101_LA.")
    p.add_argument("-i", "--input", required=True, type=Path, help="folder with train.list and test.list")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder holding <ID>/{H5_NAME} (default: -i or -i/'{UAMT_SUBFOLDER}')")
    p.add_argument("--labeled", default="8",
                   help="first N IDs of train.list are labelled (UA-MT: 8 or 16), or 'all' (default: %(default)s)")
    add_common_arguments(p, 101, "LA")
    a = p.parse_args(argv)
    try:
        if a.labeled == "all":
            n = None
        elif a.labeled.isdigit():
            n = int(a.labeled)
        else:
            raise ConversionError(f"--labeled must be a number or 'all', got {a.labeled!r}")
        convert_left_atrium(a.input, n, dataset_id=a.dataset_id, name=a.name, data_dir=a.data_dir,
                            test_labels_out=a.test_labels_out, num_processes=a.num_processes, overwrite=a.overwrite)
    except CLI_ERRORS as e:
        p.exit(1, f"autossl_convert_la: error: {e}\n")


if __name__ == "__main__":
    main()
