"""The trainer: splits, loaders, schedules, budget, 2D/3D training, checkpoints, resume, CLI.

Datasets are tiny synthetic ones, planned and preprocessed once per module with the project's
own functions, then trained with a small plans file (``autosslPlansTiny``: batch 2, tiny patch,
3 stages of 4-16 features) written the way a user would write one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autossl.components.budget import parse_budget, plan_steps
from autossl.components.checkpoint import REQUIRED_KEYS
from autossl.components.dataloading.splits import generate_crossval_split, split_for_fold
from autossl.preprocessing import storage
from autossl.training.ddp import split_batch
from autossl.training.optim import PolyWarmupSchedule
from autossl.utilities.file_io import load_json, save_json
from autossl.utilities.synthetic import make_synthetic_dataset

TINY = "autosslPlansTiny"


# ----------------------------------------------------------------------------------------------
# dataset preparation (shared with test_ddp.py)
# ----------------------------------------------------------------------------------------------
def write_tiny_plans(preprocessed_dataset: Path, configuration: str, patch_size: list[int]) -> None:
    """A user-written plans file: the planned configuration with a tiny patch and network."""
    from autossl.planning.plans_handler import PlansManager

    plans = load_json(preprocessed_dataset / "autosslPlans.json")
    cfg = dict(PlansManager(plans).get_configuration(configuration).configuration)
    cfg.pop("inherits_from", None)
    dim = len(patch_size)
    strides = [[1] * dim, [2] * dim, [2] * dim]
    cfg.update(patch_size=list(patch_size), batch_size=2, data_identifier=f"{TINY}_{configuration}")
    if "pool_op_kernel_sizes" in cfg:
        cfg["pool_op_kernel_sizes"] = strides
    if "conv_kernel_sizes" in cfg:
        cfg["conv_kernel_sizes"] = [[3] * dim] * 3
    cfg["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3] * dim] * 3, strides=strides,
        n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    if cfg.get("transformer_architecture"):
        cfg["transformer_architecture"]["arch_kwargs"].update(
            embed_dim=32, eva_depth=1, eva_numheads=2, input_shape=list(patch_size), patch_embed_size=[8] * dim)
    plans["plans_name"] = TINY
    plans["configurations"] = {configuration: cfg}
    save_json(plans, preprocessed_dataset / f"{TINY}.json")


def prepare_dataset(root: Path, dataset_id: int, two_d: bool) -> dict:
    """Raw synthetic dataset -> fingerprint -> plans -> tiny plans -> preprocessed (1 process)."""
    from autossl.fingerprint.extractor import extract_fingerprint
    from autossl.planning.default_planner import ExperimentPlanner
    from autossl.preprocessing.preprocessor import run_configurations

    mp = pytest.MonkeyPatch()
    env = {"autossl_raw": str(root / "raw"), "autossl_preprocessed": str(root / "preprocessed"),
           "autossl_results": str(root / "results")}
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        ds = make_synthetic_dataset(root / "raw", dataset_id, "Tiny2D" if two_d else "Tiny3D", two_d=two_d,
                                    n_labeled=6, n_unlabeled=4, n_test=0,
                                    shape=(32, 32) if two_d else (16, 20, 20), spacing=(1.0, 1.0, 1.0), seed=1)
        extract_fingerprint(ds.name, num_processes=1)
        ExperimentPlanner(ds.name).plan_experiment()
        cfg = "2d" if two_d else "3d_fullres"
        pre = root / "preprocessed" / ds.name
        write_tiny_plans(pre, cfg, [16, 16] if two_d else [8, 16, 16])
        run_configurations(ds.name, [cfg], TINY, 1)
    finally:
        mp.undo()
    return {"root": root, "env": env, "id": dataset_id, "name": ds.name, "configuration": cfg,
            "preprocessed": pre, "data": pre / f"{TINY}_{cfg}"}


@pytest.fixture(scope="module")
def prepared3d(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("train3d"), 951, two_d=False)


@pytest.fixture(scope="module")
def prepared2d(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("train2d"), 952, two_d=True)


def _use(prepared: dict, monkeypatch, tmp_path: Path) -> dict:
    for k, v in prepared["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("autossl_results", str(tmp_path / "results"))
    monkeypatch.setenv("autossl_n_proc_DA", "0")
    return prepared


@pytest.fixture
def ds3d(prepared3d, monkeypatch, tmp_path):
    return _use(prepared3d, monkeypatch, tmp_path)


@pytest.fixture
def ds2d(prepared2d, monkeypatch, tmp_path):
    return _use(prepared2d, monkeypatch, tmp_path)


def _trainer(ds: dict, fold=0, **kw):
    from autossl.training.trainer import Trainer

    kw.setdefault("epochs", 2)
    kw.setdefault("iterations_per_epoch", 3)
    kw.setdefault("val_iterations", 1)
    kw.setdefault("num_workers", 0)
    kw.setdefault("device", "cpu")
    return Trainer(ds["id"], ds["configuration"], fold, plans=TINY, verbose=False, **kw)


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def test_crossval_split_is_nnunets_kfold(tmp_path):
    from sklearn.model_selection import KFold

    cases = [f"case_{i:03d}" for i in (7, 3, 11, 0, 5, 9, 1, 2)]
    splits = generate_crossval_split(cases)
    ordered = sorted(cases)
    expected = [[ordered[i] for i in val] for _, val in KFold(5, shuffle=True, random_state=12345).split(ordered)]
    assert [s["val"] for s in splits] == expected
    for s in splits:
        assert sorted(s["train"] + s["val"]) == ordered and not set(s["train"]) & set(s["val"])
    tr, val = split_for_fold(tmp_path, cases, 2)
    assert (tmp_path / "splits_final.json").is_file() and val == expected[2]
    save_json([{"train": ["a"], "val": ["b"]}], tmp_path / "splits_final.json")  # a user's split wins
    assert split_for_fold(tmp_path, cases, 0) == (["a"], ["b"])
    tr7, val7 = split_for_fold(tmp_path, cases, 7)  # beyond the file: seeded 80:20
    assert len(tr7) == 6 and len(val7) == 2 and split_for_fold(tmp_path, cases, 7) == (tr7, val7)
    assert split_for_fold(tmp_path, cases, "all") == (ordered, ordered)


def test_budget_parsing_and_planning():
    assert parse_budget("45m") == 2700 and parse_budget("1.5h") == 5400 and parse_budget("90s") == 90
    assert parse_budget("2h30m") == 9000 and parse_budget("600") == 600
    for bad in ("45x", "m45", "", "-3m"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    plan = plan_steps(budget_s=1000, elapsed_s=50, step_time_s=0.5, epoch_overhead_s=10, final_overhead_s=100,
                      iterations_per_epoch=100)
    # 0.95 * 1000 - 50 - 100 = 800 s available, 60 s per epoch -> 13 epochs
    assert (plan.epochs, plan.iterations_per_epoch, plan.total_steps) == (13, 100, 1300)
    assert plan.predicted_total_s <= 1000
    # 130 steps (1 epoch end) already done in 50 s: the remaining whole epochs fit, the done ones are not recounted
    mid = plan_steps(budget_s=1000, elapsed_s=50, step_time_s=0.5, epoch_overhead_s=10, final_overhead_s=100,
                     iterations_per_epoch=100, steps_done=130)
    assert (mid.epochs, mid.total_steps) == (14, 1400) and mid.predicted_total_s == pytest.approx(915)
    short = plan_steps(budget_s=60, elapsed_s=10, step_time_s=1.0, epoch_overhead_s=5, final_overhead_s=5,
                       iterations_per_epoch=250, steps_done=13)
    assert short.epochs == 1 and 13 <= short.iterations_per_epoch < 250 and short.predicted_total_s <= 60
    late = plan_steps(budget_s=10, elapsed_s=30, step_time_s=1.0, epoch_overhead_s=5, final_overhead_s=0,
                      iterations_per_epoch=5, steps_done=13)  # over budget: finish the epoch in progress
    assert (late.epochs, late.iterations_per_epoch, late.total_steps) == (3, 5, 15)


def test_poly_and_warmup_schedules_step_per_iteration():
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=1.0)
    s = PolyWarmupSchedule(sgd, 1e-2, total_steps=100)
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-2)
    s.step(50)
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 0.9)
    s.step(100)
    assert sgd.param_groups[0]["lr"] == 0.0
    w = PolyWarmupSchedule(sgd, 3e-4, total_steps=200, warmup_fraction=0.05)  # 10 warm-up steps
    lrs = [w.lr_at(i) for i in range(12)]
    assert lrs[0] == pytest.approx(3e-5) and lrs[9] == pytest.approx(3e-4) and lrs[10] == pytest.approx(3e-4)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    state = s.state_dict()
    s2 = PolyWarmupSchedule(sgd, 1.0, total_steps=1)
    s2.load_state_dict(state)
    assert s2.lr_at(50) == pytest.approx(1e-2 * 0.5 ** 0.9)


def test_schedule_restarts_every_round():
    """cycles=2 (self-training's rounds): warm-up and decay run twice, each ending annealed."""
    from autossl.training.optim import round_boundaries

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    c = PolyWarmupSchedule(sgd, 1e-2, total_steps=100, cycles=2)
    assert round_boundaries(100, 2) == [50] and round_boundaries(100, 1) == [] and round_boundaries(90, 3) == [30, 60]
    assert c.lr_at(0) == pytest.approx(1e-2) and c.lr_at(25) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert c.lr_at(49) == pytest.approx(1e-2 * (1 / 50) ** 0.9)
    assert c.lr_at(50) == pytest.approx(1e-2) and c.lr_at(75) == pytest.approx(1e-2 * 0.5 ** 0.9)
    c.set_total_steps(200)  # --budget decides the length later: the restart moves with it
    assert c.lr_at(100) == pytest.approx(1e-2) and c.lr_at(99) < 1e-3
    vit = PolyWarmupSchedule(sgd, 3e-4, total_steps=200, warmup_fraction=0.05, cycles=2)  # 5 warm-up steps a round
    assert vit.lr_at(100) == pytest.approx(3e-4 / 5) and vit.lr_at(104) == pytest.approx(3e-4)
    again = PolyWarmupSchedule(sgd, 1.0, total_steps=1)
    again.load_state_dict(c.state_dict())
    assert again.cycles == 2 and again.lr_at(150) == pytest.approx(1e-2 * 0.5 ** 0.9)


def test_ddp_batch_split_matches_nnunet():
    assert split_batch(2, 0.33, 1, 0) == (2, 0.33)
    sizes = [split_batch(5, 0.33, 2, r)[0] for r in range(2)]
    assert sizes == [3, 2]
    # the global batch keeps about a third foreground-forced patches
    forced = sum(round(bs * share) for bs, share in (split_batch(12, 0.33, 4, r) for r in range(4)))
    assert forced == 4
    with pytest.raises(ValueError):
        split_batch(1, 0.33, 2, 0)


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def test_labeled_batches_have_documented_format_and_foreground(ds3d):
    from autossl.components.augmentation.pipelines import augmentation_geometry, training_transforms
    from autossl.components.dataloading.dataset import PreprocessedCases
    from autossl.components.dataloading.loaders import LabeledDataLoader

    np.random.seed(0)
    torch.manual_seed(0)
    cases = PreprocessedCases(ds3d["data"])
    patch = (8, 16, 16)
    geo = augmentation_geometry(patch)
    assert all(i >= p for i, p in zip(geo.initial_patch_size, patch)) and geo.mirror_axes == (0, 1, 2)
    ds_scales = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
    loader = LabeledDataLoader(cases, 4, geo.initial_patch_size, patch, [0, 1, 2], False, 0.5,
                               training_transforms(patch, geo, ds_scales))
    for _ in range(3):
        b = next(loader)
        assert b["data"].shape == (4, 1, *patch) and b["data"].dtype == torch.float32
        assert [tuple(t.shape) for t in b["target"]] == [(4, 1, 8, 16, 16), (4, 1, 4, 8, 8)]
        assert len(b["keys"]) == 4 and set(b["keys"]) <= set(cases.identifiers)
        assert set(torch.unique(b["target"][0]).tolist()) <= {0, 1, 2}  # -1 padding removed
    plain = LabeledDataLoader(cases, 4, patch, patch, [0, 1, 2], False, 0.5, None)
    for _ in range(5):  # samples 2 and 3 are forced onto foreground
        t = next(plain)["target"][0]
        assert all((t[i] > 0).any() for i in (2, 3))


def test_unlabeled_loader_never_reads_segmentations(ds3d, monkeypatch, tmp_path):
    import blosc2

    from autossl.components.augmentation.pipelines import augmentation_geometry, weak_transforms
    from autossl.components.dataloading.dataset import PreprocessedCases
    from autossl.components.dataloading.loaders import UnlabeledDataLoader

    unl = storage.unlabeled_folder(ds3d["data"])
    cases = storage.list_cases(unl)
    assert cases and not list(unl.glob("*_seg.b2nd"))
    work = tmp_path / unl.name  # a copy with a planted (corrupt) label file next to an unlabelled case
    work.mkdir()
    for f in unl.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    (work / f"{cases[0]}_seg.b2nd").write_bytes(b"not a label file")
    opened = []
    real_open = blosc2.open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(blosc2, "open", spy)
    patch = (8, 16, 16)
    geo = augmentation_geometry(patch)
    loader = UnlabeledDataLoader(PreprocessedCases(work, labeled=False), 3, geo.initial_patch_size, patch,
                                 weak_transforms(patch, geo, [[1.0] * 3, [0.5] * 3]))
    for _ in range(4):
        b = next(loader)
        assert set(b) == {"data", "keys"} and b["data"].shape == (3, 1, *patch)
    assert opened and not any("_seg" in p for p in opened)
    with pytest.raises(ValueError):
        UnlabeledDataLoader(PreprocessedCases(ds3d["data"]), 2, patch, patch)

    # pseudo-labels handed over at run time: batches then carry "target" (-1 = ignore)
    data, _, _ = storage.load_case(work, cases[0], load_seg=False)
    pl = np.full((1, *data.shape[1:]), 2, dtype=np.int16)
    f = tmp_path / "pl.b2nd"
    blosc2.asarray(pl, urlpath=str(f), mode="w")
    loader.set_pseudo_label_files({cases[0]: f})
    seen = set()
    for _ in range(6):
        b = next(loader)
        assert [tuple(t.shape) for t in b["target"]] == [(3, 1, 8, 16, 16), (3, 1, 4, 8, 8)]
        for k, key in enumerate(b["keys"]):
            seen.update(torch.unique(b["target"][0][k]).tolist())
            if key != cases[0]:
                assert (b["target"][0][k] == -1).all()
    assert 2 in seen and -1 in seen
    assert not any("_seg" in p for p in opened)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def test_train_3d_supervised_checkpoints_logs_and_validation(ds3d):
    t = _trainer(ds3d, fold=0, epochs=4, iterations_per_epoch=4, val_iterations=2)
    assert t.trainer_name == "autosslTrainer"
    t.run()
    out = t.output_folder
    base = out.parent
    assert base.name == f"autosslTrainer__{TINY}__3d_fullres"
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (base / f).is_file()
    for f in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "debug.json"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint_latest.pth").exists()
    logs = list(out.glob("training_log_*.txt"))
    assert len(logs) == 1 and logs[0].read_text().count("epoch ") >= 4
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for k in REQUIRED_KEYS:
        assert k in ckpt, k
    assert ckpt["current_step"] == ckpt["total_steps"] == 16
    assert ckpt["inference_networks"] == [{"name": "student", "arch": "cnn"}]
    assert set(ckpt["networks"]) == {"student"} and set(ckpt["optimizer_states"]) == {"student"}
    assert ckpt["network_weights"].keys() == ckpt["networks"]["student"].keys()
    assert ckpt["init_args"]["configuration"] == "3d_fullres" and ckpt["init_args"]["fold"] == 0
    assert ckpt["init_args"]["ssl"] == "none" and ckpt["trainer_name"] == "autosslTrainer"
    assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    hist = ckpt["logging"]["history"]
    assert len(hist["train_loss"]) == 4 and len(hist["pseudo_dice"][0]) == 2
    assert hist["train_loss"][-1] < hist["train_loss"][0]  # an easy case: the loss goes down
    lrs = hist["lr"]["student"]
    assert lrs[0] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs, lrs[1:]))  # poly per step
    summary = load_json(out / "validation" / "summary.json")
    assert "foreground_mean" in summary and len(summary["metric_per_case"]) == len(t.val_keys)
    assert len(list((out / "validation").glob("*.nii.gz"))) == len(t.val_keys)


