"""Warm starts: the trainer's supervised phase (``--warmup``) and ``-pretrained_weights``; the
phase-aware ramps and schedules; checkpoints that load as tensors only; the mean teacher's
dropout perturbation; each method's arithmetic cost."""
from __future__ import annotations

import io
import pickle

import pytest
import torch

from autossl.components.errors import TrainingError
from autossl.ssl.registry import create_method
from autossl.training.optim import PolyWarmupSchedule
from test_training import TINY, _trainer, _use, prepare_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("warm2d"), 971, two_d=True)


@pytest.fixture
def ds(prepared, monkeypatch, tmp_path):
    return _use(prepared, monkeypatch, tmp_path)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _record(trainer) -> list[dict]:
    """Wrap the method's training_step: what the method saw at each of its iterations."""
    seen: list[dict] = []
    orig = trainer.method.training_step

    def step(lab, unl, ctx):
        nets = trainer.networks
        seen.append({"step": ctx.step, "ssl_step": ctx.ssl_step, "unlabeled": unl is not None,
                     "lr": trainer.optimizers[next(iter(trainer.optimizers))].param_groups[0]["lr"],
                     "teacher_is_student": "teacher" in nets and _states_equal(nets["teacher"], nets["student"])})
        yield from orig(lab, unl, ctx)

    trainer.method.training_step = step
    return seen


# ---------------------------------------------------------------------------------------------- phases
def test_schedule_restarts_at_the_warm_start_boundary():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = PolyWarmupSchedule(opt, 0.01, 10, restarts=[4])
    lrs = [s.lr_at(i) for i in range(10)]
    assert lrs[0] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.01)
    assert lrs[3] == pytest.approx(0.01 * (1 - 3 / 4) ** 0.9)
    assert lrs[9] == pytest.approx(0.01 * (1 - 5 / 6) ** 0.9)
    s2 = PolyWarmupSchedule(opt, 0.01, 10)
    s2.load_state_dict(s.state_dict())
    assert [s2.lr_at(i) for i in range(10)] == lrs


def test_ramps_count_from_the_semi_supervised_phase():
    from autossl.ssl.context import TrainingContext
    from autossl.ssl.methods._shared import ramp_weight

    ctx = TrainingContext(networks={}, total_steps=100, num_classes=2, device=torch.device("cpu"),
                          supervised_loss=None, strong_augment=None, ssl_start_step=60)
    ctx.step = 60
    assert ramp_weight(1.0, 0.5, ctx) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    ctx.step = 80  # 20 of the 40 SSL steps = the end of a ramp over half of them
    assert ramp_weight(1.0, 0.5, ctx) == pytest.approx(1.0)
    assert ctx.ssl_step == 20 and ctx.ssl_total_steps == 40


def test_automatic_rampup_is_short_after_a_warm_start_only():
    from autossl.ssl.context import TrainingContext
    from autossl.ssl.methods._shared import ramp_weight

    m = create_method("fixmatch")
    assert m.rampup == (1.0, 0.1)
    ctx = TrainingContext(networks={}, total_steps=100, num_classes=2, device=torch.device("cpu"),
                          supervised_loss=None, strong_augment=None, step=20)
    cold = ramp_weight(1.0, m.rampup, ctx)
    ctx.warm_started = True
    assert cold < 0.2 and ramp_weight(1.0, m.rampup, ctx) == pytest.approx(1.0)
    assert create_method("fixmatch", rampup="0.5").rampup == 0.5
    with pytest.raises(ValueError, match="rampup"):
        create_method("cps", rampup="-1")


def test_cps_weight_is_the_papers_after_a_warm_start_and_ssl4mis_from_scratch():
    from autossl.ssl.context import TrainingContext
    from autossl.ssl.methods._shared import ramp_weight

    m = create_method("cps_cutmix")
    ctx = TrainingContext(networks={}, total_steps=100, num_classes=2, device=torch.device("cpu"),
                          supervised_loss=None, strong_augment=None, step=100)
    assert ramp_weight(m.lambda_max, 0.0, ctx) == pytest.approx(0.1)
    ctx.warm_started = True
    assert ramp_weight(m.lambda_max, 0.0, ctx) == pytest.approx(1.5)
    assert ramp_weight(create_method("cps", **{"lambda": "0.4"}).lambda_max, 0.0, ctx) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        create_method("cps", **{"lambda": "-1"})


