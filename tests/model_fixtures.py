"""Test helpers: save the tiny preset in every layout the model loaders accept.

Shared by several test files - keep these signatures stable. Typical use::

    from tests.model_fixtures import tiny_components, save_diffusers_folder, save_comfy_files

    src = tiny_components()                                   # fp32 tiny preset (WanComponents)
    folder = save_diffusers_folder(src, tmp_path / "diffusers")  # -> ModelConfig(source=str(folder))
    files = save_comfy_files(src, tmp_path / "comfy")          # -> {"high", "low", "text_encoder", "vae"} paths

Layouts:
    * diffusers folder: ``WanPipeline.save_pretrained`` (transformer/, transformer_2/, vae/, text_encoder/,
      tokenizer/, scheduler/, model_index.json), like Wan-AI/Wan2.2-T2V-A14B-Diffusers.
    * ComfyUI files: experts with original Wan key names (optionally behind ``model.diffusion_model.``), fp16/bf16/
      fp32 or fp8_scaled in the old (``scale_weight`` + ``scaled_fp8`` marker) or new (``weight_scale`` +
      ``_quantization_metadata`` + ``comfy_quant``, per-row scales) naming; the UMT5 file with its ``spiece_model``;
      the VAE with original Wan VAE key names.
    * a fake Hugging Face hub cache (``models--owner--name/snapshots/<sha>`` + ``refs/main``) for repo-id loading
      with ``HF_HUB_CACHE=<cache> HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors.torch import save_file

from trainer_core.config import ModelConfig
from trainer_core.keys import diffusers_state_dict_to_original
from trainer_core.models import WanComponents, load_components
from trainer_core.models.single_file import DIFFUSION_MODEL_PREFIX, SPIECE_KEY
from trainer_core.models.tiny import tiny_spiece_model

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
#: Commit hash used for the fake hub cache snapshot.
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"
FAKE_REPO_ID = "tiny-org/tiny-wan22-t2v"


def tiny_components() -> WanComponents:
    """The tiny preset with every component in float32 (the reference the loaders are compared against)."""
    return load_components(ModelConfig(source="tiny", dtype="fp32", text_encoder_dtype="fp32", vae_dtype="fp32"))


def make_pipeline(components: WanComponents) -> WanPipeline:
    """A diffusers WanPipeline (Wan 2.2 T2V: boundary 0.875) around the given components."""
    return WanPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=12.0),
        transformer=components.high,
        transformer_2=components.low,
        boundary_ratio=0.875,
    )


def save_diffusers_folder(components: WanComponents, root: str | Path) -> Path:
    """Save all components as a diffusers Wan 2.2 folder (one save_pretrained per subfolder, plus model_index.json)."""
    root = Path(root)
    make_pipeline(components).save_pretrained(root)
    return root


# ------------------------------------------------------------------------------------------- fp8_scaled


def quantize_fp8_scaled(
    tensors: dict[str, torch.Tensor], quantize: list[str], naming: str, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Quantize the weights named in ``quantize`` the way ComfyUI's fp8_scaled files store them.

    ``naming="scale_weight"``: older files - one fp32 scale per tensor in ``<layer>.scale_weight``, a
    ``<layer>.scale_input`` of 1 and a ``scaled_fp8`` marker. ``naming="weight_scale"``: newer files - one scale per
    output row (``[out, 1]``) in ``<layer>.weight_scale``, ``<layer>.input_scale``, a ``<layer>.comfy_quant`` JSON
    tensor and ``_quantization_metadata`` in the header (returned as the metadata dict). ``prefix`` is the key prefix
    the tensors already carry (the marker gets it too). Returns (tensors, metadata).
    """
    if naming not in ("scale_weight", "weight_scale"):
        raise ValueError(f"naming must be 'scale_weight' or 'weight_scale', got {naming!r}")
    out = dict(tensors)
    layers = {}
    for key in quantize:
        w = out[key].float()
        layer = key[: -len(".weight")]
        if naming == "scale_weight":
            scale = w.abs().amax() / FP8_MAX
            out[f"{layer}.scale_weight"] = scale
            out[f"{layer}.scale_input"] = torch.tensor(1.0)
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
            out[f"{layer}.weight_scale"] = scale
            out[f"{layer}.input_scale"] = torch.tensor(1.0)
            conf = {"format": "float8_e4m3fn"}
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
            layers[layer[len(prefix) :]] = conf
        out[key] = (w / scale).to(FP8)
    if naming == "scale_weight":
        out[f"{prefix}scaled_fp8"] = torch.zeros(0, dtype=FP8)
        return out, None
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def _save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------- experts


def comfy_transformer_tensors(
    model, dtype: torch.dtype = torch.float16, prefix: bool = False
) -> dict[str, torch.Tensor]:
    """A diffusers WanTransformer3DModel's weights with original Wan keys, as in a ComfyUI file (not yet saved)."""
    sd = diffusers_state_dict_to_original({k: v.to(dtype) for k, v in model.state_dict().items()})
    pre = DIFFUSION_MODEL_PREFIX if prefix else ""
    return {pre + k: v for k, v in sd.items()}


