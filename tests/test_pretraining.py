"""Self-supervised pre-training (``autossl/pretraining``): each method's loss / queue / EMA /
memory-bank step by hand, every registered method on a tiny encoder, and end to end in 2d and
3d_fullres: pre-train, resume with --c, fine-tune supervised and semi-supervised from the
checkpoint with -pretrained_weights, predict."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autossl.components.ema import ema_update
from autossl.components.errors import TrainingError
from autossl.pretraining.base import StepContext, cosine_momentum, embedding_std
from autossl.pretraining.losses import info_nce, in_batch_info_nce, negative_cosine, normalized_mse, nt_xent, sinkhorn
from autossl.pretraining.registry import available_methods, create_method
from test_training import TINY, prepare_dataset

torch.set_num_threads(1)


def _unet(dim: int = 2, heads: int = 3, deep_supervision: bool = False):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d
    return PlainConvUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], [1, 1, 1], heads, [1, 1], norm_op=norm,
                         norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision)


def _encoder(dim: int = 2):
    return _unet(dim).encoder


# ----------------------------------------------------------------------------- losses by hand
def test_nt_xent_of_two_known_embeddings():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # same directions: each positive has cosine 1
    # every anchor: positive exp(1), two negatives exp(0) (orthogonal); itself excluded
    expected = -math.log(math.e / (math.e + 2))
    assert float(nt_xent(z1, z2, 1.0)) == pytest.approx(expected, rel=1e-6)
    # temperature 0.5 doubles the logits
    assert float(nt_xent(z1, z2, 0.5)) == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2)), rel=1e-6)


def test_info_nce_with_a_queue_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0) + math.exp(-1 / 0.5)))
    assert float(info_nce(q, k, neg, 0.5)) == pytest.approx(expected, rel=1e-6)
    # MoCo v3's in-batch form is scaled by 2 tau
    qq = torch.eye(2)
    assert float(in_batch_info_nce(qq, qq, 1.0)) == pytest.approx(2 * -math.log(math.e / (math.e + 1)), rel=1e-6)


def test_moco_queue_enqueue_and_dequeue_order():
    m = create_method("moco_v2", _encoder(), queue="3", dim="2", hidden="8")
    keys = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.0]]),
            torch.tensor([[0.0, -1.0]])]
    m.enqueue(torch.cat(keys[:2]))  # rows 0, 1
    assert int(m.queue_ptr) == 2
    m.enqueue(torch.cat(keys[2:]))  # row 2, then the oldest (row 0) is replaced
    assert int(m.queue_ptr) == 1
    assert torch.equal(m.queue, torch.cat([keys[3], keys[1], keys[2]]))


def test_moco_key_encoder_is_an_ema_and_gets_no_gradient():
    m = create_method("moco_v1", _encoder(), queue="8", momentum="0.5")
    assert not any(p.requires_grad for p in m.key.parameters())
    x = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)]
    loss, sc = m.loss(x, StepContext(0, 10))
    loss.backward()
    q0 = [p.detach().clone() for p in m.query.parameters()]
    k0 = [p.detach().clone() for p in m.key.parameters()]
    with torch.no_grad():
        for p in m.query.parameters():
            p.add_(1.0)
    m.after_step(StepContext(0, 10))
    for k, kb, qb in zip(m.key.parameters(), k0, q0):
        assert torch.allclose(k, 0.5 * kb + 0.5 * (qb + 1.0))
    assert int(m.queue_ptr) == 2  # this step's two keys were enqueued


def test_ema_update_and_byols_cosine_momentum():
    t, o = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        t.weight.fill_(1.0)
        o.weight.fill_(3.0)
    ema_update(t, [o], 0.9)
    assert float(t.weight.detach()) == pytest.approx(1.2)
    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)


def test_byol_normalised_mse_and_target_step():
    p, z = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert float(normalized_mse(p, z)) == pytest.approx(2.0)
    assert float(normalized_mse(p, 3 * p)) == pytest.approx(0.0, abs=1e-6)
    m = create_method("byol", _encoder(), momentum="0.9")
    before = [p.detach().clone() for p in m.target.parameters()]
    loss, sc = m.loss([torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)], StepContext(0, 2))
    loss.backward()
    assert all(p.grad is None for p in m.target.parameters())
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(1.0)
    m.after_step(StepContext(0, 2))  # tau at step 1 of 2: 1 - 0.1 * (cos(pi/2) + 1) / 2 = 0.95
    for t, b, o in zip(m.target.parameters(), before, m.online.parameters()):
        assert torch.allclose(t, 0.95 * b + 0.05 * o)


def test_simsiam_gradient_does_not_flow_through_the_stop_gradient_side():
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = negative_cosine(p, z)
    assert float(loss.detach()) == pytest.approx(-1 / math.sqrt(2))
    loss.backward()
    assert z.grad is None and p.grad is not None
    # through the method: the projector output of view 2 only gets gradient via its predictor
    m = create_method("simsiam", _encoder(), dim="8")
    captured = {}

    def hook(module, inp, out):
        out.retain_grad()
        captured.setdefault("z", []).append(out)

    m.projector.register_forward_hook(hook)
    loss, _ = m.loss([torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)], StepContext(0, 1))
    loss.backward()
    z1, z2 = captured["z"]
    # d loss / d z1 is the gradient through its predictor alone: -cos(p2, z1) sends none to z1
    leaf = z1.detach().requires_grad_()
    (0.5 * negative_cosine(m.predictor(leaf), z2)).backward()
    assert torch.allclose(z1.grad, leaf.grad, atol=1e-6)


def test_invaspread_loss_by_hand():
    from autossl.pretraining.methods.invaspread import invaspread_loss

    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # P(i | x^_i) = e / (e + 1) (tau 1); P(i | x_j), j != i: 1 / (e + 1)
    pos = -2 * math.log(math.e / (math.e + 1))
    neg = -2 * math.log(1 - 1 / (math.e + 1))
    assert float(invaspread_loss(f, f, 1.0)) == pytest.approx((pos + neg) / 2, rel=1e-6)


def test_instdisc_nce_and_memory_bank_update():
    from autossl.pretraining.methods.instdisc import nce_loss

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0]])
    loss, e = nce_loss(v, bank, torch.tensor([0]), torch.tensor([[1]]), 1.0, z=2.0)
    p_pos, p_neg = math.e / 2, 1 / 2
    h_pos, h_neg = p_pos / (p_pos + 1 / 2), p_neg / (p_neg + 1 / 2)
    assert float(loss) == pytest.approx(-math.log(h_pos) - math.log(1 - h_neg), rel=1e-6)
    m = create_method("instdisc", _encoder(), num_samples=5, negatives="4", bank_momentum="0.5")
    idx = torch.tensor([3, 1])
    loss, _ = m.loss([torch.randn(2, 1, 16, 16)], StepContext(0, 1, idx, 5))
    assert float(m.z) > 0  # Z estimated once from the first batch
    old = m.bank.clone()
    new_v = m._pending[1]
    m.after_step(StepContext(0, 1, idx, 5))
    assert torch.allclose(m.bank[3], F.normalize(0.5 * old[3] + 0.5 * new_v[0], dim=0))
    assert torch.equal(m.bank[0], old[0])


def test_sinkhorn_codes_spread_mass_equally_over_prototypes():
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 1.0], [2.0, 0.5]])
    q = sinkhorn(scores, epsilon=1.0, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-5)        # one code per sample
    assert torch.allclose(q.sum(0), torch.full((2,), 2.0), atol=1e-3)  # equal mass per prototype
    assert (q[:, 0] > 0.5).sum() >= 1 and (q[:, 1] > 0.5).sum() >= 1  # not all on prototype 0


def _transformer_encoder(dim: int = 3):
    """The planned transformer's encoder half (Primus / Primus2D, one block) as pre-training sees it."""
    from autossl.networks.build import build_network
    from autossl.networks.tokens import TransformerEncoder

    cls = "dynamic_network_architectures.architectures.primus.Primus" if dim == 3 else \
        "autossl.networks.transformer2d.Primus2D"
    shape = [8, 16, 16] if dim == 3 else [16, 16]
    arch = {"network_class_name": cls, "_kw_requires_import": [],
            "arch_kwargs": {"embed_dim": 48 if dim == 3 else 32, "patch_embed_size": [4, 8, 8][-dim:],
                            "eva_depth": 1, "eva_numheads": 2, "input_shape": shape}}
    return TransformerEncoder(build_network(arch, 1, 3))


