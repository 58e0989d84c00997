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


def test_origin_and_direction_mismatch_are_errors_unless_allowed(tmp_path):
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
    assert report.warnings == []
    moved = _one(report.errors, "label origin")
    assert moved.startswith(str(lab0)) and "shifted" in moved and "[-3.0, 7.0, -11.0] mm" in moved
    flipped = _one(report.errors, "label direction")
    assert flipped.startswith(str(lab1)) and "mirrored along the x axis" in flipped
    assert "wrong side" in flipped and "--allow_geometry_mismatch" in flipped
    assert len(report.errors) == 2, report.errors
    allowed = integrity_report(folder, 1, progress=False, allow_geometry_mismatch=True)
    assert allowed.errors == []
    assert sorted(allowed.warnings) == sorted(report.errors)


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


# ----------------------------------------------------------------------------------------------
# what SimpleITK hides: NaN/inf in NIfTI files, truncated or corrupt .nii.gz; through the CLI
# ----------------------------------------------------------------------------------------------
def _cli_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("autossl_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("autossl_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("autossl_results", str(tmp_path / "res"))


def _cli(main, argv, capsys) -> tuple[int, str]:
    """Run a CLI main function; (exit status, stdout + stderr)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def _write_nibabel(path: Path, fn=None, affine_fn=None) -> None:
    """Rewrite a NIfTI file the way a nibabel user does: array and affine into Nifti1Image, save."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj).astype(np.float32 if "labelsTr" not in str(path) else np.uint8)
    affine = img.affine.copy()
    if fn is not None:
        fn(arr)
    if affine_fn is not None:
        affine_fn(affine)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def _write_simpleitk(path: Path, fn) -> None:
    """Rewrite a NIfTI file the way a SimpleITK user does: GetArrayFromImage, change, write."""
    im = sitk.ReadImage(str(path))
    a = sitk.GetArrayFromImage(im).astype(np.float32)
    fn(a)
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(im)
    sitk.WriteImage(out, str(path), True)


def _truncate(path: Path, fraction: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_nan_and_inf_in_nifti_files_are_found_from_their_bytes(tmp_path, monkeypatch, capsys):
    from autossl.cli.plan_and_preprocess import main

    folder = _make(tmp_path)
    img = folder / "imagesTr" / "synthetic_lab001_0000.nii.gz"       # nibabel user: NaN
    unl = folder / "imagesTrUnlabeled" / "synthetic_unl000_0000.nii.gz"  # SimpleITK user: inf

    def nan(a):
        a[3, 4, 2] = np.nan

    def inf(a):
        a[1, 2, 3] = np.inf
        a[2, 2, 3] = -np.inf
    _write_nibabel(img, nan)
    _write_simpleitk(unl, inf)
    # the premise: SimpleITK's NIfTI reader returns neither of them
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(img)))).all()
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(unl)))).all()

    lines = verify_dataset_integrity(folder, 2)
    assert len(lines) == 2, lines
    nan_line = _one(lines, "1 NaN value")
    assert nan_line.startswith(str(img)) and "(3, 4, 2)" in nan_line and "as 0" in nan_line
    assert _one(lines, "2 inf value").startswith(str(unl))

    _cli_env(monkeypatch, tmp_path)
    code, out = _cli(main, ["-d", "999", "-np", "1", "--verify_dataset_integrity"], capsys)
    assert code == 1
    assert f"{img}: image contains 1 NaN value(s)" in out and f"{unl}: image contains 2 inf value(s)" in out
    assert "Traceback" not in out and not (tmp_path / "pre" / "Dataset999_Synthetic" / "autosslPlans.json").exists()
    # without the check, preprocessing stops at the first bad case instead of training on zeros
    code, out = _cli(main, ["-d", "999", "-np", "1"], capsys)
    assert code == 1
    assert "autossl_plan_and_preprocess: error:" in out and "Traceback" not in out
    assert (f"{img}: image contains 1 NaN value(s)" in out) or (f"{unl}: image contains 2 inf value(s)" in out)


def test_nan_in_a_label_file(tmp_path):
    folder = _make(tmp_path)
    lab = folder / "labelsTr" / "synthetic_lab002.nii.gz"
    im = sitk.ReadImage(str(lab))
    a = sitk.GetArrayFromImage(im).astype(np.float32)
    a[0, 0, 0] = np.nan
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(im)
    sitk.WriteImage(out, str(lab), True)
    assert _one(verify_dataset_integrity(folder, 1), "label contains 1 NaN").startswith(str(lab))


