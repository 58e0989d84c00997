"""``autossl_pretrain DATASET CONFIG --method NAME``: self-supervised pre-training of the
configuration's planned U-Net encoder (``--network transformer``: of the planned transformer's
patch embedding and blocks) on every image of the dataset (labelled and unlabelled cases, never
imagesTs). Fine-tune from it with ``autossl_train ... -pretrained_weights
$autossl_results/DatasetXXX/autosslPretrainer_<method>[_transformer]__<plans>__<config>``."""
from __future__ import annotations

import argparse
import sys


def build_parser(methods: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autossl_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods (--method): " + ", ".join(methods) + " (documentation/pretraining.md)")
    p.add_argument("dataset", help="dataset ID or DatasetXXX_Name")
    p.add_argument("configuration", help="configuration of the plans, e.g. 2d or 3d_fullres")
    p.add_argument("--method", required=True, help="one of: " + ", ".join(methods))
    p.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --method-opt temperature=0.2)")
    p.add_argument("-p", "--plans", default="autosslPlans", help="plans identifier (default autosslPlans)")
    p.add_argument("--network", choices=("cnn", "transformer"), default="cnn",
                   help="the encoder to pre-train: the plans' U-Net's (cnn) or transformer_architecture's (simmim "
                        "is for the transformer only)")
    p.add_argument("--epochs", type=int, default=100, help="epochs (default 100; an upper bound with --budget)")
    p.add_argument("--iterations-per-epoch", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=None, help="default: the plans' (at least 2)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the method's, 1e-3)")
    p.add_argument("--budget", default=None, help="wall-clock budget, e.g. 45m, 1.5h: picks the number of epochs")
    p.add_argument("--c", action="store_true", help="continue from checkpoint_latest.pth")
    p.add_argument("-device", "--device", choices=("cpu", "cuda", "mps"), default=None)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--num-workers", type=int, default=None,
                   help="augmentation processes (default env autossl_n_proc_DA or min(cpus, 4); 0 = main process)")
    return p


def main(argv: list[str] | None = None) -> int:
    from autossl.cli.train import _parse_ssl_opts
    from autossl.paths import PathNotConfiguredError
    from autossl.pretraining.registry import available_methods
    from autossl.pretraining.trainer import Pretrainer
    from autossl.components.errors import TrainingError

    methods = available_methods()
    args = build_parser(methods).parse_args(sys.argv[1:] if argv is None else argv)
    if args.method not in methods:
        print(f"autossl_pretrain: unknown --method {args.method!r}; available: {', '.join(methods)}", file=sys.stderr)
        return 2
    try:
        Pretrainer(args.dataset, args.configuration, args.method, plans=args.plans,
                   method_options=_parse_ssl_opts(args.method_opt), epochs=args.epochs,
                   iterations_per_epoch=args.iterations_per_epoch, batch_size=args.batch_size, lr=args.lr,
                   budget=args.budget, device=args.device, seed=args.seed,
                   num_workers=args.num_workers, network=args.network).run(continue_training=args.c)
    except (TrainingError, PathNotConfiguredError, ValueError, FileNotFoundError) as e:
        print(f"autossl_pretrain: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