def _encoder_for(name: str, dim: int = 3):
    from autossl.pretraining.registry import get_method_class

    cls = get_method_class(name)
    if getattr(cls, "whole_network", False):
        return _unet(dim, heads=1)  # the trainer's reconstruction heads: the input's channels
    return _encoder(dim) if "cnn" in cls.networks else _transformer_encoder(dim)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_steps_on_a_tiny_encoder(name):
    torch.manual_seed(0)
    m = create_method(name, _encoder_for(name), num_samples=4)
    views = [torch.randn(2, 1, 8, 16, 16) for _ in range(m.num_views)]
    ctx = StepContext(0, 4, torch.tensor([0, 2]), 4)
    loss, scalars = m.loss(views, ctx)
    assert torch.isfinite(loss) and "embedding_std" in scalars
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())
    m.after_step(ctx)
    state = m.state_dict()
    fresh = create_method(name, _encoder_for(name), num_samples=4)
    fresh.load_state_dict(state)


def test_patchify_and_token_mask_by_hand():
    from autossl.pretraining.methods.simmim import patchify, random_token_mask

    x = torch.arange(16.0).view(1, 1, 4, 4)
    t = patchify(x, (2, 2))
    assert t.shape == (1, 4, 2, 2)
    assert t[0, :, 0, 0].tolist() == [0, 1, 4, 5] and t[0, :, 0, 1].tolist() == [2, 3, 6, 7]
    assert t[0, :, 1, 0].tolist() == [8, 9, 12, 13]
    x3 = torch.arange(8.0).view(1, 1, 2, 2, 2)
    assert patchify(x3, (2, 2, 2))[0, :, 0, 0, 0].tolist() == list(range(8))
    m = random_token_mask(3, 10, 0.6, "cpu")
    assert m.shape == (3, 10) and m.sum(1).tolist() == [6, 6, 6]