def test_train_2d_mean_teacher_uses_unlabeled_batches(ds2d):
    t = _trainer(ds2d, fold="all", ssl="mean_teacher", epochs=2, iterations_per_epoch=3, warmup=0)
    assert t.unlabeled_batch_size == 2  # default ratio 1:1
    t.run()
    out = t.output_folder
    assert out.name == "fold_all" and not (out / "validation").exists()
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "autosslTrainer_mean_teacher"
    assert set(ckpt["networks"]) == {"student", "teacher"} and set(ckpt["optimizer_states"]) == {"student"}
    assert ckpt["inference_networks"] == [{"name": "teacher", "arch": "cnn"}]
    scalars = ckpt["logging"]["history"]["scalars"]
    assert {"loss_sup", "loss_unsup", "ramp_weight"} <= set(scalars)
    assert all(v > 0 for v in scalars["loss_unsup"])  # the unlabelled batches reached the method
    s, te = ckpt["networks"]["student"], ckpt["networks"]["teacher"]
    assert any(not torch.equal(s[k], te[k]) for k in s)  # the teacher is an EMA, not a copy


def test_train_2d_transformer_uses_adamw_with_warmup(ds2d):
    t = _trainer(ds2d, fold="all", network="transformer", epochs=1, iterations_per_epoch=2)
    assert t.trainer_name == "autosslTrainer_transformer"
    t.run()
    assert type(t.networks["student"]).__name__ == "Primus2D"
    assert isinstance(t.optimizers["student"], torch.optim.AdamW)
    ckpt = torch.load(t.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["inference_networks"] == [{"name": "student", "arch": "transformer"}]
    assert ckpt["scheduler_states"]["student"]["warmup_fraction"] > 0


def test_predict_unlabeled_without_mirroring_makes_one_pass_per_tile(ds2d):
    """Temporal ensembling's pool prediction: ``mirroring=False`` sends a quarter of the patches
    through the network in 2D (mirror axes 0 and 1) and returns another (unaveraged) softmax."""
    t = _trainer(ds2d, fold="all", ssl="temporal_ensembling", epochs=1, iterations_per_epoch=1)
    t.initialize()
    t._do_split()
    seen: list[int] = []
    hook = t.networks["student"].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    case = t.unlabeled_keys[:1]
    mirrored = t.predict_unlabeled(case)
    n_mirrored, seen[:] = sum(seen), []
    plain = t.predict_unlabeled(case, mirroring=False)
    hook.remove()
    assert n_mirrored == 4 * sum(seen) > 0
    p, q = mirrored[case[0]], plain[case[0]]
    assert p.shape == q.shape
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert np.abs(p - q).max() > 1e-4


def test_self_training_predicts_unlabeled_cases_between_rounds(ds2d):
    t = _trainer(ds2d, fold="all", ssl="self_training", ssl_options={"threshold": "0"}, epochs=2,
                 iterations_per_epoch=2)
    t.initialize()
    t._do_split()
    probs = t.predict_unlabeled(t.unlabeled_keys[:2])
    assert set(probs) == set(t.unlabeled_keys[:2])
    for case, p in probs.items():
        data, _, _ = storage.load_case(t.unlabeled_data_folder, case, load_seg=False)
        assert p.shape == (3, *data.shape[1:])
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
    t2 = _trainer(ds2d, fold="all", ssl="self_training", ssl_options={"threshold": "0"}, epochs=2,
                  iterations_per_epoch=2)
    t2.run()
    hist = torch.load(t2.output_folder / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["logging"]["history"]["scalars"]
    assert hist["round"][-1] == 1 and hist["loss_unsup"][-1] > 0  # round 2 trained on pseudo-labels
    assert not (t2.output_folder / "pseudo_labels").exists()


def test_budget_chooses_the_number_of_steps(ds2d):
    t = _trainer(ds2d, fold="all", budget="20s", epochs=None, iterations_per_epoch=5)
    start = time.time()
    t.run()
    took = time.time() - start
    plan = t._budget_plan
    assert plan is not None and plan.epochs >= 1
    assert t.total_steps == plan.epochs * plan.iterations_per_epoch == t.current_step
    # within the budget, or (on a machine too busy for even that) just the epoch in progress finished
    assert plan.predicted_total_s <= 20 or plan.total_steps == 15
    if plan.predicted_total_s <= 20:
        assert took < 20 * 2  # generous: other tests share the two cores
    log = next(t.output_folder.glob("training_log_*.txt")).read_text()
    assert "budget:" in log
    ckpt = torch.load(t.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["budget_plan"]["total_steps"] == t.total_steps


def test_resume_after_sigkill_continues_steps_and_curves(ds2d, tmp_path):
    out = Path(os.environ["autossl_results"]) / ds2d["name"] / f"autosslTrainer__{TINY}__2d" / "fold_all"
    cmd = [sys.executable, "-m", "autossl.cli.train", str(ds2d["id"]), "2d", "all", "-p", TINY, "-device", "cpu",
           "--epochs", "5", "--iterations-per-epoch", "3", "--val-iterations", "1", "--num-workers", "0",
           "--save-every", "1"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoint_latest.pth"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "checkpoint_final.pth").exists()
    before = torch.load(latest, map_location="cpu", weights_only=False)
    done = before["current_step"]
    assert 0 < done < 15 and done % 3 == 0
    curve = before["logging"]["history"]["train_loss"]
    assert len(curve) == done // 3

    t = _trainer(ds2d, fold="all", epochs=5, iterations_per_epoch=3)
    t.run(continue_training=True)
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_step"] == 15
    hist = ckpt["logging"]["history"]
    assert len(hist["train_loss"]) == 5 and hist["train_loss"][:len(curve)] == curve
    assert hist["step"] == [3 * (i + 1) for i in range(5)]
    logs = sorted(out.glob("training_log_*.txt"))
    assert any("continuing from" in f.read_text() for f in logs)
    # --c after the end: nothing left to train
    t2 = _trainer(ds2d, fold="all", epochs=5, iterations_per_epoch=3)
    t2.run(continue_training=True)
    assert t2.current_step == 15


def test_cli_errors_name_the_fix(ds3d, capsys, monkeypatch, tmp_path):
    from autossl.cli.train import main

    assert main([str(ds3d["id"]), "3d_fullres", "0", "-p", TINY, "--ssl", "no_such_method"]) == 2
    err = capsys.readouterr().err
    assert "no_such_method" in err and "mean_teacher" in err and "none" in err
    assert main([str(ds3d["id"]), "3d_fullres", "0", "-p", "NotPlanned", "-device", "cpu"]) == 1
    assert "autossl_plan_and_preprocess" in capsys.readouterr().err
    make_synthetic_dataset(tmp_path / "raw2", 953, "Unprocessed", n_labeled=2, n_unlabeled=0, n_test=0,
                           shape=(8, 8, 8))
    monkeypatch.setenv("autossl_raw", str(tmp_path / "raw2"))
    assert main(["953", "3d_fullres", "0", "-device", "cpu"]) == 1
    assert "autossl_plan_and_preprocess -d 953" in capsys.readouterr().err
    assert main([str(ds3d["id"]), "3d_fullres", "0", "-p", TINY, "-device", "cpu", "--val"]) == 1
    assert "checkpoint_final" in capsys.readouterr().err


def test_region_labels_train_with_sigmoid_loss(ds2d, monkeypatch, tmp_path):
    """dataset.json regions (nnU-Net semantics): targets become region maps, one sigmoid per region."""
    import shutil

    src = ds2d["preprocessed"]
    dst = tmp_path / "preprocessed" / "Dataset955_Regions"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("splits_final.json"))
    dj = load_json(dst / "dataset.json")
    dj["labels"] = {"background": 0, "whole": [1, 2], "tail": 2}
    dj["regions_class_order"] = [1, 2]
    save_json(dj, dst / "dataset.json")
    monkeypatch.setenv("autossl_preprocessed", str(tmp_path / "preprocessed"))
    from autossl.training.trainer import Trainer

    t = Trainer(955, "2d", "all", plans=TINY, epochs=1, iterations_per_epoch=2, val_iterations=1, num_workers=0,
                device="cpu", verbose=False)
    t.run()
    batch = next(t._loaders["train"])
    assert batch["target"][0].shape[1] == 2 and batch["target"][0].dtype == torch.bool  # two region channels
    hist = t.logger.history
    assert len(hist["pseudo_dice"][0]) == 2 and np.isfinite(hist["train_loss"][0])


def test_pseudo_dice_counts_and_ignore_label_sampling(ds3d):
    from autossl.components.dataloading.dataset import PreprocessedCases
    from autossl.components.dataloading.loaders import LabeledDataLoader
    from autossl.training.metrics import dice_from_counts, tp_fp_fn

    target = torch.tensor([[[0, 1, 1, 2, 3, 3]]])  # 3 = ignore label
    probs = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0, 2, 1, 2]]), 3).permute(0, 2, 1).float()
    tp, fp, fn = tp_fp_fn(probs, target, ignore_label=3)
    assert tp.tolist() == [1, 1] and fp.tolist() == [0, 0] and fn.tolist() == [1, 0]  # ignored voxels count for nothing
    assert dice_from_counts(tp, fp, fn) == pytest.approx([2 / 3, 1.0])
    assert np.isnan(dice_from_counts(torch.zeros(1), torch.zeros(1), torch.zeros(1))[0])

    loader = LabeledDataLoader(PreprocessedCases(ds3d["data"]), 2, (8, 16, 16), (8, 16, 16), [0, 1, 2],
                               has_ignore=True, oversample_foreground_percent=0.0)
    locs = {1: np.zeros((0, 4)), 2: np.zeros((0, 4)), (0, 1, 2): np.array([[0, 10, 12, 14]])}
    lbs, ubs = loader.get_bbox((16, 20, 20), False, locs)  # not forced: centred on an annotated voxel
    assert [a + p // 2 for a, p in zip(lbs, (8, 16, 16))] == [10, 12, 14]
    lbs, _ = loader.get_bbox((16, 20, 20), True, locs)  # forced, no foreground: annotated voxels
    assert [a + p // 2 for a, p in zip(lbs, (8, 16, 16))] == [10, 12, 14]


def test_plans_optimizer_entry_sets_the_cnn_optimizer(ds2d):
    """A configuration's "optimizer" entry (the CPU plans' 2D AdamW) replaces the CNN's SGD, its lr
    drives the schedule, and a malformed entry is an error naming the plans file."""
    from autossl.components.errors import TrainingError

    plans_file = ds2d["preprocessed"] / f"{TINY}.json"
    original = load_json(plans_file)
    try:
        plans = load_json(plans_file)
        plans["configurations"]["2d"]["optimizer"] = {"cnn": {"kind": "adamw", "lr": 1e-3, "weight_decay": 1e-4}}
        save_json(plans, plans_file)
        t = _trainer(ds2d)
        t.initialize()
        opt = t.optimizers["student"]
        assert isinstance(opt, torch.optim.AdamW)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3) and opt.param_groups[0]["weight_decay"] == 1e-4
        assert t.schedulers["student"].lr_at(t.total_steps // 2) < 1e-3
        save_json(original, plans_file)  # without the entry: nnU-Net's SGD
        default = _trainer(ds2d, fold=1)
        default.initialize()
        assert isinstance(default.optimizers["student"], torch.optim.SGD)
        assert default.optimizers["student"].param_groups[0]["lr"] == pytest.approx(1e-2)
        plans["configurations"]["2d"]["optimizer"] = {"cnn": {"kind": "adam", "lr": 1e-3}}
        save_json(plans, plans_file)
        with pytest.raises(TrainingError, match=r"optimizer\.cnn.*invalid") as e:
            _trainer(ds2d)
        assert str(plans_file) in str(e.value)
    finally:
        save_json(original, plans_file)
