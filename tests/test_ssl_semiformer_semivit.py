"""Semiformer and Semi-ViT: their mechanisms by hand (the fusion module, the network built from the
plans, Semiformer's loss; the confidence-weighted pseudo mixup, Semi-ViT's loss and EMA), then end
to end in 2d and 3d_fullres through the CLI: train, resume with --c, predict; and Semi-ViT's
composed pipeline: autossl_pretrain (transformer) -> supervised fine-tuning -> --ssl semi_vit."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from autossl.networks.build import ArchitectureError, architecture_entry, build_network
from autossl.networks.semiformer import FusionModule, Semiformer, resize_to
from autossl.networks.entries import hybrid_architecture
from autossl.ssl.context import TrainingContext
from autossl.ssl.methods.fixmatch import masked_ce
from autossl.ssl.methods.semi_vit import (SemiViT, partners, probabilistic_pseudo_mixup, pseudo_mixup_weight,
                                          soft_cross_entropy, soft_target_dice_loss)
from autossl.ssl.methods.semiformer import Semiformer as SemiformerMethod
from autossl.ssl.registry import create_method
from autossl.components.losses import SupervisedLoss, soft_dice_loss
from test_ssl_ucmt_ct import _check_run, _train, planned  # noqa: F401  (planned: the 2d / 3d_fullres fixture)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers
def _configuration(dim: int) -> tuple[dict, list[int]]:
    """A plans configuration with a tiny planned U-Net, a two-block transformer and the planner's
    hybrid entry."""
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    cnn = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
           "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": conv,
                           "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim],
                           "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                           "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                           "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                           "nonlin_kwargs": {"inplace": True}},
           "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    shape = [16, 16] if dim == 2 else [8, 16, 16]
    vit = {"network_class_name": "autossl.networks.transformer2d.Primus2D" if dim == 2 else
           "dynamic_network_architectures.architectures.primus.Primus",
           "arch_kwargs": {"embed_dim": 32 if dim == 2 else 48, "patch_embed_size": [8, 8] if dim == 2 else [4, 8, 8],
                           "eva_depth": 2, "eva_numheads": 2, "input_shape": shape},
           "_kw_requires_import": []}
    return {"architecture": cnn, "transformer_architecture": vit, "hybrid_architecture": hybrid_architecture()}, shape


def _semiformer(dim: int, seed: int = 0) -> tuple[Semiformer, list[int]]:
    cfg, shape = _configuration(dim)
    torch.manual_seed(seed)
    return build_network(architecture_entry(cfg, "hybrid"), 1, 3), shape


def _ctx(networks, total_steps=10, step=5, warm=False):
    return TrainingContext(networks=networks, total_steps=total_steps, num_classes=3, device=torch.device("cpu"),
                           supervised_loss=SupervisedLoss(), strong_augment=lambda x: x + 0.1,
                           rng=torch.Generator().manual_seed(0), step=step, warm_started=warm)


def _grad(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- Semiformer: fusion
def test_resize_to_pools_down_and_repeats_up_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down = resize_to(x, (2, 2))
    assert down[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # means of the 2x2 blocks
    up = resize_to(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), (4, 4))
    assert up[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    # an anisotropic pair: pooled along the first axis, repeated along the second
    mixed = resize_to(torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]]]), (2, 4))
    assert mixed[0, 0].tolist() == [[2, 2, 3, 3], [6, 6, 7, 7]]
    assert resize_to(x, (4, 4)) is x
    assert resize_to(torch.ones(1, 2, 4, 8, 8), (2, 2, 2)).shape == (1, 2, 2, 2, 2)


@pytest.mark.parametrize("dim", [2, 3])
def test_fusion_module_shapes_and_both_directions(dim):
    torch.manual_seed(0)
    fusion = FusionModule(cnn_channels=4, embed_dim=8, dim=dim)
    feat = torch.randn(2, 4, *([8] * dim), requires_grad=True)
    tokens = torch.randn(2, 8, *([2] * dim), requires_grad=True)
    new_feat, new_tokens = fusion(feat, tokens)
    assert new_feat.shape == feat.shape and new_tokens.shape == tokens.shape
    # each output is its input plus the other branch's share, aligned in channels and resolution
    assert torch.allclose(new_feat - feat, fusion.tokens_to_cnn(tokens, feat.shape[2:]), atol=1e-6)
    assert torch.allclose(new_tokens - tokens, fusion.cnn_to_tokens(feat, tokens.shape[2:]), atol=1e-6)
    new_feat.sum().backward(retain_graph=True)
    assert tokens.grad.abs().sum() > 0  # the CNN side depends on the tokens
    feat.grad = None
    new_tokens.sum().backward()
    assert feat.grad.abs().sum() > 0    # and the tokens on the CNN map


@pytest.mark.parametrize("dim", [2, 3])
def test_semiformer_gradients_reach_both_branches_through_the_fusions(dim):
    net, shape = _semiformer(dim)
    assert net.fusion_stages == [1, 2] and net.block_groups == [[0], [1], []]
    x = torch.randn(2, 1, *shape)
    cnn_logits, vit_logits = net(x, branches=True)
    assert cnn_logits.shape == vit_logits.shape == (2, 3, *shape)
    assert torch.allclose(net(x), 0.5 * (cnn_logits + vit_logits), atol=1e-6)  # the prediction: both heads
    cnn_logits.square().mean().backward()  # a loss on the CNN's output alone reaches the ViT
    assert _grad(net.transformer.eva.blocks[0]) > 0 and _grad(net.transformer.down_projection) > 0
    assert _grad(net.transformer.up_projection) == 0  # (whose decoder is not on that path)
    net.zero_grad()
    net(x, branches=True)[1].square().mean().backward()  # a loss on the ViT's output alone ...
    assert _grad(net.cnn.encoder.stages[0]) > 0 and _grad(net.cnn.encoder.stages[1]) > 0  # ... reaches the CNN
    # the fusion modules are the only route: cut them and the ViT gets nothing from the CNN's loss
    net.zero_grad()
    with torch.no_grad():
        for f in net.fusions:
            f.to_cnn.weight.zero_()
            f.to_cnn.bias.zero_()
    net(x, branches=True)[0].square().mean().backward()
    assert _grad(net.transformer.eva.blocks) == 0


def test_hybrid_entry_is_built_from_the_planned_architectures():
    cfg, shape = _configuration(2)
    entry = architecture_entry(cfg, "hybrid")
    assert entry["arch_kwargs"]["cnn"] == cfg["architecture"] and "_kw_plans_entries" not in entry
    assert cfg["hybrid_architecture"]["arch_kwargs"]["cnn"] == "architecture"  # the plans keep the reference
    net = build_network(entry, 1, 3)
    assert len(net.transformer.eva.blocks) == 2 and net.cnn.encoder.output_channels == [4, 8, 16]
    # an edit of the transformer entry is the hybrid's too (a reference, not a copy)
    cfg["transformer_architecture"]["arch_kwargs"]["eva_depth"] = 1
    assert len(build_network(architecture_entry(cfg, "hybrid"), 1, 3).transformer.eva.blocks) == 1
    # a single branch predicts on request (plans data)
    cfg["hybrid_architecture"]["arch_kwargs"]["predict"] = "cnn"
    net = build_network(architecture_entry(cfg, "hybrid"), 1, 3)
    x = torch.randn(1, 1, *shape)
    assert torch.equal(net(x), net(x, branches=True)[0])
    # plans written before the entry existed get the planner's default
    old = {k: v for k, v in cfg.items() if k != "hybrid_architecture"}
    assert architecture_entry(old, "hybrid")["network_class_name"].endswith("semiformer.Semiformer")
    # a configuration without a transformer (no even patch axis) is a clear error
    with pytest.raises(ArchitectureError, match="no even axis"):
        architecture_entry(dict(cfg, transformer_architecture=None), "hybrid")
    with pytest.raises(ArchitectureError, match="no even axis"):  # what the planner writes then
        architecture_entry(dict(cfg, transformer_architecture=None, hybrid_architecture=None), "hybrid")
    with pytest.raises(ValueError, match="fusion_stages"):
        Semiformer(1, 3, cfg["architecture"], cfg["transformer_architecture"], fusion_stages=[5])


# ----------------------------------------------------------------------------- Semiformer: the method
class TwoBranches(nn.Module):
    """A stand-in for the hybrid network: two 1x1 convolutions, one per branch; records its modes."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.cnn, self.vit = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 2)
        self.modes: list[bool] = []

    def forward(self, x, branches=False):
        self.modes.append(self.training)
        a, b = self.cnn(x), self.vit(x)
        return (a, b) if branches else 0.5 * (a + b)