def test_warmup_phase_draws_no_unlabelled_batch_and_hands_a_trained_teacher(ds):
    t = _trainer(ds, fold="all", ssl="mean_teacher", epochs=2, iterations_per_epoch=3, warmup=0.5,
                 snapshot_every=1)
    seen = _record(t)
    t.run()
    assert t.warmup_steps == 3
    # the method only runs after the warm start, with unlabelled batches from its first step
    assert [s["step"] for s in seen] == [3, 4, 5] and all(s["unlabeled"] for s in seen)
    assert [s["ssl_step"] for s in seen] == [0, 1, 2]
    # the schedule restarted: the first SSL step runs at the initial learning rate
    assert seen[0]["lr"] == pytest.approx(0.01) and seen[1]["lr"] < 0.01
    # the EMA teacher starts as the warm student, not as the untrained initialisation
    assert seen[0]["teacher_is_student"]
    assert t.ctx.warm_started
    # the cleaning rule the trainer hands the method comes from the labelled training cases
    from autossl.preprocessing import storage
    from autossl.ssl.pseudo_label_cleaning import single_structure
    segs = [storage.load_case(t.data_folder, k, mmap=False)[1] for k in t.tr_keys]
    decided = (t.ctx.single_component_classes, t.ctx.single_component_foreground)
    assert decided == single_structure(segs, t.label_manager.foreground_labels, per_slice=len(t.patch_size) == 2)
    assert decided[1] == (1, 2)   # the synthetic cases: two touching classes, one foreground structure
    # checkpoints written in the warm start hold the warm student as the (predicting) teacher
    snap = torch.load(t.output_folder / "checkpoint_step3.pth", weights_only=True)
    s, te = snap["networks"]["student"], snap["networks"]["teacher"]
    assert all(torch.equal(s[k], te[k]) for k in s)
    debug = (t.output_folder / "debug.json").read_text()
    assert '"warmup_steps": 3' in debug


def test_warmup_trains_every_trainable_network(ds):
    t = _trainer(ds, fold="all", ssl="cps", epochs=1, iterations_per_epoch=2, warmup=2)
    t.initialize()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in t.networks.items()}
    seen = _record(t)
    t.run()
    assert seen == []  # the whole run was the warm start
    for name, net in t.networks.items():
        changed = any(not torch.equal(before[name][k], v) for k, v in net.state_dict().items())
        assert changed, f"{name} was not trained in the warm start"


def test_warmup_resumes_with_c(ds):
    t = _trainer(ds, fold="all", ssl="mean_teacher", epochs=3, iterations_per_epoch=2, warmup=0.5, save_every=1)
    calls = {"n": 0}
    orig = t._end_epoch

    def stop_after_two(*a, **k):
        orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    t._end_epoch = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        t.run()
    latest = t.output_folder / "checkpoint_latest.pth"
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["current_step"] == 4 and ckpt["warmup_done"] and ckpt["warmup"] == 0.5
    t2 = _trainer(ds, fold="all", ssl="mean_teacher", epochs=3, iterations_per_epoch=2, save_every=1)
    seen = _record(t2)
    t2.run(continue_training=True)
    assert t2.warmup_steps == 3  # the run's own warm start, not the default of a new run
    assert [s["step"] for s in seen] == [4, 5] and all(s["unlabeled"] for s in seen)
    assert (t2.output_folder / "checkpoint_final.pth").is_file()


def test_negative_warmup_is_refused(ds):
    with pytest.raises(TrainingError, match="--warmup"):
        _trainer(ds, fold="all", ssl="cps", warmup=-1)


# ---------------------------------------------------------------------------------------------- pretrained
@pytest.fixture
def supervised_run(ds):
    t = _trainer(ds, fold="all", ssl="none", epochs=1, iterations_per_epoch=2)
    t.run()
    return t


def test_pretrained_weights_load_into_every_network_of_the_architecture(ds, supervised_run):
    src = supervised_run.networks["student"]
    t = _trainer(ds, fold="all", ssl="ucmt", pretrained_weights=supervised_run.output_folder_base)
    t.initialize()
    chosen = t.load_pretrained_weights(t.pretrained_weights) or {}
    for name in ("student1", "student2", "teacher", "teacher2"):
        assert _states_equal(t.networks[name], src), name
    # the folder form found fold_all/checkpoint_final.pth; the file form works the same
    t2 = _trainer(ds, fold="all", ssl="cps")
    t2.initialize()
    t2.load_pretrained_weights(supervised_run.output_folder / "checkpoint_final.pth")
    assert _states_equal(t2.networks["cnn1"], src) and _states_equal(t2.networks["cnn2"], src)


