"""Cross teaching, UCMT, UMIX and Primus2D: unit tests, then end-to-end runs through the CLI."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from autossl.components.ema import ema_update
from autossl.components.losses import SupervisedLoss
from autossl.networks.build import build_network
from autossl.networks.transformer2d import Primus2D
from autossl.ssl.context import TrainingContext
from autossl.ssl.methods.cross_teaching import CrossTeaching, ct_dice, cross_teaching_terms
from autossl.ssl.methods.ucmt import UCMT, mean_entropy_uncertainty, target_pyramid
from autossl.ssl.registry import create_method
from autossl.ssl.umix import umix, umix_indices


# ----------------------------------------------------------------------------- helpers
def _ctx(networks, total_steps=10, step=0):
    return TrainingContext(networks=networks, total_steps=total_steps, num_classes=3, device=torch.device("cpu"),
                           supervised_loss=SupervisedLoss(), strong_augment=lambda x: x + 0.1,
                           rng=torch.Generator().manual_seed(0), step=step)


class TinyDS(nn.Module):
    """A two-scale 'deep supervision' CNN stand-in: full-resolution and half-resolution logits."""

    def __init__(self, seed: int, dim: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.head = conv(1, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.pool = nn.AvgPool2d(2) if dim == 2 else nn.AvgPool3d(2)

    def forward(self, x):
        y = self.head(x)
        return [y, self.pool(y)]


def _batch(dim=2, n=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (side,) * dim
    t = torch.randint(0, 3, (n, 1, *shape), generator=g)
    half = t[(slice(None), slice(None)) + (slice(None, None, 2),) * dim]
    lab = {"data": torch.randn(n, 1, *shape, generator=g), "target": [t, half], "keys": [f"l{i}" for i in range(n)]}
    unl = {"data": torch.randn(n, 1, *shape, generator=g), "keys": [f"u{i}" for i in range(n)]}
    return lab, unl


# ----------------------------------------------------------------------------- cross teaching
def test_cross_teaching_terms_use_other_argmax_without_gradient():
    g = torch.Generator().manual_seed(1)
    cnn = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    vit = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    l_cnn, l_vit = cross_teaching_terms(cnn, vit)
    y_vit, y_cnn = vit.argmax(1, keepdim=True), cnn.argmax(1, keepdim=True)
    assert torch.allclose(l_cnn, ct_dice(cnn, y_vit)) and torch.allclose(l_vit, ct_dice(vit, y_cnn))
    assert not torch.allclose(l_cnn, ct_dice(cnn, y_cnn))  # not its own argmax
    l_cnn.backward()
    assert vit.grad is None  # the pseudo-label source gets no gradient from this term
    assert cnn.grad is not None and cnn.grad.abs().sum() > 0
    cnn.grad = None
    l_vit.backward()
    assert cnn.grad is None and vit.grad.abs().sum() > 0


def test_cross_teaching_step_matches_formula_and_options():
    torch.manual_seed(0)
    cnn, vit = TinyDS(0), nn.Conv2d(1, 3, 3, padding=1)
    lab, unl = _batch()
    method = create_method("cross_teaching", rampup="0.5")  # SSL4MIS's terms
    assert isinstance(method, CrossTeaching)
    assert [s.arch for s in method.network_specs()] == ["cnn", "transformer"]
    ctx = _ctx({"cnn": cnn, "transformer": vit}, total_steps=10, step=5)  # end of the ramp: λ = 0.2
    losses = list(method.training_step(lab, unl, ctx))
    assert len(losses) == 1
    with torch.no_grad():
        x = torch.cat([lab["data"], unl["data"]])
        oc, ov = cnn(x), vit(x)
        sup = SupervisedLoss()([o[:2] for o in oc], lab["target"]) + SupervisedLoss()(ov[:2], lab["target"])
        ct = ct_dice(oc[0][2:], ov[2:].argmax(1, keepdim=True)) + ct_dice(ov[2:], oc[0][2:].argmax(1, keepdim=True))
    assert torch.allclose(losses[0].detach(), sup + 0.2 * ct, atol=1e-5)
    logged = ctx.pop_logged()
    assert set(CrossTeaching.scalars) <= set(logged)
    assert logged["ramp_weight"] == pytest.approx(0.2)
    agree = (oc[0][2:].argmax(1) == ov[2:].argmax(1)).float().mean().item()
    assert logged["agreement"] == pytest.approx(agree)
    assert create_method("cross_teaching").inference_networks() == ["cnn"]
    assert create_method("cross_teaching", predict="both").inference_networks() == ["cnn", "transformer"]
    assert create_method("cross_teaching", predict="transformer").inference_networks() == ["transformer"]
    with pytest.raises(ValueError, match="ct_loss"):
        create_method("cross_teaching", ct_loss="mse")
    regions = dict(lab, target=[t.repeat(1, 2, 1, 1) for t in lab["target"]])  # region maps: 2 channels
    for name, nets in (("cross_teaching", {"cnn": cnn, "transformer": vit}),
                       ("ucmt", {"student1": cnn, "student2": cnn, "teacher": cnn})):
        with pytest.raises(ValueError, match="regions"):
            next(create_method(name).training_step(regions, unl, _ctx(nets)))


def test_cross_teaching_cutmix_learns_the_other_networks_labels_of_strong_cutmix_views():
    from autossl.ssl.methods._shared import cutmix_pseudo_batch, pseudo_label_loss
    torch.manual_seed(0)
    cnn, vit = TinyDS(0), nn.Conv2d(1, 3, 3, padding=1)
    lab, unl = _batch()
    assert not create_method("cross_teaching").cutmix and create_method("cross_teaching").ct_loss_name == "dice"
    method = create_method("cross_teaching", rampup="0", cutmix="true", ct_loss="dice_ce", **{"lambda": "1"})
    assert method.cutmix and method.strong and method.lambda_max == 1.0
    shift = lambda t: t * 0.5 + 1.0  # noqa: E731  (intensity-only)
    ctx = _ctx({"cnn": cnn, "transformer": vit}, total_steps=10, step=5)
    ctx.strong_augment, ctx.warm_started = shift, True
    (loss,) = method.training_step(lab, unl, ctx)
    # the same draws again: mixed views and each network's labels of the unmixed sources
    ctx2 = _ctx({"cnn": cnn, "transformer": vit}, total_steps=10, step=5)
    ctx2.strong_augment = shift
    with torch.no_grad():
        x_u, (y_cnn, y_vit) = cutmix_pseudo_batch([cnn, vit], unl["data"], lab["data"], ctx2, (0.25, 0.5), True, True)
        assert not torch.equal(x_u, unl["data"])
        x = torch.cat([lab["data"], x_u])
        oc, ov = cnn(x), vit(x)
        sup = SupervisedLoss()([o[:2] for o in oc], lab["target"]) + SupervisedLoss()(ov[:2], lab["target"])
        ct = pseudo_label_loss(oc[0][2:], y_vit, dice=True) + pseudo_label_loss(ov[2:], y_cnn, dice=True)
        # not the labels of the mixed views themselves
        own = pseudo_label_loss(oc[0][2:], ov[2:].argmax(1, keepdim=True), dice=True) + \
            pseudo_label_loss(ov[2:], oc[0][2:].argmax(1, keepdim=True), dice=True)
    assert torch.allclose(loss.detach(), sup + 1.0 * ct, atol=1e-5)
    assert not torch.allclose(loss.detach(), sup + 1.0 * own, atol=1e-3)


# ----------------------------------------------------------------------------- UMIX
def test_umix_2d_swaps_expected_blocks():
    img = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(2, 2, 8, 8)
    tgt = (torch.arange(8 * 8).reshape(1, 1, 8, 8) % 5).repeat(2, 1, 1, 1)
    ua, ub = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)  # grid 4 -> 2x2 blocks, 16 blocks
    # sample 0: A uncertain at blocks (0,0) > (0,1); B certain at (2,2) < (3,3) ...
    ua[0, :, 0:2, 0:2], ua[0, :, 0:2, 2:4] = 9, 8           # A: most uncertain 0, then 1
    ua[0, :, 6:8, 6:8], ua[0, :, 6:8, 4:6] = -9, -8         # A: most certain 15, then 14
    ub[0, :, 2:4, 0:2], ub[0, :, 2:4, 2:4] = 9, 8           # B: most uncertain 4, then 5
    ub[0, :, 4:6, 4:6], ub[0, :, 4:6, 6:8] = -9, -8         # B: most certain 10, then 11
    # sample 1: only one clear block each (k=2 uses the stable order for ties)
    ua[1, :, 2:4, 2:4] = 5
    ub[1, :, 4:6, 0:2] = 5
    ua_i, ub_c, ub_i, ua_c = umix_indices(ua, ub, 4, 2)
    assert ua_i[0].tolist() == [0, 1] and ub_c[0].tolist() == [11, 10]
    assert ub_i[0].tolist() == [4, 5] and ua_c[0].tolist() == [14, 15]
    mi, mt = umix(img, tgt, ua, ub, grid=4, k=2)

    def blk(t, s, i):
        r, c = divmod(i, 4)
        return t[s, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]

    expected_moves = {0: 11, 1: 10, 4: 14, 5: 15}  # destination block <- source block (sample 0)
    for dst in range(16):
        src = expected_moves.get(dst, dst)
        assert torch.equal(blk(mi, 0, dst), blk(img, 0, src)), dst
        assert torch.equal(blk(mt, 0, dst), blk(tgt, 0, src)), dst
    # sample 1, ties broken by block order: A's uncertain [5, 0], certain [14, 15]; B's uncertain
    # [8, 0], certain [14, 15]; block 0 is in both uncertain sets and B's write comes last (15 either way)
    moved1 = [i for i in range(16) if not torch.equal(blk(mi, 1, i), blk(img, 1, i))]
    assert moved1 == [0, 5, 8]
    for dst, src in {5: 14, 0: 15, 8: 14}.items():
        assert torch.equal(blk(mi, 1, dst), blk(img, 1, src)) and torch.equal(blk(mt, 1, dst), blk(tgt, 1, src))
    assert mt.dtype == tgt.dtype and mt.shape == tgt.shape
    # identity when k = 0; error when 2k exceeds the number of blocks
    assert torch.equal(umix(img, tgt, ua, ub, 4, 0)[0], img)
    with pytest.raises(ValueError, match="2k"):
        umix(img, tgt, ua, ub, grid=2, k=3)


def test_umix_3d_swaps_blocks_and_keeps_remainder():
    img = torch.randn(1, 1, 9, 8, 8, generator=torch.Generator().manual_seed(3))  # 9 = 2*4 + 1 remainder
    tgt = torch.randint(0, 4, (1, 1, 9, 8, 8), generator=torch.Generator().manual_seed(4))
    ua, ub = torch.zeros(1, 1, 9, 8, 8), torch.zeros(1, 1, 9, 8, 8)
    ua[:, :, 0:4, 0:4, 0:4] = 1.0       # block 0 (of 8) most uncertain for A
    ua[:, :, 4:8, 4:8, 4:8] = -1.0      # block 7 most certain for A
    ub[:, :, 0:4, 4:8, 0:4] = 1.0       # block 2 most uncertain for B
    ub[:, :, 4:8, 0:4, 4:8] = -1.0      # block 5 most certain for B
    mi, (mt, mi_copy) = umix(img, [tgt, img.clone()], ua, ub, grid=2, k=1)
    assert torch.equal(mi[..., 0:4, 0:4, 0:4], img[..., 4:8, 0:4, 4:8])   # 0 <- B's most certain (5)
    assert torch.equal(mi[..., 0:4, 4:8, 0:4], img[..., 4:8, 4:8, 4:8])   # 2 <- A's most certain (7)
    assert torch.equal(mt[..., 0:4, 0:4, 0:4], tgt[..., 4:8, 0:4, 4:8])
    assert torch.equal(mt[..., 0:4, 4:8, 0:4], tgt[..., 4:8, 4:8, 4:8])
    assert torch.equal(mi_copy, mi)
    untouched = torch.ones_like(img, dtype=torch.bool)
    untouched[..., 0:4, 0:4, 0:4] = False
    untouched[..., 0:4, 4:8, 0:4] = False
    assert torch.equal(mi[untouched], img[untouched])  # includes the remainder slice 8
    assert torch.equal(mt[untouched], tgt[untouched])


def test_uncertainty_and_target_pyramid():
    p = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    q = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    assert torch.allclose(mean_entropy_uncertainty(p, p), torch.zeros(1, 1, 2, 2), atol=1e-4)
    assert torch.allclose(mean_entropy_uncertainty(p, q), torch.full((1, 1, 2, 2), 0.6931), atol=1e-3)
    full = torch.arange(16).view(1, 1, 4, 4)
    like = [torch.zeros(1, 1, 4, 4, dtype=torch.int16), torch.zeros(1, 1, 2, 2, dtype=torch.int16)]
    pyr = target_pyramid(full, like)
    assert pyr[0].dtype == torch.int16 and torch.equal(pyr[0].long(), full)
    # voxel centres 1, 3 at half resolution, as the loader's nearest-exact downsampling
    assert pyr[1].tolist() == [[[[5, 7], [13, 15]]]]
    assert target_pyramid(full, full) is full


@pytest.mark.parametrize("shape,scales", [((20, 24), [[1, 1], [0.5, 0.5], [0.25, 0.25]]),
                                          ((10, 16, 12), [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]])])
def test_target_pyramid_equals_the_loaders_deep_supervision_targets(shape, scales):
    """UMIX's mixed labels must meet the lower-resolution heads exactly as the loader's targets do."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 3, (2, 1, *shape), generator=g, dtype=torch.int16)
    per_sample = [DownsampleSegForDSTransform(scales)(segmentation=s.clone())["segmentation"] for s in seg]
    loader = [torch.stack([p[i] for p in per_sample]) for i in range(len(scales))]
    pyr = target_pyramid(seg.long(), loader)
    for ours, theirs in zip(pyr, loader):
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    # and plain "nearest" would not: the case the old code got wrong
    half = torch.nn.functional.interpolate(seg.float(), size=loader[1].shape[2:], mode="nearest")
    assert not torch.equal(half.to(torch.int16), loader[1])


