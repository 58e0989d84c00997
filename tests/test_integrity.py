"""verify_dataset_integrity: one clear line per problem, naming the file; never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autossl.raw.integrity import integrity_report, verify_dataset_integrity
from autossl.utilities.synthetic import make_synthetic_dataset


def _make(tmp_path: Path, **kw) -> Path:
    args = dict(n_labeled=3, n_unlabeled=2, n_test=0, shape=(8, 10, 9), seed=1)
    args.update(kw)
    return make_synthetic_dataset(tmp_path / "raw", **args)


def _dj(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def _write_dj(folder: Path, dj: dict) -> None:
    (folder / "dataset.json").write_text(json.dumps(dj))


def _rewrite(path: Path, fn) -> None:
    """Read an image, change it with ``fn(image) -> image``, write it back."""
    img = sitk.ReadImage(str(path))
    sitk.WriteImage(fn(img), str(path), True)


def _one(lines: list[str], *needles: str) -> str:
    hits = [ln for ln in lines if all(n in ln for n in needles)]
    assert len(hits) == 1, f"expected one line with {needles}, got {lines}"
    assert "\n" not in hits[0] and "Traceback" not in hits[0]
    return hits[0]


def test_clean_dataset_has_no_problems(tmp_path):
    folder = _make(tmp_path)
    report = integrity_report(folder, num_processes=2, progress=False)
    assert report.errors == [] and report.warnings == []
    assert verify_dataset_integrity(folder, num_processes=1) == []


def test_missing_dataset_json(tmp_path):
    folder = _make(tmp_path)
    (folder / "dataset.json").unlink()
    line = _one(verify_dataset_integrity(folder, 1), "dataset.json not found")
    assert line.startswith(str(folder / "dataset.json"))


def test_missing_folder(tmp_path):
    _one(verify_dataset_integrity(tmp_path / "nope", 1), str(tmp_path / "nope"), "not found")


def test_dataset_json_missing_keys_and_bad_json(tmp_path):
    folder = _make(tmp_path)
    dj = _dj(folder)
    del dj["file_ending"], dj["channel_names"]
    dj["modality"] = {"0": "MRI"}
    _write_dj(folder, dj)
    lines = verify_dataset_integrity(folder, 1)
    _one(lines, str(folder / "dataset.json"), "'file_ending'")
    assert "rename" in _one(lines, "'channel_names'", "modality")
    (folder / "dataset.json").write_text("{not json")
    _one(verify_dataset_integrity(folder, 1), str(folder / "dataset.json"), "not valid JSON")


def test_labels_not_consecutive(tmp_path):
    folder = _make(tmp_path)
    dj = _dj(folder)
    dj["labels"] = {"background": 0, "head": 1, "tail": 3}
    _write_dj(folder, dj)
    _one(verify_dataset_integrity(folder, 1), "dataset.json", "consecutive")


def test_missing_channel(tmp_path):
    folder = _make(tmp_path)
    dj = _dj(folder)
    dj["channel_names"] = {"0": "T1", "1": "T2"}
    _write_dj(folder, dj)
    for f in sorted((folder / "imagesTr").glob("*_0000.nii.gz"))[1:]:  # first case keeps only channel 0
        shutil.copy(f, str(f).replace("_0000", "_0001"))
    for f in (folder / "imagesTrUnlabeled").glob("*_0000.nii.gz"):
        shutil.copy(f, str(f).replace("_0000", "_0001"))
    lines = verify_dataset_integrity(folder, 1)
    line = _one(lines, "channel 1", "missing")
    assert "synthetic_lab000_0001.nii.gz" in line and "imagesTr" in line
    assert len(lines) == 1, lines  # the case still counts for numTraining; nothing else is wrong


def test_unlisted_extra_channel(tmp_path):
    folder = _make(tmp_path)
    f = sorted((folder / "imagesTr").glob("*_0000.nii.gz"))[0]
    shutil.copy(f, str(f).replace("_0000", "_0001"))
    line = _one(verify_dataset_integrity(folder, 1), "channel 1", "not listed")
    assert "synthetic_lab000_0001.nii.gz" in line


def test_image_without_label_suggests_unlabeled_folder(tmp_path):
    folder = _make(tmp_path)
    (folder / "labelsTr" / "synthetic_lab001.nii.gz").unlink()
    line = _one(verify_dataset_integrity(folder, 1), "synthetic_lab001", "no label")
    assert line.startswith(str(folder / "imagesTr" / "synthetic_lab001_0000.nii.gz"))
    assert "imagesTrUnlabeled" in line


def test_label_without_image_and_bad_names(tmp_path):
    folder = _make(tmp_path)
    shutil.copy(folder / "labelsTr" / "synthetic_lab000.nii.gz", folder / "labelsTr" / "orphan.nii.gz")
    shutil.copy(folder / "imagesTr" / "synthetic_lab000_0000.nii.gz", folder / "imagesTr" / "nochannel.nii.gz")
    (folder / "imagesTr" / "notes.txt").write_text("x")
    lines = verify_dataset_integrity(folder, 1)
    assert _one(lines, "orphan.nii.gz").endswith("label without images (no orphan_0000.nii.gz in imagesTr)")
    _one(lines, "nochannel.nii.gz", "_XXXX")
    _one(lines, "notes.txt", "file ending")


def test_unlabeled_case_clashes_with_labeled(tmp_path):
    folder = _make(tmp_path)
    shutil.copy(folder / "imagesTr" / "synthetic_lab000_0000.nii.gz",
                folder / "imagesTrUnlabeled" / "synthetic_lab000_0000.nii.gz")
    dj = _dj(folder)
    dj.pop("numUnlabeled")
    _write_dj(folder, dj)
    _one(verify_dataset_integrity(folder, 1), "imagesTrUnlabeled", "synthetic_lab000", "also a labelled case")


def test_shape_mismatch(tmp_path):
    folder = _make(tmp_path)
    lab = folder / "labelsTr" / "synthetic_lab002.nii.gz"
    _rewrite(lab, lambda im: im[:, :, :-1])
    line = _one(verify_dataset_integrity(folder, 1), "shape")
    assert line.startswith(str(lab)) and "synthetic_lab002_0000.nii.gz" in line


def test_spacing_mismatch(tmp_path):
    folder = _make(tmp_path)
    lab = folder / "labelsTr" / "synthetic_lab000.nii.gz"

    def respace(im):
        im.SetSpacing((1.0, 1.0, 2.5))
        return im
    _rewrite(lab, respace)
    line = _one(verify_dataset_integrity(folder, 1), "spacing")
    assert line.startswith(str(lab)) and "2.5" in line


def test_origin_and_direction_mismatch_are_warnings(tmp_path):
    folder = _make(tmp_path)
    lab0 = folder / "labelsTr" / "synthetic_lab000.nii.gz"
    lab1 = folder / "labelsTr" / "synthetic_lab001.nii.gz"

    def move(im):
        im.SetOrigin((0.0, 0.0, 0.0))
        return im

    def flip(im):
        im.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return im
    _rewrite(lab0, move)
    _rewrite(lab1, flip)
    report = integrity_report(folder, 1, progress=False)
    assert report.errors == []
    assert _one(report.warnings, "label origin").startswith(str(lab0))
    assert _one(report.warnings, "label direction").startswith(str(lab1))


def test_nan_and_inf_in_images(tmp_path):
    # SimpleITK's NIfTI reader does not return NaN, so this test uses MetaImage files
    folder = _make(tmp_path, file_ending=".mha")
    img = folder / "imagesTr" / "synthetic_lab001_0000.mha"
    unl = folder / "imagesTrUnlabeled" / "synthetic_unl000_0000.mha"

    def poison(value):
        def fn(im):
            a = sitk.GetArrayFromImage(im)
            a[1, 2, 3] = value
            out = sitk.GetImageFromArray(a)
            out.CopyInformation(im)
            return out
        return fn
    _rewrite(img, poison(np.nan))
    _rewrite(unl, poison(np.inf))
    lines = verify_dataset_integrity(folder, 2)
    assert _one(lines, "1 NaN value").startswith(str(img))
    assert _one(lines, "1 inf value").startswith(str(unl))


def test_label_values_not_in_dataset_json(tmp_path):
    folder = _make(tmp_path)
    lab = folder / "labelsTr" / "synthetic_lab001.nii.gz"

    def add_label(im):
        a = sitk.GetArrayFromImage(im)
        a[0, 0, 0] = 7
        out = sitk.GetImageFromArray(a)
        out.CopyInformation(im)
        return out
    _rewrite(lab, add_label)
    line = _one(verify_dataset_integrity(folder, 1), "label values")
    assert line.startswith(str(lab)) and "[7]" in line


def test_unreadable_files(tmp_path):
    folder = _make(tmp_path)
    bad_lab = folder / "labelsTr" / "synthetic_lab000.nii.gz"
    bad_unl = folder / "imagesTrUnlabeled" / "synthetic_unl001_0000.nii.gz"
    bad_lab.write_bytes(b"not an image")
    bad_unl.write_bytes(b"")
    lines = verify_dataset_integrity(folder, 2)
    assert _one(lines, "cannot be read", "labelsTr").startswith(str(bad_lab))
    assert _one(lines, "cannot be read", "imagesTrUnlabeled").startswith(str(bad_unl))


def test_num_training_and_num_unlabeled_mismatch(tmp_path):
    folder = _make(tmp_path)
    dj = _dj(folder)
    dj["numTraining"] = 5
    dj["numUnlabeled"] = 9
    _write_dj(folder, dj)
    lines = verify_dataset_integrity(folder, 1)
    assert "numTraining is 5 but 3" in _one(lines, "numTraining")
    assert "numUnlabeled is 9 but 2" in _one(lines, "numUnlabeled")


def test_unlabeled_missing_channel(tmp_path):
    folder = _make(tmp_path)
    dj = _dj(folder)
    dj["channel_names"] = {"0": "T1", "1": "T2"}
    _write_dj(folder, dj)
    for f in (folder / "imagesTr").glob("*_0000.nii.gz"):
        shutil.copy(f, str(f).replace("_0000", "_0001"))
    f = sorted((folder / "imagesTrUnlabeled").glob("*_0000.nii.gz"))[0]
    shutil.copy(f, str(f).replace("_0000", "_0001"))
    line = _one(verify_dataset_integrity(folder, 1), "channel 1", "missing")
    assert "imagesTrUnlabeled" in line and "synthetic_unl001_0001.nii.gz" in line


def test_many_problems_are_all_reported(tmp_path):
    folder = _make(tmp_path, n_labeled=4)
    (folder / "labelsTr" / "synthetic_lab003.nii.gz").unlink()
    (folder / "labelsTr" / "synthetic_lab000.nii.gz").write_bytes(b"junk")
    _rewrite(folder / "labelsTr" / "synthetic_lab001.nii.gz", lambda im: im[:-1, :, :])
    lines = verify_dataset_integrity(folder, 2)
    assert len(lines) == 3, lines
    assert {ln.split(":")[0].rsplit("/", 1)[-1] for ln in lines} == {
        "synthetic_lab003_0000.nii.gz", "synthetic_lab000.nii.gz", "synthetic_lab001.nii.gz"}


def test_png_dataset_checked(tmp_path):
    folder = _make(tmp_path, two_d=True, shape=(12, 10))
    assert verify_dataset_integrity(folder, 1) == []
    from PIL import Image
    lab = folder / "labelsTr" / "synthetic_lab000.png"
    Image.fromarray(np.zeros((12, 11), np.uint8)).save(lab)
    assert _one(verify_dataset_integrity(folder, 1), "shape").startswith(str(lab))


def test_explicit_dataset_listing_missing_file(tmp_path):
    folder = _make(tmp_path)
    dj = _dj(folder)
    dj["dataset"] = {"caseA": {"images": ["imagesTr/synthetic_lab000_0000.nii.gz"],
                               "label": "labelsTr/does_not_exist.nii.gz"}}
    dj["numTraining"] = 1
    _write_dj(folder, dj)
    line = _one(verify_dataset_integrity(folder, 1), "does_not_exist.nii.gz")
    assert "caseA" in line and "does not exist" in line


@pytest.mark.realdata
def test_hippocampus_subset_is_clean(tmp_path):
    data = Path(__file__).parents[1].parent / "shared" / "data" / "Task04_Hippocampus"
    if not data.is_dir():
        pytest.skip(f"real data not found at {data}")
    folder = tmp_path / "Dataset004_Hippocampus"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    cases = sorted(p.name for p in (data / "labelsTr").glob("hippocampus_*.nii.gz"))[:10]
    for c in cases:
        shutil.copy(data / "imagesTr" / c, folder / "imagesTr" / c.replace(".nii.gz", "_0000.nii.gz"))
        shutil.copy(data / "labelsTr" / c, folder / "labelsTr" / c)
    _write_dj(folder, {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                       "numTraining": len(cases), "file_ending": ".nii.gz"})
    report = integrity_report(folder, 2, progress=False)
    assert report.errors == [], report.errors
