"""LoRA files in ComfyUI-native Wan naming, one file per expert.

Layout (what ComfyUI's ``LoraLoader`` / ``LoraLoaderModelOnly`` and diffusers' ``WanPipeline.load_lora_weights``
both read), for every adapted module ``X`` in original Wan naming (e.g. ``blocks.0.self_attn.q``, ``blocks.3.ffn.2``)::

    diffusion_model.X.lora_down.weight   [rank, in_features]   peft lora_A
    diffusion_model.X.lora_up.weight     [out_features, rank]  peft lora_B
    diffusion_model.X.alpha              scalar fp32           applied as scale = alpha / rank

so the patched weight is ``W + (alpha / rank) * up @ down``, exactly the scale peft uses in training.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..config import LoraConfig
from ..errors import LoraFileError
from ..fileio import save_safetensors_atomic
from ..keys import diffusers_module_to_original
from ..names import EXPERT_SUFFIX

PREFIX = "diffusion_model."
SAVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_LISTED = 5


def lora_file_name(name: str, step: int, expert: str) -> str:
    """``<name>_<step:06d>_high_noise.safetensors`` or ``..._low_noise.safetensors`` (ai-toolkit's pattern)."""
    if expert not in EXPERT_SUFFIX:
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{name}_{step:06d}_{EXPERT_SUFFIX[expert]}.safetensors"


def _adapted_modules(transformer: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Original-name module path -> peft LoRA layer holding ``adapter_name``."""
    found = {
        diffusers_module_to_original(name): module
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if not found:
        raise ValueError(f"the transformer has no LoRA adapter named {adapter_name!r}; call attach_lora first")
    return found


def _check_cfg_matches_adapter(transformer: nn.Module, cfg: LoraConfig, adapter_name: str) -> None:
    attached = transformer.peft_config[adapter_name]
    if attached.r != cfg.rank or not math.isclose(attached.lora_alpha, cfg.effective_alpha):
        raise ValueError(
            f"LoraConfig (rank {cfg.rank}, alpha {cfg.effective_alpha:g}) differs from the attached adapter "
            f"(rank {attached.r}, alpha {attached.lora_alpha:g})"
        )


def lora_state_dict_comfy(
    transformer: nn.Module, cfg: LoraConfig, dtype: torch.dtype, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter's weights as ComfyUI-native tensors (``lora_down``/``lora_up`` in ``dtype``, ``alpha`` fp32)."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"LoRA save dtype must be one of {SAVE_DTYPES}, got {dtype}")
    _check_cfg_matches_adapter(transformer, cfg, adapter_name)
    alpha = torch.tensor(cfg.effective_alpha, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    for orig, layer in _adapted_modules(transformer, adapter_name).items():
        out[f"{PREFIX}{orig}.lora_down.weight"] = layer.lora_A[adapter_name].weight.detach().to(dtype)
        out[f"{PREFIX}{orig}.lora_up.weight"] = layer.lora_B[adapter_name].weight.detach().to(dtype)
        out[f"{PREFIX}{orig}.alpha"] = alpha.clone()
    return out


def format_metadata(cfg: LoraConfig) -> dict[str, str]:
    """Format facts written into every file (kohya's ``ss_network_*`` keys are read by common LoRA tools)."""
    return {
        "format": "pt",
        "lora_key_format": "comfyui: diffusion_model.<original module>.lora_down/lora_up/alpha",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": f"{cfg.effective_alpha:g}",
        "lora_targets": ",".join(cfg.target_modules),
    }


def save_lora(
    path: str | os.PathLike,
    transformer: nn.Module,
    cfg: LoraConfig,
    dtype: torch.dtype,
    metadata: dict[str, str],
    adapter_name: str = "default",
) -> Path:
    """Write the adapter to ``path`` atomically, with the caller's ``metadata`` plus :func:`format_metadata`."""
    return save_lora_tensors(path, lora_state_dict_comfy(transformer, cfg, dtype, adapter_name), cfg, metadata)


def save_lora_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: LoraConfig, metadata: dict[str, str]
) -> Path:
    """Write ComfyUI-native LoRA ``tensors`` (as :func:`lora_state_dict_comfy` returns them) to ``path``
    atomically, with the caller's ``metadata`` plus :func:`format_metadata`."""
    fmt = format_metadata(cfg)
    bad = {k: type(v).__name__ for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; non-string entries: {bad}")
    clash = sorted(set(metadata) & set(fmt))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the LoRA format description")
    return save_safetensors_atomic(tensors, path, metadata={**metadata, **fmt})


def _read(path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(path_or_state_dict, dict):
        return "<in-memory LoRA state dict>", path_or_state_dict
    path = Path(path_or_state_dict)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist - check the path")
    try:
        return str(path), load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"LoRA file {path} is not a readable .safetensors file: {exc}") from None


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_lora_state(
    transformer: nn.Module,
    path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
    cfg: LoraConfig,
    adapter_name: str = "default",
) -> None:
    """Load a file written by :func:`save_lora` into the attached adapter (resume).

    Everything is validated before any weight changes: each key must name a LoRA module of this model, the rank
    and alpha must equal ``cfg``'s, every adapted module must be present with the shapes of this model, and all
    values must be finite. Anything else raises :class:`LoraFileError` naming the file and the mismatch.
    """
    _check_cfg_matches_adapter(transformer, cfg, adapter_name)
    name, sd = _read(path_or_state_dict)
    modules = _adapted_modules(transformer, adapter_name)
    targets: dict[str, torch.Tensor] = {}
    for orig, layer in modules.items():
        targets[f"{PREFIX}{orig}.lora_down.weight"] = layer.lora_A[adapter_name].weight
        targets[f"{PREFIX}{orig}.lora_up.weight"] = layer.lora_B[adapter_name].weight
    alpha_keys = {f"{PREFIX}{orig}.alpha" for orig in modules}

    if not sd:
        raise LoraFileError(f"LoRA file {name} holds no tensors")
    unknown = sorted(k for k in sd if k not in targets and k not in alpha_keys)
    if unknown:
        raise LoraFileError(
            f"LoRA file {name} does not fit this model: {len(unknown)} key(s) name no LoRA module of this run "
            f"(targets {cfg.target_modules}): {_listed(unknown)}. Only Wan 2.2 14B LoRAs in this trainer's "
            "ComfyUI format (diffusion_model.blocks.N.<module>.lora_down/lora_up/alpha) can be resumed"
        )
    ranks = sorted({tuple(v.shape)[0] for k, v in sd.items() if k.endswith(".lora_down.weight") and v.ndim == 2})
    if ranks and ranks != [cfg.rank]:
        raise LoraFileError(
            f"LoRA file {name} has rank {', '.join(map(str, ranks))} but this run uses lora.rank={cfg.rank}; "
            "set lora.rank to the file's rank or start a new run"
        )
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(p.shape)}"
        for k, p in targets.items()
        if k in sd and tuple(sd[k].shape) != tuple(p.shape)
    ]
    if wrong:
        raise LoraFileError(
            f"LoRA file {name} was made for a model of another size (e.g. Wan 1.3B has dim 1536, the 14B "
            f"experts 5120): shape mismatch at {_listed(wrong)}"
        )
    missing = sorted(k for k in list(targets) + sorted(alpha_keys) if k not in sd)
    if missing:
        raise LoraFileError(
            f"LoRA file {name} lacks {len(missing)} tensor(s) this run trains: {_listed(missing)}; it was saved "
            "with other lora.target_modules or for a model with more blocks"
        )
    alphas = sorted({float(sd[k].float().reshape(-1)[0]) for k in alpha_keys if sd[k].numel() == 1})
    if any(sd[k].numel() != 1 for k in alpha_keys) or any(
        not math.isclose(a, cfg.effective_alpha, rel_tol=1e-6) for a in alphas
    ):
        raise LoraFileError(
            f"LoRA file {name} has alpha {alphas or 'of a non-scalar shape'} but this run uses lora.alpha="
            f"{cfg.effective_alpha:g}; set lora.alpha to the file's value"
        )
    nonfinite = [k for k in targets if not torch.isfinite(sd[k]).all()]
    if nonfinite:
        raise LoraFileError(f"LoRA file {name} holds NaN/Inf values in {_listed(nonfinite)}; use an earlier file")

    with torch.no_grad():
        for k, param in targets.items():
            param.copy_(sd[k].to(device=param.device, dtype=param.dtype))


_NATIVE = re.compile(re.escape(PREFIX) + r"(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def native_modules(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """ComfyUI-native LoRA tensors -> ``{module: (down, up, alpha)}`` (alpha = rank where missing: scale 1)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _NATIVE.match(key)
        if m is None:
            raise LoraFileError(f"LoRA tensor {key} is not in ComfyUI-native naming ({PREFIX}<module>.lora_down."
                                "weight / lora_up.weight / alpha) - read files with read_lora_file")
        parts.setdefault(m["module"], {})[m["part"].split(".")[0]] = t
    out = {}
    for module, p in parts.items():
        if "lora_down" not in p or "lora_up" not in p:
            raise LoraFileError(f"LoRA tensors for {module} lack lora_down or lora_up - pass every tensor "
                                "read_lora_file returns")
        down = p["lora_down"]
        alpha = float(p["alpha"].float().reshape(())) if "alpha" in p else float(down.shape[0])
        out[module] = (down, p["lora_up"], alpha)
    return out


def _check_fit(
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]], modules: dict[str, nn.Module], cfg: LoraConfig,
    adapter_name: str, source: str,
) -> None:
    """Refuse tensors that the attached adapter cannot hold: modules it does not adapt, larger ranks, shapes."""
    unknown = sorted(set(entries) - set(modules))
    if unknown:
        raise LoraFileError(f"{source} adapts {_listed(unknown)}, which the attached adapter does not (targets "
                            f"{cfg.target_modules}, {len(modules)} modules) - attach one that covers the file")
    for module, (down, up, _) in entries.items():
        a, b = modules[module].lora_A[adapter_name].weight, modules[module].lora_B[adapter_name].weight
        if down.shape[0] > a.shape[0] or down.shape[1] != a.shape[1] or up.shape[0] != b.shape[0]:
            raise LoraFileError(
                f"{source} does not fit {module}: down {list(down.shape)}, up {list(up.shape)} vs the adapter's "
                f"rank {a.shape[0]} on a {b.shape[0]}x{a.shape[1]} weight - use a LoRA made for this model"
            )


