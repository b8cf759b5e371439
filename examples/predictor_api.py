"""Segment a NIfTI scan from Python with a trained autoseg run, and compare with its label if there is one.

Usage: python examples/predictor_api.py RUN_DIR SCAN.nii.gz [LABEL.nii.gz]
"""

from __future__ import annotations

import sys

import numpy as np

from autoseg.inference.predictor import Predictor
from autoseg.io import read_image, write_image


def main(run_dir: str, scan: str, label: str | None = None) -> None:
    predictor = Predictor.from_run(run_dir)  # every trained fold, final checkpoints, mirroring on
    image, geometry = read_image(scan)  # (C, z, y, x) and the scan's geometry
    result = predictor.predict(image, geometry=geometry)
    write_image(result.labels, geometry, "prediction.nii.gz")
    print(f"labels {np.unique(result.labels).tolist()} written to prediction.nii.gz")
    if label:
        ref = read_image(label)[0][0]
        for c in sorted(predictor.plans.labels)[1:]:
            p, r = result.labels == c, ref == c
            print(f"class {c}: Dice {2 * (p & r).sum() / max(p.sum() + r.sum(), 1):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
