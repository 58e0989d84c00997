"""Resampling, the per-case preprocessor, the dataset run (atomic, resumable) and the plan-and-preprocess CLI."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autossl.preprocessing import storage
from autossl.preprocessing.resampling import (
    compute_new_shape, determine_do_sep_z_and_axis, resample_data_or_seg_to_shape, resample_data_or_seg_to_spacing,
)
from autossl.utilities.synthetic import make_synthetic_dataset

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------
def _nnunet_separate_z_reference(data, new_shape, order, order_z):
    """nnU-Net v2's separate-z algorithm (axis 0), written out with skimage and map_coordinates."""
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    out = []
    for c in range(data.shape[0]):
        slices = np.stack([resize(data[c, s].astype(float), new_shape[1:], order, mode="edge", anti_aliasing=False)
                           for s in range(data.shape[1])])
        rows, cols, dim = new_shape
        mr, mc, md = np.mgrid[:rows, :cols, :dim]
        coords = np.array([slices.shape[0] / rows * (mr + 0.5) - 0.5, slices.shape[1] / cols * (mc + 0.5) - 0.5,
                           slices.shape[2] / dim * (md + 0.5) - 0.5])
        out.append(map_coordinates(slices, coords, order=order_z, mode="nearest"))
    return np.stack(out)


def test_compute_new_shape_rounds_like_nnunet():
    assert compute_new_shape((10, 20, 30), (3.0, 1.0, 1.0), (1.5, 0.5, 2.0)).tolist() == [20, 40, 15]
    assert compute_new_shape((7, 7), (1.0, 1.0), (1.0, 1.0)).tolist() == [7, 7]
    with pytest.raises(ValueError):
        compute_new_shape((7, 7), (1.0,), (1.0, 1.0))


def test_unchanged_shape_returns_input_without_work():
    data = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    out = resample_data_or_seg_to_shape(data, (5, 6, 7), (1, 1, 1), (1, 1, 1))
    assert out is data
    out = resample_data_or_seg_to_spacing(data, (2.0, 1, 1), (2.0, 1, 1))
    assert out is data