# ----------------------------------------------------------------------------- UCMT
def test_ema_of_two_students_matches_formula():
    """UCMT's reference update (teacher=mixed): α = min(1 - 1/(t+1), 0.99), teacher = α·t + (1-α)(0.99·s1 + 0.01·s2)."""
    s1, s2 = TinyDS(1), TinyDS(2)
    teacher = copy.deepcopy(s1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    method = UCMT(teacher="mixed")
    for step, alpha in ((1000, 0.99), (3, 0.75)):
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        method.after_optimizer_step(_ctx({"student1": s1, "student2": s2, "teacher": teacher}, step=step))
        for k, v in teacher.state_dict().items():
            mix = 0.99 * s1.state_dict()[k] + 0.01 * s2.state_dict()[k]
            expected = alpha * before[k] + (1 - alpha) * mix
            assert torch.allclose(v, expected, atol=1e-6), (step, k)
    # the plain mean (weights omitted) and an explicit weighting
    t2 = copy.deepcopy(teacher)
    ema_update(t2, [s1, s2], 0.5)
    k = "head.weight"
    assert torch.allclose(t2.state_dict()[k], 0.5 * teacher.state_dict()[k]
                          + 0.25 * (s1.state_dict()[k] + s2.state_dict()[k]), atol=1e-6)
    t3 = copy.deepcopy(teacher)
    ema_update(t3, [s1, s2], 0.0, weights=[0.25, 0.75])
    assert torch.allclose(t3.state_dict()[k], 0.25 * s1.state_dict()[k] + 0.75 * s2.state_dict()[k], atol=1e-6)
    with pytest.raises(ValueError, match="summing to 1"):
        ema_update(t3, [s1, s2], 0.5, weights=[0.5, 0.6])


@pytest.mark.parametrize("dim", [2, 3])
def test_ucmt_two_steps_second_sees_updated_weights(dim):
    s1, s2 = TinyDS(1, dim), TinyDS(2, dim)
    teacher = copy.deepcopy(s1)
    method = create_method("ucmt", rampup="0", grid="2", topk="1", teacher="mixed")
    specs = {s.name: s for s in method.network_specs()}
    assert specs["teacher"].trainable is False and specs["teacher"].copy_of == "student1"
    assert specs["student2"].seed_offset == 1 and method.inference_networks() == ["student1", "student2"]
    assert create_method("ucmt", predict="teacher", teacher="mixed").inference_networks() == ["teacher"]
    ctx = _ctx({"student1": s1, "student2": s2, "teacher": teacher}, step=3)
    method.setup(ctx)
    assert not any(p.requires_grad for p in teacher.parameters())
    lab, unl = _batch(dim=dim, side=8)
    opt = torch.optim.SGD(list(s1.parameters()) + list(s2.parameters()), lr=0.5)
    seen = []  # student 1's weights at each of its forward passes
    s1.register_forward_pre_hook(lambda mod, args: seen.append(mod.head.weight.detach().clone()))
    gen = method.training_step(lab, unl, ctx)
    loss1 = next(gen)
    opt.zero_grad()
    loss1.backward()
    t_before = teacher.head.weight.detach().clone()
    opt.step()
    method.after_optimizer_step(ctx)
    assert not torch.allclose(teacher.head.weight, t_before)  # EMA moved the teacher
    loss2 = next(gen)
    assert len(seen) == 3  # the unmixed sources (its cross labels), its view, the UMIX batch
    assert torch.equal(seen[0], seen[1])
    assert torch.equal(seen[2], s1.head.weight.detach()) and not torch.allclose(seen[1], seen[2])
    opt.zero_grad()
    loss2.backward()
    assert s1.head.weight.grad is not None and s1.head.weight.grad.abs().sum() > 0
    with pytest.raises(StopIteration):
        next(gen)
    logged = ctx.pop_logged()
    assert set(UCMT.scalars) <= set(logged)
    assert 0 <= logged["agreement"] <= 1 and 1 / 3 <= logged["teacher_confidence"] <= 1
    assert logged["ramp_weight"] == pytest.approx(0.1)
    assert method.optimizer_steps_per_iteration == 2
    # without UMIX only the CMT step is yielded
    no_umix = create_method("ucmt", umix="false", teacher="mixed")
    assert len(list(no_umix.training_step(lab, unl, ctx))) == 1 and no_umix.optimizer_steps_per_iteration == 1


def test_ucmt_pseudo_label_loss_and_weight_defaults():
    from autossl.ssl.methods._shared import pseudo_label_loss
    from autossl.ssl.methods.ucmt import ucmt_dice
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (2, 1, 6, 6), generator=g)
    m = create_method("ucmt")
    assert m.weight == (0.1, 0.75)  # (from scratch: the code's, after a warm start)
    assert UCMT.default_warmup == 0.3  # CPS's share of the run (round 6 of benchmarks.md)
    assert m.pseudo_loss(logits, y).item() == pytest.approx(pseudo_label_loss(logits, y, dice=True).item())
    code = create_method("ucmt", unsup_loss="dice", weight="0.1")
    assert code.weight == 0.1 and code.pseudo_loss(logits, y).item() == pytest.approx(ucmt_dice(logits, y).item())
    assert abs(m.pseudo_loss(logits, y).item() - code.pseudo_loss(logits, y).item()) > 0.05
    with pytest.raises(ValueError, match="unsup_loss"):
        create_method("ucmt", unsup_loss="mse")
    with pytest.raises(ValueError, match="weight"):
        create_method("ucmt", weight="-1")


