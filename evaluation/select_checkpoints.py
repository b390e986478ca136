"""Label-free model selection from a CSV of DSE terms (evaluation/dse.py's dse_curve.csv, or any CSV
with step, inter, intra_img, intra_batch, dim columns, one row per checkpoint in training order).

  python evaluation/select_checkpoints.py <run folder>/eval/dse/<date>_<time>/dse_curve.csv [--top 3] [--window 2]
"""
import argparse
import logging
import sys
from pathlib import Path

from densessl.evaluation.dse_cli import format_candidates, read_curve, write_curve

logger = logging.getLogger("densessl.evaluation.select_checkpoints")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for the re-computed curve (default: the CSV's)")
    args = parser.parse_args()
    # No Hydra here: messages alone on stdout, as the Hydra CLIs' console shows them.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not args.csv.is_file():
        raise SystemExit(f"error: {args.csv} does not exist (run evaluation/dse.py weights=<run folder> first)")
    rows = read_curve(args.csv)
    picks = write_curve(rows, args.out or args.csv.parent, top=args.top, window=args.window)
    logger.info("%s", format_candidates(rows, picks))


if __name__ == "__main__":
    main()