def test_isotropic_resampling_matches_skimage_order3():
    from skimage.transform import resize

    data = np.random.default_rng(1).normal(size=(2, 9, 12, 10)).astype(np.float32)
    out = resample_data_or_seg_to_spacing(data, (1.0, 1.0, 1.0), (0.75, 1.5, 1.0))
    assert out.shape == (2, 12, 8, 10) and out.dtype == np.float32
    ref = np.stack([resize(data[c].astype(float), (12, 8, 10), 3, mode="edge", anti_aliasing=False)
                    for c in range(2)]).astype(np.float32)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_separate_z_decision():
    assert determine_do_sep_z_and_axis(None, (5.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (True, 0)
    assert determine_do_sep_z_and_axis(None, (1.0, 1.0, 1.0), (1.0, 1.0, 4.0)) == (True, 2)
    assert determine_do_sep_z_and_axis(None, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (False, None)
    assert determine_do_sep_z_and_axis(None, (5.0, 5.0, 1.0), (1.0, 1.0, 1.0)) == (False, None)  # two coarse axes
    assert determine_do_sep_z_and_axis(False, (5.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (False, None)


def test_separate_z_matches_nnunet_reference():
    data = np.random.default_rng(2).normal(size=(1, 6, 14, 12)).astype(np.float32)
    new_shape = compute_new_shape(data.shape[1:], (5.0, 1.0, 1.0), (2.0, 0.8, 0.8))
    out = resample_data_or_seg_to_shape(data, new_shape, (5.0, 1.0, 1.0), (2.0, 0.8, 0.8), order=3, order_z=0)
    assert out.shape == (1, *new_shape)
    ref = _nnunet_separate_z_reference(data, new_shape, 3, 0).astype(np.float32)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # order_z = 1 goes through map_coordinates along z and must agree as well
    out1 = resample_data_or_seg_to_shape(data, new_shape, (5.0, 1.0, 1.0), (2.0, 0.8, 0.8), order=3, order_z=1)
    np.testing.assert_allclose(out1, _nnunet_separate_z_reference(data, new_shape, 3, 1), atol=1e-5)


def test_separate_z_on_last_axis_equals_moved_axis():
    data = np.random.default_rng(3).normal(size=(1, 14, 12, 6)).astype(np.float32)
    out = resample_data_or_seg_to_spacing(data, (1.0, 1.0, 5.0), (0.8, 0.8, 2.0))
    moved = resample_data_or_seg_to_spacing(np.moveaxis(data, 3, 1), (5.0, 1.0, 1.0), (2.0, 0.8, 0.8))
    np.testing.assert_allclose(out, np.moveaxis(moved, 1, 3), atol=1e-6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (4.0, 1.0, 1.0)])
def test_segmentation_values_preserved(spacing):
    seg = np.zeros((1, 10, 16, 16), np.int16)
    seg[0, 2:8, 3:12, 4:10] = 1
    seg[0, 4:6, 6:9, 5:8] = 2
    seg[0, 0, 0, 0] = -1
    out = resample_data_or_seg_to_spacing(seg, spacing, (spacing[0] / 1.7, 0.6, 0.6), is_seg=True, order=1)
    assert out.dtype == np.int16
    assert set(np.unique(out).tolist()) <= {-1, 0, 1, 2}
    assert {1, 2} <= set(np.unique(out).tolist())
    # volumes scale with the voxel size
    scale = np.prod(np.array(out.shape[1:]) / np.array(seg.shape[1:]))
    assert abs((out == 1).sum() / scale - (seg == 1).sum()) / (seg == 1).sum() < 0.25


# ----------------------------------------------------------------------------------------------
# the preprocessing pipeline on a synthetic dataset
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("raw", "pre", "res")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("autossl_raw", str(dirs["raw"]))
    monkeypatch.setenv("autossl_preprocessed", str(dirs["pre"]))
    monkeypatch.setenv("autossl_results", str(dirs["res"]))
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(v, raising=False)
    return dirs


def _plan(dataset_id: int) -> dict:
    from autossl.fingerprint.extractor import extract_fingerprint
    from autossl.planning.default_planner import ExperimentPlanner

    extract_fingerprint(dataset_id, num_processes=1)
    return ExperimentPlanner(dataset_id).plan_experiment()


@pytest.fixture(scope="module")
def _planned_once(tmp_path_factory):
    """Fingerprint and plan once per module (the nnU-Net sampling rule makes tiny datasets slow)."""
    base = tmp_path_factory.mktemp("planned")
    with pytest.MonkeyPatch.context() as mp:
        for k in ("raw", "pre"):
            (base / k).mkdir()
        mp.setenv("autossl_raw", str(base / "raw"))
        mp.setenv("autossl_preprocessed", str(base / "pre"))
        mp.delenv("nnUNet_raw", raising=False)
        mp.delenv("nnUNet_preprocessed", raising=False)
        make_synthetic_dataset(base / "raw", 991, "Pp", n_labeled=3, n_unlabeled=2, n_test=1,
                               shape=(14, 18, 16), spacing=(2.0, 1.0, 1.0), seed=3)
        plans = _plan(991)
    return base, plans


@pytest.fixture
def planned(env, _planned_once):
    """A tiny anisotropic synthetic dataset (2 x 1 x 1 mm), fingerprinted and planned (a fresh copy)."""
    base, plans = _planned_once
    shutil.copytree(base / "raw" / "Dataset991_Pp", env["raw"] / "Dataset991_Pp")
    shutil.copytree(base / "pre" / "Dataset991_Pp", env["pre"] / "Dataset991_Pp")
    return env["raw"] / "Dataset991_Pp", plans


def test_run_case_labelled_and_unlabelled(planned, env):
    from autossl.planning.plans_handler import PlansManager
    from autossl.preprocessing.preprocessor import DefaultPreprocessor
    from autossl.raw.dataset import RawDataset

    folder, plans = planned
    raw = RawDataset(folder)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    pp = DefaultPreprocessor()
    case, d = sorted(raw.labeled.items())[0]
    data, seg, props = pp.run_case(d["images"], d["label"], pm, cm, raw.dataset_json)
    target = [props["spacing"][i] for i in pm.transpose_forward]
    expected_shape = compute_new_shape(props["shape_after_cropping_and_before_resampling"],
                                       target, cm.spacing)
    assert data.shape[1:] == tuple(expected_shape) == seg.shape[1:]
    assert data.dtype == np.float32 and seg.dtype in (np.int8, np.int16)
    assert set(np.unique(seg).tolist()) <= {-1, 0, 1, 2}
    assert set(props["class_locations"]) == {1, 2}
    for c in (1, 2):
        locs = props["class_locations"][c]
        assert len(locs) > 0 and locs.shape[1] == 4
        assert np.all(seg[tuple(locs.T)] == c)
    assert props["shape_before_cropping"] == tuple(raw_shape(d["images"][0], pm.transpose_forward))
    # deterministic: same locations on a rerun
    _, _, props2 = pp.run_case(d["images"], d["label"], pm, cm, raw.dataset_json)
    np.testing.assert_array_equal(props["class_locations"][1], props2["class_locations"][1])

    ucase, ud = sorted(raw.unlabeled.items())[0]
    udata, useg, uprops = pp.run_case(ud["images"], None, pm, cm, raw.dataset_json)
    assert useg is None and uprops["class_locations"] == {}
    assert udata.ndim == 4 and np.isfinite(udata).all()


def raw_shape(image_file: str, transpose) -> tuple:
    from autossl.imageio.simpleitk_io import SimpleITKIO

    a, _ = SimpleITKIO().read_images([image_file])
    return tuple(a.shape[1:][i] for i in transpose)


def test_sample_foreground_locations_counts():
    from autossl.preprocessing.preprocessor import sample_foreground_locations

    seg = np.zeros((1, 60, 60, 60), np.int8)
    seg[0, :50, :50, :50] = 1  # 125000 voxels: 1% = 1250 < 10000 -> 10000
    seg[0, 55:, 55:, 55:] = 2  # 125 voxels -> all of them
    locs = sample_foreground_locations(seg, [1, 2, 3, (1, 2)])
    assert len(locs[1]) == 10000 and len(locs[2]) == 125 and locs[3] == []
    assert len(locs[(1, 2)]) == 10000
    big = np.ones((1, 120, 100, 100), np.int8)  # 1.2M voxels: 1% = 12000 > 10000
    assert len(sample_foreground_locations(big, [1])[1]) == 12000
    again = sample_foreground_locations(seg, [1, 2, 3, (1, 2)])
    np.testing.assert_array_equal(locs[1], again[1])


def _load(folder: Path, case: str):
    return storage.load_case(folder, case, mmap=False)


def test_dataset_run_labelled_and_unlabelled(planned, env):
    from autossl.preprocessing.preprocessor import DefaultPreprocessor, run_configurations
    from autossl.raw.dataset import RawDataset

    folder, plans = planned
    raw = RawDataset(folder)
    configs = [c for c in ("2d", "3d_fullres") if c in plans["configurations"]]
    out = run_configurations(991, configs, "autosslPlans", num_processes=2)
    pre = env["pre"] / folder.name
    assert (pre / "dataset.json").is_file()
    assert sorted(p.name for p in (pre / "gt_segmentations").iterdir()) == sorted(
        f"{c}.nii.gz" for c in raw.labeled)
    for c in configs:
        cfg = plans["configurations"][c]
        lab = pre / cfg["data_identifier"]
        unl = storage.unlabeled_folder(lab)
        assert out[c] == lab
        assert storage.list_cases(lab) == sorted(raw.labeled)
        assert storage.list_cases(unl) == sorted(raw.unlabeled)
        for case in raw.labeled:
            data, seg, props = _load(lab, case)
            assert seg is not None and seg.shape == (1, *data.shape[1:])
            assert set(props["class_locations"]) == {1, 2}
            assert abs(float(data[seg >= 0].mean())) < 0.05 or abs(float(data.mean())) < 0.2  # ZScore
            spacing_t = [props["spacing"][i] for i in plans["transpose_forward"]]
            target = cfg["spacing"] if len(cfg["spacing"]) == 3 else [spacing_t[0], *cfg["spacing"]]
            assert tuple(data.shape[1:]) == tuple(compute_new_shape(
                props["shape_after_cropping_and_before_resampling"], spacing_t, target))
        for case in raw.unlabeled:
            data, seg, props = _load(unl, case)
            assert seg is None and not (unl / f"{case}_seg.b2nd").exists()
            assert props["class_locations"] == {}
            assert data.dtype == np.float32 and abs(float(data.mean())) < 0.2
    # the files load back equal to what run_case computes
    case, d = sorted(raw.labeled.items())[1]
    from autossl.planning.plans_handler import PlansManager
    pm = PlansManager(plans)
    data, seg, props = DefaultPreprocessor().run_case(d["images"], d["label"], pm, pm.get_configuration("3d_fullres"),
                                                      raw.dataset_json)
    ldata, lseg, lprops = _load(pre / plans["configurations"]["3d_fullres"]["data_identifier"], case)
    np.testing.assert_array_equal(ldata, data)
    np.testing.assert_array_equal(lseg, seg)
    assert lprops["bbox_used_for_cropping"] == props["bbox_used_for_cropping"]


def test_dataset_run_is_resumable_and_atomic(planned, env):
    from autossl.preprocessing.preprocessor import run_configurations

    folder, plans = planned
    run_configurations(991, ["3d_fullres"], "autosslPlans", num_processes=1)
    lab = env["pre"] / folder.name / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = storage.list_cases(lab)
    finished, broken = cases[0], cases[1]
    stamp = {c: (lab / f"{c}.pkl").stat().st_mtime_ns for c in cases}
    # a killed run: the .pkl (written last) is missing, a temporary file is left over
    (lab / f"{broken}.pkl").unlink()
    (lab / f".{broken}.b2nd.abc123.tmp.b2nd").write_bytes(b"half")
    assert broken not in storage.list_cases(lab)
    run_configurations(991, ["3d_fullres"], "autosslPlans", num_processes=1)
    assert storage.list_cases(lab) == cases
    assert (lab / f"{finished}.pkl").stat().st_mtime_ns == stamp[finished]  # skipped
    assert not list(lab.glob(".*.tmp*"))
    data, seg, props = _load(lab, broken)
    assert seg is not None and props["class_locations"]
    # overwrite redoes everything
    run_configurations(991, ["3d_fullres"], "autosslPlans", num_processes=1, overwrite=True)
    assert (lab / f"{finished}.pkl").stat().st_mtime_ns != stamp[finished]
    # changed plans (another spacing) make finished cases stale: the folder is redone
    plans_file = env["pre"] / folder.name / "autosslPlans.json"
    p = json.loads(plans_file.read_text())
    p["configurations"]["3d_fullres"]["spacing"] = [3.0, 2.0, 2.0]
    plans_file.write_text(json.dumps(p))
    run_configurations(991, ["3d_fullres"], "autosslPlans", num_processes=1)
    data2, _, props2 = _load(lab, finished)
    assert props2["spacing"] == props["spacing"]
    assert data2.shape[1] < props2["shape_after_cropping_and_before_resampling"][0]


def test_missing_plans_and_unknown_configuration(planned, env):
    from autossl.preprocessing.preprocessor import PreprocessingError, run_configurations

    with pytest.raises(PreprocessingError, match="plans not found"):
        run_configurations(991, ["3d_fullres"], "NoSuchPlans", num_processes=1)
    with pytest.raises(PreprocessingError, match="'3d_superres' not found"):
        run_configurations(991, ["3d_superres"], "autosslPlans", num_processes=1)


def test_broken_case_names_the_file(planned, env):
    from autossl.preprocessing.preprocessor import PreprocessingError, run_configurations

    folder, _ = planned
    bad = sorted((folder / "imagesTrUnlabeled").iterdir())[0]
    bad.write_bytes(b"broken")
    with pytest.raises(PreprocessingError, match=bad.name):
        run_configurations(991, ["3d_fullres"], "autosslPlans", num_processes=2)


# ----------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------
def test_cli_end_to_end_synthetic(env, capsys):
    from autossl.cli.plan_and_preprocess import main

    folder = make_synthetic_dataset(env["raw"], 992, "Cli", n_labeled=3, n_unlabeled=2, n_test=0,
                                    shape=(12, 16, 14), seed=5)
    main(["-d", "992", "-np", "2", "--verify_dataset_integrity"])
    pre = env["pre"] / folder.name
    assert (pre / "dataset_fingerprint.json").is_file()
    plans = json.loads((pre / "autosslPlans.json").read_text())
    for c in ("2d", "3d_fullres"):
        ident = plans["configurations"][c]["data_identifier"]
        assert len(storage.list_cases(pre / ident)) == 3
        assert len(storage.list_cases(pre / f"{ident}_unlabeled")) == 2
    assert "dataset integrity OK" in capsys.readouterr().out
    # the three steps as separate commands; preprocess again skips finished cases
    from autossl.cli.plan_and_preprocess import extract_fingerprint_main, plan_experiment_main, preprocess_main
    extract_fingerprint_main(["-d", "992", "-np", "1"])
    plan_experiment_main(["-d", "992"])
    preprocess_main(["-d", "992", "-c", "3d_fullres", "-np", "1"])
    assert "0 of 5 case(s) to preprocess" in capsys.readouterr().out


def test_cli_errors_exit_1_without_traceback(env, capsys, monkeypatch):
    from autossl.cli.plan_and_preprocess import main, preprocess_main

    with pytest.raises(SystemExit) as e:
        main(["-d", "123"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Dataset123" in err and "Traceback" not in err

    folder = make_synthetic_dataset(env["raw"], 993, "Bad", n_labeled=2, n_unlabeled=1, n_test=0,
                                    shape=(8, 10, 9), seed=6)
    (folder / "labelsTr" / "bad_lab001.nii.gz").unlink()
    with pytest.raises(SystemExit) as e:
        main(["-d", "993", "--verify_dataset_integrity", "-np", "1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "bad_lab001_0000.nii.gz" in err and "imagesTrUnlabeled" in err and "Traceback" not in err

    with pytest.raises(SystemExit) as e:
        preprocess_main(["-d", "993"])
    assert e.value.code == 1 and "plans not found" in capsys.readouterr().err

    monkeypatch.delenv("autossl_raw")
    with pytest.raises(SystemExit) as e:
        main(["-d", "993"])
    assert e.value.code == 1 and "autossl_raw" in capsys.readouterr().err


def test_cli_in_a_fresh_process_keeps_torch_out(env):
    """plan_and_preprocess in a fresh process never imports torch (workers stay small and start fast)."""
    make_synthetic_dataset(env["raw"], 994, "Proc", n_labeled=2, n_unlabeled=1, n_test=0, shape=(10, 12, 11), seed=7)
    code = ("import sys; from autossl.cli.plan_and_preprocess import main; "
            "from autossl.preprocessing import preprocessor; "
            "main(['-d', '994', '-np', '1']); "
            "print('TORCH_IN_MAIN', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=None, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TORCH_IN_MAIN False" in r.stdout, "fingerprint, planning and preprocessing must not import torch"
    pre = env["pre"] / "Dataset994_Proc"
    assert len(storage.list_cases(pre / "autosslPlans_3d_fullres")) == 2
    r = subprocess.run([sys.executable, "-c", "import sys, autossl.preprocessing.preprocessor as p, "
                        "autossl.preprocessing.cropping, autossl.preprocessing.normalization, "
                        "autossl.raw.integrity; print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False", "the preprocessing import path must not import torch"


def test_2d_png_dataset_end_to_end(env):
    from autossl.cli.plan_and_preprocess import main

    folder = make_synthetic_dataset(env["raw"], 995, "Png", two_d=True, n_labeled=3, n_unlabeled=2, n_test=0,
                                    shape=(20, 24), seed=8)
    main(["-d", "995", "-np", "1"])
    pre = env["pre"] / folder.name
    plans = json.loads((pre / "autosslPlans.json").read_text())
    assert "2d" in plans["configurations"]
    ident = plans["configurations"]["2d"]["data_identifier"]
    cases = storage.list_cases(pre / ident)
    assert len(cases) == 3 and len(storage.list_cases(pre / f"{ident}_unlabeled")) == 2
    data, seg, props = _load(pre / ident, cases[0])
    assert data.shape[1] == 1 and seg.shape == (1, 1, *data.shape[2:])
    assert set(props["class_locations"]) == {1, 2}


@pytest.mark.realdata
def test_hippocampus_subset_end_to_end(env):
    task = SHARED_DATA / "Task04_Hippocampus"
    if not task.is_dir():
        pytest.skip(f"real data not found at {task}")
    from autossl.cli.plan_and_preprocess import main

    folder = env["raw"] / "Dataset004_Hippocampus"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTrUnlabeled").mkdir()
    cases = sorted(p.name for p in (task / "labelsTr").glob("hippocampus_*.nii.gz"))[:20]
    for c in cases[:14]:
        shutil.copy(task / "imagesTr" / c, folder / "imagesTr" / c.replace(".nii.gz", "_0000.nii.gz"))
        shutil.copy(task / "labelsTr" / c, folder / "labelsTr" / c)
    for c in cases[14:]:
        shutil.copy(task / "imagesTr" / c, folder / "imagesTrUnlabeled" / c.replace(".nii.gz", "_0000.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 14, "file_ending": ".nii.gz"}))
    main(["-d", "4", "-np", "2", "--verify_dataset_integrity"])
    pre = env["pre"] / "Dataset004_Hippocampus"
    plans = json.loads((pre / "autosslPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [1.0, 1.0, 1.0]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    for c in ("2d", "3d_fullres"):
        ident = plans["configurations"][c]["data_identifier"]
        assert len(storage.list_cases(pre / ident)) == 14
        assert len(storage.list_cases(pre / f"{ident}_unlabeled")) == 6
    ident = cfg["data_identifier"]
    data, seg, props = _load(pre / ident, storage.list_cases(pre / ident)[0])
    # 1 mm data at a 1 mm target: nothing is resampled
    assert tuple(data.shape[1:]) == tuple(props["shape_after_cropping_and_before_resampling"])
    assert abs(float(data.mean())) < 1e-3 and abs(float(data.std()) - 1) < 1e-3  # ZScore over the image
    assert {1, 2} <= set(np.unique(seg).tolist())
    with open(pre / ident / f"{storage.list_cases(pre / ident)[0]}.pkl", "rb") as f:
        assert set(pickle.load(f)["class_locations"]) == {1, 2}


def test_planner_feature_map_estimate_without_torch_matches_dna():
    """The planner's torch-free VRAM estimate equals PlainConvUNet.compute_conv_feature_map_size."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from autossl.planning.default_planner import plain_conv_unet_feature_map_size

    rng = np.random.default_rng(0)
    for t in range(12):
        dim = 2 + t % 2
        n = int(rng.integers(2, 7))
        kw = dict(n_stages=n, features_per_stage=[min(32 * 2 ** i, 320) for i in range(n)],
                  conv_op=torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d, kernel_sizes=[[3] * dim] * n,
                  strides=[[1] * dim] + [[int(x) for x in rng.integers(1, 3, dim)] for _ in range(n - 1)],
                  n_conv_per_stage=2 if t % 3 else [2] * n, n_conv_per_stage_decoder=[2] * (n - 1) if t % 2 else 1)
        patch = [int(x) for x in rng.integers(8, 120, dim)]
        ds = t % 4 == 0
        ref = PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=ds, **kw).compute_conv_feature_map_size(patch)
        assert plain_conv_unet_feature_map_size(patch, kw, 3, ds) == int(ref)
