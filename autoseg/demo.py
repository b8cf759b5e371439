"""The demo's data: real scans shipped with autoseg (the README's first command), and a synthetic dataset
generator (for the tests and ``autoseg demo --synthetic``).

The real scans are 36 MSD Task04_Hippocampus cases in ``autoseg/demo_data/hippocampus`` (CC BY-SA 4.0, see
its DATA_LICENSE.md): 30 for training, 6 held out in ``imagesTs``/``labelsTs``. The synthetic dataset has
ellipsoid "organs" with two classes in noisy images, with real geometry (spacing, origin, direction), in MSD or
nnU-Net v2 layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["make_synthetic_dataset", "synthetic_case", "demo_dataset"]

def demo_dataset() -> Path:
    """The shipped real dataset's folder (MSD layout, read only).

    Raises:
        ValueError: the package was installed without its data.
    """
    root = Path(__file__).resolve().parent / "demo_data" / "hippocampus"
    if not (root / "dataset.json").is_file():
        raise ValueError(f"{root}: the demo scans are missing from this installation of autoseg (package data "
                         "not installed); reinstall autoseg, or run autoseg demo --synthetic")
    return root


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int], n_channels: int = 1,
                   n_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One case: image ``(C, z, y, x)`` float32 and label ``(z, y, x)`` uint8 with classes 1..n_classes.

    A bright body ellipsoid on a zero background; inside it one small ellipsoid per class with its own
    intensity, plus Gaussian noise.
    """
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = ((grid / 0.85) ** 2).sum(0) <= 1
    label = np.zeros(shape, np.uint8)
    image = np.zeros((n_channels, *shape), np.float32)
    for c in range(n_channels):
        image[c][body] = 100.0 * (c + 1) + rng.normal(0, 10.0, int(body.sum()))
    for k in range(1, n_classes + 1):
        centre = rng.uniform(-0.4, 0.4, 3)
        radii = rng.uniform(0.15, 0.3, 3)
        blob = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
        label[blob & body] = k
        for c in range(n_channels):
            image[c][blob & body] += 60.0 * k
    return image, label


def make_synthetic_dataset(root: str | Path, n_cases: int = 8, shape: tuple[int, int, int] = (24, 32, 28),
                           spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0), layout: str = "nnunet",
                           n_channels: int = 1, n_classes: int = 2, channel_name: str = "MRI",
                           seed: int = 0) -> Path:
    """Write a synthetic dataset to ``root`` and return ``root``.

    Args:
        shape: array shape (z, y, x) of every case.
        spacing_xyz: voxel spacing in SimpleITK (x, y, z) order (mm).
        layout: ``"nnunet"`` (one file per channel, ``_0000``) or ``"msd"`` (one 4D file for several channels).
    """
    import SimpleITK as sitk

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)  # oblique enough to catch axis mix-ups
    origin = (-12.5, 30.0, 7.25)

    def geo(img: sitk.Image) -> sitk.Image:
        img.SetSpacing(spacing_xyz)
        img.SetOrigin(origin)
        img.SetDirection(direction)
        return img

    training = []
    for i in range(n_cases):
        cid = f"case_{i:03d}"
        image, label = synthetic_case(rng, shape, n_channels, n_classes)
        sitk.WriteImage(geo(sitk.GetImageFromArray(label)), str(root / "labelsTr" / f"{cid}.nii.gz"))
        if layout == "msd":
            if n_channels == 1:
                img = geo(sitk.GetImageFromArray(image[0]))
            else:
                img = sitk.JoinSeries([sitk.GetImageFromArray(image[c]) for c in range(n_channels)])
                img.SetSpacing((*spacing_xyz, 1.0))
                img.SetOrigin((*origin, 0.0))
                d4 = np.eye(4)
                d4[:3, :3] = np.reshape(direction, (3, 3))
                img.SetDirection(tuple(d4.ravel()))
            sitk.WriteImage(img, str(root / "imagesTr" / f"{cid}.nii.gz"))
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        else:
            for c in range(n_channels):
                sitk.WriteImage(geo(sitk.GetImageFromArray(image[c])), str(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz"))
    channels = {str(c): channel_name if n_channels == 1 else f"{channel_name}{c}" for c in range(n_channels)}
    labels = {"background": 0, **{f"organ{k}": k for k in range(1, n_classes + 1)}}
    meta: dict[str, object] = {"name": "Synthetic", "channel_names": channels, "labels": labels,
                               "numTraining": n_cases, "file_ending": ".nii.gz"}
    if layout == "msd":  # MSD spelling: modality, int -> name labels, a training list
        meta = {"name": "Synthetic", "modality": channels, "labels": {str(v): k for k, v in labels.items()},
                "numTraining": n_cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