def test_semiformer_step_matches_formula_with_the_cnns_pseudo_labels():
    net = TwoBranches()
    ctx = _ctx({"semiformer": net})
    g = torch.Generator().manual_seed(0)
    lab = {"data": torch.randn(2, 1, 6, 6, generator=g), "target": [torch.randint(0, 3, (2, 1, 6, 6), generator=g)]}
    unl = {"data": torch.randn(2, 1, 6, 6, generator=g)}
    method = create_method("semiformer", threshold="0.6", cutout="false", rampup="0")
    loss = next(method.training_step(lab, unl, ctx))
    assert net.modes == [False, True]  # the pseudo-labelling pass in eval mode, then training mode
    with torch.no_grad():
        p = torch.softmax(net.cnn(unl["data"]), 1)
        conf, y = p.max(1, keepdim=True)
        mask = (conf >= 0.6).float()
        vit_y = net.vit(unl["data"]).argmax(1, keepdim=True)
    assert 0 < mask.mean() < 1 and (vit_y != y).any()  # a case where the choice of branch matters
    strong = unl["data"] + 0.1
    sup = SupervisedLoss()
    expected = (sup(net.cnn(lab["data"]), lab["target"]) + sup(net.vit(lab["data"]), lab["target"])
                + 1.0 * (masked_ce(net.cnn(strong), y, mask) + masked_ce(net.vit(strong), y, mask)))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # pseudo=transformer takes the ViT's labels instead: another loss
    net.modes.clear()
    other = next(create_method("semiformer", threshold="0.6", cutout="false", rampup="0",
                               pseudo="transformer").training_step(lab, unl, ctx))
    assert other.item() != pytest.approx(loss.item(), rel=1e-4)
    logged = ctx.pop_logged()
    for s in SemiformerMethod.scalars:
        assert s in logged


