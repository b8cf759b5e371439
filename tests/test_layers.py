"""The package's layers: a module imports only from its own layer or the ones below it, and a pipeline step
only from the steps before it in the data flow (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import autoseg

ROOT = Path(autoseg.__file__).parent

#: rank of each top-level module or sub-package; a module may import ranks <= its own
LAYERS = {
    # foundations
    "atomic": 0, "defaults": 0, "typedjson": 0, "parallel": 0, "device": 0, "io": 0, "dataset": 0, "verify": 0,
    "tiling": 0, "fingerprint": 0, "overlays": 0, "locking": 0, "fastexit": 0,
    # shared artefacts
    "plans": 1, "runconfig": 1, "checkpoint": 1, "networks": 1,
    # pipeline steps, in data-flow order
    "planning": 2, "preprocessing": 3, "training": 4, "inference": 5, "evaluation": 6,
    # what composes steps
    "workflows": 7,
    # entry points
    "cli": 8, "demo": 8, "__main__": 8, "__init__": 8,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autoseg"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "autoseg" \
                else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("autoseg.")]
        for n in names:
            parts = n.split(".")
            if len(parts) > 1 and parts[1] in LAYERS:
                out.add(parts[1])
    return out


def test_every_module_has_a_layer():
    units = {_unit(p) for p in ROOT.rglob("*.py")}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_no_import_reaches_up_a_layer():
    upward = []
    for path in ROOT.rglob("*.py"):
        me = _unit(path)
        for other in _imported_units(ast.parse(path.read_text())):
            if LAYERS[other] > LAYERS[me]:
                upward.append(f"{path.relative_to(ROOT.parent)} ({me}, layer {LAYERS[me]}) imports {other} "
                              f"(layer {LAYERS[other]})")
    assert not upward, "\n".join(upward)


def test_only_the_runtime_calls_torch_distributed():
    """Collectives live in training/runtime.py, which makes their tensors on the rank's device."""
    callers = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
               if p.name != "runtime.py" and _imports_torch_distributed(ast.parse(p.read_text()))]
    assert callers == [], callers


#: launching processes is not a collective: the CLI starts ranks with PyTorch's elastic launcher
LAUNCHERS = ("torch.distributed.launcher", "torch.distributed.elastic")


def _collective_module(name: str) -> bool:
    return name.startswith("torch.distributed") and not name.startswith(LAUNCHERS)


def _imports_torch_distributed(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                _collective_module(node.module) or node.module == "torch"
                and any(a.name == "distributed" for a in node.names)):
            return True
        if isinstance(node, ast.Import) and any(_collective_module(a.name) for a in node.names):
            return True
    return False


def test_the_checker_sees_an_upward_import_inside_a_function():
    tree = ast.parse("def f():\n    from autoseg.inference.predictor import Predictor\n")
    assert _imported_units(tree) == {"inference"}
