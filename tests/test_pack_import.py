"""ComfyUI imports every custom node pack at server start, in a process that has imported torch: this pack's import
(and every node's INPUT_TYPES, which the UI asks for right after) leaves the models' libraries unloaded (they load
when a node first runs) and prints nothing. Timing is not asserted (the README states the measured time)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Libraries a node loads when it first runs, never at ComfyUI's start.
HEAVY = ("diffusers", "peft", "transformers", "bitsandbytes", "av", "accelerate")
#: The start of every script: torch first (ComfyUI's own import), and a ComfyUI whose model folders are empty.
PRELUDE = """
import importlib, importlib.util, sys, types
import torch
folder_paths = types.ModuleType("folder_paths")
folder_paths.get_filename_list = lambda kind: []
sys.modules["folder_paths"] = folder_paths
"""


def _run(script: str) -> subprocess.CompletedProcess:
    """``script`` after :data:`PRELUDE` in a fresh interpreter (nothing imported yet), in the repository."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _loaded_heavy(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_pack_imports_without_the_models_libraries_and_quietly():
    out = _run(f"""
        spec = importlib.util.spec_from_file_location("wan22_pack", {str(REPO / "__init__.py")!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["wan22_pack"] = pack
        spec.loader.exec_module(pack)  # as ComfyUI loads a custom node folder
        for node in pack.NODE_CLASS_MAPPINGS.values():
            node.INPUT_TYPES()
        print(*(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert _loaded_heavy(out) == []
    assert out.stderr == ""  # no warning lines (bitsandbytes prints one when it is imported)


def test_every_node_module_but_train_loads_light():
    """Each node module with its INPUT_TYPES, without the nodes package's __init__ (which imports Train LoRA's)."""
    modules = sorted(p.stem for p in (REPO / "nodes").glob("*.py") if p.stem not in ("__init__", "train"))
    out = _run(f"""
        for name, path in (("wan22_pack", {str(REPO)!r}), ("wan22_pack.nodes", {str(REPO / "nodes")!r})):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
        for name in {modules!r}:
            module = importlib.import_module("wan22_pack.nodes." + name)
            for node in vars(module).values():
                if isinstance(node, type) and hasattr(node, "INPUT_TYPES") and node.__module__ == module.__name__:
                    node.INPUT_TYPES()
        print(*(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert _loaded_heavy(out) == []
    assert out.stderr == ""
