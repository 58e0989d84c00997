"""The consistency plug-ins Π-model, temporal ensembling and GCT: hand-computed unit cases, and
tiny end-to-end runs (train, resume with --c, predict) in 2d and 3d_fullres."""
from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from autossl.components.losses import SupervisedLoss
from autossl.preprocessing import storage
from autossl.ssl.registry import available_methods, create_method
from test_ssl_classic import conv1x1, labeled_batch, make_ctx
from test_training import TINY, prepare_dataset

from autossl.ssl.methods.gct import (FlawDetector, dc_loss, dynamic_consistency_masks, fc_loss, flaw_target,
                                     gaussian_blur, handle_flawmap)
from autossl.ssl.methods.temporal_ensembling import TemporalEnsemble, decode_targets, encode_targets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than several, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights_only_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------- registry and options
def test_registered_with_networks_costs_and_option_errors():
    assert {"pi_model", "temporal_ensembling", "gct"} <= set(available_methods())
    pi = create_method("pi_model")
    assert [(s.name, s.dropout) for s in pi.network_specs()] == [("student", 0.2)]
    assert pi.relative_cost(1.0) == pytest.approx(4.0)
    assert create_method("pi_model", stop_gradient="true").relative_cost(1.0) == pytest.approx(8 / 3)
    te = create_method("temporal_ensembling")
    assert [s.name for s in te.network_specs()] == ["student"] and te.relative_cost(1.0) == pytest.approx(2.0)
    gct = create_method("gct")
    assert [(s.name, s.seed_offset) for s in gct.network_specs()] == [("cnn1", 0), ("cnn2", 1)]
    assert gct.inference_networks() == ["cnn1", "cnn2"] and gct.relative_cost(1.0) == pytest.approx(4.0)
    assert create_method("gct", inference="cnn2").inference_networks() == ["cnn2"]
    for name, opts, match in [
        ("pi_model", {"dropout": "1.0"}, "dropout"), ("pi_model", {"augment": "heavy"}, "augment"),
        ("pi_model", {"rampup": "-1"}, "rampup"), ("pi_model", {"noise_std": "-0.1"}, "noise_std"),
        ("temporal_ensembling", {"alpha": "1"}, "alpha"),
        ("temporal_ensembling", {"update_every": "0"}, "update_every"),
        ("temporal_ensembling", {"resolution": "quarter"}, "resolution"),
        ("temporal_ensembling", {"store": "int8"}, "store"), ("temporal_ensembling", {"levels": "1"}, "levels"),
        ("gct", {"threshold": "1.5"}, "threshold"), ("gct", {"fd_lr": "0"}, "fd_lr"), ("gct", {"mu": "0"}, "mu"),
        ("gct", {"nu": "-1"}, "nu"), ("gct", {"dc_weight": "-1"}, "dc_weight"),
        ("gct", {"inference": "x"}, "inference"),
    ]:
        with pytest.raises(ValueError, match=match):
            create_method(name, **opts)


