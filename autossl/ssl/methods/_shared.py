"""Small helpers shared by the method plug-ins in this folder (no method is registered here)."""
from __future__ import annotations

from typing import Any

import torch

from autossl.components.augmentation.strong import box_mask, cutmix, device_generator
from autossl.components.losses import ce_loss, soft_dice_loss
from autossl.ssl.context import TrainingContext, main_output
from autossl.ssl.pseudo_label_cleaning import keep_largest_components
from autossl.ssl.ramps import sigmoid_rampup


def cpu_generator(ctx: TrainingContext) -> torch.Generator:
    """A CPU generator for the method's scalar draws (boxes, choices): ``ctx.rng`` when it is a
    CPU generator, else one seeded from it (deterministic), else torch's default generator."""
    g = ctx.rng
    if g is None:
        return torch.default_generator
    if g.device.type == "cpu":
        return g
    cpu = torch.Generator()
    cpu.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=g, device=g.device).item()))
    return cpu


def randn_like(x: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``ctx.rng`` (on ``x``'s device)."""
    if ctx.rng is None:
        return torch.randn_like(x)
    g = device_generator(ctx.rng, x.device)
    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def input_noise(x: torch.Tensor, ctx: TrainingContext, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """Mean-teacher input noise clamp(N(0, std^2), -clip, clip)."""
    return torch.clamp(randn_like(x, ctx) * std, -clip, clip)


def split_output(output: Any, n: int) -> tuple[Any, Any]:
    """Split a network output (a tensor or a deep-supervision list) along the batch at ``n``."""
    if isinstance(output, (list, tuple)):
        return [o[:n] for o in output], [o[n:] for o in output]
    return output[:n], output[n:]


#: automatic ramp-up (share of the semi-supervised phase) after a warm start: a network trained on
#: the labels predicts usable pseudo-labels at once, so the unsupervised terms reach their weight
#: early instead of spending the phase at a fraction of it
WARM_RAMPUP = 0.1


def rampup_option(method, cold: float, warm: float = WARM_RAMPUP) -> float | tuple[float, float]:
    """The ``rampup`` option (a share of the semi-supervised phase). Unset: ``warm`` when the run
    is warm-started, ``cold`` (the method's from-scratch ramp) when it is not; ``ramp_weight``
    picks one."""
    v = method.options.get("rampup")
    if v is None:
        return (float(cold), float(warm))
    v = float(v)
    if v < 0:
        raise ValueError(f"--ssl {method.name}: rampup must be >= 0, got {v}")
    return v


def warm_default(method, key: str, cold: float, warm: float) -> float | tuple[float, float]:
    """A weight option whose default depends on the start: unset, (``cold``, ``warm``), of which
    ``ramp_weight`` takes ``warm`` in a warm-started run; given, that value in every run (>= 0)."""
    v = method.options.get(key)
    if v is None:
        return (float(cold), float(warm))
    v = float(v)
    if not v >= 0:
        raise ValueError(f"--ssl {method.name}: {key} must be >= 0, got {v}")
    return v


def ramp_weight(lambda_max, rampup_fraction, ctx: TrainingContext) -> float:
    """λ(t) = λ_max · sigmoid_rampup(t, T), t counted from the start of the semi-supervised phase
    (after the supervised warm start), T = ``rampup_fraction`` of that phase (0: no ramp). A
    (cold, warm) pair from ``rampup_option`` takes ``warm`` in a warm-started run."""
    if isinstance(rampup_fraction, tuple):
        rampup_fraction = rampup_fraction[1] if ctx.warm_started else rampup_fraction[0]
    if isinstance(lambda_max, tuple):  # a (cold, warm) default from ``warm_default``
        lambda_max = lambda_max[1] if ctx.warm_started else lambda_max[0]
    steps = int(round(rampup_fraction * ctx.ssl_total_steps))
    return lambda_max * sigmoid_rampup(ctx.ssl_step, steps)


def clean_option(method) -> bool:
    """The ``clean`` option (default true): hard pseudo-labels keep only the largest connected
    component of the foreground, when the labelled cases show it to be one structure, and of each
    class they show to be one structure (``autossl.ssl.pseudo_label_cleaning``)."""
    return method.option("clean", True)


def clean_pseudo_labels(labels: torch.Tensor, ctx: TrainingContext, enabled: bool = True) -> torch.Tensor:
    """Hard pseudo-labels (B, 1, *spatial) with the other components of the foreground, when it
    is one structure (``ctx.single_component_foreground``), then of every single-structure class
    (``ctx.single_component_classes``) set to background; unchanged when ``enabled`` is
    false or no class qualifies. Logs ``pl_cleaned``, the share of voxels changed."""
    if not enabled or not (ctx.single_component_classes or ctx.single_component_foreground):
        return labels
    cleaned = keep_largest_components(labels, ctx.single_component_classes,
                                      foreground=ctx.single_component_foreground)
    ctx.log("pl_cleaned", (cleaned != labels).float().mean())
    return cleaned


def sharpen(probs: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """Temperature sharpening p_c^(1/T) / Σ_k p_k^(1/T) along ``dim`` (MixMatch, PseudoSeg, PAWS);
    T = 1 leaves p as it is, T -> 0 tends to the one-hot argmax. Computed in log space."""
    if not temperature > 0:
        raise ValueError(f"sharpening temperature must be > 0, got {temperature}")
    return torch.softmax(torch.log(probs.float().clamp_min(1e-12)) / temperature, dim)


def is_distributed() -> bool:
    """A DDP run with more than one process (a method's own modules then sync by hand)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def supervised_loss_only(net, labeled: dict, ctx: TrainingContext) -> torch.Tensor:
    """L_s of ``net`` on the labelled batch alone (a step without unlabelled images), logged as
    ``loss_sup``."""
    with ctx.autocast():
        loss = ctx.supervised_loss(net(labeled["data"]), labeled["target"])
    ctx.log("loss_sup", loss)
    return loss


def has_unlabeled(unlabeled: dict | None) -> bool:
    return unlabeled is not None and unlabeled.get("data") is not None and unlabeled["data"].shape[0] > 0


def require_label_maps(target, method: str) -> None:
    """Softmax / argmax pseudo-labels need label-map targets (B, 1, *), not region channels."""
    t = target[0] if isinstance(target, (list, tuple)) else target
    if t.shape[1] != 1:
        raise ValueError(f"--ssl {method}: targets have {t.shape[1]} channels (a region-based dataset.json); "
                         f"this method's softmax/argmax terms need a plain label map")


def check_choice(method: str, key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"--ssl {method}: option {key}={value!r} must be one of {', '.join(allowed)}")
    return value


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, dice: bool = False) -> torch.Tensor:
    """CE of ``logits`` against hard pseudo-labels; with ``dice``, plus the soft Dice over the
    batch (foreground classes), so that a structure weighs as much as the background around it."""
    loss = ce_loss(logits, labels)
    if dice:
        loss = loss + soft_dice_loss(logits, labels, batch_dice=True)
    return loss


def cutmix_fraction_option(method) -> tuple[float, float]:
    """The ``cutmix_min`` / ``cutmix_max`` options (0.25 / 0.5): the share of the patch a CutMix
    box covers, checked to satisfy 0 < min <= max <= 1."""
    fraction = (method.option("cutmix_min", 0.25), method.option("cutmix_max", 0.5))
    if not 0 < fraction[0] <= fraction[1] <= 1:
        raise ValueError(f"--ssl {method.name}: need 0 < cutmix_min <= cutmix_max <= 1, got {fraction}")
    return fraction


def cutmix_partners(x_u: torch.Tensor, x_l: torch.Tensor, ctx: TrainingContext, fraction: tuple[float, float]):
    """CutMix pairing of an unlabelled batch: every image is mixed under a random box with the
    next one (a single unlabelled image with the first labelled one). Returns (pool of source
    images, partner index into the pool, box mask (Bu, 1, *spatial)); ``cutmix(t[:Bu],
    t[partner], mask)`` mixes anything computed on the pool (images, labels, probabilities)."""
    pool = x_u if x_u.shape[0] >= 2 else torch.cat([x_u, x_l[:1]])
    n_u = x_u.shape[0]
    mask = box_mask(n_u, x_u.shape[2:], fraction, cpu_generator(ctx), x_u.device)
    partner = (torch.arange(n_u, device=x_u.device) + 1) % pool.shape[0]
    return pool, partner, mask


def mixed_source_labels(scores: torch.Tensor, n_u: int, partner: torch.Tensor, box: torch.Tensor,
                        ctx: TrainingContext, clean: bool) -> torch.Tensor:
    """Hard labels of CutMix views from a network's scores (logits or probabilities) of the
    unmixed sources: argmax and cleaning per source, then mixed under the box. Cleaning after the
    mix would see two hearts in one patch and erase the smaller as a stray component."""
    labels = clean_pseudo_labels(scores.argmax(1, keepdim=True), ctx, clean)
    return cutmix(labels[:n_u], labels[partner], box)


def cutmix_pseudo_batch(networks, x_u: torch.Tensor, x_l: torch.Tensor, ctx: TrainingContext,
                        fraction: tuple[float, float], clean: bool = True, strong: bool = False):
    """CutMix of the unlabelled images and of each network's hard pseudo-labels of them (CPS's
    CutMix variant, pairs from ``cutmix_partners``): the pseudo-labels come from each network's
    prediction of the unmixed sources (no gradient; cleaned with ``clean``) and are mixed under
    the same box as the images. With ``strong`` the mixed images then get ``ctx.strong_augment``
    (the labels stay those of the unaugmented sources). Returns (mixed images, [pseudo-labels
    per network])."""
    n_u = x_u.shape[0]
    pool, partner, mask = cutmix_partners(x_u, x_l, ctx, fraction)
    with torch.no_grad(), ctx.autocast():
        labels = [mixed_source_labels(main_output(net(pool)).detach(), n_u, partner, mask, ctx, clean)
                  for net in networks]
    mixed = cutmix(pool[:n_u], pool[partner], mask)
    if strong:
        mixed = ctx.strong_augment(mixed)
    return mixed, labels