def test_ucmt_cutmix_teacher_labels_the_unmixed_sources():
    """With CutMix (the default) the students see mixed images and learn the teacher's labels of
    the two unmixed sources, mixed under the same box: not the teacher's labels of the mix."""
    from autossl.components.augmentation.strong import cutmix
    from autossl.ssl.methods._shared import cutmix_partners, pseudo_label_loss
    torch.manual_seed(0)
    s1, s2, teacher = TinyDS(1), TinyDS(2), TinyDS(3)
    lab, unl = _batch(n=3)
    zero = lambda o, t: o[0].sum() * 0.0  # noqa: E731  (isolates the pseudo-label terms)
    method = create_method("ucmt", rampup="0", views="none", umix="false", cutmix_min=0.4, cutmix_max=0.4,
                           clean="false", weight="1", cross_labels="views", teacher="mixed")
    assert create_method("ucmt").cutmix and not create_method("ucmt", cutmix="false").cutmix
    ctx = _ctx({"student1": s1, "student2": s2, "teacher": teacher}, step=5)
    ctx.supervised_loss = zero
    (loss,) = method.training_step(lab, unl, ctx)
    ctx2 = _ctx({}, step=5)
    with torch.no_grad():
        pool, partner, box = cutmix_partners(unl["data"], lab["data"], ctx2, (0.4, 0.4))
        assert 0 < box.mean() < 1 and partner.tolist() == [1, 2, 0]
        x_u = cutmix(pool, pool[partner], box)
        p_src = torch.softmax(teacher(pool)[0], 1)
        y_t = cutmix(p_src, p_src[partner], box).argmax(1, keepdim=True)
        y_of_mix = torch.softmax(teacher(x_u)[0], 1).argmax(1, keepdim=True)
        assert not torch.equal(y_t, y_of_mix)
        m1, m2 = s1(x_u)[0], s2(x_u)[0]
        y1, y2 = m1.argmax(1, keepdim=True), m2.argmax(1, keepdim=True)
        cross = pseudo_label_loss(m1, y2, dice=True) + pseudo_label_loss(m2, y1, dice=True)
        expected = cross + pseudo_label_loss(m1, y_t, dice=True) + pseudo_label_loss(m2, y_t, dice=True)
        wrong = cross + pseudo_label_loss(m1, y_of_mix, dice=True) + pseudo_label_loss(m2, y_of_mix, dice=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - wrong.item()) > 1e-3


