"""Quality benchmarks of ../shared/protocols/ssl_quality.md: H3D (Hippocampus, 3d_fullres) and
A2D (ACDC, 2d), for any list of methods, run as a user would run them (converter -> plan and
preprocess -> train -> predict -> evaluate), each step through the console commands.

    python benchmarks/ssl_quality.py --protocol H3D --labeled labeled_10 \
        --methods none mean_teacher ua_mt cps fixmatch self_training cross_teaching ucmt --upper-bound

Every method gets the same number of iterations (labelled batches); ``--warmup W`` gives every
semi-supervised method a supervised warm start inside its run (the first W of the iterations,
counted in the row's total). ``--diagnostics`` scores what each model predicts for a fixed
subset of the unlabelled pool (its pseudo-labels) against the pool's labels, which the benchmark
reads from the upper-bound conversion (a separate raw dataset; training never sees them), at
snapshots over the run and at its end.

Writes <workdir>/results.json and results.md (one row per method and seed) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"

PROTOCOLS = {
    "H3D": dict(config="3d_fullres", source=SHARED / "data" / "Task04_Hippocampus",
                split=SHARED / "protocols" / "hippocampus_split.json", base_id=200, name="HippocampusH3D",
                classes={"1": "anterior", "2": "posterior"}),
    "A2D": dict(config="2d", source=SHARED / "data" / "ACDC_ssl4mis", split=None, base_id=270, name="ACDCA2D",
                classes={"1": "RV", "2": "Myo", "3": "LV"}),
}


def run(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}; see {log}; its end:\n{tail}")
    return time.time() - t0


def build_dataset(proto: dict, protocol: str, labeled: str, ds_id: int, env: dict, work: Path, log: Path) -> tuple[str, Path]:
    name = f"{proto['name']}{labeled.replace('_', '').replace('labeled', 'L')}"
    raw = Path(env["autossl_raw"]) / f"Dataset{ds_id:03d}_{name}"
    test_labels = work / f"testlabels_{ds_id}"
    if not raw.is_dir():
        if protocol == "H3D":
            run([sys.executable, "-m", "dataset_conversion.convert_msd", "-i", str(proto["source"]), "-d", str(ds_id),
                 "--name", name, "--split", str(proto["split"]), "--labeled", labeled,
                 "--test-labels-out", str(test_labels)], env, log)
        else:
            run([sys.executable, "-m", "dataset_conversion.convert_acdc_ssl4mis", "-i", str(proto["source"]),
                 "-d", str(ds_id), "--name", name, "--labeled-patients", labeled,
                 "--test-labels-out", str(test_labels)], env, log)
    return f"Dataset{ds_id:03d}_{name}", test_labels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="H3D")
    ap.add_argument("--labeled", default=None, help="H3D: labeled_10|labeled_20; A2D: 3|7 (default labeled_10 / 7)")
    ap.add_argument("--methods", nargs="+", default=["none", "mean_teacher"])
    ap.add_argument("--upper-bound", action="store_true", help="also train supervised on every pool case")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--iterations-per-epoch", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--val-iterations", type=int, default=5, help="pseudo-Dice batches per epoch (no model selection)")
    ap.add_argument("--planner", default="cpu", help="-pl for autossl_plan_and_preprocess (default: cpu)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=HERE / "out")
    ap.add_argument("--ssl-opt", nargs="*", default=[], help="extra --ssl-opt passed to every SSL method")
    ap.add_argument("--warmup", type=float, default=None,
                    help="autossl_train --warmup for every semi-supervised method (default: the method's)")
    ap.add_argument("--tag", default="", help="label of these rows (variants of a method in one table)")
    ap.add_argument("--pretrain", default=None, metavar="METHOD[:NETWORK]", nargs="+",
                    help="start every row (supervised included) from self-supervised pre-trainings of the "
                         "dataset with autossl_pretrain --method METHOD (NETWORK: cnn or transformer, default "
                         "--pretrain-network), each done once and reported beside the rows; several: one per "
                         "kind of network (e.g. mae simmim:transformer for cross teaching); the rows are "
                         "tagged pt_METHOD[_transformer][+...]")
    ap.add_argument("--pretrain-steps", type=int, default=1000, help="iterations of that pre-training")
    ap.add_argument("--pretrain-network", default="cnn", choices=("cnn", "transformer"),
                    help="the planned network whose encoder --pretrain trains (transformer: e.g. simmim, "
                         "loaded by the rows' transformer networks only)")
    ap.add_argument("--diagnostics", action="store_true",
                    help="pseudo-label Dice on a subset of the unlabelled pool over the run and at its end")
    ap.add_argument("--diag-cases", type=int, default=10, help="unlabelled cases scored by --diagnostics")
    ap.add_argument("--diag-snapshots", type=int, default=4, help="points of the run scored by --diagnostics")
    args = ap.parse_args(argv)

    proto = PROTOCOLS[args.protocol]
    labeled = args.labeled or ("labeled_10" if args.protocol == "H3D" else "7")
    if not proto["source"].exists():
        raise SystemExit(f"{proto['source']} not found: the protocol needs ../shared/data")
    work = (args.workdir / args.protocol).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        env[f"autossl_{k}"] = str(work / k)
    env.setdefault("autossl_n_proc_DA", "2")
    log = work / "commands.log"
    plans = {"cpu": "autosslPlansCPU"}.get(args.planner, "autosslPlans")
    epochs = max(1, args.steps // args.iterations_per_epoch)

    settings = [(labeled, m) for m in args.methods]
    if args.upper_bound:
        settings.append(("all", "none"))
    results_file = work / "results.json"
    done = {row_key(r): r for r in (json.loads(results_file.read_text())["rows"] if results_file.exists() else [])}
    prepared: dict[str, tuple[str, Path]] = {}
    for lab, method in settings:
        if lab not in prepared:
            ds_id = proto["base_id"] + {"labeled_10": 0, "3": 0, "labeled_20": 1, "7": 1}.get(lab, 9)
            ds, test_labels = build_dataset(proto, args.protocol, lab, ds_id, env, work, log)
            if not (Path(env["autossl_preprocessed"]) / ds / f"{plans}.json").exists():
                t = run(["autossl_plan_and_preprocess", "-d", str(ds_id), "-c", proto["config"], "-np", "2",
                         "-pl", args.planner], env, log)
                print(f"[{ds}] planned and preprocessed in {t:.0f} s", flush=True)
            prepared[lab] = (ds, test_labels)
        ds, test_labels = prepared[lab]
        pretrained, pt_infos = [], []
        for item in args.pretrain or []:
            pt_method, _, pt_network = item.partition(":")
            pt_dir, pt_info = pretrain_once(ds, proto, plans, args, env, log, pt_method,
                                            pt_network or args.pretrain_network)
            pretrained.append(str(pt_dir))
            pt_infos.append(pt_info)
        if pretrained:
            pretrained = ["-pretrained_weights", *pretrained]
        pool_labels = None
        if args.diagnostics and lab != "all":
            ds_all, _ = build_dataset(proto, args.protocol, "all", proto["base_id"] + 9, env, work, log)
            pool_labels = Path(env["autossl_raw"]) / ds_all / "labelsTr"
        for seed in args.seeds:
            tag = args.tag if method != "none" else ""
            if pt_infos:
                pt = "pt_" + "+".join(i["method"] + ("_transformer" if i["network"] == "transformer" else "")
                                      for i in pt_infos)
                tag = "_".join(t for t in (pt, tag) if t)
            key = (lab, method, seed, tag)
            pred = work / "predictions" / f"{ds}_{method}_s{seed}{'_' + tag if tag else ''}"
            if key in done:
                if "largest_component" not in done[key] and not tag and (pred / "summary.json").is_file():
                    done[key]["largest_component"] = evaluate_largest_component(pred, test_labels, proto)
                continue
            ssl_opts = [a for o in args.ssl_opt for a in ("--ssl-opt", o)] if method != "none" else []
            # the protocol's budget is iterations (labelled batches): a method with two optimiser
            # steps per iteration (UCMT's UMIX step) gets as many iterations as the others
            m = method_instance(method, args.ssl_opt if method != "none" else [])
            per_it = m.optimizer_steps_per_iteration
            m_epochs = epochs
            warm = [] if method == "none" or args.warmup is None else ["--warmup", str(args.warmup)]
            snap_every = max(1, m_epochs // args.diag_snapshots) if pool_labels is not None else 0
            train_cmd = ["autossl_train", ds, proto["config"], "all", "-p", plans, "--ssl", method,
                         "--epochs", str(m_epochs), "--iterations-per-epoch", str(args.iterations_per_epoch),
                         "--val-iterations", str(args.val_iterations),
                         "--seed", str(seed), "-device", args.device, *ssl_opts, *warm, *pretrained]
            if snap_every:
                train_cmd += ["--snapshot-every", str(snap_every)]
            model_dir = Path(env["autossl_results"]) / ds / f"{trainer_name(method)}__{plans}__{proto['config']}"
            if (model_dir / "fold_all" / "checkpoint_final.pth").exists():
                shutil.rmtree(model_dir)  # an earlier variant of the same method: train this one afresh
            t_train = run(train_cmd, env, log)
            t_pred = run(["autossl_predict", "-i", str(Path(env["autossl_raw"]) / ds / "imagesTs"), "-o", str(pred),
                          "-d", ds, "-c", proto["config"], "-p", plans, "--ssl", method, "-f", "all",
                          "-device", args.device], env, log)
            row = evaluate(pred, test_labels, Path(env["autossl_raw"]) / ds / "dataset.json", proto)
            row["largest_component"] = evaluate_largest_component(pred, test_labels, proto)
            iterations = m_epochs * args.iterations_per_epoch
            debug = json.loads((model_dir / "fold_all" / "debug.json").read_text())
            w = int(debug.get("warmup_steps", 0))
            n_nets = sum(1 for n in debug["networks"] if n["trainable"])
            # the method's own predictions of the unlabelled pool (temporal ensembling's updates,
            # self-training's rounds): forward passes over one patch each, against supervised's
            # forward (1) and backward (2) over a batch
            pool = debug.get("pool_prediction") or {}
            pool_units = pool.get("network_inputs", 0) / (3 * debug["batch_size_per_rank"])
            cost = (w * n_nets + (iterations - w) * m.relative_cost(debug["unlabeled_ratio"]) + pool_units) / iterations
            if pool.get("predictions"):
                row["pool_prediction"] = {"predictions": pool["predictions"], "patches": pool["network_inputs"],
                                          "seconds": round(pool["seconds"], 1)}
            row.update(labeled=lab, method=method, seed=seed, tag=tag, warmup_iterations=w,
                       steps=w + (iterations - w) * per_it, iterations=iterations,
                       train_s=round(t_train, 1), predict_s=round(t_pred, 1), arithmetic_ratio=round(cost, 2))
            if pt_infos:
                row["pretraining"] = pt_infos[0] if len(pt_infos) == 1 else pt_infos
            if pool_labels is not None:
                row["pseudo_label_dice"] = pseudo_label_course(model_dir, method, ds, proto, plans, pool_labels,
                                                               env, work, log, args, seed, tag)
            done[key] = row
            write_tables(list(done.values()), work, args)
            print(format_row(row), flush=True)
    write_tables(list(done.values()), work, args)
    print((work / "results.md").read_text())


def pretrain_once(ds: str, proto: dict, plans: str, args, env: dict, log: Path, method: str,
                  network: str) -> tuple[Path, dict]:
    """The dataset's self-supervised pre-training with ``method`` of ``network`` (run once,
    reused by every row); returns its results folder and {method, network, iterations, wall_s}."""
    if network not in ("cnn", "transformer"):
        raise SystemExit(f"--pretrain {method}:{network}: the network is cnn or transformer")
    suffix = "_transformer" if network == "transformer" else ""
    folder = Path(env["autossl_results"]) / ds / f"autosslPretrainer_{method}{suffix}__{plans}__{proto['config']}"
    info_file = folder / "benchmark_pretraining.json"
    if (folder / "fold_all" / "checkpoint_final.pth").is_file() and info_file.is_file():
        return folder, json.loads(info_file.read_text())
    epochs = max(1, args.pretrain_steps // args.iterations_per_epoch)
    t = run(["autossl_pretrain", ds, proto["config"], "--method", method, "-p", plans,
             "--epochs", str(epochs), "--iterations-per-epoch", str(args.iterations_per_epoch),
             "--network", network, "-device", args.device], env, log)
    info = {"method": method, "network": network, "iterations": epochs * args.iterations_per_epoch, "wall_s": round(t, 1)}
    info_file.write_text(json.dumps(info))
    print(f"[{ds}] pre-training {method} ({network}): {info['iterations']} iterations in {t:.0f} s", flush=True)
    return folder, info


def trainer_name(method: str) -> str:
    from autossl.training.naming import trainer_name as name

    return name(method)


def row_key(r: dict) -> tuple:
    return r["labeled"], r["method"], r["seed"], r.get("tag", "")


def method_instance(method: str, ssl_opt: list[str]):
    from autossl.ssl.registry import create_method

    options = dict(o.split("=", 1) for o in ssl_opt)
    return create_method(method, **options)


def diagnostic_cases(raw_unlabeled: Path, n: int, file_ending: str) -> list[str]:
    """A fixed, evenly spread subset of the unlabelled pool (the same for every method)."""
    cases = sorted({p.name[: -len(file_ending) - 5] for p in raw_unlabeled.glob(f"*_0000{file_ending}")})
    if n >= len(cases):
        return cases
    return [cases[int(i)] for i in np.linspace(0, len(cases) - 1, n)]


def pseudo_label_course(model_dir: Path, method: str, ds: str, proto: dict, plans: str, pool_labels: Path,
                        env: dict, work: Path, log: Path, args, seed: int, tag: str) -> dict:
    """{step: mean Dice} of the model's predictions (its inference networks, no TTA) for the
    diagnostic subset of the unlabelled pool, at each snapshot and the final checkpoint."""
    raw = Path(env["autossl_raw"]) / ds
    dj = json.loads((raw / "dataset.json").read_text())
    fe = dj["file_ending"]
    cases = diagnostic_cases(raw / "imagesTrUnlabeled", args.diag_cases, fe)
    inp = work / "diagnostics" / f"{ds}_inputs"
    ref = work / "diagnostics" / f"{ds}_labels"
    if not ref.is_dir():
        inp.mkdir(parents=True, exist_ok=True)
        ref.mkdir(parents=True, exist_ok=True)
        for c in cases:
            for img in (raw / "imagesTrUnlabeled").glob(f"{c}_*{fe}"):
                shutil.copy(img, inp / img.name)
            shutil.copy(pool_labels / f"{c}{fe}", ref / f"{c}{fe}")
    fold = model_dir / "fold_all"
    snaps = sorted(fold.glob("checkpoint_step*.pth"), key=lambda p: int(p.stem.replace("checkpoint_step", "")))
    course = {}
    for chk in [*snaps, fold / "checkpoint_final.pth"]:
        step = chk.stem.replace("checkpoint_step", "") if chk in snaps else "final"
        out = work / "diagnostics" / f"{ds}_{method}{'_' + tag if tag else ''}_s{seed}_{step}"
        run(["autossl_predict", "-i", str(inp), "-o", str(out), "-m", str(model_dir), "-f", "all", "-chk", chk.name,
             "--disable_tta", "-device", args.device, "--disable_progress_bar"], env, log)
        course[step] = evaluate(out, ref, raw / "dataset.json", proto)["mean_dice"]
        shutil.rmtree(out, ignore_errors=True)
    for chk in snaps:
        chk.unlink()
    return course


def evaluate(pred: Path, ref: Path, dataset_json: Path, proto: dict) -> dict:
    from autossl.evaluation.evaluate import compute_metrics_on_folder
    from autossl.imageio.registry import reader_writer_class

    dj = json.loads(dataset_json.read_text())
    summary = compute_metrics_on_folder(str(ref), str(pred), str(pred / "summary.json"),
                                        reader_writer_class(dj["file_ending"])(), dj["file_ending"],
                                        [int(k) for k in proto["classes"]], None, 2)
    mean = summary["mean"]
    row = {"dice": {}, "hd95": {}, "asd": {}}
    for k, name in proto["classes"].items():
        m = mean.get(k) or mean.get(int(k))
        row["dice"][name] = 100 * m["Dice"]
        row["hd95"][name] = m.get("HD95")
        row["asd"][name] = m.get("ASD")
    row["mean_dice"] = float(np.mean(list(row["dice"].values())))
    row["mean_hd95"] = float(np.nanmean([v for v in row["hd95"].values() if v is not None]))
    row["mean_asd"] = float(np.nanmean([v for v in row["asd"].values() if v is not None]))
    return row


def evaluate_largest_component(pred: Path, ref: Path, proto: dict) -> dict:
    """Mean Dice and HD95 after one fixed postprocessing, the same for every row: all but the
    largest connected component of the foreground, then of each class, removed (nnU-Net's two
    candidate steps, applied without choosing; choosing on the test cases would be model
    selection on them). Scattered false positives far from the structure lower Dice and
    dominate HD95; this column shows how much of a row's figure they account for."""
    from autossl.postprocessing.remove_connected_components import (
        apply_postprocessing_to_folder, remove_all_but_largest_component_from_segmentation as keep_largest)

    labels = [int(k) for k in proto["classes"]]
    steps = ([keep_largest] * (1 + len(labels)),
             [{"labels_or_regions": labels}] + [{"labels_or_regions": c} for c in labels])
    out = pred.parent / f"{pred.name}_largest_component"
    apply_postprocessing_to_folder(pred, out, steps, num_processes=2, allow_tqdm=False)
    r = evaluate(out, ref, pred / "dataset.json", proto)
    return {"mean_dice": r["mean_dice"], "mean_hd95": r["mean_hd95"], "dice": r["dice"]}


