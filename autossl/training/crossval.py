"""``autossl_train DATASET CONFIG --ssl METHOD`` without a fold: the whole cross-validation.

Every fold of the split (``splits_final.json``: nnU-Net's five folds, or as many as the labelled
cases allow when there are fewer than five) is trained in turn with the same options, each with
every unlabelled case. A fold whose ``checkpoint_final.pth`` and ``validation/summary.json`` exist
is finished and skipped (its validation is rerun when ``--npz`` asks for probabilities it lacks,
or when only the validation is missing); an interrupted fold starts again, or resumes from its
``checkpoint_latest.pth`` with ``--c``. A ``--budget`` is the whole command's: each fold still to
train gets an equal share of the time left when it starts. At the end the folds' validation
predictions are evaluated together into ``crossval_results_folds_<folds>/summary.json``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autossl import paths
from autossl.components.budget import parse_budget
from autossl.components.dataloading.splits import SPLITS_FILE, load_or_create_splits
from autossl.components.errors import TrainingError
from autossl.components.resolve import resolve_configuration
from autossl.preprocessing import storage
from autossl.training.naming import trainer_name
from autossl.utilities.dataset_name import find_dataset_name
from autossl.utilities.file_io import load_json

NNUNET_FOLDS = 5


@dataclass
class CrossvalPlan:
    dataset_name: str
    folds: list[int]
    num_labeled: int
    splits_file: Path
    file_ending: str
    note: str | None = None  # why there are not five folds


@dataclass
class FoldOutcome:
    fold: int
    action: str  # "trained", "resumed", "validated", "skipped"
    dice: float | None = None
    seconds: float = 0.0


@dataclass
class CrossvalResult:
    model_folder: Path
    folds: list[FoldOutcome] = field(default_factory=list)
    crossval_folder: Path | None = None
    crossval_dice: float | None = None


def plan_crossval(dataset: str | int, configuration: str, plans: str) -> CrossvalPlan:
    """The folds to train for ``dataset``/``configuration`` (creating ``splits_final.json`` as a
    fold's training would)."""
    try:
        name = find_dataset_name(dataset)
    except FileNotFoundError as e:
        raise TrainingError(f"{e}; convert the dataset to the raw format and run "
                            f"autossl_plan_and_preprocess -d {dataset}") from None
    base = paths.preprocessed_dir() / name
    plans_file = base / f"{plans}.json"
    if not plans_file.is_file():
        raise TrainingError(f"{plans_file} does not exist: the dataset is not planned/preprocessed with plans "
                            f"{plans!r}; run autossl_plan_and_preprocess -d {dataset} -c {configuration}")
    cfg = resolve_configuration(load_json(plans_file), configuration)
    data_folder = base / cfg.get("data_identifier", f"{plans}_{configuration}")
    cases = storage.list_cases(data_folder)
    if not cases:
        raise TrainingError(f"{data_folder} holds no preprocessed cases; run autossl_plan_and_preprocess "
                            f"-d {dataset} -c {configuration}")
    splits_file = base / SPLITS_FILE
    splits = load_or_create_splits(base, cases)
    if not splits:
        raise TrainingError(f"{splits_file} holds no fold")
    note = None
    if len(splits) != NNUNET_FOLDS:
        if len(cases) < NNUNET_FOLDS and len(splits) == len(cases):
            note = (f"only {len(cases)} labelled cases: {len(splits)}-fold cross-validation instead of nnU-Net's "
                    f"{NNUNET_FOLDS} folds (one validation case per fold)")
        else:
            note = f"{splits_file} defines {len(splits)} folds: training all {len(splits)}"
    dj_file = base / "dataset.json"
    if not dj_file.is_file():
        raise TrainingError(f"{dj_file} is missing; rerun autossl_plan_and_preprocess -d {dataset}")
    file_ending = load_json(dj_file).get("file_ending")
    if not file_ending:
        raise TrainingError(f"{dj_file} has no file_ending")
    return CrossvalPlan(name, list(range(len(splits))), len(cases), splits_file, file_ending, note)


def fold_state(fold_folder: Path, npz: bool, file_ending: str) -> str:
    """"finished", "needs_validation" (trained; the validation, or its --npz probabilities, is
    missing), "interrupted" (checkpoint_latest only) or "new"."""
    final = fold_folder / "checkpoint_final.pth"
    if final.is_file():
        val = fold_folder / "validation"
        if not (val / "summary.json").is_file():
            return "needs_validation"
        if npz:
            cases = [p.name[:-len(file_ending)] for p in val.glob(f"*{file_ending}") if not p.name.startswith(".")]
            if not cases or any(not (val / f"{c}.npz").is_file() for c in cases):
                return "needs_validation"
        return "finished"
    if (fold_folder / "checkpoint_latest.pth").is_file():
        return "interrupted"
    return "new"


def _fold_dice(fold_folder: Path) -> float | None:
    s = fold_folder / "validation" / "summary.json"
    if not s.is_file():
        return None
    try:
        v = load_json(s).get("foreground_mean", {}).get("Dice")
    except ValueError:
        return None
    return None if v is None else float(v)


def train_all_folds(dataset: str | int, configuration: str, *, plans: str, continue_training: bool = False,
                    budget: str | float | None = None, npz: bool = False, trainer_kwargs: dict[str, Any] | None = None,
                    log: Callable[[str], None] = print, num_processes: int = 1) -> CrossvalResult:
    """Train every fold (see the module docstring); returns what happened to each fold and the
    cross-validation Dice. ``trainer_kwargs`` go to every fold's ``Trainer`` (not ``budget``/``npz``)."""
    from autossl.evaluation.crossval import accumulate_crossval_results
    from autossl.training.trainer import Trainer

    kw = dict(trainer_kwargs or {})
    budget_s = parse_budget(budget) if budget not in (None, "", 0) else None
    plan = plan_crossval(dataset, configuration, plans)
    model_folder = paths.results_dir() / plan.dataset_name / \
        f"{trainer_name(kw.get('ssl', 'none'), kw.get('network', 'cnn'))}__{plans}__{configuration}"
    log(f"cross-validation: {len(plan.folds)} folds of {plan.splits_file} ({plan.num_labeled} labelled cases) "
        f"into {model_folder}")
    if plan.note:
        log(f"cross-validation: {plan.note}")
    states = {f: fold_state(model_folder / f"fold_{f}", npz, plan.file_ending) for f in plan.folds}
    to_train = [f for f in plan.folds if states[f] in ("new", "interrupted")]
    result = CrossvalResult(model_folder)
    t0 = time.time()
    is_main = int(os.environ.get("RANK", "0")) == 0
    for i, fold in enumerate(plan.folds):
        folder = model_folder / f"fold_{fold}"
        state = states[fold]
        header = f"fold {fold} ({i + 1}/{len(plan.folds)})"
        t_fold = time.time()
        if state == "finished":
            log(f"{header}: finished ({folder / 'checkpoint_final.pth'} exists), skipping")
            result.folds.append(FoldOutcome(fold, "skipped", _fold_dice(folder)))
            continue
        fold_budget = None
        if state == "needs_validation":
            log(f"{header}: trained; running its final validation" + (" with --npz" if npz else ""))
            trainer = Trainer(dataset, configuration, fold, plans=plans, npz=npz, **kw)
            trainer.run(validation_only=True)
            action = "validated"
        else:
            if budget_s is not None:
                left = budget_s - (time.time() - t0)
                remaining = len(to_train) - to_train.index(fold)
                fold_budget = max(1.0, left / remaining)
                log(f"{header}: budget {fold_budget:.0f} s ({max(0.0, left):.0f} s left for {remaining} fold(s))")
            if state == "interrupted" and continue_training:
                log(f"{header}: resuming from {folder / 'checkpoint_latest.pth'}")
                action = "resumed"
            elif state == "interrupted":
                log(f"{header}: {folder / 'checkpoint_latest.pth'} is from an interrupted run; starting the fold "
                    f"again (--c resumes it instead)")
                action = "trained"
            else:
                log(f"{header}: training")
                action = "trained"
            trainer = Trainer(dataset, configuration, fold, plans=plans, npz=npz, budget=fold_budget, **kw)
            trainer.run(continue_training=continue_training)
        del trainer
        result.folds.append(FoldOutcome(fold, action, _fold_dice(folder), time.time() - t_fold))
    if is_main:
        gt = paths.preprocessed_dir() / plan.dataset_name / "gt_segmentations"
        out, summary = accumulate_crossval_results(model_folder, plan.folds, gt, num_processes=num_processes)
        result.crossval_folder = out
        result.crossval_dice = summary.get("foreground_mean", {}).get("Dice")
        log(format_result(result))
    return result


def format_result(result: CrossvalResult) -> str:
    def fmt(v):
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    lines = [f"cross-validation of {result.model_folder.name}:",
             "  fold  action     foreground Dice"]
    for f in result.folds:
        lines.append(f"  {f.fold:>4}  {f.action:<9}  {fmt(f.dice)}")
    if result.crossval_folder is not None:
        lines.append(f"  all folds together: {fmt(result.crossval_dice)} "
                     f"({result.crossval_folder / 'summary.json'})")
    return "\n".join(lines)
