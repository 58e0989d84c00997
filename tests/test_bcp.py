"""BCP (bidirectional copy-paste) and the pseudo-label cleaning it uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autossl.ssl.methods.bcp import BCP, bidirectional_mix, mixed_loss
from autossl.ssl.pseudo_label_cleaning import keep_largest_components, single_component_classes, single_structure
from autossl.ssl.registry import create_method
from autossl.components.losses import SupervisedLoss


def test_single_component_classes_reads_the_labelled_cases():
    seg = np.zeros((2, 8, 8), np.int16)
    seg[:, 1:4, 1:4] = 1                       # class 1: one block through both slices
    seg[0, 5:7, 5:7] = 2                       # class 2: two equal pieces in slice 0
    seg[0, 5:7, 0:2] = 2
    seg[0, 0, 6] = 3                           # class 3: one voxel per slice, not touching across
    seg[1, 7, 0] = 3                           # slices -> one piece per slice, two per case
    assert single_component_classes([seg], [1, 2, 3], per_slice=True) == (1, 3)
    assert single_component_classes([seg[None]], [1, 2, 3], per_slice=False) == (1,)
    # a stray voxel below the 5 % tolerance keeps a class single; a class absent everywhere is not
    big = np.zeros((1, 10, 10), np.int16)
    big[0, :5, :5] = 1
    big[0, 9, 9] = 1
    assert single_component_classes([big], [1, 2], per_slice=False) == (1,)
    assert single_component_classes([big], [1], per_slice=False, min_share=0.99) == ()


def test_keep_largest_components_sets_the_other_pieces_to_background():
    labels = torch.tensor([[[[1, 1, 0, 1],
                             [1, 0, 0, 0],
                             [0, 2, 0, 2],
                             [-1, 0, 0, 1]]]])
    out = keep_largest_components(labels, (1,))
    expected = torch.tensor([[[[1, 1, 0, 0],
                               [1, 0, 0, 0],
                               [0, 2, 0, 2],       # class 2 is not cleaned: both pieces stay
                               [-1, 0, 0, 0]]]])   # the ignore label stays
    assert torch.equal(out, expected)
    assert torch.equal(keep_largest_components(labels, ()), labels)
    both = keep_largest_components(labels, (1, 2))
    assert int((both == 2).sum()) == 1  # equal pieces: one is kept (the first found)


def test_single_structure_reports_a_foreground_that_is_one_piece():
    heart = np.zeros((2, 8, 8), np.int16)
    heart[:, 2:5, 2:4] = 1                     # two classes that touch: one foreground structure
    heart[:, 2:5, 4:6] = 2
    assert single_structure([heart], [1, 2], per_slice=True) == ((1, 2), (1, 2))
    apart = heart.copy()
    apart[:, :, 4] = 0                         # a gap between them: each class one piece, the union two
    assert single_structure([apart], [1, 2], per_slice=True) == ((1, 2), ())
    assert single_structure([heart], [1], per_slice=True) == ((1,), ())   # one class: no extra step


def test_foreground_first_cleaning_drops_a_stray_piece_larger_than_the_true_one():
    labels = torch.tensor([[[[1, 1, 2, 0, 0, 0],
                             [1, 1, 0, 0, 2, 2],
                             [1, 1, 0, 0, 2, 2],
                             [0, 0, 0, 0, 2, 2]]]])
    # class 2 alone: its stray block (6 voxels) beats its true piece touching class 1 (1 voxel)
    per_class = keep_largest_components(labels, (1, 2))
    assert int(per_class[0, 0, 0, 2]) == 0 and int((per_class == 2).sum()) == 6
    # the foreground first: the heart (class 1 + its class-2 voxel, 7) wins, the stray block goes
    out = keep_largest_components(labels, (1, 2), foreground=(1, 2))
    expected = torch.zeros_like(labels)
    expected[0, 0, :3, :2] = 1
    expected[0, 0, 0, 2] = 2
    assert torch.equal(out, expected)
    # a foreground step alone, no per-class step
    assert torch.equal(keep_largest_components(labels, (), foreground=(1, 2)), expected)


def test_clean_pseudo_labels_takes_the_foreground_step_from_the_context():
    from autossl.ssl.context import TrainingContext
    from autossl.ssl.methods._shared import clean_pseudo_labels
    ctx = TrainingContext(networks={}, total_steps=1, num_classes=3, device=torch.device("cpu"),
                          supervised_loss=SupervisedLoss(), strong_augment=lambda x: x)
    labels = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    labels[0, 0, :3, :3] = 1
    labels[0, 0, 4:, 4:] = 2                   # a class-2 piece that does not touch class 1
    assert torch.equal(clean_pseudo_labels(labels, ctx), labels)          # nothing decided: unchanged
    ctx.single_component_classes = (1, 2)
    assert torch.equal(clean_pseudo_labels(labels, ctx), labels)          # each class is one piece
    ctx.single_component_foreground = (1, 2)
    out = clean_pseudo_labels(labels, ctx)
    assert int((out == 2).sum()) == 0 and int((out == 1).sum()) == 9      # the stray structure goes
    assert torch.equal(clean_pseudo_labels(labels, ctx, enabled=False), labels)


def test_bidirectional_mix_pastes_ground_truth_and_pseudo_labels_under_one_box():
    x_l = torch.full((2, 1, 4, 4), 10.0) + torch.arange(2.0).view(2, 1, 1, 1)      # 10, 11
    y_l = torch.full((2, 1, 4, 4), 3, dtype=torch.long)
    x_u = -torch.ones(2, 1, 4, 4) - torch.arange(2.0).view(2, 1, 1, 1)             # -1, -2
    y_u = torch.tensor([1, 2]).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone()
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1
    x_in, t_in, x_out, t_out = bidirectional_mix(x_l, y_l, x_u, y_u, mask)
    # inward: labelled box in unlabelled patch i (same index)
    assert torch.equal(x_in[0, 0], torch.tensor([[10., 10, -1, -1], [10, 10, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]]))
    assert torch.equal(t_in[1, 0], torch.tensor([[3, 3, 2, 2], [3, 3, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]]))
    # outward: unlabelled patch i + 1's box in labelled patch i
    assert x_out[0, 0, 0, 0] == -2 and x_out[0, 0, 3, 3] == 10
    assert x_out[1, 0, 0, 0] == -1 and x_out[1, 0, 3, 3] == 11
    assert t_out[0, 0, 0, 0] == 2 and t_out[0, 0, 3, 3] == 3 and t_out[1, 0, 0, 0] == 1


class _Ctx:
    def __init__(self):
        self.supervised_loss = SupervisedLoss()


def test_mixed_loss_weighs_ground_truth_one_and_pseudo_labels_u_weight():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 1, 4, 4))
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2] = 1
    sup = SupervisedLoss()
    expected = sup(logits, target, mask=region) + 0.5 * sup(logits, target, mask=1 - region)
    assert mixed_loss(_Ctx(), logits, target, region, target, 0.5) == pytest.approx(expected.item())
    # u_weight 0: only the ground-truth region counts; a wrong pseudo-label there changes nothing
    wrong = target.clone()
    wrong[..., 2:] = (wrong[..., 2:] + 1) % 3
    assert mixed_loss(_Ctx(), logits, wrong, region, target, 0.0) == pytest.approx(
        mixed_loss(_Ctx(), logits, target, region, target, 0.0).item())


def test_deep_supervision_masks_follow_the_loaders_target_downsampling():
    """A mask equal to a class's voxels at full resolution still selects exactly that class's
    voxels of the loader's half-resolution target (both ``nearest-exact``; plain ``nearest``
    would sample the even voxels and select none of them)."""
    full = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    full[..., 1::2, 1::2] = 1  # odd voxels: the ones nearest-exact samples
    half = F.interpolate(full.float(), size=(4, 4), mode="nearest-exact").long()
    quarter = F.interpolate(full.float(), size=(2, 2), mode="nearest-exact").long()
    assert int(half.sum()) == 16
    mask = (full == 1).float()
    torch.manual_seed(0)
    logits = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    sup = SupervisedLoss()
    # deep-supervision weights for 3 outputs: 2/3, 1/3, 0
    expected = (2 / 3) * sup(logits[0], full, mask=mask) + (1 / 3) * sup(logits[1], half, mask=half.float())
    assert sup(logits, [full, half, quarter], mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bcp_options_networks_and_cost():
    m = create_method("bcp")
    assert isinstance(m, BCP)
    specs = {s.name: s for s in m.network_specs()}
    assert specs["teacher"].copy_of == "student" and not specs["teacher"].trainable
    assert m.inference_networks() == ["student"]
    assert create_method("bcp", inference="teacher").inference_networks() == ["teacher"]
    assert m.relative_cost(1.0) == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="box"):
        create_method("bcp", box="1.5")