def test_mixed_source_labels_clean_each_source_before_the_mix():
    """A CutMix view holds two hearts: its hard labels are each source's cleaned labels, mixed,
    so both structures survive; cleaning the mixed map would erase the smaller one."""
    from autossl.components.augmentation.strong import cutmix
    from autossl.ssl.methods._shared import mixed_source_labels
    from autossl.ssl.pseudo_label_cleaning import keep_largest_components
    scores = torch.zeros(2, 3, 8, 8)
    scores[:, 0] = 1.0
    scores[0, 1, 1:4, 1:4] = 5.0    # source 0: class 1 top left (9 voxels)
    scores[0, 1, 0, 7] = 5.0        # ... and a stray voxel outside the box, which cleaning removes
    scores[1, 1, 5:7, 5:7] = 5.0    # source 1: class 1 bottom right (4 voxels)
    box = torch.zeros(1, 1, 8, 8)
    box[..., 4:, 4:] = 1            # the view: source 0 outside the box, source 1 inside
    partner = torch.tensor([1])
    ctx = _ctx({})
    ctx.single_component_classes = (1,)
    y = mixed_source_labels(scores, 1, partner, box, ctx, clean=True)
    expected = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    expected[0, 0, 1:4, 1:4] = 1
    expected[0, 0, 5:7, 5:7] = 1
    assert torch.equal(y, expected)
    mixed = cutmix(scores[:1], scores[1:], box).argmax(1, keepdim=True)
    assert int(keep_largest_components(mixed, (1,)).sum()) == 9  # the old order lost source 1's heart
    unclean = mixed_source_labels(scores, 1, partner, box, ctx, clean=False)
    assert torch.equal(unclean, mixed)   # without cleaning the order does not matter