def test_simmim_masks_tokens_and_scores_only_the_masked_ones(monkeypatch):
    import autossl.pretraining.methods.simmim as simmim

    torch.manual_seed(0)
    m = create_method("simmim", _transformer_encoder(2))  # Primus2D, patch 8x8, input 16x16: 4 tokens
    # token k (row-major on the 2x2 grid) holds the value k + 1 everywhere
    x = torch.arange(1.0, 5.0).view(1, 1, 2, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
    mask = torch.tensor([[True, True, False, False]])
    monkeypatch.setattr(simmim, "random_token_mask", lambda b, n, r, d: mask)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
    loss, scalars = m.loss([x], StepContext(0, 1))
    assert loss.item() == pytest.approx((1 + 2) / 2)  # |0 - voxel| over tokens 0 and 1 only; all four: 2.5
    assert scalars["masked_share"] == pytest.approx(0.5)
    # a masked token's voxels never reach the encoder: its embedding is the mask token
    y = x.clone()
    y[..., :8, :8] = 100.0  # token 0
    with torch.no_grad():
        a = m.encoder(x, token_mask=mask, mask_token=m.mask_token)
        b = m.encoder(y, token_mask=mask, mask_token=m.mask_token)
        c = m.encoder(y)
    assert torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="--network transformer"):
        create_method("simmim", _encoder())


def test_mae_block_mask_and_loss_over_masked_voxels_only(monkeypatch):
    import autossl.pretraining.methods.mae as mae

    enc = _unet(2, heads=1).encoder
    assert mae.total_strides(enc) == (4, 4)
    assert mae.total_strides(_unet(3).encoder) == (4, 4, 4)
    m = mae.block_mask((10, 8), (4, 4), 0.5, 3, "cpu")  # a 3 x 2 grid, the last row cropped to 2
    assert m.shape == (3, 1, 10, 8)
    for b in range(3):
        cells = m[b, 0, ::4, ::4]
        assert cells.sum() == 3  # round(0.5 * 6) cells
        assert torch.equal(m[b, 0], cells.repeat_interleave(4, 0).repeat_interleave(4, 1)[:10])

    torch.manual_seed(0)
    method = create_method("mae", _unet(2, heads=1))
    # block (0, 0) and (1, 1) of a 16 x 16 image (4 x 4 cells of 4) masked; the image is 1 + cell index
    cells = torch.zeros(1, 1, 4, 4)
    cells[0, 0, 0, 0] = cells[0, 0, 1, 1] = 1
    mask = cells.repeat_interleave(4, 2).repeat_interleave(4, 3)
    monkeypatch.setattr(mae, "block_mask", lambda shape, block, ratio, b, d: mask)
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        for layer in method.net.decoder.seg_layers:
            layer.weight.zero_()
            layer.bias.zero_()
    loss, scalars = method.loss([x], StepContext(0, 1))
    assert loss.item() == pytest.approx((1 ** 2 + 6 ** 2) / 2)  # (0 - voxel)^2 over cells 0 and 5 only
    assert scalars["masked_share"] == pytest.approx(2 / 16)
    # a masked voxel's value never reaches the network: the encoder sees 0 there, x elsewhere
    seen = []
    method.net.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    method.loss([x], StepContext(0, 1))
    assert torch.equal(seen[0], x * (1 - mask)) and seen[0][0, 0, :4, :4].abs().sum() == 0
    with pytest.raises(ValueError, match="encoder and decoder"):
        create_method("mae", _encoder())