def test_truncated_nii_gz_is_found_by_the_check_and_by_preprocessing(tmp_path, monkeypatch, capsys):
    from autossl.cli.plan_and_preprocess import main

    folder = _make(tmp_path)
    img = folder / "imagesTr" / "synthetic_lab000_0000.nii.gz"   # written by SimpleITK
    lab = folder / "labelsTr" / "synthetic_lab001.nii.gz"
    _write_nibabel(lab)                                            # written by nibabel
    _truncate(img)
    _truncate(lab)
    sitk.GetArrayFromImage(sitk.ReadImage(str(img)))  # the premise: SimpleITK reads the cut copy silently

    lines = verify_dataset_integrity(folder, 2)
    assert len(lines) == 2, lines  # one line per damaged file, nothing else read from them
    for f in (img, lab):
        line = _one(lines, str(f))
        assert line.startswith(f"{f}: the file is truncated") and "gzip stream ends" in line

    _cli_env(monkeypatch, tmp_path)
    code, out = _cli(main, ["-d", "999", "-np", "1", "--verify_dataset_integrity"], capsys)
    assert code == 1 and f"{img}: the file is truncated" in out and f"{lab}: the file is truncated" in out
    code, out = _cli(main, ["-d", "999", "-np", "2"], capsys)
    assert code == 1 and "Traceback" not in out
    assert f"{img}: the file is truncated" in out or f"{lab}: the file is truncated" in out
    assert not list((tmp_path / "pre").rglob("synthetic_lab000.b2nd"))


def test_corrupt_and_short_nifti_files(tmp_path):
    import gzip

    folder = _make(tmp_path)
    crc = folder / "imagesTr" / "synthetic_lab002_0000.nii.gz"
    data = bytearray(crc.read_bytes())
    data[-6] ^= 0xFF  # the stored CRC-32
    crc.write_bytes(bytes(data))
    short = folder / "imagesTrUnlabeled" / "synthetic_unl001_0000.nii.gz"
    raw = gzip.decompress(short.read_bytes())
    short.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a cut .nii, compressed intact
    lines = verify_dataset_integrity(folder, 1)
    assert len(lines) == 2, lines
    line = _one(lines, "the file is corrupt")
    assert line.startswith(f"{crc}: the file is corrupt") and "CRC-32 checksum does not match" in line
    line = _one(lines, "the file is truncated")
    assert line.startswith(str(short)) and "bytes of voxel data its header declares" in line


def test_read_case_checks_files_for_preprocessing_and_prediction(tmp_path):
    """``read_case`` is what preprocessing workers and ``DefaultPreprocessor.run_case`` (prediction
    of raw images) read cases with."""
    from autossl.imageio.file_check import ImageFileError
    from autossl.imageio.simpleitk_io import SimpleITKIO
    from autossl.preprocessing.preprocessor import read_case

    folder = _make(tmp_path, n_test=1)
    test_img = folder / "imagesTs" / "synthetic_test000_0000.nii.gz"
    data, seg, props = read_case(SimpleITKIO(), [test_img])
    assert seg is None and data.shape[0] == 1
    _write_nibabel(test_img, lambda a: a.__setitem__((0, 0, 0), np.inf))
    with pytest.raises(ImageFileError, match="image contains 1 inf value") as e:
        read_case(SimpleITKIO(), [test_img])
    assert str(e.value).startswith(str(test_img))
    mha = _make(tmp_path / "mha", file_ending=".mha")
    img, lab = mha / "imagesTr" / "synthetic_lab000_0000.mha", mha / "labelsTr" / "synthetic_lab000.mha"
    _rewrite(img, lambda im: sitk.Add(im, float("nan")))
    with pytest.raises(ImageFileError, match=r"image contains 720 NaN value"):
        read_case(SimpleITKIO(), [img], lab)


def test_geometry_mismatch_through_the_cli(tmp_path, monkeypatch, capsys):
    from autossl.cli.plan_and_preprocess import extract_fingerprint_main, main

    folder = _make(tmp_path)
    sitk_lab = folder / "labelsTr" / "synthetic_lab001.nii.gz"
    nib_lab = folder / "labelsTr" / "synthetic_lab002.nii.gz"

    def flip(im):
        im.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return im
    _rewrite(sitk_lab, flip)

    def flip_affine(affine):
        affine[:3, 0] *= -1
    _write_nibabel(nib_lab, affine_fn=flip_affine)
    _cli_env(monkeypatch, tmp_path)
    code, out = _cli(main, ["-d", "999", "-np", "1", "--verify_dataset_integrity"], capsys)
    assert code == 1
    for lab in (sitk_lab, nib_lab):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{lab}: label direction"))
        assert "mirrored along the x axis" in line and "wrong side" in line
    assert "2 problem(s)" in out
    code, out = _cli(extract_fingerprint_main, ["-d", "999", "-np", "1", "--verify_dataset_integrity",
                                                "--allow_geometry_mismatch"], capsys)
    assert code == 0, out
    assert out.count("warning: ") == 2 and f"warning: {sitk_lab}: label direction" in out
    assert (tmp_path / "pre" / "Dataset999_Synthetic" / "dataset_fingerprint.json").is_file()


