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

A pre-training checkpoint (``autossl_pretrain``: ``fold_all/checkpoint_final.pth`` of
``autosslPretrainer_<method>__<plans>__<config>``) holds only the planned U-Net's encoder: its
weights go into the encoder of every CNN of the run (supervised and semi-supervised alike, the
decoder and the segmentation heads stay at their initialisation, transformers are left as they
are), and the log names what was loaded and what was not. A transformer pre-training
(``autossl_pretrain --network transformer``, ``autosslPretrainer_<method>_transformer__...``)
holds the planned transformer's patch embedding and blocks (``down_projection.*``, ``eva.*``):
they go into every transformer of the run, whose decoder (``up_projection.*``) stays at its
initialisation, and CNNs are left as they are. Another network class, or encoder keys or shapes
that differ (other plans, channels or configuration), is an error.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from autossl.components.ema import unwrap
from autossl.components.errors import TrainingError
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


def is_encoder_only_source(source: str | os.PathLike, fold) -> bool:
    """Whether ``-pretrained_weights`` names a self-supervised pre-training (an encoder only:
    the decoder and heads start untrained, so the run still needs its supervised warm start)
    rather than a trained segmentation network."""
    return is_pretraining_checkpoint(_read_checkpoint(resolve_checkpoint(source, fold)))


def _read_checkpoint(path: Path):
    try:
        return load_torch_safely(path)
    except UnsafeCheckpointError as e:
        raise TrainingError(f"-pretrained_weights {e}") from None


def read_source_networks(path: Path, ckpt=None) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """({name: state_dict}, {name: arch}, inference network names) of an autossl checkpoint
    (read from ``path`` unless given); a checkpoint with only ``network_weights`` (nnU-Net's)
    counts as one cnn named "network"."""
    if ckpt is None:
        ckpt = _read_checkpoint(path)
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


def is_pretraining_checkpoint(ckpt) -> bool:
    return isinstance(ckpt, dict) and "pretraining" in ckpt and "encoder" in ckpt


def _encoder_key(key: str) -> str | None:
    """The ``encoder.*`` key a U-Net state-dict key stands for (dynamic_network_architectures
    registers the encoder twice: ``encoder.*`` and ``decoder.encoder.*``); None for the rest."""
    if key.startswith("encoder."):
        return key
    if key.startswith("decoder.encoder."):
        return key[len("decoder."):]
    return None


#: decoder keys that a whole-network pre-training never holds: the heads, and the encoder's
#: second registration (``decoder.encoder.*``, loaded from ``encoder.*``)
_NOT_PRETRAINED_DECODER = ("decoder.seg_layers.", "decoder.encoder.")


def _pretrained_decoder_key(key: str) -> bool:
    return key.startswith("decoder.") and not key.startswith(_NOT_PRETRAINED_DECODER)


def load_encoder_weights(net, encoder_state: dict[str, "torch.Tensor"], what: str) -> tuple[list[str], list[str]]:
    """Load an ``encoder.*`` state dict into the encoder of ``net``, and its ``decoder.*`` keys
    (a whole-network pre-training such as ``mae``) into the decoder but its segmentation heads;
    (loaded, left) target keys. Missing, unexpected or differently shaped keys raise
    ``TrainingError``."""
    target = net.state_dict()
    enc_target = {k: v for k, v in target.items() if k.startswith("encoder.")}
    if not enc_target:
        raise TrainingError(f"{what}: {type(net).__name__} has no encoder to load the pre-trained encoder into")
    with_decoder = any(k.startswith("decoder.") for k in encoder_state)
    expected = dict(enc_target)
    if with_decoder:
        expected.update({k: v for k, v in target.items() if _pretrained_decoder_key(k)})
    problem = _mismatch(expected, encoder_state)
    if problem:
        raise TrainingError(problem)
    new, loaded, left = dict(target), [], []
    for k, v in target.items():
        src = _encoder_key(k) or (k if with_decoder and _pretrained_decoder_key(k) else None)
        if src is not None:
            new[k] = encoder_state[src].to(v.dtype)
            loaded.append(k)
        else:
            left.append(k)
    net.load_state_dict(new)
    return loaded, left


#: top-level modules of Primus / Primus2D that a transformer pre-training holds
TRANSFORMER_ENCODER_PARTS = ("down_projection", "eva", "register_tokens")


