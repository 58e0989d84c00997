"""CPU speed-ups of training: InstanceNorm run as GroupNorm (same results) and the autocast choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from autossl.networks.norms import instance_norm_as_group_norm
from autossl.training import speed


def _unet(dim: int) -> nn.Module:
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (2, 2, 2), 3, (2, 2), conv_bias=True, norm_op=norm,
                        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    with torch.no_grad():  # non-trivial affine parameters
        for m in net.modules():
            if isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


@pytest.mark.parametrize("dim", [2, 3])
def test_instance_norm_as_group_norm_same_outputs_gradients_and_keys(dim):
    ref, fast = _unet(dim), _unet(dim)
    n_norms = sum(isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)) for m in ref.modules())
    assert instance_norm_as_group_norm(fast) == n_norms > 0
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)) for m in fast.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in fast.modules()) == n_norms
    assert list(ref.state_dict()) == list(fast.state_dict())  # checkpoints stay interchangeable
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1) + (16,) * dim, generator=g) * 3 + 1
    outs = []
    for net in (ref, fast):
        net.zero_grad()
        out = net(x)
        sum((o * (i + 1)).square().mean() for i, o in enumerate(out)).backward()
        outs.append((out, {k: p.grad.clone() for k, p in net.named_parameters()}))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][k], rtol=1e-4, atol=1e-5)
    ref.eval(), fast.eval()  # no running statistics: eval normalises per instance as well
    with torch.no_grad():
        torch.testing.assert_close(ref(x)[0], fast(x)[0], rtol=1e-5, atol=1e-5)


def test_instance_norm_with_running_stats_is_left_alone():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True, track_running_stats=True),
                        nn.InstanceNorm3d(4))
    assert instance_norm_as_group_norm(net) == 1
    assert isinstance(net[1], nn.InstanceNorm3d) and isinstance(net[2], nn.GroupNorm)
    assert net[2].weight is None  # affine=False stays without parameters


def test_training_autocast_dtype(monkeypatch):
    from autossl.inference import sliding_window

    monkeypatch.setattr(sliding_window, "cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv("autossl_cpu_amp", raising=False)
    assert speed.training_autocast_dtype("cpu") == torch.bfloat16
    assert speed.training_autocast_dtype("cpu", amp=False) is None
    assert speed.training_autocast_dtype("cuda") == torch.float16
    assert speed.training_autocast_dtype("cuda", amp=False) is None
    assert speed.training_autocast_dtype("mps") is None
    monkeypatch.setenv("autossl_cpu_amp", "0")
    assert speed.training_autocast_dtype("cpu") is None
    assert speed.training_autocast_dtype("cpu", amp=True) == torch.bfloat16
    monkeypatch.delenv("autossl_cpu_amp")
    monkeypatch.setattr(sliding_window, "cpu_has_native_bf16", lambda: False)
    assert speed.training_autocast_dtype("cpu") is None  # emulated bf16 would be slower than float32


# ----------------------------------------------------------------------------------------------
# through the trainer (tiny synthetic 3D dataset of test_training)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared3d(tmp_path_factory):
    from test_training import prepare_dataset

    return prepare_dataset(tmp_path_factory.mktemp("speed3d"), 953, two_d=False)


@pytest.mark.parametrize("amp", [None, False])
def test_trainer_cpu_precision_and_group_norm(prepared3d, monkeypatch, tmp_path, amp):
    from test_training import TINY

    from autossl.inference import sliding_window
    from autossl.training.trainer import Trainer
    from autossl.utilities.file_io import load_json

    for k, v in prepared3d["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("autossl_results", str(tmp_path / "results"))
    monkeypatch.delenv("autossl_cpu_amp", raising=False)
    monkeypatch.setattr(sliding_window, "cpu_has_native_bf16", lambda: True)  # as on AMX / AVX512-BF16 CPUs
    t = Trainer(prepared3d["id"], prepared3d["configuration"], "all", plans=TINY, epochs=1, iterations_per_epoch=2,
                val_iterations=1, num_workers=0, device="cpu", verbose=False, amp=amp)
    seen = []
    t.initialize()
    t.networks["student"].register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
    t.run()
    net = t.networks["student"]
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    expected = torch.bfloat16 if amp is None else torch.float32
    assert seen and set(seen) == {expected}
    assert t.grad_scaler is None
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights stay float32
    debug = load_json(t.output_folder / "debug.json")
    assert debug["amp"] is (amp is None) and debug["amp_dtype"] == ("bfloat16" if amp is None else None)
    ckpt = torch.load(t.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["network_weights"].values() if v.is_floating_point())
    assert np.isfinite(ckpt["logging"]["history"]["train_loss"]).all()