def test_hippocampus_nifti_files_pass_the_byte_check():
    data = Path(__file__).parents[1].parent / "shared" / "data" / "Task04_Hippocampus"
    if not data.is_dir():
        pytest.skip(f"real data not found at {data}")
    from autossl.imageio.file_check import check_nifti_file

    files = sorted((data / "imagesTr").glob("hippocampus_*.nii.gz"))[:5] + \
        sorted((data / "labelsTr").glob("hippocampus_*.nii.gz"))[:5]
    assert files
    for f in files:
        assert check_nifti_file(f).ok


# ----------------------------------------------------------------------------------------------
# .pkl files (properties beside predictions and preprocessed cases, postprocessing.pkl) are
# read as plain data: nothing named in them is imported or run
# ----------------------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pkl_files_are_read_as_plain_data_only(tmp_path):
    import collections
    import pickle

    from autossl.utilities.file_io import UnsafePickleError, load_pickle, save_pickle

    props = {"spacing": [1.0, 2.0, 3.0], "sitk_stuff": {"spacing": (3.0, 2.0, 1.0), "origin": (0.0, 1.0, 2.0)},
             "nibabel_stuff": {"original_affine": np.eye(4)}, "bbox_used_for_cropping": [[0, 4], [1, 5]],
             "class_locations": {1: np.arange(8, dtype=np.int64).reshape(2, 4), (1, 2): []},
             "scalars": (np.float32(1.5), np.int64(3)), "ordered": collections.OrderedDict(a=1), "s": {1, 2}}
    save_pickle(props, tmp_path / "case.pkl")
    back = load_pickle(tmp_path / "case.pkl")
    assert back["sitk_stuff"] == props["sitk_stuff"] and back["s"] == {1, 2}
    np.testing.assert_array_equal(back["class_locations"][1], props["class_locations"][1])
    np.testing.assert_array_equal(back["nibabel_stuff"]["original_affine"], np.eye(4))
    for proto in (2, 5):
        (tmp_path / "p.pkl").write_bytes(pickle.dumps(props, protocol=proto))
        assert load_pickle(tmp_path / "p.pkl")["scalars"][0] == np.float32(1.5)

    marker = tmp_path / "was_run"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"spacing": [1, 1, 1], "x": _RunsCode(str(marker))}))
    with pytest.raises(UnsafePickleError, match="refusing to load pathlib") as e:
        load_pickle(evil)
    assert str(e.value).startswith(str(evil)) and not marker.exists()
    (tmp_path / "cut.pkl").write_bytes((tmp_path / "case.pkl").read_bytes()[:40])
    with pytest.raises(UnsafePickleError, match="not a readable pickle"):
        load_pickle(tmp_path / "cut.pkl")


def test_nnunet_postprocessing_pkl_is_read_without_importing_nnunet(tmp_path, monkeypatch):
    import pickle
    import sys
    import types

    from autossl.postprocessing.remove_connected_components import (
        load_postprocessing, remove_all_but_largest_component_from_segmentation, save_postprocessing)

    # what nnU-Net writes: its own function, pickled by reference to nnunetv2's module
    name = "nnunetv2.postprocessing.remove_connected_components"

    def remove_all_but_largest_component_from_segmentation_nnunet(*a, **k):
        raise AssertionError("nnU-Net's function must not be used")
    fn = remove_all_but_largest_component_from_segmentation_nnunet
    fn.__name__ = fn.__qualname__ = "remove_all_but_largest_component_from_segmentation"
    fn.__module__ = name
    with monkeypatch.context() as m:
        for mod in ("nnunetv2", "nnunetv2.postprocessing", name):
            m.setitem(sys.modules, mod, types.ModuleType(mod))
        setattr(sys.modules[name], fn.__name__, fn)
        data = pickle.dumps(([fn], [{"labels_or_regions": 1}]))
    assert "nnunetv2" not in sys.modules
    (tmp_path / "postprocessing.pkl").write_bytes(data)
    fns, kwargs = load_postprocessing(tmp_path / "postprocessing.pkl")
    assert fns == [remove_all_but_largest_component_from_segmentation] and kwargs == [{"labels_or_regions": 1}]
    assert "nnunetv2" not in sys.modules
    save_postprocessing(tmp_path / "ours", [remove_all_but_largest_component_from_segmentation],
                        [{"labels_or_regions": (1, 2)}])
    fns, kwargs = load_postprocessing(tmp_path / "ours" / "postprocessing.pkl")
    assert fns == [remove_all_but_largest_component_from_segmentation] and kwargs[0]["labels_or_regions"] == (1, 2)
