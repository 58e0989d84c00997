"""Paths, image I/O round trips, raw dataset listing with imagesTrUnlabeled, atomic writes, storage."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autossl import paths
from autossl.imageio.natural_image_io import NaturalImage2DIO
from autossl.imageio.nibabel_io import NibabelIO
from autossl.imageio.registry import reader_writer_class
from autossl.imageio.simpleitk_io import SimpleITKIO
from autossl.preprocessing import storage
from autossl.raw.dataset import DatasetError, RawDataset
from autossl.utilities.file_io import atomic_path, load_json, save_json
from autossl.utilities.label_handling import LabelManager
from autossl.utilities.synthetic import make_synthetic_dataset


def test_paths_prefer_autossl_then_nnunet(monkeypatch, tmp_path):
    for v in ("autossl_raw", "nnUNet_raw"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(paths.PathNotConfiguredError, match="autossl_raw.*nnUNet_raw"):
        paths.raw_dir()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nn"))
    assert paths.raw_dir() == tmp_path / "nn"
    monkeypatch.setenv("autossl_raw", str(tmp_path / "ours"))
    assert paths.raw_dir() == tmp_path / "ours"


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_simpleitk_round_trip_keeps_geometry(tmp_path, ending):
    arr = np.random.default_rng(0).integers(0, 3, (5, 6, 7)).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((1.0, -2.0, 3.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    src = tmp_path / f"a{ending}"
    sitk.WriteImage(img, str(src))
    rw = SimpleITKIO()
    seg, props = rw.read_seg(str(src))
    assert seg.shape == (1, 5, 6, 7)
    assert props["spacing"] == pytest.approx([2.5, 0.8, 0.7])
    out = tmp_path / f"b{ending}"
    rw.write_seg(seg[0], str(out), props)
    back = sitk.ReadImage(str(out))
    assert back.GetSpacing() == pytest.approx(img.GetSpacing())
    assert back.GetOrigin() == pytest.approx(img.GetOrigin())
    assert back.GetDirection() == pytest.approx(img.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_nibabel_matches_simpleitk_orientation(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "x.nii.gz"))
    a1, p1 = SimpleITKIO().read_images([str(tmp_path / "x.nii.gz")])
    a2, p2 = NibabelIO().read_images([str(tmp_path / "x.nii.gz")])
    assert p1["spacing"] == pytest.approx(p2["spacing"])
    np.testing.assert_array_equal(a1, a2)


def test_png_rgb_becomes_channels(tmp_path):
    from PIL import Image

    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 1] = 7
    Image.fromarray(rgb).save(tmp_path / "c_0000.png")
    data, props = NaturalImage2DIO().read_images([str(tmp_path / "c_0000.png")])
    assert data.shape == (3, 1, 8, 9)
    assert props["spacing"] == [999.0, 1.0, 1.0]
    assert data[1].max() == 7 and data[0].max() == 0


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken_0000.nii.gz"):
        SimpleITKIO().read_images([str(bad)])


def test_registry_refuses_jpeg_and_unknown():
    assert reader_writer_class(".nii.gz") is SimpleITKIO
    assert reader_writer_class(".png") is NaturalImage2DIO
    assert reader_writer_class(".nii.gz", "NibabelIO") is NibabelIO
    with pytest.raises(ValueError, match="lossy"):
        reader_writer_class(".jpg")
    with pytest.raises(ValueError, match="no reader"):
        reader_writer_class(".xyz")


def test_raw_dataset_lists_labelled_unlabelled_and_test(tmp_path):
    folder = make_synthetic_dataset(tmp_path, n_labeled=3, n_unlabeled=4, n_test=2)
    ds = RawDataset(folder)
    assert len(ds.labeled) == 3 and len(ds.unlabeled) == 4 and len(ds.test) == 2
    assert all("label" not in v for v in ds.unlabeled.values())
    assert all(os.path.isfile(v["label"]) for v in ds.labeled.values())


def test_case_without_label_suggests_imagesTrUnlabeled(tmp_path):
    folder = make_synthetic_dataset(tmp_path, n_labeled=3, n_unlabeled=1, n_test=0)
    victim = sorted((folder / "labelsTr").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetError, match="imagesTrUnlabeled"):
        RawDataset(folder)


def test_case_in_both_labelled_and_unlabelled_is_an_error(tmp_path):
    folder = make_synthetic_dataset(tmp_path, n_labeled=2, n_unlabeled=1, n_test=0)
    img = sorted((folder / "imagesTr").iterdir())[0]
    shutil.copy(img, folder / "imagesTrUnlabeled" / img.name)
    with pytest.raises(DatasetError, match="also a labelled case"):
        RawDataset(folder)


def test_bad_dataset_json_lists_each_problem(tmp_path):
    folder = make_synthetic_dataset(tmp_path, n_labeled=1, n_unlabeled=0, n_test=0)
    dj = load_json(folder / "dataset.json")
    del dj["file_ending"]
    dj["modality"] = dj.pop("channel_names")
    save_json(dj, folder / "dataset.json")
    with pytest.raises(DatasetError) as e:
        RawDataset(folder)
    msg = str(e.value)
    assert "file_ending" in msg and "'modality'" in msg and "dataset.json" in msg


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_storage_round_trip_labelled_and_unlabelled(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 10, 12, 14)).astype(np.float32)
    seg = rng.integers(-1, 3, (1, 10, 12, 14)).astype(np.int16)
    lab_dir = tmp_path / "autosslPlans_3d_fullres"
    storage.save_case(lab_dir, "a", data, seg, {"spacing": [1, 1, 1]}, patch_size=(8, 8, 8))
    storage.save_case(storage.unlabeled_folder(lab_dir), "u", data, None, {"class_locations": {}})
    d, s, p = storage.load_case(lab_dir, "a")
    np.testing.assert_array_equal(d[:], data)
    np.testing.assert_array_equal(s[:], seg)
    d2, s2, p2 = storage.load_case(storage.unlabeled_folder(lab_dir), "u", mmap=False)
    assert s2 is None and p2["class_locations"] == {}
    assert storage.list_cases(lab_dir) == ["a"]
    assert storage.case_is_complete(lab_dir, "a") and not storage.case_is_complete(lab_dir, "b")


def test_label_manager_regions_and_ignore():
    lm = LabelManager({"background": 0, "a": 1, "b": 2, "ignore": 3})
    assert lm.num_segmentation_heads == 3 and lm.ignore_label == 3 and lm.foreground_labels == [1, 2]
    rm = LabelManager({"background": 0, "whole": [1, 2], "core": [2]}, regions_class_order=[1, 2])
    assert rm.has_regions and rm.num_segmentation_heads == 2
    probs = np.zeros((2, 3))
    probs[0, 1:] = 0.9
    probs[1, 2] = 0.9
    np.testing.assert_array_equal(rm.probabilities_to_segmentation(probs), [0, 1, 2])


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from autossl.utilities import file_io

    save_json({"a": 1}, tmp_path / "x.json")
    mode = (tmp_path / "x.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~file_io._UMASK


def test_varied_synthetic_cases_vary_in_count_and_contrast_and_are_seeded():
    """The demo's dataset: one or two two-part structures, unlabelled distractors, varied contrast."""
    from scipy import ndimage

    from autossl.utilities.synthetic import _varied_case

    rng = np.random.default_rng(3)
    counts, contrasts = set(), []
    for _ in range(12):
        img, seg = _varied_case(rng, (20, 24, 24), False)
        assert set(np.unique(seg)) <= {0, 1, 2} and (seg == 1).any() and (seg == 2).any()
        counts.add(ndimage.label(seg > 0)[1])
        contrasts.append(img[seg == 2].mean() - img[seg == 0].mean())
    assert {1, 2} <= counts  # one or two structures per case
    assert max(contrasts) > 1.4 * min(contrasts)  # faint and strong cases
    a = _varied_case(np.random.default_rng(5), (12, 16, 16), False)
    b = _varied_case(np.random.default_rng(5), (12, 16, 16), False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
