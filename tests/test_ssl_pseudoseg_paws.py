"""PseudoSeg and PAWS: hand-computed cases of their mechanisms (the calibrated fusion and
sharpening, Grad-CAM, the affinity refinement; PAWS's soft label, ME-max and symmetric loss), a
step on a tiny planned U-Net, and end-to-end runs (train, resume with --c, predict) in 2d and
3d_fullres."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from autossl.ssl.methods._shared import sharpen
from autossl.ssl.methods.paws import (gather_voxels, me_max, paws_ce, sample_support, snn, support_labels)
from autossl.ssl.methods.pseudoseg import attention_refine, calibrated_fusion, cam_stage, grad_cam, max_normalise
from autossl.ssl.registry import available_methods, create_method
from autossl.components.losses import SupervisedLoss
from test_ssl_classic import make_ctx, zero_sup
from test_ssl_consistency import train_resume_and_predict
from test_training import prepare_dataset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(dim: int, num_classes: int = 2, seed: int = 0) -> nn.Module:
    """The tiny plans' U-Net: 3 stages of 4, 8, 16 features, deep supervision."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return PlainConvUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], [1, 1, 1], num_classes, [1, 1], True, norm_op=norm,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=True)


def batches(dim: int, num_classes: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (16, 16) if dim == 2 else (8, 16, 16)
    x = torch.randn(2, 1, *shape, generator=g)
    half = tuple(s // 2 for s in shape)
    target = [torch.randint(0, num_classes, (2, 1, *shape), generator=g),
              torch.randint(0, num_classes, (2, 1, *half), generator=g)]
    return ({"data": x, "target": target, "keys": ["a", "b"]},
            {"data": torch.randn(2, 1, *shape, generator=g), "keys": ["c", "d"]})


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_registered_with_options_and_costs():
    assert {"pseudoseg", "paws"} <= set(available_methods())
    ps = create_method("pseudoseg")
    assert (ps.threshold, ps.gamma, ps.temperature, ps.lambda_u) == (0.0, 0.5, 0.5, 1.0)
    assert ps.inference_networks() == ["student"]
    assert ps.relative_cost(1.0) == pytest.approx(7 / 3 + 4 / 3)  # FixMatch's + 2 classes x 2r / 3
    with pytest.raises(ValueError, match="gamma"):
        create_method("pseudoseg", gamma="1.5")
    paws = create_method("paws")
    assert [s.name for s in paws.network_specs()] == ["student"] and paws.inference_networks() == ["student"]
    assert (paws.tau, paws.temperature, paws.smoothing, paws.prior) == (0.1, 0.25, 0.1, "labelled")
    assert paws.relative_cost(1.0) == 3.0
    with pytest.raises(ValueError, match="me_max_prior"):
        create_method("paws", me_max_prior="balanced")


# ----------------------------------------------------------------------------- PseudoSeg
def test_sharpen_and_calibrated_fusion_hand_computed():
    torch.testing.assert_close(sharpen(torch.tensor([[0.6, 0.4]]), 0.5), torch.tensor([[0.36, 0.16]]) / 0.52)
    torch.testing.assert_close(sharpen(torch.tensor([[0.6, 0.4]]), 1.0), torch.tensor([[0.6, 0.4]]))
    # one voxel, two classes: p = (2, 0), m = (0, 1); N = ‖(2, 0, 0, 1)‖ = √5
    p = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    m = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    a = 1 / (1 + math.exp(-2 / math.sqrt(5)))       # softmax(p/N)_0 = 0.70978
    b = 1 / (1 + math.exp(1 / math.sqrt(5)))        # softmax(m/N)_0 = 0.39002
    mixed = np.array([0.5 * a + 0.5 * b, 0.5 * (1 - a) + 0.5 * (1 - b)])   # (0.54990, 0.45010)
    expected = mixed ** 2 / (mixed ** 2).sum()                              # T = 0.5: (0.59879, 0.40121)
    fused = calibrated_fusion(p, m, gamma=0.5, temperature=0.5).flatten()
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-5)
    assert fused[0].item() == pytest.approx(0.59879, abs=1e-4)
    # γ = 1: the decoder alone, softened by the joint norm, then sharpened
    np.testing.assert_allclose(calibrated_fusion(p, m, 1.0, 0.5).flatten().numpy(),
                               np.array([a, 1 - a]) ** 2 / (a ** 2 + (1 - a) ** 2), rtol=1e-5)
    # a confident decoder keeps its class against a CAM that disagrees; an unsure one follows the CAM
    assert calibrated_fusion(torch.tensor([8.0, 0.0]).view(1, 2, 1), m.view(1, 2, 1)).argmax(1).item() == 0
    assert calibrated_fusion(torch.tensor([0.2, 0.0]).view(1, 2, 1), m.view(1, 2, 1)).argmax(1).item() == 1


def test_grad_cam_of_hand_made_scores():
    # K = 2 channels at 2 positions: A_0 = (1, 2), A_1 = (3, 0)
    a = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(1, 2, 1, 2).requires_grad_(True)
    w = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    lin = torch.einsum("ck,bk...->bc...", w, a)                   # class 0: A_0, class 1: -A_1
    s = torch.cat([(lin ** 2).flatten(2).sum(2), -a[:, :1].flatten(2).sum(2)], 1)  # 3rd score: -Σ A_0
    cam = grad_cam(a, s).flatten(2)[0]
    # s_0 = Σ A_0²: α_00 = mean(2·1, 2·2) = 3, α_01 = 0 -> 3·A_0 = (3, 6)
    # s_1 = Σ A_1²: α_11 = mean(2·3, 0) = 3 -> 3·A_1 = (9, 0)
    # s_2 = -Σ A_0: α_20 = -1 -> ReLU(-A_0) = (0, 0)
    torch.testing.assert_close(cam, torch.tensor([[3.0, 6.0], [9.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(max_normalise(cam.view(1, 3, 1, 2)).flatten(2)[0],
                               torch.tensor([[0.5, 1.0], [1.0, 0.0], [0.0, 0.0]]))


def test_attention_refinement_hand_computed():
    # positions 0, 1 with features (1, 0) and (1, 1): cos = 1/√2 between them; τ = 0.5
    f = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 2)
    cam = torch.tensor([[1.0, 0.0]]).view(1, 1, 2)
    out = attention_refine(cam, f, temperature=0.5).flatten()
    c = 1 / math.sqrt(2)
    w00 = math.exp(2) / (math.exp(2) + math.exp(2 * c))          # row 0: softmax(2, 2c) = (0.6424, 0.3576)
    w10 = math.exp(2 * c) / (math.exp(2 * c) + math.exp(2))      # row 1: softmax(2c, 2) = (0.3576, 0.6424)
    np.testing.assert_allclose(out.numpy(), [w00, w10], rtol=1e-5)
    assert out[0].item() == pytest.approx(0.6424, abs=1e-4)
    # orthogonal features and a small τ: nothing propagates
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 2)
    assert attention_refine(cam, f, temperature=0.01).flatten().tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_cam_stage_is_the_finest_but_last_within_the_budget():
    net = tiny_unet(3)  # decoder stage 0 at 1/2 resolution, stage 1 (the last) at full resolution
    assert cam_stage(net, (8, 16, 16), 4096) == 0
    assert cam_stage(net, (8, 16, 16), 10) == 0  # nothing fits: the coarsest
    with pytest.raises(ValueError, match="U-Net"):
        cam_stage(nn.Conv3d(1, 2, 1), (8, 16, 16), 4096)


@pytest.mark.parametrize("dim", [2, 3])
def test_pseudoseg_step_pseudo_labels_carry_no_gradient(dim):
    net = tiny_unet(dim)
    lab, unl = batches(dim)
    method = create_method("pseudoseg", rampup="0")
    ctx = make_ctx({"student": net}, step=5, total_steps=10, supervised_loss=zero_sup,
                   strong_augment=lambda x: x + 0.1)
    method.setup(ctx)
    target, logits = method.pseudo_labels(net, unl["data"], ctx)
    assert all(p.grad is None for p in net.parameters())  # the weak pass and its Grad-CAM train nothing
    assert not target.requires_grad and target.shape == logits.shape == (2, 2, *unl["data"].shape[2:])
    torch.testing.assert_close(target.sum(1), torch.ones_like(target[:, 0]))
    with torch.no_grad():  # the decoder's logits are the network's on the weak view
        torch.testing.assert_close(logits, net(unl["data"])[0])
    (loss,) = list(method.training_step(lab, unl, ctx))
    loss.backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0  # the strong view's CE trains it
    logged = ctx.pop_logged()
    assert set(method.scalars) <= set(logged) and logged["pl_share"] == 1.0 and logged["loss_unsup"] > 0


def test_pseudoseg_targets_hard_by_default_soft_on_request():
    """target=hard: CE + the foreground Dice against the argmax of the fused ỹ; target=soft: the
    paper's soft CE against ỹ itself. A near-uniform ỹ (the calibrated fusion's flattening) gives
    the soft CE a large floor that the hard target does not have."""
    from autossl.components.losses import soft_dice_loss
    from autossl.ssl.methods.fixmatch import masked_ce
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 5, generator=g) * 3
    target = torch.softmax(torch.randn(2, 3, 6, 5, generator=g) * 0.3, 1)  # flat: top p ~ 0.4
    mask = torch.ones(2, 1, 6, 5)
    hard = create_method("pseudoseg")
    assert hard.target == "hard" and create_method("pseudoseg", target="soft").target == "soft"
    labels = target.argmax(1, keepdim=True)
    expected = masked_ce(logits, labels, mask) + soft_dice_loss(logits, labels, batch_dice=True, mask=mask)
    assert hard.unsup_loss(logits, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    soft = create_method("pseudoseg", target="soft").unsup_loss(logits, target, mask)
    expected_soft = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert soft.item() == pytest.approx(expected_soft.item(), rel=1e-6)
    # the perfect prediction of the argmax: the hard loss goes to ~0, the soft CE stays at ỹ's entropy
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float() * 50
    entropy = -(target * target.log()).sum(1).mean().item()
    assert hard.unsup_loss(perfect, target, mask).item() < 1e-3
    assert create_method("pseudoseg", target="soft").unsup_loss(perfect, target, mask).item() > entropy
    with pytest.raises(ValueError, match="target"):
        create_method("pseudoseg", target="fuzzy")


# ----------------------------------------------------------------------------- PAWS
def test_paws_soft_label_of_a_two_point_support():
    z_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                  # class 0, class 1
    y = support_labels(torch.tensor([0, 1]), 2, smoothing=0.0)
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    pi = snn(z, z_s, y, tau=0.5)
    e = math.exp(2)
    # z_0 ∥ z_s0: softmax(1/τ, 0) = (e², 1)/(e² + 1); z_1 at 45° to both: (½, ½);
    # z_2 = -z_s1: softmax(0, -1/τ) = (1, e⁻²)/(1 + e⁻²)
    expected = torch.tensor([[e / (e + 1), 1 / (e + 1)], [0.5, 0.5], [1 / (1 + 1 / e), (1 / e) / (1 + 1 / e)]])
    torch.testing.assert_close(pi, expected)
    assert pi[0, 0].item() == pytest.approx(0.8808, abs=1e-4)
    # label smoothing 0.1 with C = 2: y = (0.95, 0.05) and (0.05, 0.95)
    ys = support_labels(torch.tensor([0, 1]), 2, smoothing=0.1)
    torch.testing.assert_close(ys, torch.tensor([[0.95, 0.05], [0.05, 0.95]]))
    assert snn(z[:1], z_s, ys, 0.5)[0, 0].item() == pytest.approx(0.8808 * 0.95 + 0.1192 * 0.05, abs=1e-4)


def test_paws_me_max_and_symmetric_target_on_a_known_batch():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])                # mean (0.7, 0.3)
    neg_h = 0.7 * math.log(0.7) + 0.3 * math.log(0.3)              # -H = -0.61086
    assert me_max(probs).item() == pytest.approx(neg_h, abs=1e-6)
    assert me_max(probs, torch.tensor([0.5, 0.5])).item() == pytest.approx(neg_h + math.log(2), abs=1e-6)
    kl = 0.7 * math.log(0.7 / 0.8) + 0.3 * math.log(0.3 / 0.2)     # KL(p̄ ‖ (0.8, 0.2)) = 0.02817
    assert me_max(probs, torch.tensor([0.8, 0.2])).item() == pytest.approx(kl, abs=1e-6)
    assert me_max(probs, torch.tensor([0.7, 0.3])).item() == pytest.approx(0.0, abs=1e-6)
    # H(ρ(π₊), π): π₊ = (0.6, 0.4) sharpened with T = 0.25 -> (0.6⁴, 0.4⁴)/Σ = (0.8351, 0.1649)
    anchor = torch.tensor([[0.8, 0.2]], requires_grad=True)
    positive = torch.tensor([[0.6, 0.4]], requires_grad=True)
    t0 = 0.6 ** 4 / (0.6 ** 4 + 0.4 ** 4)
    loss = paws_ce(anchor, positive, 0.25)
    assert loss.item() == pytest.approx(-(t0 * math.log(0.8) + (1 - t0) * math.log(0.2)), abs=1e-6)
    loss.backward()
    assert positive.grad is None and anchor.grad is not None  # no gradient into the target view


def test_support_sampling_is_class_balanced_and_gathers_the_right_voxels():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)   # B = 2, K = 3, 4 voxels
    target = torch.tensor([[0, 0, 1, 0], [0, 2, 0, 0]]).view(2, 1, 4)    # class 1: (b0, v2), class 2: (b1, v1)
    f, y = sample_support(feats, target, 3, 5, torch.Generator().manual_seed(0))
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    torch.testing.assert_close(f[5:10], feats[0, :, 2].expand(5, 3))
    torch.testing.assert_close(f[10:], feats[1, :, 1].expand(5, 3))
    for row, label in zip(f[:5], y[:5]):  # background voxels: one of the six, features of that voxel
        assert any(torch.equal(row, feats[b, :, v]) for b in range(2) for v in range(4) if target[b, 0, v] == 0)
    g = gather_voxels(feats, torch.tensor([[3, 0], [1, 1]]))
    torch.testing.assert_close(g, torch.stack([feats[0, :, 3], feats[0, :, 0], feats[1, :, 1], feats[1, :, 1]]))


