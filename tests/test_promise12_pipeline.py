"""A PROMISE12-shaped dataset through the whole command-line path: the challenge's raw layout
(``TrainingData_PartN/CaseNN.mhd`` + ``CaseNN_segmentation.mhd``, test cases without
segmentations) -> ``autossl_convert_promise12`` -> ``autossl_plan_and_preprocess -d 12`` -> the
no-fold ``autossl_train 12 3d_fullres --ssl mean_teacher`` (every fold, then the cross-validation
summary) -> ``autossl_predict`` without ``-f``. Images are small synthetic prostates with
PROMISE12's anisotropy and its spread of spacings, so that resampling to the target spacing is
exercised; training is a few steps per fold."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autossl.utilities.file_io import load_json

# PROMISE12's cases differ in resolution (in-plane 0.27-0.75 mm, slices 2.2-4 mm); a few of them
SPACINGS = [(0.625, 0.625, 3.6), (0.6, 0.6, 3.0), (0.7, 0.7, 3.6), (0.5, 0.5, 2.2), (0.625, 0.625, 3.6),
            (0.6, 0.6, 4.0), (0.65, 0.65, 3.3)]
EXTENT_MM = (24.0, 22.0, 36.0)  # x, y, z field of view of every synthetic scan (small: the test trains on it)


def _scan(rng, spacing, with_label: bool = True):
    """An MR-like volume with a bright ellipsoidal 'prostate' (14 x 12 x 16 mm) off centre."""
    size = [int(round(e / s)) for e, s in zip(EXTENT_MM, spacing)]  # x, y, z
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(size[::-1], spacing[::-1])], indexing="ij")
    c = np.array(EXTENT_MM) / 2 + rng.uniform(-2, 2, 3)
    inside = ((x - c[0]) / 7) ** 2 + ((y - c[1]) / 6) ** 2 + ((z - c[2]) / 8) ** 2 <= 1
    img = 300 + 500 * inside + rng.normal(0, 60, inside.shape)
    image = sitk.GetImageFromArray(img.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 35.5, -12.0))
    seg = None
    if with_label:
        seg = sitk.GetImageFromArray(inside.astype(np.uint8))
        seg.CopyInformation(image)
    return image, seg


def make_promise12_layout(root: Path, n_train: int = 6, n_test: int = 1, seed: int = 0) -> tuple[Path, Path]:
    """The challenge's unzipped folders: training parts with CaseNN(.mhd/.raw) and their segmentations."""
    rng = np.random.default_rng(seed)
    train, test = root / "train", root / "test"
    for i in range(n_train):
        part = train / f"TrainingData_Part{i % 3 + 1}"
        part.mkdir(parents=True, exist_ok=True)
        image, seg = _scan(rng, SPACINGS[i % len(SPACINGS)])
        sitk.WriteImage(image, str(part / f"Case{i:02d}.mhd"))
        sitk.WriteImage(seg, str(part / f"Case{i:02d}_segmentation.mhd"))
    test.mkdir(parents=True)
    for i in range(n_test):
        image, _ = _scan(rng, SPACINGS[-1 - i], with_label=False)
        sitk.WriteImage(image, str(test / f"Case{i:02d}.mhd"))
    return train, test


