"""PROMISE12 (prostate MRI, ``CaseNN.mhd`` + ``CaseNN_segmentation.mhd``) -> ``Dataset012_PROMISE12``.

Training cases (found recursively under ``-i``, so the three unzipped training parts can sit
side by side) go to imagesTr/labelsTr; ``--labeled N`` keeps N of them (drawn with ``--seed``)
labelled and moves the rest to imagesTrUnlabeled; ``--holdout N`` puts N other training cases
in imagesTs with their labels outside the raw dataset. The challenge's test cases
(``--test-folder``, no segmentations) go to imagesTs as ``test_CaseNN``. Geometry (spacing,
origin, direction) is kept; labels are written on their image's grid as uint8.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from dataset_conversion.common import (
    CLI_ERRORS, FILE_ENDING, ConversionError, Layout, add_common_arguments, check_same_geometry,
    default_labels_folder, first_n_split, generate_dataset_json, label_to_uint8, read_image,
    resolve_output_folder, run_jobs, summary, verify_output, writing_output, write_case,
)

CASE_RE = re.compile(r"^(Case\d+)\.mhd$", re.IGNORECASE)
LABELS = {"background": 0, "prostate": 1}
TEST_PREFIX = "test_"


def find_cases(folder: Path, need_segmentation: bool) -> dict[str, tuple[Path, Path | None]]:
    """{CaseNN: (image, segmentation or None)} under ``folder`` (recursive, hidden files skipped)."""
    if not folder.is_dir():
        raise ConversionError(f"{folder}: folder not found")
    cases: dict[str, tuple[Path, Path | None]] = {}
    for p in sorted(folder.rglob("*.mhd")):
        if p.name.startswith(".") or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        m = CASE_RE.match(p.name)
        if not m:
            continue
        case = m.group(1)
        if case in cases:
            raise ConversionError(f"{p}: case {case} found twice (also {cases[case][0]})")
        seg = p.with_name(f"{case}_segmentation.mhd")
        if need_segmentation and not seg.is_file():
            raise ConversionError(f"{p}: training case {case} has no segmentation {seg.name}")
        cases[case] = (p, seg if seg.is_file() else None)
    if not cases:
        raise ConversionError(f"{folder}: no CaseNN.mhd files found")
    return cases


def convert_case(layout: Layout, role: str, case: str, image: Path, segmentation: Path | None) -> None:
    img = read_image(image)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{image}: expected a 3D single-channel image")
    seg = None
    if segmentation is not None and layout.label_path(role, case) is not None:
        seg = label_to_uint8(read_image(segmentation), LABELS.values(), str(segmentation))
        check_same_geometry(img, seg, str(segmentation))
        if not np.allclose(img.GetOrigin(), seg.GetOrigin(), atol=1e-2):
            raise ConversionError(f"{segmentation}: origin {seg.GetOrigin()} differs from the image's {img.GetOrigin()}")
        seg.CopyInformation(img)
    write_case(layout, role, case, [img], seg)


def convert_promise12(train_folder: str | Path, test_folder: str | Path | None = None, *, dataset_id: int = 12,
                      name: str = "PROMISE12", labeled: int | None = None, holdout: int = 0, seed: int = 12345,
                      test_labels_out: str | Path | None = None, num_processes: int = 1,
                      overwrite: bool = False) -> Path:
    """Convert PROMISE12; returns the raw dataset folder."""
    train = find_cases(Path(train_folder), need_segmentation=True)
    test = find_cases(Path(test_folder), need_segmentation=False) if test_folder is not None else {}
    names = sorted(train)
    held: list[str] = []
    if holdout:
        if not 0 < holdout < len(names):
            raise ConversionError(f"--holdout {holdout}: {train_folder} has {len(names)} training cases")
        order = np.random.default_rng(seed).permutation(len(names))
        held = sorted(names[i] for i in order[:holdout])
        names = [c for c in names if c not in set(held)]
    lab, unl = first_n_split(names, labeled, seed, str(train_folder))

    out = resolve_output_folder(dataset_id, name)
    test_labels = (Path(test_labels_out) if test_labels_out else default_labels_folder(out, "test")) if held else None
    layout = Layout(out, test_labels=test_labels)
    with writing_output(layout, overwrite):
        jobs = [(layout, "labeled", c, *train[c]) for c in lab] + [(layout, "unlabeled", c, *train[c]) for c in unl]
        jobs += [(layout, "test", c, *train[c]) for c in held]
        jobs += [(layout, "test", TEST_PREFIX + c, img, None) for c, (img, _) in test.items()]
        run_jobs(convert_case, jobs, num_processes, desc=f"PROMISE12 -> {out.name}")
        test_cases = held + [TEST_PREFIX + c for c in test]
        extra = {"numUnlabeled": len(unl), "numTest": len(test_cases)}
        if labeled is not None or held:
            extra["split"] = {"labeled": labeled if labeled is not None else "all", "holdout": holdout, "seed": seed,
                              "test_labels_folder": str(test_labels.absolute()) if test_labels else None}
        generate_dataset_json(out, {"0": "MRI"}, LABELS, len(lab), FILE_ENDING, name=name, **extra,
                              converted_from=str(Path(train_folder).resolve()), converter="autossl_convert_promise12",
                              reference="Litjens et al., Medical Image Analysis 2014 (PROMISE12)")
        ds = verify_output(layout, {"labeled": lab, "unlabeled": unl, "test": test_cases})
    print(summary(layout, ds))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="autossl_convert_promise12",
        description="Convert PROMISE12 (CaseNN.mhd + CaseNN_segmentation.mhd) to $autossl_raw/Dataset012_PROMISE12.")
    p.add_argument("-i", "--input", required=True, type=Path,
                   help="training folder (searched recursively for CaseNN.mhd and CaseNN_segmentation.mhd)")
    p.add_argument("--test-folder", type=Path, default=None,
                   help="challenge test folder (CaseNN.mhd without segmentations) -> imagesTs as test_CaseNN")
    add_common_arguments(p, 12, "PROMISE12")
    p.add_argument("--labeled", type=int, default=None,
                   help="keep only N training cases labelled (drawn with --seed); the rest -> imagesTrUnlabeled")
    p.add_argument("--holdout", type=int, default=0,
                   help="move N training cases (drawn with --seed) to imagesTs, labels to --test-labels-out")
    p.add_argument("--seed", type=int, default=12345, help="seed of the --labeled / --holdout draws (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        convert_promise12(a.input, a.test_folder, dataset_id=a.dataset_id, name=a.name, labeled=a.labeled,
                          holdout=a.holdout, seed=a.seed, test_labels_out=a.test_labels_out,
                          num_processes=a.num_processes, overwrite=a.overwrite)
    except CLI_ERRORS as e:
        p.exit(1, f"autossl_convert_promise12: error: {e}\n")


if __name__ == "__main__":
    main()
