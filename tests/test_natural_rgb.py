"""RGB natural images in nnU-Net's convention: one RGB ``case_0000.png`` per case and
``channel_names`` {"0": "R", "1": "G", "2": "B"} (nnU-Net's Dataset120_RoadSegmentation), through
the listing, the integrity check, fingerprint, CPU plans, preprocessing, a tiny training and
prediction; grey files split per channel still work; wrong layouts are errors naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autossl.imageio.natural_image_io import NaturalImage2DIO
from autossl.inference.predictor import PredictionError, list_cases_in_folder
from autossl.raw.dataset import DatasetError, RawDataset
from autossl.raw.integrity import verify_dataset_integrity

SHAPE = (24, 28)


def _case(rng, shape=SHAPE):
    """RGB image whose channels differ (R bright on the structure, G noise, B the inverse of R)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
    seg = (((yy - cy) / 6.0) ** 2 + ((xx - cx) / 7.0) ** 2 <= 1).astype(np.uint8)
    r = np.clip(60 + 150 * seg + rng.normal(0, 10, shape), 1, 255)
    g = np.clip(100 + rng.normal(0, 20, shape), 1, 255)
    b = np.clip(255 - r, 1, 255)
    return np.stack([r, g, b], -1).astype(np.uint8), seg


def make_rgb_dataset(raw: Path, dataset_id: int = 121, n_lab: int = 4, n_unl: int = 2, n_test: int = 2,
                     seed: int = 0) -> Path:
    """A raw dataset exactly as nnU-Net's RoadSegmentation converter writes one (plus unlabelled cases)."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_Rgb"
    for sub in ("imagesTr", "labelsTr", "imagesTrUnlabeled", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for i in range(n_lab + n_unl + n_test):
        img, seg = _case(rng)
        case = f"img-{i:02d}"
        sub = "imagesTr" if i < n_lab else "imagesTrUnlabeled" if i < n_lab + n_unl else "imagesTs"
        Image.fromarray(img).save(folder / sub / f"{case}_0000.png")
        if i < n_lab:
            Image.fromarray(seg).save(folder / "labelsTr" / f"{case}.png")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "road": 1},
        "numTraining": n_lab, "file_ending": ".png"}))
    return folder


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
    return dirs


def test_one_rgb_file_is_the_three_channels(tmp_path):
    folder = make_rgb_dataset(tmp_path, n_lab=2, n_unl=1, n_test=1)
    raw = RawDataset(folder)
    assert raw.labeled["img-00"]["images"] == [str(folder / "imagesTr" / "img-00_0000.png")]
    assert raw.unlabeled["img-02"]["images"] == [str(folder / "imagesTrUnlabeled" / "img-02_0000.png")]
    assert verify_dataset_integrity(folder, 1) == []
    data, props = NaturalImage2DIO().read_images(raw.labeled["img-00"]["images"])
    rgb = np.asarray(Image.open(folder / "imagesTr" / "img-00_0000.png"))
    assert data.shape == (3, 1, *SHAPE)
    for c in range(3):
        np.testing.assert_array_equal(data[c, 0], rgb[..., c])
    # the predictor's listing of an imagesTs folder groups the same way
    assert list_cases_in_folder(folder / "imagesTs", ".png", 3) == {
        "img-03": [str(folder / "imagesTs" / "img-03_0000.png")]}


def test_grey_files_split_per_channel_still_work(tmp_path):
    folder = make_rgb_dataset(tmp_path, n_lab=2, n_unl=0, n_test=0)
    rgb_file = folder / "imagesTr" / "img-01_0000.png"
    rgb = np.asarray(Image.open(rgb_file))
    before, _ = NaturalImage2DIO().read_images([str(rgb_file)])
    rgb_file.unlink()
    for c in range(3):
        Image.fromarray(rgb[..., c]).save(folder / "imagesTr" / f"img-01_{c:04d}.png")
    raw = RawDataset(folder)
    assert [Path(f).name for f in raw.labeled["img-01"]["images"]] == [f"img-01_{c:04d}.png" for c in range(3)]
    assert len(raw.labeled["img-00"]["images"]) == 1  # the other case stays one RGB file
    assert verify_dataset_integrity(folder, 1) == []
    after, _ = NaturalImage2DIO().read_images(raw.labeled["img-01"]["images"])
    np.testing.assert_array_equal(before, after)


def test_wrong_channel_layouts_name_the_file(tmp_path):
    folder = make_rgb_dataset(tmp_path, n_lab=3, n_unl=0, n_test=0)
    tr = folder / "imagesTr"
    # a grey image where dataset.json lists R, G, B
    grey = np.asarray(Image.open(tr / "img-00_0000.png"))[..., 0]
    Image.fromarray(grey).save(tr / "img-00_0000.png")
    # an extra file for a channel the RGB file already holds
    Image.fromarray(grey).save(tr / "img-01_0001.png")
    # RGBA: one channel more than listed
    rgba = np.concatenate([np.asarray(Image.open(tr / "img-02_0000.png")), np.full((*SHAPE, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, mode="RGBA").save(tr / "img-02_0000.png")
    lines = verify_dataset_integrity(folder, 1)
    missing = [ln for ln in lines if ln.startswith(str(tr / "img-00_0001.png"))]
    assert len(missing) == 1 and "channel 1 of case img-00 is missing" in missing[0]
    assert "img-00_0000.png holds 1 channel" in missing[0]
    assert any(ln.startswith(str(tr / "img-00_0002.png")) for ln in lines)
    doubled = [ln for ln in lines if ln.startswith(str(tr / "img-01_0001.png"))]
    assert len(doubled) == 1 and "already in" in doubled[0] and "3 channels (RGB)" in doubled[0]
    extra = [ln for ln in lines if ln.startswith(str(tr / "img-02_0000.png"))]
    assert len(extra) == 1 and "channel 3" in extra[0] and "RGBA" in extra[0]
    assert len(lines) == 4, lines
    with pytest.raises(DatasetError, match="img-00_0001.png: channel 1 of case img-00 is missing"):
        RawDataset(folder)
    # prediction input: a grey image for an RGB model
    ts = tmp_path / "ts"
    ts.mkdir()
    Image.fromarray(grey).save(ts / "x_0000.png")
    with pytest.raises(PredictionError, match=r"x_0001.png: channel 1 of case x is missing \(the model needs 3"):
        list_cases_in_folder(ts, ".png", 3)


def test_rgb_dataset_plans_preprocesses_trains_and_predicts(env):
    from autossl.cli.plan_and_preprocess import main as plan_and_preprocess
    from autossl.cli.predict import main as predict
    from autossl.cli.train import main as train
    from autossl.preprocessing import storage

    folder = make_rgb_dataset(env["raw"])
    plan_and_preprocess(["-d", "121", "-np", "1", "--verify_dataset_integrity", "-pl", "cpu"])
    pre = env["pre"] / folder.name
    fp = json.loads((pre / "dataset_fingerprint.json").read_text())
    assert sorted(fp["foreground_intensity_properties_per_channel"]) == ["0", "1", "2"]
    r_mean = fp["foreground_intensity_properties_per_channel"]["0"]["mean"]
    b_mean = fp["foreground_intensity_properties_per_channel"]["2"]["mean"]
    assert r_mean > 180 and b_mean < 75  # R is bright on the structure, B its inverse: the order is kept
    plans = json.loads((pre / "autosslPlansCPU.json").read_text())
    assert list(plans["configurations"]) == ["2d"] and plans["image_reader_writer"] == "NaturalImage2DIO"
    cfg = plans["configurations"]["2d"]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] * 3
    ident = cfg["data_identifier"]
    assert len(storage.list_cases(pre / ident)) == 4 and len(storage.list_cases(pre / f"{ident}_unlabeled")) == 2
    data, seg, _ = storage.load_case(pre / ident, "img-00")
    data, seg = np.asarray(data), np.asarray(seg)
    assert data.shape[:2] == (3, 1) and seg.shape[:2] == (1, 1)
    fg = seg[0] > 0
    assert data[0][fg].mean() > data[0][~fg].mean() and data[2][fg].mean() < data[2][~fg].mean()

    assert train(["121", "2d", "all", "-p", "autosslPlansCPU", "--ssl", "none", "--epochs", "1",
                  "--iterations-per-epoch", "2", "--val-iterations", "1", "-device", "cpu",
                  "--num-workers", "0"]) == 0
    out = env["res"] / "preds"
    assert predict(["-i", str(folder / "imagesTs"), "-o", str(out), "-d", "121", "-c", "2d", "-p", "autosslPlansCPU",
                    "-f", "all", "-device", "cpu", "--disable_tta", "--disable_progress_bar",
                    "-npp", "1", "-nps", "1"]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["img-06.png", "img-07.png"]
    pred = np.asarray(Image.open(out / "img-06.png"))
    assert pred.shape == SHAPE and set(np.unique(pred).tolist()) <= {0, 1}
