"""``autossl_plan_and_preprocess`` and its three steps as separate commands (like nnU-Net v2):
``autossl_extract_fingerprint``, ``autossl_plan_experiment``, ``autossl_preprocess``.

Errors (dataset not found, integrity problems, environment variables unset, a broken case) print
one clear message and exit with status 1; set AUTOSSL_TRACEBACK=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from typing import Sequence

DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
DEFAULT_PLANNER = "default"
DEFAULT_PLANS = "autosslPlans"


class CLIError(Exception):
    """A problem to report in one message, exit status 1."""


def _default_np() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------
def _dataset_name(dataset: str | int) -> str:
    """The dataset folder name; raw and preprocessed folders must be configured."""
    from autossl import paths
    from autossl.utilities.dataset_name import find_dataset_name

    paths.raw_dir(), paths.preprocessed_dir()  # a clear error naming the variable when unset
    try:
        return find_dataset_name(dataset)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from None


def verify(dataset: str | int, num_processes: int, allow_geometry_mismatch: bool = False) -> None:
    """Check the raw dataset; print warnings; raise CLIError listing every problem.
    ``allow_geometry_mismatch``: image/label origin or direction differences are warnings."""
    from autossl import paths
    from autossl.raw.integrity import integrity_report

    name = _dataset_name(dataset)
    folder = paths.raw_dir() / name
    print(f"Verifying the integrity of {folder}")
    report = integrity_report(folder, num_processes, allow_geometry_mismatch=allow_geometry_mismatch)
    for w in report.warnings:
        print(f"warning: {w}")
    if report.errors:
        lines = "\n".join(f"  {e}" for e in report.errors)
        raise CLIError(f"{name}: the dataset has {len(report.errors)} problem(s):\n{lines}")
    print(f"{name}: dataset integrity OK ({len(report.warnings)} warning(s))")


def extract_fingerprint(dataset: str | int, num_processes: int, verify_integrity: bool = False,
                        clean: bool = False, allow_geometry_mismatch: bool = False) -> None:
    from autossl.fingerprint.extractor import extract_fingerprint as _extract

    name = _dataset_name(dataset)
    if verify_integrity:
        verify(name, num_processes, allow_geometry_mismatch)
    print(f"Fingerprint extraction: {name}")
    _extract(name, num_processes=num_processes, overwrite=clean)


def _call_with_supported(fn, *args, **kwargs):
    """Call ``fn`` with the keyword arguments it accepts (planners differ in their options)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params and v is not None})


def plan_experiment(dataset: str | int, planner: str = DEFAULT_PLANNER, gpu_memory_target: float | None = None,
                    overwrite_plans_name: str | None = None) -> str:
    """Plan; returns the plans identifier that was written."""
    from autossl.planning import get_planner

    name = _dataset_name(dataset)
    try:
        planner_cls = get_planner(planner)
    except (KeyError, ValueError) as e:
        raise CLIError(f"-pl {planner}: {e.args[0] if e.args else e}") from None
    print(f"Experiment planning: {name} ({getattr(planner_cls, '__name__', planner)})")
    p = _call_with_supported(planner_cls, name, gpu_memory_target_in_gb=gpu_memory_target,
                             plans_name=overwrite_plans_name)
    plans = p.plan_experiment()
    ident = None
    if isinstance(plans, dict):
        ident = plans.get("plans_name")
    ident = ident or getattr(p, "plans_identifier", None) or overwrite_plans_name or DEFAULT_PLANS
    return ident


def preprocess(dataset: str | int, plans_identifier: str = DEFAULT_PLANS,
               configurations: Sequence[str] | None = None, num_processes: Sequence[int] | int | None = None,
               overwrite: bool = False, verbose: bool = False) -> None:
    """Preprocess the configurations that exist in the plans (all requested ones in one pass)."""
    from autossl import paths
    from autossl.preprocessing.preprocessor import run_configurations
    from autossl.utilities.file_io import load_json

    name = _dataset_name(dataset)
    plans_file = paths.preprocessed_dir() / name / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise CLIError(f"{plans_file}: plans not found; run autossl_plan_experiment -d {dataset} first")
    available = list(load_json(plans_file).get("configurations", {}))
    explicit = configurations is not None
    wanted = list(configurations) if explicit else list(DEFAULT_CONFIGURATIONS)
    todo = [c for c in wanted if c in available]
    for c in wanted:
        if c not in available and explicit:
            print(f"INFO: configuration {c} is not in {plans_file.name} (available: {available}); skipping it")
    if not todo:
        raise CLIError(f"{plans_file}: none of the configurations {wanted} is planned (available: {available})")
    if num_processes is None:
        n = _default_np()
    elif isinstance(num_processes, int):
        n = num_processes
    else:
        nps = list(num_processes)
        if len(nps) not in (1, len(wanted)):
            raise CLIError(f"-np: give one number or one per configuration ({len(wanted)}), got {nps}")
        # all configurations run in one pass: the smallest number bounds memory like nnU-Net's per-step value
        n = min(nps) if len(nps) == 1 else min(v for c, v in zip(wanted, nps) if c in todo)
    print(f"Preprocessing {name}: {', '.join(todo)} with {n} process(es)")
    run_configurations(name, todo, plans_identifier, n, overwrite=overwrite, verbose=verbose)


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------
def _add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", nargs="+", required=True, metavar="ID",
                   help="dataset ID(s) or DatasetXXX_Name, e.g. -d 4")


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="check the raw dataset first; list every problem and stop if there is one")
    p.add_argument("--allow_geometry_mismatch", action="store_true",
                   help="with --verify_dataset_integrity: report a label whose origin or direction differs from "
                        "its image's as a warning instead of an error (only if you know that their voxel arrays "
                        "correspond; otherwise the label lies mirrored or shifted against the image)")