def test_ucmt_teacher_pair_follows_each_student_and_averages_their_softmax():
    """teacher=pair (the default): one EMA teacher per student (no weight blend of two networks),
    and the teacher's probabilities are the mean of the two teachers' softmaxes; teacher=mixed is
    the code's one teacher blended 0.99 / 0.01."""
    torch.manual_seed(0)
    method = create_method("ucmt")
    assert [s.name for s in method.network_specs()] == ["student1", "student2", "teacher", "teacher2"]
    assert [s.copy_of for s in method.network_specs()][2:] == ["student1", "student2"]
    mixed = create_method("ucmt", teacher="mixed")
    assert [s.name for s in mixed.network_specs()] == ["student1", "student2", "teacher"]
    assert method.relative_cost(1.0) == pytest.approx(mixed.relative_cost(1.0) + 2 / 3)
    assert create_method("ucmt", predict="teacher").inference_networks() == ["teacher", "teacher2"]
    with pytest.raises(ValueError, match="teacher"):
        create_method("ucmt", teacher="both")
    s1, s2, t1, t2 = TinyDS(1), TinyDS(2), TinyDS(3), TinyDS(4)
    before = [copy.deepcopy(t.head.weight) for t in (t1, t2)]
    ctx = _ctx({"student1": s1, "student2": s2, "teacher": t1, "teacher2": t2}, step=9)
    decay = 1 - 1 / (ctx.ssl_step + 1)
    method.after_optimizer_step(ctx)
    for t, s, b in ((t1, s1, before[0]), (t2, s2, before[1])):
        assert torch.allclose(t.head.weight, decay * b + (1 - decay) * s.head.weight)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = 0.5 * (torch.softmax(t1(x)[0], 1) + torch.softmax(t2(x)[0], 1))
        assert torch.allclose(method.teacher_probabilities(x, ctx), expected)
        single = mixed.teacher_probabilities(x, ctx)
        assert torch.allclose(single, torch.softmax(t1(x)[0], 1)) and not torch.allclose(single, expected)


