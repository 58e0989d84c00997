"""Dataset converters: MSD (synthetic + real Hippocampus split), ACDC SSL4MIS, PROMISE12, Left Atrium."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from autossl.raw.dataset import RawDataset
from dataset_conversion import convert_acdc_ssl4mis as acdc
from dataset_conversion import convert_left_atrium as la
from dataset_conversion import convert_msd as msd
from dataset_conversion import convert_promise12 as promise
from dataset_conversion.common import ConversionError, generate_dataset_json, load_split

DATA = Path(__file__).parents[1].parent / "shared" / "data"
PROTOCOLS = Path(__file__).parents[1].parent / "shared" / "protocols"
HIPPO = DATA / "Task04_Hippocampus"
HIPPO_SPLIT = PROTOCOLS / "hippocampus_split.json"
ACDC = DATA / "ACDC_ssl4mis"
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degree rotation, non-identity


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    r = tmp_path / "raw"
    monkeypatch.setenv("autossl_raw", str(r))
    monkeypatch.setenv("autossl_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("autossl_results", str(tmp_path / "res"))
    return r


def _img(arr, spacing=(0.8, 0.9, 2.5), origin=(10.0, -5.0, 3.0), direction=DIRECTION) -> sitk.Image:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    im.SetOrigin(origin)
    im.SetDirection(direction)
    return im


def _assert_same(written: Path, arr: np.ndarray, spacing, origin=None, direction=None):
    im = sitk.ReadImage(str(written))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(im), arr)
    np.testing.assert_allclose(im.GetSpacing(), spacing, rtol=1e-6)
    if origin is not None:
        np.testing.assert_allclose(im.GetOrigin(), origin, atol=1e-5)
    if direction is not None:
        np.testing.assert_allclose(im.GetDirection(), direction, atol=1e-6)


def _case_stems(folder: Path) -> set[str]:
    """Case names of every file anywhere under ``folder`` (channel suffix stripped)."""
    out = set()
    for p in folder.rglob("*.nii.gz"):
        stem = p.name[: -len(".nii.gz")]
        out.add(stem[:-5] if stem[-5:-4] == "_" and stem[-4:].isdigit() else stem)
    return out


def _label_stems(folder: Path) -> set[str]:
    """Case names of label files anywhere under ``folder`` (files without a _XXXX channel suffix)."""
    return {p.name[: -len(".nii.gz")] for p in folder.rglob("*.nii.gz")
            if not p.name[: -len(".nii.gz")][-4:].isdigit()}


# ----------------------------------------------------------------------------- MSD (synthetic)
def make_msd_task(root: Path, n_channels: int, n_cases: int = 5, seed: int = 0) -> tuple[Path, dict]:
    """A tiny MSD task folder (4D images when n_channels > 1) with a hidden file and an imagesTs case."""
    rng = np.random.default_rng(seed)
    task = root / "Task77_Synth"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    arrays, training = {}, []
    shape = (4, 6, 5)
    for i in range(n_cases + 1):
        case = f"synth_{i:03d}"
        img = rng.normal(100, 20, (n_channels, *shape)).astype(np.float32)
        seg = rng.integers(0, 3, shape).astype(np.uint8)
        if n_channels > 1:
            im = sitk.JoinSeries([_img(ch) for ch in img])  # 4D scalar image, channels last (as MSD)
            assert im.GetDimension() == 4 and im.GetNumberOfComponentsPerPixel() == 1
        else:
            im = _img(img[0])
        sub = "imagesTs" if i == n_cases else "imagesTr"
        sitk.WriteImage(im, str(task / sub / f"{case}.nii.gz"), True)
        if sub == "imagesTr":
            sitk.WriteImage(_img(seg), str(task / "labelsTr" / f"{case}.nii.gz"), True)
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        arrays[case] = (img, seg)
    (task / "imagesTr" / "._synth_000.nii.gz").write_bytes(b"\x00resource fork")
    (task / "imagesTs" / "._synth_999.nii.gz").write_bytes(b"\x00resource fork")
    modality = {str(c): f"mod{c}" for c in range(n_channels)}
    dj = {"name": "Synth", "modality": modality, "labels": {"0": "background", "1": "head", "2": "tail"},
          "numTraining": n_cases, "training": training, "test": [f"./imagesTs/synth_{n_cases:03d}.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(dj))
    return task, arrays


@pytest.mark.parametrize("n_channels", [1, 2])
def test_msd_synthetic_full(tmp_path, raw, n_channels):
    task, arrays = make_msd_task(tmp_path / "src", n_channels)
    out = msd.convert_msd(task, num_processes=1)
    assert out == raw / "Dataset077_Synth"
    ds = RawDataset(out)
    assert sorted(ds.labeled) == [f"synth_{i:03d}" for i in range(5)]
    assert list(ds.test) == ["synth_005"] and ds.unlabeled == {}
    dj = ds.dataset_json
    assert dj["channel_names"] == {str(c): f"mod{c}" for c in range(n_channels)}
    assert dj["labels"] == {"background": 0, "head": 1, "tail": 2} and dj["numTraining"] == 5
    for case in ("synth_002", "synth_005"):
        img, seg = arrays[case]
        chans = ds.labeled[case]["images"] if case in ds.labeled else ds.test[case]["images"]
        assert len(chans) == n_channels
        for c in range(n_channels):
            assert chans[c].endswith(f"{case}_{c:04d}.nii.gz")
            _assert_same(Path(chans[c]), img[c], (0.8, 0.9, 2.5), (10.0, -5.0, 3.0), DIRECTION)
    _assert_same(Path(ds.labeled["synth_002"]["label"]), arrays["synth_002"][1], (0.8, 0.9, 2.5), (10.0, -5.0, 3.0), DIRECTION)
    assert not any(p.name.startswith("._") for p in out.rglob("*"))


def test_msd_synthetic_split(tmp_path, raw):
    task, arrays = make_msd_task(tmp_path / "src", 2)
    split = {"test": ["synth_000", "synth_004"], "train_pool": ["synth_001", "synth_002", "synth_003"],
             "labeled_1": ["synth_002"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    msd.main(["-i", str(task), "-d", "78", "--name", "SynthSSL", "--split", str(tmp_path / "split.json"),
              "--labeled", "labeled_1", "-np", "2"])
    out = raw / "Dataset078_SynthSSL"
    ds = RawDataset(out)
    assert list(ds.labeled) == ["synth_002"]
    assert sorted(ds.unlabeled) == ["synth_001", "synth_003"]
    assert sorted(ds.test) == ["synth_000", "synth_004"]  # the task's own unlabelled imagesTs is left out
    assert _label_stems(out) == {"synth_002"}
    test_labels = tmp_path / "Dataset078_SynthSSL_testlabels"
    assert sorted(p.name for p in test_labels.iterdir()) == ["synth_000.nii.gz", "synth_004.nii.gz"]
    _assert_same(test_labels / "synth_004.nii.gz", arrays["synth_004"][1], (0.8, 0.9, 2.5), (10.0, -5.0, 3.0), DIRECTION)
    _assert_same(out / "imagesTrUnlabeled" / "synth_003_0001.nii.gz", arrays["synth_003"][0][1], (0.8, 0.9, 2.5))
    dj = ds.dataset_json
    assert dj["numTraining"] == 1 and dj["numUnlabeled"] == 2 and dj["numTest"] == 2
    assert dj["split"]["labeled"] == "labeled_1" and dj["split"]["file"].endswith("split.json")


def test_msd_errors(tmp_path, raw, capsys):
    task, _ = make_msd_task(tmp_path / "src", 2, n_cases=3)
    with pytest.raises(ConversionError, match="dataset.json not found"):
        msd.convert_msd(tmp_path / "src")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"test": ["synth_000"], "train_pool": ["synth_001", "synth_002"], "lab": ["synth_001"]}))
    with pytest.raises(ConversionError, match="no labelled list 'labeled_10'.*'lab'"):
        msd.convert_msd(task, split_file=split, labeled="labeled_10")
    split.write_text(json.dumps({"test": ["synth_000"], "train_pool": ["synth_001", "nope_9"], "lab": ["synth_001"]}))
    with pytest.raises(ConversionError, match="nope_9 is not a training case"):
        msd.convert_msd(task, split_file=split, labeled="lab")
    split.write_text(json.dumps({"test": ["synth_000"], "train_pool": ["synth_001"], "lab": ["synth_002"]}))
    with pytest.raises(ConversionError, match="synth_002.*not in 'train_pool'"):
        msd.convert_msd(task, split_file=split, labeled="lab")
    dj = json.loads((task / "dataset.json").read_text())
    dj["modality"] = {"0": "only_one"}
    (task / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(ConversionError, match=r"synth_\d+\.nii\.gz: 2 channel\(s\), but .* lists 1"):
        msd.convert_msd(task)
    dj["modality"] = {"0": "a", "1": "b"}
    (task / "dataset.json").write_text(json.dumps(dj))
    msd.convert_msd(task)
    with pytest.raises(SystemExit) as e:  # second run refuses to mix with the first
        msd.main(["-i", str(task)])
    assert e.value.code == 1
    assert "already exists" in capsys.readouterr().err
    msd.main(["-i", str(task), "--overwrite"])
    del dj["modality"]
    (task / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(ConversionError, match="missing MSD key 'modality'"):
        msd.convert_msd(task, overwrite=True)


def test_generate_dataset_json_checks(tmp_path):
    dj = generate_dataset_json(tmp_path, {0: "CT"}, {"background": 0, "a": 1}, 3, ".nii.gz", numUnlabeled=2)
    assert json.loads((tmp_path / "dataset.json").read_text()) == dj
    assert dj["channel_names"] == {"0": "CT"} and dj["numUnlabeled"] == 2
    with pytest.raises(ConversionError, match="consecutive"):
        generate_dataset_json(tmp_path, {0: "CT"}, {"background": 0, "a": 2}, 3, ".nii.gz")


# ----------------------------------------------------------------------------- MSD (real Hippocampus)
@pytest.mark.realdata
def test_msd_hippocampus_benchmark_split(tmp_path, raw):
    if not (HIPPO / "dataset.json").is_file() or not HIPPO_SPLIT.is_file():
        pytest.skip(f"real data not present: needs {HIPPO} and {HIPPO_SPLIT}")
    split = json.loads(HIPPO_SPLIT.read_text())
    test_labels = tmp_path / "hippo_test_labels"
    msd.main(["-i", str(HIPPO), "-d", "4", "--split", str(HIPPO_SPLIT), "--labeled", "labeled_10",
              "--test-labels-out", str(test_labels), "-np", "2"])
    out = raw / "Dataset004_Hippocampus"
    ds = RawDataset(out)
    assert (len(ds.labeled), len(ds.unlabeled), len(ds.test)) == (10, 190, 60)
    assert sorted(ds.labeled) == sorted(split["labeled_10"])
    assert sorted(ds.test) == sorted(split["test"])
    assert set(ds.unlabeled) == set(split["train_pool"]) - set(split["labeled_10"])
    # no label of an unlabelled or test case anywhere in the raw dataset
    assert _label_stems(out) == set(split["labeled_10"])
    assert not (set(ds.unlabeled) | set(ds.test)) & {p.name[: -len(".nii.gz")] for p in (out / "labelsTr").iterdir()}
    assert _case_stems(out) == set(split["train_pool"]) | set(split["test"])
    assert sorted(p.name[:-7] for p in test_labels.iterdir()) == sorted(split["test"])
    dj = ds.dataset_json
    assert dj["numTraining"] == 10 and dj["numUnlabeled"] == 190 and dj["numTest"] == 60
    assert dj["channel_names"] == {"0": "MRI"} and dj["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    # geometry and voxel values survive (labelled, unlabelled, test image and test label)
    pairs = [(Path(ds.labeled[split["labeled_10"][0]]["images"][0]), HIPPO / "imagesTr" / f"{split['labeled_10'][0]}.nii.gz"),
             (Path(ds.labeled[split["labeled_10"][0]]["label"]), HIPPO / "labelsTr" / f"{split['labeled_10'][0]}.nii.gz")]
    u, t = sorted(ds.unlabeled)[0], split["test"][0]
    pairs += [(Path(ds.unlabeled[u]["images"][0]), HIPPO / "imagesTr" / f"{u}.nii.gz"),
              (Path(ds.test[t]["images"][0]), HIPPO / "imagesTr" / f"{t}.nii.gz"),
              (test_labels / f"{t}.nii.gz", HIPPO / "labelsTr" / f"{t}.nii.gz")]
    for written, src in pairs:
        s = sitk.ReadImage(str(src))
        _assert_same(written, sitk.GetArrayFromImage(s), s.GetSpacing(), s.GetOrigin(), s.GetDirection())

    # upper bound: the whole pool labelled, test still held out
    msd.main(["-i", str(HIPPO), "-d", "5", "--name", "HippocampusAll", "--split", str(HIPPO_SPLIT),
              "--labeled", "all", "-np", "2"])
    ds_all = RawDataset(raw / "Dataset005_HippocampusAll")
    assert (len(ds_all.labeled), len(ds_all.unlabeled), len(ds_all.test)) == (200, 0, 60)
    assert len(list((tmp_path / "Dataset005_HippocampusAll_testlabels").iterdir())) == 60


# ----------------------------------------------------------------------------- ACDC
def test_acdc_labelled_settings():
    train = [f"{i:03d}" for i in range(1, 101)]
    assert acdc.labeled_patients("3", train) == ["038", "050", "099"]
    assert acdc.labeled_patients("7", train) == ["021", "038", "049", "050", "058", "099", "100"]
    assert acdc.labeled_patients("38,21", train) == ["021", "038"]
    assert len(acdc.labeled_patients("all", train)) == 100
    with pytest.raises(ConversionError, match="patient 050 is not a training patient"):
        acdc.labeled_patients("3", ["038", "099"])


def make_acdc(root: Path, seed: int = 0) -> dict:
    """Tiny SSL4MIS-layout ACDC: training patients as slices, val/test patients as whole volumes."""
    rng = np.random.default_rng(seed)
    (root / "data" / "slices").mkdir(parents=True)
    vols = {}
    lists = {"train": ["patient038_frame01", "patient038_frame02", "patient004_frame01"],
             "val": ["patient005_frame01"], "test": ["patient006_frame01"]}
    for k, names in lists.items():
        (root / f"{k}.list").write_text("\n".join(names) + "\n")
        for v in names:
            n = 11 if v.startswith("patient038") else 2  # 11 slices: K order differs from name order
            img = rng.random((n, 6, 5), dtype=np.float32)
            lab = rng.integers(0, 4, (n, 6, 5)).astype(np.uint8)
            vols[v] = (img, lab)
            if k == "train":
                for s in rng.permutation(n):  # K from 1, files written in random order
                    with h5py.File(root / "data" / "slices" / f"{v}_slice_{s + 1}.h5", "w") as f:
                        f["image"], f["label"] = img[s], lab[s]
            else:
                with h5py.File(root / "data" / f"{v}.h5", "w") as f:
                    f["image"], f["label"] = img, lab
    return vols


def test_acdc_synthetic_axes_and_roles(tmp_path, raw):
    vols = make_acdc(tmp_path / "acdc")
    acdc.main(["-i", str(tmp_path / "acdc"), "--labeled-patients", "38", "-np", "1"])
    out = raw / "Dataset027_ACDC"
    ds = RawDataset(out)
    assert sorted(ds.labeled) == ["patient038_frame01", "patient038_frame02"]
    assert list(ds.unlabeled) == ["patient004_frame01"] and list(ds.test) == ["patient006_frame01"]
    assert _label_stems(out) == {"patient038_frame01", "patient038_frame02"}
    assert (out / "imagesVal" / "patient005_frame01_0000.nii.gz").is_file()
    sp = (1.5625, 1.5625, 10.0)
    img, lab = vols["patient038_frame01"]
    _assert_same(Path(ds.labeled["patient038_frame01"]["images"][0]), img, sp)
    _assert_same(Path(ds.labeled["patient038_frame01"]["label"]), lab, sp)
    assert sitk.ReadImage(ds.labeled["patient038_frame01"]["images"][0]).GetSize() == (5, 6, 11)  # x, y, slices
    _assert_same(tmp_path / "Dataset027_ACDC_testlabels" / "patient006_frame01.nii.gz", vols["patient006_frame01"][1], sp)
    _assert_same(tmp_path / "Dataset027_ACDC_vallabels" / "patient005_frame01.nii.gz", vols["patient005_frame01"][1], sp)
    dj = ds.dataset_json
    assert dj["nominal_spacing"] == list(sp) and "1.5625" in dj["spacing_note"]
    assert dj["labeled_patients"] == ["038"] and dj["numUnlabeled"] == 1 and dj["numVal"] == 1


def test_acdc_errors(tmp_path, raw):
    root = tmp_path / "acdc"
    make_acdc(root)
    with pytest.raises(ConversionError, match="--patients: patient 077 is in none"):
        acdc.convert_acdc(root, "38", patients=["077"])
    with pytest.raises(ConversionError, match="patient 021 is not a training patient"):
        acdc.convert_acdc(root, "7")
    with h5py.File(root / "data" / "patient006_frame01.h5", "w") as f:
        f["image"] = np.zeros((2, 6, 5), np.float32)
    with pytest.raises(ConversionError, match=r"patient006_frame01\.h5: missing h5 dataset 'label'"):
        acdc.convert_acdc(root, "38")
    # a failed conversion leaves no partial dataset behind
    assert not (raw / "Dataset027_ACDC").exists() and not (tmp_path / "Dataset027_ACDC_testlabels").exists()
    (root / "data" / "slices" / "patient038_frame01_slice_2.h5").unlink()
    with pytest.raises(ConversionError, match="patient038_frame01_slice_2.h5: slice 2 of patient038_frame01 is missing"):
        acdc.convert_acdc(root, "38")
    (root / "test.list").unlink()
    with pytest.raises(ConversionError, match=r"test\.list: list file not found"):
        acdc.convert_acdc(root, "38", overwrite=True)


@pytest.mark.realdata
def test_acdc_real_subset(tmp_path, raw):
    if not (ACDC / "train.list").is_file():
        pytest.skip(f"real data not present: needs {ACDC}")
    seven = ["021", "038", "049", "050", "058", "099", "100"]
    # the 7 labelled patients, one unlabelled (003), one test (011) and one val (028) patient
    acdc.main(["-i", str(ACDC), "--labeled-patients", "7", "--patients", ",".join(seven + ["003", "011", "028"]),
               "-np", "2"])
    out = raw / "Dataset027_ACDC"
    ds = RawDataset(out)
    assert sorted({c[7:10] for c in ds.labeled}) == seven and len(ds.labeled) == 14
    assert sorted(ds.unlabeled) == ["patient003_frame01", "patient003_frame02"]
    assert sorted(ds.test) == ["patient011_frame01", "patient011_frame02"]
    assert _label_stems(out) == set(ds.labeled)
    assert ds.dataset_json["labeled_patients"] == seven
    # a training volume rebuilt from its slices in order of K
    vol = "patient099_frame01"  # 16 slices: K order differs from the files' name order
    slices = sorted((ACDC / "data" / "slices").glob(f"{vol}_slice_*.h5"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    with h5py.File(slices[0]) as f:
        h, w = f["image"].shape
    im = sitk.ReadImage(ds.labeled[vol]["images"][0])
    assert im.GetSize() == (w, h, len(slices))
    np.testing.assert_allclose(im.GetSpacing(), (1.5625, 1.5625, 10.0))
    arr, seg = sitk.GetArrayFromImage(im), sitk.GetArrayFromImage(sitk.ReadImage(ds.labeled[vol]["label"]))
    assert len(slices) >= 10
    for k in range(len(slices)):
        with h5py.File(slices[k]) as f:
            np.testing.assert_array_equal(arr[k], f["image"][()])
            np.testing.assert_array_equal(seg[k], f["label"][()])
    # a test volume, its label outside the raw dataset
    with h5py.File(ACDC / "data" / "patient011_frame01.h5") as f:
        img, lab = f["image"][()], f["label"][()]
    _assert_same(Path(ds.test["patient011_frame01"]["images"][0]), img, (1.5625, 1.5625, 10.0))
    _assert_same(tmp_path / "Dataset027_ACDC_testlabels" / "patient011_frame01.nii.gz", lab, (1.5625, 1.5625, 10.0))
    assert sorted(p.name for p in (tmp_path / "Dataset027_ACDC_vallabels").iterdir()) == \
        ["patient028_frame01.nii.gz", "patient028_frame02.nii.gz"]


@pytest.mark.realdata
def test_acdc_real_lists_give_published_subsets():
    if not (ACDC / "train.list").is_file():
        pytest.skip(f"real data not present: needs {ACDC}")
    train = sorted({acdc.patient_of(v) for v in acdc.read_list(ACDC / "train.list")})
    assert len(train) == 70
    # README: the labelled subsets are the first 68 / 136 lines of train_slices.list
    lines = (ACDC / "train_slices.list").read_text().split()
    assert acdc.labeled_patients("3", train) == sorted({l[7:10] for l in lines[:68]})
    assert acdc.labeled_patients("7", train) == sorted({l[7:10] for l in lines[:136]})


# ----------------------------------------------------------------------------- PROMISE12
def make_promise(root: Path, n_train: int = 5, n_test: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(n_train):
        part = root / "train" / f"TrainingData_Part{i % 2 + 1}"
        part.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 2000, (4, 7, 6)).astype(np.int16)
        seg = (rng.random((4, 7, 6)) > 0.7).astype(np.uint8)
        sitk.WriteImage(_img(img, (0.6, 0.6, 3.6)), str(part / f"Case{i:02d}.mhd"))
        sitk.WriteImage(_img(seg, (0.6, 0.6, 3.6)), str(part / f"Case{i:02d}_segmentation.mhd"))
        arrays[f"Case{i:02d}"] = (img, seg)
    (root / "test").mkdir()
    for i in range(n_test):
        img = rng.integers(0, 2000, (3, 7, 6)).astype(np.int16)
        sitk.WriteImage(_img(img, (0.5, 0.5, 4.0)), str(root / "test" / f"Case{i:02d}.mhd"))
        arrays[f"test_Case{i:02d}"] = (img, None)
    return arrays


def test_promise12_synthetic(tmp_path, raw):
    arrays = make_promise(tmp_path / "p12")
    promise.main(["-i", str(tmp_path / "p12" / "train"), "--test-folder", str(tmp_path / "p12" / "test"),
                  "--labeled", "2", "--holdout", "1", "--seed", "3", "-np", "2"])
    out = raw / "Dataset012_PROMISE12"
    ds = RawDataset(out)
    assert (len(ds.labeled), len(ds.unlabeled)) == (2, 2)
    held = sorted(set(ds.test) - {"test_Case00", "test_Case01"})
    assert len(held) == 1 and len(ds.test) == 3
    assert set(ds.labeled) | set(ds.unlabeled) | set(held) == {f"Case{i:02d}" for i in range(5)}
    assert _label_stems(out) == set(ds.labeled)
    _assert_same(tmp_path / "Dataset012_PROMISE12_testlabels" / f"{held[0]}.nii.gz", arrays[held[0]][1],
                 (0.6, 0.6, 3.6), (10.0, -5.0, 3.0), DIRECTION)
    case = sorted(ds.labeled)[0]
    _assert_same(Path(ds.labeled[case]["images"][0]), arrays[case][0], (0.6, 0.6, 3.6), (10.0, -5.0, 3.0), DIRECTION)
    _assert_same(Path(ds.labeled[case]["label"]), arrays[case][1], (0.6, 0.6, 3.6), (10.0, -5.0, 3.0), DIRECTION)
    assert sitk.ReadImage(ds.labeled[case]["label"]).GetPixelID() == sitk.sitkUInt8
    _assert_same(Path(ds.test["test_Case01"]["images"][0]), arrays["test_Case01"][0], (0.5, 0.5, 4.0))
    dj = ds.dataset_json
    assert dj["labels"] == {"background": 0, "prostate": 1} and dj["numTraining"] == 2 and dj["numUnlabeled"] == 2
    # the draw is seeded: the same seed gives the same labelled cases
    promise.convert_promise12(tmp_path / "p12" / "train", labeled=2, holdout=1, seed=3, dataset_id=13, overwrite=True)
    assert sorted(RawDataset(raw / "Dataset013_PROMISE12").labeled) == sorted(ds.labeled)


def test_promise12_errors(tmp_path, raw):
    make_promise(tmp_path / "p12", n_train=3, n_test=0)
    seg = next((tmp_path / "p12" / "train").rglob("Case01_segmentation.mhd"))
    bad = sitk.ReadImage(str(seg))
    sitk.WriteImage(bad + 1, str(seg))  # values 1, 2
    with pytest.raises(ConversionError, match=r"Case01_segmentation\.mhd: unexpected label values \[2\]"):
        promise.convert_promise12(tmp_path / "p12" / "train", num_processes=1)
    seg.unlink()
    with pytest.raises(ConversionError, match=r"Case01\.mhd: training case Case01 has no segmentation"):
        promise.convert_promise12(tmp_path / "p12" / "train", overwrite=True)
    with pytest.raises(ConversionError, match="no CaseNN.mhd files"):
        promise.convert_promise12(tmp_path / "p12" / "test")


# ----------------------------------------------------------------------------- Left Atrium
def make_la(root: Path, n_train: int = 4, n_test: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = root / la.UAMT_SUBFOLDER
    ids = [f"ID{i:02d}XYZ" for i in range(n_train + n_test)]
    arrays = {}
    for i in ids:
        (data / i).mkdir(parents=True)
        img = rng.random((7, 6, 5), dtype=np.float32)  # x, y, z
        lab = (rng.random((7, 6, 5)) > 0.5).astype(np.uint8)
        with h5py.File(data / i / la.H5_NAME, "w") as f:
            f["image"], f["label"] = img, lab
        arrays[i] = (img, lab)
    (root / "train.list").write_text("\n".join(ids[:n_train]) + "\n")
    # UA-MT style lines may be paths to the h5 file
    (root / "test.list").write_text("\n".join(f"../data/{la.UAMT_SUBFOLDER}/{i}/{la.H5_NAME}" for i in ids[n_train:]))
    return arrays


def test_left_atrium_synthetic(tmp_path, raw):
    arrays = make_la(tmp_path / "la")
    la.main(["-i", str(tmp_path / "la"), "--labeled", "2", "-np", "2"])
    out = raw / "Dataset101_LA"
    ds = RawDataset(out)
    assert sorted(ds.labeled) == ["ID00XYZ", "ID01XYZ"]  # the first N of train.list
    assert sorted(ds.unlabeled) == ["ID02XYZ", "ID03XYZ"] and sorted(ds.test) == ["ID04XYZ", "ID05XYZ"]
    assert _label_stems(out) == {"ID00XYZ", "ID01XYZ"}
    im = sitk.ReadImage(ds.labeled["ID00XYZ"]["images"][0])
    assert im.GetSize() == (7, 6, 5)  # x, y, z as in the h5 file
    np.testing.assert_allclose(im.GetSpacing(), (0.625,) * 3)
    img, lab = arrays["ID00XYZ"]
    arr = sitk.GetArrayFromImage(im)
    assert arr[4, 3, 2] == img[2, 3, 4]  # voxel (x=2, y=3, z=4)
    _assert_same(Path(ds.labeled["ID00XYZ"]["images"][0]), img.transpose(2, 1, 0), (0.625,) * 3)
    _assert_same(Path(ds.labeled["ID00XYZ"]["label"]), lab.transpose(2, 1, 0), (0.625,) * 3)
    _assert_same(tmp_path / "Dataset101_LA_testlabels" / "ID05XYZ.nii.gz", arrays["ID05XYZ"][1].transpose(2, 1, 0), (0.625,) * 3)
    assert ds.dataset_json["numTraining"] == 2 and ds.dataset_json["numUnlabeled"] == 2


def test_left_atrium_errors(tmp_path, raw, capsys):
    make_la(tmp_path / "la")
    with pytest.raises(ConversionError, match="--labeled 10: .* has 4 cases"):
        la.convert_left_atrium(tmp_path / "la", 10)
    with pytest.raises(SystemExit):
        la.main(["-i", str(tmp_path / "la"), "--labeled", "eight"])
    assert "--labeled must be a number or 'all'" in capsys.readouterr().err
    h5 = tmp_path / "la" / la.UAMT_SUBFOLDER / "ID03XYZ" / la.H5_NAME
    with h5py.File(h5, "w") as f:
        f["image"] = np.zeros((3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=r"ID03XYZ/mri_norm2\.h5: missing h5 dataset 'label'"):
        la.convert_left_atrium(tmp_path / "la", 2, num_processes=2)
    h5.unlink()
    with pytest.raises(ConversionError, match=r"ID03XYZ/mri_norm2\.h5: not found \(case ID03XYZ\)"):
        la.convert_left_atrium(tmp_path / "la", 2, overwrite=True)


# ----------------------------------------------------------------------------- shared
def test_load_split_rejects_overlap(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"test": ["a", "b"], "train_pool": ["b", "c"], "l": ["c"]}))
    with pytest.raises(ConversionError, match="case b is in both 'test' and 'train_pool'"):
        load_split(p, "l")
    p.write_text(json.dumps({"test": ["a"], "train_pool": ["b", "c"], "l": ["c"]}))
    s = load_split(p, "l")
    assert (s.labeled, s.unlabeled, s.test) == (["c"], ["b"], ["a"])


def test_test_labels_inside_dataset_refused(tmp_path, raw):
    make_la(tmp_path / "la")
    with pytest.raises(ConversionError, match="must lie outside the raw dataset"):
        la.convert_left_atrium(tmp_path / "la", 2, test_labels_out=raw / "Dataset101_LA" / "labelsTs")


@pytest.mark.parametrize("module", ["convert_msd", "convert_acdc_ssl4mis", "convert_promise12", "convert_left_atrium"])
def test_help(module, capsys):
    mod = importlib.import_module(f"dataset_conversion.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "-np" in capsys.readouterr().out
