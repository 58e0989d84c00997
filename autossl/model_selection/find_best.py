"""Choose the best configuration / method / ensemble from cross-validation (nnU-Net v2's
``find_best_configuration``, with the semi-supervised method as one more axis).

For every trained model (configuration x ``--ssl`` method x plans x network) whose folds all have
validation predictions, the folds' predictions are evaluated together
(``crossval_results_folds_<folds>/summary.json`` in the model folder). Every pair of models is
ensembled fold by fold from the ``.npz`` probabilities of the folds' validation predictions
(``autossl_train ... --npz``): the averaged probabilities of the two go to
``ensembles/ensemble___<model 1>___<model 2>___<folds>/`` and are evaluated the same way. The
candidate with the highest foreground-mean Dice over all validation cases wins (ties: the first,
single models before ensembles, as nnU-Net); nnU-Net's connected-component postprocessing is then
determined on its cross-validation predictions. ``inference_information.json`` and
``inference_instructions.txt`` in the dataset's results folder hold the result and the exact
commands (``autossl_predict`` per model, ``autossl_ensemble``, ``autossl_apply_postprocessing``).
"""
from __future__ import annotations

import itertools
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from autossl import paths
from autossl.training.naming import trainer_name
from autossl.utilities.file_io import atomic_path, load_json, save_json

INFERENCE_INFORMATION = "inference_information.json"
INFERENCE_INSTRUCTIONS = "inference_instructions.txt"
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


class ModelSelectionError(ValueError):
    """Nothing to choose from, or inputs that do not fit; the message names the folder or file."""


@dataclass(frozen=True)
class TrainedModel:
    configuration: str
    ssl: str
    network: str
    plans: str
    folder: Path

    @property
    def trainer(self) -> str:
        return self.folder.name.split("__")[0]

    @property
    def identifier(self) -> str:
        """``<trainer>__<plans>__<configuration>`` (nnU-Net's)."""
        return self.folder.name

    @property
    def label(self) -> str:
        net = "/transformer" if self.network == "transformer" else ""
        return f"{self.configuration} {self.ssl}{net}"


@dataclass
class Candidate:
    identifier: str
    label: str
    members: list[TrainedModel]
    source: Path                       # the folder holding its cross-validation predictions
    dice: float                        # foreground-mean Dice over every validation case
    per_fold: dict[int, float] = field(default_factory=dict)

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def score(self) -> float:
        return -math.inf if self.dice is None or math.isnan(self.dice) else self.dice


def folds_string(folds: Sequence[int]) -> str:
    return "_".join(str(f) for f in folds)


def ensemble_identifier(models: Sequence[TrainedModel], folds: Sequence[int]) -> str:
    """``ensemble___<id 1>___<id 2>___<folds>`` (nnU-Net's)."""
    return "ensemble___" + "___".join(m.identifier for m in models) + "___" + folds_string(folds)


def default_folds(dataset_name: str) -> list[int]:
    """Every fold of the dataset's ``splits_final.json``."""
    f = paths.preprocessed_dir() / dataset_name / "splits_final.json"
    if not f.is_file():
        raise ModelSelectionError(f"{f} does not exist: no fold has been trained yet; train every fold first "
                                  f"(autossl_train {dataset_name} CONFIGURATION --ssl METHOD --npz)")
    splits = load_json(f)
    if not isinstance(splits, list) or not splits:
        raise ModelSelectionError(f"{f}: expected a list of {{'train': [...], 'val': [...]}} folds")
    return list(range(len(splits)))


def _validation_status(model: TrainedModel, folds: Sequence[int], file_ending: str) -> tuple[list[int], list[int]]:
    """(folds without validation predictions, folds whose predictions lack .npz probabilities)."""
    missing, no_npz = [], []
    for f in folds:
        val = model.folder / f"fold_{f}" / "validation"
        segs = sorted(p.name[: -len(file_ending)] for p in val.glob(f"*{file_ending}")
                      if not p.name.startswith(".")) if val.is_dir() else []
        if not segs or not (val / "summary.json").is_file():
            missing.append(f)
        elif any(not (val / f"{c}.npz").is_file() or not (val / f"{c}.pkl").is_file() for c in segs):
            no_npz.append(f)
    return missing, no_npz