def load_lora_tensors(
    transformer: nn.Module,
    tensors: dict[str, torch.Tensor],
    cfg: LoraConfig,
    adapter_name: str = "default",
    *,
    keep_init: bool = False,
    source: str = "LoRA",
) -> None:
    """Put ComfyUI-native LoRA ``tensors`` of any rank and alpha per module (as :func:`read_lora_file` returns
    them) into the attached adapter so that its output equals ComfyUI's patch ``W + (alpha / rank) · up @ down``.

    A module of rank r fills the first r rows of ``lora_A`` and columns of ``lora_B`` (``up`` times the ratio of
    its scale to the adapter layer's, computed in float64 and rounded once; exact when they agree). ``cfg`` is the
    attached adapter's config (named in errors).
    With ``keep_init`` (continuing training) the rest of the adapter keeps peft's fresh initialisation (``lora_B``
    zero: no effect, but the extra directions train); else it is zeroed. Checked before any weight changes.
    """
    modules = _adapted_modules(transformer, adapter_name)
    entries = native_modules(tensors)
    _check_fit(entries, modules, cfg, adapter_name, source)
    with torch.no_grad():
        for module, layer in modules.items():
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if not keep_init:
                a.zero_()
                b.zero_()
            if module not in entries:
                continue
            down, up, alpha = entries[module]
            rank = down.shape[0]
            ratio = (alpha / rank) / layer.scaling[adapter_name]  # peft's scale: lora_alpha / r
            a[:rank].copy_(down)
            b[:, :rank].copy_(up if ratio == 1.0 else up.double() * ratio)
            b[:, rank:].zero_()
