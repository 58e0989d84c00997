"""CUDA paths and GPU step times, end to end through the console commands, on synthetic data.

    python benchmarks/gpu_check.py [--workdir DIR] [--iterations 30] [--only 3d|2d]

Needs a CUDA device. Two parts, each plan -> preprocess -> train -> predict -> evaluate, every step
as a user types it:

1. ``3d``: a synthetic 3D dataset (4 labelled, 24 unlabelled, 6 test cases) planned with the
   default (GPU) planner. Trains supervised, ``cross_teaching`` and ``ucmt`` with float16 autocast
   (the CUDA default), supervised again with ``--compile`` and with ``--fp32``, and predicts the
   test cases on the GPU with each checkpoint. Checks that every run finishes, that the losses are
   finite, and prints mean Dice (a sanity figure after a few dozen steps, not a quality result).
2. ``2d``: a synthetic 2D dataset of 256x256 images planned with the default planner, then a plans
   copy with SSL4MIS's A2D batch (12 labelled + 12 unlabelled; 8 + 8 for cross teaching, as the
   published settings). Trains supervised, ``cross_teaching`` and ``ucmt`` and reports seconds per
   iteration and per optimiser step, and the projected time of the published 30,000 iterations.

Seconds per iteration = the last epoch's ``epoch_time`` in training_log / iterations (the first
epoch, with worker start-up, cuDNN autotuning and compilation, is not counted). Prints one table
and writes ``gpu_check.json`` and ``gpu_check.md`` in the work folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from ssl_quality import run  # noqa: E402  (logs each command, stops with the log's end on failure)


def last_epoch(results: Path) -> dict:
    """Last epoch line of the newest training log under ``results``: epoch_time and train_loss."""
    logs = sorted(results.rglob("training_log*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise SystemExit(f"no training log under {results}")
    lines = [ln for ln in logs[-1].read_text().splitlines() if "epoch_time" in ln]
    last = lines[-1]
    return dict(epoch_time=float(re.search(r"epoch_time ([\d.]+)s", last).group(1)),
                train_loss=float(re.search(r"train_loss (\S+)", last).group(1)), log=str(logs[-1]))


def write_batch_plans(pre: Path, ds: str, batch: int) -> str:
    """Copy of autosslPlans with the 2d batch set to ``batch`` (same preprocessed data)."""
    plans = json.loads((pre / ds / "autosslPlans.json").read_text())
    name = f"autosslPlans_b{batch}"
    plans["plans_name"] = name
    plans["configurations"]["2d"]["batch_size"] = batch
    (pre / ds / f"{name}.json").write_text(json.dumps(plans, indent=2))
    return name


def mean_dice(pred: Path, labels: Path, dataset_json: Path) -> float:
    from autossl.evaluation.evaluate import compute_metrics_on_folder
    from autossl.imageio.registry import reader_writer_class

    dj = json.loads(dataset_json.read_text())
    classes = [int(v) for k, v in dj["labels"].items() if k != "background"]
    s = compute_metrics_on_folder(str(labels), str(pred), str(pred / "summary.json"),
                                  reader_writer_class(dj["file_ending"])(), dj["file_ending"], classes, None, 2)
    return 100 * float(s["foreground_mean"]["Dice"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "gpu_out")
    ap.add_argument("--iterations", type=int, default=30, help="iterations per epoch (2 epochs per run)")
    ap.add_argument("--only", choices=("3d", "2d"), default=None)
    ap.add_argument("-device", "--device", default="cuda", help="cuda (default); cpu only to try the script itself")
    args = ap.parse_args(argv)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (-device cpu only tries the script)")
    from autossl.utilities.synthetic import make_synthetic_dataset

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        env[f"autossl_{k}"] = str(work / k)
    env.setdefault("autossl_n_proc_DA", str(min(8, os.cpu_count() or 2)))
    log = work / "commands.log"
    rows: list[dict] = []
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"{gpu}, torch {torch.__version__}", flush=True)

    def train(ds: str, config: str, plans: str, method: str, extra: list[str], label: str, part: str,
              batch: int, predict: tuple[Path, Path] | None) -> None:
        out = work / "results" / ds
        t_train = run(["autossl_train", ds, config, "all", "-p", plans, "--ssl", method, "--epochs", "2",
                       "--iterations-per-epoch", str(args.iterations), "--val-iterations", "2", "-device", args.device,
                       *extra], env, log)
        ep = last_epoch(out)
        from autossl.ssl.registry import create_method
        steps_per_it = create_method(method).optimizer_steps_per_iteration
        row = dict(part=part, run=label, method=method, batch=batch, train_wall_s=round(t_train, 1),
                   s_per_iteration=ep["epoch_time"] / args.iterations,
                   s_per_step=ep["epoch_time"] / args.iterations / steps_per_it,
                   final_train_loss=ep["train_loss"], finite=math.isfinite(ep["train_loss"]))
        if predict is not None:
            images, labels = predict
            pred = work / "predictions" / f"{ds}_{label}"
            run(["autossl_predict", "-i", str(images), "-o", str(pred), "-d", ds, "-c", config, "-p", plans,
                 "--ssl", method, "-f", "all", "-device", args.device], env, log)
            row["mean_dice"] = mean_dice(pred, labels, work / "raw" / ds / "dataset.json")
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, work, gpu, args.iterations)

    if args.only in (None, "3d"):
        ds = "Dataset951_GPUCheck3D"
        if not (work / "raw" / ds).is_dir():
            make_synthetic_dataset(work / "raw", 951, "GPUCheck3D", n_labeled=4, n_unlabeled=24, n_test=6,
                                   shape=(48, 64, 56), seed=0, test_labels_dir=work / "labels3d")
            run(["autossl_plan_and_preprocess", "-d", "951", "-c", "3d_fullres", "-np", "4"], env, log)
        plans = json.loads((work / "preprocessed" / ds / "autosslPlans.json").read_text())
        b = plans["configurations"]["3d_fullres"]["batch_size"]
        test = (work / "raw" / ds / "imagesTs", work / "labels3d")
        for method, extra, label in (("none", [], "supervised"), ("cross_teaching", [], "cross_teaching"),
                                     ("ucmt", [], "ucmt"), ("none", ["--compile"], "supervised --compile"),
                                     ("none", ["--fp32"], "supervised --fp32")):
            train(ds, "3d_fullres", "autosslPlans", method, extra, label, "3d", b, test)

    if args.only in (None, "2d"):
        ds = "Dataset952_GPUCheck2D"
        if not (work / "raw" / ds).is_dir():
            make_synthetic_dataset(work / "raw", 952, "GPUCheck2D", two_d=True, n_labeled=24, n_unlabeled=48,
                                   n_test=4, shape=(256, 256), seed=0, test_labels_dir=work / "labels2d")
            run(["autossl_plan_and_preprocess", "-d", "952", "-c", "2d", "-np", "4"], env, log)
        pre = work / "preprocessed"
        for method, batch in (("none", 12), ("cross_teaching", 8), ("ucmt", 12)):
            plans = write_batch_plans(pre, ds, batch)
            train(ds, "2d", plans, method, [], f"{method} (A2D batch {batch}+{batch})", "2d", batch, None)
    write(rows, work, gpu, args.iterations)
    print((work / "gpu_check.md").read_text())


def write(rows: list[dict], work: Path, gpu: str, iterations: int) -> None:
    head = ("| part | run | batch | s / iteration | s / optimiser step | 30,000 iterations (h) | final train loss | "
            "mean Dice (test) | train wall (s) |")
    lines = [f"GPU: {gpu}; 2 epochs x {iterations} iterations per run, the second epoch timed.", "", head,
             "|" + " --- |" * 9]
    for r in rows:
        dice = f"{r['mean_dice']:.1f}" if "mean_dice" in r else "-"
        lines.append(f"| {r['part']} | {r['run']} | {r['batch']} | {r['s_per_iteration']:.3f} | {r['s_per_step']:.3f} | "
                     f"{30000 * r['s_per_iteration'] / 3600:.2f} | {r['final_train_loss']:.3f} | {dice} | "
                     f"{r['train_wall_s']:.0f} |")
    (work / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (work / "gpu_check.json").write_text(json.dumps(dict(gpu=gpu, iterations=iterations, rows=rows), indent=2))


if __name__ == "__main__":
    main()