def fp8_transformer_targets(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The weights ComfyUI quantizes in a Wan fp8_scaled file: the 2-D Linear weights inside the blocks."""
    return [k for k, v in tensors.items() if ".blocks." in f".{k}" and k.endswith(".weight") and v.ndim == 2]


def save_comfy_transformer(
    model, path: str | Path, *, dtype: torch.dtype = torch.float16, prefix: bool = False, fp8: str | None = None
) -> Path:
    """Save an expert as a ComfyUI diffusion-model file.

    ``dtype`` is the storage dtype of the (non-fp8) tensors; ``prefix`` puts keys behind ``model.diffusion_model.``;
    ``fp8`` = None, ``"scale_weight"`` or ``"weight_scale"`` (see :func:`quantize_fp8_scaled`).
    """
    tensors = comfy_transformer_tensors(model, dtype, prefix)
    metadata = None
    if fp8:
        pre = DIFFUSION_MODEL_PREFIX if prefix else ""
        tensors, metadata = quantize_fp8_scaled(tensors, fp8_transformer_targets(tensors), fp8, prefix=pre)
    return _save(tensors, path, metadata)


# ------------------------------------------------------------------------------------------- text encoder


def save_comfy_text_encoder(
    text_encoder,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    spiece_model: bytes | None = None,
    fp8: str | None = None,
) -> Path:
    """Save a UMT5EncoderModel as ComfyUI's ``umt5_xxl_*.safetensors``: T5 key names, ``shared.weight`` only (no tied
    copy), and the tokenizer's sentencepiece bytes as a uint8 ``spiece_model`` tensor when given."""
    tensors = {k: v.to(dtype) for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    metadata = None
    if fp8:
        targets = [
            k
            for k, v in tensors.items()
            if k.startswith("encoder.block.") and v.ndim == 2 and "relative_attention" not in k
        ]
        tensors, metadata = quantize_fp8_scaled(tensors, targets, fp8)
    if spiece_model is not None:
        tensors[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_model), dtype=torch.uint8)
    return _save(tensors, path, metadata)


# ------------------------------------------------------------------------------------------- VAE

_RESNET_TO_ORIGINAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_VAE_FIXED = {
    "encoder.conv_in": "encoder.conv1",
    "decoder.conv_in": "decoder.conv1",
    "encoder.conv_out": "encoder.head.2",
    "decoder.conv_out": "decoder.head.2",
    "encoder.norm_out": "encoder.head.0",
    "decoder.norm_out": "decoder.head.0",
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
}


def vae_key_to_original(key: str) -> str:
    """Inverse of diffusers' ``convert_wan_vae_to_diffusers`` for one AutoencoderKLWan key (Wan 2.1 layout)."""
    module, param = key.rsplit(".", 1)
    if module in _VAE_FIXED:
        return f"{_VAE_FIXED[module]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_RESNET_TO_ORIGINAL[m[3]]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_RESNET_TO_ORIGINAL.get(m[2], m[2])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESNET_TO_ORIGINAL[m[3]]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(f"no original Wan VAE name for {key!r}")


def vae_state_dict_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole AutoencoderKLWan state dict to original Wan VAE keys (as in ``wan_2.1_vae.safetensors``)."""
    return {vae_key_to_original(k): v for k, v in state_dict.items()}


def save_comfy_vae(vae, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Save an AutoencoderKLWan as ComfyUI's ``wan_2.1_vae.safetensors`` (original key names)."""
    return _save(vae_state_dict_to_original({k: v.to(dtype) for k, v in vae.state_dict().items()}), path)


# ------------------------------------------------------------------------------------------- bundles


def save_comfy_files(
    components: WanComponents, root: str | Path, *, dtype: torch.dtype = torch.float16, prefix: bool = False
) -> dict[str, Path]:
    """Save the four ComfyUI files (experts, UMT5 with ``spiece_model``, VAE) under ``root``; returns their paths
    keyed like ModelConfig: ``high``, ``low``, ``text_encoder``, ``vae``. The tokenizer bytes are the tiny preset's."""
    root = Path(root)
    return {
        "high": save_comfy_transformer(
            components.high, root / "wan2.2_t2v_high_noise_tiny.safetensors", dtype=dtype, prefix=prefix
        ),
        "low": save_comfy_transformer(
            components.low, root / "wan2.2_t2v_low_noise_tiny.safetensors", dtype=dtype, prefix=prefix
        ),
        "text_encoder": save_comfy_text_encoder(
            components.text_encoder, root / "umt5_xxl_tiny.safetensors", dtype=dtype, spiece_model=tiny_spiece_model()
        ),
        "vae": save_comfy_vae(components.vae, root / "wan_2.1_vae_tiny.safetensors", dtype=dtype),
    }


def make_fake_hf_cache(diffusers_folder: str | Path, cache_dir: str | Path, repo_id: str = FAKE_REPO_ID) -> str:
    """Install a diffusers folder into a Hugging Face hub cache as ``repo_id`` at commit :data:`FAKE_SHA`
    (``models--owner--name/snapshots/<sha>/...`` with ``refs/main``). Returns the commit hash."""
    owner, name = repo_id.split("/")
    repo_dir = Path(cache_dir) / f"models--{owner}--{name}"
    shutil.copytree(diffusers_folder, repo_dir / "snapshots" / FAKE_SHA)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(FAKE_SHA)
    return FAKE_SHA
