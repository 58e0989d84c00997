"""The end-of-training validation: the held-out fold predicted with the real predictor.

The fold's validation cases are predicted from their preprocessed arrays with
``autossl.inference.Predictor`` (sliding window, Gaussian weighting, mirroring, the method's
inference networks averaged), exported to the raw geometry into ``fold_X/validation/`` (+ ``.npz``
probabilities with ``--npz``) and evaluated against ``gt_segmentations/`` of the preprocessed
dataset into ``validation/summary.json``. Under DDP each rank predicts a share; rank 0 evaluates.
"""
from __future__ import annotations

from autossl.evaluation.evaluate import compute_metrics_on_folder_simple
from autossl.training import ddp


def run_final_validation(trainer) -> dict | None:
    """``trainer``: the ``Trainer`` of the fold (passed in, never imported: the trainer imports this
    module); read are its validation keys, folders, plans, DDP rank and ``make_predictor``."""
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
        predictor = trainer.make_predictor(allow_tqdm=trainer.dist.is_main and trainer.verbose)
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