def test_semiformer_specs_and_options():
    m = create_method("semiformer")
    assert [(s.name, s.arch, s.trainable) for s in m.network_specs()] == [("semiformer", "hybrid", True)]
    assert m.inference_networks() == ["semiformer"] and m.threshold == 0.95
    assert m.relative_cost(1.0) == pytest.approx(14 / 3)  # two branches' work, FixMatch's passes
    with pytest.raises(ValueError, match="pseudo"):
        create_method("semiformer", pseudo="vote")
    with pytest.raises(ValueError, match="--network transformer"):
        create_method("semiformer", network="transformer")


# ----------------------------------------------------------------------------- Semi-ViT: pseudo mixup
def test_confidence_weighted_mixup_of_two_known_samples():
    # sample a: one image of ones, the teacher says class 0 with 0.9 at voxel 0 and class 2 with 0.6 at voxel 1
    # sample b: zeros, class 1 with 0.8 at voxel 0, class 2 with 0.5 at voxel 1
    x = torch.stack([torch.ones(1, 1, 2), torch.zeros(1, 1, 2)])  # (2, C=1, 1, 2)
    probs = torch.tensor([[[0.9, 0.2], [0.1, 0.2], [0.0, 0.6]],
                          [[0.1, 0.3], [0.8, 0.2], [0.1, 0.5]]]).view(2, 3, 1, 2)
    partner = torch.tensor([1, 0])
    lam = torch.tensor([0.25, 0.5])
    mixed, target, conf = probabilistic_pseudo_mixup(x, probs, partner, lam)
    assert mixed[0].flatten().tolist() == pytest.approx([0.25, 0.25])  # λ·1 + (1-λ)·0
    assert mixed[1].flatten().tolist() == pytest.approx([0.5, 0.5])
    # sample 0, voxel 0: w_a = 0.25·0.9 / (0.25·0.9 + 0.75·0.8) = 0.225 / 0.825
    w = 0.225 / 0.825
    assert target[0, :, 0, 0].tolist() == pytest.approx([w, 1 - w, 0.0])
    # voxel 1: both say class 2, so the target is class 2 whatever the weights
    assert target[0, :, 0, 1].tolist() == pytest.approx([0.0, 0.0, 1.0])
    # sample 1 (b mixed with a, λ = 0.5): w_b = 0.8 / (0.8 + 0.9)
    assert target[1, :, 0, 0].tolist() == pytest.approx([0.9 / 1.7, 0.8 / 1.7, 0.0])
    assert conf[0].flatten().tolist() == pytest.approx([0.9, 0.6])  # max of the two confidences
    assert torch.allclose(target.sum(1), torch.ones(2, 1, 2))
    # equal confidences: plain mixup (weight λ); λ = 1/2: the confidence ratio
    assert pseudo_mixup_weight(0.3, torch.tensor(0.7), torch.tensor(0.7)).item() == pytest.approx(0.3)
    assert pseudo_mixup_weight(0.5, torch.tensor(0.9), torch.tensor(0.3)).item() == pytest.approx(0.75)
    # the official code's form: λ = c_a / (c_a + c_b) per voxel, for the image and the target
    mixed, target, _ = probabilistic_pseudo_mixup(x, probs, partner, None)
    assert mixed[0, 0, 0, 0].item() == pytest.approx(0.9 / 1.7) and mixed[0, 0, 0, 1].item() == pytest.approx(0.6 / 1.1)
    assert target[0, :, 0, 0].tolist() == pytest.approx([0.9 / 1.7, 0.8 / 1.7, 0.0])


