"""Load Wan22 Experts (MODEL panel): where the two experts, the text encoder and the VAE come from."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from trainer_core.config import MemoryConfig, ModelConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, EXPERTS
from .widgets import inputs, partial_config

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle

NONE = "none"
SOURCES = ["comfy files", "diffusers folder", "HF repo id", "tiny"]  # a list: ComfyUI checks it when queued
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


#: The file combos: the ModelConfig setting each fills and the ComfyUI model folder it lists.
FILE_INPUTS = {
    "high_noise_model": ("high_noise", "diffusion_models"),
    "low_noise_model": ("low_noise", "diffusion_models"),
    "text_encoder": ("text_encoder", "text_encoders"),
    "vae": ("vae", "vae"),
}


def _files(kind: str) -> list[str]:
    return [NONE, *host.model_files(kind)]


class LoadWan22Experts:
    """Describe the base model; components load on first use and are shared by every node the bundle feeds."""

    #: The widgets that are ModelConfig / MemoryConfig settings (defaults, limits and tooltips are the config's).
    FIELDS = {
        "dtype": "model.dtype",
        "text_encoder_dtype": "model.text_encoder_dtype",
        "vae_dtype": "model.vae_dtype",
        "low_vram": "memory.low_vram",
        "offload_blocks": "memory.offload_blocks",
        "prefetch": "memory.prefetch",
        "headroom_gib": "memory.headroom_gib",
        "check_vram": "memory.check_vram",
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": (SOURCES, {"default": "comfy files", "tooltip": (
                    "comfy files: the four files picked below (as ComfyUI's Wan 2.2 template uses). diffusers "
                    "folder / HF repo id: Wan2.2-T2V-A14B-Diffusers layout named in folder_or_repo. tiny: toy "
                    "model for testing the graph in seconds (the four files are then ignored)")}),
                "high_noise_model": (_files("diffusion_models"), {"tooltip": (
                    "High-noise expert from models/diffusion_models, e.g. wan2.2_t2v_high_noise_14B_fp8_scaled; "
                    "'none' takes it from folder_or_repo")}),
                "low_noise_model": (_files("diffusion_models"), {"tooltip": (
                    "Low-noise expert from models/diffusion_models, e.g. wan2.2_t2v_low_noise_14B_fp8_scaled; "
                    "'none' takes it from folder_or_repo")}),
                "text_encoder": (_files("text_encoders"), {"tooltip": (
                    "UMT5-XXL from models/text_encoders (umt5_xxl_fp8_e4m3fn_scaled or fp16); it carries its "
                    "tokenizer. 'none' takes it from folder_or_repo")}),
                "vae": (_files("vae"), {"tooltip": (
                    "wan_2.1_vae from models/vae (Wan 2.2 14B uses the 2.1 VAE, not wan2.2_vae); 'none' takes it "
                    "from folder_or_repo")}),
                "folder_or_repo": ("STRING", {"default": "", "tooltip": (
                    "diffusers folder: a folder under models/diffusers or an absolute path; HF repo id: e.g. "
                    "Wan-AI/Wan2.2-T2V-A14B-Diffusers. Leave empty for comfy files and tiny")}),
                **inputs(cls.FIELDS),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, source: str, high_noise_model: str, low_noise_model: str, text_encoder: str, vae: str
    ) -> bool | str:
        """Check the file combos in place of ComfyUI's "Value not in list", which it skips for the inputs named
        here: with source tiny they are ignored, so a workflow saved with file names this installation lacks runs
        with tiny as it is; otherwise each must be 'none' or a file ComfyUI lists. (ComfyUI shows the message on
        each of these five inputs.)"""
        if source not in SOURCES:
            return f"source {source!r} is not one of {', '.join(SOURCES)}"
        if source == "tiny":
            return True
        picked = {"high_noise_model": high_noise_model, "low_noise_model": low_noise_model,
                  "text_encoder": text_encoder, "vae": vae}  # fmt: skip
        for name, value in picked.items():
            kind = FILE_INPUTS[name][1]
            if value != NONE and value not in host.model_files(kind):
                return (f"{name} {value!r} is not in ComfyUI's models/{kind} - put the file there and refresh, pick "
                        "another one or 'none', or set source to tiny")
        return True

    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = (
        "Both experts, text encoder and VAE (loaded on first use, shared by the nodes it feeds) and the memory "
        "settings training uses.",
    )
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Choose the Wan 2.2 T2V A14B base model the LoRAs are trained on and rendered with, and where its weights "
        "live on the GPU while training (Low VRAM, block offloading)."
    )

    def load(
        self,
        source: str,
        high_noise_model: str,
        low_noise_model: str,
        text_encoder: str,
        vae: str,
        folder_or_repo: str,
        **values: Any,
    ) -> tuple[ExpertsBundle]:
        """Validate the choice into a :class:`ModelConfig` and a :class:`MemoryConfig`; nothing is read yet. With
        source tiny the four files are ignored."""
        picked = {"high_noise_model": high_noise_model, "low_noise_model": low_noise_model,
                  "text_encoder": text_encoder, "vae": vae}  # fmt: skip
        _check_source_use(source, folder_or_repo.strip(), picked)
        settings = {} if source == "tiny" else {
            FILE_INPUTS[name][0]: host.model_file_path(FILE_INPUTS[name][1], value)
            for name, value in picked.items() if value != NONE
        }
        chosen = partial_config(self.FIELDS, {**values, "offload_blocks": _offload_blocks(values["offload_blocks"])})
        try:
            model = ModelConfig(source=_source(source, folder_or_repo.strip()), **chosen["model"], **settings)
            memory = MemoryConfig(**chosen["memory"])
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Load Wan22 Experts")) from None
        from trainer_core.api import ExpertsBundle  # the models' libraries: on first use, not at ComfyUI's start

        return (ExpertsBundle(model, memory),)


def _check_source_use(source: str, folder_or_repo: str, picked: dict[str, str]) -> None:
    """Refuse a source choice that leaves a setting unused: folder_or_repo with comfy files or tiny (which read no
    folder), or a diffusers folder / repo whose every component is overridden by a picked file (nothing read from
    it; a file picker set to 'none' is what takes that component from folder_or_repo)."""
    where = "Load Wan22 Experts"
    if source in ("comfy files", "tiny") and folder_or_repo:
        raise ConfigError(f"{where}: folder_or_repo {folder_or_repo!r} is not read with source '{source}' - clear "
                          "it, or set source to 'diffusers folder' / 'HF repo id' to load from it")
    if source in ("diffusers folder", "HF repo id") and NONE not in picked.values():
        raise ConfigError(
            f"{where}: source '{source}' reads nothing from folder_or_repo when all four files are picked - set the "
            "file pickers to take from it (high_noise_model, low_noise_model, text_encoder, vae) to 'none', or set "
            "source to 'comfy files'"
        )


def _offload_blocks(text: str) -> int | str:
    """The offload_blocks widget as MemoryConfig takes it: a whole number or 'auto'."""
    value = text.strip().lower()
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"Load Wan22 Experts: offload_blocks {text!r} must be a whole number of blocks (0 = none) or 'auto'"
        ) from None


def _source(mode: str, text: str) -> str | None:
    """ModelConfig.source for the chosen mode: None (files only), 'tiny', a folder or a repo id."""
    if mode == "tiny":
        return "tiny"
    if mode == "comfy files":
        return None
    if not text:
        raise ConfigError(
            f"Load Wan22 Experts: source '{mode}' needs folder_or_repo - fill it in or pick 'comfy files'"
        )
    if mode == "diffusers folder":
        folder = host.diffusers_path(text, "Load Wan22 Experts: folder_or_repo")
        if not folder.is_dir():
            raise ConfigError(
                f"Load Wan22 Experts: folder_or_repo: diffusers folder {folder} does not exist - put the "
                "Wan2.2-T2V-A14B-Diffusers folder under models/diffusers or give an absolute path"
            )
        return str(folder)
    if mode == "HF repo id":
        if not _REPO_ID.match(text):
            raise ConfigError(
                f"Load Wan22 Experts: folder_or_repo {text!r} is not a Hugging Face repo id (owner/name, e.g. "
                "Wan-AI/Wan2.2-T2V-A14B-Diffusers)"
            )
        return text
    raise ConfigError(f"Load Wan22 Experts: unknown source {mode!r}; choose one of {', '.join(SOURCES)}")