# ----------------------------------------------------------------------------- Π-model
class _Outputs(nn.Module):
    """Returns the given logits in turn (times a parameter s = 1), whatever the input."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.s = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x):
        out = self.outputs[self.calls % len(self.outputs)] * self.s
        self.calls += 1
        return out


def test_pi_model_loss_of_two_known_outputs():
    l3 = math.log(3.0)
    # (B=2: one labelled, one unlabelled; C=2; spatial 1x1x2), branch a then branch b
    a = torch.tensor([[[l3, l3]], [[0.0, 0.0]]]).view(1, 2, 1, 1, 2).repeat(2, 1, 1, 1, 1)  # p = (.75, .25)
    b = torch.zeros(2, 2, 1, 1, 2)
    b[0, 0, 0, 0, 1] = l3          # sample 0: voxel 0 p = (.5, .5), voxel 1 p = (.75, .25)
    b[1, 1, 0, 0, 0] = l3          # sample 1: voxel 0 p = (.25, .75), voxel 1 p = (.5, .5)
    x = torch.zeros(1, 1, 1, 1, 2)
    # squared differences summed over classes: 0.125, 0, 0.5, 0.125; mean over 4 voxels x 2 classes
    for opts, expected in [({}, 0.75 / 8), ({"labeled_consistency": "false"}, 0.625 / 4)]:
        net = _Outputs([torch.cat([a, b])])  # both branches in one forward pass
        method = create_method("pi_model", **{"lambda": "2", "rampup": "0", "noise_std": "0"}, **opts)
        ctx = make_ctx({"student": net})
        (loss,) = list(method.training_step(labeled_batch(x), {"data": x, "keys": ["u"]}, ctx))
        assert loss.item() == pytest.approx(2 * expected, abs=1e-6)
        assert ctx.pop_logged()["loss_unsup"] == pytest.approx(expected, abs=1e-6)
    # both branches carry gradient (the paper); stop_gradient detaches the second
    for stop, grad_b, outputs in [("false", True, [torch.cat([a, b])]), ("true", False, [a, b])]:
        net = _Outputs(outputs)
        method = create_method("pi_model", **{"lambda": "2", "rampup": "0", "noise_std": "0", "stop_gradient": stop})
        (loss,) = list(method.training_step(labeled_batch(x), {"data": x, "keys": ["u"]}, make_ctx({"student": net})))
        loss.backward()
        s = torch.ones((), requires_grad=True)
        pb = torch.softmax(b * s, 1) if grad_b else torch.softmax(b, 1)
        ref = 2 * ((torch.softmax(a * s, 1) - pb) ** 2).mean()
        (ref_grad,) = torch.autograd.grad(ref, s)
        assert net.s.grad.item() == pytest.approx(ref_grad.item(), abs=1e-6)


def test_pi_model_branches_see_independent_noise():
    net = conv1x1([1.0, -1.0], [0.0, 0.0])
    seen = []
    net.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    x = torch.randn(2, 1, 2, 3, 3)
    method = create_method("pi_model", rampup="0")
    list(method.training_step(labeled_batch(x), {"data": x, "keys": ["u", "v"]}, make_ctx({"student": net})))
    assert len(seen) == 1 and seen[0].shape[0] == 8  # one pass over both branches
    n1, n2 = seen[0][:4] - torch.cat([x, x]), seen[0][4:] - torch.cat([x, x])
    assert n1.abs().max() <= 0.2 + 1e-6 and n2.abs().max() <= 0.2 + 1e-6 and not torch.allclose(n1, n2)


# ----------------------------------------------------------------------------- temporal ensembling
def _fg(p_fg: list[float]) -> torch.Tensor:
    """Two-class probabilities (2, 1, 1, n) from foreground probabilities."""
    fg = torch.tensor(p_fg).view(1, 1, 1, -1)
    return torch.cat([1 - fg, fg])


@pytest.mark.parametrize("store,tol", [("float16", 2e-3), ("uint8", 4e-3)])
def test_temporal_ensemble_bias_corrected_target_after_three_updates(store, tol):
    ens = TemporalEnsemble(alpha=0.6, store=store)
    ens.update("c", _fg([0.9, 0.2]))
    # one update: Z = 0.4 z1, corrected by 1 - 0.6 = 0.4: the target is z1 itself
    assert ens.target("c")[1].flatten().tolist() == pytest.approx([0.9, 0.2], abs=tol)
    ens.update("c", _fg([0.5, 0.2]))
    ens.update("c", _fg([0.7, 0.2]))
    # Z3 = 0.144 z1 + 0.24 z2 + 0.4 z3, 1 - 0.6^3 = 0.784: (0.1296 + 0.12 + 0.28) / 0.784 = 0.67551
    t = ens.target("c")
    assert ens.count["c"] == 3 and t.shape == (2, 1, 1, 2)
    assert t[1].flatten().tolist() == pytest.approx([0.5296 / 0.784, 0.2], abs=tol)
    assert t[0].flatten().tolist() == pytest.approx([1 - 0.5296 / 0.784, 0.8], abs=tol)
    # the checkpoint state holds only tensors and plain data, and restores the same targets
    restored = TemporalEnsemble()
    restored.load_state_dict(_weights_only_round_trip(ens.state_dict()))
    assert restored.store == store and restored.count == {"c": 3}
    assert torch.equal(restored.target("c"), t)


def test_temporal_ensemble_half_resolution_and_memory():
    ens = TemporalEnsemble(alpha=0.5, store="uint8", factors=(1, 2, 2))
    probs = torch.zeros(3, 2, 5, 6)
    probs[0] = 1.0
    ens.update("c", probs)
    assert tuple(ens.z["c"].shape) == (3, 2, 3, 3) and ens.nbytes() == 3 * 2 * 3 * 3
    t = ens.target("c")
    assert t.shape == (3, 2, 5, 6) and torch.allclose(t[0], torch.ones(2, 5, 6))
    with pytest.raises(ValueError, match="was"):
        ens.update("c", torch.zeros(3, 2, 5, 7))


def test_soft_target_codes_round_trip():
    # C = 2, 16 levels: p = (0.2, 0.8) -> class 1, level round(0.3 / 0.5 * 15) = 9, code 16 + 9 = 25, q = 0.8;
    # (0.5, 0.5) -> class 0, level 0; (0.98, 0.02) -> class 0, level round(0.48 / 0.5 * 15) = 14, q = 0.9667
    codes = encode_targets(_fg([0.8, 0.5, 0.02]), 16)
    assert codes.dtype == torch.int16 and codes.flatten().tolist() == [25, 0, 14]
    target, valid = decode_targets(torch.cat([codes, torch.full_like(codes, -1)], -1)[None], 2, 16)
    assert valid.flatten().tolist() == [True] * 3 + [False] * 3
    assert target[0, 1, 0, 0, :3].tolist() == pytest.approx([0.8, 0.5, 0.5 - 0.5 * 14 / 15], abs=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(1, 1, 1, 6))
    # C = 3: the arg-max keeps its (quantised) probability, the rest is spread evenly
    p = torch.tensor([0.1, 0.7, 0.2]).view(3, 1, 1, 1)
    t, _ = decode_targets(encode_targets(p, 16)[None], 3, 16)
    step = (1 - 1 / 3) / 15
    assert abs(t[0, 1].item() - 0.7) <= step / 2 + 1e-6 and t[0, 0].item() == pytest.approx(t[0, 2].item())
    with pytest.raises(ValueError, match="int16"):
        encode_targets(torch.full((5, 1, 1, 1), 0.2), 10000)


def test_temporal_ensembling_step_updates_hands_over_and_resumes():
    """Updates at ssl steps 0 and 2 (update_every=2), the whole pool each time, the targets go to
    the loader; the loss is the masked MSE against the decoded target; a resumed method hands the
    checkpoint's targets over again without predicting."""
    net = conv1x1([1.0, -1.0], [0.0, 0.0])
    predicted: list[list[str]] = []
    handed: list[dict] = []
    pool = {"u1": _fg([0.9, 0.2]), "u2": _fg([0.6, 0.6])}

    mirroring: list = []

    def predict(cases, **kw):
        predicted.append(list(cases))
        mirroring.append(kw.get("mirroring", True))
        return {c: pool[c].numpy() for c in cases}

    def hand(labels):
        handed.append({c: labels[c] for c in labels})

    def ctx_at(step):
        return make_ctx({"student": net}, step=step, predict_unlabeled=predict, set_pseudo_labels=hand,
                        unlabeled_cases=["u1", "u2"])

    method = create_method("temporal_ensembling", update_every="2", noise_std="0", rampup="0", store="float16",
                           chunk="1")
    x = torch.zeros(1, 1, 1, 1, 2)
    unl = {"data": x, "keys": ["u1"]}
    ctx = ctx_at(0)
    list(method.training_step(labeled_batch(x), unl, ctx))
    assert predicted == [["u1"], ["u2"]] and method.updates == 1 and len(handed) == 1
    codes = torch.as_tensor(handed[0]["u1"])
    assert codes.shape == (1, 1, 1, 2)
    logged = ctx.pop_logged()
    assert logged["loss_unsup"] == 0.0 and logged["target_share"] == 0.0  # that batch was drawn before
    # the next batch carries the target codes (here: the whole case, one voxel padded with -1)
    codes[..., 1] = -1
    ctx = ctx_at(1)
    (loss,) = list(method.training_step(labeled_batch(x), {"data": x, "keys": ["u1"], "target": [codes[None]]}, ctx))
    assert len(predicted) == 2  # no update at ssl step 1
    p = torch.softmax(torch.zeros(2), 0)  # the 1x1 conv on x = 0: logits 0
    q = 0.5 + 0.5 * round((0.9 - 0.5) / 0.5 * 15) / 15
    expected = ((p[1] - q) ** 2 + (p[0] - (1 - q)) ** 2).item() / 2  # one valid voxel, mean over 2 classes
    assert ctx.pop_logged()["loss_unsup"] == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * expected, abs=1e-6)
    list(method.training_step(labeled_batch(x), unl, ctx_at(2)))
    assert len(predicted) == 4 and method.updates == 2 and method.ensemble.count == {"u1": 2, "u2": 2}
    assert mirroring == [False] * 4  # the network's own output, not a mirrored average
    # --c: the state restores the ensemble; the first step hands its targets over, no prediction
    resumed = create_method("temporal_ensembling", update_every="2", noise_std="0", rampup="0", store="float16")
    resumed.load_state_dict(_weights_only_round_trip(method.state_dict()))
    before = len(predicted)
    list(resumed.training_step(labeled_batch(x), unl, ctx_at(3)))
    assert len(predicted) == before and len(handed) == 3
    assert np.array_equal(handed[-1]["u2"], handed[-2]["u2"])