def test_partners_never_mix_a_sample_with_itself():
    g = torch.Generator().manual_seed(0)
    for n in range(2, 7):
        p = partners(n, g)
        assert sorted(p.tolist()) == list(range(n)) and all(p[i] != i for i in range(n))


def test_semi_vit_step_matches_formula_and_the_teacher_is_an_ema():
    g = torch.Generator().manual_seed(1)
    student = nn.Conv2d(1, 3, 1)
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        student.weight.copy_(torch.randn(student.weight.shape, generator=g))
        student.bias.zero_()
        teacher.weight.copy_(student.weight + torch.randn(teacher.weight.shape, generator=g))
        teacher.bias.zero_()
    ctx = _ctx({"student": student, "teacher": teacher}, warm=True)
    lab = {"data": torch.randn(2, 1, 6, 6, generator=g), "target": [torch.randint(0, 3, (2, 1, 6, 6), generator=g)]}
    unl = {"data": torch.randn(3, 1, 6, 6, generator=g)}
    method = create_method("semi_vit", rampup="0", threshold="0.75", ema_decay="0.9")
    # the method's own draws, replayed from the same seeds
    rng = torch.Generator().manual_seed(0)
    ctx.rng = rng
    loss = next(method.training_step(lab, unl, ctx))
    rng.manual_seed(0)
    partner = partners(3, rng)
    lam = method.mixing_coefficients(3, ctx)
    with torch.no_grad():
        probs = torch.softmax(teacher(unl["data"]), 1)
    mixed, target, conf = probabilistic_pseudo_mixup(unl["data"] + 0.1, probs, partner, lam)
    mask = (conf >= 0.75).float()
    assert 0 < mask.mean() < 1
    expected = SupervisedLoss()(student(lab["data"]), lab["target"]) + \
        (soft_cross_entropy(student(mixed), target) * mask[:, 0]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert teacher.weight.grad is None
    # dice=true: the same step plus the Dice term against the same mixed targets
    with_dice = create_method("semi_vit", rampup="0", threshold="0.75", ema_decay="0.9", dice="true")
    rng.manual_seed(0)
    loss_dice = next(with_dice.training_step(lab, unl, ctx))
    assert loss_dice.item() == pytest.approx(
        (expected + soft_target_dice_loss(student(mixed), target, mask)).item(), rel=1e-5)
    t0, s0 = teacher.weight.clone(), student.weight.detach().clone()
    method.after_optimizer_step(ctx)
    assert torch.allclose(teacher.weight, 0.9 * t0 + 0.1 * s0)
    logged = ctx.pop_logged()
    assert all(s in logged for s in SemiViT.scalars)


def test_soft_target_dice_by_hand_and_against_the_hard_dice():
    import math

    # two voxels, background / foreground; softmax foreground 0.8 and 0.2; mixed targets 1.0 and 0.5
    fg = torch.tensor([0.8, 0.2])
    logits = torch.stack([torch.zeros(2), torch.log(fg / (1 - fg))]).view(1, 2, 1, 2)
    target = torch.stack([1 - torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5])]).view(1, 2, 1, 2)
    both = torch.ones(1, 1, 1, 2)
    assert soft_target_dice_loss(logits, target, both).item() == pytest.approx(1 - 2 * 0.9 / (1.0 + 1.5), abs=1e-5)
    first = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert soft_target_dice_loss(logits, target, first).item() == pytest.approx(1 - 1.6 / 1.8, abs=1e-5)
    # with one-hot targets it is the hard pseudo-labels' Dice term
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(3, 4, 5, 5, generator=g)
    labels = torch.randint(0, 4, (3, 1, 5, 5), generator=g)
    m = (torch.rand(3, 1, 5, 5, generator=g) > 0.3).float()
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    assert soft_target_dice_loss(lg, onehot, m).item() == pytest.approx(
        soft_dice_loss(lg, labels, batch_dice=True, mask=m).item(), abs=1e-5)
    assert not math.isnan(soft_target_dice_loss(lg, onehot, torch.zeros_like(m)).item())


