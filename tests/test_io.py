"""Reading and writing images with their geometry."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from autoseg.io import Geometry, ImageReadError, read_image, write_image

from .builders import DIRECTION, ORIGIN, SPACING, write


def test_geometry_and_axis_order_kept_exactly(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (z, y, x)
    path = write(tmp_path / "a.nii.gz", arr)
    out, geo = read_image(path)
    assert out.shape == (1, 4, 5, 6) and np.array_equal(out[0], arr)
    assert geo.spacing == pytest.approx(SPACING) and geo.origin == pytest.approx(ORIGIN)
    assert geo.direction == pytest.approx(DIRECTION)
    assert geo.shape == (4, 5, 6)
    assert geo.spacing_zyx == pytest.approx((2.5, 0.9, 0.8))


def test_write_round_trip_is_exact_and_atomic(tmp_path):
    geo = Geometry((0.5, 0.75, 3.0), (1.5, -2.25, 100.0), (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0), (3, 4, 5))
    arr = np.random.default_rng(0).integers(0, 4, (3, 4, 5)).astype(np.uint8)
    for name in ("p.nii.gz", "p.nrrd", "p.mha"):
        write_image(arr, geo, tmp_path / name)
        back, g = read_image(tmp_path / name)
        assert np.array_equal(back[0], arr) and back.dtype == np.uint8
        assert g.spacing == pytest.approx(geo.spacing) and g.origin == pytest.approx(geo.origin)
        assert g.direction == pytest.approx(geo.direction) and g.shape == geo.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.mha", "p.nii.gz", "p.nrrd"]
    with pytest.raises(ValueError, match="3D array"):
        write_image(arr[0], geo, tmp_path / "q.nii.gz")


def test_4d_file_gives_channels_first(tmp_path):
    import SimpleITK as sitk

    vols = [np.full((3, 4, 5), c, np.float32) for c in range(2)]
    img = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in vols])
    sitk.WriteImage(img, str(tmp_path / "four.nii.gz"))
    arr, geo = read_image(tmp_path / "four.nii.gz")
    assert arr.shape == (2, 3, 4, 5) and np.all(arr[1] == 1) and geo.shape == (3, 4, 5)


@pytest.mark.parametrize("content", [b"not an image", gzip.compress(b"\x00" * 400)[:60], b""])
def test_corrupt_files_raise_readable_errors(tmp_path, content):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="cannot be read as an image") as err:
        read_image(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 250


def test_truncated_nifti(tmp_path):
    path = write(tmp_path / "t.nii.gz", np.zeros((8, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ImageReadError):
        read_image(path)


def test_missing_and_2d(tmp_path):
    with pytest.raises(ImageReadError, match="file does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ImageReadError, match="is 2D"):
        read_image(tmp_path / "flat.nii.gz")


def test_rgb_nifti_gives_its_components_as_channels(tmp_path):
    """nibabel hands an RGB24 NIfTI back as one record per voxel; its three components become channels."""
    import nibabel as nib

    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])  # (x, y, z) in the file
    rgb["R"], rgb["B"] = 10, 30
    rgb["G"][1] = 20  # x = 1
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    arr, geo = read_image(tmp_path / "rgb.nii.gz")
    assert arr.shape == (3, 6, 5, 4) and geo.shape == (6, 5, 4)
    assert arr[:, 0, 0, 1].tolist() == [10, 20, 30] and arr[:, 0, 0, 0].tolist() == [10, 0, 30]


def test_complex_images_are_refused_by_name(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(ImageReadError, match=r"has complex voxels \(complex64\); expected real intensities"):
        read_image(tmp_path / "c.nii.gz")
    sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkComplexFloat32), str(tmp_path / "c.nrrd"))  # NRRD keeps it
    with pytest.raises(ImageReadError, match=r"has complex voxels \(complex of 32-bit float\); expected real"):
        read_image(tmp_path / "c.nrrd")
