"""Write built-in phantom pairs as NIfTI files, by the bundle's naming rule, to try inference and evaluation.

    python scripts/make_phantom_nifti.py --out /tmp/phantom_pairs --num-pairs 8 [--mode mixed] [--first-index 300000]

Writes <case>_ED.nii.gz, <case>_ES.nii.gz, <case>_ED_gt.nii.gz, <case>_ES_gt.nii.gz and <case>_true_ddf.nii.gz
(the true field, channels last) with a 1.5 mm in-plane spacing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from _bundle import import_bundle

import_bundle()
from scripts.phantom import MODES, cardiac_phantom_pair  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num-pairs", type=int, default=8)
    parser.add_argument("--first-index", type=int, default=300000, help="phantom index of the first pair")
    parser.add_argument("--mode", choices=MODES, default="mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing", type=float, default=1.5, help="in-plane spacing written in the header, mm")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([args.spacing, args.spacing, 1.0, 1.0])
    for i in range(args.num_pairs):
        index = args.first_index + i
        pair = cardiac_phantom_pair(index, args.seed, args.size, args.mode)
        case = f"phantom{index:06d}"
        files = {
            f"{case}_ED.nii.gz": pair["moving"][0],
            f"{case}_ES.nii.gz": pair["fixed"][0],
            f"{case}_ED_gt.nii.gz": pair["moving_label"][0].astype(np.uint8),
            f"{case}_ES_gt.nii.gz": pair["fixed_label"][0].astype(np.uint8),
            f"{case}_true_ddf.nii.gz": np.moveaxis(pair["true_ddf"], 0, -1),
        }
        for name, array in files.items():
            nib.save(nib.Nifti1Image(array, affine), str(out / name))
    print(f"wrote {args.num_pairs} phantom pairs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
