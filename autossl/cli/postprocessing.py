"""``autossl_determine_postprocessing`` and ``autossl_apply_postprocessing``.

Determine, from a model's cross-validation predictions (every ``fold_X/validation/``, gathered
into ``crossval_results_folds_...``) against ``gt_segmentations``; the result
``postprocessing.json`` lands in the model folder, where ``autossl_predict --postprocess`` finds it:

    autossl_determine_postprocessing -d 4 -c 3d_fullres [--ssl ucmt] [-f 0 1 2 3 4]

or from any prediction folder against any reference folder:

    autossl_determine_postprocessing -i PRED -ref REF -djfile dataset.json [-o OUT_DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autossl.evaluation.crossval import gather_crossval_predictions  # noqa: F401  (also used from here)
from autossl.utilities.file_io import load_json


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", default=None, help="dataset ID or DatasetXXX_Name (model-folder mode)")
    p.add_argument("-c", default=None, help="configuration (model-folder mode)")
    p.add_argument("-p", default="autosslPlans", help="plans identifier (default autosslPlans)")
    p.add_argument("--ssl", default="none", help="SSL method of the model (default none)")
    p.add_argument("--network", choices=("cnn", "transformer"), default="cnn")
    p.add_argument("-tr", default=None, help="trainer name (overrides --ssl/--network)")
    p.add_argument("-m", default=None, help="model folder (instead of -d/-c/-p/-tr)")
    p.add_argument("-f", nargs="+", default=None, help="folds (default: every fold_X with validation/)")


def determine_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="autossl_determine_postprocessing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("-i", default=None, help="prediction folder (folder mode)")
    p.add_argument("-ref", default=None, help="reference folder (folder mode)")
    p.add_argument("-djfile", default=None, help="dataset.json (folder mode; default: the prediction folder's)")
    p.add_argument("-pfile", default=None, help="plans.json (folder mode; default: the prediction folder's)")
    p.add_argument("-o", default=None, help="where postprocessing.json goes (folder mode; default: -i)")
    p.add_argument("-np", type=int, default=2, help="workers (default 2)")
    p.add_argument("--keep_postprocessed", action="store_true", help="keep the postprocessed predictions")
    args = p.parse_args(argv)
    from autossl.postprocessing.remove_connected_components import determine_postprocessing

    try:
        if args.i is not None:
            if args.ref is None:
                raise ValueError("folder mode needs -ref REFERENCE_FOLDER")
            pred = Path(args.i)
            dj = args.djfile or pred / "dataset.json"
            pl = args.pfile or (pred / "plans.json" if (pred / "plans.json").is_file() else None)
            if not Path(dj).is_file():
                raise FileNotFoundError(f"{dj} does not exist; pass -djfile")
            result = determine_postprocessing(pred, args.ref, dj, pl, args.o, args.np, args.keep_postprocessed)
            where = Path(args.o or pred)
        else:
            from autossl import paths
            from autossl.cli.predict import model_folder_from_args

            model_folder = model_folder_from_args(args)
            if not (model_folder / "dataset.json").is_file():
                raise FileNotFoundError(f"{model_folder / 'dataset.json'} does not exist; train the model first")
            dj = load_json(model_folder / "dataset.json")
            folds = [f if f == "all" else int(f) for f in args.f] if args.f else None
            pred = gather_crossval_predictions(model_folder, folds, dj["file_ending"])
            ref = paths.preprocessed_dir() / model_folder.parent.name / "gt_segmentations"
            if not ref.is_dir():
                raise FileNotFoundError(f"{ref} does not exist; run autossl_plan_and_preprocess first")
            pl = model_folder / "plans.json" if (model_folder / "plans.json").is_file() else None
            result = determine_postprocessing(pred, ref, dj, pl, model_folder, args.np, args.keep_postprocessed)
            where = model_folder
    except (ValueError, FileNotFoundError) as e:
        print(f"autossl_determine_postprocessing: error: {e}", file=sys.stderr)
        return 1
    steps = result["postprocessing_kwargs"]
    print(f"foreground Dice {result['dice_before']:.4f} -> {result['dice_after']:.4f}; "
          f"{len(steps)} step(s) kept: {[s['labels_or_regions'] for s in steps]}; wrote {where / 'postprocessing.json'}")
    return 0


def apply_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="autossl_apply_postprocessing",
                                description="Apply postprocessing.json (or .pkl) to a folder of predictions.")
    p.add_argument("-i", required=True, help="input folder (predictions with dataset.json)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-pp_file", required=True, help="postprocessing.json or postprocessing.pkl")
    p.add_argument("-djfile", default=None, help="dataset.json (default: the input folder's)")
    p.add_argument("-pfile", default=None, help="plans.json (default: the input folder's)")
    p.add_argument("-np", type=int, default=2, help="workers (default 2)")
    args = p.parse_args(argv)
    from autossl.postprocessing.remove_connected_components import apply_postprocessing_to_folder

    try:
        dj = load_json(args.djfile) if args.djfile else None
        pl = load_json(args.pfile) if args.pfile else None
        written = apply_postprocessing_to_folder(args.i, args.o, args.pp_file, dj, pl, args.np)
    except (ValueError, FileNotFoundError) as e:
        print(f"autossl_apply_postprocessing: error: {e}", file=sys.stderr)
        return 1
    print(f"postprocessed {len(written)} file(s) into {args.o}")
    return 0


if __name__ == "__main__":
    sys.exit(determine_main())