def test_temporal_ensembling_without_the_trainers_predictor_says_so():
    net = conv1x1([1.0, -1.0], [0.0, 0.0])
    x = torch.zeros(1, 1, 1, 1, 2)
    with pytest.raises(RuntimeError, match="predict_unlabeled"):
        list(create_method("temporal_ensembling").training_step(labeled_batch(x), {"data": x, "keys": ["u"]},
                                                                 make_ctx({"student": net})))


# ----------------------------------------------------------------------------- GCT
def test_flaw_detector_target_map_hand_computed():
    # three pixels (2D, 1x3), label 0 everywhere; p = (.9, .1), (.3, .7), (.6, .4)
    p = torch.tensor([[0.9, 0.3, 0.6], [0.1, 0.7, 0.4]]).view(1, 2, 1, 3)
    y = torch.zeros(1, 1, 1, 3, dtype=torch.int16)
    # mu·Σ|onehot - p| = 0.5·(0.2, 1.4, 0.8) = (0.1, 0.7, 0.4) -> min-max: (0, 1, 0.5)
    gt = flaw_target(p, y, mu=0.5, nu=0)
    assert gt.flatten().tolist() == pytest.approx([0.0, 1.0, 0.5], abs=1e-6)
    # an ignored voxel (label outside the classes) is no flaw: (0.1, 0, 0.4) -> (0.25, 0, 1)
    y_ignore = torch.tensor([0, 2, 0], dtype=torch.int16).view(1, 1, 1, 3)
    assert flaw_target(p, y_ignore, mu=0.5, nu=0).flatten().tolist() == pytest.approx([0.25, 0.0, 1.0], abs=1e-6)
    # with the blur and a dilation (the code's pipeline C) the map is still normalised per sample
    p3 = torch.softmax(torch.randn(2, 3, 6, 8, 8), 1)
    y3 = torch.randint(0, 3, (2, 1, 6, 8, 8))
    g3 = flaw_target(p3, y3, blur=[0.5, 1.0, 1.0], reblur=[1.0, 2.0, 2.0], nu=1)
    assert g3.shape == (2, 1, 6, 8, 8)
    assert g3.flatten(1).min(1)[0].tolist() == pytest.approx([0, 0]) and g3.flatten(1).max(1)[0].tolist() == \
        pytest.approx([1, 1])
    # the blur keeps a constant map and the mass of an impulse
    assert torch.allclose(gaussian_blur(torch.ones(1, 1, 5, 7), [1.0, 2.0]), torch.ones(1, 1, 5, 7))
    imp = torch.zeros(1, 1, 9, 9, 9)
    imp[0, 0, 4, 4, 4] = 1
    assert gaussian_blur(imp, [1.0, 1.0, 1.0]).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_gct_dynamic_consistency_direction_on_two_pixels():
    """Pixel A: network 1's flaw is lower -> network 2 learns from network 1 there; pixel B: the
    other way round; pixel C: both above τ -> no consistency, flaw correction instead."""
    h1 = torch.tensor([0.1, 0.5, 0.7]).view(1, 1, 1, 3)
    h2 = torch.tensor([0.3, 0.2, 0.9]).view(1, 1, 1, 3)
    learn1, learn2, both = dynamic_consistency_masks(h1, h2, threshold=0.6)
    assert learn1.flatten().tolist() == [0, 1, 0] and learn2.flatten().tolist() == [1, 0, 0]
    assert both.flatten().tolist() == [0, 0, 1]
    p1 = torch.tensor([[0.9, 0.6, 0.5], [0.1, 0.4, 0.5]]).view(1, 2, 1, 3).requires_grad_()
    p2 = torch.tensor([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]]).view(1, 2, 1, 3).requires_grad_()
    d1 = dc_loss(p1, p2, learn1)   # pixel B: (0.6 - 0.2)² + (0.4 - 0.8)² = 0.32, mean over 3 pixels
    d1.backward()
    assert d1.item() == pytest.approx(0.32 / 3)
    assert p2.grad is None  # the target side carries no gradient
    assert p1.grad.flatten().tolist() == pytest.approx([0, 2 * 0.4 / 3, 0, 0, -2 * 0.4 / 3, 0])
    d2 = dc_loss(p2, p1, learn2)   # pixel A: (0.7 - 0.9)² + (0.3 - 0.1)² = 0.08
    d2.backward()
    assert d2.item() == pytest.approx(0.08 / 3)
    assert p2.grad.flatten().tolist() == pytest.approx([2 * -0.2 / 3, 0, 0, 2 * 0.2 / 3, 0, 0])
    # flaw correction only where both are bad
    f = torch.tensor([0.5, 0.5, 0.5]).view(1, 1, 1, 3)
    assert fc_loss(f, both).item() == pytest.approx(0.25 / 3)
    # the handler: a map whose maximum is at most 0.1 means "no flaw"; otherwise min-max normalised
    assert handle_flawmap(torch.full((1, 1, 1, 3), 0.05)).abs().max().item() == 0.0
    assert handle_flawmap(torch.tensor([-1.0, 0.2, 0.6]).view(1, 1, 1, 3)).flatten().tolist() == \
        pytest.approx([0.0, 1 / 3, 1.0], abs=1e-6)


