"""The end-of-training validation: the held-out fold predicted with the real predictor.

The fold's validation cases are predicted from their preprocessed arrays with
``autossl.inference.Predictor`` (sliding window, Gaussian weighting, mirroring, the method's
inference networks averaged), exported to the raw geometry into ``fold_X/validation/`` (+ ``.npz``
probabilities with ``--npz``) and evaluated against ``gt_segmentations/`` of the preprocessed
dataset into ``validation/summary.json``. Under DDP each rank predicts a share; rank 0 evaluates.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from autossl.training import ddp

if TYPE_CHECKING:  # pragma: no cover
    from autossl.training.trainer import Trainer


def make_predictor(trainer: "Trainer", allow_tqdm: bool = False):
    """A Predictor around the trainer's live inference networks."""
    from autossl.inference.predictor import Predictor

    names = trainer.method.inference_networks()
    arch = {s.name: s.arch for s in trainer.specs}
    predictor = Predictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=trainer.device,
                          verbose=False, allow_tqdm=allow_tqdm)
    predictor.manual_initialization(None, [{"name": n, "arch": arch[n]} for n in names], trainer.plans,
                                    trainer.configuration, trainer.dataset_json, trainer.geometry.mirror_axes,
                                    networks={n: trainer.networks[n] for n in names},
                                    trainer_name=trainer.trainer_name)
    return predictor


def run_final_validation(trainer: "Trainer") -> dict | None:
    from autossl.evaluation.evaluate import compute_metrics_on_folder_simple

    if not trainer.val_keys:
        trainer.logger.print("final validation: this fold has no validation cases")
        return None
    gt = trainer.preprocessed_base / "gt_segmentations"
    if not gt.is_dir():
        raise FileNotFoundError(f"{gt} is missing: the final validation compares with the preprocessing's copy of "
                                f"the labels; rerun autossl_plan_and_preprocess -d {trainer.dataset_name}")
    out = trainer.output_folder / "validation"
    out.mkdir(parents=True, exist_ok=True)
    mine = trainer.val_keys[trainer.dist.rank::trainer.dist.world_size]
    trainer.logger.print(f"final validation: predicting {len(trainer.val_keys)} case(s) into {out}")
    n_proc = max(1, min(4, trainer.num_workers, len(mine)))
    if mine:
        predictor = make_predictor(trainer, allow_tqdm=trainer.dist.is_main and trainer.verbose)
        predictor.predict_preprocessed_cases(trainer.data_folder, mine, output_folder=out,
                                             save_probabilities=trainer.npz,
                                             num_processes_segmentation_export=n_proc)
    ddp.barrier()
    summary = None
    if trainer.dist.is_main:
        summary = compute_metrics_on_folder_simple(gt, out, trainer.dataset_json, trainer.plans,
                                                   out / "summary.json", num_processes=n_proc, chill=True,
                                                   allow_tqdm=False)
        fg = summary.get("foreground_mean", {}).get("Dice")
        trainer.logger.print(f"final validation: mean foreground Dice {fg:.4f}" if fg is not None
                             else "final validation: done")
    ddp.barrier()
    return summary