def load_transformer_encoder_weights(net, encoder_state: dict[str, "torch.Tensor"],
                                     what: str) -> tuple[list[str], list[str]]:
    """Load a transformer pre-training's ``down_projection.*`` / ``eva.*`` state dict into the
    planned transformer ``net``; (loaded, left) target keys. Missing, unexpected or differently
    shaped keys raise ``TrainingError``."""
    target = net.state_dict()
    enc_target = {k: v for k, v in target.items() if k.split(".")[0] in TRANSFORMER_ENCODER_PARTS}
    if not enc_target:
        raise TrainingError(f"{what}: {type(net).__name__} has no patch embedding / EVA blocks to load into")
    problem = _mismatch(enc_target, encoder_state)
    if problem:
        raise TrainingError(problem)
    new = dict(target)
    for k in enc_target:
        new[k] = encoder_state[k].to(target[k].dtype)
    net.load_state_dict(new)
    return list(enc_target), [k for k in target if k not in enc_target]


ENCODER_LOADERS = {"cnn": (load_encoder_weights, "encoder.*, decoder.encoder.*"),
                   "transformer": (load_transformer_encoder_weights, "down_projection.*, eva.*")}


def _load_pretraining(trainer, path: Path, ckpt: dict) -> dict[str, str]:
    kind = ckpt.get("network", "cnn")
    if kind not in ENCODER_LOADERS:
        raise TrainingError(f"-pretrained_weights {path}: a pre-training of an unknown network kind {kind!r}")
    loader, keys = ENCODER_LOADERS[kind]
    arch = trainer.cfg.get("architecture" if kind == "cnn" else "transformer_architecture") or {}
    src_cls = (ckpt.get("architecture") or {}).get("network_class_name")
    where = (f"-pretrained_weights {path} (pre-trained with {ckpt.get('method')!r} on plans "
             f"{ckpt.get('plans_identifier')!r}, configuration {ckpt.get('configuration')!r})")
    if src_cls and src_cls != arch.get("network_class_name"):
        raise TrainingError(f"{where}: its encoder is of {src_cls}, this run's {kind} is "
                            f"{arch.get('network_class_name')}; pre-train with the plans of this run "
                            f"({trainer.plans_identifier!r}, {trainer.configuration!r})")
    chosen, report = {}, []
    for spec in trainer.specs:
        if spec.arch != kind:
            report.append(f"{spec.name} ({spec.arch}): left at initialisation (the checkpoint holds a {kind} encoder)")
            continue
        net = unwrap(trainer.networks[spec.name])
        try:
            loaded, left = loader(net, ckpt["encoder"], where)
        except TrainingError as e:
            raise TrainingError(f"{where} does not fit network {spec.name!r} of plans {trainer.plans_identifier!r}, "
                                f"configuration {trainer.configuration!r} ({e}); pre-train with the same plans, "
                                f"configuration and channels") from None
        tops = sorted({k.split(".")[0] + "." + k.split(".")[1] if k.count(".") > 1 else k for k in left})
        if any(_pretrained_decoder_key(k) for k in loaded):
            keys = "encoder.*, decoder.* but the segmentation heads"
        report.append(f"{spec.name} <- encoder ({len(loaded)} tensors: {keys}); "
                      f"left at initialisation {len(left)} tensors ({', '.join(tops[:6])}"
                      f"{', ...' if len(tops) > 6 else ''})")
        chosen[spec.name] = "encoder"
    if not chosen:
        raise TrainingError(f"{where}: this run ({trainer.ssl}) has no {kind} network to take the pre-trained "
                            f"encoder" + (" (train with --network transformer, or --ssl semi_vit)"
                                          if kind == "transformer" else ""))
    trainer.logger.print(f"pre-trained encoder from {path}: " + "; ".join(report))
    return chosen


def load_pretrained_weights(trainer, source: str | os.PathLike) -> dict[str, str]:
    """Load ``source`` into every network of ``trainer``; returns {network: source network} and
    logs what was loaded. Call after ``initialize`` and before training."""
    path = resolve_checkpoint(source, trainer.fold)
    ckpt = _read_checkpoint(path)
    if is_pretraining_checkpoint(ckpt):
        return _load_pretraining(trainer, path, ckpt)
    nets, archs, inference = read_source_networks(path, ckpt)
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


def default_pretrain_hint(specs) -> str:
    """The note a run without ``-pretrained_weights`` prints when its method names none: the
    stage's masked autoencoder when every network is a planned U-Net (measured on A2D-3,
    ``documentation/pretraining.md``), SimMIM when every network is the planned transformer."""
    archs = {s.arch for s in specs}
    if archs == {"cnn"}:
        return ("the U-Net starts from random weights. A masked-autoencoder pre-training of the whole U-Net on "
                "every image, 'autossl_pretrain DATASET CONFIG --method mae' (a few minutes), then "
                "-pretrained_weights on its folder, lifted supervised and CPS-CutMix runs with 3 labelled "
                "patients (documentation/pretraining.md)")
    if archs == {"transformer"}:
        return ("the transformer starts from random weights: 'autossl_pretrain DATASET CONFIG --method simmim "
                "--network transformer', then -pretrained_weights on its folder (documentation/pretraining.md)")
    return ""
