"""Loader workers end with the trainer whatever ends it; SIGTERM stops training between two steps
with an intact checkpoint that ``--c`` continues from.

The trainer runs as ``autossl_train`` would (``python -m autossl.cli.train``, 2 loader workers)
on the tiny synthetic 2D dataset of test_training.py. Processes are found through /proc (Linux).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_training import TINY, prepare_dataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie has ended (nobody reaped it yet)


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("lifetime"), 953, two_d=True)


@pytest.fixture
def ds(prepared, monkeypatch, tmp_path):
    for k, v in prepared["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("autossl_results", str(tmp_path / "results"))
    return prepared


def _start_training(ds: dict, tmp_path: Path, epochs: int = 200):
    out = Path(os.environ["autossl_results"]) / ds["name"] / f"autosslTrainer__{TINY}__2d" / "fold_all"
    cmd = [sys.executable, "-m", "autossl.cli.train", str(ds["id"]), "2d", "all", "-p", TINY, "-device", "cpu",
           "--epochs", str(epochs), "--iterations-per-epoch", "3", "--val-iterations", "1", "--num-workers", "2",
           "--save-every", "1"]
    log = open(tmp_path / "train.log", "wb")
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    latest = out / "checkpoint_latest.pth"
    deadline = time.time() + 180
    workers: list[int] = []
    # the first epoch's checkpoint: by then the training and the validation workers have started
    while proc.poll() is None and time.time() < deadline:
        if latest.exists():
            workers = [p for p in _descendants(proc.pid) if _alive(p)]
            if len(workers) >= 3:
                break
        time.sleep(0.05)
    log.close()
    assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
    assert len(workers) >= 3, (workers, (tmp_path / "train.log").read_text()[-3000:])
    return proc, out, workers


def test_sigkill_of_the_trainer_ends_its_loader_workers(ds, tmp_path):
    proc, _, workers = _start_training(ds, tmp_path)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left = _wait_gone(workers, 3.0)
    finally:
        for p in _descendants(proc.pid) + workers:  # never leave a process behind, even when failing
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    assert left == [], f"loader workers {left} outlived the killed trainer"


def test_sigterm_stops_between_steps_and_c_continues(ds, tmp_path):
    import torch

    from autossl.components.checkpoint import load_checkpoint
    from autossl.training.trainer import Trainer

    proc, out, workers = _start_training(ds, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        left = _wait_gone(workers, 3.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    log = (tmp_path / "train.log").read_text()
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    assert left == [], f"loader workers {left} outlived the stopped trainer"
    assert "SIGTERM received: training stopped after step" in log and "Traceback" not in log, log[-3000:]
    latest = out / "checkpoint_latest.pth"
    ckpt = load_checkpoint(latest)  # whole, and loads with weights_only=True
    stopped = ckpt["current_step"]
    assert f"training stopped after step {stopped};" in log and f"written at step {stopped}/600" in log
    assert not (out / "checkpoint_final.pth").exists()
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")], "temporary files left behind"
    epochs_done = len(ckpt["logging"]["history"]["train_loss"])
    assert epochs_done == stopped // 3 >= 1

    # --c with a shorter run: continues at the step it stopped at, mid-epoch or not
    epochs = stopped // 3 + 2
    t = Trainer(ds["id"], "2d", "all", plans=TINY, verbose=False, epochs=epochs, iterations_per_epoch=3,
                val_iterations=1, num_workers=0, device="cpu")
    t.run(continue_training=True)
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_step"] == 3 * epochs
    hist = final["logging"]["history"]
    assert hist["step"] == [3 * (i + 1) for i in range(epochs)]
    assert hist["train_loss"][:epochs_done] == ckpt["logging"]["history"]["train_loss"]
    assert any(f"continuing from {latest} at step {stopped}/" in f.read_text()
               for f in out.glob("training_log_*.txt"))


def test_a_worker_whose_parent_dies_exits_without_the_kernel_signal(tmp_path):
    """The parent-pid watch alone (where prctl is not available), in a forked grandchild."""
    code = (
        "import os, sys, time\n"
        "from autossl.utilities.lifetime import exit_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    exit_with_parent(parent, use_prctl=False, interval=0.05)\n"
        "    time.sleep(60)\n"
        "    os._exit(3)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        time.sleep(0.3)
        assert _alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        left = _wait_gone([child], 3.0)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
    assert left == []
