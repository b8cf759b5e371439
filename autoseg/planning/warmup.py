"""Detect the device and load what planning will need, in a background thread, while the fingerprint runs.

Importing torch, the planner and, for MONAI's configurations, MONAI and PyTorch's meta kernels (the cost
measurement's first normalisation imports ``torch._dynamo``) is single-threaded work of several seconds: on a
2-core machine, about 3.5 s for torch and 3 s for MONAI, which imports its transforms, matplotlib and pandas
with it. The fingerprint meanwhile waits on its worker processes, so the two overlap; planning then starts
with everything loaded. Nothing here writes anything or changes what the plan holds.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from autoseg import defaults
from autoseg.device import DeviceInfo, detect_device
from autoseg.networks.factory import MONAI_ARCHITECTURES

__all__ = ["start_warmup", "wanted_libraries"]


def wanted_libraries(configs: list[str] | None, kind: str) -> tuple[bool, bool]:
    """For a plan of ``configs`` (None: the defaults for a device of ``kind``): whether it builds a MONAI network,
    and whether it measures a network on the meta device (MONAI's and the patch-free one have no cost model).
    A ``patch_free`` the planner adds by itself for big volumes is not foreseen: its measurement loads late."""
    wanted = defaults.DEFAULT_CONFIGURATIONS[kind] if configs is None else configs
    monai = any(c in MONAI_ARCHITECTURES for c in wanted)
    return monai, monai or "patch_free" in wanted


def start_warmup(configs: list[str] | None, gpu_memory_gib: float | None, device: str) -> Future[DeviceInfo]:
    """Start detecting the device (:func:`autoseg.device.detect_device`'s arguments) and loading planning's
    libraries in a daemon thread (it never delays the exit of a command that failed or was interrupted).

    Returns:
        The detected device, when done; ``result()`` raises what detection raised. A library that fails to
        load is left to the planner, whose own import reports it where it is needed.
    """
    done: Future[DeviceInfo] = Future()

    def run() -> None:
        try:
            info = detect_device(gpu_memory_gib, device)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            done.set_exception(e)
            return
        _load(*wanted_libraries(configs, info.kind))
        done.set_result(info)

    threading.Thread(target=run, name="autoseg-plan-warmup", daemon=True).start()
    return done


def _load(with_monai: bool, with_meta: bool) -> None:
    try:
        import torch

        import autoseg.planning.planner  # noqa: F401 - torch, the networks and their cost models
        if with_monai:
            import monai.networks.nets  # noqa: F401
        if with_meta:
            torch.nn.functional.instance_norm(torch.zeros(1, 1, 2, 2, 2, device="meta"))
    except Exception:  # noqa: BLE001, S110 - the planner imports these again and reports a failure there
        pass
