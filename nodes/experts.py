"""Load Wan22 Experts (MODEL panel): where the two experts, the text encoder and the VAE come from."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import ValidationError

from trainer_core.config import MemoryConfig, ModelConfig, format_validation_error
from trainer_core.errors import ConfigError
from trainer_core.names import DTYPES as DTYPE_NAMES

from . import host
from .bundle import CATEGORY, EXPERTS

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle

NONE = "none"
SOURCES = ("comfy files", "diffusers folder", "HF repo id", "tiny")
DTYPES = tuple(DTYPE_NAMES)
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
                    "Wan-AI/Wan2.2-T2V-A14B-Diffusers. Ignored for comfy files and tiny")}),
                "dtype": (DTYPES, {"default": "bf16", "tooltip": (
                    "Storage dtype of the frozen experts: bf16 (26.6 GiB per expert) is the usual choice; fp8 "
                    "files are dequantized to it")}),
                "text_encoder_dtype": (DTYPES, {"default": "bf16", "tooltip": (
                    "UMT5 dtype: bf16 (10.6 GiB); it encodes the captions, then leaves memory (unless text "
                    "encoder mode is live)")}),
                "vae_dtype": (DTYPES, {"default": "fp32", "tooltip": (
                    "VAE dtype: fp32 is exact and the VAE is small; bf16 saves memory at large sizes")}),
                "low_vram": ("BOOLEAN", {"default": False, "tooltip": (
                    "24 GB: on (only the expert being trained sits on the GPU, swapped at each switch); "
                    "H100/H200: off")}),
                "offload_blocks": ("STRING", {"default": "0", "tooltip": (
                    "Transformer blocks (of 40) streamed from RAM every pass: 0 = all on the GPU; 'auto' = the "
                    "fewest that fit the card; a count such as 20 for bf16 on 24 GB")}),
                "prefetch": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": (
                    "Offloaded blocks copied ahead of the computation: 1-2; more hides copy time but uses VRAM")}),
                "headroom_gib": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 64.0, "step": 0.5, "tooltip": (
                    "GPU memory (GiB) left free for other programs; raise it if the card also drives a display")}),
                "check_vram": ("BOOLEAN", {"default": True, "tooltip": (
                    "Refuse settings the VRAM planner says will not fit (it suggests what to change); off = try "
                    "anyway")}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, source: str, high_noise_model: str, low_noise_model: str, text_encoder: str, vae: str
    ) -> bool | str:
        """Check the file combos in place of ComfyUI's "Value not in list", which it skips for the inputs named
        here: with source tiny they are ignored, so a workflow saved with file names this installation lacks runs
        with tiny as it is; otherwise each must be 'none' or a file ComfyUI lists."""
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
        dtype: str,
        text_encoder_dtype: str,
        vae_dtype: str,
        low_vram: bool,
        offload_blocks: str,
        prefetch: int,
        headroom_gib: float,
        check_vram: bool,
    ) -> tuple[ExpertsBundle]:
        """Validate the choice into a :class:`ModelConfig` and a :class:`MemoryConfig`; nothing is read yet. With
        source tiny the four files are ignored."""
        picked = {"high_noise_model": high_noise_model, "low_noise_model": low_noise_model,
                  "text_encoder": text_encoder, "vae": vae}  # fmt: skip
        settings = {} if source == "tiny" else {
            FILE_INPUTS[name][0]: host.model_file_path(FILE_INPUTS[name][1], value)
            for name, value in picked.items() if value != NONE
        }
        try:
            model = ModelConfig(
                source=_source(source, folder_or_repo.strip()),
                dtype=dtype,
                text_encoder_dtype=text_encoder_dtype,
                vae_dtype=vae_dtype,
                **settings,
            )
            memory = MemoryConfig(
                low_vram=low_vram,
                offload_blocks=_offload_blocks(offload_blocks),
                prefetch=prefetch,
                headroom_gib=headroom_gib,
                check_vram=check_vram,
            )
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Load Wan22 Experts")) from None
        from trainer_core.api import ExpertsBundle  # the models' libraries: on first use, not at ComfyUI's start

        return (ExpertsBundle(model, memory),)


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
        folder = host.diffusers_path(text)
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
