"""(Helpers, no tests.) Stand-ins for ComfyUI's modules and the pack loader, shared by the node and workflow tests.

``install(monkeypatch, root)`` puts fake ``folder_paths``, ``comfy.model_management``, ``comfy.utils``, ``comfy.sd``
and ``server`` modules (plus a fake top-level ``nodes`` module, as ComfyUI has one) into ``sys.modules``, with model
folders under ``root/models/<kind>``, and returns a :class:`Host` recording what the pack did with them.
``load_pack()`` imports the repository root the way ComfyUI imports a custom node folder.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "wan22_pack_under_test"


class InterruptProcessingException(Exception):
    """Same role as ComfyUI's ``comfy.model_management.InterruptProcessingException``."""


@dataclass
class Host:
    """What the fake ComfyUI saw: progress updates, node texts, unloads, LoRA patches; ``interrupt_after`` makes
    the n-th interrupt check raise (a user pressing cancel)."""

    root: Path
    progress: list[tuple[int, int, object]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)
    unloads: int = 0
    patches: list[tuple[object, dict, float]] = field(default_factory=list)
    interrupt_after: int | None = None
    checks: int = 0

    def folder(self, kind: str) -> Path:
        path = self.root / "models" / kind
        path.mkdir(parents=True, exist_ok=True)
        return path


def install(monkeypatch, root: Path) -> Host:
    """Install the fake ComfyUI modules for one test (monkeypatch undoes it)."""
    host = Host(root)
    for sub in ("input", "output"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda kind: sorted(
        p.relative_to(host.folder(kind)).as_posix() for p in host.folder(kind).rglob("*") if p.is_file()
    )

    def full_path(kind, name):
        path = host.folder(kind) / name
        if not path.is_file():
            raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")
        return str(path)

    fp.get_full_path_or_raise = full_path
    fp.get_input_directory = lambda: str(root / "input")
    fp.get_output_directory = lambda: str(root / "output")
    fp.get_folder_paths = lambda kind: [str(host.folder(kind))]
    fp.models_dir = str(root / "models")

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: None

    def unload_all_models():
        host.unloads += 1

    def check():
        host.checks += 1
        if host.interrupt_after is not None and host.checks >= host.interrupt_after:
            raise InterruptProcessingException()

    mm.unload_all_models = unload_all_models
    mm.throw_exception_if_processing_interrupted = check

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id = total, node_id

        def update_absolute(self, value, total=None, preview=None):
            host.progress.append((value, total, preview))

    utils.ProgressBar = ProgressBar

    sd = types.ModuleType("comfy.sd")

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        host.patches.append((model, lora, strength_model))
        return ("patched", model, strength_model), None

    sd.load_lora_for_models = load_lora_for_models

    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils, comfy.sd = mm, utils, sd

    server = types.ModuleType("server")

    class PromptServer:
        instance = None

        def send_progress_text(self, text, node_id, sid=None):
            host.texts.append((node_id, text))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer

    comfy_nodes = types.ModuleType("nodes")  # ComfyUI's own top-level nodes.py; the pack must not import it
    for name, module in {
        "folder_paths": fp,
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.utils": utils,
        "comfy.sd": sd,
        "server": server,
        "nodes": comfy_nodes,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return host


def comfy_model(state_dict: dict) -> object:
    """A ComfyUI ``MODEL`` (ModelPatcher) as far as the pack reads one: ``model.diffusion_model.state_dict()``,
    original Wan names (``blocks.0.self_attn.q.weight``)."""
    diffusion_model = types.SimpleNamespace(state_dict=lambda: state_dict)
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=diffusion_model))


def load_pack():
    """Import the repository root as ComfyUI imports a custom node folder (a package named after the folder)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def defaults(node_cls) -> dict:
    """Every widget's default value (what a freshly added node sends)."""
    spec = node_cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec.get(section, {}).items():
            opts = opts[0] if opts else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(kind, (list, tuple)):
                out[name] = kind[0]
    return out


def call(node_cls, **inputs):
    """Call a node as ComfyUI does: a fresh instance, its FUNCTION with keyword arguments, under inference mode."""
    with torch.inference_mode():
        return getattr(node_cls(), node_cls.FUNCTION)(**inputs)


_CONVERT = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def validate(node_cls, inputs: dict) -> list[tuple[str, str]]:
    """ComfyUI's queue-time check of one node's widget values (execution.py, ``validate_inputs``), as
    ``(input name, message)`` errors: a value is converted to its widget kind; an input VALIDATE_INPUTS does not take
    gets ComfyUI's min/max check and, for a combo given as a *list* (``isinstance(input_type, list)``: a tuple is not
    checked), "Value not in list"; VALIDATE_INPUTS gets the inputs it takes (a linked one as None) and its one
    message is attached to every one of them."""
    spec = node_cls.INPUT_TYPES()
    declared = spec.get("required", {}) | spec.get("optional", {})
    fn = getattr(node_cls, "VALIDATE_INPUTS", None)
    takes = inspect.getfullargspec(fn).args if fn is not None else []
    errors, given = [], {}
    for name, value in inputs.items():
        if name not in declared:
            continue
        kind, *rest = declared[name]
        opts = rest[0] if rest else {}
        if isinstance(value, list) and len(value) == 2:  # a link [node id, output]: its value comes when it runs
            given[name] = None
            continue
        if isinstance(kind, str) and kind in _CONVERT:
            value = _CONVERT[kind](value)
        given[name] = value
        if name in takes:
            continue
        if "min" in opts and value < opts["min"]:
            errors.append((name, f"Value {value} smaller than min of {opts['min']}"))
        elif "max" in opts and value > opts["max"]:
            errors.append((name, f"Value {value} bigger than max of {opts['max']}"))
        elif isinstance(kind, list) and value not in kind:
            errors.append((name, f"Value not in list: {name}: '{value}' not in {kind}"))
    if takes:
        result = fn(**{k: v for k, v in given.items() if k in takes})
        if result is not True:
            errors += [(name, f"{name} - {result}") for name in given if name in takes]
    return errors
