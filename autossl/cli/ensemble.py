"""``autossl_ensemble -i DIR DIR ... -o OUT [-np N] [--save_npz]``."""
from __future__ import annotations

import argparse
import sys

from autossl.ensembling.ensemble import EnsembleError, ensemble_folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autossl_ensemble",
        description="Average the probabilities (.npz, from autossl_predict --save_probabilities) of several "
                    "prediction folders and write the ensembled segmentations.")
    p.add_argument("-i", nargs="+", required=True, help="prediction folders (at least two)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-np", type=int, default=2, help="parallel workers (default 2)")
    p.add_argument("--save_npz", action="store_true", help="also write the averaged probabilities (.npz + .pkl)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = ensemble_folders(args.i, args.o, args.save_npz, args.np)
    except (EnsembleError, FileNotFoundError) as e:
        print(f"autossl_ensemble: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} ensembled segmentation(s) to {args.o}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