@pytest.mark.parametrize("dim", [2, 3])
def test_gct_step_trains_the_flaw_detector_and_round_trips_its_state(dim):
    torch.manual_seed(0)
    shape = (8, 8) if dim == 2 else (4, 8, 8)
    nets = {"cnn1": conv1x1([1.0, -1.0], [0.0, 0.0], dim), "cnn2": conv1x1([-0.5, 0.5], [0.1, 0.0], dim)}
    x = torch.randn(2, 1, *shape)
    lab = {"data": x, "target": [torch.randint(0, 2, (2, 1, *shape), dtype=torch.int16)], "keys": ["a", "b"]}
    unl = {"data": torch.randn(2, 1, *shape), "keys": ["c", "d"]}
    method = create_method("gct", rampup="0", fd_lr="1e-2")
    ctx = make_ctx(nets, step=10, supervised_loss=SupervisedLoss())
    for loss in method.training_step(lab, unl, ctx):  # as the trainer: backward before the generator resumes
        before = [p.detach().clone() for p in method.fd.parameters()]
        loss.backward()
        assert method.fd.body[0].weight.grad is None  # D gets no gradient from the task networks' loss
        assert all(n.weight.grad is not None and n.weight.grad.abs().sum() > 0 for n in nets.values())
    assert isinstance(method.fd, FlawDetector) and method.fd.in_channels == 1 + 2
    assert any(not torch.equal(b, p) for b, p in zip(before, method.fd.parameters()))
    logged = ctx.pop_logged()
    assert set(method.scalars) <= set(logged) and logged["loss_fd"] > 0
    with torch.no_grad():
        f = method.fd(x, torch.softmax(nets["cnn1"](x), 1))
    assert f.shape == (2, 1, *shape)
    state = _weights_only_round_trip(method.state_dict())
    resumed = create_method("gct", rampup="0", fd_lr="1e-2")
    resumed.load_state_dict(state)
    fd = resumed.detector(x, make_ctx(nets))
    assert all(torch.equal(a, b) for a, b in zip(fd.parameters(), method.fd.parameters()))
    assert resumed.fd_optimizer.state_dict()["state"][0]["step"] == 1
    with pytest.raises(RuntimeError, match="flaw detector"):
        other = create_method("gct", fd_features="8")
        other.load_state_dict(state)
        other.detector(x, make_ctx(nets))