def test_semi_vit_specs_transformer_by_default_cnn_on_request():
    m = create_method("semi_vit")
    assert [(s.name, s.arch, s.trainable, s.copy_of) for s in m.network_specs()] == \
        [("student", "transformer", True, None), ("teacher", "transformer", False, "student")]
    assert m.inference_networks() == ["teacher"] and m.relative_cost(1.0) == pytest.approx(7 / 3)
    assert {s.arch for s in create_method("semi_vit", network="cnn").network_specs()} == {"cnn"}
    assert create_method("semi_vit", inference="student").inference_networks() == ["student"]
    with pytest.raises(ValueError, match="mix"):
        create_method("semi_vit", mix="cutmix")


# ----------------------------------------------------------------------------- end to end
def _model(planned, trainer: str):
    return planned["root"] / "autossl_results" / planned["name"] / \
        f"{trainer}__{planned['plans']}__{planned['configuration']}"


def _newest_log(model) -> str:
    return sorted((model / "fold_0").glob("training_log_*.txt"))[-1].read_text()


def _train_stop_resume(planned, monkeypatch, trainer: str, *extra) -> None:
    """Two epochs of one iteration: stopped after the first, continued with --c."""
    from autossl.training.trainer import Trainer

    class Stop(Exception):
        pass

    original = Trainer._end_epoch

    def end_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise Stop

    args = ("--epochs", "2", "--iterations-per-epoch", "1", *extra)
    monkeypatch.setattr(Trainer, "_end_epoch", end_then_stop)
    with pytest.raises(Stop):
        _train(planned, *args)
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    fold = _model(planned, trainer) / "fold_0"
    assert torch.load(fold / "checkpoint_latest.pth", weights_only=True)["current_step"] == 1
    _train(planned, *args, "--c")
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "continuing from" in log and "at step 1/2" in log
    assert torch.load(fold / "checkpoint_final.pth", weights_only=True)["current_step"] == 2


