"""The classic semi-supervised plug-ins (mean teacher, UA-MT, CPS, FixMatch, self-training,
entropy minimisation) and the strong intensity augmentation: hand-computed unit cases on tiny
"networks", plus end-to-end training through the real trainer on a tiny synthetic dataset."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autossl.components.augmentation.strong import OPS, StrongIntensityAugment, box_mask, cutout, random_box
from autossl.components.losses import SupervisedLoss
from autossl.ssl.base import SSLMethod
from autossl.ssl.context import TrainingContext
from autossl.ssl.registry import available_methods, create_method

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def conv1x1(weight: list[float], bias: list[float], dim: int = 3) -> nn.Module:
    """A 1-channel -> C-class 1x1 conv with given weights: logits_c = w_c·x + b_c."""
    conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(1, len(weight), 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weight).view(-1, 1, *([1] * dim)))
        conv.bias.copy_(torch.tensor(bias))
    return conv


def zero_sup(output, target):
    """A supervised loss that contributes nothing (isolates the unsupervised term)."""
    out = output[0] if isinstance(output, (list, tuple)) else output
    return out.sum() * 0.0


def make_ctx(networks, *, step=0, total_steps=100, num_classes=2, supervised_loss=zero_sup,
             strong_augment=lambda x: x, seed=0, **kw) -> TrainingContext:
    return TrainingContext(networks=networks, total_steps=total_steps, num_classes=num_classes,
                           device=torch.device("cpu"), supervised_loss=supervised_loss,
                           strong_augment=strong_augment, step=step, rng=torch.Generator().manual_seed(seed), **kw)


def run_step(method: SSLMethod, labeled, unlabeled, ctx) -> list[torch.Tensor]:
    return list(method.training_step(labeled, unlabeled, ctx))


def np_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def labeled_batch(x: torch.Tensor, c: int = 2) -> dict:
    return {"data": x, "target": [torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.int16)], "keys": ["l"] * x.shape[0]}


# ----------------------------------------------------------------------------- registry
def test_all_classic_methods_are_registered_with_their_networks():
    names = set(available_methods())
    assert {"mean_teacher", "ua_mt", "cps", "cps_cutmix", "fixmatch", "self_training", "entropy_min"} <= names
    mt = create_method("mean_teacher")
    specs = {s.name: s for s in mt.network_specs()}
    assert specs["teacher"].copy_of == "student" and not specs["teacher"].trainable
    assert mt.inference_networks() == ["teacher"]
    assert create_method("mean_teacher", inference="student").inference_networks() == ["student"]
    cps = create_method("cps")
    assert [(s.name, s.seed_offset) for s in cps.network_specs()] == [("cnn1", 0), ("cnn2", 1)]
    assert cps.inference_networks() == ["cnn1", "cnn2"]
    assert create_method("cps", inference="cnn1").inference_networks() == ["cnn1"]
    assert create_method("cps_cutmix").cutmix and not create_method("cps").cutmix
    assert create_method("cps", cutmix="true").cutmix
    for name in ("mean_teacher", "ua_mt", "cps", "fixmatch", "self_training"):
        assert create_method(name).default_unlabeled_ratio == 1.0
    with pytest.raises(ValueError, match="inference"):
        create_method("mean_teacher", inference="nobody")


def test_region_targets_are_refused_with_a_clear_error():
    x = torch.zeros(1, 1, 2, 2, 2)
    regions = {"data": x, "target": [torch.zeros(1, 2, 2, 2, 2)], "keys": ["l"]}
    nets = {n: conv1x1([1.0, -1.0], [0.0, 0.0]) for n in ("student", "teacher", "cnn1", "cnn2")}
    for name in ("mean_teacher", "ua_mt", "cps", "cps_cutmix", "fixmatch", "self_training", "entropy_min"):
        with pytest.raises(ValueError, match=f"--ssl {name}.*region"):
            run_step(create_method(name), regions, {"data": x, "keys": ["u"]}, make_ctx(nets))


# ----------------------------------------------------------------------------- mean teacher
def test_ema_update_matches_formula_and_schedule():
    torch.manual_seed(0)
    student, teacher = nn.Conv3d(1, 2, 1), nn.Conv3d(1, 2, 1)
    mt = create_method("mean_teacher")
    for step, alpha in ((3, 0.75), (1000, 0.99), (0, 0.0)):
        s0 = [p.detach().clone() for p in student.parameters()]
        t0 = [p.detach().clone() for p in teacher.parameters()]
        mt.after_optimizer_step(make_ctx({"student": student, "teacher": teacher}, step=step))
        for s, t, new in zip(s0, t0, teacher.parameters()):
            torch.testing.assert_close(new.detach(), alpha * t + (1 - alpha) * s)
        with torch.no_grad():  # move the student so the next case is not trivial
            for p in student.parameters():
                p.add_(1.0)
    # at step 0 the teacher became the student exactly
    for s, t in zip(student.parameters(), teacher.parameters()):
        torch.testing.assert_close(t.detach(), s.detach() - 1.0)


def test_mean_teacher_consistency_equals_hand_computation():
    student, teacher = conv1x1([1.0, -1.0], [0.0, 0.5]), conv1x1([2.0, 0.0], [0.0, 0.0])
    xu = torch.tensor([-1.0, 0.0, 0.5, 2.0]).view(1, 1, 1, 2, 2)
    xl = torch.zeros(1, 1, 1, 2, 2)
    step, total = 30, 100
    mt = create_method("mean_teacher", noise_std=0.0)
    ctx = make_ctx({"student": student, "teacher": teacher}, step=step, total_steps=total)
    (loss,) = run_step(mt, labeled_batch(xl), {"data": xu, "keys": ["u"]}, ctx)
    x = xu.numpy().reshape(-1)
    ps = np_softmax(np.stack([1.0 * x + 0.0, -1.0 * x + 0.5], 0), 0)
    pt = np_softmax(np.stack([2.0 * x, 0.0 * x], 0), 0)
    mse = ((ps - pt) ** 2).mean()
    ramp = 0.1 * math.exp(-5 * (1 - step / total) ** 2)  # rampup = whole run by default
    assert loss.item() == pytest.approx(ramp * mse, rel=1e-5)
    logged = ctx.pop_logged()
    assert logged["loss_unsup"] == pytest.approx(mse, rel=1e-5)
    assert logged["ramp_weight"] == pytest.approx(ramp)
    assert "loss_sup" in logged
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


def test_mean_teacher_noise_is_clamped_and_independent_per_network():
    from autossl.ssl.methods._shared import input_noise
    ctx = make_ctx({})
    n = input_noise(torch.zeros(2000), ctx, std=1.0, clip=0.2)
    assert n.abs().max().item() == pytest.approx(0.2) and (n.abs() < 0.2).any()
    n = input_noise(torch.zeros(20000), ctx)
    assert 0.08 < n.std().item() < 0.1  # N(0, 0.1^2) clamped at 2 sigma
    # identical student and teacher: consistency 0 without noise, > 0 with separate noise draws
    net = conv1x1([3.0, -3.0], [0.0, 0.0])
    xu = torch.linspace(-1, 1, 8).view(1, 1, 2, 2, 2)
    for std, positive in ((0.0, False), (0.1, True)):
        ctx = make_ctx({"student": net, "teacher": copy.deepcopy(net)}, step=100)
        run_step(create_method("mean_teacher", noise_std=std), labeled_batch(xu), {"data": xu, "keys": ["u"]}, ctx)
        assert (ctx.pop_logged()["loss_unsup"] > 1e-6) == positive


def test_mean_teacher_strong_augment_perturbs_the_students_unlabelled_images_only():
    net = conv1x1([3.0, -3.0], [0.0, 0.0])
    xu = torch.linspace(-1, 1, 8).view(1, 1, 2, 2, 2)
    seen = []

    def shift(x):
        seen.append(x.clone())
        return x + 0.5
    for augment, positive in (("none", False), ("strong", True)):
        seen.clear()
        ctx = make_ctx({"student": net, "teacher": copy.deepcopy(net)}, step=100, strong_augment=shift)
        run_step(create_method("mean_teacher", noise_std=0.0, augment=augment), labeled_batch(xu),
                 {"data": xu, "keys": ["u"]}, ctx)
        # identical networks, no noise: only the student's strong view makes them disagree
        assert (ctx.pop_logged()["loss_unsup"] > 1e-6) == positive
        assert len(seen) == (1 if augment == "strong" else 0)
        if seen:
            assert torch.equal(seen[0], xu)     # the unlabelled images, not the labelled ones
    with pytest.raises(ValueError, match="augment"):
        create_method("mean_teacher", augment="heavy")


# ----------------------------------------------------------------------------- UA-MT
def test_uamt_entropy_threshold_and_mask():
    from autossl.ssl.methods.ua_mt import entropy, masked_consistency, uncertainty_threshold
    p = torch.tensor([[0.5, 1.0, 0.9], [0.5, 0.0, 0.1]]).view(1, 2, 3)
    h = entropy(p)
    expected = [math.log(2), 0.0, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    torch.testing.assert_close(h.view(-1), torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert uncertainty_threshold(0, 100, 2) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert uncertainty_threshold(50, 100, 4) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(4))
    assert uncertainty_threshold(200, 100, 3) == pytest.approx(math.log(3))
    # nothing kept: loss 0, not NaN
    z = torch.zeros(1, 2, 3)
    assert masked_consistency(z, z + 1, torch.zeros(1, 1, 3)).item() == 0.0

    # full step: teacher logits (0, 0) at x = 0 (p = 0.5, entropy ln 2 -> masked) and confident elsewhere
    student, teacher = conv1x1([1.0, -1.0], [0.2, 0.0]), conv1x1([4.0, -4.0], [0.0, 0.0])
    xu = torch.tensor([0.0, 0.1, 1.0, -2.0]).view(1, 1, 1, 2, 2)
    ua = create_method("ua_mt", noise_std=0.0, passes=3)
    ctx = make_ctx({"student": student, "teacher": teacher}, step=0, total_steps=10)
    (loss,) = run_step(ua, labeled_batch(xu), {"data": xu, "keys": ["u"]}, ctx)
    x = xu.numpy().reshape(-1)
    pt = np_softmax(np.stack([4 * x, -4 * x]), 0)
    ps = np_softmax(np.stack([x + 0.2, -x]), 0)
    u = -(pt * np.log(pt + 1e-6)).sum(0)
    thr = (0.75 + 0.25 * math.exp(-5)) * math.log(2)
    mask = (u < thr).astype(float)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0]  # p = 0.5 and 0.69 are too uncertain at t = 0
    cons = (mask * ((ps - pt) ** 2)).sum() / (2 * mask.sum())
    logged = ctx.pop_logged()
    assert logged["loss_unsup"] == pytest.approx(cons, rel=1e-5)
    assert logged["pl_share"] == pytest.approx(mask.mean())
    assert logged["pl_confidence"] == pytest.approx(pt.max(0).mean(), rel=1e-5)
    assert logged["uncertainty_threshold"] == pytest.approx(thr)
    assert loss.item() == pytest.approx(0.1 * math.exp(-5) * cons, rel=1e-5)


# ----------------------------------------------------------------------------- CPS
def test_cps_cross_loss_uses_the_other_networks_argmax_without_gradient():
    from autossl.ssl.methods.cps import cross_pseudo_loss, hard_labels
    from autossl.components.losses import ce_loss
    l1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2).requires_grad_()   # argmax (0, 1)
    l2 = torch.tensor([[0.0, 3.0], [1.0, 0.0]]).T.reshape(1, 2, 2).requires_grad_()   # argmax (1, 0)
    loss = cross_pseudo_loss(l1, l2)
    a, b = l1.detach().numpy()[0], l2.detach().numpy()[0]
    ce = lambda z, y: float(np.mean([-np.log(np_softmax(z[:, i:i + 1], 0)[y[i], 0]) for i in range(z.shape[1])]))  # noqa: E731
    expected = ce(a, [1, 0]) + ce(b, [0, 1])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    own = ce(a, [0, 1]) + ce(b, [1, 0])
    assert abs(own - expected) > 0.1  # using each network's own argmax would give another value
    # gradient only through the predicting side: d/dl2 of CE(l1, argmax l2) is zero
    l2.grad = None
    ce_loss(l1, hard_labels(l2)).backward()
    assert l2.grad is None and l1.grad is not None


def test_cps_step_on_labelled_and_unlabelled_images():
    net1, net2 = conv1x1([1.0, -1.0], [0.0, 0.3]), conv1x1([-2.0, 1.0], [0.5, 0.0])
    xl = torch.tensor([0.4, -0.4, 2.0, -3.0]).view(1, 1, 1, 2, 2)
    xu = torch.tensor([1.0, -1.0, 0.1, 0.0]).view(1, 1, 1, 2, 2)
    # SSL4MIS's recipe from scratch (a ramp over the run), a short ramp after a warm start
    assert (create_method("cps").lambda_max, create_method("cps").rampup) == ((0.1, 1.5), (1.0, 0.1))
    assert create_method("cps", **{"lambda": "0.3"}).lambda_max == 0.3
    cps = create_method("cps", **{"lambda": "1.5", "rampup": "0", "dice": "false"})  # the paper's constant λ and CE
    ctx = make_ctx({"cnn1": net1, "cnn2": net2}, supervised_loss=lambda o, t: torch.tensor(0.25))
    (loss,) = run_step(cps, labeled_batch(xl), {"data": xu, "keys": ["u"]}, ctx)
    x = torch.cat([xl, xu]).numpy().reshape(2, -1)
    z1 = np.stack([x, -x + 0.3], 1)          # (B, C, N)
    z2 = np.stack([-2 * x + 0.5, x], 1)

    def ce(z, y):
        p = np_softmax(z, 1)
        return float(np.mean(-np.log(np.take_along_axis(p, y[:, None], 1))))

    y1, y2 = z1.argmax(1), z2.argmax(1)
    cross = ce(z1, y2) + ce(z2, y1)
    assert loss.item() == pytest.approx(0.5 + 1.5 * cross, rel=1e-5)
    logged = ctx.pop_logged()
    assert logged["agreement"] == pytest.approx(float((y1[1] == y2[1]).mean()))
    assert logged["ramp_weight"] == 1.5


def test_pseudo_label_loss_dice_term_weighs_a_missed_small_structure():
    from autossl.components.losses import ce_loss
    from autossl.ssl.methods.cps import pseudo_label_loss
    labels = torch.zeros(1, 1, 10, 10, dtype=torch.long)
    labels[0, 0, 4, 4] = 1                                          # one foreground voxel of 100
    logits = torch.zeros(1, 2, 10, 10)
    logits[:, 0] = 4.0                                              # background everywhere, p_fg = 1/(1+e^4)
    ce = ce_loss(logits, labels).item()
    p_fg = 1 / (1 + math.exp(4))
    assert ce == pytest.approx((99 * -math.log(1 - p_fg) - math.log(p_fg)) / 100, rel=1e-5)
    dice = 1 - 2 * p_fg / (100 * p_fg + 1)                          # soft Dice of the foreground over the batch
    assert pseudo_label_loss(logits, labels).item() == pytest.approx(ce, rel=1e-5)
    assert pseudo_label_loss(logits, labels, dice=True).item() == pytest.approx(ce + dice, rel=1e-4)
    assert dice > 0.9 > 20 * ce / 100                                # the Dice term, not CE, sees the miss
    # the method's default: CE + Dice; the paper's CE on request
    assert create_method("cps").dice and not create_method("cps", dice="false").dice
    for name in ("cps_cutmix", "fixmatch", "ucmt", "cross_teaching"):  # one check of the CutMix box's share
        with pytest.raises(ValueError, match=f"--ssl {name}: need 0 < cutmix_min <= cutmix_max <= 1"):
            create_method(name, cutmix_min="0.6", cutmix_max="0.5")


def test_cps_cutmix_strong_view_trains_the_mix_against_unaugmented_pseudo_labels():
    net1, net2 = conv1x1([1.0, -1.0], [0.0, 0.0]), conv1x1([-1.0, 1.0], [0.2, 0.0])
    xu = torch.randn(3, 1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    xl = torch.randn(1, 1, 4, 6, 6)
    shift = lambda x: x + 5.0  # noqa: E731  (an intensity-only "strong" augmentation)
    plain = create_method("cps_cutmix", strong="false")
    strong = create_method("cps_cutmix")
    assert strong.strong and not plain.strong and not create_method("cps").strong
    x0, y1_0, y2_0 = plain.mixed_batch(xu, xl, make_ctx({"cnn1": net1, "cnn2": net2}, seed=5, strong_augment=shift))
    x1, y1_1, y2_1 = strong.mixed_batch(xu, xl, make_ctx({"cnn1": net1, "cnn2": net2}, seed=5, strong_augment=shift))
    torch.testing.assert_close(x1, x0 + 5.0)       # the mix, then the strong augmentation
    assert torch.equal(y1_0, y1_1) and torch.equal(y2_0, y2_1)  # pseudo-labels of the unaugmented sources
    # a shift of +5 would flip net1's argmax almost everywhere: the labels did not see it
    with torch.no_grad():
        assert not torch.equal(net1(x1).argmax(1, keepdim=True), y1_1)


def test_cutmix_box_mixing_of_images_and_pseudo_labels_is_exact():
    from autossl.ssl.methods.cps import cutmix
    g = torch.Generator().manual_seed(3)
    for shape in ((6, 8, 10), (12, 9)):
        for _ in range(20):
            box = random_box(shape, (0.25, 0.5), g)
            size = np.prod([s.stop - s.start for s in box])
            assert all(0 <= s.start < s.stop <= n for s, n in zip(box, shape))
            assert 0.1 < size / np.prod(shape) < 0.75  # rounding of small sides allowed
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1:3, 0:2] = 1
    mask[1, 0, 0:1, :] = 1
    partner = torch.tensor([1, 0])
    mixed = cutmix(x, x[partner], mask)
    assert mixed[0, 0, 1, 1] == x[1, 0, 1, 1] and mixed[0, 0, 0, 0] == x[0, 0, 0, 0]
    assert torch.equal(mixed[1, 0, 0], x[0, 0, 0]) and torch.equal(mixed[1, 0, 1:], x[1, 0, 1:])
    labels = (x > 10).to(torch.int64)
    mixed_l = cutmix(labels, labels[partner], mask)
    assert mixed_l.dtype == torch.int64
    assert torch.equal(mixed_l, torch.where(mask.bool(), labels[partner], labels))

    # the method: mixes images and each network's unmixed pseudo-labels under the same box
    net1, net2 = conv1x1([1.0, -1.0], [0.0, 0.0]), conv1x1([-1.0, 1.0], [0.2, 0.0])
    xu = torch.randn(3, 1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    xl = torch.randn(1, 1, 4, 6, 6)
    cps = create_method("cps_cutmix", cutmix_min=0.3, cutmix_max=0.3)
    ctx = make_ctx({"cnn1": net1, "cnn2": net2}, seed=5)
    x_mix, y1, y2 = cps.mixed_batch(xu, xl, ctx)
    m = box_mask(3, (4, 6, 6), (0.3, 0.3), torch.Generator().manual_seed(5))
    assert 0 < m.mean() < 1
    p = torch.tensor([1, 2, 0])
    torch.testing.assert_close(x_mix, xu * (1 - m) + xu[p] * m)
    with torch.no_grad():
        s1, s2 = net1(xu).argmax(1, keepdim=True), net2(xu).argmax(1, keepdim=True)
    assert torch.equal(y1, torch.where(m.bool(), s1[p], s1)) and torch.equal(y2, torch.where(m.bool(), s2[p], s2))
    # a single unlabelled image is mixed with the first labelled one
    x_mix1, _, _ = cps.mixed_batch(xu[:1], xl, make_ctx({"cnn1": net1, "cnn2": net2}, seed=5))
    m1 = box_mask(1, (4, 6, 6), (0.3, 0.3), torch.Generator().manual_seed(5))
    torch.testing.assert_close(x_mix1, xu[:1] * (1 - m1) + xl * m1)
    # the step trains both networks on the mix
    (loss,) = run_step(cps, labeled_batch(xl), {"data": xu, "keys": ["u"] * 3}, ctx)
    loss.backward()
    assert net1.weight.grad.abs().sum() > 0 and net2.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- FixMatch
def test_fixmatch_threshold_mask_and_strong_view_loss():
    from autossl.ssl.methods.fixmatch import confident_pseudo_labels
    logits = torch.tensor([[3.0, 0.0, 0.2], [0.0, 0.1, 0.0]]).view(1, 2, 3)  # p0: 0.95, 0.475, 0.55
    labels, mask, conf = confident_pseudo_labels(logits, 0.9)
    assert labels.view(-1).tolist() == [0, 1, 0] and mask.view(-1).tolist() == [1.0, 0.0, 0.0]

    net = conv1x1([3.0, -3.0], [0.0, 0.0])
    xu = torch.tensor([1.0, 0.1, -0.8, 0.02]).view(1, 1, 1, 2, 2)
    shift = 0.5
    assert create_method("fixmatch").rampup == (1.0, 0.1)  # ramped by default (short after a warm start); rampup=0 is the paper's constant λ_u
    fm = create_method("fixmatch", cutout="false", cutmix="false", dice="false", threshold=0.95, rampup="0")
    ctx = make_ctx({"student": net}, strong_augment=lambda x: x - shift)
    (loss,) = run_step(fm, labeled_batch(xu), {"data": xu, "keys": ["u"]}, ctx)
    x = xu.numpy().reshape(-1)
    pw = np_softmax(np.stack([3 * x, -3 * x]), 0)
    keep = pw.max(0) >= 0.95
    assert keep.tolist() == [True, False, True, False]
    ps = np_softmax(np.stack([3 * (x - shift), -3 * (x - shift)]), 0)
    ce = -np.log(np.take_along_axis(ps, pw.argmax(0)[None], 0))[0]
    assert loss.item() == pytest.approx((ce * keep).mean(), rel=1e-5)  # mean over ALL voxels
    logged = ctx.pop_logged()
    assert logged["pl_share"] == pytest.approx(0.5)
    assert logged["pl_confidence"] == pytest.approx(pw.max(0).mean(), rel=1e-5)


def test_fixmatch_cutmix_mixes_strong_views_labels_and_mask_alike_and_adds_a_dice_term():
    from autossl.components.losses import soft_dice_loss
    from autossl.ssl.methods.fixmatch import masked_ce
    fm = create_method("fixmatch", cutmix_min=0.4, cutmix_max=0.4, threshold=0.6, rampup="0")
    assert fm.cutmix and fm.dice and not fm.cutout
    assert create_method("fixmatch", cutmix="false").cutout  # CutOut when CutMix is off
    assert not create_method("pseudoseg").cutmix and create_method("pseudoseg").cutout
    strong = torch.arange(3 * 36, dtype=torch.float32).view(3, 1, 6, 6)
    labels = torch.tensor([0, 1, 1]).view(3, 1, 1, 1).expand(3, 1, 6, 6).clone()
    mask = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 1, 6, 6).clone()
    x, y, m = fm.mix(strong, labels, mask, make_ctx({}, seed=4))
    box = box_mask(3, (6, 6), (0.4, 0.4), torch.Generator().manual_seed(4)).bool()
    p = torch.tensor([1, 2, 0])
    assert 0 < box.float().mean() < 1
    assert torch.equal(x, torch.where(box, strong[p], strong))
    assert torch.equal(y, torch.where(box, labels[p], labels)) and torch.equal(m, torch.where(box, mask[p], mask))
    # a single image has no partner: unchanged
    x1, y1, m1 = fm.mix(strong[:1], labels[:1], mask[:1], make_ctx({}, seed=4))
    assert torch.equal(x1, strong[:1]) and torch.equal(y1, labels[:1])

    # the step: CE over all voxels plus the soft Dice over confident voxels of the batch
    net = conv1x1([3.0, -3.0], [0.0, 0.0])
    xu = torch.tensor([1.0, 0.1, -0.8, 0.02]).view(1, 1, 1, 2, 2)
    ctx = make_ctx({"student": net}, strong_augment=lambda t: t - 0.5)
    (loss,) = run_step(fm, labeled_batch(xu), {"data": xu, "keys": ["u"]}, ctx)
    with torch.no_grad():
        weak = net(xu)
        lab = weak.argmax(1, keepdim=True)
        keep = (torch.softmax(weak, 1).amax(1, keepdim=True) >= 0.6).float()
        out = net(xu - 0.5)
    expected = masked_ce(out, lab, keep) + soft_dice_loss(out, lab, batch_dice=True, mask=keep)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - masked_ce(out, lab, keep).item()) > 0.05


def test_fixmatch_cutout_erases_a_box_of_the_strong_view_only():
    fm = create_method("fixmatch", cutmix="false", cutout_min=0.2, cutout_max=0.2)
    x = torch.randn(2, 1, 6, 8, 8)
    ctx = make_ctx({}, seed=2)
    strong = fm.strong_view(x, ctx)
    changed = (strong != x)
    assert changed.any() and not changed.all()
    for b in range(2):  # the erased voxels carry the sample's mean
        torch.testing.assert_close(strong[b][changed[b]], torch.full_like(strong[b][changed[b]], x[b].mean().item()))
    with pytest.raises(RuntimeError, match="intensity-only"):
        fm.strong_view(x, make_ctx({}, strong_augment=lambda t: t[..., :4]))


# ----------------------------------------------------------------------------- self-training
def test_self_training_pseudo_labels_keep_the_largest_component_per_case_or_slice():
    """clean: a whole case's pseudo-label keeps the largest component of each single-structure
    class (per slice for a 2d configuration), the rest background, before the threshold."""
    from autossl.ssl.methods.self_training import pseudo_label
    probs = np.zeros((2, 2, 4, 6), dtype=np.float32)  # (C, z, y, x): 2 slices
    probs[0] = 1.0
    for z, xs in ((0, (slice(0, 3), slice(5, 6))), (1, (slice(5, 6),))):  # slice 0: 3 + 1 voxels; slice 1: 1 voxel
        for sl in xs:
            probs[:, z, 1, sl] = [[0.0], [1.0]]
    raw, _, _ = pseudo_label(probs, 0.9)
    assert int((raw == 1).sum()) == 5
    per_slice, _, _ = pseudo_label(probs, 0.9, (1,), per_slice=True)
    assert per_slice[0, 0, 1].tolist() == [1, 1, 1, 0, 0, 0] and per_slice[0, 1, 1, 5] == 1  # each slice's largest
    whole, _, _ = pseudo_label(probs, 0.9, (1,), per_slice=False)
    # in 3D the two x = 5 voxels touch across the slices: a 2-voxel component, smaller than 3
    assert whole[0, 0, 1].tolist() == [1, 1, 1, 0, 0, 0] and whole[0, 1, 1, 5] == 0 and int((whole == 1).sum()) == 3
    whole_no_touch = probs.copy()
    whole_no_touch[:, 1, 1, 5] = [1.0, 0.0]
    whole_no_touch[:, 1, 3, 0] = [0.0, 1.0]
    w2, _, _ = pseudo_label(whole_no_touch, 0.9, (1,))
    assert int((w2 == 1).sum()) == 3 and w2[0, 1, 3, 0] == 0  # a lone voxel of another slice, removed in 3D
    assert create_method("self_training", clean="true").clean and not create_method("self_training").clean


def test_self_training_pseudo_label_filtering_rounds_and_state():
    from autossl.ssl.methods.self_training import pseudo_label
    probs = np.array([[0.95, 0.5, 0.2, 0.05], [0.05, 0.5, 0.8, 0.95]], dtype=np.float32).reshape(2, 1, 2, 2)
    seg, share, conf = pseudo_label(probs, 0.9)
    assert seg.dtype == np.int16 and seg.shape == (1, 1, 2, 2)
    assert seg.reshape(-1).tolist() == [0, -1, -1, 1]
    assert share == pytest.approx(0.5) and conf == pytest.approx((0.95 + 0.5 + 0.8 + 0.95) / 4)
    seg0, share0, _ = pseudo_label(torch.from_numpy(probs), 0.0)
    assert seg0.reshape(-1).tolist() == [0, 0, 1, 1] and share0 == 1.0

    st = create_method("self_training", rounds=3, threshold=0.9)
    assert st.rounds == 3 and type(st).rounds == 1  # instance attribute read by the trainer
    net = conv1x1([2.0, -2.0], [0.0, 0.0])
    handed = []
    asked = []

    def predict(cases, **kw):
        asked.append(list(cases))
        return {c: probs for c in cases}

    ctx = make_ctx({"student": net}, predict_unlabeled=predict, set_pseudo_labels=handed.append,
                   unlabeled_cases=["u1", "u2", "u3", "u4", "u5"])
    xl = torch.zeros(1, 1, 1, 2, 2)
    # round 0: supervised only, even if a batch carries targets
    run_step(st, labeled_batch(xl), {"data": xl, "keys": ["u1"], "target": [torch.zeros(1, 1, 1, 2, 2)]}, ctx)
    assert ctx.pop_logged()["loss_unsup"] == 0.0
    st.chunk = 2
    st.on_round_end(0, ctx)
    assert asked == [["u1", "u2"], ["u3", "u4"], ["u5"]] and st.round == 1
    assert sorted(handed[0]) == ["u1", "u2", "u3", "u4", "u5"]
    assert handed[0]["u3"].reshape(-1).tolist() == [0, -1, -1, 1]
    assert ctx.pop_logged()["pl_share"] == pytest.approx(0.5)
    # round 1: pseudo-labelled loss with -1 ignored (all ignored -> 0; a real label -> > 0)
    ignored = {"data": xl, "keys": ["u1"], "target": [torch.full((1, 1, 1, 2, 2), -1, dtype=torch.int16)]}
    st.pseudo_loss = SupervisedLoss(ignore_index=-1)
    run_step(st, labeled_batch(xl), ignored, ctx)
    assert ctx.pop_logged()["loss_unsup"] == pytest.approx(0.0, abs=1e-6)
    ones = {"data": xl + 1, "keys": ["u1"], "target": [torch.ones((1, 1, 1, 2, 2), dtype=torch.int16)]}
    run_step(st, labeled_batch(xl), ones, ctx)
    assert ctx.pop_logged()["loss_unsup"] > 0.5
    # the last round end predicts nothing
    st.on_round_end(2, ctx)
    assert len(asked) == 3
    # resume: state restores the round and hands the pseudo-labels to the loader again
    assert st.restart_lr_each_round is True
    assert create_method("self_training", restart_lr="false").restart_lr_each_round is False
    st2 = create_method("self_training", rounds=3)
    st2.load_state_dict(st.state_dict())
    again = []
    ctx2 = make_ctx({"student": net}, set_pseudo_labels=again.append)
    st2.setup(ctx2)
    assert again == []  # the trainer's loaders do not exist yet at setup
    run_step(st2, labeled_batch(xl), {"data": xl, "keys": ["u1"]}, ctx2)
    run_step(st2, labeled_batch(xl), {"data": xl, "keys": ["u1"]}, ctx2)
    assert st2.round == 1 and len(again) == 1 and np.array_equal(again[0]["u2"], handed[0]["u2"])


def test_self_training_reinit_gives_fresh_weights():
    from autossl.ssl.methods.self_training import reinitialise
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(7.0)
    reinitialise(net)
    assert (net[0].weight != 7.0).all() and torch.equal(net[1].weight, torch.ones(4))


# ----------------------------------------------------------------------------- strong augmentation
@pytest.mark.parametrize("shape", [(2, 2, 12, 14), (2, 1, 6, 10, 12)])
def test_strong_augment_deterministic_shape_preserving(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2 + 1
    aug = StrongIntensityAugment(n_ops=3, cutout_p=0.5)
    a = aug(x, torch.Generator().manual_seed(11))
    b = aug(x, torch.Generator().manual_seed(11))
    c = aug(x, torch.Generator().manual_seed(12))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    # own generator seeded by ``seed``
    assert torch.equal(StrongIntensityAugment(seed=4)(x), StrongIntensityAugment(seed=4)(x))


def test_strong_augment_ops_keep_geometry():
    x = torch.randn(1, 1, 8, 10, 12, generator=torch.Generator().manual_seed(1))
    x[0, 0, 2:6, 3:7, 4:9] += 6.0  # a bright box
    for op in OPS:
        y = StrongIntensityAugment(ops=[op], n_ops=1)(x, torch.Generator().manual_seed(2))
        assert y.shape == x.shape
        if op in ("brightness", "contrast", "gamma", "posterize"):  # point-wise monotone maps
            order = torch.argsort(x.view(-1))
            assert (y.view(-1)[order].diff() >= -1e-5).all() or (y.view(-1)[order].diff() <= 1e-5).all(), op
        # the bright box stays where it was
        inside = y[0, 0, 2:6, 3:7, 4:9].mean()
        outside = torch.cat([y[0, 0, :1].reshape(-1), y[0, 0, 7:].reshape(-1)]).mean()
        assert inside > outside, op
    with pytest.raises(ValueError, match="unknown operation"):
        StrongIntensityAugment(ops=["rotate"])


def test_cutout_fills_box_with_mean_and_keeps_the_rest():
    x = torch.randn(3, 2, 10, 12)
    y, mask = cutout(x, torch.Generator().manual_seed(0), (0.1, 0.2))
    assert mask.shape == (3, 1, 10, 12)
    for b in range(3):
        m = mask[b, 0].bool()
        assert 0.05 < m.float().mean() < 0.35
        for ch in range(2):
            assert torch.equal(y[b, ch][~m], x[b, ch][~m])
            torch.testing.assert_close(y[b, ch][m], torch.full_like(y[b, ch][m], x[b, ch].mean().item()))


# ----------------------------------------------------------------------------- entropy minimisation / the doc example
def test_entropy_min_hand_computation():
    net = conv1x1([1.0, -1.0], [0.0, 0.0], dim=2)
    xu = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    ctx = make_ctx({"student": net}, step=100, total_steps=100)
    (loss,) = run_step(create_method("entropy_min"), labeled_batch(xu), {"data": xu, "keys": ["u"]}, ctx)
    p = np_softmax(np.array([[0.0, 1.0], [0.0, -1.0]]), 0)
    h = (-(p * np.log(p + 1e-6)).sum(0) / math.log(2)).mean()
    assert loss.item() == pytest.approx(0.1 * h, rel=1e-5)


def _doc_blocks(name: str) -> list[str]:
    text = (REPO / "documentation" / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_plugin_doc_example_is_the_shipped_method_and_runs(monkeypatch):
    import autossl.ssl.registry as registry
    blocks = _doc_blocks("ssl_plugins.md")
    example = next(b for b in blocks if '@register("entropy_min")' in b)
    shipped = (REPO / "autossl" / "ssl" / "methods" / "entropy_min.py").read_text()
    assert example.strip() == shipped.strip(), "documentation/ssl_plugins.md's example must be entropy_min.py"
    registry.get_method_class("entropy_min")  # import the shipped methods first: the snippet below must not
    monkeypatch.setattr(registry.METHODS, "entries", {})  # re-register them into the emptied registry
    namespace: dict = {"__name__": "doc_example"}
    exec(compile(example, "ssl_plugins.md", "exec"), namespace)
    cls = registry.METHODS.entries["entropy_min"]
    assert cls is namespace["EntropyMinimisation"]
    net = conv1x1([1.0, -1.0], [0.0, 0.0])
    x = torch.randn(2, 1, 2, 3, 3)
    ctx = make_ctx({"student": net}, step=50, supervised_loss=SupervisedLoss())
    (loss,) = run_step(cls(), labeled_batch(x), {"data": x, "keys": ["u", "v"]}, ctx)
    loss.backward()
    assert net.weight.grad is not None and set(ctx.pop_logged()) == set(cls.scalars)
    # the "testing without the trainer" snippet runs as written
    snippet = next(b for b in blocks if "TrainingContext(" in b)
    exec(compile(snippet, "ssl_plugins.md", "exec"), namespace)
    assert namespace["net"].weight.grad is not None
    assert set(namespace["ctx"]._logged) == set() and namespace["method"].option("lambda", 0.1) == 0.2


# ----------------------------------------------------------------------------- end to end through the trainer
E2E_DATASET = 991
E2E_NAME = f"Dataset{E2E_DATASET}_SSLClassic"
#: method -> (options, scalars expected in the training log)
E2E_METHODS = {
    "mean_teacher": ({}, ("loss_sup", "loss_unsup", "ramp_weight")),
    "ua_mt": ({"passes": "2"}, ("loss_unsup", "pl_share", "pl_confidence", "uncertainty_threshold")),
    "cps": ({}, ("loss_sup", "loss_unsup", "agreement")),
    "cps_cutmix": ({}, ("loss_unsup", "agreement")),
    "fixmatch": ({"threshold": "0.5"}, ("loss_unsup", "pl_confidence", "pl_share")),
    "self_training": ({"threshold": "0.5"}, ("loss_sup", "loss_unsup", "round", "pl_share", "pl_confidence")),
    "entropy_min": ({}, ("loss_sup", "loss_unsup", "ramp_weight")),
    "bcp": ({}, ("loss_in", "loss_out", "pl_foreground")),
}


@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory):
    """A tiny planned + preprocessed synthetic 3D dataset (2d and 3d_fullres configurations)."""
    from autossl.cli import plan_and_preprocess as pp
    from autossl.utilities.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ssl_classic_e2e")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("autossl_raw", "raw"), ("autossl_preprocessed", "pre"), ("autossl_results", "res")):
            (root / sub).mkdir()
            mp.setenv(var, str(root / sub))
        mp.setenv("autossl_n_proc_DA", "0")
        make_synthetic_dataset(root / "raw", E2E_DATASET, "SSLClassic", n_labeled=4, n_unlabeled=4, n_test=0,
                               shape=(12, 16, 16), spacing=(1.0, 1.0, 1.0), seed=3)
        pp.extract_fingerprint(E2E_DATASET, 1)
        plans = pp.plan_experiment(E2E_DATASET)
        pp.preprocess(E2E_DATASET, plans, ["2d", "3d_fullres"], 1)
        yield {"root": root, "plans": plans}


def _train(ssl: str, configuration: str, options: dict, *, epochs: int = 2, iterations: int = 1):
    import shutil

    from autossl import paths
    from autossl.training.naming import trainer_name
    from autossl.training.trainer import Trainer

    shutil.rmtree(paths.results_dir() / E2E_NAME / f"{trainer_name(ssl)}__autosslPlans__{configuration}",
                  ignore_errors=True)
    trainer = Trainer(E2E_DATASET, configuration, "all", ssl=ssl, ssl_options=options, device="cpu",
                      epochs=epochs, iterations_per_epoch=iterations, val_iterations=0, num_workers=0, seed=1,
                      verbose=False)
    trainer.run()
    return trainer


def _check_run(trainer, method_name: str, scalars) -> str:
    folder = trainer.output_folder
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    method = create_method(method_name, **trainer.ssl_options)
    assert set(ckpt["networks"]) == {s.name for s in method.network_specs()}
    assert [n["name"] for n in ckpt["inference_networks"]] == method.inference_networks()
    logs = sorted(folder.glob("training_log_*.txt"))
    assert logs, f"no training log in {folder}"
    text = logs[-1].read_text()
    for name in scalars:
        assert re.search(rf"\b{name} [-+0-9.einaf]+", text), f"{method_name}: scalar {name} not in the training log"
    return text


@pytest.mark.parametrize("method_name", list(E2E_METHODS))
def test_method_trains_end_to_end_3d(e2e_env, method_name):
    options, scalars = E2E_METHODS[method_name]
    trainer = _train(method_name, "3d_fullres", options)
    text = _check_run(trainer, method_name, scalars)
    if method_name == "self_training":
        assert "end of round 1/2" in text
        unsup = [float(v) for v in re.findall(r"loss_unsup ([-+0-9.e]+)", text)]
        assert unsup[0] == 0.0 and unsup[-1] > 0.0  # round 0 supervised only; pseudo-labels later
        # each round restarts the learning rate: epoch 2 (round 2) starts at lr0 again
        assert trainer.schedulers["student"].cycles == 2
        assert [float(v) for v in re.findall(r"lr student=([0-9.e-]+)", text)] == [0.01, 0.01]
        assert not (trainer.output_folder / "pseudo_labels").exists()


@pytest.mark.parametrize("method_name", ["cps_cutmix", "bcp"])
def test_method_trains_end_to_end_2d(e2e_env, method_name):
    options, scalars = E2E_METHODS[method_name]
    _check_run(_train(method_name, "2d", options), method_name, scalars)


def test_labels_of_unlabelled_cases_are_never_read(e2e_env, monkeypatch):
    """Poisoned label files for every unlabelled case, where a careless loader could find one;
    every reader raises on them. Self-training reads unlabelled batches, predicts the unlabelled
    cases with the real predictor and trains on its pseudo-labels without touching them."""
    import blosc2
    import SimpleITK as sitk

    from autossl import paths
    from autossl.preprocessing import storage

    pre = paths.preprocessed_dir() / E2E_NAME
    raw = paths.raw_dir() / E2E_NAME
    unlabeled = sorted(p.name.rsplit("_0000", 1)[0] for p in (raw / "imagesTrUnlabeled").iterdir())
    assert unlabeled
    poisoned: list[Path] = []
    for folder in pre.iterdir():
        if folder.is_dir() and folder.name.endswith("_unlabeled"):
            for case in storage.list_cases(folder):
                poisoned.append(folder / f"{case}_seg.b2nd")
    for case in unlabeled:
        poisoned += [raw / "labelsTr" / f"{case}.nii.gz", pre / "gt_segmentations" / f"{case}.nii.gz"]
    assert len(poisoned) >= 3 * len(unlabeled)
    for p in poisoned:
        p.write_bytes(b"not a label: reading this file is a leak")
    touched: list[str] = []

    def guard(fn):
        def wrapper(path, *a, **k):
            if any(str(path) == str(p) for p in poisoned):
                touched.append(str(path))
                raise AssertionError(f"read a label of an unlabelled case: {path}")
            return fn(path, *a, **k)
        return wrapper

    monkeypatch.setattr(blosc2, "open", guard(blosc2.open))
    monkeypatch.setattr(np, "load", guard(np.load))
    monkeypatch.setattr(sitk, "ReadImage", guard(sitk.ReadImage))
    try:
        options, scalars = E2E_METHODS["self_training"]
        text = _check_run(_train("self_training", "3d_fullres", options), "self_training", scalars)
        assert "end of round 1/2" in text
    finally:
        for p in poisoned:
            p.unlink(missing_ok=True)
    assert touched == []


def test_self_training_resumes_with_its_pseudo_labels(e2e_env, monkeypatch):
    """Interrupted after the round boundary, a resumed run trains on the pseudo-labels stored
    in the checkpoint (the trainer's pseudo-label files are gone). They are handed over at the
    first resumed step, whose unlabelled batch was drawn before: the next steps use them."""
    import shutil

    from autossl.training.trainer import Trainer

    class Stop(Exception):
        pass

    original = Trainer._end_epoch

    def end_epoch_then_stop(self, *a, **k):
        original(self, *a, **k)
        if self.current_step == 3:
            raise Stop

    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch_then_stop)
    options = {"threshold": "0.5", "rounds": "2"}  # round boundary after step round(5 / 2) = 2
    with pytest.raises(Stop):
        _train("self_training", "3d_fullres", options, epochs=5, iterations=1)
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    trainer = Trainer(E2E_DATASET, "3d_fullres", "all", ssl="self_training", ssl_options=options, device="cpu",
                      epochs=5, iterations_per_epoch=1, val_iterations=0, num_workers=0, seed=1, verbose=False)
    latest = torch.load(trainer.output_folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["ssl_state"]["round"] == 1 and len(latest["ssl_state"]["pseudo_labels"]) == 4
    shutil.rmtree(trainer.output_folder / "pseudo_labels")  # only the checkpoint keeps them
    trainer.run(continue_training=True)
    text = "".join(p.read_text() for p in sorted(trainer.output_folder.glob("training_log_*.txt")))
    last = [line for line in text.splitlines() if "epoch 5/5" in line]
    assert last and float(re.search(r"loss_unsup ([-+0-9.e]+)", last[-1]).group(1)) > 0
