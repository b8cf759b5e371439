"""Written-out fingerprints for planner tests: what ``autoseg plan`` would measure on three typical datasets."""

from __future__ import annotations

from autoseg.device import DeviceInfo
from autoseg.fingerprint import CaseFingerprint, ChannelStats, ClassStats, Fingerprint


def device(kind: str, gib: float) -> DeviceInfo:
    """A CUDA GPU with ``gib`` of memory, or this kind of 2-core CPU with ``gib`` of RAM."""
    if kind == "cuda":
        return DeviceInfo("cuda", "test GPU", 8, 64.0, gib, gib, "--gpu-memory")
    return DeviceInfo("cpu", "test CPU", 2, gib, None, gib, "detected")


def fingerprint(name: str, spacing_zyx: list[float], shape_zyx: list[int], n_cases: int, channels: list[str],
                n_classes: int, stats: ChannelStats | None = None, relative_crop: float = 1.0) -> Fingerprint:
    """``n_cases`` identical cases; the crop keeps ``relative_crop`` of the volume along y."""
    stats = stats or ChannelStats(1000, 100.0, 20.0, 0.0, 300.0, 40.0, 180.0)
    crop = [shape_zyx[0], int(shape_zyx[1] * relative_crop), shape_zyx[2]]
    cases = [CaseFingerprint(f"{name}_{i:03d}", list(spacing_zyx), list(shape_zyx), crop,
                             [[0, crop[0]], [0, crop[1]], [0, crop[2]]], {k: 500 for k in range(1, n_classes + 1)},
                             {k: 1 for k in range(1, n_classes + 1)}, [stats] * len(channels))
             for i in range(n_cases)]
    labels = {0: "background", **{k: f"class{k}" for k in range(1, n_classes + 1)}}
    classes = [ClassStats(k, f"class{k}", 500 * n_cases, n_cases, 500.0, 1.0, 1 / n_classes)
               for k in range(1, n_classes + 1)]
    rel = crop[1] / shape_zyx[1]
    return Fingerprint(1, name, "/nowhere", "nnunet", "key", channels, labels, n_cases, list(spacing_zyx),
                       list(shape_zyx), crop, rel, [stats] * len(channels), classes, cases, device("cpu", 16))


BRAIN = fingerprint("brain", [1.0, 1.0, 1.0], [36, 50, 35], 200, ["MRI"], 2)
PROSTATE = fingerprint("prostate", [3.6, 0.6, 0.6], [20, 320, 320], 32, ["T2", "ADC"], 2)
CT = fingerprint("ct", [2.5, 0.8, 0.8], [200, 512, 512], 100, ["CT"], 2,
                 ChannelStats(10**7, 80.0, 50.0, -1024.0, 3000.0, -50.0, 250.0))
