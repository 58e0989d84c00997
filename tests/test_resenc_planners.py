"""nnU-Net's residual-encoder presets (``-pl nnUNetPlannerResEncM`` / ``nnUNetPlannerResEncL``):
the estimate equals ResidualEncoderUNet's own, the plans follow nnU-Net's ResEnc rules, the
planned network runs on its patch, and the trainer and predictor take the class from the plans."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autossl.networks.build import build_network
from autossl.planning import ExperimentPlanner, ResEncLPlanner, ResEncMPlanner, get_planner
from autossl.planning.resenc_planner import RESIDUAL_ENCODER_UNET, residual_encoder_unet_feature_map_size
from autossl.utilities.file_io import load_json, save_json
from autossl.utilities.synthetic import make_synthetic_dataset

torch.set_num_threads(1)


@pytest.fixture
def env(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("raw", "pre", "res")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("autossl_raw", str(dirs["raw"]))
    monkeypatch.setenv("autossl_preprocessed", str(dirs["pre"]))
    monkeypatch.setenv("autossl_results", str(dirs["res"]))
    monkeypatch.setenv("autossl_n_proc_DA", "0")
    monkeypatch.setenv("autossl_cpu_amp", "0")
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr("autossl.fingerprint.extractor.NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS", 3e5)
    return dirs


def fake_dataset(env, spacings, shapes, name="Dataset981_ResEnc", n_labels=3) -> str:
    (env["raw"] / name).mkdir()
    (env["pre"] / name).mkdir()
    labels = {"background": 0, **{f"c{i}": i for i in range(1, n_labels)}}
    save_json({"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(spacings),
               "file_ending": ".nii.gz"}, env["raw"] / name / "dataset.json")
    save_json({"spacings": spacings, "shapes_after_crop": shapes,
               "foreground_intensity_properties_per_channel": {"0": {
                   "mean": 0.0, "std": 1.0, "median": 0.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
                   "percentile_99_5": 1.0}},
               "median_relative_size_after_cropping": 1.0, "n_labeled": len(spacings), "n_unlabeled": 0},
              env["pre"] / name / "dataset_fingerprint.json")
    return name


def test_planner_names():
    for n in ("nnUNetPlannerResEncM", "resenc_m", "ResEncM", "nnUNetResEncUNetMPlans", "autosslResEncUNetMPlans"):
        assert get_planner(n) is ResEncMPlanner
    for n in ("nnUNetPlannerResEncL", "RESENC_L", "nnUNetResEncUNetLPlans"):
        assert get_planner(n) is ResEncLPlanner
    with pytest.raises(ValueError, match="nnUNetPlannerResEncM"):
        get_planner("nnUNetPlannerResEncXXL")


def test_plans_follow_nnunets_resenc_rules(env):
    """Hippocampus-sized (36 x 50 x 35, 1 mm) and a larger anisotropic dataset."""
    small = fake_dataset(env, [[1.0, 1.0, 1.0]] * 260, [[36, 50, 35]] * 260)
    large = fake_dataset(env, [[3.0, 0.8, 0.8]] * 30, [[60, 300, 280]] * 30, name="Dataset982_Large")
    default = ExperimentPlanner(small).plan_experiment()["configurations"]["3d_fullres"]
    m_plans = ResEncMPlanner(small).plan_experiment()
    assert m_plans["plans_name"] == "autosslResEncUNetMPlans"
    assert m_plans["experiment_planner_used"] == "ResEncMPlanner"
    assert (env["pre"] / small / "autosslResEncUNetMPlans.json").is_file()
    m = m_plans["configurations"]["3d_fullres"]
    a = m["architecture"]
    assert a["network_class_name"] == RESIDUAL_ENCODER_UNET
    kw = a["arch_kwargs"]
    assert list(kw)[:7] == ["n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                            "n_blocks_per_stage", "n_conv_per_stage_decoder"]
    assert "n_conv_per_stage" not in kw
    n = kw["n_stages"]
    assert kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6][:n] and kw["n_conv_per_stage_decoder"] == [1] * (n - 1)
    assert kw["features_per_stage"] == [min(320, 32 * 2 ** i) for i in range(n)]
    assert m["data_identifier"] == "autosslResEncUNetMPlans_3d_fullres"
    # same spacing and patch rule start as the default plans: the patch covers the small image
    assert m["spacing"] == default["spacing"] and m["patch_size"] == default["patch_size"] == [40, 56, 40]
    est = residual_encoder_unet_feature_map_size(m["patch_size"], kw, 3)
    # no 5% cap (nnU-Net's max_dataset_covered = 1): batch = round(680e6 / estimate * 2)
    assert m["batch_size"] == round(680e6 / est * 2) > default["batch_size"] == 9

    l_plans = ResEncLPlanner(small).plan_experiment()
    lo = l_plans["configurations"]["3d_fullres"]
    assert l_plans["plans_name"] == "autosslResEncUNetLPlans" and lo["patch_size"] == m["patch_size"]
    assert lo["batch_size"] == round(2.1e9 / est * 2)

    for planner, ref3d, ref2d in ((ResEncMPlanner, 680e6, 135e6), (ResEncLPlanner, 2.1e9, 380e6)):
        cfgs = planner(large).plan_experiment()["configurations"]
        c3, c2 = cfgs["3d_fullres"], cfgs["2d"]
        e3 = residual_encoder_unet_feature_map_size(c3["patch_size"], c3["architecture"]["arch_kwargs"], 3)
        e2 = residual_encoder_unet_feature_map_size(c2["patch_size"], c2["architecture"]["arch_kwargs"], 3)
        # nnU-Net's ResEnc loop: the patch shrinks until the estimate is within the reference (2D: a
        # batch of 12 fits, not 2 as in the default planner)
        assert e3 <= ref3d and e2 <= ref2d
        assert c3["patch_size"] != [60, 300, 280]  # it did shrink
        assert c3["batch_size"] == max(2, round(ref3d / e3 * 2)) and c2["batch_size"] == max(2, round(ref2d / e2 * 12))


@pytest.mark.parametrize("patch,strides,ds", [
    ((40, 56, 40), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], False),
    ((20, 96, 80), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2], [2, 2, 2]], True),
    ((56, 40), [[1, 1], [2, 2], [2, 2], [2, 2]], False),
])
def test_estimate_equals_dynamic_network_architectures(patch, strides, ds):
    dim, n = len(patch), len(strides)
    kw = {"n_stages": n, "features_per_stage": [min(320, 32 * 2 ** i) for i in range(n)],
          "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": [[3] * dim] * n, "strides": strides,
          "n_blocks_per_stage": [1, 3, 4, 6, 6][:n], "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
          "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
          "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    arch = {"network_class_name": RESIDUAL_ENCODER_UNET, "arch_kwargs": kw,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    with torch.device("meta"):
        net = build_network(arch, 2, 4, deep_supervision=ds)
    assert residual_encoder_unet_feature_map_size(patch, kw, 4, ds) == int(net.compute_conv_feature_map_size(patch))


def test_planned_network_runs_on_its_patch(env):
    name = fake_dataset(env, [[1.0, 1.0, 1.0]] * 20, [[36, 50, 35]] * 20)
    cfgs = ResEncMPlanner(name).plan_experiment()["configurations"]
    for c in ("3d_fullres", "2d"):
        arch = json.loads(json.dumps(cfgs[c]["architecture"]))
        n = arch["arch_kwargs"]["n_stages"]
        arch["arch_kwargs"]["features_per_stage"] = [2 * 2 ** i for i in range(n)]  # thin, for the test
        torch.manual_seed(0)
        net = build_network(arch, input_channels=1, num_classes=3, deep_supervision=True)
        assert type(net).__name__ == "ResidualEncoderUNet"
        patch = cfgs[c]["patch_size"]
        with torch.no_grad():
            out = net(torch.randn(1, 1, *patch))
        assert len(out) == n - 1 and tuple(out[0].shape) == (1, 3, *patch)


def test_trainer_and_predictor_take_the_residual_encoder_from_the_plans(env):
    from autossl.inference.predictor import Predictor
    from autossl.preprocessing.preprocessor import run_configurations
    from autossl.training.trainer import Trainer

    folder = make_synthetic_dataset(env["raw"], 983, "ResEncTiny", n_labeled=4, n_unlabeled=2, n_test=1,
                                    shape=(16, 20, 20), spacing=(1.0, 1.0, 1.0), seed=2)
    from autossl.cli.plan_and_preprocess import main as plan_and_preprocess

    plan_and_preprocess(["-d", "983", "-pl", "nnUNetPlannerResEncM", "-np", "1", "--no_pp"])
    plans = load_json(env["pre"] / folder.name / "autosslResEncUNetMPlans.json")
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == RESIDUAL_ENCODER_UNET
    # a thin copy of the planned configuration (a user-written plans file), still a ResidualEncoderUNet
    tiny = "autosslResEncUNetMPlansTiny"
    cfg = dict(plans["configurations"]["3d_fullres"])
    kw = cfg["architecture"]["arch_kwargs"]
    kw.update(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_blocks_per_stage=[1, 3, 4], n_conv_per_stage_decoder=[1, 1])
    cfg.update(patch_size=[8, 16, 16], batch_size=2, data_identifier=f"{tiny}_3d_fullres")
    plans.update(plans_name=tiny, configurations={"3d_fullres": cfg})
    save_json(plans, env["pre"] / folder.name / f"{tiny}.json")
    run_configurations(folder.name, ["3d_fullres"], tiny, 1)

    t = Trainer(983, "3d_fullres", "all", plans=tiny, verbose=False, epochs=1, iterations_per_epoch=2,
                val_iterations=1, num_workers=0, device="cpu")
    t.run()
    ckpt = torch.load(t.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    keys = list(ckpt["network_weights"])
    assert any(k.startswith("encoder.stem.") for k in keys)  # ResidualEncoderUNet's stem, not PlainConvUNet's
    assert any(".blocks.2." in k for k in keys)  # three residual blocks in the second stage
    pred = Predictor(device="cpu", allow_tqdm=False, use_mirroring=False)
    pred.initialize_from_trained_model_folder(t.output_folder.parent, ["all"])
    out = env["res"] / "preds"
    written = pred.predict_from_files(folder / "imagesTs", out)
    assert len(written) == 1 and load_json(out / "plans.json")["plans_name"] == tiny
    assert np.isfinite(float(ckpt["logging"]["history"]["train_loss"][-1]))
