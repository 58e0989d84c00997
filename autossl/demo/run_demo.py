"""``autossl_demo``: the whole pipeline on a small synthetic 3D dataset with few labels.

Generates a dataset (a few labelled cases, many unlabelled, a labelled test set kept outside the
raw dataset), plans with the CPU preset, preprocesses, trains supervised and one semi-supervised
method with the same number of iterations, predicts the test set with each and evaluates,
printing a table. Every step runs through the console commands, exactly as a user would type
them. The cases vary more than three labelled ones can cover (``kind="varied"`` in
``autossl.utilities.synthetic``: one or two structures anywhere, tilted, faint or strong, beside
unlabelled distractor blobs), which is where unlabelled cases pay.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_ID = 991
DEMO_NAME = "DemoVaried"
DEFAULT_SSL = "cps_cutmix"
DEFAULT_STEPS = 400


def _run(cmd: list[str], env: dict, log: Path, quiet: bool) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, env=env, stdout=f if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    if p.returncode != 0:
        raise SystemExit(f"autossl_demo: step failed with status {p.returncode}: {' '.join(cmd)}"
                         + (f" (output in {log})" if quiet else ""))
    return time.time() - t0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autossl_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("autossl_demo_output"),
                   help="where raw/preprocessed/results/predictions go (default ./autossl_demo_output)")
    p.add_argument("--ssl", default=DEFAULT_SSL, help="semi-supervised method to compare with supervised "
                                                      "(default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training iterations per method (default %(default)s)")
    p.add_argument("--labeled", type=int, default=3)
    p.add_argument("--unlabeled", type=int, default=40)
    p.add_argument("--test", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--verbose", action="store_true", help="show the commands' own output")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from autossl.evaluation.evaluate import compute_metrics_on_folder_simple
    from autossl.utilities.synthetic import make_synthetic_dataset

    work = args.workdir.resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        env[f"autossl_{k}"] = str(work / k)
    env.setdefault("autossl_n_proc_DA", "1")
    log = work / "demo_commands.log"
    quiet = not args.verbose
    t_start = time.time()

    raw = work / "raw" / f"Dataset{DEMO_ID:03d}_{DEMO_NAME}"
    test_labels = work / "test_labels"
    if not raw.exists():
        print(f"Generating a synthetic 3D dataset: {args.labeled} labelled, {args.unlabeled} unlabelled, "
              f"{args.test} test cases -> {raw}", flush=True)
        make_synthetic_dataset(work / "raw", DEMO_ID, DEMO_NAME, n_labeled=args.labeled, n_unlabeled=args.unlabeled,
                               n_test=args.test, shape=(28, 36, 32), spacing=(1.0, 1.0, 1.0), seed=args.seed,
                               test_labels_dir=test_labels, kind="varied")
    ds = str(DEMO_ID)
    if not (work / "preprocessed" / raw.name / "autosslPlansCPU.json").exists():
        _run(["autossl_plan_and_preprocess", "-d", ds, "-c", "3d_fullres", "-pl", "cpu", "-np", "2",
              "--verify_dataset_integrity"], env, log, quiet)
    iters = 25
    epochs = max(1, args.steps // iters)
    rows = []
    for method in ("none", args.ssl):
        t_train = _run(["autossl_train", ds, "3d_fullres", "all", "-p", "autosslPlansCPU", "--ssl", method,
                        "--epochs", str(epochs), "--iterations-per-epoch", str(iters), "--val-iterations", "2",
                        "--seed", str(args.seed), "-device", args.device], env, log, quiet)
        pred = work / "predictions" / method
        t_pred = _run(["autossl_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", ds, "-c", "3d_fullres",
                       "-p", "autosslPlansCPU", "--ssl", method, "-f", "all", "-device", args.device,
                       "--disable_progress_bar"], env, log, quiet)
        summary = compute_metrics_on_folder_simple(test_labels, pred, raw / "dataset.json", num_processes=1,
                                                   allow_tqdm=False)
        m = summary["mean"]
        rows.append((method, 100 * m["1"]["Dice"], 100 * m["2"]["Dice"], 100 * summary["foreground_mean"]["Dice"],
                     summary["foreground_mean"].get("HD95", float("nan")), t_train, t_pred))
    print()
    print(f"Synthetic 3D dataset, {args.labeled} labelled + {args.unlabeled} unlabelled training cases, "
          f"{args.test} test cases, {epochs * iters} steps per method (seed {args.seed})")
    head = f"{'method':<16}{'Dice head':>10}{'Dice tail':>10}{'mean Dice':>10}{'HD95 mm':>9}{'train s':>9}{'pred s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r[0]:<16}{r[1]:>10.1f}{r[2]:>10.1f}{r[3]:>10.1f}{r[4]:>9.2f}{r[5]:>9.0f}{r[6]:>8.0f}")
    print(f"\nTotal {time.time() - t_start:.0f} s. Everything is under {work} "
          f"(results: {work / 'results'}, predictions: {work / 'predictions'}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
