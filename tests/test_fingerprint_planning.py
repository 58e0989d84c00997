"""Fingerprint, cropping, normalisation, topology and experiment planning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autossl.fingerprint.extractor import extract_fingerprint
from autossl.planning import CPUPlanner, ExperimentPlanner, PlansManager, get_planner
from autossl.planning.topology import get_pool_and_conv_props, pad_shape
from autossl.planning.transformer import patch_embed_size_for
from autossl.preprocessing.cropping import crop_to_nonzero
from autossl.preprocessing.normalization import (CTNormalization, ZScoreNormalization, get_normalization_class,
                                                 normalization_scheme_for_channel)
from autossl.utilities.file_io import load_json, save_json
from autossl.utilities.synthetic import make_synthetic_dataset

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
HIPPOCAMPUS = SHARED_DATA / "Task04_Hippocampus"


@pytest.fixture
def env(tmp_path, monkeypatch):
    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    for p in (raw, pre, res):
        p.mkdir()
    monkeypatch.setenv("autossl_raw", str(raw))
    monkeypatch.setenv("autossl_preprocessed", str(pre))
    monkeypatch.setenv("autossl_results", str(res))
    # 3e5 foreground samples in total instead of nnU-Net's 1e8 keeps the tests fast (same code path)
    monkeypatch.setattr("autossl.fingerprint.extractor.NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS", 3e5)
    return raw, pre


# ---------------------------------------------------------------------------------------------- cropping
def test_crop_to_nonzero_with_and_without_seg():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[0, 2:8, 3:9, 4:12] = 1.0
    data[0, 6, 7, 9] = 0.0  # an enclosed hole: filled, so it counts as inside
    data[1, 1, 3, 4] = 5.0  # channel 1 extends the box (union over channels)
    seg = np.zeros((1, 10, 12, 14), np.uint8)
    seg[0, 3:5, 4:6, 5:7] = 2
    d, s, bbox = crop_to_nonzero(data.copy(), seg.copy())
    assert bbox == [[1, 8], [3, 9], [4, 12]]
    assert d.shape == (2, 7, 6, 8) and s.shape == (1, 7, 6, 8)
    assert s.dtype.kind == "i"  # uint8 labels widened so they can hold -1
    assert s[0, 0, 1, 1] == -1  # outside the mask (row x=1 only has the single channel-1 voxel)
    assert s[0, 3 - 1, 4 - 3, 5 - 4] == 2  # labels kept
    assert s[0, 6 - 1, 7 - 3, 9 - 4] == 0  # the filled hole is inside
    _, s2, bbox2 = crop_to_nonzero(data.copy())
    assert bbox2 == bbox and s2.dtype == np.int8
    assert set(np.unique(s2)) == {-1, 0}
    assert (s2 == 0).sum() == (s == 0).sum() + (s == 2).sum()


# ---------------------------------------------------------------------------------------------- normalisation
def test_normalization_schemes():
    assert normalization_scheme_for_channel("CT") == "CTNormalization"
    assert normalization_scheme_for_channel("ct") == "CTNormalization"
    assert normalization_scheme_for_channel("noNorm") == "NoNormalization"
    assert normalization_scheme_for_channel("Rescale_To_0_1") == "RescaleTo01Normalization"
    assert normalization_scheme_for_channel("rgb_to_0_1") == "RGBTo01Normalization"
    assert normalization_scheme_for_channel("T2") == "ZScoreNormalization"
    with pytest.raises(ValueError, match="unknown normalization"):
        get_normalization_class("Nope")

    rng = np.random.default_rng(0)
    img = rng.normal(50, 10, (8, 8, 8)).astype(np.float32)
    seg = np.zeros_like(img, dtype=np.int8)
    seg[:2] = -1
    img[:2] = 0
    out = ZScoreNormalization(True, {}).run(img.copy(), seg)
    assert np.all(out[:2] == 0)
    assert abs(out[2:].mean()) < 1e-4 and abs(out[2:].std() - 1) < 1e-3
    out2 = ZScoreNormalization(False, {}).run(img.copy(), seg)
    assert abs(out2.mean()) < 1e-4 and np.all(out2[:2] < 0)

    props = {"mean": 10.0, "std": 2.0, "percentile_00_5": 0.0, "percentile_99_5": 20.0}
    ct = CTNormalization(False, props).run(np.array([-100.0, 10.0, 100.0], np.float32))
    np.testing.assert_allclose(ct, [-5.0, 0.0, 5.0])
    with pytest.raises(ValueError, match="intensity properties"):
        CTNormalization(False, {}).run(np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------- topology
def test_topology_isotropic_hippocampus():
    n_pool, strides, kernels, patch, div = get_pool_and_conv_props((1.0, 1.0, 1.0), (36, 50, 35), 4, 999999)
    assert list(n_pool) == [3, 3, 3]
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 3]] * 4
    assert list(patch) == [40, 56, 40] and list(div) == [8, 8, 8]
    n_pool, strides, kernels, patch, _ = get_pool_and_conv_props((1.0, 1.0), (50, 35), 4, 999999)
    assert list(patch) == [56, 40] and len(strides) == 4 and kernels == [[3, 3]] * 4


def test_topology_anisotropic_and_lone_axis():
    # 5 mm slices: in-plane pools first with 1x3x3 kernels until the spacings are within 2x
    n_pool, strides, kernels, patch, div = get_pool_and_conv_props((5.0, 1.0, 1.0), (20, 192, 160), 4, 999999)
    assert list(n_pool) == [2, 5, 5]
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert kernels == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert list(patch) == [20, 192, 160]
    # a lone poolable axis needs >= 3 * min_feature_map_size voxels
    n_pool, strides, _, patch, _ = get_pool_and_conv_props((1.0, 4.0, 4.0), (64, 10, 10), 4, 999999)
    assert list(n_pool) == [3, 1, 1]
    assert strides[1:3] == [[2, 1, 1], [2, 1, 1]]
    assert list(patch) == [64, 10, 10]
    # an axis too small to pool from the start (nnU-Net raises IndexError here)
    n_pool, _, kernels, patch, _ = get_pool_and_conv_props((1.0, 1.0, 1.0), (6, 64, 64), 4, 999999)
    assert list(n_pool) == [0, 4, 4] and kernels[0] == [3, 3, 3] and list(patch) == [6, 64, 64]
    assert list(pad_shape([37, 40, 9], [8, 8, 4])) == [40, 40, 12]
    assert patch_embed_size_for([20, 192, 160]) == [4, 8, 8]
    assert patch_embed_size_for([6, 64, 64]) == [2, 8, 8]


# ---------------------------------------------------------------------------------------------- fingerprint
def _rewrite_unlabeled(folder: Path, spacing_zyx, shape, scale: float) -> None:
    """Give the unlabelled images another spacing, shape and an intensity range far above the labelled one."""
    rng = np.random.default_rng(5)
    for f in sorted((folder / "imagesTrUnlabeled").glob("*.nii.gz")):
        arr = (rng.uniform(1, 2, shape) * scale).astype(np.float32)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
        sitk.WriteImage(img, str(f))


def _reference_intensity_stats(folder: Path, n_lab: int, total: float) -> dict:
    """nnU-Net's way: rs.choice on each labelled case's cropped foreground, all samples together."""
    samples = []
    for img_f in sorted((folder / "imagesTr").glob("*.nii.gz")):
        case = img_f.name[: -len("_0000.nii.gz")]
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(img_f))).astype(np.float32)[None]
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))[None].astype(np.int16)
        d, s, _ = crop_to_nonzero(img, seg)
        rs = np.random.RandomState(1234)
        samples.append(rs.choice(d[0][s[0] > 0], int(total // n_lab), replace=True))
    a = np.concatenate(samples)
    p0, med, p99 = np.percentile(a, (0.5, 50, 99.5))
    return {"mean": float(a.mean(dtype=np.float64)), "std": float(a.std(dtype=np.float64)), "median": float(med),
            "min": float(a.min()), "max": float(a.max()), "percentile_00_5": float(p0), "percentile_99_5": float(p99)}


def test_fingerprint_counts_unlabeled_for_geometry_not_intensities(env):
    raw, pre = env
    folder = make_synthetic_dataset(raw, 991, "Fp", n_labeled=3, n_unlabeled=2, n_test=1, shape=(12, 16, 14),
                                    spacing=(1.5, 1.0, 1.0), seed=3)
    _rewrite_unlabeled(folder, (3.0, 1.0, 1.0), (6, 16, 14), scale=1e5)
    fp = extract_fingerprint(991, num_processes=1)
    assert (pre / folder.name / "dataset_fingerprint.json").is_file()
    assert fp["n_labeled"] == 3 and fp["n_unlabeled"] == 2
    assert len(fp["spacings"]) == len(fp["shapes_after_crop"]) == 5
    assert fp["spacings"][:3] == [[1.5, 1.0, 1.0]] * 3
    assert fp["spacings"][3:] == [[3.0, 1.0, 1.0]] * 2  # unlabelled cases counted for geometry
    assert fp["shapes_after_crop"][3:] == [[6, 16, 14]] * 2
    props = fp["foreground_intensity_properties_per_channel"]["0"]
    assert props["max"] < 1e3  # unlabelled intensities (>= 1e5) never enter the statistics
    ref = _reference_intensity_stats(folder, 3, 3e5)
    for k in ("median", "min", "max", "percentile_00_5", "percentile_99_5"):
        assert props[k] == pytest.approx(ref[k], rel=1e-6), k
    for k in ("mean", "std"):
        assert props[k] == pytest.approx(ref[k], rel=1e-5), k
    # the parallel (spawn) path gives the same file content
    fp2 = extract_fingerprint(991, num_processes=2, overwrite=True)
    assert fp2 == fp
    # an existing fingerprint is reused unless the case list changed
    save_json({**fp, "median_relative_size_after_cropping": 0.123}, pre / folder.name / "dataset_fingerprint.json")
    assert extract_fingerprint(991)["median_relative_size_after_cropping"] == 0.123


# ---------------------------------------------------------------------------------------------- planning rules
def _fake_dataset(raw: Path, pre: Path, spacings, shapes, name="Dataset992_Fake", channel="MRI",
                  median_rel=1.0) -> str:
    (raw / name).mkdir(parents=True)
    save_json({"channel_names": {"0": channel}, "labels": {"background": 0, "a": 1}, "numTraining": len(spacings),
               "file_ending": ".nii.gz"}, raw / name / "dataset.json")
    save_json({"spacings": spacings, "shapes_after_crop": shapes,
               "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "median": 0.0,
                                                                     "min": -1.0, "max": 1.0,
                                                                     "percentile_00_5": -1.0,
                                                                     "percentile_99_5": 1.0}},
               "median_relative_size_after_cropping": median_rel, "n_labeled": len(spacings), "n_unlabeled": 0},
              pre / name / "dataset_fingerprint.json")
    return name


def test_anisotropic_target_spacing_and_transpose(env):
    raw, pre = env
    # slices 3..8 mm (median 5, 10th percentile 3.5) along the LAST axis, few voxels there
    z = [3.0, 4.0, 5.0, 5.0, 6.0, 8.0]
    name = _fake_dataset(raw, pre, [[0.8, 0.8, s] for s in z], [[256, 240, 20]] * 6)
    planner = ExperimentPlanner(name)
    target = planner.determine_fullres_target_spacing()
    np.testing.assert_allclose(target, [0.8, 0.8, np.percentile(z, 10)])
    assert planner.determine_transpose() == ([2, 0, 1], [1, 2, 0])
    # anisotropic spacing but NOT fewer voxels along that axis: the median is kept
    name2 = _fake_dataset(raw, pre, [[0.8, 0.8, s] for s in z], [[256, 240, 200]] * 6, name="Dataset993_Fake")
    np.testing.assert_allclose(ExperimentPlanner(name2).determine_fullres_target_spacing(), [0.8, 0.8, 5.0])
    # the 10th percentile never goes below the other axes
    name3 = _fake_dataset(raw, pre, [[0.8, 0.8, s] for s in [0.5, 0.5, 5.0, 5.0, 6.0, 8.0]], [[256, 240, 20]] * 6,
                          name="Dataset994_Fake")
    t3 = ExperimentPlanner(name3).determine_fullres_target_spacing()
    assert t3[2] == pytest.approx(0.8 + 1e-5)
    assert ExperimentPlanner(name3, suppress_transpose=True).determine_transpose() == ([0, 1, 2], [0, 1, 2])


def test_normalisation_mask_and_ct_rules(env):
    raw, pre = env
    name = _fake_dataset(raw, pre, [[1.0, 1.0, 1.0]] * 3, [[30, 30, 30]] * 3, median_rel=0.5)
    schemes, mask = ExperimentPlanner(name).determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    assert schemes == ["ZScoreNormalization"] and mask == [True]  # cropping removed > 25%
    name_ct = _fake_dataset(raw, pre, [[1.0, 1.0, 1.0]] * 3, [[30, 30, 30]] * 3, name="Dataset995_Fake",
                            channel="CT", median_rel=0.5)
    schemes, mask = ExperimentPlanner(name_ct).determine_normalization_scheme_and_whether_mask_is_used_for_norm()
    assert schemes == ["CTNormalization"] and mask == [False]  # CT never uses the mask


def test_lowres_and_cascade_for_large_images(env):
    raw, pre = env
    name = _fake_dataset(raw, pre, [[1.0, 1.0, 1.0]] * 4, [[160, 160, 160]] * 4)
    plans = CPUPlanner(name).plan_experiment()
    cfgs = plans["configurations"]
    assert set(cfgs) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    assert cfgs["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert cfgs["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert cfgs["3d_fullres"]["batch_dice"] is True and cfgs["3d_lowres"]["batch_dice"] is False
    assert all(s > 1.0 for s in cfgs["3d_lowres"]["spacing"])
    pm = PlansManager(pre / name / "autosslPlansCPU.json")
    casc = pm.get_configuration("3d_cascade_fullres")
    assert casc.patch_size == cfgs["3d_fullres"]["patch_size"] and casc.previous_stage_name == "3d_lowres"
    assert pm.get_configuration("3d_lowres").next_stage_names == ["3d_cascade_fullres"]


# ---------------------------------------------------------------------------------------------- synthetic plans
def test_plans_on_synthetic_3d_dataset(env):
    raw, pre = env
    folder = make_synthetic_dataset(raw, 996, "Plan3d", n_labeled=3, n_unlabeled=3, n_test=0, shape=(20, 28, 24),
                                    spacing=(1.5, 1.0, 1.0), seed=1)
    extract_fingerprint(996, num_processes=1)
    plans = get_planner("default")(996).plan_experiment()
    assert (pre / folder.name / "autosslPlans.json").is_file()
    assert load_json(pre / folder.name / "dataset.json") == load_json(folder / "dataset.json")
    assert load_json(pre / folder.name / "autosslPlans.json") == plans
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    assert cfg["architecture"]["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]
    assert cfg["resampling_fn_data"] == "resample_data_or_seg_to_shape"
    assert cfg["resampling_fn_seg_kwargs"] == {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    assert cfg["batch_dice"] is False and plans["configurations"]["2d"]["batch_dice"] is True
    # 6 cases x ~20*28*24 voxels: the 5% cap keeps the batch at the minimum of 2
    assert cfg["batch_size"] == 2
    embed = cfg["transformer_architecture"]["arch_kwargs"]["patch_embed_size"]
    assert all(p % e == 0 for p, e in zip(cfg["patch_size"], embed))

    cpu = get_planner("cpu")(996).plan_experiment()
    assert cpu["plans_name"] == "autosslPlansCPU" and (pre / folder.name / "autosslPlansCPU.json").is_file()
    for c in ("2d", "3d_fullres"):
        d, l = plans["configurations"][c], cpu["configurations"][c]
        assert max(l["architecture"]["arch_kwargs"]["features_per_stage"]) < \
            max(d["architecture"]["arch_kwargs"]["features_per_stage"])
        assert np.prod(l["patch_size"]) <= np.prod(d["patch_size"])
        assert l["transformer_architecture"]["arch_kwargs"]["embed_dim"] < \
            d["transformer_architecture"]["arch_kwargs"]["embed_dim"]
    assert cpu["configurations"]["3d_fullres"]["batch_size"] <= CPUPlanner.UNet_max_batch_size_3d


def test_2d_png_dataset_gets_2d_plan_only(env):
    raw, pre = env
    make_synthetic_dataset(raw, 997, "Png", two_d=True, n_labeled=4, n_unlabeled=2, n_test=0, shape=(40, 48), seed=2)
    fp = extract_fingerprint(997, num_processes=1)
    assert fp["spacings"][0] == [999.0, 1.0, 1.0] and fp["n_unlabeled"] == 2
    plans = ExperimentPlanner(997).plan_experiment()
    assert list(plans["configurations"]) == ["2d"]
    assert plans["image_reader_writer"] == "NaturalImage2DIO"
    cfg = PlansManager(plans).get_configuration("2d")
    assert len(cfg.patch_size) == 2 and cfg.spacing == [1.0, 1.0]
    tr = cfg.transformer_architecture
    assert tr["network_class_name"] == "autossl.networks.transformer2d.Primus2D"
    assert tr["arch_kwargs"]["input_shape"] == cfg.patch_size and len(tr["arch_kwargs"]["patch_embed_size"]) == 2
    # the 2D transformer builds from the entry (tiny width/depth for the test) and runs at the patch
    import torch

    from autossl.networks.build import build_network

    arch = json.loads(json.dumps(tr))
    arch["arch_kwargs"].update(embed_dim=16, eva_depth=1, eva_numheads=2)
    torch.manual_seed(0)
    with torch.no_grad():
        out = build_network(arch, input_channels=1, num_classes=3)(torch.randn(1, 1, *cfg.patch_size))
    assert tuple(out.shape) == (1, 3, *cfg.patch_size)


def test_plans_manager_accessors_and_inheritance(tmp_path):
    plans = {"dataset_name": "Dataset001_X", "plans_name": "autosslPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO", "experiment_planner_used": "E",
             "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}},
             "configurations": {
                 "base": {"data_identifier": "d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                          "patch_size": [8, 8], "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                          "use_mask_for_norm": [False], "batch_dice": True,
                          "resampling_fn_data": "no_such_function", "resampling_fn_data_kwargs": {},
                          "architecture": {"network_class_name": "x", "arch_kwargs": {"strides": [[1, 1], [2, 2]]},
                                           "_kw_requires_import": []}},
                 "child": {"inherits_from": "base", "batch_size": 7},
                 "loop_a": {"inherits_from": "loop_b"}, "loop_b": {"inherits_from": "loop_a"}}}
    pm = PlansManager(plans)
    c = pm.get_configuration("child")
    assert c.batch_size == 7 and c.patch_size == [8, 8] and c.pool_op_kernel_sizes == [[1, 1], [2, 2]]
    assert c.transformer_architecture is None and c.network_arch_class_name == "x"
    assert pm.get_configuration("base").batch_size == 2  # the parent is not modified
    assert pm.image_reader_writer_class.__name__ == "SimpleITKIO"
    assert pm.get_label_manager({"labels": {"background": 0, "a": 1, "b": 2}}).num_segmentation_heads == 3
    with pytest.raises(RuntimeError, match="circular"):
        pm.get_configuration("loop_a")
    with pytest.raises(ValueError, match="does not exist"):
        pm.get_configuration("nope")
    pm.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == plans
    with pytest.raises(ValueError, match="no_such_function"):
        c.resampling_fn_data
    with pytest.raises(ValueError, match="unknown experiment planner"):
        get_planner("nope")
    assert get_planner("cpu") is CPUPlanner and get_planner("autosslPlans") is ExperimentPlanner


# ---------------------------------------------------------------------------------------------- Hippocampus
def _hippocampus_raw(raw_root: Path, dataset_id: int = 4, split: dict | None = None) -> Path:
    """Hippocampus in the raw format, by the project's MSD converter (``split``: its semi-supervised
    mode); without the converter, all cases as labelled ones via symlinks (MSD images are single-channel)."""
    try:
        from dataset_conversion.convert_msd import convert_msd
    except ImportError:
        if split is not None:
            pytest.skip("dataset_conversion.convert_msd is not available")
        folder = raw_root / f"Dataset{dataset_id:03d}_Hippocampus"
        (folder / "imagesTr").mkdir(parents=True)
        (folder / "labelsTr").mkdir()
        msd = load_json(HIPPOCAMPUS / "dataset.json")
        for entry in msd["training"]:
            case = Path(entry["image"]).name[: -len(".nii.gz")]
            (folder / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz")
            (folder / "labelsTr" / f"{case}.nii.gz").symlink_to(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz")
        save_json({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                   "numTraining": len(msd["training"]), "file_ending": ".nii.gz", "name": "Hippocampus"},
                  folder / "dataset.json")
        return folder
    return convert_msd(HIPPOCAMPUS, dataset_id, "Hippocampus", **(split or {}))


def _planned(root: Path, dataset_id: int, split: dict | None = None):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("autossl_raw", str(root / "raw"))
        mp.setenv("autossl_preprocessed", str(root / "pre"))
        mp.setenv("autossl_results", str(root / "res"))
        (root / "pre").mkdir()
        _hippocampus_raw(root / "raw", dataset_id, split)
        fp = extract_fingerprint(dataset_id, num_processes=2)
        default = ExperimentPlanner(dataset_id).plan_experiment()
        cpu = CPUPlanner(dataset_id).plan_experiment()
    return fp, default, cpu


def _need_hippocampus():
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real data absent: {HIPPOCAMPUS} (MSD Task04_Hippocampus) not found")


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    """Dataset004_Hippocampus with all 260 cases labelled, as nnU-Net plans it."""
    _need_hippocampus()
    return _planned(tmp_path_factory.mktemp("hippocampus"), 4)


@pytest.fixture(scope="module")
def hippocampus_h3d(tmp_path_factory):
    """The H3D layout: 10 labelled, 190 unlabelled, 60 test cases (protocols/hippocampus_split.json)."""
    _need_hippocampus()
    split_file = SHARED_DATA.parent / "protocols" / "hippocampus_split.json"
    if not split_file.is_file():
        pytest.skip(f"{split_file} not found")
    root = tmp_path_factory.mktemp("h3d")
    split = {"split_file": split_file, "labeled": "labeled_10", "test_labels_out": root / "test_labels"}
    return _planned(root, 204, split)


@pytest.mark.realdata
def test_hippocampus_default_plans_equal_nnunet(hippocampus):
    fp, plans, _ = hippocampus
    assert fp["n_labeled"] == 260 and fp["n_unlabeled"] == 0
    assert fp["median_relative_size_after_cropping"] == 1.0
    # nnU-Net v2.8.1 on the same data (float32 accumulation in nnU-Net: mean 22360.457, std 60654.621)
    props = fp["foreground_intensity_properties_per_channel"]["0"]
    assert props["median"] == pytest.approx(362.8825073, rel=1e-7)
    assert props["percentile_00_5"] == 28.0 and props["percentile_99_5"] == pytest.approx(277682.03125)
    assert props["mean"] == pytest.approx(22360.457, rel=1e-6) and props["std"] == pytest.approx(60654.621, rel=1e-6)
    assert plans["transpose_forward"] == [0, 1, 2] and plans["original_median_shape_after_transp"] == [36, 50, 35]
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}
    f3 = plans["configurations"]["3d_fullres"]
    assert f3["spacing"] == [1.0, 1.0, 1.0] and f3["patch_size"] == [40, 56, 40] and f3["batch_size"] == 9
    assert f3["median_image_size_in_voxels"] == [36.0, 50.0, 35.0]
    assert f3["normalization_schemes"] == ["ZScoreNormalization"] and f3["use_mask_for_norm"] == [False]
    assert f3["batch_dice"] is False
    a3 = f3["architecture"]["arch_kwargs"]
    assert a3["n_stages"] == 4 and a3["features_per_stage"] == [32, 64, 128, 256]
    assert a3["kernel_sizes"] == [[3, 3, 3]] * 4 and a3["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert a3["n_conv_per_stage"] == [2] * 4 and a3["n_conv_per_stage_decoder"] == [2] * 3
    assert a3["conv_op"] == "torch.nn.modules.conv.Conv3d"
    assert a3["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm3d"
    f2 = plans["configurations"]["2d"]
    assert f2["spacing"] == [1.0, 1.0] and f2["patch_size"] == [56, 40] and f2["batch_size"] == 366
    a2 = f2["architecture"]["arch_kwargs"]
    assert a2["features_per_stage"] == [32, 64, 128, 256] and a2["strides"] == [[1, 1]] + [[2, 2]] * 3
    assert f2["batch_dice"] is True


@pytest.mark.realdata
def test_hippocampus_cpu_plans_are_lighter(hippocampus):
    _, plans, cpu = hippocampus
    assert cpu["plans_name"] == "autosslPlansCPU" and cpu["experiment_planner_used"] == "CPUPlanner"
    d, c = plans["configurations"]["3d_fullres"], cpu["configurations"]["3d_fullres"]
    # the H3D preset documented in documentation/planning.md
    assert c["patch_size"] == [32, 40, 32] and c["batch_size"] == 2
    assert c["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]
    assert c["architecture"]["arch_kwargs"]["strides"] == d["architecture"]["arch_kwargs"]["strides"]
    assert c["spacing"] == d["spacing"] and c["normalization_schemes"] == d["normalization_schemes"]
    assert c["transformer_architecture"]["preset"] == "T"
    assert c["transformer_architecture"]["arch_kwargs"]["input_shape"] == [32, 40, 32]
    c2 = cpu["configurations"]["2d"]
    assert 2 <= c2["batch_size"] <= CPUPlanner.UNet_max_batch_size_2d < plans["configurations"]["2d"]["batch_size"]


@pytest.mark.realdata
def test_primus_from_3d_plan_runs_at_planned_patch(hippocampus):
    import torch

    from autossl.networks.build import build_network

    _, plans, _ = hippocampus
    cfg = PlansManager(plans).get_configuration("3d_fullres")
    arch = json.loads(json.dumps(cfg.transformer_architecture))
    assert arch["network_class_name"] == "dynamic_network_architectures.architectures.primus.Primus"
    assert arch["arch_kwargs"]["input_shape"] == cfg.patch_size
    assert arch["arch_kwargs"]["patch_embed_size"] == [8, 8, 8]
    arch["arch_kwargs"].update(embed_dim=24, eva_depth=1, eva_numheads=2)  # tiny for the test
    torch.manual_seed(0)
    net = build_network(arch, input_channels=1, num_classes=3, deep_supervision=True)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *cfg.patch_size))
    assert tuple(out.shape) == (1, 3, *cfg.patch_size)


@pytest.mark.realdata
def test_h3d_layout_fingerprint_and_cpu_preset(hippocampus_h3d):
    fp, plans, cpu = hippocampus_h3d
    assert fp["n_labeled"] == 10 and fp["n_unlabeled"] == 190 and len(fp["spacings"]) == 200
    # the batch-size cap counts labelled + unlabelled cases: 0.05 * 36*50*35 * 200 / (40*56*40) -> 7
    # (nnU-Net, counting the 10 labelled cases only, would plan 2)
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 7
    c = cpu["configurations"]["3d_fullres"]
    assert c["patch_size"] == [32, 40, 32] and c["batch_size"] == 2  # the documented H3D CPU preset
    assert c["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]


def test_cpu_2d_plan_trades_slice_for_batch(env):
    """The CPU preset shrinks a 2D patch until a batch of 12 fits its compute budget (nnU-Net's
    rule, minimum 2, would keep the whole slice in batches of about 3, too few samples for a
    1000-iteration run); the default planner keeps nnU-Net's rule."""
    raw, _ = env
    make_synthetic_dataset(raw, 995, "Wide2d", two_d=True, n_labeled=4, n_unlabeled=76, n_test=0, shape=(256, 224),
                           seed=3)
    extract_fingerprint(995, num_processes=1)
    default = ExperimentPlanner(995).plan_experiment()["configurations"]["2d"]
    cpu = CPUPlanner(995).plan_experiment()["configurations"]["2d"]
    assert default["patch_size"] == [256, 224]
    assert cpu["batch_size"] >= CPUPlanner.UNet_shrink_until_batch_size_2d == 12
    assert cpu["patch_size"][0] < 256 and cpu["patch_size"][1] < 224
    assert cpu["transformer_architecture"]["arch_kwargs"]["input_shape"] == cpu["patch_size"]
    assert cpu["optimizer"] == {"cnn": {"kind": "adamw", "lr": 1e-3, "weight_decay": 1e-4}}
    assert "optimizer" not in default  # the default plans keep nnU-Net's SGD

    class Nnunet2dRule(CPUPlanner):
        UNet_shrink_until_batch_size_2d = 2

    old = Nnunet2dRule(995, plans_name="oldrule").plan_experiment()["configurations"]["2d"]
    assert old["patch_size"] == [256, 224] and old["batch_size"] < 12
