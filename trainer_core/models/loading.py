"""Load the Wan 2.2 T2V A14B components from the sources a :class:`ModelConfig` names.

``cfg.source`` ("tiny", a diffusers-layout folder or a Hugging Face repo id) supplies every component without an
explicit ComfyUI file; ``cfg.high_noise`` / ``low_noise`` / ``text_encoder`` / ``vae`` override per component.
Only requested components are read: an expert that is not trained is never opened.

A repo id is checked before anything loads: with ``HF_HUB_OFFLINE`` set, or when the Hub does not answer within
:data:`HUB_TIMEOUT_S` (one attempt, no retries), the components come from the local Hugging Face cache only, and a
repo that is not in the cache is refused at once with a message saying how to point at local files.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import PreTrainedTokenizerBase, T5Tokenizer, UMT5Config, UMT5EncoderModel

from ..config import ModelConfig
from ..errors import ModelLoadError
from ..names import DTYPES
from ..timing import logged_seconds
from . import tiny
from .single_file import (
    cast_keeping_fp32,
    check_text_encoder_file,
    check_transformer_file,
    check_vae_file,
    expert_channels_problem,
    frozen_eval,
    load_text_encoder_file,
    load_transformer_file,
    load_vae_file,
    safetensors_problem,
    text_encoder_file_bytes,
    tokenizer_from_sentencepiece,
    transformer_file_config,
    vae_channels_problem,
)

log = logging.getLogger(__name__)


#: Subfolders of a diffusers Wan 2.2 folder (like Wan-AI/Wan2.2-T2V-A14B-Diffusers).
SUBFOLDERS = {
    "high": "transformer",
    "low": "transformer_2",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
}
_WHAT = {
    "high": "high-noise expert",
    "low": "low-noise expert",
    "vae": "VAE",
    "text_encoder": "text encoder",
    "tokenizer": "tokenizer",
}
_FILE_SETTING = {"high": "high_noise", "low": "low_noise", "vae": "vae", "text_encoder": "text_encoder"}
#: The file of each subfolder that tells whether a repo's component is in the local Hugging Face cache.
_CACHE_PROBE = {part: f"{sub}/config.json" for part, sub in SUBFOLDERS.items()} | {
    "tokenizer": "tokenizer/tokenizer_config.json"
}
#: Seconds the one look-up of a repo on the Hub may take before the Hub counts as unreachable (no retries).
HUB_TIMEOUT_S = 5.0
_LOCAL_FILES = {
    "model.source": (
        "download it where there is network (hf download {repo} --local-dir <folder>) and set model.source to that "
        "folder, or give ComfyUI files in model.high_noise / model.low_noise / model.text_encoder / model.vae"
    ),
    "model.tokenizer": (
        "download it where there is network (hf download {repo} --local-dir <folder>) and set model.tokenizer to "
        "that folder or to its spiece.model file"
    ),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_ARCH_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
)


@dataclass
class WanComponents:
    """The loaded components (on CPU, eval mode, frozen); anything not requested is None.

    ``base_model`` says where the experts' weights came from ('tiny', a folder, a repo id[@revision] or the
    ComfyUI file names); it is written into LoRA metadata.
    """

    high: WanTransformer3DModel | None
    low: WanTransformer3DModel | None
    vae: AutoencoderKLWan | None
    text_encoder: UMT5EncoderModel | None
    tokenizer: PreTrainedTokenizerBase | None
    base_model: str
    #: width of the loaded text encoder's embeddings, kept after a cached run frees the encoder (checks experts
    #: loaded later)
    text_dim: int | None = None


def _source_kind(source: str) -> str:
    """'tiny', 'folder' or 'repo'; anything else is refused without touching the network."""
    if source == "tiny":
        return "tiny"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        raise ModelLoadError(
            f"model.source: {source} is a file; model.source takes 'tiny', a diffusers folder or a repo id - "
            "put ComfyUI .safetensors files in model.high_noise / model.low_noise / model.text_encoder / model.vae"
        )
    if _REPO_ID.match(source):
        return "repo"
    raise ModelLoadError(
        f"model.source: folder {source} does not exist - check the path (model.source also accepts 'tiny' "
        "or a Hugging Face repo id such as Wan-AI/Wan2.2-T2V-A14B-Diffusers)"
    )


def _source_label(cfg: ModelConfig) -> str:
    if cfg.revision and _REPO_ID.match(cfg.source or "") and not Path(cfg.source).expanduser().exists():
        return f"{cfg.source}@{cfg.revision}"
    return str(cfg.source)


def describe_base_model(cfg: ModelConfig) -> str:
    """Short description of where the experts come from: the source, or the ComfyUI file names."""
    origins = []
    for file in (cfg.high_noise, cfg.low_noise):
        if file:
            origins.append(Path(file).name)
        elif cfg.source:
            origins.append(_source_label(cfg))
    return " + ".join(dict.fromkeys(origins))


def _require_source(cfg: ModelConfig, part: str) -> str:
    if not cfg.source:
        setting = _FILE_SETTING.get(part, "tokenizer")
        raise ModelLoadError(
            f"no {_WHAT[part]} given: set model.{setting} to a ComfyUI file, or model.source to 'tiny', "
            "a diffusers Wan 2.2 folder or a repo id"
        )
    return _source_kind(cfg.source)


def _source_folder(cfg: ModelConfig, part: str) -> Path:
    """The diffusers folder ``model.source``, refused when it lacks ``part``'s subfolder."""
    root = Path(cfg.source).expanduser()
    subfolder = SUBFOLDERS[part]
    if not (root / subfolder).is_dir():
        raise ModelLoadError(
            f"model.source: folder {root} has no {subfolder}/ subfolder (the {_WHAT[part]}); a diffusers Wan 2.2 "
            "folder (like Wan-AI/Wan2.2-T2V-A14B-Diffusers) has transformer/, transformer_2/, vae/, "
            f"text_encoder/ and tokenizer/ - complete it or set model.{_FILE_SETTING.get(part, 'tokenizer')}"
        )
    return root


