"""Detect the device and load what planning will need, in a background thread, while the fingerprint runs.

Importing torch, the planner and, for the patch-free configuration, PyTorch's meta kernels (its cost is measured
on the meta device, whose first normalisation imports ``torch._dynamo``) is single-threaded work of seconds: on a
2-core machine about 2 s for torch and 1.5 s for the meta kernels. The fingerprint meanwhile waits on its worker
processes, so the two overlap; planning then starts with everything loaded (or waits on Python's import lock for
what is still loading). MONAI is not loaded: its networks are planned from counted cost models
(:mod:`autoseg.networks.monai_costs`) and imported only where they are built. Nothing here writes anything or
changes what the plan holds.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from autoseg import defaults
from autoseg.device import DeviceInfo, detect_device

__all__ = ["Warmup", "wants_meta_kernels"]

log = logging.getLogger(__name__)


def wants_meta_kernels(configs: list[str] | None, kind: str) -> bool:
    """Whether a plan of ``configs`` (None: the defaults for a device of ``kind``) measures a network on the meta
    device: only the patch-free one has no counted cost model. A ``patch_free`` the planner adds by itself for big
    volumes is not foreseen: its measurement loads late."""
    wanted = defaults.DEFAULT_CONFIGURATIONS[kind] if configs is None else configs
    return "patch_free" in wanted


class Warmup:
    """The background thread: :attr:`device` (a future) is set as soon as the device is detected, before the
    libraries load; :meth:`finish` waits for the loading, so that no command exits while an import is half
    done (a daemon thread cut off inside one can abort the interpreter at exit)."""

    def __init__(self, configs: list[str] | None, gpu_memory_gib: float | None, device: str) -> None:
        """Start detecting the device (:func:`autoseg.device.detect_device`'s arguments) and then loading the
        libraries ``configs`` need."""
        self.device: Future[DeviceInfo] = Future()
        self._thread = threading.Thread(target=self._run, args=(configs, gpu_memory_gib, device),
                                        name="autoseg-plan-warmup", daemon=True)
        self._thread.start()

    def _run(self, configs: list[str] | None, gpu_memory_gib: float | None, device: str) -> None:
        try:
            info = detect_device(gpu_memory_gib, device)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            self.device.set_exception(e)
            return
        self.device.set_result(info)
        _load(wants_meta_kernels(configs, info.kind))

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for the thread to end; after ``timeout`` seconds (an import that hangs) say so and go on."""
        if self._thread.is_alive():
            log.info("finishing the background imports of torch (seconds)")
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(f"the background imports did not finish in {timeout:.0f} s; exiting without them")


def _load(with_meta: bool) -> None:
    try:
        import torch

        import autoseg.planning.planner  # noqa: F401 - torch, the networks and their cost models
        if with_meta:
            torch.nn.functional.instance_norm(torch.zeros(1, 1, 2, 2, 2, device="meta"))
    except BaseException as e:  # noqa: BLE001 - the planner imports these again and reports a failure there
        log.debug("plan warm-up: %s: %s", type(e).__name__, e)
