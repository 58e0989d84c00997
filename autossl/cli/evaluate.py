"""``autossl_evaluate REF_DIR PRED_DIR -djfile dataset.json [-pfile plans.json] [-o summary.json]``."""
from __future__ import annotations

import argparse
import sys

from autossl.evaluation.evaluate import compute_metrics_on_folder_simple


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autossl_evaluate",
        description="Dice, IoU, voxel counts, HD95 and ASD (mm) of every prediction against its reference; "
                    "writes summary.json (nnU-Net v2 layout).")
    p.add_argument("ref_folder", help="folder with the reference segmentations")
    p.add_argument("pred_folder", help="folder with the predictions (same file names)")
    p.add_argument("-djfile", required=True, help="dataset.json (labels, regions, ignore label, file ending)")
    p.add_argument("-pfile", default=None, help="plans.json (its image_reader_writer picks the reader)")
    p.add_argument("-o", default=None, help="output file (default: PRED_FOLDER/summary.json)")
    p.add_argument("-np", type=int, default=2, help="processes (default 2)")
    p.add_argument("--chill", action="store_true",
                   help="do not require a prediction for every reference case")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = compute_metrics_on_folder_simple(args.ref_folder, args.pred_folder, args.djfile, args.pfile,
                                                   args.o, args.np, args.chill)
    except (FileNotFoundError, ValueError) as e:
        print(f"autossl_evaluate: error: {e}", file=sys.stderr)
        return 1
    fg = summary["foreground_mean"]
    print(f"{len(summary['metric_per_case'])} cases; foreground mean: "
          + ", ".join(f"{k} {fg[k]:.4f}" for k in ("Dice", "IoU", "HD95", "ASD") if k in fg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