def test_gct_weights_after_a_warm_start_drop_the_flaw_correction():
    """From scratch the code's weights (dc 5, fc 1); after a warm start dc 1 and no flaw correction
    (its D starts untrained beside networks that already fit the labels); given values hold in both."""
    torch.manual_seed(0)
    nets = {"cnn1": conv1x1([1.0, -1.0], [0.0, 0.0], 2), "cnn2": conv1x1([-0.5, 0.5], [0.1, 0.0], 2)}
    x = torch.randn(2, 1, 64, 64)
    lab = {"data": x, "target": [torch.randint(0, 2, (2, 1, 64, 64), dtype=torch.int16)], "keys": ["a", "b"]}
    unl = {"data": torch.randn(2, 1, 64, 64), "keys": ["c", "d"]}

    def step(warm: bool, **options):
        method = create_method("gct", rampup="0", fd_lr="1e-2", flaw_clip="0", threshold="0.3", **options)
        ctx = make_ctx(nets, step=10, supervised_loss=SupervisedLoss())
        ctx.warm_started = warm
        (loss, *_) = list(method.training_step(lab, unl, ctx))
        return loss.item(), ctx.pop_logged()

    cold, lc = step(False)
    assert lc["loss_fc"] > 0 and lc["loss_dc"] > 0
    assert cold == pytest.approx(lc["loss_sup"] + 5.0 * lc["loss_dc"] + lc["loss_fc"], rel=1e-5)
    warm, lw = step(True)
    assert lw["loss_fc"] == 0.0
    assert warm == pytest.approx(lw["loss_sup"] + 1.0 * lw["loss_dc"], rel=1e-5)
    given, lg = step(True, dc_weight="5", fc_weight="1")
    assert given == pytest.approx(lg["loss_sup"] + 5.0 * lg["loss_dc"] + lg["loss_fc"], rel=1e-5)