def method_label(r: dict) -> str:
    return r["method"] + (f" [{r['tag']}]" if r.get("tag") else "")


def format_row(r: dict) -> str:
    dice = " | ".join(f"{v:.1f}" for v in r["dice"].values())
    pl = r.get("pseudo_label_dice") or {}
    course = " / ".join(f"{v:.1f}" for v in pl.values()) if pl else "-"
    lc = r.get("largest_component")
    lc_cols = f"{lc['mean_dice']:.1f} | {lc['mean_hd95']:.2f}" if lc else "- | -"
    return (f"| {method_label(r)} | {r['labeled']} | {r['seed']} | {dice} | {r['mean_dice']:.1f} | {r['mean_hd95']:.2f} | "
            f"{lc_cols} | "
            f"{r['mean_asd']:.2f} | {r.get('iterations', r['steps'])} | {r.get('warmup_iterations', 0)} | {r['steps']} | "
            f"{r['train_s']:.0f} | {r.get('predict_s', float('nan')):.0f} | {r.get('step_overhead', float('nan')):.2f} | "
            f"{r.get('arithmetic_ratio', float('nan')):.2f} | {course} |")


def gain_summary(rows: list[dict]) -> str:
    """Per method: mean-Dice gain over supervised on the same labelled set and seed, and the share
    of the gap to the upper bound (supervised on every pool case, same seed) it closes."""
    sup = {(r["labeled"], r["seed"]): r["mean_dice"] for r in rows if r["method"] == "none" and not r.get("tag")}
    lines = []
    for r in rows:
        base = sup.get((r["labeled"], r["seed"]))
        if (r["method"] == "none" and not r.get("tag")) or base is None:
            continue  # every row but the baseline itself, a pre-trained supervised row included
        gain = r["mean_dice"] - base
        upper = sup.get(("all", r["seed"]))
        closed = (f", {100 * gain / (upper - base):.0f}% of the {upper - base:.1f}-point gap to the upper bound"
                  if upper is not None and upper > base else "")
        lines.append(f"- {method_label(r)} ({r['labeled']}, seed {r['seed']}): {gain:+.1f} mean Dice over supervised{closed}")
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def write_tables(rows: list[dict], work: Path, args) -> None:
    sup = {(r["labeled"], r["seed"]): r["train_s"] / max(1, r.get("iterations", r["steps"]))
           for r in rows if r["method"] == "none" and not r.get("tag")}
    for r in rows:
        base = sup.get((r["labeled"], r["seed"]))
        r["step_overhead"] = (r["train_s"] / max(1, r.get("iterations", r["steps"]))) / base if base else float("nan")
    classes = list(rows[0]["dice"]) if rows else []
    head = ("| method | labelled | seed | " + " | ".join(f"Dice {c}" for c in classes) +
            " | mean Dice | HD95 (mm) | mean Dice, largest component | HD95, largest component (mm) | ASD (mm) | iterations | of them supervised warm start | optimiser steps | "
            "train wall (s) | predict wall (s) | time per iteration / supervised | arithmetic ratio | "
            "pseudo-label Dice over the run |")
    sep = "|" + " --- |" * (len(classes) + 16)
    md = "\n".join([head, sep] + [format_row(r) for r in rows]) + "\n" + gain_summary(rows)
    from autossl.utilities.file_io import save_json

    save_json({"protocol": args.protocol, "command": " ".join(sys.argv), "rows": rows}, work / "results.json")
    (work / "results.md").write_text(md)


if __name__ == "__main__":
    main()