def test_pretrained_weights_then_resume(ds, supervised_run):
    """-pretrained_weights is used once; --c continues from the run's own checkpoint."""
    t = _trainer(ds, fold="all", ssl="fixmatch", epochs=2, iterations_per_epoch=2,
                 pretrained_weights=supervised_run.output_folder_base)
    assert t.warmup_steps == 0  # started warm: no supervised phase of its own unless --warmup says so
    t.run()
    assert t.ctx.warm_started  # and its automatic ramps are the short ones
    final = torch.load(t.output_folder / "checkpoint_final.pth", weights_only=True)
    t2 = _trainer(ds, fold="all", ssl="fixmatch", epochs=2, iterations_per_epoch=2,
                  pretrained_weights=supervised_run.output_folder_base)
    t2.run(continue_training=True)  # finished: loads checkpoint_final, not the supervised weights
    for k, v in t2.networks["student"].state_dict().items():
        assert torch.equal(v, final["networks"]["student"][k])


def test_pretrained_weights_of_other_plans_are_a_clear_error(ds, supervised_run, tmp_path):
    ckpt = torch.load(supervised_run.output_folder / "checkpoint_final.pth", weights_only=True)
    w = ckpt["networks"]["student"]
    k = next(k for k, v in w.items() if v.ndim == 4)
    w[k] = torch.zeros(3, *w[k].shape[1:])
    bad = tmp_path / "other_plans.pth"
    torch.save(ckpt, bad)
    t = _trainer(ds, fold="all", ssl="cps")
    t.initialize()
    with pytest.raises(TrainingError, match="does not fit .*shape"):
        t.load_pretrained_weights(bad)
    with pytest.raises(TrainingError, match="no such file"):
        t.load_pretrained_weights(tmp_path / "missing")
    with pytest.raises(TrainingError, match="no transformer network"):
        t3 = _trainer(ds, fold="all", ssl="cross_teaching")
        t3.initialize()
        t3.load_pretrained_weights(supervised_run.output_folder_base)


class _Payload:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("executed",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused(ds, supervised_run, tmp_path):
    from autossl.components.checkpoint import load_checkpoint

    ckpt = torch.load(supervised_run.output_folder / "checkpoint_final.pth", weights_only=True)
    ckpt["init_args"]["payload"] = _Payload()
    evil = tmp_path / "evil.pth"
    torch.save(ckpt, evil)
    with pytest.raises(RuntimeError, match="never unpickles"):
        load_checkpoint(evil)
    t = _trainer(ds, fold="all", ssl="cps")
    t.initialize()
    with pytest.raises(TrainingError, match="never unpickles"):
        t.load_pretrained_weights(evil)


def test_training_checkpoints_hold_only_tensors_and_plain_data(supervised_run):
    buf = io.BytesIO((supervised_run.output_folder / "checkpoint_final.pth").read_bytes())
    ckpt = torch.load(buf, weights_only=True)  # raises on any pickled object
    assert isinstance(ckpt["rng_states"]["numpy"][1], torch.Tensor)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(_pickled_numpy()), weights_only=True)


