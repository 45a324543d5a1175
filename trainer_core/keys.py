"""Module-name conversion between diffusers' Wan transformer and the original Wan / ComfyUI naming.

Pure string functions. The inverse direction (original -> diffusers) is diffusers' own
``convert_wan_transformer_to_diffusers``; the tests check that these functions invert it exactly.
"""

from __future__ import annotations

import re

# (diffusers pattern, original replacement); applied to the module path (no ".weight"/".bias" suffix).
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"^blocks\.(\d+)\.attn1\.to_q$", r"blocks.\1.self_attn.q"),
    (r"^blocks\.(\d+)\.attn1\.to_k$", r"blocks.\1.self_attn.k"),
    (r"^blocks\.(\d+)\.attn1\.to_v$", r"blocks.\1.self_attn.v"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn1\.norm_q$", r"blocks.\1.self_attn.norm_q"),
    (r"^blocks\.(\d+)\.attn1\.norm_k$", r"blocks.\1.self_attn.norm_k"),
    (r"^blocks\.(\d+)\.attn2\.to_q$", r"blocks.\1.cross_attn.q"),
    (r"^blocks\.(\d+)\.attn2\.to_k$", r"blocks.\1.cross_attn.k"),
    (r"^blocks\.(\d+)\.attn2\.to_v$", r"blocks.\1.cross_attn.v"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.norm_q$", r"blocks.\1.cross_attn.norm_q"),
    (r"^blocks\.(\d+)\.attn2\.norm_k$", r"blocks.\1.cross_attn.norm_k"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^blocks\.(\d+)\.norm2$", r"blocks.\1.norm3"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^patch_embedding$", "patch_embedding"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out$", "head.head"),
)
_COMPILED = tuple((re.compile(p), r) for p, r in _BLOCK_RULES)

#: LoRA target names (original naming, relative to a block) -> diffusers module suffix.
LORA_TARGET_TO_DIFFUSERS: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}

_PARAM_SUFFIXES = (".weight", ".bias", ".scale_shift_table")


def diffusers_module_to_original(module: str) -> str:
    """Map a diffusers module path (``blocks.0.attn1.to_q``) to original naming (``blocks.0.self_attn.q``).

    Raises ``KeyError`` for a path that has no original counterpart.
    """
    for pattern, repl in _COMPILED:
        if pattern.match(module):
            return pattern.sub(repl, module)
    raise KeyError(f"no original Wan name for diffusers module {module!r}")


def diffusers_key_to_original(key: str) -> str:
    """Map a full diffusers state-dict key (module + parameter suffix) to original naming."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return diffusers_module_to_original(key[: -len(suffix)]) + suffix
    # Parameters that are modules' own tensors (no .weight suffix), e.g. scale_shift_table.
    return diffusers_module_to_original(key)


def diffusers_state_dict_to_original(state_dict: dict) -> dict:
    """Rename a whole diffusers transformer state dict to original Wan / ComfyUI keys."""
    return {diffusers_key_to_original(k): v for k, v in state_dict.items()}


def lora_target_regex(targets: list[str] | tuple[str, ...]) -> str:
    """A peft ``target_modules`` regex matching the given targets inside every transformer block only."""
    alts = "|".join(re.escape(LORA_TARGET_TO_DIFFUSERS[t]) for t in targets)
    return rf"^blocks\.\d+\.(?:{alts})$"


# ----------------------------------------------------------------------------------------------- LoRA file keys

#: Tensor-name suffixes of the LoRA files ComfyUI reads for Wan -> their role: a LoRA's down / up / alpha
#: (comfy/weight_adapter/lora.py; ``.lora_A.default.weight`` is peft's own state-dict naming) and the full-weight
#: differences of a weight (``.diff``) or a bias (``.diff_b``) that ComfyUI's trainer saves (comfy/lora.py).
LORA_KEY_PARTS: dict[str, str] = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
}
#: Key prefixes of the namings read, -> naming. ComfyUI maps ``diffusion_model.<module>`` and kohya's
#: ``lora_unet_<module with _>`` (``lora_unet__`` is Wan Fun's variant, which its lora_convert rewrites);
#: ``transformer.<diffusers module>`` is diffusers' / peft's own Wan naming (ComfyUI maps no Wan key for it).
LORA_KEY_PREFIXES: dict[str, str] = {
    "diffusion_model.": "comfyui",
    "lora_unet__": "kohya",
    "lora_unet_": "kohya",
    "transformer.": "diffusers",
}
#: kohya's names (dots written as underscores) of the Wan modules ComfyUI patches -> original names.
_KOHYA_RULES = tuple((re.compile(p), r) for p, r in (
    (r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k)$", r"blocks.\1.\2.\3"),
    (r"^blocks_(\d+)_(ffn)_(0|2)$", r"blocks.\1.\2.\3"),
    (r"^blocks_(\d+)_norm3$", r"blocks.\1.norm3"),
    (r"^(text_embedding|time_embedding)_(0|2)$", r"\1.\2"),
    (r"^time_projection_1$", "time_projection.1"),
    (r"^head_head$", "head.head"),
))


def _kohya_module(name: str) -> str:
    """``blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q`` (any Wan module ComfyUI patches); other names are
    returned as written (underscores cannot be told apart from dots without the model)."""
    for pattern, repl in _KOHYA_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def parse_lora_key(key: str) -> tuple[str, str, str] | None:
    """``(module, part, naming)`` of one LoRA tensor name: the module in original Wan naming (e.g.
    ``blocks.0.self_attn.q``; a module without an original counterpart keeps the file's spelling), the part
    (``down`` / ``up`` / ``alpha`` / ``diff`` / ``diff_b``) and the naming (``comfyui`` / ``kohya`` /
    ``diffusers``). ``None`` when the key is in none of the formats read (see :data:`LORA_KEY_PREFIXES` and
    :data:`LORA_KEY_PARTS`)."""
    prefix = next((p for p in LORA_KEY_PREFIXES if key.startswith(p)), None)
    suffix = next((s for s in LORA_KEY_PARTS if key.endswith(s)), None)
    if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
        return None
    module, naming = key[len(prefix) : -len(suffix)], LORA_KEY_PREFIXES[prefix]
    if naming == "kohya":
        module = _kohya_module(module)
    elif naming == "diffusers":
        try:
            module = diffusers_module_to_original(module)
        except KeyError:
            pass  # named as written; refused later as a module this pack does not adapt
    return module, LORA_KEY_PARTS[suffix], naming