def test_ucmt_cross_labels_come_from_the_unmixed_sources():
    """cross_labels=sources (the default with CutMix): each student learns the other's labels of
    the unaugmented, unmixed sources, mixed under the same box, not the other's argmax of the mix;
    in the UMIX step those labels move with the blocks."""
    from autossl.components.augmentation.strong import cutmix
    from autossl.ssl.methods._shared import cutmix_partners, pseudo_label_loss
    from autossl.ssl.umix import umix
    torch.manual_seed(0)
    s1, s2, teacher = TinyDS(1), TinyDS(2), TinyDS(3)
    lab, unl = _batch(n=3)
    zero = lambda o, t: o[0].sum() * 0.0  # noqa: E731  (isolates the pseudo-label terms)
    method = create_method("ucmt", rampup="0", views="none", cutmix_min=0.4, cutmix_max=0.4,
                           clean="false", weight="1", grid="2", topk="1", teacher="mixed")
    assert method.cross_labels == "sources" and create_method("ucmt", cutmix="false").cross_labels == "views"
    with pytest.raises(ValueError, match="cross_labels=sources needs cutmix"):
        create_method("ucmt", cutmix="false", cross_labels="sources")
    ctx = _ctx({"student1": s1, "student2": s2, "teacher": teacher}, step=5)
    ctx.supervised_loss = zero
    step = method.training_step(lab, unl, ctx)
    loss1 = next(step)
    with torch.no_grad():  # the step's first loss, recomputed by hand before any weight changes
        pool, partner, box = cutmix_partners(unl["data"], lab["data"], _ctx({}, step=5), (0.4, 0.4))
        x_u = cutmix(pool, pool[partner], box)
        p_src = torch.softmax(teacher(pool)[0], 1)
        y_t = cutmix(p_src, p_src[partner], box).argmax(1, keepdim=True)
        src1, src2 = (cutmix(y, y[partner], box) for y in (s1(pool)[0].argmax(1, keepdim=True),
                                                             s2(pool)[0].argmax(1, keepdim=True)))
        m1, m2 = s1(x_u)[0], s2(x_u)[0]
        assert not torch.equal(src2, m2.argmax(1, keepdim=True))
        teach = pseudo_label_loss(m1, y_t, dice=True) + pseudo_label_loss(m2, y_t, dice=True)
        expected = pseudo_label_loss(m1, src2, dice=True) + pseudo_label_loss(m2, src1, dice=True) + teach
        own_view = (pseudo_label_loss(m1, m2.argmax(1, keepdim=True), dice=True)
                    + pseudo_label_loss(m2, m1.argmax(1, keepdim=True), dice=True) + teach)
        # the UMIX step's labels: the same blocks moved in the cross labels as in the teacher's
        x = torch.cat([lab["data"], x_u])
        p_t = torch.cat([torch.softmax(teacher(lab["data"])[0], 1), cutmix(p_src, p_src[partner], box)])
        unc1 = mean_entropy_uncertainty(torch.softmax(s1(x)[0], 1), p_t)
        unc2 = mean_entropy_uncertainty(torch.softmax(s2(x)[0], 1), p_t)
        full = lab["target"][0].long()
        mixed_x, (mt, mc1, mc2) = umix(x, [torch.cat([full, y_t]), torch.cat([full, src1]), torch.cat([full, src2])],
                                       unc1, unc2, 2, 1)
    assert loss1.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - own_view.item()) > 1e-3
    for net in (s1, s2):  # the second step sees the same weights here: no optimiser in this test
        net.zero_grad()
    loss2 = next(step)
    with torch.no_grad():
        q1, q2 = s1(mixed_x)[0][3:], s2(mixed_x)[0][3:]
        y_t2 = mt[3:]
        expected2 = (pseudo_label_loss(q1, mc2[3:], dice=True) + pseudo_label_loss(q2, mc1[3:], dice=True)
                     + pseudo_label_loss(q1, y_t2, dice=True) + pseudo_label_loss(q2, y_t2, dice=True))
    assert loss2.item() == pytest.approx(expected2.item(), rel=1e-5)


