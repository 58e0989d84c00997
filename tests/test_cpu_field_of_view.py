"""CPU plans of large 3D images keep a field of view (documentation/planning.md, "Field of view"):
3d_fullres coarsens its spacing (at most 2x, never the thick-slice axis of anisotropic data)
until the patch spans half the median image on every axis, and 3d_lowres must span half of every
axis besides nnU-Net's 25% of the voxels. Planned from synthetic fingerprints with Left Atrium's
spacing and sizes (fingerprint extraction on 576^2 images would be far too slow for a test)."""
from __future__ import annotations

import numpy as np
import pytest

from autossl.planning import CPUPlanner, ExperimentPlanner
from autossl.planning.cpu_planner import axis_coverage, coarser_spacing
from autossl.utilities.file_io import save_json


@pytest.fixture
def env(tmp_path, monkeypatch):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    raw.mkdir()
    pre.mkdir()
    monkeypatch.setenv("autossl_raw", str(raw))
    monkeypatch.setenv("autossl_preprocessed", str(pre))
    monkeypatch.setenv("autossl_results", str(tmp_path / "res"))
    return raw, pre


def fake_dataset(raw, pre, spacings, shapes, name: str) -> str:
    """dataset.json and dataset_fingerprint.json only: the planners read nothing else."""
    (raw / name).mkdir(parents=True)
    (pre / name).mkdir(parents=True)
    save_json({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "left_atrium": 1},
               "numTraining": len(spacings), "file_ending": ".nii.gz"}, raw / name / "dataset.json")
    save_json({"spacings": spacings, "shapes_after_crop": shapes,
               "foreground_intensity_properties_per_channel": {"0": {
                   "mean": 0.0, "std": 1.0, "median": 0.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
                   "percentile_99_5": 1.0}},
               "median_relative_size_after_cropping": 1.0, "n_labeled": len(spacings), "n_unlabeled": 0},
              pre / name / "dataset_fingerprint.json")
    return name


def la_full(raw, pre):
    """The challenge's images: 0.625 mm isotropic, 88 x 576 x 576 (a quarter 88 x 640 x 640)."""
    n = 100
    return fake_dataset(raw, pre, [[0.625] * 3] * n, [[88, 640, 640] if i % 4 == 0 else [88, 576, 576]
                                                       for i in range(n)], "Dataset101_LA")


def la_cropped(raw, pre):
    """UA-MT's h5 cases: cropped around the atrium, 88 x ~110-150 x ~110-150 at 0.625 mm."""
    rng = np.random.default_rng(0)
    shapes = [[88, int(rng.integers(110, 150)), int(rng.integers(110, 150))] for _ in range(100)]
    return fake_dataset(raw, pre, [[0.625] * 3] * 100, shapes, "Dataset102_LAcrop")


def fov_mm(cfg) -> np.ndarray:
    return np.asarray(cfg["patch_size"], float) * np.asarray(cfg["spacing"], float)


def image_mm(cfg) -> np.ndarray:
    return np.asarray(cfg["median_image_size_in_voxels"], float) * np.asarray(cfg["spacing"], float)


def test_cropped_left_atrium_fullres_sees_half_the_image(env):
    raw, pre = env
    plans = CPUPlanner(la_cropped(raw, pre)).plan_experiment()
    f = plans["configurations"]["3d_fullres"]
    # before the rule: 0.625 mm, patch 28 x 40 x 40 = 17.5 x 25 x 25 mm of a 55 x 82 x 83 mm image
    assert np.all(fov_mm(f) >= 0.5 * image_mm(f) - 1e-6), (fov_mm(f), image_mm(f))
    assert np.all(fov_mm(f) > [25, 35, 35])
    assert all(0.625 < s <= 1.25 for s in f["spacing"])
    # the image in mm is the data's (only the voxel grid is coarser); the budget is unchanged
    np.testing.assert_allclose(image_mm(f), [55, 81.6, 83.1], rtol=0.02)
    assert f["batch_size"] == 2 and np.prod(f["patch_size"]) <= 50_000
    # 2D plans are not touched by the 3D rule
    assert plans["configurations"]["2d"]["spacing"] == [0.625, 0.625]


