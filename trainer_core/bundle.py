"""What a host (the ComfyUI nodes) keeps between runs: the experts bundle over a shared store of loaded components,
and the LoRA pair a run trained or a loader read.

A host may hand one :class:`ExpertsBundle` to several training and sampling calls, across runs. A bundle is settings
(model, memory, quantization) over a :class:`ComponentStore` that holds the loaded components on the CPU and is shared
by every bundle of the same :class:`ModelConfig` (other quantization or memory settings of the same model), so
changing those settings never loads weights again.

Quantization replaces an expert's layers in place and cannot be undone, so the store records the form each
component is in. Training asks for components as loaded (the core quantizes them itself), sampling for the
bundle's quantized form; a component in another quantized form is dropped and loaded again from disk. A caller that
borrows components gives them back clean (no adapter, eval mode, on the CPU: :func:`release_expert`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from safetensors.torch import load_file

from .config import JobConfig, LoraConfig, MemoryConfig, ModelConfig, QuantConfig
from .errors import TrainerError
from .lora import (
    attach_lora,
    check_lora_fits,
    detach_lora,
    load_lora_tensors,
    lora_file_name,
    merged_patches,
    split_patches,
    wan_weight_shapes,
)
from .lora.formats import expert_arch
from .models import WanComponents, load_components
from .names import EXPERTS
from .quant import Float8Linear, NF4Linear, UInt4Linear, quantize_expert, quantize_text_encoder
from .quant.choice import resolved_quant
from .regularizers import ema_lora_file_name
from .train.quantization import expert_identity

log = logging.getLogger(__name__)

_PARTS = (*EXPERTS, "vae", "text_encoder")
#: The form of a component as loaded from disk.
AS_LOADED = ""
_QUANTIZED_LAYERS = (Float8Linear, NF4Linear, UInt4Linear)
_EXPERT_QUANT_FIELDS = {
    "transformer", "quantizer", "ara_source", "ara_rank", "ara_calibration_samples", "ara_cache_dir"
}


def component_form(part: str, quant: QuantConfig) -> str:
    """The form ``quant`` puts ``part`` in: :data:`AS_LOADED`, or a description of its quantization."""
    if part in EXPERTS and quant.transformer == "float8":
        return "float8"
    if part in EXPERTS and quant.transformer == "4bit_ara":
        return json.dumps(quant.model_dump(include=_EXPERT_QUANT_FIELDS), sort_keys=True)
    if part == "text_encoder" and quant.text_encoder == "float8":
        return "float8"
    return AS_LOADED


def has_quantized_layers(model: nn.Module | None) -> bool:
    """Whether any layer of ``model`` was replaced by a quantized one (fully or, after a failure, partly)."""
    return model is not None and any(isinstance(m, _QUANTIZED_LAYERS) for m in model.modules())


class ComponentStore:
    """The components loaded from one :class:`ModelConfig` (CPU, frozen, eval mode) and the form each is in."""

    def __init__(self, model: ModelConfig):
        self.model = model
        self.parts = WanComponents(None, None, None, None, None, base_model="")
        self.forms: dict[str, str] = {}

    def provide(self, forms: dict[str, str], quant: QuantConfig, device: torch.device | None) -> WanComponents:
        """The parts named in ``forms``, each in its form: loaded if missing, reloaded if quantized otherwise,
        quantized on ``device`` per ``quant`` if still as loaded.

        A missing part is stored and quantized as it arrives, before the next one loads: one unquantized expert in
        host memory at a time, not both. A text encoder to quantize on a GPU is read straight to it, so it never
        sits in host memory unquantized beside the experts (Preview Sample after Train LoRA peaked at 43.4 GiB of
        host memory on an H100 that way, 1.29x its files). Returns a new :class:`WanComponents` sharing the stored
        modules, so a caller that drops a component from it (training frees the text encoder) does not empty the
        store. Loading and quantizing run outside inference mode: ComfyUI runs nodes under
        ``torch.inference_mode()``, and weights created there could never be trained.
        """
        self.forget(*(p for p, f in forms.items() if self.forms.get(p, AS_LOADED) not in (AS_LOADED, f)))
        missing = {p: p in forms and getattr(self.parts, p) is None for p in _PARTS}

        def arrived(part: str, module: nn.Module) -> None:
            setattr(self.parts, part, module)
            self.forms[part] = AS_LOADED
            if forms[part] != AS_LOADED:
                self._quantize(part, quant, device)
                self.forms[part] = forms[part]

        if any(missing.values()):
            quantized_on_gpu = device is not None and device.type == "cuda"
            te_device = device if quantized_on_gpu and forms.get("text_encoder", AS_LOADED) != AS_LOADED else "cpu"
            with torch.inference_mode(False):
                new = load_components(self.model, **missing, text_encoder_device=te_device, on_loaded=arrived)
            if missing["text_encoder"]:
                self.parts.tokenizer = new.tokenizer
            self.parts.base_model = new.base_model
        for part, form in forms.items():
            if self.forms[part] != form:
                self._quantize(part, quant, device)
                self.forms[part] = form
        return replace(self.parts)

    def forget(self, *parts: str) -> None:
        """Drop stored components (e.g. ones a failed run left in an unknown state); they reload on next use."""
        for part in parts:
            setattr(self.parts, part, None)
            self.forms.pop(part, None)
            if part == "text_encoder":
                self.parts.tokenizer = None

    def _quantize(self, part: str, quant: QuantConfig, device: torch.device | None) -> None:
        """Quantize a stored component in place on ``device`` (it ends back on the CPU); forgotten on failure."""
        module = getattr(self.parts, part)
        try:
            with torch.inference_mode(False):
                if part == "text_encoder":
                    report = quantize_text_encoder(module, quant, device)
                else:
                    report = quantize_expert(
                        module,
                        _without_calibration(quant, part),
                        expert=part,
                        cache_key=expert_identity(JobConfig(model=self.model, quant=quant), part)[0],
                        device=device,
                    )
            log.info("%s", report.summary())
        except BaseException:
            self.forget(part)
            raise
        finally:
            module.to("cpu")


def _without_calibration(quant: QuantConfig, expert: str) -> QuantConfig:
    """``quant`` for quantizing outside training: there are no training clips to calibrate computed adapters on, so
    they come from the weights alone (training's own calibrated experts are reused whenever the store has them)."""
    if quant.transformer != "4bit_ara" or quant.ara_source != "compute" or quant.ara_calibration_samples == 0:
        return quant
    log.info(
        "the %s-noise expert was not quantized by a training run of this session: its accuracy recovery adapters "
        "are computed from the weights alone (no training clips to calibrate on here)", expert
    )
    return quant.model_copy(update={"ara_calibration_samples": 0})


_STORES: weakref.WeakValueDictionary[str, ComponentStore] = weakref.WeakValueDictionary()


def shared_store(model: ModelConfig) -> ComponentStore:
    """The store of ``model``'s components: one per distinct model setting for as long as a bundle uses it."""
    key = model.model_dump_json()
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ComponentStore(model)
    return store


@dataclass
class ExpertsBundle:
    """Base-model settings (:class:`ModelConfig`), where the experts live during training (:class:`MemoryConfig`)
    and how they are quantized (:class:`QuantConfig`), over the shared store of loaded components."""

    model: ModelConfig
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    store: ComponentStore = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.store = shared_store(self.model)

    @property
    def loaded(self) -> WanComponents:
        """The stored components (None where not loaded)."""
        return self.store.parts

    def with_quant(self, quant: QuantConfig) -> ExpertsBundle:
        """The same base model and memory settings with ``quant`` (sharing the store)."""
        return replace(self, quant=quant)

    def components(
        self,
        *,
        high: bool = True,
        low: bool = True,
        vae: bool = True,
        text_encoder: bool = True,
        quantize_on: torch.device | None = None,
    ) -> WanComponents:
        """The requested components: as loaded (what training takes: the core quantizes them itself), or with
        ``quantize_on`` in this bundle's quantized form, quantizing there what is not yet."""
        wanted = [p for p, on in zip(_PARTS, (high, low, vae, text_encoder)) if on]
        quant = resolved_quant(self.quant, quantize_on) if quantize_on is not None else self.quant
        forms = {p: component_form(p, quant) if quantize_on is not None else AS_LOADED for p in wanted}
        return self.store.provide(forms, quant, quantize_on)

    def training_components(self, *, high: bool, low: bool) -> WanComponents:
        """What a training run borrows: the VAE and the text encoder, and of the ``high`` / ``low`` experts those the
        store holds as loaded. The others stay unloaded: the run loads them one at a time, each quantized before the
        next arrives (one unquantized 14B expert in host memory at a time, as headless; both at once took 67.8 GiB
        of host memory in ComfyUI on an H100), and :meth:`keep` stores them afterwards. A stored expert in another
        form is dropped first (training quantizes from the weights as loaded)."""
        self.forget(*(p for p in EXPERTS if self.store.forms.get(p, AS_LOADED) != AS_LOADED))
        stored = {p: getattr(self.store.parts, p) is not None for p in EXPERTS}
        return self.components(high=high and stored["high"], low=low and stored["low"])

    def keep(self, comps: WanComponents, quantized: bool = True) -> None:
        """Store the experts a run loaded into ``comps`` (borrowed from :meth:`training_components`), as loaded;
        with ``quantized`` off (a run that failed) not those it quantized. :meth:`trained` records the form of the
        ones a finished run quantized."""
        for part in EXPERTS:
            model = getattr(comps, part)
            if model is None or getattr(self.store.parts, part) is not None:
                continue
            if quantized or not has_quantized_layers(model):
                setattr(self.store.parts, part, model)
                self.store.forms[part] = AS_LOADED

    def trained(self, experts: list[str], quant: QuantConfig) -> None:
        """Record that a finished training run quantized ``experts`` in place per ``quant``."""
        for part in experts:
            self.store.forms[part] = component_form(part, quant)

    def forget(self, *parts: str) -> None:
        """Drop stored components; they reload from disk on next use."""
        self.store.forget(*parts)


@dataclass
class LoraPair:
    """A LoRA pair (trained, or loaded by Load Wan22 LoRA Pair): per-expert tensors in ComfyUI naming (CPU) and
    the files they came from.

    ``tensors["high"]`` maps ``diffusion_model.blocks.N.<module>.lora_down.weight`` / ``lora_up.weight`` /
    ``alpha`` (and, from ComfyUI's own trainer, ``.diff`` / ``.diff_b`` and LoRAs outside the blocks) to tensors -
    the dict ComfyUI's ``comfy.sd.load_lora_for_models`` takes; the rank may differ per module. An expert that was
    not trained (or picked) has no entry. ``lora`` is the adapter that holds both experts' block LoRAs (None when
    neither has one); ``strength`` the factor already folded into an expert's tensors (1 where absent);
    ``inputs`` the input each expert's file was picked in (e.g. ``Load Wan22 LoRA Pair lora_high``), for messages.
    """

    lora: LoraConfig | None
    tensors: dict[str, dict[str, torch.Tensor]]
    files: dict[str, Path] = field(default_factory=dict)
    step: int = 0
    trigger_word: str | None = None
    strength: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    def where(self, expert: str) -> str:
        """How messages name ``expert``'s LoRA: the input it was picked in and its file."""
        named = self.inputs.get(expert, f"the {expert}-noise LoRA")
        return f"{named}: {self.files[expert]}" if expert in self.files else named


def check_pair_fits(pair: LoraPair | None, model: ModelConfig) -> None:
    """Refuse a pair made for another model than ``model``'s experts from their configs alone (the experts' file
    headers at most), before any weight loads."""
    for expert, tensors in (pair.tensors if pair is not None else {}).items():
        check_lora_fits(tensors, wan_weight_shapes(expert_arch(model, expert)), pair.where(expert))


def final_pair(cfg: JobConfig, run_dir: Path, step: int) -> LoraPair:
    """The run's final pair as saved, loaded: the EMA weights with ``advanced.ema`` (what a run hands on: the nodes'
    output and the ``models/loras`` copy), else the live ones."""
    namer = ema_lora_file_name if cfg.advanced.ema else lora_file_name
    files = {n: run_dir / namer(cfg.name, step, n) for n in cfg.multistage.stages}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise TrainerError(f"the final LoRA file {missing[0]} is missing - was it moved or deleted?")
    tensors = {n: load_file(str(p)) for n, p in files.items()}
    return LoraPair(cfg.lora, tensors, files, step, cfg.trigger_word)


def release_expert(model: nn.Module | None) -> None:
    """Return a borrowed expert to the bundle's state: adapters removed, no checkpointing, eval mode, CPU."""
    if model is None:
        return
    detach_lora(model)
    if model.is_gradient_checkpointing:
        model.disable_gradient_checkpointing()
    model.eval()
    model.to("cpu")


@contextlib.contextmanager
def lora_attached(model: nn.Module, pair: LoraPair | None, expert: str, strength: float = 1.0) -> Iterator[None]:
    """Attach ``pair``'s adapter for ``expert`` to ``model`` for the duration (nothing when the pair lacks it).

    What no adapter holds (ComfyUI's trainer's differences and outer LoRAs, :mod:`trainer_core.lora.patches`) is
    merged into the weights at ``strength``, the render's strength for this expert (the sampler scales the adapter
    itself), and taken out again on exit."""
    tensors = pair.tensors.get(expert) if pair is not None else None
    if tensors is None:
        yield
        return
    adapter, patches = split_patches(tensors)
    try:
        if adapter:
            with torch.inference_mode(False):
                attach_lora(model, pair.lora)
                load_lora_tensors(model, adapter, pair.lora, source=pair.where(expert))
        with merged_patches(model, patches, strength, pair.where(expert)):
            yield
    finally:
        detach_lora(model)


@contextlib.contextmanager
def placed(device: torch.device, *modules: nn.Module | None) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration, then back to the CPU (where the bundle keeps them)."""
    present = [m for m in modules if m is not None]
    try:
        for m in present:
            m.to(device)
        yield
    finally:
        for m in present:
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
