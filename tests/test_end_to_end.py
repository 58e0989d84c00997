"""The product's own command lines, end to end, on a tiny synthetic 3D dataset:

    autossl_plan_and_preprocess -d 981 -pl cpu -c 2d 3d_fullres
    autossl_train 981 2d --ssl none --npz ...           (no fold: every fold)
    autossl_train 981 2d --ssl entropy_min --npz ...
    autossl_train 981 3d_fullres --ssl none --npz ...
    autossl_train 981 3d_fullres --ssl entropy_min --npz ...
    autossl_predict ... (no -f: every fold)
    autossl_find_best_configuration 981 -c 2d 3d_fullres --ssl none entropy_min ...
    ... then the commands of inference_instructions.txt, as written.

Commands are the console scripts of pyproject.toml, called in this process (a subprocess per
command would import torch each time) with the argument vector the shell would give them.
Two labelled cases (two folds, as many as they allow), two unlabelled, two test cases; each fold
trains 2 steps.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from autossl.utilities.file_io import load_json
from autossl.utilities.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 981
PLANS = "autosslPlansCPU"
CONFIGS = ("2d", "3d_fullres")
METHODS = ("none", "entropy_min")
TRAIN_OPTS = "--npz --epochs 1 --iterations-per-epoch 2 --val-iterations 1 --num-workers 0 -device cpu"


def console_scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def run_command(line: str) -> tuple[int, str]:
    """Run one shell command line of an autossl console script; returns (exit status, stdout+stderr)."""
    argv = shlex.split(line)
    scripts = console_scripts()
    assert argv[0] in scripts, f"{argv[0]} is not a console script of pyproject.toml"
    module, func = scripts[argv[0]].split(":")
    fn = getattr(importlib.import_module(module), func)
    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = fn(argv[1:])
        except SystemExit as e:
            rc = e.code
    torch.set_num_threads(threads)  # autossl_predict sets its own
    return (0 if rc is None else int(rc)), buf.getvalue()


def ok(line: str) -> str:
    rc, out = run_command(line)
    assert rc == 0, f"{line}\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """Plan, preprocess and train every fold of 2 configurations x 2 methods through the CLIs."""
    root = tmp_path_factory.mktemp("e2e")
    mp = pytest.MonkeyPatch()
    env = {"autossl_raw": str(root / "raw"), "autossl_preprocessed": str(root / "preprocessed"),
           "autossl_results": str(root / "results"), "autossl_n_proc_DA": "0", "autossl_npp": "1",
           "autossl_nps": "1"}
    for k, v in env.items():
        mp.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks; leave the other core alone
    try:
        raw = make_synthetic_dataset(root / "raw", DATASET_ID, "E2E", n_labeled=2, n_unlabeled=2, n_test=2,
                                     shape=(12, 16, 16), spacing=(1.0, 1.0, 1.0), seed=3,
                                     test_labels_dir=root / "labelsTs")
        outputs = {"plan": ok(f"autossl_plan_and_preprocess -d {DATASET_ID} -pl cpu -c 2d 3d_fullres -np 1")}
        for c in CONFIGS:
            for m in METHODS:
                outputs[(c, m)] = ok(f"autossl_train {DATASET_ID} {c} -p {PLANS} --ssl {m} {TRAIN_OPTS}")
        yield {"root": root, "raw": raw, "results": root / "results" / raw.name,
               "preprocessed": root / "preprocessed" / raw.name, "outputs": outputs}
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def _model(workflow, configuration: str, method: str) -> Path:
    trainer = "autosslTrainer" if method == "none" else f"autosslTrainer_{method}"
    return workflow["results"] / f"{trainer}__{PLANS}__{configuration}"


def test_training_without_fold_trains_each_fold_of_the_split(workflow):
    splits = load_json(workflow["preprocessed"] / "splits_final.json")
    assert len(splits) == 2  # two labelled cases: two folds
    for c in CONFIGS:
        for m in METHODS:
            out = workflow["outputs"][(c, m)]
            assert "only 2 labelled cases: 2-fold cross-validation" in out
            model = _model(workflow, c, m)
            for f in (0, 1):
                assert (model / f"fold_{f}" / "checkpoint_final.pth").is_file()
                assert len(list((model / f"fold_{f}" / "validation").glob("*.npz"))) == 1
            assert len(load_json(model / "crossval_results_folds_0_1" / "summary.json")["metric_per_case"]) == 2


def test_predict_without_folds_averages_every_fold(workflow, tmp_path):
    images = workflow["raw"] / "imagesTs"
    base = f"autossl_predict -i {images} -d {DATASET_ID} -c 3d_fullres -p {PLANS} --save_probabilities " \
           f"--disable_progress_bar -npp 1 -nps 1 -device cpu"
    out = ok(f"{base} -o {tmp_path / 'default'}")
    assert "fold(s) 0 1" in out and "every fold found" in out
    ok(f"{base} -o {tmp_path / 'both'} -f 0 1")
    ok(f"{base} -o {tmp_path / 'one'} -f 0")
    cases = sorted(p.name for p in (tmp_path / "default").glob("*.npz"))
    assert len(cases) == 2
    for case in cases:
        default, both, one = (np.load(tmp_path / d / case)["probabilities"] for d in ("default", "both", "one"))
        np.testing.assert_allclose(default, both, atol=1e-6)
        assert np.abs(default - one).max() > 1e-4  # fold 1 contributes