def test_e2e_semiformer(planned, monkeypatch):
    _train_stop_resume(planned, monkeypatch, "autosslTrainer_semiformer", "--ssl", "semiformer")
    _check_run(planned, "autosslTrainer_semiformer", {"semiformer"}, ["semiformer"], SemiformerMethod.scalars)
    ckpt = torch.load(_model(planned, "autosslTrainer_semiformer") / "fold_0" / "checkpoint_final.pth",
                      weights_only=True)
    assert ckpt["inference_networks"] == [{"name": "semiformer", "arch": "hybrid"}]
    keys = ckpt["networks"]["semiformer"]
    assert any(k.startswith("cnn.encoder.") for k in keys) and any(k.startswith("transformer.eva.") for k in keys)
    assert any(k.startswith("fusions.") for k in keys)


def test_e2e_semi_vit(planned, monkeypatch):
    _train_stop_resume(planned, monkeypatch, "autosslTrainer_semi_vit", "--ssl", "semi_vit")
    _check_run(planned, "autosslTrainer_semi_vit", {"student", "teacher"}, ["teacher"],
               [s for s in SemiViT.scalars])
    ckpt = torch.load(_model(planned, "autosslTrainer_semi_vit") / "fold_0" / "checkpoint_final.pth",
                      weights_only=True)
    assert ckpt["inference_networks"] == [{"name": "teacher", "arch": "transformer"}]


def test_e2e_semi_vit_on_the_cnn(planned):
    _train(planned, "--ssl", "semi_vit", "--ssl-opt", "network=cnn")
    _check_run(planned, "autosslTrainer_semi_vit", {"student", "teacher"}, ["teacher"], ["loss_unsup", "mix_purity"])
    ckpt = torch.load(_model(planned, "autosslTrainer_semi_vit") / "fold_0" / "checkpoint_final.pth",
                      weights_only=True)
    assert ckpt["inference_networks"] == [{"name": "teacher", "arch": "cnn"}]
    assert any(k.startswith("encoder.stages.") for k in ckpt["networks"]["teacher"])


def test_e2e_semi_vit_pipeline(planned, monkeypatch):
    """autossl_pretrain (simmim, transformer) -> supervised fine-tuning from its encoder ->
    --ssl semi_vit from the supervised checkpoint -> predict."""
    from autossl.cli.pretrain import main as pretrain_main
    from autossl.pretraining.trainer import pretrainer_name
    from autossl.training.naming import trainer_name
    from autossl.training.trainer import Trainer

    cfg, ident = planned["configuration"], planned["plans"]
    assert pretrain_main([str(planned["id"]), cfg, "-p", ident, "--method", "simmim", "--network", "transformer",
                          "--epochs", "1", "--iterations-per-epoch", "2", "--num-workers", "0",
                          "-device", "cpu"]) == 0
    pre = planned["root"] / "autossl_results" / planned["name"] / \
        f"{pretrainer_name('simmim', 'transformer')}__{ident}__{cfg}"
    encoder = torch.load(pre / "fold_all" / "checkpoint_final.pth", weights_only=True)["encoder"]
    assert any(k.startswith("eva.blocks.") for k in encoder) and not any(k.startswith("up_projection") for k in encoder)

    # stage 2: supervised fine-tuning of the transformer from the pre-trained patch embedding and blocks
    _train(planned, "--network", "transformer", "-pretrained_weights", str(pre))
    supervised = _model(planned, trainer_name("none", "transformer"))
    log = _newest_log(supervised)
    assert "pre-trained encoder from" in log and "up_projection" in log  # the decoder left at initialisation
    t = Trainer(planned["id"], cfg, 0, plans=ident, network="transformer", device="cpu", epochs=1,
                iterations_per_epoch=1, val_iterations=0, num_workers=0, verbose=False, pretrained_weights=pre)
    t.initialize()
    assert t.load_pretrained_weights(pre) == {"student": "encoder"}
    sd = t.networks["student"].state_dict()
    assert all(torch.equal(sd[k], v) for k, v in encoder.items())

    # stage 3: student and EMA teacher both start from the supervised transformer, then predict
    _train(planned, "--ssl", "semi_vit", "-pretrained_weights", str(supervised))
    log = _newest_log(_model(planned, "autosslTrainer_semi_vit"))
    assert f"pretrained weights from {supervised / 'fold_0' / 'checkpoint_final.pth'}" in log
    assert "student <- student" in log and "teacher <- student" in log and "supervised warm start" not in log
    _check_run(planned, "autosslTrainer_semi_vit", {"student", "teacher"}, ["teacher"], ["loss_unsup", "pl_share"])
    t = Trainer(planned["id"], cfg, 0, plans=ident, ssl="semi_vit", device="cpu", epochs=1, iterations_per_epoch=1,
                val_iterations=0, num_workers=0, verbose=False, pretrained_weights=supervised)
    assert t.warmup_steps == 0  # warm already: no supervised phase of its own
    t.initialize()
    assert t.load_pretrained_weights(supervised) == {"student": "student", "teacher": "student"}
    final = torch.load(supervised / "fold_0" / "checkpoint_final.pth", weights_only=True)["networks"]["student"]
    assert all(torch.equal(t.networks["teacher"].state_dict()[k], v) for k, v in final.items())


