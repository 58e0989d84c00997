"""Model selection's pieces without training: the inference commands, the table, the spread over
folds, and what an applied postprocessing leaves in the output folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autossl.evaluation.crossval import per_fold_dice, spread
from autossl.model_selection.find_best import (Candidate, TrainedModel, ensemble_identifier, evaluation_processes,
                                               format_table, inference_commands)


def _info(models: list[dict], steps: list) -> dict:
    return {"dataset_name": "Dataset012_Prostate", "folds": [0, 1, 2, 3, 4],
            "best_model_or_ensemble": {"selected_model_or_models": models, "postprocessing_steps": steps,
                                       "postprocessing_json": "/r/x y/postprocessing.json"}}


M1 = {"configuration": "3d_fullres", "plans_identifier": "autosslPlans", "ssl": "ucmt", "network": "cnn"}
M2 = {"configuration": "2d", "plans_identifier": "autosslPlans", "ssl": "none", "network": "transformer"}


def test_single_model_with_postprocessing_commands():
    steps = [{"labels_or_regions": [1, 2]}]
    cmds, final = inference_commands(_info([M1], steps), "/data/in", "/data/out", 4)
    assert cmds == [
        "autossl_predict -d Dataset012_Prostate -i /data/in -o /data/out -f 0 1 2 3 4 -c 3d_fullres -p autosslPlans "
        "--ssl ucmt",
        "autossl_apply_postprocessing -i /data/out -o /data/out_pp -pp_file '/r/x y/postprocessing.json' -np 4"]
    assert final == "/data/out_pp"


def test_ensemble_without_postprocessing_uses_nnunets_placeholders():
    cmds, final = inference_commands(_info([M1, M2], []), "INPUT_FOLDER", "OUTPUT_FOLDER", 2)
    assert [c.split()[0] for c in cmds] == ["autossl_predict", "autossl_predict", "autossl_ensemble"]
    assert "-o OUTPUT_FOLDER_MODEL_1 " in cmds[0] and cmds[0].endswith("--ssl ucmt --save_probabilities")
    assert "-o OUTPUT_FOLDER_MODEL_2 " in cmds[1] and "--ssl none --network transformer --save_probabilities" in cmds[1]
    assert cmds[2] == "autossl_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER -np 2"
    assert final == "OUTPUT_FOLDER"


def _cand(label: str, dice: float, per_fold: dict) -> Candidate:
    m = TrainedModel("2d", label, "cnn", "P", Path(f"/r/autosslTrainer_{label}__P__2d"))
    return Candidate(m.identifier, label, [m], m.folder, dice, per_fold)


def test_table_ranks_best_first_marks_the_choice_and_shows_the_spread():
    a = _cand("a", 0.5, {0: 0.4, 1: 0.6})
    b = _cand("b", 0.7, {0: 0.65, 1: 0.75})
    c = _cand("c", math.nan, {0: math.nan, 1: math.nan})
    text = format_table([a, b, c], b, [0, 1])
    rows = [ln for ln in text.splitlines() if ln[5:9].strip().isdigit()]
    assert [r[5:9].strip() for r in rows] == ["1", "2", "3"]
    assert rows[0].startswith("  *") and " b " in rows[0] and "0.7000" in rows[0]
    assert " a " in rows[1] and "0.5000" in rows[1] and "0.1000" in rows[1]  # std over folds 0.4, 0.6
    assert "0.4000 0.6000" in rows[1]  # min max
    assert " c " in rows[2] and "n/a" in rows[2]
    assert "chosen: b" in text


def test_per_fold_dice_and_spread():
    summary = {"metric_per_case": [
        {"prediction_file": "/p/a.nii.gz", "metrics": {"1": {"Dice": 0.2}, "2": {"Dice": 0.4}}},
        {"prediction_file": "/p/b.nii.gz", "metrics": {"1": {"Dice": 0.6}, "2": {"Dice": float("nan")}}},
        {"prediction_file": "/p/c.nii.gz", "metrics": {"1": {"Dice": 1.0}, "2": {"Dice": 0.0}}}]}
    folds = per_fold_dice(summary, {"a.nii.gz": 0, "b.nii.gz": 0, "c.nii.gz": 1})
    assert folds[0] == pytest.approx((0.4 + 0.4) / 2)  # label 1: mean(0.2, 0.6); label 2: 0.4 (NaN ignored)
    assert folds[1] == pytest.approx(0.5)
    s = spread(folds.values())
    assert s["mean"] == pytest.approx(0.45) and s["std"] == pytest.approx(0.05) and s["min"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="not a validation case"):
        per_fold_dice(summary, {"a.nii.gz": 0})
    assert math.isnan(spread([math.nan])["mean"])


def test_ensemble_identifier_and_evaluation_processes():
    m1 = TrainedModel("2d", "none", "cnn", "P", Path("/r/autosslTrainer__P__2d"))
    m2 = TrainedModel("3d_fullres", "ucmt", "cnn", "P", Path("/r/autosslTrainer_ucmt__P__3d_fullres"))
    ident = ensemble_identifier([m1, m2], [0, 1, 2, 3, 4])
    assert ident == "ensemble___autosslTrainer__P__2d___autosslTrainer_ucmt__P__3d_fullres___0_1_2_3_4"
    assert ident.split("___")[1:3] == [m1.identifier, m2.identifier]  # nnU-Net splits it like this
    assert evaluation_processes(3, 8) == 1 and evaluation_processes(50, 2) == 2 and evaluation_processes(200, 8) == 8


def test_applied_postprocessing_is_recorded_in_the_output_folder(tmp_path):
    import SimpleITK as sitk

    from autossl.postprocessing.remove_connected_components import (apply_postprocessing_to_folder,
                                                                    load_postprocessing,
                                                                    remove_all_but_largest_component_from_segmentation,
                                                                    save_postprocessing)

    pred = tmp_path / "pred"
    pred.mkdir()
    seg = np.zeros((6, 8, 8), np.uint8)
    seg[1:3, 1:3, 1:3] = 1
    seg[5, 7, 7] = 1  # a stray voxel
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(pred / "a.nii.gz"))
    (pred / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz",
                                                   "channel_names": {"0": "CT"}}))
    decision = tmp_path / "decision"
    save_postprocessing(decision, [remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": [1]}],
                        {"dice_before": 0.5, "dice_after": 0.6})
    out = tmp_path / "out"
    apply_postprocessing_to_folder(pred, out, decision / "postprocessing.json", num_processes=1, allow_tqdm=False)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.nii.gz"))).sum() == 8  # the stray voxel is gone
    recorded = json.loads((out / "postprocessing.json").read_text())
    assert recorded["applied_from"] == str((decision / "postprocessing.json").resolve())
    assert recorded["dice_after"] == 0.6 and recorded["postprocessing_kwargs"] == [{"labels_or_regions": [1]}]
    assert load_postprocessing(out / "postprocessing.pkl")[1] == [{"labels_or_regions": [1]}]
    # applied in place next to the decision itself: the decision is left as it was
    before = (decision / "postprocessing.json").read_text()
    apply_postprocessing_to_folder(pred, decision, decision / "postprocessing.json", num_processes=1, allow_tqdm=False)
    assert (decision / "postprocessing.json").read_text() == before


def test_gathering_the_folds_drops_stale_cases_and_refuses_a_case_in_two_folds(tmp_path):
    from autossl.evaluation.crossval import case_to_fold, gather_crossval_predictions

    model = tmp_path / "autosslTrainer__P__2d"
    for f, cases in ((0, ["a", "b"]), (1, ["c"])):
        (model / f"fold_{f}" / "validation").mkdir(parents=True)
        for c in cases:
            (model / f"fold_{f}" / "validation" / f"{c}.png").write_bytes(c.encode())
    (model / "dataset.json").write_text("{}")
    old = model / "crossval_results_folds_0_1"
    old.mkdir()
    (old / "z.png").write_bytes(b"from another split")
    (old / "notes.txt").write_text("kept")
    out = gather_crossval_predictions(model, [0, 1], ".png")
    assert out == old and sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]
    assert (out / "c.png").read_bytes() == b"c" and (out / "notes.txt").is_file() and (out / "dataset.json").is_file()
    assert case_to_fold(model, [0, 1], ".png") == {"a.png": 0, "b.png": 0, "c.png": 1}
    (model / "fold_1" / "validation" / "a.png").write_bytes(b"a")
    with pytest.raises(ValueError, match="a.png is a validation case of fold 0 and of fold 1"):
        case_to_fold(model, [0, 1], ".png")
    with pytest.raises(FileNotFoundError, match="fold_2/validation: no validation predictions"):
        gather_crossval_predictions(model, [0, 1, 2], ".png")
