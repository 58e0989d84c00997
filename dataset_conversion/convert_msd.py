"""Medical Segmentation Decathlon task folder -> raw dataset (nnU-Net v2 format).

Without ``--split``: every training case goes to imagesTr/labelsTr and the task's own imagesTs
(no labels) to imagesTs. With ``--split FILE --labeled KEY``: the labelled cases go to
imagesTr/labelsTr, the rest of ``train_pool`` to imagesTrUnlabeled (images only) and the
``test`` cases to imagesTs, their labels to a folder outside the raw dataset.
4D images are split into one file per channel (_0000, _0001, ...).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import SimpleITK as sitk

from dataset_conversion.common import (
    CLI_ERRORS, FILE_ENDING, ConversionError, Layout, Split, add_common_arguments, copy_file, default_labels_folder,
    generate_dataset_json, load_split, read_image, resolve_output_folder, run_jobs,
    split_channels, summary, verify_output, writing_output, write_image,
)
from autossl.utilities.file_io import load_json

TASK_RE = re.compile(r"^Task(\d+)_(.+)$")
NIFTI_ENDINGS = (".nii.gz", ".nii")


def parse_task_name(folder: Path) -> tuple[int | None, str | None]:
    """``Task04_Hippocampus`` -> (4, 'Hippocampus'); (None, None) when the name does not match."""
    m = TASK_RE.match(Path(folder).name)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


def _case_name(rel: str, where: Path) -> str:
    name = Path(rel).name
    for e in NIFTI_ENDINGS:
        if name.endswith(e):
            return name[: -len(e)]
    raise ConversionError(f"{where}: entry {rel!r} is not a NIfTI file (.nii.gz / .nii)")


def read_msd_dataset_json(task_folder: Path) -> dict:
    """Load and check an MSD ``dataset.json`` (``modality``, ``labels`` keyed by value, ``training``)."""
    path = task_folder / "dataset.json"
    if not task_folder.is_dir():
        raise ConversionError(f"{task_folder}: task folder not found")
    if not path.is_file():
        raise ConversionError(f"{path}: dataset.json not found; is {task_folder} an MSD task folder?")
    dj = load_json(path)
    for key in ("modality", "labels", "training"):
        if key not in dj:
            hint = " (this looks like an nnU-Net v2 dataset.json already)" if "channel_names" in dj else ""
            raise ConversionError(f"{path}: missing MSD key '{key}'{hint}")
    if not isinstance(dj["training"], list):
        raise ConversionError(f"{path}: 'training' must be a list of {{'image': ..., 'label': ...}}")
    try:
        values = sorted(int(k) for k in dj["labels"])
    except (TypeError, ValueError):
        raise ConversionError(f"{path}: 'labels' must be keyed by integer values like {{\"0\": \"background\"}}") from None
    if values != list(range(len(values))):
        raise ConversionError(f"{path}: label values must be consecutive from 0, found {values}")
    return dj


def msd_labels(dj: dict) -> dict[str, int]:
    """MSD {"0": "background", "1": "Anterior"} -> nnU-Net v2 {"background": 0, "Anterior": 1}."""
    out = {}
    for k in sorted(dj["labels"], key=int):
        name = "background" if int(k) == 0 else str(dj["labels"][k])
        if name in out:
            name = f"{name}_{k}"
        out[name] = int(k)
    return out


def list_msd_cases(task_folder: Path, dj: dict) -> tuple[dict[str, tuple[Path, Path]], dict[str, Path]]:
    """({case: (image, label)} from 'training', {case: image} from imagesTs); hidden files skipped."""
    where = task_folder / "dataset.json"
    training: dict[str, tuple[Path, Path]] = {}
    for entry in dj["training"]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ConversionError(f"{where}: every 'training' entry needs 'image' and 'label', got {entry!r}")
        if Path(entry["image"]).name.startswith("."):
            continue
        case = _case_name(entry["image"], where)
        img, lab = task_folder / entry["image"], task_folder / entry["label"]
        for p in (img, lab):
            if not p.is_file():
                raise ConversionError(f"{p}: listed in {where} (case {case}) but not found")
        if case in training:
            raise ConversionError(f"{where}: case {case} is listed twice in 'training'")
        training[case] = (img, lab)
    test: dict[str, Path] = {}
    ts = task_folder / "imagesTs"
    if ts.is_dir():
        for p in sorted(ts.iterdir()):
            if p.name.startswith(".") or not p.name.endswith(NIFTI_ENDINGS):
                continue
            test[_case_name(p.name, ts)] = p
    return training, test


def convert_case(layout: Layout, role: str, case: str, image: Path, label: Path | None, num_channels: int) -> None:
    """Copy a 3D case as is (exact bytes); split a 4D image into channel files."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(image))
    try:
        info.ReadImageInformation()
    except RuntimeError:
        raise ConversionError(f"{image}: cannot be read as an image") from None
    n_comp = info.GetNumberOfComponents()
    if info.GetDimension() == 3 and n_comp == 1 and num_channels == 1 and image.name.endswith(FILE_ENDING):
        copy_file(image, layout.image_path(role, case, 0))
    else:
        channels = split_channels(read_image(image), image)
        if len(channels) != num_channels:
            raise ConversionError(f"{image}: {len(channels)} channel(s), but dataset.json 'modality' lists {num_channels}")
        for c, img in enumerate(channels):
            write_image(img, layout.image_path(role, case, c))
    dst = layout.label_path(role, case)
    if dst is not None and label is not None:
        if label.name.endswith(FILE_ENDING):
            copy_file(label, dst)
        else:
            write_image(read_image(label), dst)