def _train_command(dataset_name: str, model: TrainedModel) -> str:
    net = " --network transformer" if model.network == "transformer" else ""
    return f"autossl_train {dataset_name} {model.configuration} -p {model.plans} --ssl {model.ssl}{net} --npz"


def evaluation_processes(num_cases: int, num_processes: int) -> int:
    """Worker processes for evaluating ``num_cases``: starting one costs about as much as
    evaluating a few small cases, so below ten cases per process fewer are started."""
    return max(1, min(int(num_processes), num_cases // 10))


def _score_model(model: TrainedModel, folds: Sequence[int], gt: Path, num_processes: int) -> Candidate:
    from autossl.evaluation.crossval import accumulate_crossval_results, case_to_fold, per_fold_dice

    fe = load_json(model.folder / "dataset.json")["file_ending"]
    assignment = case_to_fold(model.folder, folds, fe)
    source, summary = accumulate_crossval_results(model.folder, folds, gt,
                                                  num_processes=evaluation_processes(len(assignment), num_processes))
    per_fold = per_fold_dice(summary, assignment)
    return Candidate(model.identifier, model.label, [model], source,
                     float(summary["foreground_mean"].get("Dice", math.nan)), per_fold)


def _score_ensemble(models: Sequence[TrainedModel], folds: Sequence[int], gt: Path, dataset_name: str,
                    num_processes: int) -> Candidate:
    """Average the members' validation probabilities fold by fold into the ensemble's folder and
    evaluate all folds together."""
    from autossl.ensembling.ensemble import ensemble_folders
    from autossl.evaluation.crossval import case_to_fold, per_fold_dice, remove_stale_segmentations
    from autossl.evaluation.evaluate import compute_metrics_on_folder_simple

    first = models[0]
    dataset_json = load_json(first.folder / "dataset.json")
    plans = load_json(first.folder / "plans.json")
    fe = dataset_json["file_ending"]
    assignment = case_to_fold(first.folder, folds, fe)
    for m in models[1:]:
        if case_to_fold(m.folder, folds, fe) != assignment:
            raise ModelSelectionError(f"{first.folder} and {m.folder} validate different cases in folds "
                                      f"{list(folds)}: they were not trained on the same splits_final.json")
    identifier = ensemble_identifier(models, folds)
    out = paths.results_dir() / dataset_name / "ensembles" / identifier
    if out.is_dir():  # an earlier run's cases must not enter this evaluation
        remove_stale_segmentations(out, fe, set(assignment))
    for f in folds:
        ensemble_folders([m.folder / f"fold_{f}" / "validation" for m in models], out, False, num_processes,
                         dataset_json, plans, allow_tqdm=False)
    summary = compute_metrics_on_folder_simple(gt, out, dataset_json, plans, out / "summary.json",
                                               num_processes=evaluation_processes(len(assignment), num_processes),
                                               chill=True, allow_tqdm=False)
    return Candidate(identifier, "ensemble " + " + ".join(m.label for m in models), list(models), out,
                     float(summary["foreground_mean"].get("Dice", math.nan)), per_fold_dice(summary, assignment))


def format_table(candidates: Sequence[Candidate], best: Candidate, folds: Sequence[int]) -> str:
    """Every candidate, best first: Dice over all validation cases and the spread over folds."""
    from autossl.evaluation.crossval import spread

    def fmt(v: float) -> str:
        return "   n/a" if v is None or math.isnan(v) else f"{v:.4f}"

    width = max([len("candidate")] + [len(c.label) for c in candidates])
    head = (f"     {'rank':>4}  {'candidate':<{width}}  {'Dice':>6}  {'folds: mean':>11} {'std':>6}  "
            f"{'min':>6} {'max':>6}")
    lines = [f"cross-validation, folds {' '.join(map(str, folds))}: foreground-mean Dice over every validation "
             f"case (what decides), and its mean, std, min and max over the folds",
             head, "     " + "-" * (len(head) - 5)]
    ranked = sorted(candidates, key=lambda c: -c.score)  # stable: ties keep their order
    for i, c in enumerate(ranked, 1):
        s = spread(list(c.per_fold.values()))
        mark = "  *  " if c is best else "     "
        lines.append(f"{mark}{i:>4}  {c.label:<{width}}  {fmt(c.dice):>6}  {fmt(s['mean']):>11} {fmt(s['std']):>6}  "
                     f"{fmt(s['min']):>6} {fmt(s['max']):>6}")
    lines.append(f"  *  chosen: {best.label} ({best.identifier})")
    return "\n".join(lines)


def _q(path: str | Path) -> str:
    return shlex.quote(str(path))


def inference_commands(info: dict, input_folder: str, output_folder: str, num_processes: int) -> tuple[list[str], str]:
    """The commands that predict new images with the chosen candidate; returns (commands, the
    folder with the final segmentations). Placeholders are nnU-Net's (INPUT_FOLDER,
    OUTPUT_FOLDER, OUTPUT_FOLDER_MODEL_1, OUTPUT_FOLDER_PP) unless real folders are given."""
    best = info["best_model_or_ensemble"]
    models = best["selected_model_or_models"]
    folds = " ".join(str(f) for f in info["folds"])
    placeholders = output_folder == "OUTPUT_FOLDER"

    def derived(suffix: str) -> str:
        return f"{output_folder}_{suffix.upper() if placeholders else suffix.lower()}"

    commands = []
    outs = [output_folder] if len(models) == 1 else [derived(f"model_{i + 1}") for i in range(len(models))]
    for m, out in zip(models, outs):
        line = (f"autossl_predict -d {info['dataset_name']} -i {_q(input_folder)} -o {_q(out)} -f {folds} "
                f"-c {m['configuration']} -p {m['plans_identifier']} --ssl {m['ssl']}")
        if m["network"] != "cnn":
            line += f" --network {m['network']}"
        if len(models) > 1:
            line += " --save_probabilities"
        commands.append(line)
    if len(models) > 1:
        commands.append(f"autossl_ensemble -i {' '.join(_q(o) for o in outs)} -o {_q(output_folder)} "
                        f"-np {num_processes}")
    final = output_folder
    if best["postprocessing_steps"]:
        final = derived("pp")
        commands.append(f"autossl_apply_postprocessing -i {_q(output_folder)} -o {_q(final)} "
                        f"-pp_file {_q(best['postprocessing_json'])} -np {num_processes}")
    return commands, final


def instructions_text(info: dict) -> str:
    best = info["best_model_or_ensemble"]
    pre, post = best["result_on_crossval_pre_pp"], best["result_on_crossval_post_pp"]
    lines = [f"{info['dataset_name']}: best of {len(info['all_results'])} candidates on the cross-validation "
             f"(folds {' '.join(map(str, info['folds']))}), chosen by autossl_find_best_configuration",
             "",
             f"Best: {best['label']}",
             f"  {best['identifier']}",
             f"  foreground-mean Dice {pre:.4f} on the cross-validation"
             + (f", {post:.4f} after postprocessing" if best["postprocessing_steps"] else
                "; postprocessing: no step improved it, none is applied"),
             "",
             "***All commands use the autossl_results folder (or nnUNet_results) from the environment***",
             "",
             "Run inference like this:",
             ""]
    lines += info["commands"]
    lines += ["", f"The segmentations are then in {info['final_output_folder']}", ""]
    return "\n".join(lines)


def find_models(dataset_name: str, configurations: Sequence[str], methods: Sequence[str],
                plans: Sequence[str], networks: Sequence[str]) -> list[TrainedModel]:
    """The requested (configuration, method, plans, network) combinations whose model folder exists."""
    found = []
    base = paths.results_dir() / dataset_name
    for c, m, p, n in itertools.product(configurations, methods, plans, networks):
        folder = base / f"{trainer_name(m, n)}__{p}__{c}"
        if folder.is_dir():
            found.append(TrainedModel(c, m, n, p, folder))
    return found


def find_best_configuration(dataset: str | int, configurations: Sequence[str] | None = None,
                            methods: Sequence[str] | None = None, plans: Sequence[str] = ("autosslPlans",),
                            networks: Sequence[str] = ("cnn",), folds: Sequence[int] | None = None,
                            allow_ensembling: bool = True, num_processes: int = 2, strict: bool = False,
                            input_folder: str = "INPUT_FOLDER", output_folder: str = "OUTPUT_FOLDER",
                            log: Callable[[str], None] = print) -> dict:
    """See the module docstring; returns the content of ``inference_information.json``.

    ``configurations`` None: ``DEFAULT_CONFIGURATIONS``; ``methods`` None: every registered
    method. Combinations without a model folder are left out quietly, unless both the
    configuration and the method were asked for (then they are reported). ``strict``: a reported
    model, or one that lacks folds or (for ensembles) probabilities, is an error instead of being
    left out."""
    from autossl.postprocessing.remove_connected_components import (POSTPROCESSING_JSON, POSTPROCESSING_PKL,
                                                                    determine_postprocessing)
    from autossl.utilities.dataset_name import find_dataset_name

    explicit = methods is not None and configurations is not None
    configurations = list(DEFAULT_CONFIGURATIONS) if configurations is None else list(configurations)
    if methods is None:
        from autossl.ssl.registry import available_methods

        methods = available_methods()
    dataset_name = find_dataset_name(dataset)
    folds = list(folds) if folds else default_folds(dataset_name)
    gt = paths.preprocessed_dir() / dataset_name / "gt_segmentations"
    if not gt.is_dir():
        raise ModelSelectionError(f"{gt} does not exist: the cross-validation is scored against the "
                                  f"preprocessing's copy of the labels; run autossl_plan_and_preprocess -d {dataset}")

    def problem(msg: str) -> None:
        if strict:
            raise ModelSelectionError(msg)
        log(f"left out: {msg}")

    present = find_models(dataset_name, configurations, methods, plans, networks)
    if explicit:
        have = {(m.configuration, m.ssl, m.plans, m.network) for m in present}
        for c, m, p, n in itertools.product(configurations, methods, plans, networks):
            if (c, m, p, n) not in have:
                folder = paths.results_dir() / dataset_name / f"{trainer_name(m, n)}__{p}__{c}"
                problem(f"{folder.name} is not trained ({folder} does not exist; "
                        f"{_train_command(dataset_name, TrainedModel(c, m, n, p, folder))})")
    models, ensemblable = [], []
    for m in present:
        dj = m.folder / "dataset.json"
        if not dj.is_file():
            problem(f"{dj} is missing; is {m.folder} a training output folder?")
            continue
        missing, no_npz = _validation_status(m, folds, load_json(dj)["file_ending"])
        if missing:
            problem(f"{m.identifier}: fold(s) {' '.join(map(str, missing))} of {' '.join(map(str, folds))} have no "
                    f"validation predictions; train them: {_train_command(dataset_name, m)}")
            continue
        models.append(m)
        if no_npz and allow_ensembling:
            problem(f"{m.identifier}: the validation of fold(s) {' '.join(map(str, no_npz))} has no .npz "
                    f"probabilities, so it is in no ensemble; {_train_command(dataset_name, m)} adds them "
                    f"without training again")
        elif not no_npz:
            ensemblable.append(m)
    if not models:
        raise ModelSelectionError(
            f"{dataset_name}: no trained model with every fold ({' '.join(map(str, folds))}) among configurations "
            f"{list(configurations)}, methods {list(methods)}, plans {list(plans)} in {paths.results_dir() / dataset_name}; "
            f"train them with autossl_train {dataset_name} CONFIGURATION --ssl METHOD --npz")

    log(f"{dataset_name}: {len(models)} trained model(s), folds {' '.join(map(str, folds))}")
    candidates = [_score_model(m, folds, gt, num_processes) for m in models]
    if allow_ensembling:
        for pair in itertools.combinations(ensemblable, 2):
            candidates.append(_score_ensemble(pair, folds, gt, dataset_name, num_processes))
    best = max(candidates, key=lambda c: c.score)  # the first of equals: single models before ensembles
    if best.score == -math.inf:
        raise ModelSelectionError(f"{dataset_name}: every candidate has an undefined Dice (empty references and "
                                  f"predictions?); nothing to choose")
    log(format_table(candidates, best, folds))

    log(f"determining postprocessing on {best.source}")
    fe = load_json(best.source / "dataset.json")["file_ending"]
    n_cases = len([p for p in best.source.glob(f"*{fe}") if not p.name.startswith(".")])
    pp = determine_postprocessing(best.source, gt, best.source / "dataset.json", best.source / "plans.json",
                                  best.source, evaluation_processes(n_cases, num_processes),
                                  keep_postprocessed_files=True, allow_tqdm=False)
    steps = pp["postprocessing_kwargs"]
    log(f"postprocessing: Dice {pp['dice_before']:.4f} -> {pp['dice_after']:.4f}, "
        + (f"kept: largest component of {[s['labels_or_regions'] for s in steps]}" if steps else "nothing kept"))

    from autossl.evaluation.crossval import spread

    info = {
        "dataset_name_or_id": str(dataset),
        "dataset_name": dataset_name,
        "folds": folds,
        "considered_models": [{"configuration": m.configuration, "ssl": m.ssl, "network": m.network,
                               "plans_identifier": m.plans, "trainer": m.trainer, "model_folder": str(m.folder),
                               "in_ensembles": m in ensemblable} for m in models],
        "ensembling_allowed": allow_ensembling,
        "all_results": {c.identifier: c.dice for c in candidates},
        "all_results_per_fold": {c.identifier: {str(f): d for f, d in c.per_fold.items()} for c in candidates},
        "all_results_spread": {c.identifier: spread(list(c.per_fold.values())) for c in candidates},
        "labels": {c.identifier: c.label for c in candidates},
        "best_model_or_ensemble": {
            "identifier": best.identifier,
            "label": best.label,
            "result_on_crossval_pre_pp": best.dice,
            "result_on_crossval_post_pp": pp["dice_after"],
            "postprocessing_file": str(best.source / POSTPROCESSING_PKL),
            "postprocessing_json": str(best.source / POSTPROCESSING_JSON),
            "postprocessing_steps": steps,
            "some_plans_file": str(best.source / "plans.json"),
            "crossval_folder": str(best.source),
            "selected_model_or_models": [{"configuration": m.configuration, "trainer": m.trainer,
                                          "plans_identifier": m.plans, "ssl": m.ssl, "network": m.network}
                                         for m in best.members],
        },
    }
    commands, final = inference_commands(info, input_folder, output_folder, num_processes)
    info["commands"] = commands
    info["final_output_folder"] = final
    results = paths.results_dir() / dataset_name
    save_json(info, results / INFERENCE_INFORMATION, sort_keys=False)
    text = instructions_text(info)
    with atomic_path(results / INFERENCE_INSTRUCTIONS) as tmp:
        tmp.write_text(text)
    log("")
    log(text)
    log(f"wrote {results / INFERENCE_INFORMATION} and {results / INFERENCE_INSTRUCTIONS}")
    return info
