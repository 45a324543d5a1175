"""Start-up shared by the scripts that compare the pack with a real ComfyUI (comfy_lora_formats.py,
comfy_native_sampling.py): import ComfyUI from its folder on the CPU, ahead of this repository, with its Wan model
detection reading the text width from the weights; load a file of this repository as a module. Nothing heavy is
imported here, so the scripts' --help works without ComfyUI or torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def boot_comfy(comfy_dir: Path) -> None:
    """Import ComfyUI from ``comfy_dir`` as ``python main.py --cpu`` would; refuse a folder that is not ComfyUI."""
    comfy_dir = comfy_dir.resolve()
    if not (comfy_dir / "comfy" / "model_detection.py").is_file():
        raise SystemExit(f"{comfy_dir} is not a ComfyUI folder (no comfy/model_detection.py); pass --comfy")
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's own argument parser reads sys.argv
    sys.path[:0] = [str(comfy_dir), str(REPO)]  # ComfyUI first: its nodes.py, not the pack's nodes/
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_detection

    # ComfyUI's Wan detection fixes text_dim at 4096 (the real UMT5); the tiny experts use 64: read it from the weights
    detect = comfy.model_detection.detect_unet_config

    def detect_with_text_dim(state_dict, key_prefix, metadata=None):
        cfg = detect(state_dict, key_prefix, metadata=metadata)
        key = f"{key_prefix}text_embedding.0.weight"
        if cfg is not None and key in state_dict:
            cfg["text_dim"] = state_dict[key].shape[1]
        return cfg

    comfy.model_detection.detect_unet_config = detect_with_text_dim


def load_module(name: str, path: Path) -> ModuleType:
    """``path`` (a file of this repository; an ``__init__.py`` as its package) imported as module ``name``."""
    package = [str(path.parent)] if path.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
