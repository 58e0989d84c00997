"""Plan + preprocess, autossl against nnU-Net v2, side by side (../shared/protocols/speed.md).

    python benchmarks/preprocess_vs_nnunet.py [--np 2] [--repeats 1] [--workdir DIR]

1. Converts ``../shared/data/Task04_Hippocampus`` (all 260 cases) to Dataset004_Hippocampus with
   ``dataset_conversion/convert_msd.py`` (inline copy if the converter is missing), once per raw
   folder: each tool gets its own raw and preprocessed folders.
2. Creates a separate virtual environment with ``pip install nnunetv2`` (once; reused), never a
   dependency of autossl.
3. Runs ``autossl_plan_and_preprocess -d 4 -np N`` (2d and 3d_fullres) and
   ``nnUNetv2_plan_and_preprocess -d 4 -np N -c 2d 3d_fullres`` in the same run, each from empty
   preprocessed folders, alternating which goes first when repeated, and measures the wall time
   and the peak resident memory of the whole process tree (the sum of VmRSS of the command and all
   its descendants, sampled from /proc every 0.05 s; PSS, which counts shared pages once, is
   sampled too).
4. Checks both outputs (260 cases per configuration) and compares the preprocessed arrays of a few
   cases between the tools, prints a table with the ratios autossl / nnU-Net and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASK = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
DATASET = "Dataset004_Hippocampus"
CONFIGS = ("2d", "3d_fullres")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------
# process-tree memory from /proc
# ----------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


TICKS = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """user + system CPU seconds of one process so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak of the summed RSS (every ``interval`` s) and PSS (every 4th sample) of a process tree."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per process
        self._stop_evt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_evt.is_set():
            pids = _tree(self.pid)
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in pids))
            if i % 4 == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
            self.peak_procs = max(self.peak_procs, len(pids))
            for p in pids:
                self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu(p))
            self.samples += 1
            i += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


def measure(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; wall time and peak tree memory. Raises SystemExit when it fails."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(log.parent))
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{tail}\n(full log: {log})")
    cpu = sum(sampler.cpu.values())  # CPU seconds of the tree as last sampled (load-independent-ish)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": sampler.peak_rss / 1e9, "peak_pss_gb": sampler.peak_pss / 1e9,
            "peak_processes": sampler.peak_procs, "samples": sampler.samples}


# ----------------------------------------------------------------------------------------------
# data and environments
# ----------------------------------------------------------------------------------------------
def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def build_raw(raw_root: Path) -> Path:
    """Dataset004_Hippocampus in ``raw_root`` (converted once)."""
    out = raw_root / DATASET
    n_task = _count(TASK / "labelsTr", "hippocampus_*.nii.gz")
    if (out / "dataset.json").is_file() and _count(out / "labelsTr", "*.nii.gz") == n_task:
        return out
    if out.exists():
        shutil.rmtree(out)
    raw_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, autossl_raw=str(raw_root))
    if (REPO / "dataset_conversion" / "convert_msd.py").is_file():
        subprocess.run([sys.executable, "-m", "dataset_conversion.convert_msd", "-i", str(TASK), "-d", "4",
                        "--name", "Hippocampus"], env=env, cwd=str(REPO), check=True, stdout=subprocess.DEVNULL)
    else:  # inline: MSD Task04 is one channel, NIfTI already
        (out / "imagesTr").mkdir(parents=True)
        (out / "labelsTr").mkdir()
        labels = sorted(p.name for p in (TASK / "labelsTr").glob("hippocampus_*.nii.gz"))
        for c in labels:
            shutil.copy(TASK / "imagesTr" / c, out / "imagesTr" / c.replace(".nii.gz", "_0000.nii.gz"))
            shutil.copy(TASK / "labelsTr" / c, out / "labelsTr" / c)
        (out / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
            "numTraining": len(labels), "file_ending": ".nii.gz", "name": "Hippocampus"}, indent=2))
    return out


