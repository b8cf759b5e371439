"""Read and write medical images with their geometry (SimpleITK for NIfTI, NRRD, MHA).

Arrays are returned in numpy order: ``(channels, z, y, x)`` for images, ``(z, y, x)`` for labels. NIfTI
voxels are read with nibabel (SimpleITK's reader hides NaN), everything else and all geometry with
SimpleITK.
Geometry is kept exactly as SimpleITK reports it, in physical (x, y, z) order; ``Geometry.spacing_zyx``
gives the spacing in array-axis order, which is what fingerprints and plans use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path

__all__ = ["Geometry", "ImageReadError", "read_image", "write_image", "IMAGE_SUFFIXES", "strip_suffix"]

#: file endings read through SimpleITK, longest first so that ``.nii.gz`` wins over ``.gz``
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageReadError(Exception):
    """An image file is missing, unreadable or has an unsupported layout."""


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie in physical space, in SimpleITK's (x, y, z) order.

    Attributes:
        spacing: voxel size per physical axis (mm).
        origin: position of the first voxel (mm).
        direction: 3x3 direction cosines, row-major, 9 values.
        shape: array shape ``(z, y, x)`` in voxels.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy array-axis order (mm)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])


def strip_suffix(name: str) -> str | None:
    """Return ``name`` without its image file ending, or None when it has no known ending."""
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image, a 4D image (channels first) or a multi-component image.

    Returns:
        ``(array, geometry)``: array of shape ``(C, z, y, x)`` in the file's own dtype, and its geometry.

    Raises:
        ImageReadError: the file does not exist, cannot be decoded, or is not 3D/4D.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ImageReadError("file does not exist")
    try:
        if _is_nifti(path):
            return _read_nifti(path)
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK reports decoding problems as RuntimeError
        raise ImageReadError(f"cannot be read as an image ({_first_error(e)})") from None
    if "complex" in img.GetPixelIDTypeAsString():
        raise ImageReadError(f"has complex voxels ({img.GetPixelIDTypeAsString()}); expected real intensities")
    dim = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    _check_dims(dim, ncomp)
    arr = sitk.GetArrayViewFromImage(img)
    if dim == 3:
        arr = np.moveaxis(arr, -1, 0) if ncomp > 1 else arr[None]
    return np.array(arr), _geometry(img.GetSpacing(), img.GetOrigin(), img.GetDirection(), dim, arr.shape[1:])


def _first_error(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    detail = next((ln.strip() for ln in lines if "rror" in ln), lines[-1] if lines else type(e).__name__)
    return detail[:160]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _check_dims(dim: int, ncomp: int) -> None:
    if dim not in (3, 4):
        raise ImageReadError(f"is {dim}D; expected a 3D image (or 4D with channels last in the file)")
    if dim == 4 and ncomp > 1:
        raise ImageReadError("is 4D with vector pixels; expected scalar pixels")


def _geometry(spacing: tuple, origin: tuple, direction: tuple, dim: int, shape: tuple) -> Geometry:
    d = np.asarray(direction, dtype=float).reshape(dim, dim)[:3, :3]
    sp, og = [float(s) for s in spacing[:3]], [float(o) for o in origin[:3]]
    return Geometry((sp[0], sp[1], sp[2]), (og[0], og[1], og[2]), tuple(float(v) for v in d.ravel()),
                    (int(shape[0]), int(shape[1]), int(shape[2])))


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    """Geometry from SimpleITK's header reader (so it matches every other format), voxels from nibabel.

    Why not SimpleITK for the voxels too: its NIfTI reader turns NaN and infinity into 0 (SimpleITK 2.5),
    which would hide exactly what verification must find. nibabel returns the stored values, equal to
    SimpleITK's everywhere else, and reads no slower.
    """
    import nibabel as nib
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    dim, ncomp = reader.GetDimension(), reader.GetNumberOfComponents()
    _check_dims(dim, ncomp)
    try:
        arr = np.asanyarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]  # NIfTI images have it
    except Exception as e:  # noqa: BLE001 - nibabel raises many types (EOFError, zlib.error, ImageFileError)
        raise ImageReadError(f"cannot be read as an image ({type(e).__name__}: {str(e)[:140]})") from None
    if arr.dtype.names:  # RGB(A) NIfTI: one record per voxel -> its components on a last axis
        from numpy.lib import recfunctions

        arr = recfunctions.structured_to_unstructured(arr)
    if np.iscomplexobj(arr):
        raise ImageReadError(f"has complex voxels ({arr.dtype}); expected real intensities")
    try:
        if ncomp > 1:  # vector pixels: (x, y, z, 1, c) -> (c, z, y, x)
            arr = arr.reshape(arr.shape[:3] + (ncomp,)).T
        else:
            arr = arr.reshape(arr.shape[:dim]).T
            arr = arr[None] if dim == 3 else arr
    except ValueError:
        raise ImageReadError(f"holds voxels of shape {list(arr.shape)}, which do not match its header's {dim}D "
                             f"image of {ncomp} component(s) per voxel") from None
    arr = np.ascontiguousarray(arr)
    return arr, _geometry(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), dim, arr.shape[1:])


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a 3D array ``(z, y, x)`` with ``geometry``, atomically (temporary name, then rename)."""
    import SimpleITK as sitk

    path = Path(path)
    if array.ndim != 3:
        raise ValueError(f"write_image expects a 3D array, got shape {array.shape}")
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
        _check_written(tmp, array)


def _check_written(path: Path, array: np.ndarray) -> None:
    """Read ``path`` back and compare it with ``array``: SimpleITK's NIfTI writer reports a failed write (a full
    disk) only on stderr and leaves a truncated file that reads back without error but with other voxels.

    Raises:
        OSError: the file does not hold ``array``.
    """
    import SimpleITK as sitk

    try:
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        same = back.shape == array.shape and np.array_equal(back, array)
    except RuntimeError:
        same = False
    if not same:
        raise OSError(f"the file read back differs from what was written ({path.stat().st_size} bytes on disk)")
