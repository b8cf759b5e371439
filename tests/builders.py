"""Write small datasets case by case, with chosen arrays and geometry, for verification tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING = (0.8, 0.9, 2.5)
ORIGIN = (10.0, -20.0, 5.5)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def good_case(seed: int = 0, shape=(8, 12, 10)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:5, 3:7, 2:6] = 1
    label[5:7, 8:11, 6:9] = 2
    return image, label


def nnunet_dataset(root: Path, n_cases: int = 3, n_channels: int = 1, labels=None) -> Path:
    """A clean nnU-Net v2 layout dataset; returns ``root``."""
    labels = labels or {"background": 0, "a": 1, "b": 2}
    for i in range(n_cases):
        image, label = good_case(i)
        for c in range(n_channels):
            write(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz", image + c)
        write(root / "labelsTr" / f"c{i}.nii.gz", label)
    meta = {"name": "T", "channel_names": {str(c): f"ch{c}" for c in range(n_channels)}, "labels": labels,
            "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root
