"""Loading ComfyUI single-file checkpoints: Wan experts, the UMT5-XXL encoder and the Wan 2.1 VAE.

The files use the original (non-diffusers) key names and come as fp16/bf16, plain fp8 or "fp8_scaled". Key names are
converted with diffusers' own converters, every architecture setting is inferred from tensor shapes (no config folder,
no network), and loading is strict: a file that does not fit the expected model is refused with a
:class:`ModelLoadError` naming the file. Tensors are read and converted one at a time, so peak memory stays close
to the finished model's size even for 14B experts.

fp8_scaled layout (ComfyUI): ``<layer>.weight`` stored as float8 plus a per-layer scale, ``<layer>.scale_weight``
(older files, with a ``scaled_fp8`` marker tensor) or ``<layer>.weight_scale`` (newer files, described by
``_quantization_metadata`` / ``<layer>.comfy_quant``); real weight = fp8.float() * scale. Activation scales
(``scale_input`` / ``input_scale``) only matter to fp8 matmuls at inference and are dropped.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import sentencepiece as spm
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase, T5Tokenizer, UMT5Config, UMT5EncoderModel

from ..errors import ModelLoadError
from ..keys import diffusers_key_to_original
from ..quant.float8 import FILE_FP8_SCALE

#: Key prefix ComfyUI puts in front of diffusion-model tensors in some files.
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."
#: Key of the tensor holding the tokenizer's sentencepiece model bytes in ComfyUI's UMT5 files.
SPIECE_KEY = "spiece_model"

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_SAFETENSORS_DTYPES = {"F8_E4M3", "F8_E5M2"}
_QUANT_FORMATS = {"float8_e4m3fn", "float8_e5m2"}
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
_QUANT_CONF_SUFFIX = ".comfy_quant"
_SCALED_MARKER = "scaled_fp8"
_HEAD_DIM = 128  # Wan attention heads are 128 channels wide at every model size
#: Latent channels of the Wan 2.1 VAE, which the Wan 2.2 T2V A14B experts (and the tiny preset's) denoise.
LATENT_CHANNELS = 16
#: In/out channels of Wan 2.2 TI2V-5B, whose own VAE makes 48-channel latents.
_TI2V_5B_CHANNELS = 48
#: A ComfyUI repackaged file of the same component, for the advice on files this trainer cannot read.
_SAME_MODEL_EXAMPLE = {
    "model.high_noise": "wan2.2_t2v_high_noise_14B_fp16.safetensors",
    "model.low_noise": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
    "model.text_encoder": "umt5_xxl_fp16.safetensors",
    "model.vae": "wan_2.1_vae.safetensors",
}
_GGUF_MAGIC = b"GGUF"
_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02\x8a")  # torch.save: a zip archive (torch >= 1.6), or a bare pickle
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too


# ----------------------------------------------------------------------------------------------- dtypes


def fp32_kept_modules(model_cls: type, dtype: torch.dtype) -> frozenset[str]:
    """Module names the library keeps in float32 when ``model_cls`` is loaded in ``dtype``.

    diffusers keeps ``_keep_in_fp32_modules`` in fp32 for every reduced dtype; transformers does so only for fp16
    (plus ``_keep_in_fp32_modules_strict`` for fp16 and bf16).
    """
    if dtype == torch.float32:
        return frozenset()
    if issubclass(model_cls, PreTrainedModel):
        kept = set(getattr(model_cls, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            kept |= set(model_cls._keep_in_fp32_modules or ())
        return frozenset(kept)
    return frozenset(getattr(model_cls, "_keep_in_fp32_modules", None) or ())


def tensor_dtype(name: str, kept: frozenset[str], dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of parameter/buffer ``name``: fp32 inside a kept module (diffusers' own matching rule)."""
    return torch.float32 if any(part in kept for part in name.split(".")) else dtype


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place, leaving the library's fp32-kept modules fp32."""
    kept = fp32_kept_modules(type(model), dtype)
    for module_name, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is None or not t.is_floating_point():
                    continue
                target = tensor_dtype(f"{module_name}.{name}", kept, dtype)
                if t.dtype == target:
                    continue
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(target)
                else:
                    tensors[name] = t.to(target)
    return model


