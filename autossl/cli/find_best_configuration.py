"""``autossl_find_best_configuration DATASET [-c 2d 3d_fullres ...] [--ssl none ucmt ...]``:
score every trained (configuration, method) and every ensemble of two on the cross-validation,
pick the best by foreground-mean Dice, determine its postprocessing and write
``inference_instructions.txt`` / ``inference_information.json`` into
``$autossl_results/DatasetXXX_Name/`` (nnU-Net v2's ``nnUNetv2_find_best_configuration``).

Every fold of each model must be trained (``autossl_train DATASET CONFIG --ssl METHOD --npz``
trains them all); ensembles need the folds' validation probabilities (``--npz``)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from autossl.model_selection.find_best import DEFAULT_CONFIGURATIONS

    p = argparse.ArgumentParser(prog="autossl_find_best_configuration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="dataset ID or DatasetXXX_Name")
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIG",
                   help=f"configurations (default: {' '.join(DEFAULT_CONFIGURATIONS)}, those trained)")
    p.add_argument("--ssl", nargs="+", default=None, metavar="METHOD",
                   help="semi-supervised methods, e.g. none ucmt (default: every method with a trained model; "
                        "with -c and --ssl both given, a combination that is not trained is named)")
    p.add_argument("-p", nargs="+", default=["autosslPlans"], metavar="PLANS",
                   help="plans identifiers (default autosslPlans)")
    p.add_argument("--network", nargs="+", default=["cnn"], choices=("cnn", "transformer"),
                   help="main architectures (default cnn)")
    p.add_argument("-f", nargs="+", type=int, default=None, metavar="FOLD",
                   help="folds (default: every fold of splits_final.json)")
    p.add_argument("--disable_ensembling", action="store_true", help="score single models only")
    p.add_argument("--strict", action="store_true",
                   help="a requested model that is not fully trained is an error (default: it is left out)")
    p.add_argument("-np", type=int, default=2, help="processes for evaluation and ensembling (default 2)")
    p.add_argument("-i", default="INPUT_FOLDER",
                   help="input folder to write into the inference commands (default: the placeholder INPUT_FOLDER)")
    p.add_argument("-o", default="OUTPUT_FOLDER",
                   help="output folder to write into the inference commands (default: the placeholder "
                        "OUTPUT_FOLDER; ensemble members and postprocessing go to OUTPUT_FOLDER_MODEL_<n> and "
                        "OUTPUT_FOLDER_PP, or <o>_model_<n> and <o>_pp)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from autossl.ensembling.ensemble import EnsembleError
    from autossl.model_selection.find_best import ModelSelectionError, find_best_configuration
    from autossl.paths import PathNotConfiguredError

    if args.ssl is not None:
        from autossl.ssl.registry import available_methods

        unknown = [m for m in args.ssl if m not in available_methods()]
        if unknown:
            print(f"autossl_find_best_configuration: unknown --ssl method(s) {unknown}; available: "
                  f"{', '.join(available_methods())}", file=sys.stderr)
            return 2
    if args.np < 1:
        print("autossl_find_best_configuration: -np must be >= 1", file=sys.stderr)
        return 2
    try:
        find_best_configuration(args.dataset, args.c, args.ssl, args.p, args.network, args.f,
                                allow_ensembling=not args.disable_ensembling, num_processes=args.np,
                                strict=args.strict, input_folder=args.i, output_folder=args.o)
    except (ModelSelectionError, EnsembleError, PathNotConfiguredError, FileNotFoundError, ValueError,
            RuntimeError) as e:
        print(f"autossl_find_best_configuration: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
