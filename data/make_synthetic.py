"""Write the synthetic shapes-and-textures scenes in Pascal VOC 2012 layout.

    python data/make_synthetic.py --out DIR --n-train 300 --n-val 100 --size 224 --seed 0

Then train/evaluate with ``data.root=DIR`` (see data/README.md). Library code that only needs a
copy should call ``densessl.data.ensure_synthetic_voc`` instead, which caches it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from densessl.data.synthetic import (
    DEFAULT_PARAMS,
    SYNTHETIC_CLASSES,
    ForeignFolderError,
    make_synthetic_voc,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output (VOC2012-like) root folder")
    parser.add_argument("--n-train", type=int, default=DEFAULT_PARAMS["n_train"])
    parser.add_argument("--n-val", type=int, default=DEFAULT_PARAMS["n_val"])
    parser.add_argument("--size", type=int, default=DEFAULT_PARAMS["size"], help="image side in px")
    parser.add_argument("--seed", type=int, default=DEFAULT_PARAMS["seed"])
    parser.add_argument(
        "--num-classes", type=int, default=DEFAULT_PARAMS["num_classes"],
        help=f"classes incl. background (2..{len(SYNTHETIC_CLASSES)})",
    )
    parser.add_argument(
        "--ignore-width", type=int, default=DEFAULT_PARAMS["ignore_width"],
        help="px of 255 (ignore) around object boundaries",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        root = make_synthetic_voc(
            args.out, n_train=args.n_train, n_val=args.n_val, size=args.size, seed=args.seed,
            num_classes=args.num_classes, ignore_width=args.ignore_width,
        )
    except ForeignFolderError as err:  # --out is someone's folder: say so, touch nothing
        parser.exit(2, f"error: {str(err).replace('data.root', '--out')}\n")
    print(
        f"wrote {args.n_train} train + {args.n_val} val images ({args.size} px, "
        f"{args.num_classes} classes) to {root} in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
