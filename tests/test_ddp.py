"""DDP on the CPU: two gloo processes train the same run and end with identical weights."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_training import TINY, prepare_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, env: dict, dataset_id: int, out: str) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "autossl_n_proc_DA": "0"})
    torch.set_num_threads(1)
    from autossl.components.ema import unwrap
    from autossl.training import ddp
    from autossl.training.trainer import Trainer

    t = Trainer(dataset_id, "2d", "all", plans=TINY, ssl="mean_teacher", device="cpu", epochs=2,
                iterations_per_epoch=3, val_iterations=1, num_workers=0, verbose=False)
    t.run()
    torch.save({"batch_size": t.batch_size, "unlabeled_batch_size": t.unlabeled_batch_size,
                "world": t.dist.world_size, "step": t.current_step,
                "student": unwrap(t.networks["student"]).state_dict(),
                "teacher": unwrap(t.networks["teacher"]).state_dict()}, Path(out) / f"rank{rank}.pt")
    ddp.destroy()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("ddp"), 961, two_d=True)


def test_two_gloo_ranks_end_with_identical_parameters(prepared, tmp_path):
    env = dict(prepared["env"], autossl_results=str(tmp_path / "results"))
    mp.spawn(_worker, args=(2, _free_port(), env, prepared["id"], str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == 6
    assert r0["batch_size"] + r1["batch_size"] == 2  # the plans' batch size is global
    for net in ("student", "teacher"):
        assert r0[net].keys() == r1[net].keys()
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), f"{net}.{k} differs between ranks"
    out = tmp_path / "results" / prepared["name"] / f"autosslTrainer_mean_teacher__{TINY}__2d" / "fold_all"
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_step"] == 6
    for k, v in ckpt["networks"]["student"].items():  # rank 0 saved the shared weights
        assert torch.equal(v, r0["student"][k])
    assert len(list(out.glob("training_log_*.txt"))) == 1  # only rank 0 logs