def convert_msd(task_folder: str | Path, dataset_id: int | None = None, name: str | None = None, *,
                split_file: str | Path | None = None, labeled: str | None = None,
                test_labels_out: str | Path | None = None, num_processes: int = 1,
                overwrite: bool = False) -> Path:
    """Convert an MSD task folder; returns the raw dataset folder."""
    task_folder = Path(task_folder)
    dj = read_msd_dataset_json(task_folder)
    tid, tname = parse_task_name(task_folder)
    dataset_id = tid if dataset_id is None else dataset_id
    name = tname if name is None else name
    if dataset_id is None or name is None:
        raise ConversionError(f"{task_folder}: the folder is not named TaskXX_Name; give -d and --name")
    if (split_file is None) != (labeled is None):
        raise ConversionError("--split and --labeled go together (e.g. --split split.json --labeled labeled_10)")
    training, msd_test = list_msd_cases(task_folder, dj)
    if not training:
        raise ConversionError(f"{task_folder / 'dataset.json'}: 'training' lists no cases")
    num_channels = len(dj["modality"])

    out = resolve_output_folder(dataset_id, name)
    split: Split | None = None
    extra: dict = {}
    if split_file is not None:
        split = load_split(split_file, labeled)
        missing = [c for c in split.labeled + split.unlabeled + split.test if c not in training]
        if missing:
            raise ConversionError(f"{split_file}: case {missing[0]} is not a training case of {task_folder}")
        test_labels = Path(test_labels_out) if test_labels_out else default_labels_folder(out, "test")
        layout = Layout(out, test_labels=test_labels)
        jobs = [(layout, role, c, training[c][0], training[c][1], num_channels) for c, role in split.roles().items()]
        left_out = sorted(set(training) - set(split.roles()))
        if left_out:
            print(f"{len(left_out)} training case(s) are in neither 'train_pool' nor 'test' of {split_file}; not converted")
        if msd_test:
            print(f"{len(msd_test)} unlabelled case(s) in {task_folder / 'imagesTs'} not converted (split mode)")
        expected = {"labeled": split.labeled, "unlabeled": split.unlabeled, "test": split.test}
        extra = {"numUnlabeled": len(split.unlabeled), "numTest": len(split.test),
                 "split": dict(split.source, test_labels_folder=str(test_labels.absolute()))}
    else:
        layout = Layout(out)
        jobs = [(layout, "labeled", c, img, lab, num_channels) for c, (img, lab) in training.items()]
        jobs += [(layout, "test", c, img, None, num_channels) for c, img in msd_test.items()]
        expected = {"labeled": list(training), "test": list(msd_test)}
        extra = {"numUnlabeled": 0, "numTest": len(msd_test)}

    with writing_output(layout, overwrite):
        run_jobs(convert_case, jobs, num_processes, desc=f"{task_folder.name} -> {out.name}")
        keep = {k: dj[k] for k in ("description", "reference", "licence", "release", "tensorImageSize") if k in dj}
        generate_dataset_json(out, {str(k): v for k, v in dj["modality"].items()}, msd_labels(dj),
                              len(expected["labeled"]), FILE_ENDING, name=name, **extra, **keep,
                              converted_from=str(task_folder.resolve()), converter="autossl_convert_msd")
        ds = verify_output(layout, expected)
    print(summary(layout, ds))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="autossl_convert_msd",
        description="Convert a Medical Segmentation Decathlon task folder (TaskXX_Name) to "
                    "$autossl_raw/DatasetXXX_Name; optionally apply a semi-supervised split.")
    p.add_argument("-i", "--input", required=True, type=Path, help="MSD task folder, e.g. Task04_Hippocampus")
    add_common_arguments(p, None, None)
    p.add_argument("--split", type=Path, default=None,
                   help="split JSON with 'test', 'train_pool' and labelled lists (e.g. labeled_10)")
    p.add_argument("--labeled", default=None,
                   help="key of the labelled list in --split, or 'all' for the whole train_pool")
    a = p.parse_args(argv)
    try:
        convert_msd(a.input, a.dataset_id, a.name, split_file=a.split, labeled=a.labeled,
                    test_labels_out=a.test_labels_out, num_processes=a.num_processes, overwrite=a.overwrite)
    except CLI_ERRORS as e:
        p.exit(1, f"autossl_convert_msd: error: {e}\n")


if __name__ == "__main__":
    main()