# ----------------------------------------------------------------------------- end to end through the trainer
@pytest.fixture(scope="module", params=["3d_fullres", "2d"])
def prepared(request, tmp_path_factory):
    two_d = request.param == "2d"
    return prepare_dataset(tmp_path_factory.mktemp(f"consistency_{request.param}"), 972 if two_d else 971, two_d)


E2E = {
    "pi_model": {},
    # one ensemble update (at the first semi-supervised step): the resumed run hands the
    # checkpoint's targets to the loader
    "temporal_ensembling": {"update_every": "100"},
    "gct": {},
}


def train_resume_and_predict(prepared, method_name: str, options: dict, monkeypatch, tmp_path, before_resume=None):
    """5 steps (2 supervised warm-start steps, then 3 semi-supervised), stopped after step 3 and
    continued with --c from checkpoint_latest; then the model predicts a raw image. Checks the
    steps, the resume, the logged scalars and the prediction; ``before_resume(trainer, latest)``
    looks at checkpoint_latest first. Returns (trainer, checkpoint_final, training log text)."""
    from autossl.inference.predictor import Predictor
    from autossl.training.trainer import Trainer

    for k, v in prepared["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("autossl_results", str(tmp_path / "results"))
    monkeypatch.setenv("autossl_n_proc_DA", "0")

    def trainer():
        return Trainer(prepared["id"], prepared["configuration"], "all", plans=TINY, ssl=method_name,
                       ssl_options=options, device="cpu", epochs=5, iterations_per_epoch=1, val_iterations=0,
                       num_workers=0, seed=1, verbose=False)

    class Stop(Exception):
        pass

    original = Trainer._end_epoch

    def end_epoch_then_stop(self, *a, **k):
        original(self, *a, **k)
        if self.current_step == 3:
            raise Stop

    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch_then_stop)
    with pytest.raises(Stop):
        trainer().run()
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    t = trainer()
    latest = torch.load(t.output_folder / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert latest["current_step"] == 3 and latest["warmup_done"]
    if before_resume is not None:
        before_resume(t, latest)
    t.run(continue_training=True)
    final = torch.load(t.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_step"] == 5
    text = "".join(p.read_text() for p in sorted(t.output_folder.glob("training_log_*.txt")))
    assert "continuing from" in text
    for name in create_method(method_name, **options).scalars:
        assert re.search(rf"\b{name} [-+0-9.einaf]+", text), f"{name} not in the training log"
    # predict a raw image with the trained model
    raw = Path(prepared["env"]["autossl_raw"]) / prepared["name"] / "imagesTrUnlabeled"
    image = sorted(raw.iterdir())[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(image, inputs / image.name)
    predictor = Predictor(use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(t.output_folder_base, use_folds=["all"])
    assert list(predictor.networks) == create_method(method_name, **options).inference_networks()
    written = predictor.predict_from_files(str(inputs), str(tmp_path / "pred"))
    assert len(written) == 1
    return t, final, text


def pool_tiles(t) -> int:
    """Tiles the sliding window makes over every unlabelled case of trainer ``t`` (one pass each)."""
    from autossl.inference.sliding_window import get_sliding_window_slicers

    n = 0
    for case in storage.list_cases(t.unlabeled_data_folder):
        data, _, _ = storage.load_case(t.unlabeled_data_folder, case, load_seg=False)
        spatial = data.shape[1:]
        patch = tuple(t.patch_size)
        two_d = len(patch) == len(spatial) - 1
        padded = (spatial[0], *[max(a, p) for a, p in zip(spatial[1:], patch)]) if two_d else \
            tuple(max(a, p) for a, p in zip(spatial, patch))
        n += len(get_sliding_window_slicers(padded, patch, 0.5))
    return n


@pytest.mark.parametrize("method_name", list(E2E))
def test_train_resume_and_predict(prepared, method_name, monkeypatch, tmp_path):
    """Train, stop after step 3, resume with --c, predict (``train_resume_and_predict``)."""

    def before_resume(t, latest):
        if method_name == "temporal_ensembling":
            assert latest["ssl_state"]["updates"] == 1 and len(latest["ssl_state"]["ensemble"]["cases"]) == 4
            # the one pool prediction so far: one pass per tile of every unlabelled case
            assert latest["pool_prediction"]["predictions"] == 1
            assert latest["pool_prediction"]["network_inputs"] == pool_tiles(t)
            assert latest["pool_prediction"]["seconds"] > 0
            shutil.rmtree(t.output_folder / "pseudo_labels")  # only the checkpoint keeps the ensemble
        if method_name == "gct":
            assert latest["ssl_state"]["fd_optimizer"]["state"][0]["step"] == 1

    t, final, text = train_resume_and_predict(prepared, method_name, E2E[method_name], monkeypatch, tmp_path,
                                              before_resume)
    last = next(line for line in text.splitlines()[::-1] if "epoch 5/5" in line)
    if method_name == "temporal_ensembling":
        assert float(re.search(r"target_share ([-+0-9.e]+)", last).group(1)) > 0  # targets from the checkpoint
        assert final["ssl_state"]["updates"] == 1
        assert {c["count"] for c in final["ssl_state"]["ensemble"]["cases"].values()} == {1}
        assert not (t.output_folder / "pseudo_labels").exists()
        # the count survived --c (no new update after it) and reached debug.json for the benchmark
        debug = json.loads((t.output_folder / "debug.json").read_text())
        assert final["pool_prediction"]["network_inputs"] == debug["pool_prediction"]["network_inputs"] == pool_tiles(t)
        assert debug["pool_prediction"]["predictions"] == 1
        assert "predicted the unlabelled pool 1 time(s)" in text
    else:  # a method that never predicts its pool
        assert final["pool_prediction"]["predictions"] == 0
    if method_name == "gct":  # D continued from the checkpoint: 3 semi-supervised steps in all
        assert final["ssl_state"]["fd_optimizer"]["state"][0]["step"] == 3
        assert set(final["networks"]) == {"cnn1", "cnn2"}