def test_cross_teaching_from_two_pretrainings_one_per_kind_of_network(planned):
    """-pretrained_weights with two pre-trainings: mae's U-Net into the CNN, simmim's transformer
    into the transformer; two for the same network, or a trained run among them, are errors."""
    from autossl.cli.pretrain import main as pretrain_main
    from autossl.components.errors import TrainingError
    from autossl.pretraining.trainer import pretrainer_name
    from autossl.training.trainer import Trainer

    cfg, ident = planned["configuration"], planned["plans"]
    results = planned["root"] / "autossl_results" / planned["name"]
    folders = {}
    for method, network in (("mae", "cnn"), ("simmim", "transformer")):
        folders[method] = results / f"{pretrainer_name(method, network)}__{ident}__{cfg}"
        if not (folders[method] / "fold_all" / "checkpoint_final.pth").is_file():
            assert pretrain_main([str(planned["id"]), cfg, "-p", ident, "--method", method, "--network", network,
                                  "--epochs", "1", "--iterations-per-epoch", "1", "--num-workers", "0",
                                  "-device", "cpu"]) == 0
    both = [folders["mae"], folders["simmim"]]

    def trainer(sources):
        return Trainer(planned["id"], cfg, 0, plans=ident, ssl="cross_teaching", device="cpu", epochs=1,
                       iterations_per_epoch=1, val_iterations=0, num_workers=0, verbose=False,
                       pretrained_weights=sources)

    t = trainer(both)
    assert t.warmup == t.method.default_warmup  # pre-trainings only: the supervised warm start still runs
    t.initialize()
    assert t.load_pretrained_sources() == {"cnn": folders["mae"], "transformer": folders["simmim"]}
    for name, method in (("cnn", "mae"), ("transformer", "simmim")):
        encoder = torch.load(folders[method] / "fold_all" / "checkpoint_final.pth", weights_only=True)["encoder"]
        sd = t.networks[name].state_dict()
        assert all(torch.equal(sd[k], v) for k, v in encoder.items())
    t = trainer([folders["mae"], folders["mae"]])
    t.initialize()
    with pytest.raises(TrainingError, match="both load network 'cnn'"):
        t.load_pretrained_sources()
    # the command line takes both after one flag
    _train(planned, "--ssl", "cross_teaching", "-pretrained_weights", *map(str, both))
    run = _model(planned, "autosslTrainer_cross_teaching")
    log = _newest_log(run)
    for method in ("mae", "simmim"):
        assert f"pre-trained encoder from {folders[method] / 'fold_all' / 'checkpoint_final.pth'}" in log
    assert "decoder.* but the segmentation heads" in log
    # a trained segmentation run among several sources
    with pytest.raises(TrainingError, match="pre-trainings .*only"):
        trainer([run, folders["simmim"]])
