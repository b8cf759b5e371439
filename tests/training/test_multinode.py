"""Training across "nodes": two torchrun launchers on this machine meet through the c10d rendezvous, as two
nodes of a cluster do, and train one fold to the weights one launcher with two processes reaches."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import torch

STEPS = ["--stage", "zoom-in", "--epochs", "1", "--iterations-per-epoch", "3", "-j", "0", "--device", "cpu",
         "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def test_two_nodes_of_one_process_reach_the_weights_of_one_node_of_two(tiny_run, tmp_path):
    one_node = tmp_path / "one_node"
    shutil.copytree(tiny_run, one_node)
    cmd = [sys.executable, "-m", "autoseg", "train", "0", "--run", str(one_node), "--gpus", "2", *STEPS]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # each "node" pinned to one core: one thread per process, as on the single node of two processes
    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "autoseg-test",
              "--max-restarts", "0", "-m", "autoseg", "train", "0", "--run-dir", str(tiny_run), *STEPS]
    nodes = [subprocess.Popen(["taskset", "-c", str(core), *launch], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for core in (0, 1)]
    results = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [r[1][-2000:] for r in results]
    printed = "".join(r[0] for r in results)
    assert printed.count("validation  ") == 1 and "over 2 processes = global" in printed  # rank 0 alone speaks
    a = torch.load(one_node / "fold_0" / "checkpoint_final.pt", weights_only=True)["network"]
    b = torch.load(tiny_run / "fold_0" / "checkpoint_final.pt", weights_only=True)["network"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
