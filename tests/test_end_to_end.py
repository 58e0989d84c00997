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


def _table_rows(out: str) -> list[dict]:
    """The candidate rows of autossl_find_best_configuration's table."""
    import re

    rows = []
    for line in out.splitlines():
        m = re.match(r"^(  \*  |     )\s*(\d+)  (.+?)\s+(\d\.\d{4}|n/a)\s+(\d\.\d{4}|n/a)\s+(\d\.\d{4}|n/a)\s+"
                     r"(\d\.\d{4}|n/a)\s+(\d\.\d{4}|n/a)$", line)
        if m:
            rows.append({"chosen": m.group(1).strip() == "*", "rank": int(m.group(2)), "label": m.group(3).strip(),
                         "dice": float(m.group(4)), "min": float(m.group(7)), "max": float(m.group(8))})
    return rows


def test_find_best_configuration_then_the_instructions_as_written(workflow, tmp_path):
    from autossl.imageio.simpleitk_io import SimpleITKIO

    results = workflow["results"]
    out_dir = tmp_path / "final"
    out = ok(f"autossl_find_best_configuration {DATASET_ID} -c {' '.join(CONFIGS)} --ssl {' '.join(METHODS)} "
             f"-p {PLANS} -np 1 -i {workflow['raw'] / 'imagesTs'} -o {out_dir}")
    info = load_json(results / "inference_information.json")
    rows = _table_rows(out)
    # 4 models and the 6 pairs of them, each scored once, best first
    assert len(rows) == 4 + 6 and len(info["all_results"]) == 10
    assert [r["rank"] for r in rows] == list(range(1, 11))
    assert [r["dice"] for r in rows] == sorted((r["dice"] for r in rows), reverse=True)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["dice"] == max(r["dice"] for r in rows)
    best = info["best_model_or_ensemble"]
    assert chosen[0]["label"] == best["label"]
    assert best["result_on_crossval_pre_pp"] == pytest.approx(max(info["all_results"].values()))
    for r in rows:  # the spread over the two folds brackets each fold's Dice
        ident = next(k for k, v in info["labels"].items() if v == r["label"])
        per_fold = info["all_results_per_fold"][ident].values()
        assert r["min"] == pytest.approx(min(per_fold), abs=1e-4) and r["max"] == pytest.approx(max(per_fold), abs=1e-4)
        assert min(per_fold) - 1e-4 <= info["all_results"][ident] <= max(per_fold) + 1e-4
    # an ensemble's score is the Dice of its averaged validation probabilities
    ens = [k for k in info["all_results"] if k.startswith("ensemble___")]
    assert len(ens) == 6
    for k in ens:
        folder = results / "ensembles" / k
        assert (folder / "summary.json").is_file() and (folder / "dataset.json").is_file()
        assert load_json(folder / "summary.json")["foreground_mean"]["Dice"] == pytest.approx(info["all_results"][k])
    # the model's own cross-validation summary is what its row shows
    m = info["considered_models"][0]
    ident = Path(m["model_folder"]).name
    assert info["all_results"][ident] == pytest.approx(
        load_json(Path(m["model_folder"]) / "crossval_results_folds_0_1" / "summary.json")["foreground_mean"]["Dice"])

    # the instructions, run as written
    text = (results / "inference_instructions.txt").read_text()
    commands = [line for line in text.splitlines() if line.startswith("autossl_")]
    assert commands == info["commands"] and commands
    n_models = len(best["selected_model_or_models"])
    assert sum(c.startswith("autossl_predict ") for c in commands) == n_models
    assert any(c.startswith("autossl_ensemble ") for c in commands) == (n_models == 2)
    assert any(c.startswith("autossl_apply_postprocessing ") for c in commands) == bool(best["postprocessing_steps"])
    for c in commands:
        ok(c)
    final = Path(info["final_output_folder"])
    assert final == (out_dir.parent / "final_pp" if best["postprocessing_steps"] else out_dir)
    # nnU-Net's files: one segmentation per test case, dataset.json, plans.json (+ the postprocessing applied)
    segs = sorted(p.name for p in final.glob("*.nii.gz"))
    assert segs == sorted(p.name.replace("_0000.nii.gz", ".nii.gz") for p in (workflow["raw"] / "imagesTs").iterdir())
    assert load_json(final / "dataset.json")["labels"] == load_json(workflow["raw"] / "dataset.json")["labels"]
    assert "configurations" in load_json(final / "plans.json")
    if best["postprocessing_steps"]:
        assert load_json(final / "postprocessing.json")["postprocessing_kwargs"] == best["postprocessing_steps"]
    seg, props = SimpleITKIO().read_seg(str(final / segs[0]))
    img, _ = SimpleITKIO().read_images([str(workflow["raw"] / "imagesTs" / segs[0].replace(".nii.gz", "_0000.nii.gz"))])
    assert seg.shape == img.shape and set(np.unique(seg)) <= {0, 1, 2}


def test_find_best_configuration_errors_name_the_fix(workflow, capsys):
    rc, out = run_command(f"autossl_find_best_configuration {DATASET_ID} -c 3d_lowres --ssl none -p {PLANS}")
    assert rc == 1 and "no trained model" in out and "autossl_train" in out
    rc, out = run_command(f"autossl_find_best_configuration {DATASET_ID} -c 2d --ssl none ucmt -p {PLANS} --strict")
    assert rc == 1 and "autosslTrainer_ucmt__autosslPlansCPU__2d is not trained" in out
    rc, out = run_command(f"autossl_find_best_configuration {DATASET_ID} --ssl no_such_method")
    assert rc == 2 and "no_such_method" in out and "entropy_min" in out
    # defaults: every trained configuration x method, the untrained ones left out quietly
    out = ok(f"autossl_find_best_configuration {DATASET_ID} -p {PLANS} --disable_ensembling -np 1")
    assert "4 trained model(s)" in out and "left out" not in out and len(_table_rows(out)) == 4