def test_ucmt_student_views():
    x = torch.randn(4, 1, 8, 10, 6)
    ctx = _ctx({}, step=0)
    v1, v2 = create_method("ucmt", views="none").student_views(x, ctx)
    assert v1 is x and v2 is x  # the loader's batch, untouched
    calls = []
    ctx_s = _ctx({}, step=0)
    ctx_s.strong_augment = lambda t: (calls.append(1), t + len(calls))[1]  # noqa: E731
    s1, s2 = create_method("ucmt").student_views(x, ctx_s)  # default: two strong-augmentation draws
    assert len(calls) == 2 and torch.equal(s1, x + 1) and torch.equal(s2, x + 2)
    b1, b2 = create_method("ucmt", views="blur").student_views(x, ctx)  # the 3D code's: p 0.8 per sample, independent draws
    changed = [not torch.equal(b1[i], x[i]) for i in range(4)] + [not torch.equal(b2[i], x[i]) for i in range(4)]
    assert any(changed) and not torch.equal(b1, b2)
    assert b1.shape == x.shape and torch.allclose(b1.mean(), x.mean(), atol=0.2)  # a blur keeps the mean level
    calls.clear()
    p1, p2 = create_method("ucmt", view_labeled="false").student_views(x, ctx_s, n_l=1)
    assert torch.equal(p1[:1], x[:1]) and torch.equal(p2[:1], x[:1])  # labelled: the loader's batch
    assert torch.equal(p1[1:], x[1:] + 1) and torch.equal(p2[1:], x[1:] + 2)
    q1, _ = create_method("ucmt", view_labeled="false").student_views(x[:2], ctx_s, n_l=2)
    assert q1 is not None and torch.equal(q1, x[:2])  # the warm start's labelled-only batch
    with pytest.raises(ValueError, match="views"):
        create_method("ucmt", views="sharp")