@pytest.fixture
def env(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("raw", "pre", "res")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("autossl_raw", str(dirs["raw"]))
    monkeypatch.setenv("autossl_preprocessed", str(dirs["pre"]))
    monkeypatch.setenv("autossl_results", str(dirs["res"]))
    monkeypatch.setenv("autossl_n_proc_DA", "0")
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(v, raising=False)
    # 3e5 foreground samples instead of nnU-Net's 1e8 (same code path, seconds less)
    monkeypatch.setattr("autossl.fingerprint.extractor.NUM_FOREGROUND_VOXELS_FOR_INTENSITYSTATS", 3e5)
    return dirs


def test_promise12_convert_plan_preprocess_train_every_fold_predict(env, tmp_path, capsys):
    from autossl.cli.plan_and_preprocess import main as plan_and_preprocess
    from autossl.cli.predict import main as predict
    from autossl.cli.train import main as train
    from autossl.preprocessing import storage
    from dataset_conversion.convert_promise12 import main as convert

    train_dir, test_dir = make_promise12_layout(tmp_path / "PROMISE12")
    convert(["-i", str(train_dir), "--test-folder", str(test_dir), "--labeled", "3", "--holdout", "1",
             "--seed", "0", "-np", "1"])
    folder = env["raw"] / "Dataset012_PROMISE12"
    dj = load_json(folder / "dataset.json")
    assert dj["numTraining"] == 3 and dj["numUnlabeled"] == 2 and dj["labels"] == {"background": 0, "prostate": 1}

    plan_and_preprocess(["-d", "12", "-np", "1", "--verify_dataset_integrity"])
    pre = env["pre"] / "Dataset012_PROMISE12"
    plans = load_json(pre / "autosslPlans.json")
    cfg = plans["configurations"]["3d_fullres"]
    # the slice axis goes first and keeps its coarse spacing (anisotropic data, nnU-Net's rules)
    assert plans["transpose_forward"] == [0, 1, 2] and cfg["spacing"][0] > 3 * cfg["spacing"][1]
    assert cfg["spacing"][1] == cfg["spacing"][2] == pytest.approx(0.625)
    ident = cfg["data_identifier"]
    assert len(storage.list_cases(pre / ident)) == 3 and len(storage.list_cases(pre / f"{ident}_unlabeled")) == 2
    for case in storage.list_cases(pre / ident):  # every case resampled to the target spacing
        d, s, p = storage.load_case(pre / ident, case)
        expected = [round(n * sp / t) for n, sp, t in zip(p["shape_after_cropping_and_before_resampling"],
                                                           p["spacing"], cfg["spacing"])]
        assert list(np.asarray(d).shape[1:]) == expected and np.asarray(s).max() == 1

    # the plans' network is far too slow for a test on 2 cores: the same configuration and data with a
    # thin 3-stage U-Net and a small patch (a user-written plans file)
    thin = json.loads(json.dumps(plans))
    c = thin["configurations"]["3d_fullres"]
    c["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    c.update(batch_size=2, patch_size=[8, 24, 24], transformer_architecture=None)
    thin["plans_name"] = "autosslPlansThin"
    thin["configurations"] = {"3d_fullres": thin["configurations"]["3d_fullres"]}  # same data identifier
    (pre / "autosslPlansThin.json").write_text(json.dumps(thin))

    capsys.readouterr()
    assert train(["12", "3d_fullres", "-p", "autosslPlansThin", "--ssl", "mean_teacher", "--npz", "--epochs", "1",
                  "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "0",
                  "-device", "cpu"]) == 0
    assert "only 3 labelled cases: 3-fold cross-validation" in capsys.readouterr().out
    model = env["res"] / "Dataset012_PROMISE12" / "autosslTrainer_mean_teacher__autosslPlansThin__3d_fullres"
    for f in range(3):
        assert (model / f"fold_{f}" / "checkpoint_final.pth").is_file()
    summary = load_json(model / "crossval_results_folds_0_1_2" / "summary.json")
    assert len(summary["metric_per_case"]) == 3  # every labelled case validated once

    out = env["res"] / "preds"
    assert predict(["-i", str(folder / "imagesTs"), "-o", str(out), "-d", "12", "-c", "3d_fullres",
                    "-p", "autosslPlansThin", "--ssl", "mean_teacher", "-device", "cpu", "--disable_tta",
                    "--disable_progress_bar", "-npp", "1", "-nps", "1"]) == 0
    written = sorted(out.glob("*.nii.gz"))
    assert len(written) == 2 and "test_Case00.nii.gz" in {w.name for w in written}  # + the held-out case
    for w in written:  # predictions in each test image's own geometry
        pred = sitk.ReadImage(str(w))
        ref = sitk.ReadImage(str(folder / "imagesTs" / w.name.replace(".nii.gz", "_0000.nii.gz")))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin())
