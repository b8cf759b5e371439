"""The counted cost models of MONAI's networks against the meta-device measurement of the networks MONAI builds:
every element kept for backward, every FLOP and every parameter, on planned networks and variations of them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from autoseg.networks.monai_costs import monai_costs
from autoseg.networks.monai_nets import segresnet_resolution, segresnet_strides
from autoseg.planning import make_plan
from autoseg.planning.measured import STEP_PER_FORWARD, _embedding_parameters, measure_step
from autoseg.plans import NetworkPlan, select_configuration

from ..planning.fingerprints import BRAIN, CT, PROSTATE, device

MONAI = ("segresnet", "attention_unet", "unetr")


@pytest.fixture(scope="module")
def planned() -> dict[str, tuple[NetworkPlan, list[list[int]]]]:
    """Each MONAI network as planned for an isotropic, an anisotropic and a CT fingerprint, on a CPU and a GPU,
    with its stages' patches."""
    nets = {}
    for fp in (BRAIN, PROSTATE, CT):
        for kind, gib in (("cpu", 16), ("cuda", 24)):
            plan = make_plan(fp, device(kind, gib), configurations=["3d", *MONAI])
            for name in MONAI:
                c = select_configuration(plan, name)
                nets[f"{fp.dataset_name}-{kind}-{name}"] = (c.network, [s.patch_size for s in c.stages])
    return nets


def _variants(net: NetworkPlan) -> list[NetworkPlan]:
    """The planned network and shapes the planner may give it elsewhere: without deep supervision, fewer or
    other blocks, other widths."""
    out = [net]
    if net.architecture == "segresnet":
        out.append(dataclasses.replace(net, deep_supervision=False))
        out.append(dataclasses.replace(net, blocks_per_stage=[2] + net.blocks_per_stage[1:],
                                       features=[8 * 2**i for i in range(len(net.features))]))
    if net.architecture == "attention_unet":
        out.append(dataclasses.replace(net, features=net.features[:-1], strides=net.strides[:-1],
                                       kernel_sizes=net.kernel_sizes[:-1], blocks_per_stage=net.blocks_per_stage[:-1]))
    if net.architecture == "unetr":
        out.append(dataclasses.replace(net, features=[8, 16, 32, 64, 96], hidden_size=96, mlp_dim=192, num_heads=3))
    return out


def _assert_counts_equal(net: NetworkPlan, patch: list[int], cin: int, n_classes: int) -> None:
    sized = dataclasses.replace(net, input_size=list(patch)) if net.architecture == "unetr" else net
    measured = measure_step(sized, patch, cin, n_classes)
    counted = monai_costs(net, cin, n_classes, patch)
    where = f"{net.architecture} {patch} in={cin} classes={n_classes}"
    assert 4 * counted.saved_elements == measured.saved_bytes, where
    assert STEP_PER_FORWARD * counted.forward_flops == measured.flops, where
    assert counted.parameters + _embedding_parameters(sized, patch) == measured.parameters, where


@pytest.mark.parametrize("dataset", ["brain", "prostate", "ct"])
@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_counted_costs_equal_the_meta_measurement(planned, dataset, kind):
    for name in MONAI:
        net, patches = planned[f"{dataset}-{kind}-{name}"]
        smallest = [2 * s for s in net.total_stride]
        cin, n_classes = (1, 2) if kind == "cpu" else (3, 5)
        for variant in _variants(net):
            for patch in (patches[-1], smallest):
                _assert_counts_equal(variant, patch, cin, n_classes)


def test_unetr_with_as_many_channels_as_features_has_no_projection():
    """MONAI's residual block projects its input only when the channels change: 16 input channels and 16 features
    take the other branch."""
    net = NetworkPlan("unetr", [16, 32, 64, 128, 96], [[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4, [1] * 5, 1,
                      False, hidden_size=96, mlp_dim=192, num_heads=2)
    _assert_counts_equal(net, [32, 32, 16], 16, 2)


@pytest.mark.parametrize("spacing", [[1.0, 1.0, 1.0], [3.6, 0.6, 0.6], [5.0, 0.8, 0.8], [2.0, 1.0, 0.5],
                                     [1.0, 1.0, 4.5]])
@pytest.mark.parametrize("n_stages", [3, 4, 5])
def test_segresnet_scales_are_monais(spacing, n_stages):
    """The cost model takes SegResNetDS's downsampling after each stage, the last one included, from our stride
    rule one stage further on the spacing MONAI is built with: the same as MONAI's own scales."""
    from monai.networks.nets.segresnet_ds import scales_for_resolution

    resolution = segresnet_resolution(segresnet_strides(spacing, n_stages))
    assert segresnet_strides(list(resolution), n_stages + 1)[1:] == [list(map(int, s)) for s in
                                                                    scales_for_resolution(resolution, n_stages)]


def test_other_architectures_are_refused():
    net = NetworkPlan("residual_unet", [8, 16], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], 1, True)
    with pytest.raises(ValueError, match="no MONAI cost model for 'residual_unet'"):
        monai_costs(net, 1, 2, [16, 16, 16])


_PLAN_IN_A_FRESH_INTERPRETER = """
import sys
from autoseg.cli import main
code = main(["plan", {dataset!r}, "-o", {run!r}, "--configs", "3d,segresnet,attention_unet,unetr", "--no-progress",
             "--device", "cpu"])
print(code, "monai" in sys.modules, "torch._dynamo" in sys.modules)
"""


def test_planning_monais_networks_imports_neither_monai_nor_dynamo(tmp_path):
    """The point of counting: ``autoseg plan`` with all of MONAI's networks never imports MONAI (seconds) nor
    PyTorch's meta kernels, and still plans them."""
    from autoseg.demo import make_synthetic_dataset
    from autoseg.plans import load_plans

    data = make_synthetic_dataset(tmp_path / "Synthetic", n_cases=4, shape=(12, 16, 16))
    script = _PLAN_IN_A_FRESH_INTERPRETER.format(dataset=str(data), run=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.stdout.strip().splitlines()[-1] == "0 False False", out.stderr[-2000:]
    plans = load_plans(tmp_path / "run" / "plans.json")
    assert {c.name for c in plans.other_configurations} >= set(MONAI)