def _add_fingerprint(p: argparse.ArgumentParser) -> None:
    p.add_argument("-npfp", type=int, default=None, metavar="N",
                   help=f"processes for fingerprint extraction (default: -np, else {_default_np()})")
    _add_verify(p)
    p.add_argument("--clean", action="store_true", help="extract the fingerprint again even if it exists")


def _add_planning(p: argparse.ArgumentParser) -> None:
    p.add_argument("-pl", default=DEFAULT_PLANNER, metavar="PLANNER",
                   help=f"experiment planner (default: {DEFAULT_PLANNER}; 'cpu' for the CPU preset; "
                        "nnUNetPlannerResEncM / nnUNetPlannerResEncL for nnU-Net's residual-encoder presets)")
    p.add_argument("-gpu_memory_target", type=float, default=None, metavar="GB",
                   help="GPU memory the planned network may use, in GB (planner default when omitted)")
    p.add_argument("-overwrite_plans_name", default=None, metavar="NAME",
                   help="write the plans under this name instead of the planner's default")


def _add_preprocessing(p: argparse.ArgumentParser, with_plans_name: bool) -> None:
    if with_plans_name:
        p.add_argument("-plans_name", default=DEFAULT_PLANS, help=f"plans identifier (default: {DEFAULT_PLANS})")
    p.add_argument("-c", nargs="+", default=None, metavar="CONFIG",
                   help="configurations to preprocess (default: 2d 3d_fullres and 3d_lowres, those in the plans)")
    p.add_argument("-np", nargs="+", type=int, default=None, metavar="N",
                   help=f"processes for preprocessing: one number, or one per configuration "
                        f"(default: {_default_np()})")
    p.add_argument("--overwrite", action="store_true",
                   help="preprocess every case again (default: finished cases are kept)")
    p.add_argument("--verbose", action="store_true", help="print per-case details instead of a progress bar")


def _run(prog: str, fn, argv) -> None:
    """Run ``fn``; expected errors become one message and exit status 1."""
    from autossl.imageio.base import ImageReadError
    from autossl.paths import PathNotConfiguredError
    from autossl.preprocessing.preprocessor import PreprocessingError
    from autossl.raw.dataset import DatasetError

    expected = (CLIError, PathNotConfiguredError, DatasetError, PreprocessingError, ImageReadError,
                FileNotFoundError, ValueError, KeyError, RuntimeError)
    try:
        fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except expected as e:
        if os.environ.get("AUTOSSL_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(1)


def _np_first(a) -> int:
    return a.np[0] if a.np else _default_np()


def main(argv: list[str] | None = None) -> None:
    """``autossl_plan_and_preprocess``: fingerprint, plan and preprocess in one go."""
    p = argparse.ArgumentParser(prog="autossl_plan_and_preprocess",
                                description="Extract the dataset fingerprint, plan the experiment and preprocess "
                                            "labelled (imagesTr) and unlabelled (imagesTrUnlabeled) cases.")
    _add_dataset(p)
    _add_fingerprint(p)
    _add_planning(p)
    _add_preprocessing(p, with_plans_name=False)
    p.add_argument("--no_pp", action="store_true", help="only fingerprint and plan; do not preprocess")
    a = p.parse_args(argv)

    def go():
        for d in a.d:
            t0 = time.time()
            extract_fingerprint(d, a.npfp or _np_first(a), a.verify_dataset_integrity, a.clean,
                                a.allow_geometry_mismatch)
            ident = plan_experiment(d, a.pl, a.gpu_memory_target, a.overwrite_plans_name)
            if not a.no_pp:
                preprocess(d, ident, a.c, a.np, a.overwrite, a.verbose)
            print(f"{_dataset_name(d)}: done in {time.time() - t0:.1f} s")

    _run(p.prog, go, argv)


def extract_fingerprint_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="autossl_extract_fingerprint",
                                description="Extract the dataset fingerprint (spacings, shapes, intensities).")
    _add_dataset(p)
    p.add_argument("-np", type=int, default=None, metavar="N", help=f"processes (default: {_default_np()})")
    _add_verify(p)
    p.add_argument("--clean", action="store_true", help="extract the fingerprint again even if it exists")
    a = p.parse_args(argv)
    _run(p.prog, lambda: [extract_fingerprint(d, a.np or _default_np(), a.verify_dataset_integrity, a.clean,
                                              a.allow_geometry_mismatch) for d in a.d], argv)


def plan_experiment_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="autossl_plan_experiment",
                                description="Plan the experiment from an extracted fingerprint.")
    _add_dataset(p)
    _add_planning(p)
    a = p.parse_args(argv)
    _run(p.prog, lambda: [plan_experiment(d, a.pl, a.gpu_memory_target, a.overwrite_plans_name) for d in a.d], argv)


def preprocess_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="autossl_preprocess",
                                description="Preprocess labelled and unlabelled cases with existing plans.")
    _add_dataset(p)
    _add_preprocessing(p, with_plans_name=True)
    a = p.parse_args(argv)
    _run(p.prog, lambda: [preprocess(d, a.plans_name, a.c, a.np, a.overwrite, a.verbose) for d in a.d], argv)


if __name__ == "__main__":
    main()
