"""``autossl_train`` without a fold: every fold of the split, skipping finished folds, resuming an
interrupted one with ``--c``, one budget for the whole command and the cross-validation summary;
``--help`` lists the methods."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_training import TINY, write_tiny_plans
from autossl.utilities.file_io import load_json, save_json
from autossl.utilities.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def three_labeled(tmp_path_factory):
    """A 2D dataset with 3 labelled and 2 unlabelled cases, planned and preprocessed (tiny plans)."""
    from autossl.fingerprint.extractor import extract_fingerprint
    from autossl.planning.default_planner import ExperimentPlanner
    from autossl.preprocessing.preprocessor import run_configurations

    root = tmp_path_factory.mktemp("crossval")
    env = {"autossl_raw": str(root / "raw"), "autossl_preprocessed": str(root / "preprocessed"),
           "autossl_results": str(root / "results")}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        ds = make_synthetic_dataset(root / "raw", 971, "CV2D", two_d=True, n_labeled=3, n_unlabeled=2, n_test=0,
                                    shape=(32, 32), seed=4)
        extract_fingerprint(ds.name, num_processes=1)
        ExperimentPlanner(ds.name).plan_experiment()
        write_tiny_plans(root / "preprocessed" / ds.name, "2d", [16, 16])
        run_configurations(ds.name, ["2d"], TINY, 1)
    finally:
        mp.undo()
    return {"env": env, "id": 971, "name": ds.name, "preprocessed": root / "preprocessed" / ds.name}


@pytest.fixture
def cv(three_labeled, monkeypatch, tmp_path):
    for k, v in three_labeled["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("autossl_results", str(tmp_path / "results"))
    monkeypatch.setenv("autossl_n_proc_DA", "0")
    return {**three_labeled, "results": tmp_path / "results"}


TINY_RUN = ["-p", TINY, "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1",
            "--num-workers", "0", "-device", "cpu"]


def test_help_lists_every_registered_method(capsys):
    from autossl.cli.train import main
    from autossl.ssl.registry import available_methods

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    methods = available_methods()
    assert len(methods) >= 5
    for m in methods:
        assert m in out, m
    assert "[fold]" in out  # the fold is optional
    assert main(["1", "2d", "--ssl", "not_a_method"]) == 2
    err = capsys.readouterr().err
    assert "not_a_method" in err and all(m in err for m in methods)


def test_no_fold_trains_every_fold_skips_finished_and_resumes_with_c(cv, capsys):
    from autossl.cli.train import main

    assert main([str(cv["id"]), "2d", "--ssl", "entropy_min", "--npz", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert "only 3 labelled cases: 3-fold cross-validation" in out
    model = cv["results"] / cv["name"] / f"autosslTrainer_entropy_min__{TINY}__2d"
    splits = load_json(cv["preprocessed"] / "splits_final.json")
    assert len(splits) == 3
    all_val = []
    for f in range(3):
        fold = model / f"fold_{f}"
        assert (fold / "checkpoint_final.pth").is_file()
        val = fold / "validation"
        assert (val / "summary.json").is_file()
        cases = sorted(p.name[:-4] for p in val.glob("*.png"))
        assert cases == sorted(splits[f]["val"]) and all((val / f"{c}.npz").is_file() for c in cases)
        all_val += cases
        debug = load_json(fold / "debug.json")
        assert debug["num_unlabeled_cases"] == 2  # every fold trains on every unlabelled case
        assert sorted(debug["train_cases"]) == sorted(splits[f]["train"])
    assert sorted(all_val) == sorted(c for s in splits for c in s["val"])  # the union: every labelled case once

    # the cross-validation summary: computed on the union of the folds' predictions
    cv_summary = load_json(model / "crossval_results_folds_0_1_2" / "summary.json")
    assert len(cv_summary["metric_per_case"]) == 3
    per_case = {}
    for f in range(3):
        for entry in load_json(model / f"fold_{f}" / "validation" / "summary.json")["metric_per_case"]:
            per_case[Path(entry["prediction_file"]).name] = entry["metrics"]
    for label in ("1", "2"):
        dice = [per_case[n][label]["Dice"] for n in sorted(per_case)]
        assert cv_summary["mean"][label]["Dice"] == pytest.approx(np.nanmean(dice))
    assert f"all folds together: {cv_summary['foreground_mean']['Dice']:.4f}" in out

    # interrupt fold 1 (its final checkpoint gone, a latest one left), then rerun with --c and more epochs
    f1 = model / "fold_1"
    (f1 / "checkpoint_final.pth").rename(f1 / "checkpoint_latest.pth")  # the state at step 2 of 2
    for p in (f1 / "validation").iterdir():
        p.unlink()
    finished = {f: (model / f"fold_{f}" / "checkpoint_final.pth").stat().st_mtime_ns for f in (0, 2)}
    run2 = [*TINY_RUN, "--epochs", "2"]  # the last --epochs wins
    assert main([str(cv["id"]), "2d", "--ssl", "entropy_min", "--npz", "--c", *run2]) == 0
    out = capsys.readouterr().out
    assert "fold 0 (1/3): finished" in out and "fold 2 (3/3): finished" in out
    assert "fold 1 (2/3): resuming from" in out
    assert {f: (model / f"fold_{f}" / "checkpoint_final.pth").stat().st_mtime_ns for f in (0, 2)} == finished
    ckpt = torch.load(f1 / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["current_step"] == 4  # resumed at step 2, not restarted
    assert ckpt["logging"]["history"]["step"] == [2, 4]
    assert (f1 / "validation" / "summary.json").is_file()

    # a third run has nothing to train
    assert main([str(cv["id"]), "2d", "--ssl", "entropy_min", "--npz", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    assert out.count("finished (") == 3 and "training\n" not in out


class _FakeTrainer:
    """Records how the fold loop calls the trainer; "trains" by writing the fold's files and
    advancing the fake clock."""
    calls: list = []
    clock = [0.0]
    uses = {}  # fold -> seconds the fold takes

    def __init__(self, dataset, configuration, fold, *, plans, npz=False, budget=None, **kw):
        from autossl import paths
        from autossl.training.naming import trainer_name

        self.fold, self.budget = fold, budget
        self.folder = paths.results_dir() / "Dataset971_CV2D" / \
            f"{trainer_name(kw.get('ssl', 'none'))}__{plans}__{configuration}" / f"fold_{fold}"

    def run(self, continue_training=False, validation_only=False):
        _FakeTrainer.calls.append((self.fold, self.budget, continue_training, validation_only))
        _FakeTrainer.clock[0] += _FakeTrainer.uses.get(self.fold, 0.0)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "checkpoint_final.pth").write_bytes(b"x")
        save_json({"foreground_mean": {"Dice": 0.5}}, self.folder / "validation" / "summary.json")


def test_budget_is_shared_by_the_folds_still_to_train(cv, monkeypatch):
    import autossl.training.crossval as crossval
    import autossl.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "Trainer", _FakeTrainer)
    monkeypatch.setattr(crossval.time, "time", lambda: _FakeTrainer.clock[0])
    monkeypatch.setattr("autossl.evaluation.crossval.accumulate_crossval_results",
                        lambda model, folds, gt, num_processes=1: (model / "cv", {"foreground_mean": {"Dice": 0.5}}))
    model = cv["results"] / cv["name"] / f"autosslTrainer__{TINY}__2d"
    # fold 0 is finished, fold 1 was interrupted, fold 2 is new
    (model / "fold_0" / "validation").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
    save_json({"foreground_mean": {"Dice": 0.4}}, model / "fold_0" / "validation" / "summary.json")
    (model / "fold_1").mkdir()
    (model / "fold_1" / "checkpoint_latest.pth").write_bytes(b"x")
    _FakeTrainer.calls, _FakeTrainer.clock[0], _FakeTrainer.uses = [], 0.0, {1: 20.0, 2: 5.0}
    result = crossval.train_all_folds(cv["id"], "2d", plans=TINY, budget="90s", continue_training=True,
                                      log=lambda s: None)
    # fold 0 skipped; fold 1 gets half of 90 s, uses 20, so fold 2 gets the 70 s left
    assert _FakeTrainer.calls == [(1, 45.0, True, False), (2, 70.0, True, False)]
    assert [(f.fold, f.action) for f in result.folds] == [(0, "skipped"), (1, "resumed"), (2, "trained")]
    assert result.folds[0].dice == 0.4

    # a trained fold without its validation (or, with --npz, without probabilities) is validated only
    (model / "fold_2" / "validation" / "summary.json").unlink()
    _FakeTrainer.calls = []
    result = crossval.train_all_folds(cv["id"], "2d", plans=TINY, log=lambda s: None)
    assert _FakeTrainer.calls == [(2, None, False, True)]
    _FakeTrainer.calls = []
    crossval.train_all_folds(cv["id"], "2d", plans=TINY, npz=True, log=lambda s: None)
    assert sorted(c[0] for c in _FakeTrainer.calls) == [0, 1, 2] and all(c[3] for c in _FakeTrainer.calls)


def test_too_few_labelled_cases_for_a_cross_validation(tmp_path, monkeypatch, capsys):
    from autossl.training.crossval import plan_crossval
    from autossl.components.errors import TrainingError

    monkeypatch.setenv("autossl_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("autossl_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("autossl_results", str(tmp_path / "res"))
    base = tmp_path / "pre" / "Dataset972_One"
    (base / "P_2d").mkdir(parents=True)
    save_json({"plans_name": "P", "configurations": {"2d": {"data_identifier": "P_2d", "architecture": {}}}},
              base / "P.json")
    save_json({"file_ending": ".png", "labels": {"background": 0, "a": 1}, "channel_names": {"0": "x"}},
              base / "dataset.json")
    with pytest.raises(TrainingError, match="holds no preprocessed cases"):
        plan_crossval(972, "2d", "P")
    (base / "P_2d" / "only.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="at least 2 labelled cases.*fold 'all'"):
        plan_crossval(972, "2d", "P")
    with pytest.raises(TrainingError, match="autossl_plan_and_preprocess"):
        plan_crossval(972, "2d", "Missing")
    # a user's splits file with 3 folds over many cases is followed and named
    for i in range(6):
        (base / "P_2d" / f"c{i}.pkl").write_bytes(b"")
    save_json([{"train": ["a"], "val": ["b"]}] * 3, base / "splits_final.json")
    plan = plan_crossval(972, "2d", "P")
    assert plan.folds == [0, 1, 2] and "defines 3 folds" in plan.note
