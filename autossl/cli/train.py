"""``autossl_train DATASET CONFIG [FOLD] [--ssl METHOD] ...``: train one fold (nnU-Net v2's
``nnUNetv2_train`` with semi-supervised methods), or, without FOLD, every fold of the
cross-validation in turn (finished folds are skipped, --c resumes an interrupted one, --budget is
shared by all folds) followed by the cross-validation summary
(``crossval_results_folds_0_1_2_3_4/summary.json``). Multi-GPU / multi-process:
``torchrun --nproc_per_node=N $(which autossl_train) DATASET CONFIG [FOLD] ...``."""
from __future__ import annotations

import argparse
import sys


def _parse_ssl_opts(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0]:
            raise SystemExit(f"--ssl-opt expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _methods() -> list[str]:
    from autossl.ssl.registry import available_methods

    return available_methods()


def build_parser(methods: list[str] | None = None) -> argparse.ArgumentParser:
    methods = _methods() if methods is None else methods
    p = argparse.ArgumentParser(prog="autossl_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="semi-supervised methods (--ssl): " + ", ".join(methods)
                                       + " (documentation/ssl_methods.md)")
    p.add_argument("dataset", help="dataset ID or DatasetXXX_Name")
    p.add_argument("configuration", help="configuration of the plans, e.g. 2d or 3d_fullres")
    p.add_argument("fold", nargs="?", default=None,
                   help="fold of splits_final.json (0-4) or 'all'; omitted: every fold of the cross-validation "
                        "in turn, then the cross-validation summary")
    p.add_argument("-p", "--plans", default="autosslPlans", help="plans identifier (default autosslPlans)")
    p.add_argument("--ssl", default="none", metavar="METHOD",
                   help="semi-supervised method, one of: " + ", ".join(methods) + " (default none = supervised)")
    p.add_argument("--ssl-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --ssl-opt lambda=0.1)")
    p.add_argument("--network", choices=("cnn", "transformer"), default="cnn",
                   help="main architecture: the plans' U-Net (cnn) or transformer_architecture")
    p.add_argument("--c", action="store_true",
                   help="continue from checkpoint_latest.pth (without FOLD: resume the interrupted fold)")
    p.add_argument("--val", action="store_true", help="only run the final validation (needs checkpoint_final)")
    p.add_argument("--npz", action="store_true", help="final validation also saves probabilities (.npz)")
    p.add_argument("-device", "--device", choices=("cpu", "cuda", "mps"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 1000; an upper bound with --budget)")
    p.add_argument("--iterations-per-epoch", type=int, default=250)
    p.add_argument("--val-iterations", type=int, default=50, help="validation batches per epoch (pseudo-Dice)")
    p.add_argument("--budget", default=None,
                   help="wall-clock budget, e.g. 45m, 1.5h, 90s: picks the number of epochs (without FOLD: for the "
                        "whole command, shared by the folds still to train)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--unlabeled-ratio", type=float, default=None,
                   help="unlabelled patches per labelled patch (default: the method's)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="augmentation processes (default env autossl_n_proc_DA or min(cpus, 4); 0 = main process)")
    p.add_argument("--save-every", type=int, default=1, help="write checkpoint_latest every N epochs (default 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA; env autossl_compile)")
    p.add_argument("--fp32", action="store_true",
                   help="no mixed precision: by default CUDA trains with float16 autocast and CPUs with native "
                        "bf16 (AMX, AVX512-BF16) with bfloat16 autocast (env autossl_cpu_amp=0 also turns that off)")
    p.add_argument("--warmup", type=float, default=None, metavar="W",
                   help="supervised warm start inside the run: the first W iterations (W >= 1) or share "
                        "of the run (W < 1) train on the labelled batches alone, then the learning rate "
                        "restarts and the method uses the unlabelled batches (default: the method's)")
    p.add_argument("-pretrained_weights", "--pretrained-weights", default=None, metavar="PATH", nargs="+",
                   help="start every network from another run of the same plans: its checkpoint, or its "
                        "results folder (e.g. the supervised autosslTrainer__PLANS__CONFIG), or from "
                        "autossl_pretrain folders, one per kind of network (e.g. mae for the U-Net and "
                        "simmim for cross teaching's transformer)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also keep checkpoint_step<S>.pth every N epochs (to look at a run's course)")
    p.add_argument("--list-methods", action="store_true", help="print the available --ssl methods and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    methods = _methods()
    if "--list-methods" in argv:
        print("\n".join(methods))
        return 0
    args = build_parser(methods).parse_args(argv)
    from autossl.paths import PathNotConfiguredError
    from autossl.components.errors import TrainingError
    from autossl.training.trainer import Trainer

    if args.ssl not in methods:
        print(f"autossl_train: unknown --ssl method {args.ssl!r}; available: {', '.join(methods)}",
              file=sys.stderr)
        return 2
    kwargs = dict(ssl=args.ssl, ssl_options=_parse_ssl_opts(args.ssl_opt), network=args.network, device=args.device,
                  epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
                  val_iterations=args.val_iterations, seed=args.seed,
                  unlabeled_ratio=args.unlabeled_ratio, num_workers=args.num_workers,
                  compile=True if args.compile else None, save_every=args.save_every,
                  amp=False if args.fp32 else None, warmup=args.warmup,
                  pretrained_weights=args.pretrained_weights, snapshot_every=args.snapshot_every)
    try:
        if args.fold is None:
            from autossl.training.crossval import train_all_folds

            if args.val:
                raise TrainingError("--val needs a FOLD (autossl_train DATASET CONFIG FOLD --val)")
            train_all_folds(args.dataset, args.configuration, plans=args.plans, continue_training=args.c,
                            budget=args.budget, npz=args.npz, trainer_kwargs=kwargs)
        else:
            trainer = Trainer(args.dataset, args.configuration, args.fold, plans=args.plans, budget=args.budget,
                              npz=args.npz, **kwargs)
            trainer.run(continue_training=args.c, validation_only=args.val)
    except (TrainingError, PathNotConfiguredError, ValueError, FileNotFoundError) as e:
        print(f"autossl_train: {e}", file=sys.stderr)
        return 1
    finally:
        from autossl.training import ddp

        ddp.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