def _numbered(device: str | torch.device) -> torch.device:
    """``device`` with a GPU's number filled in (safetensors reads to ``cuda:N`` only)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def frozen_eval(model: torch.nn.Module) -> torch.nn.Module:
    """Base weights are never trained: eval mode and no gradients (LoRA layers add their own parameters)."""
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- files


class SingleFile:
    """A ComfyUI ``.safetensors`` file with fp8 scales resolved; use as a context manager.

    ``names`` maps each model tensor name (prefix stripped; scales, markers and quantization notes removed) to its
    key in the file. :meth:`get` returns a tensor ready for conversion: fp8 weights come back dequantized in fp32.
    Every consistency problem of the scales is refused when the file is opened, before any weight is read.
    """

    def __init__(self, path: str | Path, setting: str, prefix: str | None = None, device: str = "cpu"):
        self.path = Path(path).expanduser()
        self.setting = setting
        self._prefix = prefix
        self._device = device
        if not self.path.is_file():
            what = "is a folder, not a file" if self.path.is_dir() else "does not exist"
            raise ModelLoadError(f"{setting}: {self.path} {what} - give the path of a .safetensors file")

    def _open(self) -> None:
        self._ctx = safe_open(str(self.path), framework="pt", device=self._device)
        self._handle = self._ctx.__enter__()
        self._mapped_bytes = 0

    def _count_mapped(self, t: torch.Tensor) -> None:
        # safetensors returns views of a memory map of the file: every page read stays in this process's resident
        # memory until the map is gone, so a 14 GB expert read tensor by tensor would add 14 GB of host memory
        # beside its converted copy. Reopening every REMAP_BYTES (and returning no view: see get) keeps at most
        # that much of the file mapped.
        self._mapped_bytes += t.numel() * t.element_size()
        if self._mapped_bytes >= REMAP_BYTES:
            self._ctx.__exit__(None, None, None)
            self._open()

    def __enter__(self) -> SingleFile:
        try:
            self._open()
            metadata = self._handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            problem = safetensors_problem(self.path, self.setting) or f"is not a readable .safetensors file ({exc})"
            raise ModelLoadError(f"{self.setting}: {self.path} {problem}") from None
        try:
            self._index(metadata)
        except ModelLoadError:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._ctx.__exit__(*exc_info)

    def fail(self, message: str) -> ModelLoadError:
        """A :class:`ModelLoadError` naming the setting and this file."""
        return ModelLoadError(f"{self.setting}: {self.path.name} ({self.path}) {message}")

    def _index(self, metadata: dict[str, str]) -> None:
        self.names: dict[str, str] = {}
        self._scales: dict[str, str] = {}
        quant_formats: dict[str, str] = {}
        marker = False
        for key in self._handle.keys():
            name = key
            if self._prefix and key.startswith(self._prefix):
                name = key[len(self._prefix) :]
            if name.rsplit(".", 1)[-1] == _SCALED_MARKER:  # behind any prefix: the file in another slot is intact
                marker = True
            elif name.endswith(_WEIGHT_SCALE_SUFFIXES):
                weight = name.rsplit(".", 1)[0] + ".weight"
                if weight in self._scales:
                    raise self.fail(f"has two scales for {weight}; the file is damaged - download it again")
                self._scales[weight] = key
            elif name.endswith(_INPUT_SCALE_SUFFIXES):
                continue
            elif name.endswith(_QUANT_CONF_SUFFIX):
                quant_formats[name] = self._quant_format(self._handle.get_tensor(key), name)
            else:
                self.names[name] = key
        if "_quantization_metadata" in metadata:
            try:
                layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
            except (ValueError, AttributeError):
                raise self.fail("has unreadable _quantization_metadata; the file is damaged") from None
            for layer, conf in layers.items():
                quant_formats[layer] = conf.get("format") if isinstance(conf, dict) else conf
        unsupported = {f for f in quant_formats.values() if f not in _QUANT_FORMATS}
        if unsupported:
            raise self.fail(
                f"is quantized as {sorted(map(str, unsupported))}; only fp16/bf16/fp32, fp8 and fp8_scaled "
                "(float8_e4m3fn) files are supported - use the fp16 or fp8_scaled file of this model"
            )
        self._check_scales(scaled=marker or bool(self._scales) or bool(quant_formats))

    @staticmethod
    def _quant_format(t: torch.Tensor, name: str) -> str:
        try:
            conf = json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"unreadable {name}"
        return conf.get("format", "unknown") if isinstance(conf, dict) else str(conf)

    def _check_scales(self, scaled: bool) -> None:
        for weight, scale_key in self._scales.items():
            if weight not in self.names:
                raise self.fail(f"has a scale {scale_key} for a weight that is not in the file ({weight})")
            if self.dtype_name(weight) not in _FP8_SAFETENSORS_DTYPES:
                raise self.fail(
                    f"has a scale {scale_key} for {weight}, which is stored as {self.dtype_name(weight)}, not fp8; "
                    "the file is inconsistent - use an unmodified fp16 or fp8_scaled file"
                )
            w_shape = self.shape(weight)
            s_shape = tuple(self._handle.get_slice(scale_key).get_shape())
            if not _scale_fits(s_shape, w_shape):
                raise self.fail(
                    f"has scale {scale_key} of shape {list(s_shape)} that cannot scale {weight} of shape "
                    f"{list(w_shape)} (expected one value or one per output row, shape [{w_shape[0]}, 1, ...])"
                )
        if scaled:
            unscaled = [
                n for n in self.names if self.dtype_name(n) in _FP8_SAFETENSORS_DTYPES and n not in self._scales
            ]
            if unscaled:
                raise self.fail(
                    f"is an fp8_scaled file but {len(unscaled)} fp8 tensor(s) have no scale (e.g. {unscaled[0]}); "
                    "loading them unscaled would give wrong weights - use an unmodified file"
                )

    def dtype_name(self, name: str) -> str:
        """safetensors dtype string (``BF16``, ``F8_E4M3`` ...) of tensor ``name``, without reading it."""
        return self._handle.get_slice(self.names[name]).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``, without reading it."""
        return tuple(self._handle.get_slice(self.names[name]).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of all model tensors."""
        return {n: self.shape(n) for n in self.names}

    def pop_bytes(self, name: str) -> bytes | None:
        """Remove a uint8 side tensor (e.g. ``spiece_model``) from the model tensors and return its bytes."""
        key = self.names.pop(name, None)
        if key is None:
            return None
        return self._handle.get_tensor(key).to("cpu", torch.uint8).numpy().tobytes()

    def fp8_scale(self, name: str) -> torch.Tensor | None:
        """For tensor ``name`` stored as fp8: the float32 scale its values were multiplied by (1 without one; one
        value, or one per output row); ``None`` for any other tensor."""
        if self.dtype_name(name) not in _FP8_SAFETENSORS_DTYPES:
            return None
        if name not in self._scales:
            return torch.ones(())
        return self._handle.get_tensor(self._scales[name]).to("cpu", torch.float32, copy=True)  # no view of the map

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; fp8 weights are dequantized (fp8.float() * scale) to fp32."""
        t = self._handle.get_tensor(self.names[name])
        if name in self._scales:
            scale = self._handle.get_tensor(self._scales[name]).float()
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise self.fail(f"has a non-positive or non-finite scale for {name}; the file is damaged")
            out = t.float() * (scale.reshape(()) if scale.numel() == 1 else scale)
        else:
            out = t.float() if t.dtype in _FP8_DTYPES else t
        if out.device.type == "cpu" and out.data_ptr() == t.data_ptr():  # a view of the map keeps it all mapped
            out = out.clone()  # (a tensor read to a GPU is a copy already)
        self._count_mapped(t)
        return out


#: Bytes read from one memory map of a file before it is closed and reopened (see ``SingleFile._count_mapped``).
REMAP_BYTES = 1 << 30


def safetensors_problem(path: str | Path, setting: str = "") -> str | None:
    """Why ``path`` cannot be read as a .safetensors file, with what to do, from its first bytes and its header alone:
    a GGUF or PyTorch pickle checkpoint, a file cut short (its size against the size its header describes) or a
    damaged header. ``None`` when the header is sound and the file holds every byte it describes. ``setting``
    (``model.vae`` ...) picks the example file the advice names."""
    path = Path(path)
    example = _SAME_MODEL_EXAMPLE.get(setting, "repackaged Wan 2.2 files")
    same_model = f"use the fp16/bf16 or fp8_scaled .safetensors of the same model (e.g. Comfy-Org's {example})"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            return _header_problem(fh, size, same_model)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc}) - check its permissions"


