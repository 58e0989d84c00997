"""``autossl_predict -i IN -o OUT -d DATASET -c CONFIG [...]``: predict raw images with a trained
model (nnU-Net v2's ``nnUNetv2_predict``). The model folder is
``$autossl_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>/``, the trainer named as
``autossl_train`` names it (``--ssl``, ``--network``) unless ``-tr`` gives it; ``-m`` names a model
folder directly."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autossl_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True,
                   help="input folder: CASE_XXXX<file_ending> images (one file per channel; an RGB PNG holds three)")
    p.add_argument("-o", required=True, help="output folder (created)")
    p.add_argument("-d", default=None, help="dataset ID or DatasetXXX_Name")
    p.add_argument("-c", default=None, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-p", default="autosslPlans", help="plans identifier (default autosslPlans)")
    p.add_argument("--ssl", default="none", help="semi-supervised method the model was trained with (default none)")
    p.add_argument("--network", choices=("cnn", "transformer"), default="cnn",
                   help="main architecture the model was trained with (default cnn)")
    p.add_argument("-tr", default=None, help="trainer name (overrides --ssl/--network), e.g. autosslTrainer_ucmt")
    p.add_argument("-m", default=None, help="model folder (instead of -d/-c/-p/-tr)")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds to ensemble, their logits averaged as nnU-Net does (default: every numbered "
                        "fold_X of the model folder that has the checkpoint; fold_all when there is none)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("--members", nargs="+", default=None,
                   help="networks of the checkpoint that predict, softmax averaged (default: the method's "
                        "choice); e.g. 'cnn transformer' for cross teaching, 'student1 student2' for UCMT")
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write <case>.npz (probabilities) + <case>.pkl, needed by autossl_ensemble")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("-device", default="cpu" if not _cuda() else "cuda", choices=("cpu", "cuda", "mps"),
                   help="device (default cuda when available, else cpu)")
    p.add_argument("--fp32", action="store_true",
                   help="no autocast: by default CUDA runs float16 and CPUs with native bf16 (AMX, AVX512-BF16) "
                        "run bfloat16, like nnU-Net's mixed precision on the GPU")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose output already exists")
    p.add_argument("--postprocess", action="store_true",
                   help="apply the model folder's postprocessing.json (autossl_determine_postprocessing)")
    p.add_argument("-npp", type=int, default=int(os.environ.get("autossl_npp", 2)),
                   help="background threads preprocessing the next cases (default 2)")
    p.add_argument("-nps", type=int, default=int(os.environ.get("autossl_nps", 2)),
                   help="background threads exporting finished cases (default 2)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--disable_progress_bar", action="store_true")
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def model_folder_from_args(args) -> Path:
    if args.m:
        return Path(args.m)
    if args.d is None or args.c is None:
        raise ValueError("give -d DATASET and -c CONFIGURATION (or -m MODEL_FOLDER)")
    from autossl import paths
    from autossl.training.naming import trainer_name
    from autossl.utilities.dataset_name import find_dataset_name

    trainer = args.tr or trainer_name(args.ssl, args.network)
    return paths.results_dir() / find_dataset_name(args.d) / f"{trainer}__{args.p}__{args.c}"


def _default_folds(model_folder: Path, checkpoint_name: str) -> list[int | str] | None:
    """nnU-Net's default: every numbered fold with the checkpoint; fold_all when there is none;
    None when neither exists (the predictor then says what is missing)."""
    from autossl.inference.predictor import Predictor

    folds = Predictor.auto_detect_available_folds(model_folder, checkpoint_name)
    if folds:
        return folds
    if (model_folder / "fold_all" / checkpoint_name).is_file():
        return ["all"]
    return None


def _train_hint(args) -> str:
    ssl = f" --ssl {args.ssl}" if args.ssl not in ("none", "") else ""
    net = " --network transformer" if args.network == "transformer" else ""
    return f"autossl_train {args.d} {args.c} -p {args.p}{ssl}{net} (every fold; or give one FOLD)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from autossl.inference.predictor import PredictionError, Predictor

    try:
        folder = model_folder_from_args(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"autossl_predict: error: {e}", file=sys.stderr)
        return 2
    if not folder.is_dir():
        print(f"autossl_predict: error: model folder {folder} does not exist. Train it first: {_train_hint(args)}"
              if not args.m else f"autossl_predict: error: model folder {folder} does not exist", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("autossl_predict: error: -device cuda but no CUDA device is available; use -device cpu", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    elif args.device == "cuda":
        torch.set_num_threads(1)
    try:
        folds = [f if f == "all" else int(f) for f in args.f] if args.f else _default_folds(folder, args.chk)
    except ValueError:
        print(f"autossl_predict: error: -f takes fold numbers or 'all', got {args.f}", file=sys.stderr)
        return 2
    if folds:
        print(f"{folder.name}: predicting with fold(s) {' '.join(str(f) for f in folds)} ({args.chk})"
              + ("" if args.f else ", every fold found"))
    predictor = Predictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                          device=torch.device(args.device), verbose=args.verbose,
                          allow_tqdm=not args.disable_progress_bar, use_amp=False if args.fp32 else None)
    try:
        predictor.initialize_from_trained_model_folder(folder, folds, args.chk, members=args.members)
        written = predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                               overwrite=not args.continue_prediction,
                                               num_processes_preprocessing=args.npp,
                                               num_processes_segmentation_export=args.nps)
    except PredictionError as e:
        msg = str(e)
        if "not found" in msg and "checkpoint" in msg and args.m is None:
            msg += f". Train command: {_train_hint(args)}"
        print(f"autossl_predict: error: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} segmentation(s) to {args.o}")
    if args.postprocess:
        from autossl.postprocessing.remove_connected_components import (POSTPROCESSING_JSON,
                                                                        apply_postprocessing_to_folder)

        pp = folder / POSTPROCESSING_JSON
        if not pp.is_file():
            print(f"--postprocess: {pp} does not exist (run autossl_determine_postprocessing); "
                  f"the predictions are left as they are", file=sys.stderr)
        else:
            apply_postprocessing_to_folder(args.o, args.o, pp, predictor.dataset_json,
                                           predictor.plans_manager.plans, max(1, args.nps),
                                           allow_tqdm=not args.disable_progress_bar)
            print(f"applied {pp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
