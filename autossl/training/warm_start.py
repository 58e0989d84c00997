"""``autossl_train ... -pretrained_weights PATH``: start every network of a run from the weights
of an earlier run of the same plans (nnU-Net v2's ``-pretrained_weights``).

PATH is a checkpoint file or a results folder: a trainer folder (``<trainer>__<plans>__<config>``,
whose ``fold_<this fold>`` or ``fold_all`` is used) or a fold folder; in a folder
``checkpoint_final.pth`` is taken. Each network of the method gets the source network of the same
architecture (``cnn`` or ``transformer``): the checkpoint's network of that name when it has one
(a UCMT run warm-starting a UCMT run), else its first inference network of that architecture (a
supervised run warm-starting any method: every CNN of CPS, UCMT or a mean teacher starts from the
supervised CNN). The file is read with ``torch.load(weights_only=True)``: nothing in it is
executed. A network whose keys or shapes differ (other plans, another architecture) is an error
naming the first differences.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from autossl.ssl.ema import unwrap
from autossl.training.errors import TrainingError
from autossl.utilities.file_io import UnsafeCheckpointError, load_torch_safely

CHECKPOINT = "checkpoint_final.pth"


def resolve_checkpoint(source: str | os.PathLike, fold) -> Path:
    """The checkpoint file that ``source`` names (see the module doc)."""
    p = Path(source)
    if p.is_file():
        return p
    if not p.is_dir():
        raise TrainingError(f"-pretrained_weights {p}: no such file or folder")
    for candidate in (p / CHECKPOINT, p / f"fold_{fold}" / CHECKPOINT, p / "fold_all" / CHECKPOINT):
        if candidate.is_file():
            return candidate
    raise TrainingError(f"-pretrained_weights {p}: holds no {CHECKPOINT} (looked in {p}, {p / f'fold_{fold}'} "
                        f"and {p / 'fold_all'}); train that run to the end first")


def read_source_networks(path: Path) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """({name: state_dict}, {name: arch}, inference network names) of an autossl checkpoint; a
    checkpoint with only ``network_weights`` (nnU-Net's) counts as one cnn named "network"."""
    try:
        ckpt = load_torch_safely(path)
    except UnsafeCheckpointError as e:
        raise TrainingError(f"-pretrained_weights {e}") from None
    if not isinstance(ckpt, dict) or not ("networks" in ckpt or "network_weights" in ckpt):
        raise TrainingError(f"-pretrained_weights {path}: not a training checkpoint (no 'networks' or "
                            f"'network_weights')")
    if "networks" in ckpt:
        nets = dict(ckpt["networks"])
        archs = {s["name"]: s["arch"] for s in ckpt.get("network_specs", [])}
        for inf in ckpt.get("inference_networks", []):
            archs.setdefault(inf["name"], inf["arch"])
        archs = {n: archs.get(n, "cnn") for n in nets}
        inference = [i["name"] for i in ckpt.get("inference_networks", [])] or list(nets)
    else:
        nets, archs, inference = {"network": ckpt["network_weights"]}, {"network": "cnn"}, ["network"]
    return nets, archs, inference


def _mismatch(target: dict, source: dict) -> str:
    missing = [k for k in target if k not in source]
    extra = [k for k in source if k not in target]
    shapes = [f"{k} {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in source and tuple(source[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing, e.g. {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[:3]}")
    if shapes:
        parts.append(f"{len(shapes)} shape(s) differ, e.g. {shapes[:2]}")
    return "; ".join(parts)


def load_pretrained_weights(trainer, source: str | os.PathLike) -> dict[str, str]:
    """Load ``source`` into every network of ``trainer``; returns {network: source network} and
    logs what was loaded. Call after ``initialize`` and before training."""
    path = resolve_checkpoint(source, trainer.fold)
    nets, archs, inference = read_source_networks(path)
    chosen: dict[str, str] = {}
    for spec in trainer.specs:
        if spec.name in nets and archs.get(spec.name) == spec.arch:
            src = spec.name
        else:
            same = [n for n in inference if archs.get(n) == spec.arch] or \
                   [n for n in nets if archs.get(n) == spec.arch]
            if not same:
                raise TrainingError(f"-pretrained_weights {path}: has no {spec.arch} network for {spec.name!r} "
                                    f"(it holds {', '.join(f'{n} ({a})' for n, a in archs.items())})")
            src = same[0]
        net = unwrap(trainer.networks[spec.name])
        target = net.state_dict()
        problem = _mismatch(target, nets[src])
        if problem:
            raise TrainingError(f"-pretrained_weights {path}: network {src!r} does not fit {spec.name!r} of plans "
                                f"{trainer.plans_identifier!r}, configuration {trainer.configuration!r} ({problem}); "
                                f"warm starts need a run of the same plans and architecture")
        net.load_state_dict({k: v.to(target[k].dtype) for k, v in nets[src].items()})
        chosen[spec.name] = src
    trainer.logger.print(f"pretrained weights from {path}: " +
                         ", ".join(f"{dst} <- {src} ({len(nets[src])} tensors)" for dst, src in chosen.items()))
    return chosen
