"""Write labelled text-line data for PaddleOCR's orientation classifier (ch_ppocr_mobile_v2.0_cls).

The ``.npz`` holds ``x`` (float32 [N, 3, 48, 192], preprocessed as RapidOCR does) and ``y`` (int64 [N]: 0 upright,
1 turned 180 degrees), ready for ``--calib``/``--eval``. ``--folder`` also writes the PNGs, one subfolder per class,
with the ``preprocess.yaml`` that the image-folder loader reads. Same seed, same bytes.

Usage: python benchmarks/make_textline_data.py --n 800 --seed 0 --out data.npz [--folder DIR] [--fonts PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxopt.datasets.textlines import render_textlines, write_textline_folder  # noqa: E402
from onnxopt.errors import OnnxoptError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=800, help="number of text lines (default 800)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help=".npz file to write (keys x, y)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="also write the lines as PNGs in <folder>/0 and <folder>/180 with preprocess.yaml")
    parser.add_argument("--fonts", action="append", default=None,
                        help="font file or folder to draw with (repeatable; default: the DejaVu fonts found)")
    parser.add_argument("--compress", action="store_true",
                        help="compress the .npz (smaller, but loaders cannot memory-map it)")
    args = parser.parse_args(argv)
    if args.out is None and args.folder is None:
        parser.error("give --out FILE.npz and/or --folder DIR")
    try:
        start = time.perf_counter()
        if args.out is not None:
            x, y = render_textlines(args.n, args.seed, fonts=args.fonts)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            (np.savez_compressed if args.compress else np.savez)(args.out, x=x, y=y)
            print(f"wrote {args.out}: x {x.dtype} {list(x.shape)}, y {y.dtype} {list(y.shape)} "
                  f"({int((y == 0).sum())} upright, {int((y == 1).sum())} turned 180)")
        if args.folder is not None:
            write_textline_folder(args.folder, args.n, args.seed, fonts=args.fonts)
            print(f"wrote {args.n} PNGs and preprocess.yaml under {args.folder}")
        print(f"done in {time.perf_counter() - start:.1f}s")
    except OnnxoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: cannot write output ({exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
