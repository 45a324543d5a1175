"""Everything the pack needs from its ComfyUI host, in one place.

ComfyUI's modules (``folder_paths``, ``comfy.*``, ``server``) are imported inside the functions, never at import
time, so the pack imports (and its tests run) without ComfyUI. Folder look-ups need ComfyUI; progress, interrupt
checks and memory release quietly do nothing when the pack runs headless (tests, scripts).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from trainer_core.errors import ConfigError

log = logging.getLogger("wan22_lora_trainer")


def _optional(module: str) -> ModuleType | None:
    """``module`` when running inside ComfyUI, else None (headless use of the nodes)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _folder_paths() -> ModuleType:
    try:
        import folder_paths
    except ImportError:
        raise RuntimeError(
            "ComfyUI's folder_paths module is not importable: this node resolves ComfyUI folders and must run "
            "inside ComfyUI (or with absolute paths in its settings)"
        ) from None
    return folder_paths


def model_files(kind: str) -> list[str]:
    """Files ComfyUI lists in a model folder kind ("diffusion_models", "text_encoders", "vae", "loras")."""
    return list(_folder_paths().get_filename_list(kind))


def model_file_path(kind: str, name: str) -> str:
    """Absolute path of a file picked from :func:`model_files` (ComfyUI raises naming it if it vanished)."""
    return _folder_paths().get_full_path_or_raise(kind, name)


def _inside(base: str | Path, path: str, setting: str, folder: str) -> Path:
    """``path`` as given when absolute, else under ``base``, which a relative path may not leave (as ComfyUI's own
    save nodes refuse to): ``setting`` names the widget in the refusal, ``folder`` the ComfyUI folder."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = Path(base)
    if ".." in p.parts and not (base / p).resolve().is_relative_to(base.resolve()):
        raise ConfigError(f"{setting} {path!r} leads out of ComfyUI's {folder} folder - give a folder inside it, or "
                          "an absolute path")
    return base / p


def input_path(path: str, setting: str = "folder") -> Path:
    """``path`` as given when absolute, else inside ComfyUI's input directory."""
    return _inside(_folder_paths().get_input_directory(), path, setting, "input")


def output_path(path: str, setting: str = "output_dir") -> Path:
    """``path`` as given when absolute, else inside ComfyUI's output directory."""
    return _inside(_folder_paths().get_output_directory(), path, setting, "output")


def models_path(path: str, setting: str = "folder") -> Path:
    """``path`` as given when absolute, else inside ComfyUI's ``models`` folder (a subfolder no model kind is
    registered for stays out of every loader's list)."""
    return _inside(_folder_paths().models_dir, path, setting, "models")


def diffusers_path(path: str, setting: str = "folder_or_repo") -> Path:
    """A diffusers folder: absolute as given, else the first match inside ComfyUI's ``models/diffusers`` folders
    (or inside the first of those folders when none has it, so the error names the expected place)."""
    bases = list(_folder_paths().get_folder_paths("diffusers"))
    found = [_inside(b, path, setting, "models/diffusers") for b in bases]
    return next((f for f in found if f.is_dir()), found[0])


def loras_dir() -> Path:
    """ComfyUI's first ``models/loras`` folder: files written there appear in LoraLoader's list."""
    return Path(_folder_paths().get_folder_paths("loras")[0])


def compute_device() -> torch.device:
    """ComfyUI's torch device inside ComfyUI (honours ``--cpu``), else the first GPU or the CPU."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_host_models() -> None:
    """Unload ComfyUI's own models from the GPU so training or sampling does not fight them for memory."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed cancel."""
    mm = _optional("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def pending_interrupt() -> BaseException | None:
    """ComfyUI's interrupt exception if the user pressed cancel (consumed, to raise later), else ``None``."""
    try:
        check_interrupt()
    except Exception as exc:  # comfy.model_management.InterruptProcessingException
        return exc
    return None


class Progress:
    """ComfyUI's progress bar on this node (no-op headless); every update also checks for a cancel."""

    def __init__(self, total: int, node_id: str | None):
        utils = _optional("comfy.utils")
        self.node_id = node_id
        self._bar = utils.ProgressBar(total, node_id=node_id) if utils is not None else None

    def update(self, value: int, total: int, preview: Any = None) -> None:
        """Set the bar to ``value`` of ``total`` with an optional preview ``("JPEG", PIL.Image, max_size)``."""
        if self._bar is not None:
            self._bar.update_absolute(value, total, preview)

    def text(self, message: str, *, logged: bool = True) -> None:
        """Show ``message`` under the node (ComfyUI's progress text) and log it (unless ``logged`` is off: the core
        logs it itself)."""
        if logged:
            log.info(message)
        show_text(message, self.node_id)


def show_text(message: str, node_id: str | None) -> None:
    """Show ``message`` under the node ``node_id`` (ComfyUI's progress text); nothing headless."""
    server = _optional("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None:
        instance.send_progress_text(message, node_id)


def model_weight_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of a ComfyUI ``MODEL``'s diffusion-model tensors by name (``blocks.0.self_attn.q.weight`` for
    Wan): what a LoRA's keys load into."""
    return {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}


def apply_lora(model: Any, tensors: dict[str, torch.Tensor], strength: float, where: str, target: str) -> Any:
    """A clone of ComfyUI ``MODEL`` ``model`` patched with LoRA ``tensors`` (ComfyUI key names) at ``strength``.

    ComfyUI's loader only logs a key that does not fit the model (and leaves that weight alone): the tensors are
    checked against ``model``'s own shapes first, refused naming the file (``where``) and the model (``target``)."""
    import comfy.sd

    from trainer_core.lora import check_lora_fits

    check_lora_fits(tensors, model_weight_shapes(model), where, target)
    patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength, 0)
    return patched
