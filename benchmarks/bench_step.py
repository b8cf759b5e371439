"""Measure one training step (forward, backward, SGD) of the planned network on this machine's CPU.

Backs the CPU compute budget in autoseg/defaults.py: plans the given dataset for the CPU, builds the planned
network and times steps on random patches of each stage. Prints a table; run by hand.
Usage: python benchmarks/bench_step.py [DATASET_DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autoseg.cli import main as autoseg_main
from autoseg.networks import build_network
from autoseg.plans import load_plans

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "MSD_Task04_Hippocampus"


def time_steps(plan, stage, steps: int) -> list[float]:
    torch.manual_seed(0)
    net = build_network(plan.network, len(plan.channel_names), len(plan.labels)).train()
    opt = torch.optim.SGD(net.parameters(), lr=stage.learning_rate, momentum=0.99, nesterov=True)
    x = torch.randn(stage.batch_size, len(plan.channel_names), *stage.patch_size)
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        outs = net(x)
        loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[2:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", type=Path, default=DEFAULT,
                    help="dataset folder to plan for the CPU (default ../shared/data/MSD_Task04_Hippocampus)")
    ap.add_argument("--steps", type=int, default=10, help="steps timed per stage after two warm-up steps (default 10)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if autoseg_main(["plan", str(args.dataset), "-o", tmp, "--device", "cpu", "--no-progress"]) != 0:
            return 1
        plan = load_plans(Path(tmp) / "plans.json")
    print(f"\ntorch threads: {torch.get_num_threads()}")
    print("| stage    | patch      | batch | est. GFLOP | median s/step | steps in 30 min |")
    print("|----------|------------|-------|------------|---------------|-----------------|")
    for st in plan.stages:
        med = statistics.median(time_steps(plan, st, args.steps))
        patch = "x".join(map(str, st.patch_size))
        print(f"| {st.name:<8} | {patch:<10} | {st.batch_size:5d} | {st.estimated_step_gflops:10.1f} | "
              f"{med:13.3f} | {int(1800 / med):15d} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