def _from_source(cls, cfg: ModelConfig, part: str, **kwargs):
    """``cls.from_pretrained`` on the source's subfolder: local folders never touch the network."""
    subfolder = SUBFOLDERS[part]
    if _source_kind(cfg.source) == "folder":
        where, kwargs = str(_source_folder(cfg, part)), {**kwargs, "local_files_only": True}
        place = f"{Path(where) / subfolder}/"
    else:
        local_only = _hub_local_only(cfg.source, cfg.revision, [part], "model.source", _source_label(cfg))
        where, kwargs = cfg.source, {**kwargs, "revision": cfg.revision, "local_files_only": local_only}
        place = f"{_source_label(cfg)} ({subfolder}/)"
    try:
        return cls.from_pretrained(where, subfolder=subfolder, **kwargs)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the libraries raise on a damaged folder (a RuntimeError when
        # config.json does not fit the weights...) becomes one line naming the component's folder
        raise ModelLoadError(
            f"model.source: could not load the {_WHAT[part]} from {place}: {_short(exc, 300)} - the folder is "
            "damaged or incomplete: download it again"
        ) from None


def _expert(cfg: ModelConfig, part: str, device: str | torch.device = "cpu") -> WanTransformer3DModel:
    dtype = DTYPES[cfg.dtype]
    file = getattr(cfg, _FILE_SETTING[part])
    if file:
        return load_transformer_file(file, dtype, setting=f"model.{_FILE_SETTING[part]}", device=device)
    if _require_source(cfg, part) == "tiny":
        return frozen_eval(cast_keeping_fp32(tiny.tiny_transformer(part), dtype))
    return frozen_eval(_from_source(WanTransformer3DModel, cfg, part, torch_dtype=dtype))


def _vae(cfg: ModelConfig) -> AutoencoderKLWan:
    dtype = DTYPES[cfg.vae_dtype]
    if cfg.vae:
        return load_vae_file(cfg.vae, dtype)
    if _require_source(cfg, "vae") == "tiny":
        return frozen_eval(cast_keeping_fp32(tiny.tiny_vae(), dtype))
    return frozen_eval(_from_source(AutoencoderKLWan, cfg, "vae", torch_dtype=dtype))


# UMT5's tokenizer is T5's sentencepiece tokenizer. Naming the class (not AutoTokenizer) also avoids AutoTokenizer's
# look-up of a model config.json, which tokenizer folders do not have and which fails offline.


def _tokenizer_kind(name: str) -> str:
    """'folder', 'file' or 'repo' for a model.tokenizer setting; anything else is refused."""
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    if _REPO_ID.match(name):
        return "repo"
    raise ModelLoadError(
        f"model.tokenizer: {name} does not exist - give a tokenizer folder, a spiece.model or a repo id"
    )


def _tokenizer_setting(name: str) -> PreTrainedTokenizerBase:
    """model.tokenizer: a tokenizer folder (or a diffusers root holding tokenizer/), a spiece .model, or a repo id."""
    path = Path(name).expanduser()
    kind = _tokenizer_kind(name)
    try:
        if kind == "folder":
            folder = _tokenizer_folder(path)
            _check_tokenizer_folder(folder, "model.tokenizer")
            return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
        if kind == "file":
            return tokenizer_from_sentencepiece(path.read_bytes(), source=f"model.tokenizer: {path}")
        local_only = _hub_local_only(name, None, ["tokenizer_root"], "model.tokenizer", name)
        return T5Tokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.tokenizer: could not load a tokenizer from {name}: {exc}") from None


def _text_encoder_file(
    path: str, dtype: torch.dtype, device: str | torch.device
) -> tuple[UMT5EncoderModel, bytes | None]:
    """:func:`load_text_encoder_file` to ``device``, or to host memory when it does not fit there.

    Loading to a GPU takes about twice the encoder's size there for a moment (transformers reserves its size once
    more to warm the allocator up): with less free, the encoder is read to host memory without trying."""
    if torch.device(device).type != "cpu":
        need = 2 * text_encoder_file_bytes(path, dtype) + 2**30
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        if free < need:
            log.info("text encoder read to host memory: reading it to %s needs about %.1f GiB there, %.1f GiB are "
                     "free", device, need / 2**30, free / 2**30)
            return load_text_encoder_file(path, dtype)
        try:
            loaded = load_text_encoder_file(path, dtype, device=device)
            log.info("text encoder read straight to %s (no copy in host memory)", device)
            return loaded
        except torch.OutOfMemoryError:
            log.warning("the text encoder does not fit on %s beside what it holds: reading it to host memory", device)
        torch.cuda.empty_cache()  # the failed attempt's tensors went with its traceback at the end of the handler
    return load_text_encoder_file(path, dtype)


def _text_encoder(
    cfg: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[UMT5EncoderModel, PreTrainedTokenizerBase]:
    dtype = DTYPES[cfg.text_encoder_dtype]
    if cfg.text_encoder:
        model, spiece = _text_encoder_file(cfg.text_encoder, dtype, device)
        if cfg.tokenizer:
            tokenizer = _tokenizer_setting(cfg.tokenizer)
        elif spiece is not None:
            tokenizer = tokenizer_from_sentencepiece(spiece, source=f"the spiece_model inside {cfg.text_encoder}")
        elif cfg.source:
            tokenizer = _source_tokenizer(cfg)
        else:
            raise _no_tokenizer(cfg)
    elif _require_source(cfg, "text_encoder") == "tiny":
        model = frozen_eval(cast_keeping_fp32(tiny.tiny_text_encoder(), dtype))
        tokenizer = _tokenizer_setting(cfg.tokenizer) if cfg.tokenizer else tiny.tiny_tokenizer()
    else:
        model = frozen_eval(_from_source(UMT5EncoderModel, cfg, "text_encoder", dtype=dtype))
        tokenizer = _tokenizer_setting(cfg.tokenizer) if cfg.tokenizer else _source_tokenizer(cfg)
    if len(tokenizer) > model.config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder only {model.config.vocab_size} "
            "embeddings: they belong to different models - use the UMT5-XXL tokenizer (model.tokenizer)"
        )
    return model, tokenizer


def _no_tokenizer(cfg: ModelConfig) -> ModelLoadError:
    return ModelLoadError(
        f"model.text_encoder: {cfg.text_encoder} carries no tokenizer (no 'spiece_model' tensor); set "
        "model.tokenizer to a tokenizer folder or repo id (e.g. google/umt5-xxl), or model.source to a "
        "diffusers Wan 2.2 folder"
    )


def _source_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if _source_kind(cfg.source) == "tiny":
        return tiny.tiny_tokenizer()
    return _from_source(T5Tokenizer, cfg, "tokenizer")


def _tokenizer_folder(path: Path) -> Path:
    """A model.tokenizer folder: the tokenizer's own, or a diffusers root holding it in tokenizer/."""
    return path / "tokenizer" if (path / "tokenizer").is_dir() else path


def _check_tokenizer_folder(folder: Path, setting: str) -> None:
    # T5Tokenizer quietly builds a tokenizer of a few placeholder tokens from a folder without its vocabulary
    if not any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise ModelLoadError(
            f"{setting}: {folder}/ has neither tokenizer.json nor spiece.model (the tokenizer's vocabulary): the "
            "tokenizer is incomplete - download it again"
        )


# --------------------------------------------------------------------------------- do the components fit each other


def _label(cfg: ModelConfig, part: str) -> str:
    """How messages name where a component comes from: its file setting and file name, or the source's subfolder."""
    file = getattr(cfg, _FILE_SETTING[part])
    if file:
        return f"model.{_FILE_SETTING[part]} ({Path(file).name})"
    if cfg.source == "tiny":
        return f"the {_WHAT[part]} of model.source tiny"
    if Path(cfg.source or "").expanduser().is_dir():
        return f"model.source {Path(cfg.source).expanduser() / SUBFOLDERS[part]}/"
    return f"model.source {_source_label(cfg)} ({SUBFOLDERS[part]}/)"


def _arch_of(config: dict) -> dict:
    """The architecture settings of a WanTransformer3DModel config, with diffusers' defaults for keys it lacks."""
    defaults = signature(WanTransformer3DModel.__init__).parameters
    values = {k: config.get(k, defaults[k].default) for k in _ARCH_KEYS}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _check_fit(cfg: ModelConfig, configs: dict[str, dict | None]) -> None:
    """Refuse components that do not work together, from their configs (``part`` -> its config; ``None`` or absent:
    unknown): a VAE other than the Wan 2.1 VAE's 16 channels, an expert that is not a text-to-video expert of those
    latents, an expert whose text width is not the text encoder's, and experts of two architectures."""
    vae, text = configs.get("vae"), configs.get("text_encoder")
    if vae is not None:
        z_dim = vae.get("z_dim", signature(AutoencoderKLWan.__init__).parameters["z_dim"].default)
        if problem := vae_channels_problem(z_dim):
            raise ModelLoadError(f"{_label(cfg, 'vae')} {problem}")
    width = text.get("d_model", UMT5Config().d_model) if text is not None else None
    archs = {part: _arch_of(configs[part]) for part in ("high", "low") if configs.get(part) is not None}
    for part, arch in archs.items():
        if problem := expert_channels_problem(arch):
            raise ModelLoadError(f"{_label(cfg, part)} {problem}")
        if width is not None and arch["text_dim"] != width:
            raise ModelLoadError(
                f"{_label(cfg, part)} takes {arch['text_dim']}-wide text embeddings but {_label(cfg, 'text_encoder')}"
                f" makes {width}: they are not parts of one model - Wan 2.2 uses UMT5-XXL (umt5_xxl_fp16 / "
                "umt5_xxl_fp8_e4m3fn_scaled)"
            )
    if len(archs) == 2 and archs["high"] != archs["low"]:
        diff = ", ".join(f"{k} {archs['high'][k]} vs {archs['low'][k]}" for k in _ARCH_KEYS
                         if archs["high"][k] != archs["low"][k])
        raise ModelLoadError(
            f"the high- and low-noise experts have different architectures (high vs low: {diff}; "
            f"{_label(cfg, 'high')}, {_label(cfg, 'low')}): they must be the two experts of one Wan 2.2 T2V A14B "
            "model - use wan2.2_t2v_high_noise_14B_* and wan2.2_t2v_low_noise_14B_* of one release"
        )


def _check_compatible(cfg: ModelConfig, c: WanComponents) -> None:
    """:func:`_check_fit` of the loaded components (a repo downloaded while loading had no config to check before)."""
    configs = {part: dict(getattr(c, part).config) for part in ("high", "low", "vae") if getattr(c, part) is not None}
    text_dim = c.text_encoder.config.d_model if c.text_encoder is not None else c.text_dim
    configs["text_encoder"] = {"d_model": text_dim} if text_dim is not None else None
    _check_fit(cfg, configs)


# ------------------------------------------------------------------------------------------------ Hugging Face Hub

#: (repo, revision) -> whether to load from the local cache only; filled by the first check of a load_components call.
_hub_checked: dict[tuple[str, str | None], bool] = {}


def _offline_env() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _cache_file(part: str) -> str:
    """The file whose presence tells whether ``part`` is available ('tokenizer_root': a tokenizer-only repo)."""
    return "tokenizer_config.json" if part == "tokenizer_root" else _CACHE_PROBE[part]


def _missing_from_cache(repo: str, revision: str | None, parts: list[str]) -> list[str]:
    """The probe files of ``parts`` that the local Hugging Face cache lacks for ``repo`` at ``revision``."""
    from huggingface_hub import try_to_load_from_cache

    missing = []
    for part in parts:
        try:
            found = try_to_load_from_cache(repo, _cache_file(part), revision=revision)
        except Exception:  # noqa: BLE001 - a malformed cache counts as "not cached"
            found = None
        if not isinstance(found, str):
            missing.append(_cache_file(part))
    return missing


def _hub_unreachable(repo: str, revision: str | None, part: str, setting: str, label: str) -> str | None:
    """One look-up of ``part``'s file on the Hub (HUB_TIMEOUT_S, no retries): None when the Hub answers, the reason
    when it cannot be reached. A repo, revision or file the Hub says does not exist raises ModelLoadError."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        url = hf_hub_url(repo, _cache_file(part), revision=revision, endpoint=endpoint)
        once = {"retry_on_errors": False} if "retry_on_errors" in signature(get_hf_file_metadata).parameters else {}
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, **once)
    except GatedRepoError:
        raise ModelLoadError(
            f"{setting}: {label} is a gated Hugging Face repo - accept its license on huggingface.co and log in "
            "(hf auth login, or set HF_TOKEN), or " + _LOCAL_FILES[setting].format(repo=repo)
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(
            f"{setting}: the Hugging Face repo {repo} has no revision {revision!r} - check model.revision"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{setting}: the Hugging Face Hub has no repo {repo} (or it is private: log in with hf auth login) - "
            "check the spelling, e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers"
        ) from None
    except EntryNotFoundError:
        raise ModelLoadError(
            f"{setting}: the Hugging Face repo {label} has no {_cache_file(part)}: it is not a diffusers Wan 2.2 "
            "repo (like Wan-AI/Wan2.2-T2V-A14B-Diffusers) - give one, a diffusers folder or ComfyUI files"
        ) from None
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"the Hub answered HTTP {status}" if status else f"the Hub could not be reached: {_short(exc)}"
    except Exception as exc:  # noqa: BLE001 - any network failure: DNS, refused, timeout, proxy, TLS...
        return f"the Hub could not be reached: {_short(exc)}"
    return None


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_local_only(repo: str, revision: str | None, parts: list[str], setting: str, label: str) -> bool:
    """Whether ``repo`` must load from the local cache only (offline, or the Hub unreachable); raises a one-line
    ModelLoadError at once when it must but the cache lacks the ``parts`` needed. Checked once per load."""
    key = (repo, revision)
    if key in _hub_checked:
        return _hub_checked[key]
    reason = "HF_HUB_OFFLINE is set" if _offline_env() else _hub_unreachable(repo, revision, parts[0], setting, label)
    if reason is not None:
        missing = _missing_from_cache(repo, revision, parts)
        if missing:
            from huggingface_hub import constants

            what = "is not in" if len(missing) == len(parts) else f"is only partly in ({', '.join(missing)} missing)"
            raise ModelLoadError(
                f"{setting}: {label} is a Hugging Face repo id, but there is no network ({reason}) and it {what} "
                f"the local Hugging Face cache ({constants.HF_HUB_CACHE}) - " + _LOCAL_FILES[setting].format(repo=repo)
            )
    _hub_checked[key] = reason is not None
    return _hub_checked[key]


def _check_hub_sources(cfg: ModelConfig, high: bool, low: bool, vae: bool, text_encoder: bool) -> None:
    """Before anything loads: when a requested component comes from a repo id, check the Hub / the local cache."""
    parts = [p for p, on in (("high", high), ("low", low), ("vae", vae), ("text_encoder", text_encoder)) if on]
    parts = [p for p in parts if not getattr(cfg, _FILE_SETTING[p])]
    if text_encoder and not cfg.tokenizer and "text_encoder" in parts:
        parts.append("tokenizer")
    if cfg.source and parts and _source_kind(cfg.source) == "repo":
        _hub_local_only(cfg.source, cfg.revision, parts, "model.source", _source_label(cfg))
    tok = cfg.tokenizer
    if text_encoder and tok and _REPO_ID.match(tok) and not Path(tok).expanduser().exists():
        _hub_local_only(tok, None, ["tokenizer_root"], "model.tokenizer", tok)


#: The header-only check of each component's ComfyUI file (the text encoder's also says whether it carries its
#: tokenizer: see check_model_files); each returns the component's config.
_FILE_CHECKS = {"high": check_transformer_file, "low": check_transformer_file, "vae": check_vae_file}
#: The tiny preset's config of each component.
_TINY_CONFIGS = {
    "high": tiny.TINY_TRANSFORMER_CONFIG,
    "low": tiny.TINY_TRANSFORMER_CONFIG,
    "vae": tiny.TINY_VAE_CONFIG,
    "text_encoder": tiny.TINY_TEXT_ENCODER_CONFIG,
}
#: File name stem of a diffusers component's weights (diffusers models; the transformers text encoder).
_WEIGHTS_STEM = {"high": "diffusion_pytorch_model", "low": "diffusion_pytorch_model",
                 "vae": "diffusion_pytorch_model", "text_encoder": "model"}
#: Pickle weights the libraries read as well (no header to check).
_PICKLE_WEIGHTS = {"diffusion_pytorch_model": "diffusion_pytorch_model.bin", "model": "pytorch_model.bin"}
_INCOMPLETE = ("the folder is incomplete - download it again (e.g. hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers "
               "--local-dir <folder>)")


def _component_folder(cfg: ModelConfig, part: str) -> Path | None:
    """The folder the source keeps ``part`` in: a diffusers folder's subfolder (refused when absent), or a repo's
    in the local Hugging Face cache (``None``: its config is not cached)."""
    if _source_kind(cfg.source) == "folder":
        return _source_folder(cfg, part) / SUBFOLDERS[part]
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(cfg.source, _CACHE_PROBE[part], revision=cfg.revision)
    except Exception:  # noqa: BLE001 - a malformed cache counts as "not cached"
        found = None
    return Path(found).parent if isinstance(found, str) else None


def _folder_config(folder: Path, part: str) -> dict:
    """``config.json`` of a component's folder, refused by name when it is missing or unreadable."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"model.source: {path} is missing (the {_WHAT[part]}'s settings): {_INCOMPLETE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.source: {path} cannot be read ({_short(exc)}) - download it again") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"model.source: {path} is not a model config (a JSON object) - download it again")
    return config


def _index_shards(index: Path) -> list[str]:
    """The shard file names a ``*.safetensors.index.json`` lists."""
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"model.source: {index} cannot be read ({_short(exc)}) - download it again") from None


