"""Training-step throughput of autoseg's networks and nnU-Net v2's, same features, patch and batch, same run.

Usage: python benchmarks/bench_train_speed.py [--nnunet-venv PATH] [--patch 40 56 40] [--batch 2] [--steps 8]

Times forward + deep-supervised Dice/CE loss + backward + SGD step on random data (median of --steps after two
warm-up steps) for autoseg's residual and plain U-Nets (16->128 features, 4 stages, the CPU plan's network for
Hippocampus) and for nnU-Net's PlainConvUNet with its DC_and_CE_loss and deep-supervision wrapper at the same
features, patch and batch (run with the nnU-Net venv's python). Data loading is not in these figures: its share
of a real step is the ``data`` column of ``autoseg train`` (and ``benchmarks/bench_train_budget.py``). Run by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

FEATURES = [16, 32, 64, 128]
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]

NNUNET_SCRIPT = textwrap.dedent("""
    import json, statistics, sys, time, torch
    from torch import nn
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    patch, batch, steps = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    net = PlainConvUNet(1, 4, [16, 32, 64, 128], nn.Conv3d, 3, [1, 2, 2, 2], 2, 3, 2, True, nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                        deep_supervision=True).train()
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = [1 / 2**i for i in range(3)]; w[-1] = 0; w = [x / sum(w) for x in w]
    loss = DeepSupervisionWrapper(loss, w)
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(batch, 1, *patch)
    y = torch.randint(0, 3, (batch, 1, *patch))
    ys = [y, y[:, :, ::2, ::2, ::2], y[:, :, ::4, ::4, ::4]]
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        l = loss(net(x), ys)
        l.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times[2:]),
                      "params": sum(p.numel() for p in net.parameters())}))
""")


def time_autoseg(architecture: str, patch: list[int], batch: int, steps: int) -> dict:
    import torch

    from autoseg.networks.resunet import ResidualUNet
    from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss

    torch.manual_seed(0)
    net = ResidualUNet(1, 3, FEATURES, [[3, 3, 3]] * 4, STRIDES, [1, 1, 1, 1],
                       residual=architecture == "residual_unet").train()
    loss_fn = DeepSupervisionLoss(DiceCELoss([1.0, 1.0], True), [2 / 3, 1 / 3, 0.0])  # the plan's weights
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(batch, 1, *patch)
    y = torch.randint(0, 3, (batch, *patch))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times[2:]), "params": sum(p.numel() for p in net.parameters())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnunet-venv", type=Path, default=Path(__file__).resolve().parents[2] / ".venv-nnunet",
                    help="venv with nnunetv2 installed; nnU-Net's row is left out without it")
    ap.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40],
                    help="patch size in the networks' axis order (default 40 56 40)")
    ap.add_argument("--batch", type=int, default=2, help="patches per step (default 2)")
    ap.add_argument("--steps", type=int, default=8, help="steps timed after two warm-up steps (default 8)")
    args = ap.parse_args()
    rows = {a: time_autoseg(a, args.patch, args.batch, args.steps) for a in ("residual_unet", "plain_unet")}
    py = args.nnunet_venv / "bin" / "python"
    if py.is_file():
        out = subprocess.run([str(py), "-c", NNUNET_SCRIPT, json.dumps(args.patch), str(args.batch), str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode == 0:
            rows["nnU-Net PlainConvUNet"] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            print(f"nnU-Net failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    patch = "x".join(map(str, args.patch))
    print(f"\npatch {patch}, batch {args.batch}, features {FEATURES}, CPU; forward + DS loss + backward + SGD")
    print("| network | parameters | median s/step | steps/s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['median_s']:.3f} | {1 / r['median_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