def _header_problem(fh: BinaryIO, size: int, same_model: str) -> str | None:
    """:func:`safetensors_problem` of an open file of ``size`` bytes."""
    head = fh.read(8)
    if head.startswith(_GGUF_MAGIC):
        return f"is a GGUF file (llama.cpp-style quantization), which this trainer cannot read - {same_model}"
    if head.startswith(_PICKLE_MAGICS):
        return f"is a PyTorch pickle checkpoint (.pt/.ckpt), which this trainer does not read - {same_model}"
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    if length > _MAX_HEADER_BYTES or (len(head) == 8 and length < 2):
        return f"is not a readable .safetensors file (no safetensors header at its start) - {same_model}"
    if 8 + length > size:
        return f"is cut short: {size:,} bytes, less than its own header needs ({8 + length:,}) - download it again"
    try:
        header = json.loads(fh.read(length))
        end = 8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has a damaged header (not safetensors JSON) - download it again"
    if size < end:
        return (f"is cut short: {size:,} bytes of the {end:,} its header describes ({end - size:,} missing), so the "
                "download did not finish - download it again")
    return None


def _scale_fits(scale: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    # One value, or a same-rank tensor broadcasting onto the weight (e.g. [out, 1] per row). A 1-D [out] scale on a
    # matrix would broadcast along the wrong axis (silently, when the matrix is square), so it is not accepted.
    if math.prod(scale) == 1:
        return True
    return len(scale) == len(weight) and all(s in (1, w) for s, w in zip(scale, weight, strict=True))


def _check_keys(
    f: SingleFile,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, str],
    what: str,
    optional: Iterable[str] = (),
    file_name_of=lambda k: k,
) -> None:
    """Refuse the file unless its tensors are exactly ``expected`` (model name -> shape).

    ``found`` maps model names to the file's tensor names; ``optional`` names (tied weights) may be absent.
    """
    optional = set(optional)
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [found[k] for k in found if k not in expected]
    wrong = [
        f"{found[k]} is {list(f.shape(found[k]))}, expected {list(expected[k])}"
        for k in found
        if k in expected and f.shape(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(file_name_of(k) for k in missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape (e.g. {'; '.join(wrong[:2])})")
    raise f.fail(f"is not {what}: {'; '.join(problems)}")


def _read_converted(
    f: SingleFile, names: dict[str, str], model_cls: type, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read each tensor once and convert it straight from the file's values to its storage dtype."""
    kept = fp32_kept_modules(model_cls, dtype)
    return {k: f.get(src).to(tensor_dtype(k, kept, dtype)) for k, src in names.items()}


def _fp8_scales(f: SingleFile, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Model weight name -> the scale of its fp8 values in the file, for the weights stored as fp8."""
    scales = {key: f.fp8_scale(src) for key, src in names.items() if key.endswith(".weight")}
    return {key: scale for key, scale in scales.items() if scale is not None}


def _note_fp8_scales(model: torch.nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Tell each Linear whose weight came from the file as fp8 its scale (:data:`~..quant.float8.FILE_FP8_SCALE`),
    so float8 quantization can keep the file's own values instead of rounding them again."""
    for key, scale in scales.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        if isinstance(module, torch.nn.Linear):
            setattr(module, FILE_FP8_SCALE, scale)


def _empty_state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- transformer


def infer_transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """WanTransformer3DModel config from the shapes of an original-named Wan checkpoint (prefix stripped).

    Raises ``KeyError`` naming a tensor every Wan transformer has when it is absent.
    """
    required = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight")
    for key in (*required, "blocks.0.ffn.0.weight"):
        if key not in shapes:
            raise KeyError(key)
    dim, in_channels, *patch = shapes["patch_embedding.weight"]
    return {
        "patch_size": tuple(patch),
        "num_attention_heads": dim // _HEAD_DIM,
        "attention_head_dim": _HEAD_DIM,
        "in_channels": in_channels,
        "out_channels": shapes["head.head.weight"][0] // math.prod(patch),
        "text_dim": shapes["text_embedding.0.weight"][1],
        "freq_dim": shapes["time_embedding.0.weight"][1],
        "ffn_dim": shapes["blocks.0.ffn.0.weight"][0],
        "num_layers": 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")),
        "cross_attn_norm": "blocks.0.norm3.weight" in shapes,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


def _original_name(diffusers_key: str) -> str:
    try:
        return diffusers_key_to_original(diffusers_key)
    except KeyError:
        return diffusers_key


def _transformer_layout(f: SingleFile) -> tuple[WanTransformer3DModel, dict[str, str]]:
    """The empty (meta) expert an open file fills and the name mapping (diffusers name -> file name), after every
    check that needs no weight: Wan T2V keys, architecture and each tensor's shape."""
    shapes = f.shapes()
    expected_desc = (
        "a Wan 2.2 T2V transformer (original Wan key names such as blocks.0.self_attn.q.weight, "
        "as in wan2.2_t2v_high_noise_14B_fp16.safetensors)"
    )
    if "condition_embedder.time_embedder.linear_1.weight" in shapes:
        raise f.fail(
            "uses diffusers key names; load a diffusers model through model.source (the folder holding "
            "transformer/ and transformer_2/) instead of as a single file"
        )
    if any(("motion_encoder" in k or "face_adapter" in k) for k in shapes):
        raise f.fail(f"is a Wan Animate model, not {expected_desc}")
    try:
        config = infer_transformer_config(shapes)
    except KeyError as exc:
        raise f.fail(f"is not {expected_desc}: it has no tensor {exc}") from None
    dim = shapes["patch_embedding.weight"][0]
    if dim % _HEAD_DIM:
        raise f.fail(f"is not {expected_desc}: its width {dim} is not a multiple of the {_HEAD_DIM}-wide heads")
    if problem := expert_channels_problem(config):
        raise f.fail(problem)
    # diffusers' converter only renames keys for T2V checkpoints, so feeding it the names themselves yields
    # the name mapping (diffusers name -> file name) without reading any tensor.
    names = convert_wan_transformer_to_diffusers({k: k for k in shapes})
    with init_empty_weights():
        model = WanTransformer3DModel(**config)
    what = f"{expected_desc} with {config['num_layers']} layers of width {dim}"
    _check_keys(f, _empty_state_shapes(model), names, what, file_name_of=_original_name)
    return model, names


def expert_channels_problem(config: dict) -> str | None:
    """Why an expert of this ``WanTransformer3DModel`` config is not a text-to-video expert of the Wan 2.1 VAE's
    latents (an image-to-video or TI2V-5B model), with what to use; ``None`` when it is one."""
    c_in, c_out = config["in_channels"], config["out_channels"]
    if c_in != c_out:
        return (f"is an image-to-video model ({c_in} input vs {c_out} output channels); this trainer trains the "
                "text-to-video experts (wan2.2_t2v_high/low_noise_14B_*)")
    if c_in != LATENT_CHANNELS:
        what = "Wan 2.2 TI2V-5B (made for its own 48-channel VAE)" if c_in == _TI2V_5B_CHANNELS else "another model"
        return (f"is {what}: it takes {c_in} latent channels, not the Wan 2.1 VAE's {LATENT_CHANNELS}; this trainer "
                "trains the Wan 2.2 T2V A14B experts (wan2.2_t2v_high/low_noise_14B_*)")
    return None


def vae_channels_problem(z_dim: int) -> str | None:
    """Why a VAE making ``z_dim`` latent channels does not pair with the Wan 2.2 T2V A14B experts; ``None`` when it
    does."""
    if z_dim == LATENT_CHANNELS:
        return None
    return (f"is a VAE with {z_dim} latent channels; Wan 2.2 T2V A14B uses the Wan 2.1 VAE with {LATENT_CHANNELS} "
            "(the 48-channel one belongs to Wan 2.2 TI2V-5B) - use wan_2.1_vae.safetensors")


def transformer_file_config(path: str | Path, setting: str) -> dict | None:
    """The WanTransformer3DModel config of a ComfyUI expert file, from its header; ``None`` for a file that is not a
    Wan transformer (the model loader refuses it by name). A missing or unreadable file raises
    :class:`ModelLoadError` naming ``setting``."""
    with SingleFile(path, setting, prefix=DIFFUSION_MODEL_PREFIX) as f:
        try:
            return infer_transformer_config(f.shapes())
        except KeyError:
            return None


def check_transformer_file(path: str | Path, setting: str) -> dict:
    """Refuse a file :func:`load_transformer_file` would refuse, reading only its header (seconds, not minutes);
    returns the expert's ``WanTransformer3DModel`` config."""
    with SingleFile(path, setting, prefix=DIFFUSION_MODEL_PREFIX) as f:
        return dict(_transformer_layout(f)[0].config)


def load_transformer_file(
    path: str | Path, dtype: torch.dtype, setting: str, device: str | torch.device = "cpu"
) -> WanTransformer3DModel:
    """Load a ComfyUI Wan 2.2 T2V expert file (fp16/bf16/fp32, fp8 or fp8_scaled) as a frozen WanTransformer3DModel.

    Weights are stored in ``dtype`` except the modules diffusers keeps in fp32, which are converted from the file's
    own values. ``setting`` (e.g. ``"model.high_noise"``) is named in errors. ``device``: where the weights are read
    to; a GPU here means no host copy of the expert at all (each tensor goes from the file to the card).
    """
    device = _numbered(device)
    with SingleFile(path, setting, prefix=DIFFUSION_MODEL_PREFIX, device=str(device)) as f:
        model, names = _transformer_layout(f)
        model.load_state_dict(_read_converted(f, names, WanTransformer3DModel, dtype), strict=True, assign=True)
        _note_fp8_scales(model, _fp8_scales(f, names))
    return frozen_eval(cast_keeping_fp32(model, dtype))


# ----------------------------------------------------------------------------------------------- VAE


def _vae_layout(f: SingleFile) -> tuple[AutoencoderKLWan, dict[str, str]]:
    """The empty (meta) VAE an open file fills and the name mapping, after every check that needs no weight."""
    expected_desc = "the Wan 2.1 VAE (original key names such as encoder.conv1.weight, as in wan_2.1_vae.safetensors)"
    shapes = f.shapes()
    if "encoder.conv_in.weight" in shapes:
        raise f.fail("uses diffusers key names; load a diffusers VAE through model.source instead")
    for key in ("encoder.conv1.weight", "conv2.weight", "decoder.head.2.weight"):
        if key not in shapes:
            raise f.fail(f"is not {expected_desc}: it has no tensor '{key}'")
    z_dim = shapes["conv2.weight"][0]
    if problem := vae_channels_problem(z_dim):
        raise f.fail(problem)
    base_dim, in_channels = shapes["encoder.conv1.weight"][:2]
    config = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "in_channels": in_channels,
        "out_channels": shapes["decoder.head.2.weight"][0],
    }
    names = convert_wan_vae_to_diffusers({k: k for k in shapes})
    with init_empty_weights():
        model = AutoencoderKLWan(**config)
    _check_keys(f, _empty_state_shapes(model), names, f"{expected_desc} with base width {base_dim}")
    return model, names


def check_vae_file(path: str | Path, setting: str = "model.vae") -> dict:
    """Refuse a file :func:`load_vae_file` would refuse, reading only its header; returns its AutoencoderKLWan
    config."""
    with SingleFile(path, setting) as f:
        return dict(_vae_layout(f)[0].config)


def load_vae_file(path: str | Path, dtype: torch.dtype, setting: str = "model.vae") -> AutoencoderKLWan:
    """Load ComfyUI's ``wan_2.1_vae.safetensors`` (original Wan VAE key names) as a frozen AutoencoderKLWan."""
    with SingleFile(path, setting) as f:
        model, names = _vae_layout(f)
        model.load_state_dict(_read_converted(f, names, AutoencoderKLWan, dtype), strict=True, assign=True)
    return frozen_eval(cast_keeping_fp32(model, dtype))


# ----------------------------------------------------------------------------------------------- text encoder


def infer_umt5_config(shapes: dict[str, tuple[int, ...]]) -> UMT5Config:
    """UMT5Config of an encoder-only checkpoint in transformers' T5 naming, from tensor shapes.

    Raises ``KeyError`` naming a tensor every UMT5 encoder has when it is absent.
    """
    attn = "encoder.block.0.layer.0.SelfAttention"
    for key in ("shared.weight", f"{attn}.q.weight", f"{attn}.relative_attention_bias.weight"):
        if key not in shapes:
            raise KeyError(key)
    vocab_size, d_model = shapes["shared.weight"]
    buckets, num_heads = shapes[f"{attn}.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    if wi not in shapes:
        raise KeyError(wi)
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=shapes[f"{attn}.q.weight"][0] // num_heads,
        d_ff=shapes[wi][0],
        num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
        num_heads=num_heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )


def _umt5_layout(f: SingleFile) -> UMT5Config:
    """The config of the UMT5 encoder in an open file (its ``spiece_model`` popped), after every check that needs
    no weight."""
    expected_desc = "a UMT5 text encoder (T5 key names such as encoder.block.0.layer.0.SelfAttention.q.weight)"
    shapes = f.shapes()
    try:
        config = infer_umt5_config(shapes)
    except KeyError as exc:
        raise f.fail(f"is not {expected_desc}: it has no tensor {exc}") from None
    if config.num_layers > 1 and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in shapes:
        raise f.fail("is a T5 encoder (e.g. t5xxl), not UMT5; Wan uses umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled")
    with init_empty_weights():
        empty = UMT5EncoderModel(config)
    what = f"{expected_desc} with {config.num_layers} layers of width {config.d_model}"
    _check_keys(f, _empty_state_shapes(empty), {k: k for k in shapes}, what, optional=empty._tied_weights_keys)
    return config


def check_text_encoder_file(path: str | Path, setting: str = "model.text_encoder") -> tuple[dict, bool]:
    """Refuse a file :func:`load_text_encoder_file` would refuse, reading only its header (and the small tokenizer
    tensor); returns its UMT5 config (as a dict) and whether it carries its tokenizer (``spiece_model``)."""
    with SingleFile(path, setting) as f:
        has_tokenizer = SPIECE_KEY in f.names
        f.names.pop(SPIECE_KEY, None)
        config = _umt5_layout(f)
    return config.to_dict(), has_tokenizer


def text_encoder_file_bytes(path: str | Path, dtype: torch.dtype, setting: str = "model.text_encoder") -> int:
    """Bytes the encoder in ``path`` takes loaded in ``dtype``, from the file's header."""
    with SingleFile(path, setting) as f:
        f.names.pop(SPIECE_KEY, None)
        return sum(math.prod(shape) for shape in f.shapes().values()) * dtype.itemsize


def load_text_encoder_file(
    path: str | Path, dtype: torch.dtype, setting: str = "model.text_encoder", device: str | torch.device = "cpu"
) -> tuple[UMT5EncoderModel, bytes | None]:
    """Load a ComfyUI ``umt5_xxl_*.safetensors`` (fp16/bf16 or fp8_e4m3fn_scaled) as a frozen UMT5EncoderModel.

    Returns the model and the sentencepiece model bytes the file carries as ``spiece_model`` (None if absent).
    ``device``: where the weights are read to; a GPU here means no host copy of the encoder (11 GiB for UMT5-XXL
    in bf16), e.g. for one about to be quantized there.
    """
    device = _numbered(device)
    with SingleFile(path, setting, device=str(device)) as f:
        spiece = f.pop_bytes(SPIECE_KEY)
        config = _umt5_layout(f)
        names = {k: k for k in f.names}
        state_dict = _read_converted(f, names, UMT5EncoderModel, dtype)
        scales = _fp8_scales(f, names)
    # transformers' own loader ties the embeddings and applies its fp32 rules; the keys were checked above. It
    # takes the tensors as they are where its device map puts them (without one it would copy them to the CPU).
    model = UMT5EncoderModel.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, device_map={"": str(device)}
    )
    _note_fp8_scales(model, scales)
    return frozen_eval(model), spiece


def tokenizer_from_sentencepiece(model_bytes: bytes, source: str = "sentencepiece model") -> PreTrainedTokenizerBase:
    """A T5 tokenizer (appends ``</s>``, pads with id 0) from sentencepiece model bytes.

    No sentinel ``<extra_id_N>`` tokens are added, so text is tokenized exactly as sentencepiece (and ComfyUI) does.
    """
    try:
        spm.SentencePieceProcessor(model_proto=model_bytes)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"{source} is not a valid sentencepiece model ({exc})") from None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model_bytes)
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0, local_files_only=True)