def nnunet_venv(venv: Path) -> Path:
    """A virtual environment with nnunetv2, created once; returns its bin folder."""
    exe = venv / "bin" / "nnUNetv2_plan_and_preprocess"
    if not exe.is_file():
        print(f"creating {venv} with nnunetv2 (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "nnunetv2"], check=True)
    return venv / "bin"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "autossl_"))}
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _version(python: Path, module: str) -> str:
    r = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version('{module}'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "?"


# ----------------------------------------------------------------------------------------------
# output checks
# ----------------------------------------------------------------------------------------------
def check_outputs(pre: Path, plans_name: str) -> dict:
    plans = json.loads((pre / DATASET / f"{plans_name}.json").read_text())
    out = {}
    for c in CONFIGS:
        cfg = plans["configurations"][c]
        folder = pre / DATASET / cfg["data_identifier"]
        out[c] = {"cases": _count(folder, "*.pkl"), "spacing": cfg["spacing"], "patch_size": cfg["patch_size"],
                  "batch_size": cfg["batch_size"], "data_identifier": cfg["data_identifier"]}
    return out


def compare_arrays(pre_a: Path, plans_a: str, pre_b: Path, plans_b: str, n: int = 5) -> dict:
    """Max |difference| of the preprocessed data and equality of the segs for the first ``n`` cases."""
    import blosc2
    import numpy as np

    pa = json.loads((pre_a / DATASET / f"{plans_a}.json").read_text())["configurations"]
    pb = json.loads((pre_b / DATASET / f"{plans_b}.json").read_text())["configurations"]
    out = {}
    for c in CONFIGS:
        fa, fb = pre_a / DATASET / pa[c]["data_identifier"], pre_b / DATASET / pb[c]["data_identifier"]
        cases = sorted(p.name[:-4] for p in fb.glob("*.pkl"))[:n]
        diff, seg_equal, shapes_equal = 0.0, True, True
        for case in cases:
            da, db = blosc2.open(str(fa / f"{case}.b2nd"))[:], blosc2.open(str(fb / f"{case}.b2nd"))[:]
            sa, sb = blosc2.open(str(fa / f"{case}_seg.b2nd"))[:], blosc2.open(str(fb / f"{case}_seg.b2nd"))[:]
            if da.shape != db.shape:
                shapes_equal = False
                continue
            diff = max(diff, float(np.abs(da.astype(np.float64) - db).max()))
            seg_equal &= bool(np.array_equal(sa.astype(np.int16), sb.astype(np.int16)))
        out[c] = {"cases_compared": len(cases), "shapes_equal": shapes_equal, "max_abs_diff_data": diff,
                  "seg_equal": seg_equal}
    return out


# ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "autossl_bench_preprocess")
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "autossl_bench" / "nnunet_venv",
                    help="virtual environment for nnunetv2 (created once, reused)")
    ap.add_argument("--np", type=int, default=2, help="-np for both tools")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool (the median is reported)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: <workdir>/results.json)")
    ap.add_argument("--skip-nnunet", action="store_true", help="time autossl only (no ratio)")
    ap.add_argument("--nnunet-npfp", type=int, default=None,
                    help="pass -npfp N to nnU-Net (default: not passed, i.e. nnU-Net's 8 fingerprint workers, "
                         "as the protocol's command)")
    a = ap.parse_args()
    if not TASK.is_dir():
        raise SystemExit(f"{TASK}: MSD Task04_Hippocampus not found")
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    tools = {"autossl": {"raw": work / "autossl_raw", "pre": work / "autossl_preprocessed",
                         "res": work / "autossl_results", "plans": "autosslPlans"}}
    if not a.skip_nnunet:
        tools["nnunet"] = {"raw": work / "nnunet_raw", "pre": work / "nnunet_preprocessed",
                           "res": work / "nnunet_results", "plans": "nnUNetPlans"}
    for t in tools.values():
        build_raw(t["raw"])

    bindir = Path(sys.executable).parent
    tools["autossl"]["cmd"] = [str(bindir / "autossl_plan_and_preprocess"), "-d", "4", "-np", str(a.np)]
    tools["autossl"]["env"] = dict(_clean_env(), autossl_raw=str(tools["autossl"]["raw"]),
                                   autossl_preprocessed=str(tools["autossl"]["pre"]),
                                   autossl_results=str(tools["autossl"]["res"]))
    tools["autossl"]["version"] = _version(Path(sys.executable), "autossl")
    if "nnunet" in tools:
        nbin = nnunet_venv(a.venv.resolve())
        tools["nnunet"]["cmd"] = [str(nbin / "nnUNetv2_plan_and_preprocess"), "-d", "4", "-np", str(a.np),
                                  "-c", *CONFIGS]
        if a.nnunet_npfp is not None:
            tools["nnunet"]["cmd"] += ["-npfp", str(a.nnunet_npfp)]
        tools["nnunet"]["env"] = dict(_clean_env(), nnUNet_raw=str(tools["nnunet"]["raw"]),
                                      nnUNet_preprocessed=str(tools["nnunet"]["pre"]),
                                      nnUNet_results=str(tools["nnunet"]["res"]))
        tools["nnunet"]["version"] = _version(nbin / "python", "nnunetv2")

    runs: dict[str, list[dict]] = {k: [] for k in tools}
    for r in range(a.repeats):
        order = list(tools) if r % 2 == 0 else list(tools)[::-1]
        for name in order:
            t = tools[name]
            if t["pre"].exists():
                shutil.rmtree(t["pre"])
            t["pre"].mkdir(parents=True)
            m = measure(t["cmd"], t["env"], work / f"{name}_run{r}.log")
            runs[name].append(m)
            print(f"run {r} {name:8s} wall {m['wall_s']:6.1f} s  CPU {m['cpu_s']:6.1f} s  peak RSS {m['peak_rss_gb']:.2f} GB  "
                  f"peak PSS {m['peak_pss_gb']:.2f} GB  processes {m['peak_processes']}", flush=True)

    summary = {}
    for name, ms in runs.items():
        summary[name] = {k: statistics.median(m[k] for m in ms) for k in ("wall_s", "cpu_s", "peak_rss_gb", "peak_pss_gb")}
        summary[name]["outputs"] = check_outputs(tools[name]["pre"], tools[name]["plans"])
    result = {
        "benchmark": "plan_and_preprocess Dataset004_Hippocampus (260 cases), 2d + 3d_fullres",
        "np": a.np, "repeats": a.repeats, "cpu_count": os.cpu_count(),
        "commands": {k: " ".join(Path(t["cmd"][0]).name if i == 0 else x for i, x in enumerate(t["cmd"]))
                     for k, t in tools.items()},
        "versions": {k: t["version"] for k, t in tools.items()},
        "runs": runs, "median": summary,
    }
    if "nnunet" in tools:
        result["ratio_autossl_over_nnunet"] = {
            k: summary["autossl"][k] / summary["nnunet"][k] for k in ("wall_s", "cpu_s", "peak_rss_gb", "peak_pss_gb")}
        result["arrays_vs_nnunet"] = compare_arrays(tools["autossl"]["pre"], "autosslPlans",
                                                    tools["nnunet"]["pre"], "nnUNetPlans")

    print()
    print("| tool | wall (s) | CPU, tree (s) | peak RSS, tree (GB) | peak PSS, tree (GB) | cases 2d / 3d_fullres |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in summary.items():
        o = s["outputs"]
        print(f"| {name} {result['versions'][name]} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_gb']:.2f} | "
              f"{s['peak_pss_gb']:.2f} | {o['2d']['cases']} / {o['3d_fullres']['cases']} |")
    if "ratio_autossl_over_nnunet" in result:
        q = result["ratio_autossl_over_nnunet"]
        print(f"| ratio autossl / nnU-Net | {q['wall_s']:.2f} | {q['cpu_s']:.2f} | {q['peak_rss_gb']:.2f} | "
              f"{q['peak_pss_gb']:.2f} | |")
        print("arrays vs nnU-Net:", json.dumps(result["arrays_vs_nnunet"]))
    out = a.out or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
