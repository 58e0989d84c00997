"""Evaluation metrics (overlap and surface distances), summary.json, regions, ignore label,
connected-component postprocessing."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist

from autossl.evaluation.evaluate import (compute_metrics_on_folder, compute_metrics_on_folder_simple,
                                         key_to_label_or_region, label_or_region_to_key)
from autossl.evaluation.metrics import compute_label_metrics, hd95_and_asd, surface_mask
from autossl.imageio.simpleitk_io import SimpleITKIO
from autossl.postprocessing.remove_connected_components import (apply_postprocessing_to_folder,
                                                                determine_postprocessing,
                                                                load_postprocessing,
                                                                remove_all_but_largest_component_from_segmentation)

SPACING = (2.0, 0.7, 1.3)  # array axis order (z, y, x)


def _brute_force(ref: np.ndarray, pred: np.ndarray, spacing) -> tuple[float, float]:
    """Independent HD95/ASD: all pairwise distances between surface voxel centres."""
    def surf(m):
        s = m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1))
        return np.argwhere(s) * np.asarray(spacing, float)

    d = cdist(surf(pred), surf(ref))
    d_pr, d_rp = d.min(1), d.min(0)
    return (max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
            (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))


def _write_nii(arr: np.ndarray, path: Path, spacing=SPACING) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(path))


# ------------------------------------------------------------------------------------ overlap
def test_overlap_counts_by_hand():
    ref = np.zeros((4, 5, 6), bool)
    pred = np.zeros_like(ref)
    ref[0, 0, :4] = True          # 4 voxels
    pred[0, 0, 2:6] = True        # 4 voxels, 2 overlap
    m = compute_label_metrics(ref, pred, SPACING)
    assert (m["TP"], m["FP"], m["FN"]) == (2, 2, 2)
    assert m["TN"] == ref.size - 6
    assert m["Dice"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    assert m["IoU"] == pytest.approx(2 / 6)
    assert (m["n_pred"], m["n_ref"]) == (4, 4)


def test_empty_cases():
    e = np.zeros((5, 5, 5), bool)
    full = e.copy()
    full[1:3, 1:3, 1:3] = True
    both = compute_label_metrics(e, e, SPACING)
    assert math.isnan(both["Dice"]) and math.isnan(both["IoU"])
    assert math.isnan(both["HD95"]) and math.isnan(both["ASD"])
    only_pred = compute_label_metrics(e, full, SPACING)
    assert only_pred["Dice"] == 0 and only_pred["FP"] == 8
    assert math.isnan(only_pred["HD95"]) and math.isnan(only_pred["ASD"])
    only_ref = compute_label_metrics(full, e, SPACING)
    assert only_ref["Dice"] == 0 and math.isnan(only_ref["HD95"])


# ------------------------------------------------------------------------------------ distances
def test_single_voxels_distance_in_mm():
    a = np.zeros((10, 10, 10), bool)
    b = a.copy()
    a[2, 3, 4] = True
    b[5, 3, 4] = True   # 3 voxels along axis 0 at 2 mm
    assert hd95_and_asd(a, b, SPACING) == pytest.approx((6.0, 6.0))
    b2 = np.zeros_like(a)
    b2[2, 7, 1] = True  # (4 * 0.7, 3 * 1.3) in-plane
    d = math.hypot(4 * 0.7, 3 * 1.3)
    assert hd95_and_asd(a, b2, SPACING) == pytest.approx((d, d))


@pytest.mark.parametrize("k", [1, 3])
def test_parallel_plates_offset_by_k_voxels(k):
    """Two one-voxel-thick plates k voxels apart along the 2 mm axis: every surface voxel is
    exactly k * 2 mm from the other plate."""
    a = np.zeros((12, 9, 8), bool)
    b = a.copy()
    a[3] = True
    b[3 + k] = True
    hd, asd = hd95_and_asd(a, b, SPACING)
    assert hd == pytest.approx(2.0 * k)
    assert asd == pytest.approx(2.0 * k)


def test_offset_cubes_match_brute_force():
    ref = np.zeros((20, 25, 22), bool)
    pred = ref.copy()
    ref[5:12, 6:15, 4:14] = True
    pred[7:14, 6:15, 5:15] = True     # offset by 2 and 1 voxels
    pred[0:2, 0:3, 0:3] = True        # a stray blob at the image corner (border voxels are surface)
    hd, asd = hd95_and_asd(ref, pred, SPACING)
    bf_hd, bf_asd = _brute_force(ref, pred, SPACING)
    assert hd == pytest.approx(bf_hd, rel=1e-9)
    assert asd == pytest.approx(bf_asd, rel=1e-9)
    # the stray blob raises both
    pred2 = pred.copy()
    pred2[0:2, 0:3, 0:3] = False
    hd2, asd2 = hd95_and_asd(ref, pred2, SPACING)
    assert hd2 < hd and asd2 < asd
    assert (hd2, asd2) == pytest.approx(_brute_force(ref, pred2, SPACING))


def test_hd95_is_symmetric_and_zero_for_identity():
    rng = np.random.default_rng(0)
    m = ndimage.binary_opening(rng.random((15, 16, 17)) > 0.4)
    other = np.roll(m, 2, axis=1)
    assert hd95_and_asd(m, m, SPACING) == (0.0, 0.0)
    assert hd95_and_asd(m, other, SPACING) == pytest.approx(hd95_and_asd(other, m, SPACING))
    assert hd95_and_asd(m, other, SPACING) == pytest.approx(_brute_force(m, other, SPACING))


def test_surface_of_thin_structure_is_everything():
    m = np.zeros((5, 5, 5), bool)
    m[2, 1:4, 1:4] = True
    assert np.array_equal(surface_mask(m), m)


def test_2d_image_measured_in_plane():
    """(1, x, y) arrays with spacing (999, 1, 1): distances are in-plane, not through the 999 axis."""
    a = np.zeros((1, 10, 10), bool)
    b = a.copy()
    a[0, 2:5, 2:5] = True
    b[0, 2:5, 4:7] = True
    hd, asd = hd95_and_asd(a, b, (999.0, 1.0, 1.0))
    assert (hd, asd) == pytest.approx(_brute_force(a[0], b[0], (1.0, 1.0)))
    assert hd < 5


# ------------------------------------------------------------------------------------ folders
def _two_label_case(shift: int = 0, extra_blob: bool = False) -> np.ndarray:
    seg = np.zeros((16, 18, 20), np.uint8)
    seg[4:10, 5:12, 3 + shift:9 + shift] = 1
    seg[4:10, 5:12, 9 + shift:14 + shift] = 2
    if extra_blob:
        seg[13:15, 0:2, 17:19] = 1
    return seg


def _dataset_json(labels=None, **extra) -> dict:
    return {"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "head": 1, "tail": 2},
            "numTraining": 2, "file_ending": ".nii.gz", **extra}


def test_folder_summary_keys_means_and_spacing(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    _write_nii(_two_label_case(), ref / "a.nii.gz")
    _write_nii(_two_label_case(shift=1), pred / "a.nii.gz")
    empty_ref = _two_label_case()
    empty_ref[empty_ref == 2] = 0                    # case b: no label 2 in the reference ...
    _write_nii(empty_ref, ref / "b.nii.gz")
    _write_nii(empty_ref, pred / "b.nii.gz")         # ... nor in the prediction -> Dice NaN for 2
    out = tmp_path / "summary.json"
    s = compute_metrics_on_folder(ref, pred, out, SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1,
                                  allow_tqdm=False)
    on_disk = json.loads(out.read_text())
    assert set(on_disk) >= {"metric_per_case", "mean", "foreground_mean"}
    assert set(on_disk["mean"]) == {"1", "2"}
    case_a = next(c for c in s["metric_per_case"] if c["prediction_file"].endswith("a.nii.gz"))
    assert set(case_a) == {"reference_file", "prediction_file", "metrics"}
    assert set(case_a["metrics"]["1"]) == {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref", "HD95", "ASD"}
    # the shift is one voxel along x (array axis 2, spacing 1.3 mm): HD95 in mm, not voxels
    assert case_a["metrics"]["1"]["HD95"] == pytest.approx(1.3)
    seg_a, seg_a_pred = _two_label_case() == 1, _two_label_case(shift=1) == 1
    assert case_a["metrics"]["1"]["Dice"] == pytest.approx(
        2 * np.sum(seg_a & seg_a_pred) / (seg_a.sum() + seg_a_pred.sum()))
    case_b = next(c for c in s["metric_per_case"] if c["prediction_file"].endswith("b.nii.gz"))
    assert math.isnan(case_b["metrics"]["2"]["Dice"]) and math.isnan(case_b["metrics"]["2"]["HD95"])
    assert case_b["metrics"]["1"]["Dice"] == 1.0
    # NaN cases are left out of the mean and counted
    assert s["mean"]["2"]["Dice"] == pytest.approx(case_a["metrics"]["2"]["Dice"])
    assert s["valid_cases"]["2"]["Dice"] == 1 and s["valid_cases"]["1"]["Dice"] == 2
    assert s["mean"]["1"]["Dice"] == pytest.approx((case_a["metrics"]["1"]["Dice"] + 1.0) / 2)
    assert s["foreground_mean"]["Dice"] == pytest.approx((s["mean"]["1"]["Dice"] + s["mean"]["2"]["Dice"]) / 2)


def test_folder_missing_prediction_needs_chill(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for c in ("a", "b"):
        _write_nii(_two_label_case(), ref / f"{c}.nii.gz")
    _write_nii(_two_label_case(), pred / "a.nii.gz")
    with pytest.raises(FileNotFoundError, match="have no prediction"):
        compute_metrics_on_folder(ref, pred, None, SimpleITKIO, ".nii.gz", [1, 2], num_processes=1, allow_tqdm=False)
    s = compute_metrics_on_folder(ref, pred, None, SimpleITKIO, ".nii.gz", [1, 2], num_processes=1, chill=True,
                                  allow_tqdm=False)
    assert len(s["metric_per_case"]) == 1 and s["foreground_mean"]["Dice"] == 1.0


def test_multiprocess_equals_single(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for i, c in enumerate("abc"):
        _write_nii(_two_label_case(), ref / f"{c}.nii.gz")
        _write_nii(_two_label_case(shift=i), pred / f"{c}.nii.gz")
    one = compute_metrics_on_folder(ref, pred, None, SimpleITKIO, ".nii.gz", [1, 2], num_processes=1, allow_tqdm=False)
    two = compute_metrics_on_folder(ref, pred, None, SimpleITKIO, ".nii.gz", [1, 2], num_processes=2, allow_tqdm=False)
    assert json.dumps(one["mean"]) == json.dumps(two["mean"])


def test_regions_and_ignore_label(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    r = _two_label_case()
    p = _two_label_case()
    p[p == 2] = 1                       # the prediction swaps all of label 2 to 1
    r_ign = r.copy()
    r_ign[0:2] = 3                      # an ignore band in the reference ...
    p[0:2, :, :] = 1                    # ... where the prediction says foreground
    _write_nii(r_ign, ref / "a.nii.gz")
    _write_nii(p, pred / "a.nii.gz")
    dj = _dataset_json({"background": 0, "whole": [1, 2], "tail": 2, "ignore": 3}, regions_class_order=[1, 2])
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    s = compute_metrics_on_folder_simple(ref, pred, tmp_path / "dataset.json", num_processes=1, allow_tqdm=False)
    assert set(s["mean"]) == {"(1, 2)", "2"}
    whole = s["metric_per_case"][0]["metrics"]["(1, 2)"]
    assert whole["Dice"] == 1.0 and whole["FP"] == 0        # the ignore band does not count
    assert whole["HD95"] == 0.0
    assert s["metric_per_case"][0]["metrics"]["2"]["Dice"] == 0.0
    assert (pred / "summary.json").is_file()
    assert key_to_label_or_region(label_or_region_to_key((1, 2))) == (1, 2)
    assert key_to_label_or_region(label_or_region_to_key(2)) == 2


def test_png_folder(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    a = np.zeros((20, 30), np.uint8)
    a[5:12, 4:20] = 1
    b = np.roll(a, 2, axis=1)
    Image.fromarray(a).save(ref / "x.png")
    Image.fromarray(b).save(pred / "x.png")
    dj = {"channel_names": {"0": "gray"}, "labels": {"background": 0, "fg": 1}, "file_ending": ".png"}
    s = compute_metrics_on_folder_simple(ref, pred, dj, num_processes=1, allow_tqdm=False)
    m = s["metric_per_case"][0]["metrics"]["1"]
    assert m["HD95"] == pytest.approx(_brute_force(a.astype(bool), b.astype(bool), (1.0, 1.0))[0])
    assert m["Dice"] == pytest.approx(2 * 7 * 14 / (2 * 7 * 16))


def test_evaluate_cli(tmp_path, capsys):
    from autossl.cli.evaluate import main

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    _write_nii(_two_label_case(), ref / "a.nii.gz")
    _write_nii(_two_label_case(), pred / "a.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(_dataset_json()))
    out = tmp_path / "s.json"
    assert main([str(ref), str(pred), "-djfile", str(tmp_path / "dataset.json"), "-o", str(out), "-np", "1"]) == 0
    assert json.loads(out.read_text())["foreground_mean"]["Dice"] == 1.0
    assert main([str(ref), str(tmp_path / "nope"), "-djfile", str(tmp_path / "dataset.json")]) == 1
    assert "nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ postprocessing
def test_remove_all_but_largest_component():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[1:5, 1:5, 1:5] = 1
    seg[1:5, 1:5, 5:7] = 2            # touches label 1: one foreground component
    seg[8, 8, 8] = 1                  # stray voxel
    all_fg = remove_all_but_largest_component_from_segmentation(seg, [1, 2])
    assert all_fg[8, 8, 8] == 0 and np.array_equal(all_fg[:7], seg[:7])
    only2 = remove_all_but_largest_component_from_segmentation(seg, 2)
    assert np.array_equal(only2, seg)
    diag = np.zeros((4, 4, 4), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 1] = 1  # corner-connected: one component (full connectivity)
    assert np.array_equal(remove_all_but_largest_component_from_segmentation(diag, 1), diag)


def _pp_folders(tmp_path, stray: bool, two_ref_components: bool):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for i in range(3):
        r = _two_label_case()
        if two_ref_components:
            r[13:16, 14:18, 15:19] = 1      # a real second component of label 1
        p = r.copy()
        if stray:
            p[0:2, 0:2, 17:20] = 1          # false positive blob, far away
        p[4:6, 5:7, 3:5] = 0 if i == 0 else p[4:6, 5:7, 3:5]  # small miss in one case
        _write_nii(r, ref / f"c{i}.nii.gz")
        _write_nii(p, pred / f"c{i}.nii.gz")
    (pred / "dataset.json").write_text(json.dumps(_dataset_json()))
    return ref, pred


def test_postprocessing_kept_when_it_helps(tmp_path):
    ref, pred = _pp_folders(tmp_path, stray=True, two_ref_components=False)
    result = determine_postprocessing(pred, ref, pred / "dataset.json", num_processes=1, allow_tqdm=False)
    assert result["postprocessing_fns"][0] == "remove_all_but_largest_component_from_segmentation"
    assert result["postprocessing_kwargs"][0]["labels_or_regions"] == [1, 2]
    assert result["dice_after"] > result["dice_before"]
    assert (pred / "postprocessing.pkl").is_file() and (pred / "summary.json").is_file()
    fns, kwargs = load_postprocessing(pred / "postprocessing.json")
    out = tmp_path / "pp"
    apply_postprocessing_to_folder(pred, out, (fns, kwargs), num_processes=1, allow_tqdm=False)
    s = compute_metrics_on_folder(ref, out, None, SimpleITKIO, ".nii.gz", [1, 2], num_processes=1, allow_tqdm=False)
    assert s["foreground_mean"]["Dice"] == pytest.approx(result["dice_after"])
    assert (out / "dataset.json").is_file()


def test_postprocessing_not_kept_when_it_hurts(tmp_path):
    ref, pred = _pp_folders(tmp_path, stray=False, two_ref_components=True)
    result = determine_postprocessing(pred, ref, pred / "dataset.json", num_processes=1, allow_tqdm=False)
    assert result["postprocessing_fns"] == []
    assert result["dice_after"] == result["dice_before"]
    assert not (pred / "postprocessed").exists()


def test_postprocessing_clis(tmp_path, capsys):
    from autossl.cli.postprocessing import apply_main, determine_main

    ref, pred = _pp_folders(tmp_path, stray=True, two_ref_components=False)
    out = tmp_path / "decision"
    assert determine_main(["-i", str(pred), "-ref", str(ref), "-o", str(out), "-np", "1"]) == 0
    assert json.loads((out / "postprocessing.json").read_text())["postprocessing_kwargs"][0]["labels_or_regions"] == [1, 2]
    assert apply_main(["-i", str(pred), "-o", str(tmp_path / "applied"), "-pp_file", str(out / "postprocessing.json"),
                       "-np", "1"]) == 0
    assert len(list((tmp_path / "applied").glob("*.nii.gz"))) == 3
    assert determine_main(["-i", str(pred), "-np", "1"]) == 1
    assert "-ref" in capsys.readouterr().err