def _check_folder_weights(folder: Path, part: str) -> None:
    """Refuse a component folder whose weights are absent, cut short or not all there (an index naming a missing
    shard, shards without their index), from file names and safetensors headers alone."""
    stem = _WEIGHTS_STEM[part]
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    files = [single] if single.is_file() else []
    if index.is_file():
        files += [folder / name for name in _index_shards(index)]
    elif not files and not any(folder.glob(f"{_PICKLE_WEIGHTS[stem]}*")):
        shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
        what = (f"has weight shards ({shards[0].name}, ...) but not {index.name}, which lists them" if shards
                else f"has no weights ({single.name}, or {index.name} and its shards)")
        raise ModelLoadError(f"model.source: {folder}/ {what}: {_INCOMPLETE}")
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"model.source: {file} (listed in {index.name}) is missing: {_INCOMPLETE}")
        if problem := safetensors_problem(file):
            raise ModelLoadError(f"model.source: {file} {problem}")


def _checked_config(cfg: ModelConfig, part: str) -> dict | None:
    """The config of one component (not a text encoder file) after checking, headers only, that it can load: its
    ComfyUI file, or its source subfolder's config.json and weights (a repo's only when it loads from the local
    cache). ``None``: a repo whose config is not cached yet (the loaded components are checked instead)."""
    file = getattr(cfg, _FILE_SETTING[part])
    if file:
        return _FILE_CHECKS[part](file, f"model.{_FILE_SETTING[part]}")
    kind = _require_source(cfg, part)
    if kind == "tiny":
        return _TINY_CONFIGS[part]
    folder = _component_folder(cfg, part)
    if folder is None:
        return None
    config = _folder_config(folder, part)
    if kind == "folder" or _hub_checked.get((cfg.source, cfg.revision)):
        _check_folder_weights(folder, part)
    return config


