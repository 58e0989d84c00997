"""Training step and inference, autossl against nnU-Net v2, side by side (../shared/protocols/speed.md).

    python benchmarks/train_predict_vs_nnunet.py [--steps 10] [--epochs 2] [--cases 20] [--workdir DIR]

1. Converts ``../shared/data/Task04_Hippocampus`` (all 260 cases) to Dataset004_Hippocampus once
   (``autossl_convert_msd``) into the work folder, and plans + preprocesses 3d_fullres with each
   tool into its own preprocessed folder (kept and reused). The nnU-Net v2 peer lives in its own
   virtual environment (``preprocess_vs_nnunet.nnunet_venv``: ``pip install nnunetv2``, never a
   dependency of autossl).
2. Checks that autossl's ``autosslPlans`` 3d_fullres has nnU-Net's network, patch and batch size
   (PlainConvUNet 32-64-128-256, patch 40x56x40, batch 9 for Hippocampus); if not, a plans file
   ``autosslPlans_nnUNetShape`` with nnU-Net's values is written and used.
3. Training, on the CPU, 2 augmentation workers on both sides, torch.compile off, fold 0:
   ``autossl_train 4 3d_fullres 0 -device cpu --epochs E --iterations-per-epoch N --val-iterations V``
   against ``nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainer_benchSteps -device cpu``, a trainer
   subclass (``nnUNet_extTrainer``) with ``num_epochs=E``, ``num_iterations_per_epoch=N``,
   ``num_val_iterations_per_epoch=V``. Both skip the final validation of the fold (nnU-Net: the
   subclass; autossl: ``Trainer.perform_final_validation`` replaced by a no-op in the launching
   process). Seconds per step = the LAST epoch's time / N as each tool logs it (nnU-Net ``Epoch
   time``, autossl ``epoch_time``): steps with their data loading plus V validation batches; the
   first epoch (worker start-up, first allocations) is not counted.
4. Inference: the first ``--cases`` validation cases of fold 0 (raw images) predicted with each
   tool's checkpoint_final from step 3 (same architecture), one fold, mirroring on, CPU:
   ``autossl_predict ... -f 0 -device cpu`` and ``nnUNetv2_predict ... -f 0 -device cpu``, both with
   2 preprocessing and 2 export workers. Seconds per case = (time the last output file appeared
   - time the first appeared) / (cases - 1), i.e. without start-up; the wall time / cases is
   reported too.
5. Unless ``--no-fp32-variant``, autossl runs a second time with ``--fp32`` (training and
   prediction without bf16 autocast, float32 throughout as nnU-Net on the CPU) as an extra column.
6. Peak RSS of each command's whole process tree (sum of VmRSS of the command and all its
   descendants, sampled every 0.2 s in training, 0.1 s in prediction), a table with the ratios
   autossl / nnU-Net and a JSON file. With ``--repeats R`` every run is repeated R times,
   alternating the order of the tools, and the smallest times (the runs least disturbed by other
   load on a shared machine) and the largest peak memory are reported; every run is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from preprocess_vs_nnunet import TASK, TreeSampler, _clean_env, _version, nnunet_venv  # noqa: E402

DATASET = "Dataset004_Hippocampus"
CONFIG = "3d_fullres"
BENCH_TRAINER = "nnUNetTrainer_benchSteps"
SHAPE_PLANS = "autosslPlans_nnUNetShape"
TARGET_RATIO = 0.8

NNUNET_TRAINER_SOURCE = '''"""nnUNetTrainer that runs a fixed number of short epochs (autossl benchmark)."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_benchSteps(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ["bench_steps"])
        self.num_val_iterations_per_epoch = int(os.environ["bench_val_steps"])
        self.num_epochs = int(os.environ["bench_epochs"])

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (benchmark)")
'''

# autossl_train in a process whose final validation of the fold is a no-op (as the nnU-Net subclass)
AUTOSSL_TRAIN_LAUNCHER = ("import sys; from autossl.training import trainer as t; "
                          "t.Trainer.perform_final_validation = lambda self: None; "
                          "from autossl.cli.train import main; sys.exit(main(sys.argv[1:]))")


# ----------------------------------------------------------------------------------------------
# running and measuring
# ----------------------------------------------------------------------------------------------
class OutputWatcher(threading.Thread):
    """When each ``*.nii.gz`` (not hidden) first appears in a folder (polled every ``interval`` s)."""

    def __init__(self, folder: Path, interval: float = 0.05):
        super().__init__(daemon=True)
        self.folder, self.interval = folder, interval
        self.first_seen: dict[str, float] = {}
        self._stop_evt = threading.Event()

    def _poll(self) -> None:
        if self.folder.is_dir():
            now = time.perf_counter()
            for name in os.listdir(self.folder):
                # autossl writes "<case>.nii.gz" atomically through a hidden ".<case>...tmp.nii.gz"
                if name.endswith(".nii.gz") and not name.startswith(".") and name not in self.first_seen:
                    self.first_seen[name] = now

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self._poll()
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()
        self._poll()


def run_measured(cmd: list[str], env: dict, log: Path, watch: Path | None = None, interval: float = 0.1) -> dict:
    """Run ``cmd`` (output to ``log``); wall time, peak tree RSS/PSS (sampled every ``interval``
    s), CPU seconds and, with ``watch``, when each output file appeared (seconds after the start).
    The command runs in its own process group, which is killed if the benchmark is interrupted."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        watcher = OutputWatcher(watch) if watch is not None else None
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(log.parent),
                                start_new_session=True)
        sampler = TreeSampler(proc.pid, interval=interval)
        sampler.start()
        if watcher is not None:
            watcher.start()
        try:
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        wall = time.perf_counter() - t0
        sampler.stop()
        if watcher is not None:
            watcher.stop()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{tail}\n(full log: {log})")
    out = {"wall_s": wall, "cpu_s": sum(sampler.cpu.values()), "peak_rss_gb": sampler.peak_rss / 1e9,
           "peak_pss_gb": sampler.peak_pss / 1e9, "peak_processes": sampler.peak_procs}
    if watcher is not None:
        out["outputs_at_s"] = sorted(t - t0 for t in watcher.first_seen.values())
    return out


# ----------------------------------------------------------------------------------------------
# data, plans
# ----------------------------------------------------------------------------------------------
def convert_raw(raw_root: Path, bindir: Path) -> Path:
    """Dataset004_Hippocampus under ``raw_root`` (``autossl_convert_msd``, once)."""
    out = raw_root / DATASET
    n_task = len(list((TASK / "labelsTr").glob("hippocampus_*.nii.gz")))
    if (out / "dataset.json").is_file() and len(list((out / "labelsTr").glob("*.nii.gz"))) == n_task:
        return out
    raw_root.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(bindir / "autossl_convert_msd"), "-i", str(TASK), "-d", "4", "--overwrite"],
                   env=dict(_clean_env(), autossl_raw=str(raw_root)), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out


def _preprocessed(pre: Path, plans: str) -> bool:
    f = pre / DATASET / f"{plans}.json"
    if not f.is_file():
        return False
    ident = json.loads(f.read_text())["configurations"][CONFIG]["data_identifier"]
    return len(list((pre / DATASET / ident).glob("*.pkl"))) == len(list((TASK / "labelsTr").glob("h*.nii.gz")))


def network_shape(cfg: dict) -> dict:
    a = cfg["architecture"]
    return {"network": a["network_class_name"].rsplit(".", 1)[-1],
            "features": a["arch_kwargs"]["features_per_stage"], "strides": a["arch_kwargs"]["strides"],
            "kernels": a["arch_kwargs"]["kernel_sizes"], "patch_size": cfg["patch_size"],
            "batch_size": cfg["batch_size"], "spacing": cfg["spacing"]}


def autossl_plans_like_nnunet(pre_a: Path, pre_n: Path) -> tuple[str, dict, dict]:
    """The autossl plans identifier to train with: ``autosslPlans`` when its 3d_fullres network,
    patch and batch equal nnU-Net's, else ``autosslPlans_nnUNetShape`` (nnU-Net's values)."""
    pa = json.loads((pre_a / DATASET / "autosslPlans.json").read_text())
    pn = json.loads((pre_n / DATASET / "nnUNetPlans.json").read_text())
    ca, cn = pa["configurations"][CONFIG], pn["configurations"][CONFIG]
    sa, sn = network_shape(ca), network_shape(cn)
    if sa == sn and ca["architecture"] == cn["architecture"]:
        return "autosslPlans", sa, sn
    if sa["spacing"] != sn["spacing"]:
        raise SystemExit(f"autosslPlans {CONFIG} spacing {sa['spacing']} != nnU-Net's {sn['spacing']}: the "
                         f"preprocessed data differ, a plans override cannot make the runs comparable")
    pa["plans_name"] = SHAPE_PLANS
    for k in ("architecture", "patch_size", "batch_size"):
        ca[k] = cn[k]
    (pre_a / DATASET / f"{SHAPE_PLANS}.json").write_text(json.dumps(pa, indent=2))
    print(f"autosslPlans differ from nnU-Net's ({sa} vs {sn}); training with {SHAPE_PLANS}", flush=True)
    return SHAPE_PLANS, network_shape(ca), sn


def prediction_inputs(raw: Path, pre_a: Path, folder: Path, n: int) -> list[str]:
    """The first ``n`` validation cases of fold 0 (not trained on) as CASE_0000.nii.gz in ``folder``."""
    splits = json.loads((pre_a / DATASET / "splits_final.json").read_text())
    cases = sorted(splits[0]["val"])[:n]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for c in cases:
        shutil.copy(raw / "imagesTr" / f"{c}_0000.nii.gz", folder / f"{c}_0000.nii.gz")
    return cases


# ----------------------------------------------------------------------------------------------
# log parsing
# ----------------------------------------------------------------------------------------------
def nnunet_epoch_times(log: Path) -> list[float]:
    return [float(m) for m in re.findall(r"Epoch time: ([\d.]+) s", log.read_text(errors="replace"))]


def autossl_epoch_times(log: Path) -> list[float]:
    text = log.read_text(errors="replace")
    return [float(m) for m in re.findall(r"epoch \d+/\d+ \(step .*epoch_time ([\d.]+)s", text)]


def _per_case(m: dict, n: int) -> float:
    t = m["outputs_at_s"]
    if len(t) != n:
        raise SystemExit(f"expected {n} predictions, {len(t)} appeared")
    return (t[-1] - t[0]) / (n - 1) if n > 1 else m["wall_s"]


def _order(tools: dict, r: int) -> list[str]:
    """Run order of repeat ``r``: as listed, reversed every other repeat."""
    names = list(tools)
    return names if r % 2 == 0 else names[::-1]


def _best(runs: list[dict], times: tuple[str, ...]) -> dict:
    """Over the repeats: the smallest time figures (the run least disturbed by other load on a
    shared machine) and the largest peak memory."""
    best = dict(min(runs, key=lambda m: m[times[0]]))
    for k in times:
        best[k] = min(m[k] for m in runs)
    for k in ("peak_rss_gb", "peak_pss_gb"):
        best[k] = max(m[k] for m in runs)
    best["repeats"] = len(runs)
    return best


# ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "autossl_bench_train")
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "autossl_bench" / "nnunet_venv",
                    help="virtual environment for nnunetv2 (created once, reused)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per epoch (N)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs; the last one is timed")
    ap.add_argument("--val-steps", type=int, default=1, help="validation batches per epoch (V)")
    ap.add_argument("--workers", type=int, default=2, help="augmentation worker processes on both sides")
    ap.add_argument("--cases", type=int, default=20, help="cases to predict")
    ap.add_argument("--skip", choices=("train", "predict"), action="append", default=[],
                    help="leave out a part (predict needs the checkpoints of an earlier train part)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per tool and part, alternating the order; the smallest times are reported")
    ap.add_argument("--no-fp32-variant", dest="fp32_variant", action="store_false",
                    help="leave out the extra autossl --fp32 runs (float32 throughout, as nnU-Net on the CPU)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: <workdir>/results.json)")
    a = ap.parse_args()
    if not TASK.is_dir():
        raise SystemExit(f"{TASK}: MSD Task04_Hippocampus not found")
    if a.epochs < 2:
        raise SystemExit("--epochs must be >= 2: the first epoch (start-up) is not timed")
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    nbin = nnunet_venv(a.venv.resolve())
    load_start = os.getloadavg()
    t_bench = time.perf_counter()

    raw_root = work / "raw"
    raw = convert_raw(raw_root, bindir)
    pre_a, pre_n = work / "autossl_preprocessed", work / "nnunet_preprocessed"
    res_a, res_n = work / "autossl_results", work / "nnunet_results"
    ext = work / "nnunet_ext_trainer"
    ext.mkdir(exist_ok=True)
    (ext / f"{BENCH_TRAINER}.py").write_text(NNUNET_TRAINER_SOURCE)
    env_a = dict(_clean_env(), autossl_raw=str(raw_root), autossl_preprocessed=str(pre_a),
                 autossl_results=str(res_a), autossl_n_proc_DA=str(a.workers), autossl_compile="0")
    env_n = dict(_clean_env(), nnUNet_raw=str(raw_root), nnUNet_preprocessed=str(pre_n), nnUNet_results=str(res_n),
                 nnUNet_n_proc_DA=str(a.workers), nnUNet_compile="false", nnUNet_extTrainer=str(ext),
                 bench_steps=str(a.steps), bench_val_steps=str(a.val_steps), bench_epochs=str(a.epochs))

    if not _preprocessed(pre_a, "autosslPlans"):
        print("autossl: plan + preprocess 3d_fullres (once) ...", flush=True)
        run_measured([str(bindir / "autossl_plan_and_preprocess"), "-d", "4", "-c", CONFIG, "-np", "2"], env_a,
                     work / "autossl_preprocess.log")
    if not _preprocessed(pre_n, "nnUNetPlans"):
        print("nnU-Net: plan + preprocess 3d_fullres (once) ...", flush=True)
        run_measured([str(nbin / "nnUNetv2_plan_and_preprocess"), "-d", "4", "-c", CONFIG, "-np", "2"], env_n,
                     work / "nnunet_preprocess.log")
    plans_a, shape_a, shape_n = autossl_plans_like_nnunet(pre_a, pre_n)
    result: dict = {
        "benchmark": f"supervised training step + inference, Dataset004_Hippocampus {CONFIG}, CPU",
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "model": _cpu_model(), "load_average_at_start": load_start},
        "versions": {"autossl": _version(Path(sys.executable), "autossl"),
                     "nnunetv2": _version(nbin / "python", "nnunetv2"),
                     "torch": _version(Path(sys.executable), "torch")},
        "settings": {"steps_per_epoch": a.steps, "epochs": a.epochs, "val_steps_per_epoch": a.val_steps,
                     "augmentation_workers": a.workers, "cases": a.cases, "fold": 0, "autossl_plans": plans_a},
        "plans": {"autossl": shape_a, "nnunet": shape_n},
    }

    # ------------------------------------------------------------------ the tools
    # autossl_fp32: autossl with --fp32 (float32 throughout, as nnU-Net on the CPU): the same code
    # paths without bf16 autocast, to show what the mixed precision alone is worth
    tools = {"nnunet": {"env": env_n, "res": res_n, "parse": nnunet_epoch_times,
                        "train": [str(nbin / "nnUNetv2_train"), "4", CONFIG, "0", "-tr", BENCH_TRAINER,
                                  "-device", "cpu"],
                        "predict": [str(nbin / "nnUNetv2_predict"), "-d", "4", "-c", CONFIG, "-tr", BENCH_TRAINER]}}
    variants = [("autossl", [], res_a)] + ([("autossl_fp32", ["--fp32"], work / "autossl_results_fp32")]
                                          if a.fp32_variant else [])
    for name, extra, res in variants:
        tools[name] = {"env": dict(env_a, autossl_results=str(res)), "res": res, "parse": autossl_epoch_times,
                       "train": [str(bindir / "python"), "-c", AUTOSSL_TRAIN_LAUNCHER, "4", CONFIG, "0", "-p", plans_a,
                                 "-device", "cpu", "--epochs", str(a.epochs), "--iterations-per-epoch", str(a.steps),
                                 "--val-iterations", str(a.val_steps), "--num-workers", str(a.workers), *extra],
                       "predict": [str(bindir / "autossl_predict"), "-d", "4", "-c", CONFIG, "-p", plans_a, *extra]}
    inp = work / "predict_input"
    for name, t in tools.items():
        t["predict"] += ["-i", str(inp), "-o", str(work / f"{name}_pred"), "-f", "0", "-device", "cpu",
                         "-npp", "2", "-nps", "2", "--disable_progress_bar"]
        t["commands"] = {
            "train": ("autossl_train " + " ".join(t["train"][3:]) if name.startswith("autossl")
                      else "nnUNetv2_train " + " ".join(t["train"][1:])) + "  (final validation skipped)",
            "predict": " ".join([Path(t["predict"][0]).name, *t["predict"][1:]]).replace(str(work), "<workdir>")}
    result["commands"] = {name: t["commands"] for name, t in tools.items()}

    # ------------------------------------------------------------------ training
    if "train" not in a.skip:
        runs: dict[str, list[dict]] = {name: [] for name in tools}
        for r in range(a.repeats):
            for name in _order(tools, r):
                t = tools[name]
                shutil.rmtree(t["res"], ignore_errors=True)
                log = work / f"{name}_train_run{r}.log"
                print(f"run {r}: training {name}, {a.epochs} epochs x {a.steps} steps ...", flush=True)
                m = run_measured(t["train"], t["env"], log, interval=0.2)
                epochs = t["parse"](log)
                if len(epochs) != a.epochs:
                    raise SystemExit(f"{log}: found {len(epochs)} epoch times, expected {a.epochs}")
                m["epoch_times_s"] = epochs
                m["step_s"] = epochs[-1] / a.steps
                m["load_average"] = os.getloadavg()
                runs[name].append(m)
                print(f"  {name}: epochs {epochs} s -> {m['step_s']:.2f} s/step, wall {m['wall_s']:.1f} s, "
                      f"peak RSS {m['peak_rss_gb']:.2f} GB, load {m['load_average'][0]:.1f}", flush=True)
        result["train"] = {name: _best(ms, ("step_s", "wall_s")) for name, ms in runs.items()}
        result["train_runs"] = runs

    # ------------------------------------------------------------------ inference
    if "predict" not in a.skip:
        for name, t in tools.items():
            if not list(t["res"].glob(f"{DATASET}/*__*__{CONFIG}/fold_0/checkpoint_final.pth")):
                raise SystemExit(f"no {name} checkpoint_final under {t['res']}: run the train part first")
        cases = prediction_inputs(raw, pre_a, inp, a.cases)
        runs = {name: [] for name in tools}
        for r in range(a.repeats):
            for name in _order(tools, r):
                t = tools[name]
                out = work / f"{name}_pred"
                shutil.rmtree(out, ignore_errors=True)
                print(f"run {r}: predicting {len(cases)} cases with {name} ...", flush=True)
                m = run_measured(t["predict"], t["env"], work / f"{name}_predict_run{r}.log", watch=out, interval=0.1)
                m["case_s"] = _per_case(m, len(cases))
                m["wall_per_case_s"] = m["wall_s"] / len(cases)
                m["load_average"] = os.getloadavg()
                runs[name].append(m)
                print(f"  {name}: {m['case_s']:.2f} s/case (wall {m['wall_s']:.1f} s), peak RSS "
                      f"{m['peak_rss_gb']:.2f} GB, load {m['load_average'][0]:.1f}", flush=True)
        result["predict"] = {name: _best(ms, ("case_s", "wall_per_case_s", "wall_s")) for name, ms in runs.items()}
        result["predict_runs"] = runs
        result["predict_cases"] = cases

    result["load_average_at_end"] = os.getloadavg()
    result["benchmark_wall_s"] = time.perf_counter() - t_bench
    report(result)
    out = a.out or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(result: dict) -> None:
    """Markdown table (autossl, [autossl --fp32], nnU-Net v2, ratios) and the targets."""
    rows = []
    if "train" in result:
        rows += [("training step (s, last epoch / N)", "step_s", result["train"], "{:.2f}"),
                 ("training peak RSS, tree (GB)", "peak_rss_gb", result["train"], "{:.2f}"),
                 ("training wall incl. start-up (s)", "wall_s", result["train"], "{:.1f}")]
    if "predict" in result:
        rows += [("inference per case (s, no start-up)", "case_s", result["predict"], "{:.2f}"),
                 ("inference wall / cases (s)", "wall_per_case_s", result["predict"], "{:.2f}"),
                 ("inference peak RSS, tree (GB)", "peak_rss_gb", result["predict"], "{:.2f}")]
    if not rows:
        return
    fp32 = "autossl_fp32" in rows[0][2]
    print()
    print("| figure | autossl | " + ("autossl --fp32 | " if fp32 else "") + "nnU-Net v2 | ratio autossl / nnU-Net |"
          + (" ratio autossl --fp32 / nnU-Net |" if fp32 else ""))
    print("| --- " * (6 if fp32 else 4) + "|")
    ratios: dict = {}
    for label, key, d, fmt in rows:
        r = d["autossl"][key] / d["nnunet"][key]
        ratios[label] = {"autossl": r}
        cells = [fmt.format(d["autossl"][key])] + ([fmt.format(d["autossl_fp32"][key])] if fp32 else []) \
            + [fmt.format(d["nnunet"][key]), f"{r:.2f}"]
        if fp32:
            ratios[label]["autossl_fp32"] = d["autossl_fp32"][key] / d["nnunet"][key]
            cells.append(f"{ratios[label]['autossl_fp32']:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    result["ratios"] = ratios
    targets = {}
    if "train" in result:
        targets["step_time"] = result["train"]["autossl"]["step_s"] / result["train"]["nnunet"]["step_s"]
    if "predict" in result:
        targets["inference_per_case"] = result["predict"]["autossl"]["case_s"] / result["predict"]["nnunet"]["case_s"]
    result["targets"] = {k: {"ratio": v, "target": TARGET_RATIO, "met": v <= TARGET_RATIO} for k, v in targets.items()}
    for k, v in result["targets"].items():
        print(f"{k}: ratio {v['ratio']:.2f} (target <= {TARGET_RATIO}): {'met' if v['met'] else 'MISSED'}")
    print(f"load average start {result['machine']['load_average_at_start']}, end {result['load_average_at_end']}")


if __name__ == "__main__":
    main()