def _paws_step(dim: int, loss_scale: float = 1.0, sgd: bool = False):
    net = tiny_unet(dim, num_classes=3)
    lab, unl = batches(dim, num_classes=3)
    method = create_method("paws", rampup="0", anchors="64", support_per_class="8", head_lr="1.0")
    ctx = make_ctx({"student": net}, step=5, total_steps=10, num_classes=3, supervised_loss=SupervisedLoss(),
                   strong_augment=lambda x: x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    method.setup(ctx)
    if sgd:  # a step whose size shows the gradient's scale (Adam's would not)
        method.head_optimizer = torch.optim.SGD(method.head.parameters(), lr=1.0)
    before = [p.detach().clone() for p in method.head.parameters()]
    for loss in method.training_step(lab, unl, ctx):  # as the trainer: backward before the generator resumes
        (loss * loss_scale).backward()                # (an AMP loss scale)
    return method, net, ctx, [p.detach() - b for p, b in zip(method.head.parameters(), before)]


@pytest.mark.parametrize("dim", [2, 3])
def test_paws_step_trains_head_and_network_and_round_trips(dim):
    _, _, _, moved = _paws_step(dim, 1.0, sgd=True)
    _, _, _, moved_scaled = _paws_step(dim, 1024.0, sgd=True)
    assert all(m.abs().max() > 0 for m in moved)
    for a, b in zip(moved, moved_scaled):  # the head's step ignores the loss scale of the trainer's backward
        torch.testing.assert_close(a, b)
    method, net, ctx, moved = _paws_step(dim)
    assert all(m.abs().max() > 0 for m in moved) and all(p.grad is None for p in method.head.parameters())
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    logged = ctx.pop_logged()
    assert set(method.scalars) <= set(logged) and logged["support_classes"] == 3.0
    assert logged["loss_paws"] > 0 and 0 <= logged["agreement"] <= 1
    state = _round_trip(method.state_dict())
    assert (state["in_features"], state["hidden"], state["dim"]) == (4, 128, 64)
    resumed = create_method("paws")
    resumed.load_state_dict(state)  # before setup, as the trainer does
    resumed.setup(ctx)
    assert all(torch.equal(a, b) for a, b in zip(resumed.head.parameters(), method.head.parameters()))
    assert resumed.head_optimizer.state_dict()["state"][0]["step"] == 1
    other = create_method("paws", dim="32")
    other.load_state_dict(state)
    with pytest.raises(RuntimeError, match="projection head"):
        other.setup(ctx)


# ----------------------------------------------------------------------------- end to end through the trainer
@pytest.fixture(scope="module", params=["3d_fullres", "2d"])
def prepared(request, tmp_path_factory):
    two_d = request.param == "2d"
    return prepare_dataset(tmp_path_factory.mktemp(f"pseudoseg_paws_{request.param}"), 974 if two_d else 973, two_d)


E2E = {"pseudoseg": {}, "paws": {"anchors": "128", "support_per_class": "16"}}


@pytest.mark.parametrize("method_name", list(E2E))
def test_train_resume_and_predict(prepared, method_name, monkeypatch, tmp_path):
    def before_resume(t, latest):
        if method_name == "paws":  # one semi-supervised step before the stop: the head's Adam counted it
            assert latest["ssl_state"]["head_optimizer"]["state"][0]["step"] == 1

    t, final, text = train_resume_and_predict(prepared, method_name, E2E[method_name], monkeypatch, tmp_path,
                                              before_resume)
    assert set(final["networks"]) == {"student"}
    if method_name == "paws":  # the head continued from the checkpoint: 3 semi-supervised steps in all
        assert final["ssl_state"]["head_optimizer"]["state"][0]["step"] == 3