def _check_tokenizer(cfg: ModelConfig, text_encoder_has_one: bool) -> None:
    """The tokenizer the text encoder will use exists: model.tokenizer, the text-encoder file's own, or the source's
    tokenizer/ (a folder's with its vocabulary)."""
    if cfg.tokenizer:
        if _tokenizer_kind(cfg.tokenizer) == "folder":
            _check_tokenizer_folder(_tokenizer_folder(Path(cfg.tokenizer).expanduser()), "model.tokenizer")
    elif text_encoder_has_one:
        return
    elif not cfg.source:
        raise _no_tokenizer(cfg)
    elif _source_kind(cfg.source) == "folder":
        _check_tokenizer_folder(_source_folder(cfg, "tokenizer") / SUBFOLDERS["tokenizer"], "model.source")


def check_model_files(
    cfg: ModelConfig, *, high: bool = True, low: bool = True, vae: bool = True, text_encoder: bool = True
) -> None:
    """Refuse every requested component that could not load, before any weight is read: a repo id that is not
    reachable or cached; a ComfyUI file that is missing, a folder, not safetensors (GGUF, a pickle), cut short, or
    another model (keys and shapes, from the header); a source folder without the component's subfolder, its
    config.json or all of its weights (shard index and shards, their headers); a tokenizer without its vocabulary;
    and components that do not fit each other (:func:`_check_fit`: experts of two architectures, an image-to-video
    or TI2V-5B expert, a VAE or text encoder of another model). Seconds on 14B files, so a wrong text-encoder path
    fails before the experts' minutes of loading."""
    _check_hub_sources(cfg, high, low, vae, text_encoder)
    configs: dict[str, dict | None] = {}
    has_tokenizer = False
    for part in [p for p, on in (("high", high), ("low", low), ("vae", vae), ("text_encoder", text_encoder)) if on]:
        if part == "text_encoder" and cfg.text_encoder:
            configs[part], has_tokenizer = check_text_encoder_file(cfg.text_encoder, "model.text_encoder")
        else:
            configs[part] = _checked_config(cfg, part)
    if text_encoder:
        _check_tokenizer(cfg, has_tokenizer)
    _check_fit(cfg, configs)