def _pickled_numpy() -> bytes:
    import numpy as np

    buf = io.BytesIO()
    torch.save({"a": np.zeros(2)}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- perturbation
def test_mean_teacher_networks_carry_dropout_and_the_teacher_uses_it(ds):
    t = _trainer(ds, fold="all", ssl="mean_teacher", warmup=0)
    t.initialize()
    t.method.setup(t.ctx)
    teacher = t.networks["teacher"]
    hooks = [h for m in teacher.encoder.stages.modules() for h in m._forward_hooks.values()]
    # SSL4MIS's rates (0.05 ... 0.5) over three stages, scaled to 0.2 at the bottleneck
    assert [round(h.p, 3) for h in hooks] == [0.02, 0.08, 0.2]
    assert not [h for m in teacher.decoder.stages.modules() for h in m._forward_hooks.values()]
    assert teacher.training  # dropout active in the teacher's passes, as SSL4MIS's teacher
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a, b = teacher(x)[0], teacher(x)[0]
    assert not torch.allclose(a, b)  # two passes of the teacher on the same input differ
    teacher.eval()
    with torch.no_grad():
        assert torch.equal(teacher(x)[0], teacher(x)[0])
    # without dropout (the old behaviour) the passes are identical: there was no perturbation
    t2 = _trainer(ds, fold="all", ssl="mean_teacher", warmup=0,
                  ssl_options={"dropout": "0", "teacher_dropout": "false"})
    t2.initialize()
    t2.method.setup(t2.ctx)
    with torch.no_grad():
        assert torch.equal(t2.networks["teacher"](x)[0], t2.networks["teacher"](x)[0])


def test_dropout_is_off_during_the_warm_start(ds):
    t = _trainer(ds, fold="all", ssl="mean_teacher", epochs=2, iterations_per_epoch=2, warmup=0.5)
    t.initialize()
    student = t.networks["student"].train()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # the warm start trains the plain planned network
        assert torch.equal(student(x)[0], student(x)[0])
    t.current_step = t.warmup_steps
    t._end_warmup()
    with torch.no_grad():
        assert not torch.allclose(student(x)[0], student(x)[0])


def test_dropout_checkpoint_predicts_with_the_plain_planned_network(ds):
    from autossl.networks.build import build_network

    t = _trainer(ds, fold="all", ssl="ua_mt", epochs=1, iterations_per_epoch=1)
    t.run()
    ckpt = torch.load(t.output_folder / "checkpoint_final.pth", weights_only=True)
    plain = build_network(t._architecture("cnn"), t.num_input_channels, t.num_heads)
    plain.load_state_dict(ckpt["networks"]["teacher"])  # same keys: dropout holds no weights
    # and a supervised checkpoint warm-starts the dropout networks
    t2 = _trainer(ds, fold="all", ssl="mean_teacher")
    t2.initialize()
    t2.load_pretrained_weights(t.output_folder / "checkpoint_final.pth")


def test_encoder_dropout_rates_follow_ssl4mis():
    from autossl.networks.build import encoder_dropout_rates

    assert encoder_dropout_rates(5, 0.5) == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.5])
    assert encoder_dropout_rates(6, 0.5)[-1] == pytest.approx(0.5)
    assert encoder_dropout_rates(5, 0.25) == pytest.approx([0.025, 0.05, 0.1, 0.15, 0.25])


def test_relative_costs():
    r = 1.0
    assert create_method("none").relative_cost(r) == pytest.approx(1.0)
    # the issue's ~8.7x, plus both students' forward over the unmixed sources (their cross labels)
    assert create_method("ucmt", cross_labels="views", teacher="mixed").relative_cost(r) == pytest.approx(26 / 3)
    assert create_method("ucmt", teacher="mixed").relative_cost(r) == pytest.approx(28 / 3)
    assert create_method("ucmt").relative_cost(r) == pytest.approx(30 / 3)  # + the second teacher's forward
    assert create_method("ucmt", umix="false", cross_labels="views", teacher="mixed").relative_cost(r) == pytest.approx(14 / 3)
    assert create_method("cross_teaching").relative_cost(r) == pytest.approx(4.0)
    assert create_method("cross_teaching", cutmix="true").relative_cost(r) == pytest.approx(14 / 3)  # + both nets over the sources
    assert create_method("cps_cutmix").relative_cost(r) == pytest.approx(14 / 3)
    assert create_method("cps").relative_cost(r) == pytest.approx(4.0)
    assert create_method("mean_teacher").relative_cost(r) == pytest.approx(7 / 3)
    assert create_method("ua_mt").relative_cost(r) == pytest.approx(15 / 3)
    assert create_method("fixmatch").relative_cost(r) == pytest.approx(7 / 3)


def test_cps_warm_start_defaults_to_thirty_percent_of_the_run(ds):
    """CPS's own default (a longer semi-supervised phase), other methods keep half the run, and
    --warmup overrides it."""
    for ssl in ("cps", "cps_cutmix"):
        assert _trainer(ds, fold="all", ssl=ssl, epochs=2, iterations_per_epoch=5).warmup_steps == 3
    assert _trainer(ds, fold="all", ssl="mean_teacher", epochs=2, iterations_per_epoch=5).warmup_steps == 5
    assert _trainer(ds, fold="all", ssl="cps", epochs=2, iterations_per_epoch=5, warmup=0.5).warmup_steps == 5


def test_default_pretrain_hint_follows_the_runs_networks():
    from autossl.ssl.base import NetworkSpec
    from autossl.training.warm_start import default_pretrain_hint

    assert "--method mae" in default_pretrain_hint([NetworkSpec("a"), NetworkSpec("b")])
    assert "--method simmim --network transformer" in default_pretrain_hint([NetworkSpec("s", arch="transformer")])
    # a CNN beside a transformer (cross teaching) gets no default: its method names its own
    assert default_pretrain_hint([NetworkSpec("cnn"), NetworkSpec("vit", arch="transformer")]) == ""
