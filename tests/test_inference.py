"""Sliding window, predictor (raw files -> files in the input's exact geometry), probabilities,
folds and members, ensembling, CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from torch import nn

from autossl.ensembling.ensemble import EnsembleError, ensemble_folders
from autossl.inference.predictor import PredictionError, Predictor, list_cases_in_folder
from autossl.inference.sliding_window import (SlidingWindowPredictor, compute_gaussian,
                                              compute_steps_for_sliding_window, get_sliding_window_slicers,
                                              mirror_combinations, predict_sliding_window)
from autossl.networks.build import build_network
from autossl.utilities.file_io import save_json, save_torch
from autossl.utilities.synthetic import make_synthetic_dataset

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float32(monkeypatch):
    """Exact comparisons below: no automatic bf16 autocast on CPUs that have it."""
    monkeypatch.setenv("autossl_cpu_amp", "0")


# ============================================================================ fake networks
class Affine(nn.Module):
    """Per-voxel linear map of the input channels to the heads: shift-equivariant, so sliding
    window prediction must reproduce it exactly (with any weights)."""

    def __init__(self, in_ch: int, heads: int, dim: int = 3, seed: int = 0):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.conv = conv(in_ch, heads, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

    def forward(self, x):
        return self.conv(x)


class Threshold(nn.Module):
    """Head 1 wins where the (normalised) intensity is > 0; head 2 never wins."""

    def forward(self, x):
        return torch.cat([-x[:, :1], x[:, :1], x[:, :1] * 0 - 100], 1)


class AxisProbe(nn.Module):
    """Output depends on the position along the first spatial axis: catches flips that are not undone."""

    def forward(self, x):
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, *([1] * (x.ndim - 3)))
        return torch.cat([ramp.expand_as(x[:, :1]), -ramp.expand_as(x[:, :1])], 1)


# ============================================================================ sliding window
def test_steps_like_nnunet():
    assert compute_steps_for_sliding_window((110,), (64,), 0.5) == [[0, 23, 46]]
    assert compute_steps_for_sliding_window((64, 40), (64, 40), 0.5) == [[0], [0]]
    steps = compute_steps_for_sliding_window((100, 37), (32, 16), 0.5)
    for s, size, patch in zip(steps, (100, 37), (32, 16)):
        assert s[0] == 0 and s[-1] == size - patch
        assert max(np.diff(s)) <= patch * 0.5
    with pytest.raises(ValueError):
        compute_steps_for_sliding_window((10,), (16,), 0.5)


def test_gaussian_map():
    g = compute_gaussian((9, 12, 7))
    assert g.max() == pytest.approx(1.0) and g.min() > 0
    assert tuple(np.unravel_index(int(g.argmax()), g.shape)) == (4, 6, 3)
    assert torch.allclose(g, g.flip(0), atol=1e-6)  # symmetric around the centre (odd axis)


def test_slicers_cover_every_voxel_and_weights_sum():
    shape, patch = (23, 37, 19), (8, 16, 8)
    slicers = get_sliding_window_slicers(shape, patch, 0.5)
    cover = torch.zeros(shape)
    g = compute_gaussian(patch)
    for s in slicers:
        cover[s] += g
    assert (cover > 0).all()
    # the summed weights are exactly what the predictor divides by: constant logits stay constant
    class Const(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 2, *x.shape[2:]) * torch.tensor([1.5, -2.0]).view(1, 2, 1, 1, 1)
    out = predict_sliding_window(Const(), torch.zeros(1, *shape), patch, 2)
    assert torch.allclose(out[0], torch.full(shape, 1.5)) and torch.allclose(out[1], torch.full(shape, -2.0))


@pytest.mark.parametrize("mirror", [None, (0, 1, 2)])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_sliding_window_reproduces_a_pointwise_network(mirror, batch_size):
    x = torch.randn(2, 21, 30, 13)
    net = Affine(2, 3).eval()
    out = predict_sliding_window(net, x, (8, 16, 8), 3, mirror_axes=mirror, batch_size=batch_size)
    with torch.no_grad():
        ref = net(x[None])[0]
    assert out.shape == (3, 21, 30, 13)
    assert torch.allclose(out, ref, atol=1e-5)


def test_padding_for_images_smaller_than_the_patch():
    x = torch.randn(1, 5, 7, 6)
    net = Affine(1, 2).eval()
    out = predict_sliding_window(net, x, (8, 8, 8), 2, mirror_axes=(0, 1, 2))
    assert out.shape == (2, 5, 7, 6)
    with torch.no_grad():
        assert torch.allclose(out, net(x[None])[0], atol=1e-5)


def test_2d_patches_on_a_3d_array():
    x = torch.randn(1, 4, 20, 17)
    net = Affine(1, 2, dim=2).eval()
    out = predict_sliding_window(net, x, (8, 8), 2, mirror_axes=(0, 1), batch_size=5)
    with torch.no_grad():
        ref = torch.stack([net(x[:, d][None])[0] for d in range(4)], 1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_mirroring_averages_all_flips():
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    x = torch.zeros(1, 8, 4, 4)
    out_plain = predict_sliding_window(AxisProbe(), x, (8, 4, 4), 2)
    out_mirror = predict_sliding_window(AxisProbe(), x, (8, 4, 4), 2, mirror_axes=(0,))
    ramp = torch.arange(8, dtype=torch.float32)
    assert torch.allclose(out_plain[0, :, 0, 0], ramp)
    # averaged with its flipped-back flip: (i + (7 - i)) / 2 everywhere
    assert torch.allclose(out_mirror[0], torch.full((8, 4, 4), 3.5))
    # mirroring over axes the probe ignores changes nothing
    out_other = predict_sliding_window(AxisProbe(), x, (8, 4, 4), 2, mirror_axes=(1, 2))
    assert torch.allclose(out_other, out_plain)


def test_members_average_probabilities():
    x = torch.randn(1, 6, 8, 8)
    a, b = Affine(1, 3, seed=1).eval(), Affine(1, 3, seed=2).eval()
    out = predict_sliding_window([a, b], x, (6, 8, 8), 3)
    with torch.no_grad():
        expected = (a(x[None]).softmax(1) + b(x[None]).softmax(1))[0] / 2
    assert torch.allclose(out.softmax(0), expected, atol=1e-5)
    out_r = SlidingWindowPredictor([a, b], (6, 8, 8), 3, regions=True).predict(x)
    with torch.no_grad():
        expected_r = (a(x[None]).sigmoid() + b(x[None]).sigmoid())[0] / 2
    assert torch.allclose(out_r.sigmoid(), expected_r, atol=1e-5)


def test_autocast_choice(monkeypatch):
    from autossl.inference import sliding_window as sw

    assert sw.autocast_dtype("cuda", None) == torch.float16
    assert sw.autocast_dtype("cuda", False) is None
    assert sw.autocast_dtype("cpu", True) == torch.bfloat16
    assert sw.autocast_dtype("cpu", None) is None  # autossl_cpu_amp=0 (fixture)
    monkeypatch.setenv("autossl_cpu_amp", "1")
    assert sw.autocast_dtype("cpu", None) == (torch.bfloat16 if sw.cpu_has_native_bf16() else None)
    # bf16 stays close to float32
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    x = torch.randn(1, 10, 12, 9)
    a = predict_sliding_window(net, x, (8, 8, 8), 2, use_amp=False)
    b = predict_sliding_window(net, x, (8, 8, 8), 2, use_amp=True)
    assert b.dtype == torch.float32
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item())


def test_wrong_head_count_is_reported():
    with pytest.raises(RuntimeError, match="does not match"):
        predict_sliding_window(Affine(1, 2), torch.zeros(1, 8, 8, 8), (8, 8, 8), 3)


# ============================================================================ plans for the tests
def _arch(dim: int) -> dict:
    c = "Conv3d" if dim == 3 else "Conv2d"
    n = "InstanceNorm3d" if dim == 3 else "InstanceNorm2d"
    k = [3] * dim
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": f"torch.nn.modules.conv.{c}",
                        "kernel_sizes": [k, k], "strides": [[1] * dim, [2] * dim], "n_conv_per_stage": [1, 1],
                        "n_conv_per_stage_decoder": [1], "conv_bias": True,
                        "norm_op": f"torch.nn.modules.instancenorm.{n}",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def tiny_plans(*, two_d: bool = False, spacing=(1.5, 1.0, 1.0), transpose=(0, 1, 2), patch=(16, 16, 16),
               reader: str = "SimpleITKIO") -> dict:
    dim = 2 if two_d else 3
    back = [int(i) for i in np.argsort(transpose)]
    cfg = {
        "data_identifier": f"autosslPlans_{'2d' if two_d else '3d_fullres'}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [20] * dim,
        "spacing": list(spacing), "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False, "architecture": _arch(dim),
    }
    return {
        "dataset_name": "Dataset999_Synthetic", "plans_name": "autosslPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [20, 20, 20],
        "image_reader_writer": reader, "transpose_forward": list(transpose), "transpose_backward": back,
        "configurations": {"2d" if two_d else "3d_fullres": cfg}, "experiment_planner_used": "test",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 300.0, "mean": 150.0, "median": 150.0,
                                                              "min": 0.0, "percentile_00_5": 1.0,
                                                              "percentile_99_5": 290.0, "std": 40.0}},
    }


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "head": 1, "tail": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}


def _random_unet_states(plans: dict, cfg: str, seed: int) -> dict:
    torch.manual_seed(seed)
    net = build_network(plans["configurations"][cfg]["architecture"], 1, 3, deep_supervision=False)
    return net.state_dict()


def _rotated_case(folder: Path, name: str = "rot_0000.nii.gz", shape=(14, 18, 15)) -> Path:
    """A 3D image with anisotropic spacing, an origin and a non-trivial direction matrix."""
    rng = np.random.default_rng(3)
    arr = np.zeros(shape, np.float32)
    arr[2:-2, 3:-3, 2:-1] = rng.normal(150, 40, (shape[0] - 4, shape[1] - 6, shape[2] - 3))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 1.1, 2.0))
    img.SetOrigin((-12.5, 40.25, 7.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = folder / name
    sitk.WriteImage(img, str(path))
    return path


def _assert_same_geometry(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    assert ia.GetSpacing() == ib.GetSpacing()
    assert ia.GetOrigin() == ib.GetOrigin()
    assert ia.GetDirection() == ib.GetDirection()


@pytest.fixture()
def raw3d(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw", 999, n_labeled=1, n_unlabeled=0, n_test=2, shape=(14, 20, 18))
    _rotated_case(folder / "imagesTs")
    return folder


# ============================================================================ predictor
def test_predict_from_files_3d_exact_geometry_with_resampling_and_transpose(raw3d, tmp_path):
    # target spacing differs (resampling both ways) and the axes are transposed
    plans = tiny_plans(spacing=(1.0, 1.4, 1.2), transpose=(2, 0, 1), patch=(16, 16, 16))
    pred = Predictor(device="cpu", allow_tqdm=False)
    pred.manual_initialization([{"network": _random_unet_states(plans, "3d_fullres", 0)}],
                               [{"name": "network", "arch": "cnn"}], plans, "3d_fullres", DATASET_JSON, (0, 1, 2))
    out = tmp_path / "out"
    written = pred.predict_from_files(raw3d / "imagesTs", out, save_probabilities=True,
                                      num_processes_preprocessing=2, num_processes_segmentation_export=2)
    cases = sorted(list_cases_in_folder(raw3d / "imagesTs", ".nii.gz", 1))
    assert sorted(Path(w).name for w in written) == [f"{c}.nii.gz" for c in cases]
    for c in cases:
        _assert_same_geometry(raw3d / "imagesTs" / f"{c}_0000.nii.gz", out / f"{c}.nii.gz")
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{c}.nii.gz")))
        assert set(np.unique(seg)) <= {0, 1, 2}
        with np.load(out / f"{c}.npz") as f:
            probs = f["probabilities"]
        assert probs.shape == (3, *seg.shape)
        assert np.allclose(probs.sum(0), 1, atol=1e-4)
        assert np.array_equal(probs.argmax(0), seg)
        assert (out / f"{c}.pkl").is_file()
    for f in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        assert (out / f).is_file()
    assert json.loads((out / "plans.json").read_text())["transpose_forward"] == [2, 0, 1]


def test_exported_segmentation_follows_the_input_voxels(raw3d, tmp_path):
    """A thresholding 'network': the output must be an upper level set of the raw intensities, in
    the raw voxel grid (catches any axis, crop or flip that is not undone)."""
    # the image's spacing is (2.0, 1.1, 0.9) in array order: transposed by (2, 0, 1) it is native
    plans = tiny_plans(spacing=(0.9, 2.0, 1.1), transpose=(2, 0, 1), patch=(8, 8, 16))
    pred = Predictor(device="cpu", allow_tqdm=False)
    pred.manual_initialization(None, None, plans, "3d_fullres", DATASET_JSON, (0, 1, 2), networks=[Threshold()])
    out = tmp_path / "out"
    pred.predict_from_files([[str(raw3d / "imagesTs" / "rot_0000.nii.gz")]], out, num_processes_preprocessing=1)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(raw3d / "imagesTs" / "rot_0000.nii.gz")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rot.nii.gz")))
    assert seg.shape == raw.shape
    assert 0 < seg.sum() < seg.size and set(np.unique(seg)) == {0, 1}
    inside = raw != 0
    assert (seg[~inside] == 0).all()
    assert raw[seg == 1].min() > raw[(seg == 0) & inside].max()


def test_predict_single_npy_array_equals_files(raw3d, tmp_path):
    from autossl.imageio.simpleitk_io import SimpleITKIO

    plans = tiny_plans(spacing=(1.5, 1.2, 1.0))
    pred = Predictor(device="cpu", allow_tqdm=False, use_mirroring=False)
    pred.manual_initialization([{"network": _random_unet_states(plans, "3d_fullres", 1)}],
                               [{"name": "network", "arch": "cnn"}], plans, "3d_fullres", DATASET_JSON, (0, 1, 2))
    f = raw3d / "imagesTs" / "rot_0000.nii.gz"
    img, props = SimpleITKIO().read_images([str(f)])
    seg, probs = pred.predict_single_npy_array(img, props, None, True)
    assert seg.shape == img.shape[1:] and probs.shape == (3, *img.shape[1:])
    pred.predict_from_files([[str(f)]], tmp_path / "o")
    on_disk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "rot.nii.gz")))
    assert np.array_equal(on_disk, seg)
    written = pred.predict_single_npy_array(img, props, tmp_path / "single" / "x")
    _assert_same_geometry(f, Path(written))


def test_png_2d_geometry_and_probabilities(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw", 998, name="Syn2D", two_d=True, n_labeled=1, n_unlabeled=0,
                                    n_test=2, shape=(27, 35))
    plans = tiny_plans(two_d=True, spacing=(1.0, 1.0), patch=(16, 16), reader="NaturalImage2DIO")
    dj = dict(DATASET_JSON, channel_names={"0": "gray"}, file_ending=".png")
    pred = Predictor(device="cpu", allow_tqdm=False)
    pred.manual_initialization([{"network": _random_unet_states(plans, "2d", 0)}], [{"name": "network", "arch": "cnn"}],
                               plans, "2d", dj, (0, 1))
    out = tmp_path / "out"
    pred.predict_from_files(folder / "imagesTs", out, save_probabilities=True)
    for img in sorted((folder / "imagesTs").glob("*.png")):
        case = img.name[:-len("_0000.png")]
        a, b = np.asarray(Image.open(img)), np.asarray(Image.open(out / f"{case}.png"))
        assert a.shape == b.shape == (27, 35)
        with np.load(out / f"{case}.npz") as f:
            assert f["probabilities"].shape == (3, 1, 27, 35)
            assert np.array_equal(f["probabilities"][:, 0].argmax(0), b)


def test_continue_prediction_skips_done_cases(raw3d, tmp_path):
    plans = tiny_plans()
    pred = Predictor(device="cpu", allow_tqdm=False, use_mirroring=False)
    pred.manual_initialization(None, None, plans, "3d_fullres", DATASET_JSON, None, networks=[Threshold()])
    out = tmp_path / "out"
    assert len(pred.predict_from_files(raw3d / "imagesTs", out)) == 3
    (out / "rot.nii.gz").unlink()
    assert [Path(w).name for w in pred.predict_from_files(raw3d / "imagesTs", out, overwrite=False)] == ["rot.nii.gz"]


def test_live_networks_restored_after_prediction():
    plans = tiny_plans(patch=(8, 8, 8))
    torch.manual_seed(0)
    net = build_network(plans["configurations"]["3d_fullres"]["architecture"], 1, 3, deep_supervision=True)
    net.train()
    pred = Predictor(device="cpu", allow_tqdm=False)
    pred.manual_initialization(None, None, plans, "3d_fullres", DATASET_JSON, (0, 1, 2), networks={"student": net})
    logits = pred.predict_logits_from_preprocessed_data(torch.randn(1, 10, 9, 8))
    assert logits.shape == (3, 10, 9, 8)
    assert net.training and net.decoder.deep_supervision
    probs = pred.predict_probabilities_from_preprocessed_data(np.random.rand(1, 10, 9, 8).astype(np.float32))
    assert torch.allclose(probs.sum(0), torch.ones(10, 9, 8), atol=1e-5)


def _model_folder(root: Path, plans: dict, folds=(0, 1), members=("network",), trainer="autosslTrainer") -> Path:
    mf = root / "Dataset999_Synthetic" / f"{trainer}__autosslPlans__3d_fullres"
    save_json(plans, mf / "plans.json")
    save_json(DATASET_JSON, mf / "dataset.json")
    for k, f in enumerate(folds):
        nets = {m: _random_unet_states(plans, "3d_fullres", 10 * k + i) for i, m in enumerate(members)}
        save_torch({"network_weights": nets[members[0]], "networks": nets,
                    "inference_networks": [{"name": m, "arch": "cnn"} for m in members],
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": f,
                                  "dataset_json": DATASET_JSON},
                    "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1, 2), "current_step": 1},
                   mf / f"fold_{f}" / "checkpoint_final.pth")
    return mf


def test_folds_average_logits_and_members_average_probabilities(tmp_path):
    plans = tiny_plans(patch=(16, 16, 16))
    mf = _model_folder(tmp_path, plans, folds=(0, 1), members=("student", "teacher"))
    data = torch.randn(1, 12, 14, 13)
    both = Predictor(allow_tqdm=False)
    both.initialize_from_trained_model_folder(mf, None)
    assert both.num_folds == 2 and [s["name"] for s in both.network_specs] == ["student", "teacher"]
    assert both.allowed_mirroring_axes == (0, 1, 2)
    singles = []
    for f in (0, 1):
        p = Predictor(allow_tqdm=False)
        p.initialize_from_trained_model_folder(mf, [f])
        singles.append(p.predict_logits_from_preprocessed_data(data))
    assert torch.allclose(both.predict_logits_from_preprocessed_data(data), (singles[0] + singles[1]) / 2, atol=1e-5)
    # members: probability average of the two networks of a fold (image fits one tile)
    no_tta = Predictor(allow_tqdm=False, use_mirroring=False)
    no_tta.initialize_from_trained_model_folder(mf, [0])
    nets = no_tta.networks
    with torch.no_grad():
        x = torch.nn.functional.pad(data, (1, 2, 1, 1, 2, 2))[None]  # centred zero padding to the patch
        expected = (nets["student"](x).softmax(1) + nets["teacher"](x).softmax(1))[0, :, 2:14, 1:15, 1:14] / 2
    got = no_tta.predict_probabilities_from_preprocessed_data(data)
    assert torch.allclose(got, expected, atol=1e-5)


def test_predict_preprocessed_cases(tmp_path, raw3d):
    from autossl.preprocessing import storage
    from autossl.preprocessing.preprocessor import DefaultPreprocessor
    from autossl.planning.plans_handler import PlansManager

    plans = tiny_plans(spacing=(1.0, 1.2, 1.0))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    pre = tmp_path / "pre"
    f = raw3d / "imagesTs" / "rot_0000.nii.gz"
    data, _, props = DefaultPreprocessor().run_case([str(f)], None, pm, cm, DATASET_JSON)
    storage.save_case(pre, "rot", data, None, props, cm.patch_size)
    pred = Predictor(allow_tqdm=False, use_mirroring=False)
    pred.manual_initialization([{"network": _random_unet_states(plans, "3d_fullres", 0)}],
                               [{"name": "network", "arch": "cnn"}], plans, "3d_fullres", DATASET_JSON, None)
    probs = pred.predict_preprocessed_cases(pre, ["rot"])
    assert probs["rot"].shape == (3, *data.shape[1:]) and np.allclose(probs["rot"].sum(0), 1, atol=1e-5)
    written = pred.predict_preprocessed_cases(pre, None, output_folder=tmp_path / "val")
    _assert_same_geometry(f, Path(written[0]))
    pred.predict_from_files([[str(f)]], tmp_path / "direct")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(written[0])),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "direct" / "rot.nii.gz"))))


# ============================================================================ ensembling
def test_ensemble_equals_average(raw3d, tmp_path):
    plans = tiny_plans()
    outs = []
    for seed in (0, 1):
        p = Predictor(allow_tqdm=False, use_mirroring=False)
        p.manual_initialization([{"network": _random_unet_states(plans, "3d_fullres", seed)}],
                                [{"name": "network", "arch": "cnn"}], plans, "3d_fullres", DATASET_JSON, None)
        outs.append(tmp_path / f"p{seed}")
        p.predict_from_files(raw3d / "imagesTs", outs[-1], save_probabilities=True)
    (outs[1] / "rot.npz").unlink()  # only the common cases are ensembled
    ens = tmp_path / "ens"
    written = ensemble_folders(outs, ens, save_merged_probabilities=True, num_processes=2, allow_tqdm=False)
    assert sorted(Path(w).name for w in written) == sorted(f.name for f in outs[1].glob("*.nii.gz")
                                                           if f.name != "rot.nii.gz")
    for w in written:
        case = Path(w).name[:-7]
        avg = (np.load(outs[0] / f"{case}.npz")["probabilities"] + np.load(outs[1] / f"{case}.npz")["probabilities"]) / 2
        assert np.allclose(np.load(ens / f"{case}.npz")["probabilities"], avg, atol=1e-6)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(w))
        assert np.array_equal(seg, avg.argmax(0))
        _assert_same_geometry(raw3d / "imagesTs" / f"{case}_0000.nii.gz", Path(w))
    assert (ens / "dataset.json").is_file() and (ens / "plans.json").is_file()
    # incompatible label sets are refused
    dj = json.loads((outs[1] / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "x": 1}
    (outs[1] / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(EnsembleError, match="labels"):
        ensemble_folders(outs, tmp_path / "ens2", allow_tqdm=False)


# ============================================================================ CLI errors
def test_cli_errors(tmp_path, monkeypatch, capsys, raw3d):
    from autossl.cli.predict import main

    monkeypatch.setenv("autossl_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("autossl_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("autossl_results", str(tmp_path / "res"))
    (tmp_path / "res").mkdir()
    rc = main(["-i", str(raw3d / "imagesTs"), "-o", str(tmp_path / "o"), "-d", "999", "-c", "3d_fullres",
               "--ssl", "ucmt", "-device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "autosslTrainer_ucmt__autosslPlans__3d_fullres" in err and "autossl_train 999" in err

    mf = _model_folder(tmp_path / "res", tiny_plans(), folds=(0,))
    rc = main(["-i", str(raw3d / "imagesTs"), "-o", str(tmp_path / "o"), "-d", "999", "-c", "3d_fullres",
               "-f", "3", "-device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and str(mf / "fold_3" / "checkpoint_final.pth") in err and "autossl_train" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["-i", str(empty), "-o", str(tmp_path / "o"), "-d", "999", "-c", "3d_fullres", "-device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and str(empty) in err and "empty" in err

    two = tmp_path / "two"
    two.mkdir()
    (two / "a_0000.nii.gz").write_bytes((raw3d / "imagesTs" / "rot_0000.nii.gz").read_bytes())
    (two / "a_0001.nii.gz").write_bytes((raw3d / "imagesTs" / "rot_0000.nii.gz").read_bytes())
    (two / "b_0001.nii.gz").write_bytes((raw3d / "imagesTs" / "rot_0000.nii.gz").read_bytes())
    with pytest.raises(PredictionError, match="channel 0 of case b is missing"):
        list_cases_in_folder(two, ".nii.gz", 2)
    rc = main(["-i", str(two), "-o", str(tmp_path / "o"), "-d", "999", "-c", "3d_fullres", "-device", "cpu"])
    assert rc == 1 and "channel" in capsys.readouterr().err

    rc = main(["-i", str(raw3d / "imagesTs"), "-o", str(tmp_path / "o2"), "-d", "999", "-c", "3d_fullres",
               "-device", "cpu", "--disable_tta", "--disable_progress_bar", "-npp", "1", "-nps", "1"])
    assert rc == 0 and len(list((tmp_path / "o2").glob("*.nii.gz"))) == 3


def test_the_trainer_naming_imports_neither_the_trainer_nor_torch():
    """``autossl_predict`` and model selection find a model folder by the trainer's name."""
    import subprocess
    import sys

    code = ("import sys; from autossl.training.naming import trainer_name; "
            "assert trainer_name('none') == 'autosslTrainer' and trainer_name('ucmt', 'transformer') == "
            "'autosslTrainer_ucmt_transformer'; "
            "assert 'torch' not in sys.modules and 'autossl.training.trainer' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ensemble_cli_errors(tmp_path, capsys):
    from autossl.cli.ensemble import main

    a = tmp_path / "a"
    a.mkdir()
    assert main(["-i", str(a), str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 1
    assert "missing" in capsys.readouterr().err


# ============================================================================ real data
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Task04_Hippocampus"


@pytest.mark.realdata
@pytest.mark.parametrize("reader", ["SimpleITKIO", "NibabelIO"])
def test_real_hippocampus_geometry(tmp_path, reader):
    """A real MSD Hippocampus image: the prediction has its exact size, spacing, origin, direction
    (SimpleITK) resp. affine (nibabel)."""
    import nibabel as nib

    images = sorted((REAL / "imagesTr").glob("hippocampus_*.nii.gz")) if REAL.is_dir() else []
    if not images:
        pytest.skip(f"real data not found at {REAL}")
    src = images[0]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / (src.name[:-7] + "_0000.nii.gz")).write_bytes(src.read_bytes())
    img = sitk.ReadImage(str(src))
    spacing = list(img.GetSpacing()[::-1])  # array order (both readers give z, y, x)
    plans = tiny_plans(spacing=spacing, patch=(16, 16, 16), reader=reader)
    pred = Predictor(allow_tqdm=False)
    pred.manual_initialization([{"network": _random_unet_states(plans, "3d_fullres", 0)}],
                               [{"name": "network", "arch": "cnn"}], plans, "3d_fullres", DATASET_JSON, (0, 1, 2))
    out = tmp_path / "out"
    pred.predict_from_files(inp, out, save_probabilities=True)
    result = out / src.name
    _assert_same_geometry(src, result)
    a, b = nib.load(str(src)), nib.load(str(result))
    assert np.allclose(a.affine, b.affine) and a.shape == b.shape
    with np.load(out / (src.name[:-7] + ".npz")) as f:
        assert f["probabilities"].shape == (3, *sitk.GetArrayFromImage(img).shape)


def test_cli_postprocess_applies_the_model_folders_rule(tmp_path, monkeypatch, raw3d):
    import cc3d

    from autossl.cli.predict import main
    from autossl.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as keep_largest, save_postprocessing)

    monkeypatch.setenv("autossl_results", str(tmp_path / "res"))
    monkeypatch.setenv("autossl_raw", str(tmp_path / "raw"))
    mf = _model_folder(tmp_path / "res", tiny_plans(), folds=(0,))
    args = ["-i", str(raw3d / "imagesTs"), "-d", "999", "-c", "3d_fullres", "-device", "cpu", "--disable_tta",
            "--disable_progress_bar"]
    assert main(args + ["-o", str(tmp_path / "plain")]) == 0
    save_postprocessing(mf, [keep_largest], [{"labels_or_regions": [1, 2]}])
    assert main(args + ["-o", str(tmp_path / "pp"), "--postprocess"]) == 0
    changed = 0
    for f in sorted((tmp_path / "pp").glob("*.nii.gz")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / f.name)))
        assert np.array_equal(seg, keep_largest(plain, [1, 2]))
        assert cc3d.connected_components(seg > 0, connectivity=26).max() <= 1
        changed += int(not np.array_equal(seg, plain))
        _assert_same_geometry(raw3d / "imagesTs" / f.name.replace(".nii.gz", "_0000.nii.gz"), f)
    assert changed > 0  # the random network leaves stray components that the rule removes


def test_2d_configuration_on_3d_volumes(raw3d, tmp_path):
    """A 2d configuration on 3D images: slices tiled one by one, in-plane resampling undone."""
    plans = tiny_plans(two_d=True, spacing=(1.3, 0.8), patch=(16, 16))
    pred = Predictor(allow_tqdm=False)
    pred.manual_initialization([{"network": _random_unet_states(plans, "2d", 0)}], [{"name": "network", "arch": "cnn"}],
                               plans, "2d", DATASET_JSON, (0, 1))
    out = tmp_path / "out"
    pred.predict_from_files(raw3d / "imagesTs", out, save_probabilities=True)
    for f in sorted((raw3d / "imagesTs").glob("*_0000.nii.gz")):
        res = out / f.name.replace("_0000", "")
        _assert_same_geometry(f, res)
        with np.load(str(res)[:-7] + ".npz") as z:
            assert z["probabilities"].shape[1:] == sitk.GetArrayFromImage(sitk.ReadImage(str(f))).shape
