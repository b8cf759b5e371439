"""U-Net topology for a patch: how often each axis is pooled, with which kernels (nnU-Net v2's rules)."""

from __future__ import annotations

from dataclasses import dataclass

from autoseg import defaults

__all__ = ["Topology", "topology_for_patch"]


@dataclass(frozen=True)
class Topology:
    """Kernels and strides per stage (array order) and the patch padded to a multiple of the total stride."""

    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    patch: list[int]

    @property
    def total_stride(self) -> list[int]:
        out = [1, 1, 1]
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return out


def topology_for_patch(patch: list[int], spacing: list[float],
                       min_edge: int = defaults.FEATUREMAP_MIN_EDGE,
                       max_poolings: int = defaults.MAX_POOLINGS) -> Topology:
    """Pool an axis while its feature map stays at least ``2 * min_edge`` voxels and its current spacing is
    within 2x of the finest poolable one; kernels are 3 on axes within 2x of the finest spacing, else 1
    (so thick-slice axes are convolved in-plane until pooling has evened out the spacing). An axis the patch
    is one voxel deep along (a 2D configuration's slices) is never convolved across nor pooled.

    Args:
        patch: desired patch (voxels, array order).
        spacing: target spacing (mm, array order).
    """
    size = [float(p) for p in patch]
    cur = list(spacing)
    pools = [0, 0, 0]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1, 1, 1]]
    kernel = [1, 1, 1]
    flat = [p == 1 for p in patch]
    while True:
        finest = min((c for c, f in zip(cur, flat) if not f), default=min(cur))
        kernel = [1 if flat[a] else 3 if kernel[a] == 3 or cur[a] / finest < 2 else 1 for a in range(3)]
        valid = [a for a in range(3) if size[a] >= 2 * min_edge and pools[a] < max_poolings]
        if valid:
            fine = min(cur[a] for a in valid)
            valid = [a for a in valid if cur[a] / fine < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_edge:
            valid = []
        kernels.append(list(kernel))
        if not valid or len(kernels) > max_poolings:
            break
        stride = [2 if a in valid else 1 for a in range(3)]
        strides.append(stride)
        for a in valid:
            size[a] /= 2
            cur[a] *= 2
            pools[a] += 1
    kernels[-1] = [1 if f else 3 for f in flat]  # the bottleneck sees every axis the patch extends along
    total = [2**p for p in pools]
    padded = [-(-int(p) // t) * t for p, t in zip(patch, total)]
    return Topology(kernels, strides, padded)