# ----------------------------------------------------------------------------- Primus2D
def test_primus2d_forward_backward_and_build():
    torch.manual_seed(0)
    arch = {"network_class_name": "autossl.networks.transformer2d.Primus2D",
            "arch_kwargs": {"embed_dim": 32, "patch_embed_size": [4, 8], "eva_depth": 1, "eva_numheads": 2,
                            "input_shape": [16, 24]},
            "_kw_requires_import": []}
    net = build_network(arch, input_channels=2, num_classes=3, deep_supervision=True)
    assert isinstance(net, Primus2D)
    x = torch.randn(2, 2, 16, 24)
    y = net(x)
    assert y.shape == (2, 3, 16, 24)  # one tensor, no deep supervision
    y.square().mean().backward()
    assert net.down_projection.proj.weight.grad.abs().sum() > 0
    assert net.eva.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert net.eva.rope is not None and net.eva.pos_embed.shape[1] == (16 // 4) * (24 // 8)
    with pytest.raises(ValueError, match="not divisible"):
        Primus2D(1, 32, (8, 8), 2, eva_depth=1, eva_numheads=2, input_shape=(20, 24))
    with pytest.raises(ValueError, match="powers of two"):
        Primus2D(1, 32, (6, 8), 2, eva_depth=1, eva_numheads=2, input_shape=(24, 24))
    with pytest.raises(ValueError, match="input_shape"):
        net(torch.randn(1, 2, 16, 16))


@pytest.mark.parametrize("patch", [[16, 14], [12, 16, 14]])
def test_planner_transformer_entries_build(patch):
    """The planner's own entries (2D: Primus2D, 3D: Primus) build and run at their patch size."""
    planning = pytest.importorskip("autossl.planning.transformer")
    entry = planning.transformer_architecture(patch, 2, 1, 4.0, max_preset="XT", min_preset="XT")
    assert entry["network_class_name"].endswith("Primus2D" if len(patch) == 2 else "primus.Primus")
    entry["arch_kwargs"]["eva_depth"] = 1  # keep it fast; the widths/heads/embedding are the planner's
    net = build_network(entry, input_channels=1, num_classes=3, deep_supervision=True)
    with torch.no_grad():
        y = net(torch.randn(1, 1, *patch))
    assert y.shape == (1, 3, *patch)


# ----------------------------------------------------------------------------- end to end
E2E_DATASET_ID = {"2d": 871, "3d_fullres": 872}
TINY_TRANSFORMER = {"2d": {"embed_dim": 32, "eva_depth": 1, "eva_numheads": 2},
                    "3d_fullres": {"embed_dim": 48, "eva_depth": 1, "eva_numheads": 2}}  # 3D RoPE: head dim % 6


def _shrink_plans(plans_file, configuration: str) -> None:
    """A tiny transformer (one block) and batch size 2 for speed; the planned CNN and patch stay."""
    from autossl.utilities.file_io import load_json, save_json

    plans = load_json(plans_file)
    cfg = plans["configurations"][configuration]
    cfg["batch_size"] = 2
    kwargs = cfg["transformer_architecture"]["arch_kwargs"]
    assert kwargs["input_shape"] == list(cfg["patch_size"])  # the planner feeds both networks the same patch
    kwargs.update(TINY_TRANSFORMER[configuration])
    kwargs["drop_path_rate"] = 0.0
    save_json(plans, plans_file)


@pytest.fixture(scope="module", params=["2d", "3d_fullres"])
def planned(request, tmp_path_factory):
    """A tiny synthetic dataset, fingerprinted, planned (CPU preset) and preprocessed for one configuration."""
    pytest.importorskip("autossl.training.trainer")
    from autossl.cli.plan_and_preprocess import extract_fingerprint, plan_experiment, preprocess
    from autossl.utilities.synthetic import make_synthetic_dataset

    configuration = request.param
    root = tmp_path_factory.mktemp(f"e2e_{configuration}")
    mp = pytest.MonkeyPatch()
    for var in ("autossl_raw", "autossl_preprocessed", "autossl_results"):
        (root / var).mkdir()
        mp.setenv(var, str(root / var))
    two_d = configuration == "2d"
    did = E2E_DATASET_ID[configuration]
    make_synthetic_dataset(root / "autossl_raw", did, "UcmtCt", two_d=two_d, n_labeled=5, n_unlabeled=4, n_test=1,
                           shape=(32, 32) if two_d else (16, 20, 20), seed=1)
    torch.manual_seed(0)
    extract_fingerprint(did, 1)
    ident = plan_experiment(did, "cpu")
    name = f"Dataset{did:03d}_UcmtCt"
    _shrink_plans(root / "autossl_preprocessed" / name / f"{ident}.json", configuration)
    preprocess(did, ident, [configuration], 1)
    yield {"root": root, "id": did, "name": name, "plans": ident, "configuration": configuration}
    mp.undo()


def _train(planned, *extra) -> None:
    from autossl.cli.train import main as train_main

    argv = [str(planned["id"]), planned["configuration"], "0", "-p", planned["plans"], "--epochs", "1",
            "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "0", "-device", "cpu",
            *extra]
    assert train_main(argv) == 0, argv


def _check_run(planned, trainer: str, networks: set[str], inference: list[str], scalars) -> None:
    from autossl.inference.predictor import Predictor
    from autossl.utilities.file_io import load_json

    root, name = planned["root"], planned["name"]
    model = root / "autossl_results" / name / f"{trainer}__{planned['plans']}__{planned['configuration']}"
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(ckpt["networks"]) == networks
    assert [s["name"] for s in ckpt["inference_networks"]] == inference
    log = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
    for s in scalars:
        assert s in log, f"{s} missing from the training log"
    predictor = Predictor(use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, use_folds=[0])
    assert list(predictor.networks) == inference
    out = root / f"pred_{trainer}"
    written = predictor.predict_from_files(str(root / "autossl_raw" / name / "imagesTs"), str(out))
    assert len(written) == 1
    dj = load_json(root / "autossl_raw" / name / "dataset.json")
    seg_files = list(out.glob(f"*{dj['file_ending']}"))
    assert len(seg_files) == 1


def test_e2e_cross_teaching(planned):
    _train(planned, "--ssl", "cross_teaching")
    _check_run(planned, "autosslTrainer_cross_teaching", {"cnn", "transformer"}, ["cnn"], CrossTeaching.scalars)
    model = planned["root"] / "autossl_results" / planned["name"]
    log = "".join(p.read_text() for p in model.glob("autosslTrainer_cross_teaching__*/fold_0/training_log_*.txt"))
    assert "note: no -pretrained_weights; cross teaching's transformer starts from scratch" in log
    assert "--method simmim --network transformer" in log
    _check_members(planned, "autosslTrainer_cross_teaching")


def _check_members(planned, trainer: str) -> None:
    """The transformer, or both networks, predict on request at predict time (--members)."""
    from autossl.cli.predict import main as predict_main
    from autossl.inference.predictor import PredictionError, Predictor

    root, name = planned["root"], planned["name"]
    model = root / "autossl_results" / name / f"{trainer}__{planned['plans']}__{planned['configuration']}"
    for members in (["transformer"], ["cnn", "transformer"]):
        predictor = Predictor(use_mirroring=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model, [0], members=members)
        assert list(predictor.networks) == members
        assert any(k.startswith("eva.") for k in predictor.networks["transformer"].state_dict())
    with pytest.raises(PredictionError, match="--members student1: not networks of this checkpoint; it has cnn, "
                                              "transformer"):
        Predictor(allow_tqdm=False).initialize_from_trained_model_folder(model, [0], members=["student1"])
    out = root / "pred_members"
    argv = ["-i", str(root / "autossl_raw" / name / "imagesTs"), "-o", str(out), "-d", str(planned["id"]),
            "-c", planned["configuration"], "-p", planned["plans"], "--ssl", "cross_teaching", "-f", "0",
            "--members", "cnn", "transformer", "--disable_tta", "-device", "cpu", "--disable_progress_bar"]
    assert predict_main(argv) == 0 and len(list(out.glob("*.nii.gz")) + list(out.glob("*.png"))) == 1


def test_e2e_ucmt(planned):
    _train(planned, "--ssl", "ucmt")
    _check_run(planned, "autosslTrainer_ucmt", {"student1", "student2", "teacher", "teacher2"}, ["student1", "student2"],
               UCMT.scalars)
    model = planned["root"] / "autossl_results" / planned["name"]
    log = "".join(p.read_text() for p in model.glob("autosslTrainer_ucmt__*/fold_0/training_log_*.txt"))
    # no hint of its own: the default for U-Nets, the whole-U-Net masked autoencoder
    assert log and "note: no -pretrained_weights" in log and "--method mae" in log and "simmim" not in log


def test_e2e_supervised_transformer(planned):
    _train(planned, "--network", "transformer")
    from autossl.training.naming import trainer_name

    name = trainer_name("none", "transformer")
    cfg = planned["configuration"]
    ckpt_dir = planned["root"] / "autossl_results" / planned["name"] / f"{name}__{planned['plans']}__{cfg}" / "fold_0"
    ckpt = torch.load(ckpt_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert [s["arch"] for s in ckpt["inference_networks"]] == ["transformer"]
    assert any(k.startswith("eva.blocks.0") for k in ckpt["network_weights"])