def expert_config(cfg: ModelConfig, part: str) -> dict | None:
    """The ``WanTransformer3DModel`` config of expert ``part`` (``'high'`` / ``'low'``) without reading a weight:
    from its ComfyUI file's header, the tiny preset, or its source's ``config.json`` (a repo's from the local cache).
    ``None``: a file that is not a Wan transformer, or a repo whose config is not cached. Raises
    :class:`ModelLoadError` for a file or folder that cannot be read (missing, not safetensors, no config.json)."""
    file = getattr(cfg, _FILE_SETTING[part])
    if file:
        return transformer_file_config(file, f"model.{_FILE_SETTING[part]}")
    if _require_source(cfg, part) == "tiny":
        return dict(tiny.TINY_TRANSFORMER_CONFIG)
    folder = _component_folder(cfg, part)
    return None if folder is None else _folder_config(folder, part)


def load_components(
    cfg: ModelConfig,
    *,
    high: bool = True,
    low: bool = True,
    vae: bool = True,
    text_encoder: bool = True,
    expert_device: str | torch.device = "cpu",
    text_encoder_device: str | torch.device = "cpu",
    on_loaded: Callable[[str, torch.nn.Module], None] | None = None,
) -> WanComponents:
    """Load the requested components to CPU as frozen modules in eval mode.

    ``expert_device``: where experts given as ComfyUI files are read to instead (a GPU the experts will stay on;
    see ``memory.planner.experts_load_on_device``), so no host copy of them is made. ``text_encoder_device``: the
    same for a text encoder given as a ComfyUI file (one quantized there next; host memory if it does not fit).
    ``on_loaded(part, module)`` runs as each component arrives, before the next one loads (e.g. to quantize it).

    Experts are stored in ``cfg.dtype``, the text encoder in ``cfg.text_encoder_dtype`` and the VAE in
    ``cfg.vae_dtype``; modules the libraries keep in fp32 (the experts' rope, time_embedder, scale_shift_table and
    norms) stay fp32 on every path. The tokenizer is loaded with the text encoder. Components not requested stay
    None and their files are never opened. Raises :class:`ModelLoadError` for missing or wrong files and folders,
    for all of them before any weight is read (:func:`check_model_files`).
    """
    _hub_checked.clear()
    check_model_files(cfg, high=high, low=low, vae=vae, text_encoder=text_encoder)
    components = WanComponents(None, None, None, None, None, base_model=describe_base_model(cfg))
    arrived = on_loaded or (lambda part, module: None)
    for part in [p for p, wanted in (("high", high), ("low", low)) if wanted]:
        arrived(part, load_expert(cfg, part, components, expert_device))
    if vae:
        with logged_seconds(log, "loaded the VAE"):
            components.vae = _vae(cfg)
        _check_compatible(cfg, components)
        arrived("vae", components.vae)
    if text_encoder:
        with logged_seconds(log, "loaded the text encoder"):
            components.text_encoder, components.tokenizer = _text_encoder(cfg, text_encoder_device)
        components.text_dim = components.text_encoder.config.d_model
        _check_compatible(cfg, components)
        arrived("text_encoder", components.text_encoder)
    return components


def load_expert(
    cfg: ModelConfig, part: str, components: WanComponents, device: str | torch.device = "cpu"
) -> WanTransformer3DModel:
    """Load one expert (``'high'`` / ``'low'``) into ``components`` after the others, checked against them.

    Loading the experts one by one, each just before it is quantized and placed, keeps one unquantized expert in
    memory at a time (28 GB for a 14B expert in bf16) instead of both. Call :func:`check_model_files` first.
    """
    where = "" if str(device) == "cpu" else f" to {device}"
    with logged_seconds(log, f"loaded the {part}-noise expert{where}"):
        model = _expert(cfg, part, device)
    setattr(components, part, model)
    _check_compatible(cfg, components)
    return model