def test_embedding_std_detects_collapse():
    assert embedding_std(torch.ones(8, 4)) == pytest.approx(0.0, abs=1e-6)
    assert embedding_std(torch.randn(512, 4)) > 0.3


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown option"):
        create_method("simclr", _encoder(), tau="0.1")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module", params=["2d", "3d_fullres"])
def prepared(request, tmp_path_factory):
    two_d = request.param == "2d"
    return prepare_dataset(tmp_path_factory.mktemp(f"pretrain_{request.param}"), 982 if two_d else 981, two_d)


@pytest.fixture
def prepared_env(prepared, monkeypatch, tmp_path):
    """The prepared dataset's folders, results in this test's own folder, loading in-process."""
    for k, v in prepared["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("autossl_results", str(tmp_path / "results"))
    monkeypatch.setenv("autossl_n_proc_DA", "0")
    return prepared


def test_pretrain_resume_finetune_and_predict(prepared_env, monkeypatch, tmp_path):
    from autossl.inference.predictor import Predictor
    from autossl.pretraining.trainer import Pretrainer
    from autossl.training.trainer import Trainer

    cfg = prepared_env["configuration"]
    method = "simclr" if cfg == "2d" else "moco_v2"

    def pretrainer():
        return Pretrainer(prepared_env["id"], cfg, method, plans=TINY, epochs=2, iterations_per_epoch=1, device="cpu",
                          num_workers=0, verbose=False, method_options={"hidden": "32"})

    class Stop(Exception):
        pass

    original = Pretrainer._end_epoch

    def end_then_stop(self, *a, **k):
        original(self, *a, **k)
        raise Stop

    monkeypatch.setattr(Pretrainer, "_end_epoch", end_then_stop)
    with pytest.raises(Stop):
        pretrainer().run()
    monkeypatch.setattr(Pretrainer, "_end_epoch", original)
    p = pretrainer()
    assert p.output_folder == tmp_path / "results" / prepared_env["name"] / f"autosslPretrainer_{method}__{TINY}__{cfg}" \
        / "fold_all"
    latest = torch.load(p.output_folder / "checkpoint_latest.pth", weights_only=True)
    assert latest["current_step"] == 1
    assert len(p.cases) == 10  # 6 labelled + 4 unlabelled images
    final_path = p.run(continue_training=True)
    final = torch.load(final_path, weights_only=True)
    assert final["current_step"] == 2 and len(final["history"]["loss"]) == 2
    assert (p.output_folder / "progress.png").is_file()
    log = "".join(f.read_text() for f in p.output_folder.glob("training_log_*.txt"))
    assert "continuing from checkpoint_latest.pth at step 1/2" in log and "ETA" in log and "embedding_std" in log

    # fine-tune: supervised and semi-supervised from the pre-trained encoder
    for ssl in ("none", "entropy_min"):
        t = Trainer(prepared_env["id"], cfg, "all", plans=TINY, ssl=ssl, device="cpu", epochs=1, iterations_per_epoch=1,
                    val_iterations=0, num_workers=0, verbose=False, pretrained_weights=p.output_folder_base)
        t.initialize()
        # an encoder alone is no trained segmentation network: the method's warm start still runs
        assert t.warmup == t.method.default_warmup
        chosen = t.load_pretrained_weights(t.pretrained_weights)
        assert set(chosen) == {s.name for s in t.specs if s.arch == "cnn"}
        assert t.ctx.warm_started == (t.warmup_steps > 0)
        for name in chosen:
            sd = t.networks[name].state_dict()
            for k, v in final["encoder"].items():
                assert torch.equal(sd[k], v) and torch.equal(sd["decoder." + k], v)
        t2 = Trainer(prepared_env["id"], cfg, "all", plans=TINY, ssl=ssl, device="cpu", epochs=1, iterations_per_epoch=1,
                     val_iterations=0, num_workers=0, verbose=False, pretrained_weights=p.output_folder_base)
        t2.run()
        text = "".join(f.read_text() for f in t2.output_folder.glob("training_log_*.txt"))
        assert "pre-trained encoder from" in text and "left at initialisation" in text

    raw = Path(prepared_env["env"]["autossl_raw"]) / prepared_env["name"] / "imagesTrUnlabeled"
    image = sorted(raw.iterdir())[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(image, inputs / image.name)
    predictor = Predictor(use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(t2.output_folder_base, use_folds=["all"])
    assert len(predictor.predict_from_files(str(inputs), str(tmp_path / "pred"))) == 1

    # a pre-trained encoder of other plans is a clear error
    bad = dict(final)
    bad["encoder"] = dict(final["encoder"])
    k = next(k for k, v in bad["encoder"].items() if v.ndim >= 4)
    bad["encoder"][k] = torch.zeros(7, *bad["encoder"][k].shape[1:])
    torch.save(bad, tmp_path / "bad.pth")
    t3 = Trainer(prepared_env["id"], cfg, "all", plans=TINY, ssl="none", device="cpu", epochs=1, iterations_per_epoch=1,
                 val_iterations=0, num_workers=0, verbose=False)
    t3.initialize()
    with pytest.raises(TrainingError, match="does not fit network .*shape"):
        t3.load_pretrained_weights(tmp_path / "bad.pth")
    bad["architecture"] = dict(final["architecture"], network_class_name="some.OtherUNet")
    torch.save(bad, tmp_path / "bad2.pth")
    with pytest.raises(TrainingError, match="some.OtherUNet"):
        t3.load_pretrained_weights(tmp_path / "bad2.pth")


def test_mae_pretrains_and_hands_over_the_decoder_too(prepared_env, tmp_path):
    from autossl.pretraining.trainer import Pretrainer
    from autossl.training.trainer import Trainer

    cfg = prepared_env["configuration"]
    p = Pretrainer(prepared_env["id"], cfg, "mae", plans=TINY, epochs=1, iterations_per_epoch=2, device="cpu",
                   num_workers=0, verbose=False)
    final = torch.load(p.run(), weights_only=True)
    keys = set(final["encoder"])
    assert any(k.startswith("decoder.stages.") for k in keys) and any(k.startswith("encoder.") for k in keys)
    assert not any(k.startswith(("decoder.seg_layers.", "decoder.encoder.")) for k in keys)

    t = Trainer(prepared_env["id"], cfg, "all", plans=TINY, ssl="none", device="cpu", epochs=1, iterations_per_epoch=1,
                val_iterations=0, num_workers=0, verbose=False, pretrained_weights=p.output_folder_base)
    t.initialize()
    heads_before = {k: v.clone() for k, v in t.networks[t.specs[0].name].state_dict().items() if "seg_layers" in k}
    t.load_pretrained_weights(t.pretrained_weights)
    sd = t.networks[t.specs[0].name].state_dict()
    for k, v in final["encoder"].items():
        assert torch.equal(sd[k], v)
    assert all(torch.equal(sd[k], v) for k, v in heads_before.items())  # heads: the segmentation run's own
    log = "".join(f.read_text() for f in t.output_folder.glob("training_log_*.txt"))
    assert "decoder.* but the segmentation heads" in log and "decoder.seg_layers" in log
    # a pre-training whose decoder does not fit is refused by name
    bad = dict(final, encoder={k: v for k, v in final["encoder"].items() if not k.startswith("decoder.stages.0.")})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(TrainingError, match="missing.*decoder.stages.0"):
        t.load_pretrained_weights(tmp_path / "bad.pth")


def test_cli_rejects_an_unknown_method(capsys):
    from autossl.cli.pretrain import main

    assert main(["1", "2d", "--method", "nope"]) == 2
    assert "available" in capsys.readouterr().err