def test_full_left_atrium_gets_a_lowres_that_sees_the_organ(env):
    raw, pre = env
    plans = CPUPlanner(la_full(raw, pre)).plan_experiment()
    cfgs = plans["configurations"]
    f, lo = cfgs["3d_fullres"], cfgs["3d_lowres"]
    # the fullres spacing stops at twice the data's: 10 x 64 x 64 voxels -> 12.5 x 80 x 80 mm
    assert f["spacing"] == pytest.approx([1.25, 1.25, 1.25])
    assert np.all(fov_mm(f) > 2 * np.array([6.2, 40, 40]) - 1e-6)  # the patch at 0.625 mm: 6.2 x 40 x 40 mm
    # 3d_lowres is really lower and covers >= half of every axis (structure ~50 mm: ~14 voxels across)
    assert all(a > b for a, b in zip(lo["spacing"], f["spacing"]))
    assert np.all(fov_mm(lo) >= 0.5 * image_mm(lo) - 1e-6), (fov_mm(lo), image_mm(lo))
    assert np.all(fov_mm(lo) >= 35)
    # nnU-Net's 25% (of the unrounded median shape; the rounded one in the plan gives 24.6%)
    assert np.prod(lo["patch_size"]) / np.prod(lo["median_image_size_in_voxels"]) >= 0.24
    assert cfgs["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert lo["batch_size"] == f["batch_size"] == 2


def test_default_plans_keep_nnunets_rules(env):
    raw, pre = env
    cfgs = ExperimentPlanner(la_full(raw, pre)).plan_experiment()["configurations"]
    assert cfgs["3d_fullres"]["spacing"] == [0.625] * 3 and cfgs["3d_fullres"]["patch_size"] == [32, 256, 256]
    assert cfgs["3d_lowres"]["patch_size"] == [32, 256, 256]
    assert cfgs["3d_lowres"]["spacing"] == pytest.approx([0.974] * 3, abs=1e-3)  # 25% of the voxels only


def test_anisotropic_slice_axis_keeps_its_spacing(env):
    """Prostate-like (2.2 mm slices, 0.61 mm in-plane): only the in-plane axes coarsen in 3d_fullres."""
    raw, pre = env
    name = fake_dataset(raw, pre, [[2.2, 0.61, 0.61]] * 40, [[39, 327, 327]] * 40, "Dataset103_Aniso")
    cfgs = CPUPlanner(name).plan_experiment()["configurations"]
    f = cfgs["3d_fullres"]
    assert f["spacing"][0] == pytest.approx(2.2)
    assert f["spacing"][1] == f["spacing"][2] == pytest.approx(1.22)
    lo = cfgs["3d_lowres"]
    assert all(a > b for a, b in zip(lo["spacing"], f["spacing"]))
    assert np.all(fov_mm(lo) >= 0.5 * image_mm(lo) - 1e-6)


def test_small_images_are_untouched(env):
    """A Hippocampus-sized image (36 x 50 x 35 at 1 mm): the patch already covers it."""
    raw, pre = env
    name = fake_dataset(raw, pre, [[1.0, 1.0, 1.0]] * 20, [[36, 50, 35]] * 20, "Dataset104_Small")
    cfgs = CPUPlanner(name).plan_experiment()["configurations"]
    f = cfgs["3d_fullres"]
    assert f["spacing"] == [1.0, 1.0, 1.0] and f["patch_size"] == [32, 40, 32] and f["batch_size"] == 2
    assert set(cfgs) == {"2d", "3d_fullres"}


def test_helpers():
    np.testing.assert_allclose(axis_coverage([10, 64, 64], [88, 32, 128]), [10 / 88, 1.0, 0.5])
    limit = np.array([2.0, 2.0, 5.0])
    s = coarser_spacing(np.array([1.0, 1.0, 5.0]), limit)  # finer axes first (nnU-Net's lowres step)
    np.testing.assert_allclose(s, [1.03, 1.03, 5.0])
    s = coarser_spacing(np.array([1.99, 2.0, 3.0]), limit)
    np.testing.assert_allclose(s, [2.0, 2.0, 3.09])
    assert coarser_spacing(limit.copy(), limit) is None
