"""The ComfyUI nodes, called exactly as ComfyUI calls them, with fake ComfyUI modules and the tiny preset.

References: the core called directly with the equivalent JobConfig / SampleConfig (the nodes must be thin
adapters), ComfyUI's LoRA key-mapping rule, and float64 arithmetic for the loss smoothing.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import shutil
import sys
import weakref
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from pydantic_core import PydanticUndefined
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import comfy_fakes as F  # noqa: E402

import trainer_core.api  # noqa: E402
import trainer_core.bundle  # noqa: E402
import trainer_core.data  # noqa: E402
import trainer_core.sample  # noqa: E402
from tests.model_fixtures import (  # noqa: E402
    save_comfy_files,
    save_diffusers_folder,
    tiny_components,
)
from trainer_core.config import (  # noqa: E402
    DatasetConfig,
    JobConfig,
    ModelConfig,
    MultiStageConfig,
    QuantConfig,
    SampleConfig,
    job_from_dict,
)
from trainer_core.data import make_synthetic_dataset  # noqa: E402
from trainer_core.errors import ConfigError, DatasetError, LoraFileError  # noqa: E402
from trainer_core.keys import diffusers_state_dict_to_original  # noqa: E402
from trainer_core.lora import lora_state_dict_comfy  # noqa: E402
from trainer_core.models import load_components  # noqa: E402
from trainer_core.quant import (  # noqa: E402
    NF4Linear,
    quantize_expert,
    quantize_text_encoder,
    write_adapter_file,
)
from trainer_core.regularizers import ema_lora_file_name  # noqa: E402
from trainer_core.sample import (  # noqa: E402
    attach_lora_file,
    encode_sample_prompts,
    read_video_metadata,
    sample_videos,
)
from trainer_core.train.loop import run_training  # noqa: E402

DISPLAY_NAMES = {
    "Wan22LoadExperts": "Load Wan22 Experts",
    "Wan22QuantizeARA": "Quantize ARA",
    "Wan22BuildVideoDataset": "Build Video Dataset",
    "Wan22ConfigureMultiStage": "Configure MultiStage",
    "Wan22SaveCheckpoint": "Save Checkpoint",
    "Wan22TrainLoRA": "Train LoRA",
    "Wan22ConfigureOptimizer": "Configure Optimizer",
    "Wan22ConfigureRegularizers": "Configure Regularizers",
    "Wan22ConfigureHardware": "Configure Hardware",
    "Wan22ConfigureTrainingPreviews": "Configure Training Previews",
    "Wan22PreviewSample": "Preview Sample",
    "Wan22ApplyLoraPair": "Apply Wan22 LoRA Pair",
    "Wan22LoadLoraPair": "Load Wan22 LoRA Pair",
    "Wan22SplitStep": "Wan22 Split Step",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
#: Train LoRA's and its settings nodes' widgets for a fast CPU run (train_inputs puts each on its node).
TRAIN_FAST = {"steps": 4, "optimizer": "adamw", "compute_dtype": "fp32", "gradient_checkpointing": "off",
              "num_workers": 0}
#: Train LoRA's optional input of each settings node.
SETTINGS = {"optimizer_settings": "Wan22ConfigureOptimizer", "regularizers": "Wan22ConfigureRegularizers",
            "hardware": "Wan22ConfigureHardware"}
# Quantize ARA's defaults (nf4, float8 text encoder) with 4bit_ara, which its default auto picks on a GPU without fp8
# matmuls (on the CPU auto is none), and 2 calibration clips
QUANT_FAST = {"transformer": "4bit_ara", "calibration_samples": 2}


@pytest.fixture
def host(monkeypatch, tmp_path):
    return F.install(monkeypatch, tmp_path)


@pytest.fixture
def pack(host):
    return F.load_pack()


@pytest.fixture
def N(pack, monkeypatch):
    # Every test starts without loaded components (stores are shared by equal model settings within a process).
    monkeypatch.setattr(trainer_core.bundle, "_STORES", weakref.WeakValueDictionary())
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture
def clips(host):
    return make_synthetic_dataset(host.root / "input" / "clips", n_clips=4, num_frames=5, size=(32, 32), seed=0)


def widgets(node_cls, **overrides):
    """Default widget values (no links) with ``overrides``."""
    return {**F.defaults(node_cls), **overrides}


def experts(N, quant=None):
    """Load Wan22 Experts (tiny) -> [Quantize ARA with ``quant`` over its defaults]."""
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    if quant is not None:
        (bundle,) = F.call(N["Wan22QuantizeARA"], experts=bundle, **widgets(N["Wan22QuantizeARA"], **quant))
    return bundle


def train_inputs(N, **values):
    """Train LoRA's inputs for widget ``values``, each set on the node that has the widget: Train LoRA's own (its
    defaults where not given), a settings node's on that node (its other widgets at their defaults) linked to Train
    LoRA; a settings node none of whose widgets is given stays unconnected."""
    out = F.defaults(N["Wan22TrainLoRA"])
    for link, node_id in SETTINGS.items():
        cls = N[node_id]
        given = {k: values.pop(k) for k in list(values) if k in F.defaults(cls)}
        if given:
            (out[link],) = F.call(cls, **widgets(cls, **given))
    assert set(values) <= set(out), f"no widget {set(values) - set(out)} on Train LoRA or a settings node"
    return {**out, **values}


def graph(N, host, *, bundle=None, quant=None, dataset=None, multistage=None, save=None, previews=None, **train):
    """``bundle`` or experts(quant) -> Build Video Dataset -> [MultiStage, Save] -> Train LoRA; returns (bundle,
    outputs)."""
    bundle = bundle or experts(N, quant)
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(
        N["Wan22BuildVideoDataset"], folder="clips", num_frames=5, resolutions="32", **(dataset or {})))
    (ms,) = F.call(N["Wan22ConfigureMultiStage"], **widgets(N["Wan22ConfigureMultiStage"], switch_every=2,
                                                            **(multistage or {})))
    (sv,) = F.call(N["Wan22SaveCheckpoint"], **widgets(N["Wan22SaveCheckpoint"], **(save or {})))
    out = F.call(N["Wan22TrainLoRA"], experts=bundle, dataset=ds, multistage=ms, save=sv, previews=previews,
                 unique_id="5", **train_inputs(N, **{**TRAIN_FAST, **train}))
    return bundle, out


# ------------------------------------------------------------------------------------------------ contract


def test_pack_imports_as_comfyui_loads_it(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == DISPLAY_NAMES
    assert set(pack.NODE_CLASS_MAPPINGS) == set(DISPLAY_NAMES)
    assert all(k.startswith("Wan22") for k in pack.NODE_CLASS_MAPPINGS)
    # ComfyUI's own top-level `nodes` module (faked here) is left alone: the pack reaches its nodes relatively.
    assert not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS")


@pytest.mark.parametrize("node_id", sorted(DISPLAY_NAMES))
def test_node_contract(N, node_id):
    cls = N[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert cls.CATEGORY and cls.DESCRIPTION
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, (kind, *rest) in inputs.items():
        opts = rest[0] if rest else {}
        assert opts.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, (list, tuple)):
            assert opts.get("default", kind[0]) in kind, f"{node_id}.{name} default not among its choices"
        elif kind in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"], name
            assert isinstance(opts["default"], int if kind == "INT" else float), name
        elif kind in ("STRING", "BOOLEAN"):
            assert isinstance(opts["default"], str if kind == "STRING" else bool), name
    # The FUNCTION takes exactly the inputs: as parameters, or as keyword arguments the node declares in its FIELDS
    # (widget -> setting) and, for Train LoRA, LEGACY (its widgets from before the settings nodes, hidden inputs of
    # older prompts: test_a_prompt_written_for_the_older_train_lora_*).
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if n != "self" and p.kind != p.VAR_KEYWORD}
    keywords = set()
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        keywords = set(cls.FIELDS) | set(getattr(cls, "LEGACY", {}))
        assert not keywords & named, node_id
    assert named | keywords == set(inputs) | set(spec.get("hidden", {}))
    for name in {**spec.get("optional", {}), **spec.get("hidden", {})}.keys() - keywords:
        assert params[name].default is None, f"optional input {name} needs a default"


def test_training_seeds_do_not_randomize_after_each_queue(N):
    """ComfyUI's frontend adds a randomizing control to INT inputs named 'seed' unless told otherwise; on a training
    node that would retrain on every queue."""
    assert N["Wan22TrainLoRA"].INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is False
    assert N["Wan22ConfigureTrainingPreviews"].INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is False
    assert N["Wan22PreviewSample"].INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is True
    for cls in N.values():
        assert not hasattr(cls, "IS_CHANGED") or cls is N["Wan22BuildVideoDataset"]
        assert not getattr(cls, "NOT_IDEMPOTENT", False)


# ------------------------------------------------------------------------------ every widget changes something


def _job(N, host, clips, experts=None, quant=None, **train):
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny", **(experts or {})))
    if quant is not None:
        (bundle,) = F.call(N["Wan22QuantizeARA"], experts=bundle, **widgets(N["Wan22QuantizeARA"], **quant))
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips",
                                                          num_frames=5, resolutions="32"))
    (sv,) = F.call(N["Wan22SaveCheckpoint"], **F.defaults(N["Wan22SaveCheckpoint"]))
    w = train_inputs(N, **train)
    # the settings nodes' parts; their gpus launches torchrun instead of changing the job (tests: test_gpus_*)
    links = [w.pop(link) for link in SETTINGS if link in w]
    return mod.build_job(bundle, ds, w, save=sv, settings=links)


TRAIN_WIDGETS = [
    ("job_name", "my_char", "name", "my_char"),
    ("trigger_word", "sqz", "trigger_word", "sqz"),
    ("rank", 32, "lora.rank", 32),
    ("alpha", 8.0, "lora.alpha", 8.0),
    ("lora_dropout", 0.1, "lora.dropout", 0.1),
    ("target_modules", "self_attn.q, ffn.2", "lora.target_modules", ["self_attn.q", "ffn.2"]),
    ("steps", 3000, "train.steps", 3000),
    ("learning_rate", 5e-5, "optimizer.lr", 5e-5),
    ("optimizer", "adamw", "optimizer.name", "adamw"),
    ("lr_scheduler", "cosine", "optimizer.lr_scheduler", "cosine"),
    ("warmup_steps", 50, "optimizer.warmup_steps", 50),
    ("batch_size", 2, "train.batch_size", 2),
    ("gradient_accumulation", 4, "train.gradient_accumulation", 4),
    ("timestep_type", "sigmoid", "train.timestep_type", "sigmoid"),
    ("timestep_bias", "high_noise", "train.timestep_bias", "high_noise"),
    ("seed", 7, "train.seed", 7),
    ("resume", "latest", "resume", "latest"),
    ("gradient_checkpointing", "full", "train.gradient_checkpointing", "full"),
    ("gradient_checkpointing", "selective", "train.gradient_checkpointing", "selective"),
    ("gradient_checkpointing", "off", "train.gradient_checkpointing", "off"),
    ("compile", "on", "train.compile", "on"),
    ("compile", "off", "train.compile", "off"),
    ("timestep_shift", 3.0, "train.timestep_shift", 3.0),
    ("weight_decay", 0.0, "optimizer.weight_decay", 0.0),
    ("max_grad_norm", 0.0, "optimizer.max_grad_norm", 0.0),
    ("adam_beta1", 0.8, "optimizer.betas", (0.8, 0.999)),
    ("adam_beta2", 0.99, "optimizer.betas", (0.9, 0.99)),
    ("adam_eps", 1e-6, "optimizer.eps", 1e-6),
    ("compute_dtype", "fp16", "train.compute_dtype", "fp16"),
    ("device", "cpu", "train.device", "cpu"),
    ("num_workers", 0, "train.num_workers", 0),
    ("text_encoder_mode", "live", "text_encoder.mode", "live"),
    ("text_cache_dir", "/abs/te_cache", "text_encoder.cache_dir", "/abs/te_cache"),
    ("dop", True, "advanced.dop", True),
    ("dop_multiplier", 0.5, "advanced.dop_multiplier", 0.5),
    ("dop_class", "scene", "advanced.dop_class", "scene"),
    ("diff_guidance", True, "advanced.diff_guidance", True),
    ("diff_guidance_scale", 2.0, "advanced.diff_guidance_scale", 2.0),
    ("ema", True, "advanced.ema", True),
    ("ema_decay", 0.999, "advanced.ema_decay", 0.999),
    ("gpu_placement", "shard experts", "distributed.shard_experts", True),
]
#: Load Wan22 Experts' memory widgets -> JobConfig.memory.
MEMORY_WIDGETS = [
    ("low_vram", True, "memory.low_vram", True),
    ("offload_blocks", "auto", "memory.offload_blocks", "auto"),
    ("offload_blocks", " 20 ", "memory.offload_blocks", 20),
    ("prefetch", 2, "memory.prefetch", 2),
    ("headroom_gib", 4.0, "memory.headroom_gib", 4.0),
    ("check_vram", False, "memory.check_vram", False),
]
#: Quantize ARA's widgets -> JobConfig.quant, against the node's defaults ("adapter" / "adapter_path" need files).
QUANT_WIDGETS = [
    ("transformer", "float8", "quant.transformer", "float8"),
    ("quantizer", "uint4", "quant.quantizer", "uint4"),
    ("ara_rank", 32, "quant.ara_rank", 32),
    ("calibration_samples", 0, "quant.ara_calibration_samples", 0),
    ("text_encoder", "bf16", "quant.text_encoder", "bf16"),
    ("adapter_cache_dir", "/abs/ara", "quant.ara_cache_dir", "/abs/ara"),
    ("fp8_backward", False, "quant.fp8_backward", False),
]


def _get(cfg, path):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_train_widget_reaches_the_job_config(N, host, clips):
    base = _job(N, host, clips)
    spec = {k: v for node in ("Wan22TrainLoRA", *SETTINGS.values())
            for k, v in N[node].INPUT_TYPES()["required"].items()}
    # every widget of Train LoRA and its settings nodes but gpus (which launches torchrun instead of changing the
    # job: test_gpus_*)
    assert {w for w, *_ in TRAIN_WIDGETS} | {"gpus"} == {k for k, (t, *_) in spec.items() if isinstance(t, list) or
                                                       t in WIDGET_TYPES}
    for widget, value, path, expected in TRAIN_WIDGETS:
        placed = {"gpus": 2} if widget == "gpu_placement" else {}  # a placement needs several GPUs
        cfg = _job(N, host, clips, **{widget: value}, **placed)
        assert _get(cfg, path) == expected != _get(base, path), widget
    # the defaults are the core's defaults (alpha 0 = rank, empty trigger/resume = none)
    assert base.lora.effective_alpha == base.lora.rank and base.trigger_word is None and base.resume is None
    assert (base.advanced, base.text_encoder) == (type(base.advanced)(), type(base.text_encoder)())
    assert _job(N, host, clips, text_cache_dir="te").text_encoder.cache_dir == str(host.root / "output" / "te")


# ------------------------------------------------------------------------------------------ settings declared once

#: Widgets that start elsewhere than their setting's default, each for a reason given at the node.
UI_DEFAULTS = {
    ("Wan22TrainLoRA", "alpha"): 0.0,  # 0 = unset: the rank
    ("Wan22SaveCheckpoint", "output_dir"): "wan22_lora",
    ("Wan22QuantizeARA", "transformer"): "auto",
    ("Wan22QuantizeARA", "text_encoder"): "float8",
    ("Wan22QuantizeARA", "adapter_cache_dir"): "wan22_ara_cache",
    ("Wan22ConfigureTrainingPreviews", "sample_every"): 250,
}
#: What a section needs besides the setting under test to validate on its own.
_REQUIRED = {DatasetConfig: {"folder": "clips"}, SampleConfig: {"prompts": ["a prompt"]},
             ModelConfig: {"source": "tiny"}, JobConfig: {"model": {"source": "tiny"}}}


def _setting(path):
    """(config class, field name, index in a pair or None) of a setting path, read from the config's classes."""
    parts = path.split(".")
    index = int(parts.pop()) if parts[-1].isdigit() else None
    model = JobConfig
    if len(parts) == 2:
        annotation = JobConfig.model_fields[parts[0]].annotation
        model = get_args(annotation)[0] if get_args(annotation) else annotation  # datasets: each dataset's
    return model, parts[-1], index


def _accepts(path, value):
    """Whether the config takes ``value`` for the setting at ``path`` (the rest of its section at defaults)."""
    model, key, index = _setting(path)
    if index is not None:
        pair = list(model.model_fields[key].default)
        pair[index] = value
        value = tuple(pair)
    try:
        model.model_validate({**_REQUIRED.get(model, {}), key: value})
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("node_id", sorted(DISPLAY_NAMES))
def test_widgets_show_their_settings_as_the_config_declares_them(N, node_id):
    """Every widget that sets a config field shows that field's description, starts at its default (UI_DEFAULTS
    aside) and offers what the config takes: all of a combo's choices, and number ranges whose ends are the config's
    limits (an open end refused just past it by the config's own message), or, where the config has no upper limit,
    the widget's largest value; read here from the config's classes, not through the nodes' helper."""
    cls = N[node_id]
    spec = cls.INPUT_TYPES()["required"]
    for name, path in getattr(cls, "FIELDS", {}).items():
        kind, opts = spec[name]
        model, key, index = _setting(path)
        field = model.model_fields[key]
        assert field.description and opts["tooltip"].startswith(field.description), (node_id, name)
        default = field.get_default(call_default_factory=True)
        default = default[index] if index is not None else default
        default = "" if default in (None, PydanticUndefined) else default
        default = ", ".join(map(str, default)) if isinstance(default, list) else default
        expected = UI_DEFAULTS.get((node_id, name), str(default) if kind == "STRING" else default)
        assert opts["default"] == expected, (node_id, name)
        if isinstance(kind, list):
            assert all(_accepts(path, choice) for choice in kind) and not _accepts(path, "no such choice"), name
        elif kind in ("INT", "FLOAT"):
            tiny = 1 if kind == "INT" else 1e-9
            lo, hi = opts["min"], opts["max"]
            unbounded = "widget_max" in (field.json_schema_extra or {})
            assert _accepts(path, lo) or _accepts(path, lo + tiny), (node_id, name)
            assert _accepts(path, hi) or _accepts(path, hi - tiny), (node_id, name)
            assert not _accepts(path, lo - tiny) and _accepts(path, hi + tiny) == unbounded, (node_id, name)


# ------------------------------------------------------------------------ workflows from before the settings nodes

#: Train LoRA as example workflow 3 saved it before the settings nodes: widget names in order, and the node.
OLD_TRAIN = json.loads((Path(__file__).parent / "data" / "train_lora_before_settings_nodes.json").read_text())


def test_a_ui_workflow_from_before_the_settings_nodes_keeps_its_training_settings_and_says_what_to_do(N):
    """ComfyUI's frontend hands a saved node's widgets_values to its widgets by position and drops the rest
    (LGraphNode.configure). Train LoRA kept its first widgets in their order, so an older workflow keeps them; the
    value that lands in text_encoder_mode (the old gradient_checkpointing's) makes the node say, when queued, what
    happened and what to do."""
    cls = N["Wan22TrainLoRA"]
    old = dict(zip(OLD_TRAIN["widget_names"], OLD_TRAIN["node"]["widgets_values"]))
    names = [n for n, (t, *_) in cls.INPUT_TYPES()["required"].items() if isinstance(t, list) or t in WIDGET_TYPES]
    loaded = dict(zip(names, OLD_TRAIN["node"]["widgets_values"]))  # as the frontend sets them
    assert {n for n in names if loaded[n] == old[n]} == set(names) - {"text_encoder_mode"}
    message = cls.VALIDATE_INPUTS(text_encoder_mode=loaded["text_encoder_mode"])
    assert "saved before" in message and "Set text_encoder_mode again" in message
    assert all(node in message for node in ("Configure Optimizer", "Configure Regularizers", "Configure Hardware"))
    assert cls.VALIDATE_INPUTS(text_encoder_mode=old["text_encoder_mode"]) is True
    assert "is not one of cache, unload, live" in cls.VALIDATE_INPUTS(text_encoder_mode="keep")


def test_a_prompt_written_for_the_older_train_lora_gives_the_job_it_gave(N, host, clips, monkeypatch, caplog):
    """An API-format prompt names its inputs: the older node's advanced widgets reach Train LoRA as hidden inputs
    (ComfyUI validates only required and optional inputs and passes hidden ones through: execution.py) and make the
    job the settings nodes make with those values, with a note; given both ways, they are refused."""
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    jobs = []

    def stop(cfg, gpus, save):  # the job as Train LoRA built it, before anything loads
        jobs.append((cfg, gpus))
        raise InterruptedError

    monkeypatch.setattr(mod, "_preflight", stop)
    old = dict(zip(OLD_TRAIN["widget_names"], OLD_TRAIN["node"]["widgets_values"]))
    bundle = experts(N)
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips", num_frames=5,
                                                          resolutions="32"))
    with caplog.at_level(logging.WARNING), pytest.raises(InterruptedError):
        F.call(N["Wan22TrainLoRA"], experts=bundle, dataset=ds, **old)
    with pytest.raises(InterruptedError):
        F.call(N["Wan22TrainLoRA"], experts=bundle, dataset=ds, **train_inputs(N, **old))
    (as_before, gpus), (through_nodes, node_gpus) = jobs
    assert as_before == through_nodes and gpus == node_gpus == old["gpus"]
    assert (as_before.advanced.dop, as_before.advanced.dop_class, as_before.advanced.ema,
            as_before.advanced.ema_decay) == (True, "scene", True, 0.999)  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if "before the settings nodes" in r.getMessage()]
    assert len(notes) == 1 and "dop, " in notes[0]
    (regularizers,) = F.call(N["Wan22ConfigureRegularizers"], **widgets(N["Wan22ConfigureRegularizers"]))
    with pytest.raises(ConfigError, match="come both as Train LoRA inputs of an older prompt and from Configure "
                                          "Regularizers"):
        F.call(N["Wan22TrainLoRA"], experts=bundle, dataset=ds, regularizers=regularizers, **old)


def _adapter_file(path, quantizer="nf4"):
    """An adapter file as this trainer writes them (its quantizer in the metadata); one layer is enough for the
    header check Quantize ARA makes."""
    down, up = torch.zeros(16, 256), torch.zeros(256, 16)
    meta = {"ara_quantizer": quantizer} if quantizer else {}
    return write_adapter_file(Path(path), {"blocks.0.attn1.to_q": (down, up)}, meta)


def test_memory_and_quantization_widgets_reach_the_job_config(N, host, clips):
    model_widgets = {"source", "high_noise_model", "low_noise_model", "text_encoder", "vae", "folder_or_repo", "dtype",
                     "text_encoder_dtype", "vae_dtype"}  # ModelConfig's, tested below
    assert {w for w, *_ in MEMORY_WIDGETS} == set(N["Wan22LoadExperts"].INPUT_TYPES()["required"]) - model_widgets
    base = _job(N, host, clips)
    assert base.memory == type(base.memory)() and base.quant == QuantConfig()  # no Quantize ARA: nothing quantized
    for widget, value, path, expected in MEMORY_WIDGETS:
        cfg = _job(N, host, clips, experts={widget: value})
        assert _get(cfg, path) == expected != _get(base, path), widget

    q_spec = N["Wan22QuantizeARA"].INPUT_TYPES()["required"]
    assert {w for w, *_ in QUANT_WIDGETS} | {"experts", "adapter", "adapter_path"} == set(q_spec)
    q_base = _job(N, host, clips, quant={})
    assert q_base.quant == QuantConfig(  # the node's defaults; computed adapters kept where no loader lists them
        transformer="auto", text_encoder="float8", ara_cache_dir=str(host.root / "models" / "wan22_ara_cache"))
    for widget, value, path, expected in QUANT_WIDGETS:
        cfg = _job(N, host, clips, quant={widget: value})
        assert _get(cfg, path) == expected != _get(q_base, path), widget
    with pytest.raises(ConfigError, match="adapter_cache_dir is empty"):
        _job(N, host, clips, quant={"adapter_cache_dir": " "})
    # adapter source: 'compute', a file from models/loras (listed by the node), or an absolute path
    listed = _adapter_file(host.folder("loras") / "wan22" / "ara_nf4.safetensors")
    assert N["Wan22QuantizeARA"].INPUT_TYPES()["required"]["adapter"][0] == ["compute", "wan22/ara_nf4.safetensors"]
    cfg = _job(N, host, clips, quant={"adapter": "wan22/ara_nf4.safetensors", "transformer": "4bit_ara"})
    assert cfg.quant.ara_source == str(listed) != q_base.quant.ara_source
    elsewhere = _adapter_file(host.root / "elsewhere" / "mine.safetensors")
    cfg = _job(N, host, clips, quant={"adapter": "wan22/ara_nf4.safetensors", "adapter_path": str(elsewhere),
                                      "transformer": "4bit_ara"})
    assert cfg.quant.ara_source == str(elsewhere)


def test_quantize_node_refuses_what_cannot_work(N, host):
    q = N["Wan22QuantizeARA"]
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    _adapter_file(host.folder("loras") / "ara_nf4.safetensors")
    _adapter_file(host.folder("loras") / "wan22_14b_t2i_torchao_uint4.safetensors", quantizer=None)
    with pytest.raises(ConfigError, match="absolute path"):
        F.call(q, experts=bundle, **widgets(q, transformer="4bit_ara", adapter_path="relative/ara.safetensors"))
    with pytest.raises(LoraFileError, match="does not exist"):
        F.call(q, experts=bundle, **widgets(q, transformer="4bit_ara",
                                            adapter_path=str(host.root / "missing.safetensors")))
    for transformer in ("float8", "auto"):  # auto may become float8: an adapter file needs 4bit_ara named
        with pytest.raises(ConfigError, match="only apply to transformer: 4bit_ara"):
            F.call(q, experts=bundle, **widgets(q, transformer=transformer, adapter="ara_nf4.safetensors"))
    with pytest.raises(ConfigError, match="adapter: .* - set quantizer: uint4"):  # ai-toolkit's adapters pair with uint4
        F.call(q, experts=bundle, **widgets(q, transformer="4bit_ara",
                                            adapter="wan22_14b_t2i_torchao_uint4.safetensors"))
    (ok,) = F.call(q, experts=bundle, **widgets(q, transformer="4bit_ara", quantizer="uint4",
                                                adapter="wan22_14b_t2i_torchao_uint4.safetensors"))
    assert ok.quant.ara_source.endswith("torchao_uint4.safetensors") and bundle.quant.transformer == "none"
    assert ok.store is bundle.store and ok.model == bundle.model  # same components, other settings


def test_memory_settings_reuse_the_loaded_components(N):
    ex = N["Wan22LoadExperts"]
    (a,) = F.call(ex, **widgets(ex, source="tiny"))
    high = a.components(low=False, vae=False, text_encoder=False).high
    # Re-running the loader with other memory settings (ComfyUI re-executes it) loads nothing again.
    (b,) = F.call(ex, **widgets(ex, source="tiny", low_vram=True, offload_blocks="auto"))
    assert b.store is a.store and b.components(low=False, vae=False, text_encoder=False).high is high
    (c,) = F.call(ex, **widgets(ex, source="tiny", dtype="fp32"))
    assert c.store is not a.store and c.loaded.high is None
    with pytest.raises(ConfigError, match="offload_blocks 'ten'"):
        F.call(ex, **widgets(ex, source="tiny", offload_blocks="ten"))
    with pytest.raises(ConfigError, match="offload_blocks"):
        F.call(ex, **widgets(ex, source="tiny", offload_blocks="-2"))



def test_source_tiny_accepts_file_names_this_installation_lacks(N, host):
    """A workflow saved with Wan file names, run where those files are missing, with source switched to tiny: ComfyUI
    checks combo values against their lists ("Value not in list") except for the inputs VALIDATE_INPUTS takes
    (execution.py, validate_inputs), so the node checks its file combos itself and ignores them for tiny."""
    ex = N["Wan22LoadExperts"]
    combos = {"high_noise_model": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
              "low_noise_model": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
              "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae": "wan_2.1_vae.safetensors"}  # fmt: skip
    assert set(combos) | {"source"} <= set(inspect.getfullargspec(ex.VALIDATE_INPUTS).args)
    assert ex.VALIDATE_INPUTS(source="tiny", **combos) is True
    (bundle,) = F.call(ex, **widgets(ex, source="tiny", **combos))
    assert bundle.model.source == "tiny" and bundle.model.high_noise is None and bundle.model.vae is None
    # other sources: each file must be listed (or 'none'), named with what to do
    message = ex.VALIDATE_INPUTS(source="comfy files", **combos)
    assert "high_noise_model 'wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors' is not in ComfyUI's " \
           "models/diffusion_models" in message
    (host.folder("diffusion_models") / combos["high_noise_model"]).write_bytes(b"")
    listed = {**combos, "low_noise_model": "none", "text_encoder": "none", "vae": "none"}
    assert ex.VALIDATE_INPUTS(source="comfy files", **listed) is True
    assert "is not one of" in ex.VALIDATE_INPUTS(source="toy", **listed)


def test_settings_that_cannot_work_fail_before_any_weight_loads(N, host, clips):
    cases = [({"dop": True}, r"dop \(Configure Regularizers\) needs trigger_word"),  # the widget, not advanced.dop
             ({"text_encoder_mode": "unload"}, "trigger_word is not set")]
    if not torch.cuda.is_available():
        cases.append(({"device": "cuda"}, "no CUDA GPU is visible"))
    bundle = experts(N)
    for train, message in cases:
        with pytest.raises(ConfigError, match=message):
            graph(N, host, bundle=bundle, **{**TRAIN_FAST, **train})
    assert all(getattr(bundle.loaded, p) is None for p in ("high", "low", "vae", "text_encoder"))
    # an adapter file that vanished after Quantize ARA checked it
    path = _adapter_file(host.folder("loras") / "ara_nf4.safetensors")
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    (bundle,) = F.call(N["Wan22QuantizeARA"], experts=bundle, **widgets(N["Wan22QuantizeARA"], adapter=path.name,
                                                                           transformer="4bit_ara"))
    path.unlink()
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips", num_frames=5,
                                                          resolutions="32"))
    with pytest.raises(LoraFileError, match="does not exist"):
        F.call(N["Wan22TrainLoRA"], experts=bundle, dataset=ds, **train_inputs(N, **TRAIN_FAST))
    assert all(getattr(bundle.loaded, p) is None for p in ("high", "low", "vae", "text_encoder"))


def test_errors_name_the_widget_and_its_node_not_the_job_file_setting(N):
    messages = sys.modules[N["Wan22TrainLoRA"].__module__.rsplit(".", 1)[0] + ".messages"]
    labels = messages.widget_labels({"Load Wan22 Experts": ("", {"vae": "model.vae", "source": "model.source",
                                                                  "offload_blocks": "memory.offload_blocks"}),
                                     "Build Video Dataset": ("", {"prepend_trigger": "datasets.prepend_trigger"}),
                                     "Train LoRA": ("", {"job_name": "name", "steps": "train.steps"})})
    say = messages.in_widget_terms
    assert say("no VAE given: set model.vae to a ComfyUI file, or model.source to 'tiny'", labels, "Train LoRA") == (
        "no VAE given: set vae (Load Wan22 Experts) to a ComfyUI file, or source (Load Wan22 Experts) to 'tiny'")
    assert say("Train LoRA: 'name': name '' must not be empty (got '')", labels, "Train LoRA") == (
        "Train LoRA: 'job_name': name '' must not be empty (got '')")
    assert say("datasets[1].prepend_trigger needs trigger_word", labels, "Train LoRA") == (
        "prepend_trigger (Build Video Dataset #2) needs trigger_word")
    assert say("memory.offload_blocks is 99", labels, "Load Wan22 Experts") == "offload_blocks is 99"
    # file paths, unknown settings and plain words stay as they are
    untouched = "read /data/model.vae/x.safetensors; lora.rank 4; the name of train.stepsize"
    assert say(untouched, labels, "Train LoRA") == untouched


def test_dataset_multistage_save_and_expert_widgets_reach_the_core(N, host, clips, monkeypatch):
    ds_cls, ms_cls, sv_cls, ex_cls = (N[k] for k in (
        "Wan22BuildVideoDataset", "Wan22ConfigureMultiStage", "Wan22SaveCheckpoint", "Wan22LoadExperts"))
    changes = {
        "caption_ext": "caption", "default_caption": "a clip", "num_frames": 1, "frame_sampling": "fps",
        "fps": 24.0, "window_start": "start", "short_clip": "skip", "weight": 2.0, "repeats": 3,
        "caption_dropout": 0.0, "prepend_trigger": True, "flip_x": True, "flip_y": True, "is_regularization": True,
        "cache_latents": True, "strict": True, "validation": True, "validation_split": 0.2,
    }
    base_ds = widgets(ds_cls, folder="clips", num_frames=5, resolutions="32")
    assert set(changes) | {"folder", "resolutions"} == set(base_ds)
    # Scanning is the core's (tested there); here only the DatasetConfig handed to it matters (the node imports it
    # when it runs).
    scanned = []
    monkeypatch.setattr(trainer_core.data, "build_dataset", lambda cfgs, trig, seed: scanned.append(
        cfgs) or type("Report", (), {"report": lambda self: "ok"})())
    (base,), report = F.call(ds_cls, **base_ds)
    assert report == "ok" and scanned[-1] == [base]
    for k, v in changes.items():
        (cfg,), _ = F.call(ds_cls, **{**base_ds, k: v})
        assert getattr(cfg, k) == v != getattr(base, k), k
    (cfg,), _ = F.call(ds_cls, **{**base_ds, "resolutions": "32, 48"})
    assert cfg.resolutions == [32, 48] and base.resolutions == [32]
    assert base.folder == str(host.root / "input" / "clips")

    (base_ms,) = F.call(ms_cls, **widgets(ms_cls))
    for k, v in {"train_high_noise": False, "train_low_noise": False, "switch_every": 1, "boundary": 0.9}.items():
        (cfg,) = F.call(ms_cls, **{**widgets(ms_cls), k: v})
        assert getattr(cfg, k) == v != getattr(base_ms, k), k

    (base_sv,) = F.call(sv_cls, **widgets(sv_cls))
    assert base_sv.config.output_dir == str(host.root / "output" / "wan22_lora")
    for k, v in {"save_every": 500, "keep_last": 6, "dtype": "fp16", "save_training_state": False}.items():
        (s,) = F.call(sv_cls, **{**widgets(sv_cls), k: v})
        assert getattr(s.config, k) == v != getattr(base_sv.config, k), k
    (s,) = F.call(sv_cls, **{**widgets(sv_cls), "output_dir": "/abs/runs"})
    assert s.config.output_dir == "/abs/runs"
    (s,) = F.call(sv_cls, **{**widgets(sv_cls), "copy_to_loras": False, "lora_name": "wan22/my_style"})
    assert (s.copy_to_loras, s.lora_name, base_sv.copy_to_loras, base_sv.lora_name) == (False, "wan22/my_style", True, "")
    with pytest.raises(ConfigError, match="lora_name"):
        F.call(sv_cls, **{**widgets(sv_cls), "lora_name": "../escape"})
    for path in ("/tmp/x", "C:/loras/x"):  # a name, not a path: never silently moved under models/loras
        with pytest.raises(ConfigError, match="is a name inside models/loras, not a path"):
            F.call(sv_cls, **{**widgets(sv_cls), "lora_name": path})
    # a relative output folder stays inside ComfyUI's output folder, as ComfyUI's own save nodes do
    with pytest.raises(ConfigError, match="output_dir '../escaped' leads out of ComfyUI's output folder"):
        F.call(sv_cls, **{**widgets(sv_cls), "output_dir": "../escaped"})
    (inside,) = F.call(sv_cls, **{**widgets(sv_cls), "output_dir": "runs/../wan22"})
    assert inside.config.output_dir == str(host.root / "output" / "runs/../wan22")

    for name in ("a.safetensors", "b.safetensors"):
        for kind in ("diffusion_models", "text_encoders", "vae"):
            (host.folder(kind) / name).write_bytes(b"")
    ex = widgets(ex_cls, source="comfy files", high_noise_model="a.safetensors")
    (base_ex,) = F.call(ex_cls, **ex)
    assert base_ex.model.high_noise == str(host.folder("diffusion_models") / "a.safetensors")
    assert base_ex.model.source is None and base_ex.model.low_noise is None
    for k, field, v in [("low_noise_model", "low_noise", "b.safetensors"), ("text_encoder", "text_encoder", "b.safetensors"),
                        ("vae", "vae", "b.safetensors"), ("dtype", "dtype", "fp16"),
                        ("text_encoder_dtype", "text_encoder_dtype", "fp32"), ("vae_dtype", "vae_dtype", "bf16")]:
        (b,) = F.call(ex_cls, **{**ex, k: v})
        assert getattr(b.model, field) not in (None, getattr(base_ex.model, field)), k
    (b,) = F.call(ex_cls, **{**ex, "source": "HF repo id", "folder_or_repo": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"})
    assert b.model.source == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    (host.folder("diffusers") / "wan22").mkdir()
    (b,) = F.call(ex_cls, **{**ex, "source": "diffusers folder", "folder_or_repo": "wan22"})
    assert b.model.source == str(host.folder("diffusers") / "wan22")
    with pytest.raises(ConfigError, match="does not exist"):
        F.call(ex_cls, **{**ex, "source": "diffusers folder", "folder_or_repo": "missing"})
    with pytest.raises(ConfigError, match="repo id"):
        F.call(ex_cls, **{**ex, "source": "HF repo id", "folder_or_repo": "not a repo"})
    with pytest.raises(ConfigError, match="no model given"):
        F.call(ex_cls, **widgets(ex_cls, source="comfy files"))


def test_comfy_files_and_diffusers_folder_load_the_same_weights_as_the_core(N, host):
    ref = tiny_components()
    files = save_comfy_files(ref, host.folder("diffusion_models"), dtype=torch.float32)
    shutil.move(files["text_encoder"], host.folder("text_encoders"))
    shutil.move(files["vae"], host.folder("vae"))
    ex_cls = N["Wan22LoadExperts"]
    (bundle,) = F.call(ex_cls, **widgets(
        ex_cls, source="comfy files", high_noise_model=files["high"].name, low_noise_model=files["low"].name,
        text_encoder=files["text_encoder"].name, vae=files["vae"].name, dtype="fp32", text_encoder_dtype="fp32"))
    comps = bundle.components()
    for mine, theirs in ((comps.high, ref.high), (comps.low, ref.low), (comps.vae, ref.vae),
                         (comps.text_encoder, ref.text_encoder)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not any(p.is_inference() for p in mine.parameters())  # loaded trainable despite inference mode
    save_diffusers_folder(ref, host.folder("diffusers") / "tiny_wan")
    (bundle,) = F.call(ex_cls, **widgets(ex_cls, source="diffusers folder", folder_or_repo="tiny_wan", dtype="fp32"))
    high = bundle.components(low=False, vae=False, text_encoder=False).high
    assert all(torch.equal(high.state_dict()[k], v) for k, v in ref.high.state_dict().items())
    assert bundle.loaded.low is None  # only what was asked for is loaded


def test_dataset_chain_report_and_folder_digest(N, host, clips):
    ds_cls = N["Wan22BuildVideoDataset"]
    other = make_synthetic_dataset(host.root / "elsewhere", n_clips=2, num_frames=5, size=(32, 32), seed=1)
    first, _ = F.call(ds_cls, **widgets(ds_cls, folder="clips", num_frames=5, resolutions="32"))
    chain, report = F.call(ds_cls, **widgets(ds_cls, folder=str(other), num_frames=5, resolutions="32",
                                              weight=2.0), dataset=first)
    assert [c.folder for c in chain] == [str(clips), str(other)] and chain[1].weight == 2.0
    assert report.startswith("2 dataset(s), 6 item(s)")
    with pytest.raises(DatasetError, match="does not exist"):
        F.call(ds_cls, **widgets(ds_cls, folder="nope"))
    with pytest.raises(ConfigError, match="resolutions"):
        F.call(ds_cls, **widgets(ds_cls, folder="clips", resolutions="512px"))
    before = ds_cls.IS_CHANGED(folder="clips")
    assert ds_cls.IS_CHANGED(folder="clips") == before
    shutil.copy(clips / "clip000.mp4", clips / "clip009.mp4")
    assert ds_cls.IS_CHANGED(folder="clips") != before


# ------------------------------------------------------------------------------------------------ training


def test_train_node_equals_the_core_run_and_publishes_the_pair(N, host, clips):
    bundle, (pair, curve, run_dir) = graph(N, host, trigger_word="sqz", save={"lora_name": "wan22/char"})
    # Reference: the core's own run with the same settings, written elsewhere.
    ref_cfg = job_from_dict({
        "name": "wan22_lora", "trigger_word": "sqz", "model": {"source": "tiny"},
        "multistage": {"switch_every": 2}, "optimizer": {"name": "adamw"},
        "train": {"steps": 4, "compute_dtype": "fp32", "gradient_checkpointing": "off"},
        "save": {"output_dir": str(host.root / "ref")},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32]}],
    })
    ref = run_training(ref_cfg, progress_bar=False)
    assert Path(run_dir) == host.root / "output" / "wan22_lora" / "wan22_lora"
    for expert in ("high", "low"):
        theirs = load_file(str(ref.lora_files[expert]))
        mine_file = load_file(str(pair.files[expert]))
        copy = load_file(str(host.folder("loras") / "wan22" / f"char_{expert}_noise.safetensors"))
        assert theirs.keys() == mine_file.keys() == pair.tensors[expert].keys() == copy.keys()
        for k in theirs:
            assert torch.equal(theirs[k], pair.tensors[expert][k]) and torch.equal(theirs[k], copy[k])
    assert pair.step == 4 and pair.trigger_word == "sqz" and pair.lora == ref_cfg.lora
    # loss curve: ComfyUI IMAGE of the run's losses
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.dtype == torch.float32
    assert 0.0 <= curve.min() and curve.max() <= 1.0
    # live progress: one update per step, each with a JPEG preview; node text per step; ComfyUI unloaded first
    assert [(v, t) for v, t, _ in host.progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(p[0] == "JPEG" and isinstance(p[1], Image.Image) for _, _, p in host.progress)
    steps_text = [t for node, t in host.texts if node == "5" and t.startswith("step ")]
    assert len(steps_text) == 4 and "expert" in steps_text[0] and "s/step" in steps_text[0]
    assert host.unloads == 1
    # the shared bundle is handed back clean: no adapter, eval mode, CPU, base weights untouched
    base = load_components(ModelConfig(source="tiny"), vae=False, text_encoder=False)
    for name in ("high", "low"):
        model = getattr(bundle.loaded, name)
        assert not getattr(model, "peft_config", None) and not model.training
        assert not model.is_gradient_checkpointing
        assert all(torch.equal(v, getattr(base, name).state_dict()[k]) for k, v in model.state_dict().items())
    assert bundle.loaded.text_encoder is None  # freed by training, reloaded on demand


def test_second_run_on_the_same_bundle_and_single_expert(N, host, clips):
    bundle, (pair, _, _) = graph(N, host, steps=2)
    (ms,) = F.call(N["Wan22ConfigureMultiStage"], **widgets(N["Wan22ConfigureMultiStage"], train_high_noise=False))
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips",
                                                          num_frames=5, resolutions="32"))
    pair2, _, run_dir = F.call(N["Wan22TrainLoRA"], experts=bundle, dataset=ds, multistage=ms,
                               **train_inputs(N, **{**TRAIN_FAST, "steps": 2, "job_name": "low_only"}))
    assert set(pair2.tensors) == set(pair2.files) == {"low"}
    assert Path(run_dir).name == "low_only"  # default save settings: <ComfyUI output>/wan22_lora/<job>
    assert sorted(p.name for p in host.folder("loras").iterdir()) == [
        "low_only_low_noise.safetensors", "wan22_lora_high_noise.safetensors", "wan22_lora_low_noise.safetensors"]



def _low_vram_run_log(N, host, caplog) -> list[str]:
    """The log lines of a Low VRAM run of 6 steps switching every 2: high, low, high (three copies in, the first
    into an empty device: both experts wait in host memory once they are set up)."""
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny", low_vram=True))
    with caplog.at_level(logging.INFO):
        graph(N, host, bundle=bundle, steps=6)
    return [r.getMessage() for r in caplog.records]


def test_a_run_logs_each_expert_switch_once(N, host, clips, caplog):
    switches = [m for m in _low_vram_run_log(N, host, caplog) if m.startswith("switched to the")]
    assert [m.split(":")[0].split()[-2] for m in switches] == ["high-noise", "low-noise", "high-noise"]


def test_a_run_logs_the_vram_plan_once(N, host, clips, caplog):
    plans = [m for m in _low_vram_run_log(N, host, caplog) if m.startswith("VRAM plan:")]
    assert len(plans) == 1


def test_train_lora_follows_comfyuis_cpu_device(N, host, clips, monkeypatch):
    """``device: auto`` trains on the CPU when ComfyUI computes there (``--cpu``), even with a GPU present."""
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    jobs = []

    def stop(cfg, gpus, save):
        jobs.append(cfg)
        raise InterruptedError

    monkeypatch.setattr(mod, "_preflight", stop)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips", num_frames=5,
                                                          resolutions="32"))
    for comfy_device, expected in (("cpu", "cpu"), ("cuda:0", "auto")):
        monkeypatch.setattr(sys.modules[mod.__name__.rsplit(".", 1)[0] + ".host"], "compute_device",
                            lambda d=comfy_device: torch.device(d))
        with pytest.raises(InterruptedError):
            F.call(N["Wan22TrainLoRA"], experts=experts(N), dataset=ds, **train_inputs(N))
        assert jobs[-1].train.device == expected


def test_train_lora_shows_the_plan_and_host_memory_before_training(N, host, clips):
    # what `python -m trainer_core check` prints, on the node before its first step
    graph(N, host)
    texts = [t for _, t in host.texts]
    shown = next(i for i, t in enumerate(texts) if t.startswith("VRAM plan:"))
    assert "host RAM: about" in texts[shown] and "no GPU to compare with" in texts[shown]
    first_step = next(i for i, t in enumerate(texts) if t.startswith("step "))
    assert shown < first_step


def test_train_lora_shows_a_host_ram_warning_beside_the_plan(N, host, clips, monkeypatch):
    from trainer_core.memory import planner

    monkeypatch.setattr(planner, "physical_memory", lambda: 1 << 20)  # a machine with 1 MiB of RAM
    graph(N, host)
    texts = [t for _, t in host.texts]
    shown = next(t for t in texts if t.startswith("VRAM plan:"))
    assert re.search(r"\nwarning: the job needs about \S+ GiB of host RAM \(.+\) but this machine has 0\.0 GiB - "
                     r"expect swapping or an out-of-memory kill$", shown)


def test_an_unchanged_job_returns_its_finished_run_and_a_changed_one_trains_anew(N, host, clips, monkeypatch):
    _, (first, curve, run_dir) = graph(N, host)
    assert Path(run_dir).name == "wan22_lora"
    copies = {p: p.read_bytes() for p in host.folder("loras").iterdir()}
    originals = {p: p.read_bytes() for p in first.files.values()}
    real = trainer_core.api.run_training
    monkeypatch.setattr(trainer_core.api, "run_training",
                        lambda *a, **k: pytest.fail("an unchanged job was trained again"))
    # ComfyUI's cache is gone (another graph ran, or the server restarted): a new bundle, the same job
    host.texts.clear()
    _, (again, curve_again, run_again) = graph(N, host, bundle=experts(N), resume="latest")
    assert run_again == run_dir and again.files == first.files and again.step == 4
    assert all(torch.equal(v, first.tensors[n][k]) for n in first.tensors for k, v in again.tensors[n].items())
    assert torch.equal(curve_again, curve)  # the loss curve from the run's losses.csv
    assert any(t.startswith("unchanged since") for _, t in host.texts)
    assert (host.folder("loras") / "wan22_lora_high_noise.safetensors").is_file()
    # what only says how to save or where to compute is not a change of the job
    _, (same, _, run_same) = graph(N, host, save={"keep_last": 1, "save_every": 1}, gradient_checkpointing="full")
    assert run_same == run_dir and same.files == first.files

    monkeypatch.setattr(trainer_core.api, "run_training", real)
    _, (_, _, other_lr) = graph(N, host, learning_rate=2e-4)  # a changed setting trains, in a folder of its own
    assert Path(other_lr).name == "wan22_lora_run2"
    replacement = make_synthetic_dataset(host.root / "other", n_clips=4, num_frames=5, size=(32, 32), seed=9)
    first_clip = sorted(p for p in clips.iterdir() if p.suffix == ".mp4")[0]
    first_clip.write_bytes((replacement / first_clip.name).read_bytes())  # same name, other pixels
    _, (_, _, other_clip) = graph(N, host)
    assert Path(other_clip).name == "wan22_lora_run3"
    # the first run's files and its models/loras copies are untouched; later runs' copies are named by their folders
    assert {p: p.read_bytes() for p in originals} == originals and {p: p.read_bytes() for p in copies} == copies
    assert (host.folder("loras") / "wan22_lora_run3_low_noise.safetensors").is_file()


def test_models_loras_copies_never_replace_another_runs_or_a_foreign_file(N, host, clips):
    loras = host.folder("loras")
    graph(N, host, save={"output_dir": "a"})
    first = {p.name: p.read_bytes() for p in loras.iterdir()}
    # the same job name in another output folder gets the same run folder name: its copy moves on to _2
    _, (second, _, run_b) = graph(N, host, save={"output_dir": "b"}, learning_rate=2e-4)
    assert Path(run_b).name == "wan22_lora"
    assert {p.name: p.read_bytes() for p in loras.iterdir() if p.name in first} == first
    assert (loras / "wan22_lora_2_low_noise.safetensors").read_bytes() == second.files["low"].read_bytes()
    assert any("models/loras: wan22_lora_2_high_noise" in t and "another run" in t for _, t in host.texts)
    # a fixed lora_name replaces this trainer's earlier copy (that run keeps its pair in its own folder) ...
    graph(N, host, save={"output_dir": "c", "lora_name": "mine"})
    _, (newer, _, _) = graph(N, host, save={"output_dir": "c", "lora_name": "mine"}, learning_rate=3e-4)
    assert (loras / "mine_high_noise.safetensors").read_bytes() == newer.files["high"].read_bytes()
    # ... but a file from elsewhere with that name refuses the job before any weight loads
    (loras / "theirs_high_noise.safetensors").write_bytes(b"someone else's LoRA")
    bundle = experts(N)
    with pytest.raises(ConfigError, match="lora_name: .*theirs_high_noise.safetensors exists and was not written"):
        graph(N, host, bundle=bundle, save={"output_dir": "c", "lora_name": "theirs"}, learning_rate=4e-4)
    assert all(getattr(bundle.loaded, p) is None for p in ("high", "low", "vae", "text_encoder"))
    assert (loras / "theirs_high_noise.safetensors").read_bytes() == b"someone else's LoRA"


def test_a_resume_the_state_cannot_continue_is_refused_before_any_weight_loads(N, host, clips):
    graph(N, host)
    bundle = experts(N)
    with pytest.raises(ConfigError, match="resume: .* cannot continue with these settings: rank was 16 in the state, now 8"):
        graph(N, host, bundle=bundle, resume="latest", steps=6, rank=8)
    assert all(getattr(bundle.loaded, p) is None for p in ("high", "low", "vae", "text_encoder"))


def test_train_node_loads_each_expert_just_before_quantizing_it(N, host, clips, monkeypatch):
    """As headless: the bundle lends no unloaded expert; the run loads the low-noise expert only once the
    high-noise one is quantized (one unquantized 14B expert in host memory at a time, not both: 67.8 GiB in
    ComfyUI on an H100 before), and the bundle keeps both afterwards for Preview Sample."""
    import trainer_core.train.loop as loop_module
    from trainer_core.bundle import has_quantized_layers

    real, seen = loop_module.load_expert, []

    def spy(cfg, part, components, device="cpu"):
        seen.append((part, {n: has_quantized_layers(getattr(components, n)) if getattr(components, n) is not None
                            else None for n in ("high", "low")}))
        return real(cfg, part, components, device)

    monkeypatch.setattr(loop_module, "load_expert", spy)
    bundle, _ = graph(N, host, quant=QUANT_FAST, steps=2)
    assert seen == [("high", {"high": None, "low": None}), ("low", {"high": True, "low": None})]
    for name in ("high", "low"):
        kept = getattr(bundle.loaded, name)
        assert has_quantized_layers(kept) and not getattr(kept, "peft_config", None) and not kept.training
    # a second run on the same bundle borrows the stored experts: quantized, so dropped and loaded again, in turn
    seen.clear()
    graph(N, host, bundle=bundle, steps=2, job_name="again")
    assert [part for part, _ in seen] == ["high", "low"]


def test_bundle_quantizes_each_part_as_it_arrives(N, monkeypatch):
    """A quantized bundle (what Preview Sample renders with) quantizes each expert before the next one loads: one
    unquantized expert in host memory at a time, not both. A text encoder to quantize on a GPU is read straight to
    it; on the CPU, or kept as loaded, it is read to host memory."""
    import trainer_core.models.loading as loading
    from trainer_core.bundle import has_quantized_layers
    from trainer_core.quant.apply import QuantReport

    events = []
    for name in ("quantize_expert", "quantize_text_encoder"):
        def quantize(model, *args, _real=getattr(trainer_core.bundle, name), **kw):
            events.append(f"quantize {kw.get('expert', 'text_encoder')}")
            return _real(model, *args, **kw)

        monkeypatch.setattr(trainer_core.bundle, name, quantize)
    real_expert, real_te = loading._expert, loading._text_encoder
    monkeypatch.setattr(loading, "_expert", lambda cfg, part, *a: events.append(f"load {part}") or real_expert(
        cfg, part, *a))
    monkeypatch.setattr(loading, "_text_encoder", lambda cfg, device="cpu": events.append(
        f"load text_encoder to {device}") or real_te(cfg, device))
    bundle = experts(N, QUANT_FAST)
    comps = bundle.components(quantize_on=torch.device("cpu"))
    assert events == ["load high", "quantize high", "load low", "quantize low", "load text_encoder to cpu",
                      "quantize text_encoder"]
    assert has_quantized_layers(comps.high) and has_quantized_layers(comps.low)
    assert has_quantized_layers(comps.text_encoder) and comps.tokenizer is not None

    # on a GPU (the quantizing itself stubbed: this machine has none) the encoder is read to it
    events.clear()
    bundle.forget("text_encoder")
    monkeypatch.setattr(trainer_core.bundle, "quantize_text_encoder", lambda model, quant, device: events.append(
        f"quantize text_encoder on {device}") or QuantReport("float8", "text encoder"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: self)  # nothing moves to the missing GPU
    bundle.components(high=False, low=False, vae=False, quantize_on=torch.device("cuda", 0))
    assert events == ["load text_encoder to cuda:0", "quantize text_encoder on cuda:0"]
    events.clear()
    bundle.forget("text_encoder")
    (bf16_te,) = F.call(N["Wan22QuantizeARA"], experts=experts(N), **widgets(
        N["Wan22QuantizeARA"], **QUANT_FAST, text_encoder="bf16"))
    bf16_te.components(high=False, low=False, vae=False, quantize_on=torch.device("cuda", 0))
    assert events == ["load text_encoder to cpu"]


@pytest.mark.parametrize("quant", [None, QUANT_FAST], ids=["as_loaded", "4bit_ara"])
def test_cancel_mid_training_leaves_a_resumable_state_and_a_clean_bundle(N, host, clips, quant):
    bundle = experts(N, quant)
    host.interrupt_after = 3  # the user presses cancel during step 3
    with pytest.raises(F.InterruptProcessingException):
        graph(N, host, bundle=bundle, steps=6, save={"save_every": 0})
    run = host.root / "output" / "wan22_lora" / "wan22_lora"
    assert (run / "training_state_000003.safetensors").is_file()
    assert (run / "wan22_lora_000003_high_noise.safetensors").is_file()
    assert any("resumable state at step 3" in t and "resume = latest" in t for _, t in host.texts)
    assert not (host.folder("loras") / "wan22_lora_high_noise.safetensors").exists()  # only finished runs are copied
    for name in ("high", "low"):
        model = getattr(bundle.loaded, name)
        if quant:  # quantized in place by the cancelled run: dropped, so the next run loads them as they were
            assert model is None
        else:
            assert not getattr(model, "peft_config", None) and not model.training
    host.interrupt_after = None
    _, (pair, _, _) = graph(N, host, bundle=bundle, steps=6, save={"save_every": 0}, resume="latest")
    assert pair.step == 6 and [v for v, _, _ in host.progress][-3:] == [4, 5, 6]
    for name in ("high", "low"):
        assert not getattr(getattr(bundle.loaded, name), "peft_config", None)
    # cancel + resume through the node trains exactly what one uninterrupted run does
    _, (whole, _, _) = graph(N, host, bundle=bundle, steps=6, save={"save_every": 0}, job_name="whole")
    for name in ("high", "low"):
        assert pair.tensors[name].keys() == whole.tensors[name].keys()
        assert all(torch.equal(v, whole.tensors[name][k]) for k, v in pair.tensors[name].items()), name


def _core_job(host, clips, name, **extra):
    """The core job equivalent to graph()'s defaults (TRAIN_FAST, switch every 2), fp32 LoRA files."""
    return job_from_dict({
        "name": name, "model": {"source": "tiny"}, "multistage": {"switch_every": 2}, "optimizer": {"name": "adamw"},
        "train": {"steps": 4, "compute_dtype": "fp32", "gradient_checkpointing": "off"},
        "save": {"output_dir": str(host.root / "core" / name), "dtype": "fp32"},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32]}], **extra,
    })


def _assert_pair_equals(tensors, model, cfg):
    ref = lora_state_dict_comfy(model, cfg.lora, torch.float32)
    assert tensors.keys() == ref.keys() and all(torch.equal(tensors[k], ref[k]) for k in ref)


def test_quantized_bundle_trains_and_renders_like_the_core_and_never_reuses_quantized_experts(N, host, clips):
    pv = N["Wan22PreviewSample"]
    plain = experts(N)
    quantized = experts(N, QUANT_FAST)  # 4bit_ara (NF4 + calibrated adapters), float8 text encoder
    quant = quantized.quant
    assert quantized.store is plain.store  # one set of loaded weights for both
    settings = dict(prompts="a red square moving right", width=32, height=32, num_frames=5, steps=3, sampler="euler",
                    seed=3)
    cfg = SampleConfig(prompts=["a red square moving right"], width=32, height=32, num_frames=5, steps=3,
                       sampler="euler", seed=3)

    def render(comps, te):
        return torch.cat(sample_videos(comps.high, comps.low, comps.vae,
                                       encode_sample_prompts(te.text_encoder, te.tokenizer, cfg), cfg, 0.875))

    float8_te = load_components(ModelConfig(source="tiny"), high=False, low=False, vae=False)
    quantize_text_encoder(float8_te.text_encoder, quant, "cpu")

    # 1. Preview before any training quantizes the stored experts itself; with no training clips to calibrate on,
    #    the adapters come from the weights alone.
    (frames,) = F.call(pv, experts=quantized, **widgets(pv, **settings))
    ref = load_components(ModelConfig(source="tiny"))
    for name in ("high", "low"):
        weights_only = quant.model_copy(update={"ara_calibration_samples": 0, "ara_cache_dir": None})
        quantize_expert(getattr(ref, name), weights_only, expert=name, cache_key=name, device="cpu")
    torch.testing.assert_close(frames, render(ref, float8_te), rtol=0, atol=1e-5)
    assert isinstance(quantized.loaded.high.blocks[0].attn1.to_q, NF4Linear)

    # 2. Training gets the experts as loaded (reloaded: these were quantized) and the core quantizes them, calibrated.
    _, (pair, _, _) = graph(N, host, bundle=quantized, save={"dtype": "fp32"})
    core_cfg = _core_job(host, clips, "quantized", quant={"transformer": "4bit_ara", "ara_calibration_samples": 2,
                                                          "text_encoder": "float8"})
    core = load_components(ModelConfig(source="tiny"))
    run_training(core_cfg, components=core, progress_bar=False)
    for name in ("high", "low"):
        _assert_pair_equals(pair.tensors[name], getattr(core, name), core_cfg)
        kept = getattr(quantized.loaded, name)  # the bundle keeps what training quantized, handed back clean
        assert isinstance(kept.blocks[1].ffn.net[2], NF4Linear)
        assert not getattr(kept, "peft_config", None) and not kept.training

    # 3. Preview with the pair renders on exactly the experts the LoRA was trained on.
    (frames,) = F.call(pv, experts=quantized, lora=pair, **widgets(pv, **settings))
    torch.testing.assert_close(frames, render(core, float8_te), rtol=0, atol=1e-5)

    # 4. The unquantized bundle shares the store but gets the experts as loaded again, for training and previews.
    # (Own output folder: the core's caption-embedding cache does not tell a float8 text encoder from a bf16 one.)
    _, (plain_pair, _, _) = graph(N, host, bundle=plain, job_name="plain",
                                  save={"dtype": "fp32", "output_dir": "plain"})
    plain_cfg = _core_job(host, clips, "plain")
    plain_core = load_components(ModelConfig(source="tiny"))
    run_training(plain_cfg, components=plain_core, progress_bar=False)
    for name in ("high", "low"):
        _assert_pair_equals(plain_pair.tensors[name], getattr(plain_core, name), plain_cfg)
    (frames,) = F.call(pv, experts=plain, lora=plain_pair, **widgets(pv, **settings))
    torch.testing.assert_close(frames, render(plain_core, load_components(
        ModelConfig(source="tiny"), high=False, low=False, vae=False)), rtol=0, atol=1e-5)
    assert not any(isinstance(m, NF4Linear) for m in plain.loaded.high.modules())


def test_regularizer_and_text_encoder_widgets_train_like_the_core(N, host, clips):
    """DOP, differential guidance, EMA and the text-encoder mode through the node equal the core's run; with EMA
    the pair the node outputs (and copies to models/loras) is the EMA pair."""
    train = dict(trigger_word="sqz", dop=True, dop_class="scene", dop_multiplier=0.5, diff_guidance=True,
                 diff_guidance_scale=2.0, ema=True, ema_decay=0.9, text_encoder_mode="live")
    _, (pair, _, run_dir) = graph(N, host, dataset={"prepend_trigger": True}, save={"dtype": "fp32"}, **train)
    cfg = _core_job(host, clips, "reg", trigger_word="sqz", text_encoder={"mode": "live"}, advanced={
        "dop": True, "dop_class": "scene", "dop_multiplier": 0.5, "diff_guidance": True, "diff_guidance_scale": 2.0,
        "ema": True, "ema_decay": 0.9})
    cfg.datasets[0].prepend_trigger = True
    core = run_training(cfg, progress_bar=False)
    for name in ("high", "low"):
        ema_file = core.run_dir / ema_lora_file_name("reg", 4, name)
        assert pair.files[name] == Path(run_dir) / ema_lora_file_name("wan22_lora", 4, name)
        theirs, live = load_file(str(ema_file)), load_file(str(core.lora_files[name]))
        copy = load_file(str(host.folder("loras") / f"wan22_lora_{name}_noise.safetensors"))
        assert theirs.keys() == pair.tensors[name].keys() == copy.keys()
        assert all(torch.equal(v, pair.tensors[name][k]) and torch.equal(v, copy[k]) for k, v in theirs.items())
        assert not all(torch.equal(v, live[k]) for k, v in theirs.items())  # the EMA, not the live weights


def test_adapter_file_from_models_loras_is_what_training_installs(N, host, clips):
    # An adapter file this trainer wrote (a computed-adapter cache), placed in models/loras.
    model = load_components(ModelConfig(source="tiny"), low=False, vae=False, text_encoder=False).high
    cfg = QuantConfig(transformer="4bit_ara", ara_calibration_samples=0, ara_cache_dir=str(host.root / "made"))
    report = quantize_expert(model, cfg, expert="high", cache_key="made", device="cpu")
    shutil.copy(report.cache_path, host.folder("loras") / "tiny_ara.safetensors")
    bundle = experts(N, {"transformer": "4bit_ara", "adapter": "tiny_ara.safetensors", "calibration_samples": 0})
    assert bundle.quant.ara_source == str(host.folder("loras") / "tiny_ara.safetensors")
    graph(N, host, bundle=bundle, steps=2)
    for name in ("high", "low"):  # the file holds shared adapters: both experts get them
        layer = getattr(bundle.loaded, name).blocks[0].attn1.to_q
        assert isinstance(layer, NF4Linear)
        torch.testing.assert_close(layer.ara_down, model.blocks[0].attn1.to_q.ara_down, rtol=0, atol=0)
        torch.testing.assert_close(layer.ara_up, model.blocks[0].attn1.to_q.ara_up, rtol=0, atol=0)


def test_training_previews_reach_the_progress_preview(N, host, clips):
    cls = N["Wan22ConfigureTrainingPreviews"]
    (previews,) = F.call(cls, **widgets(cls, prompts="a red (square) moving right", width=32, height=32,
                                        num_frames=5, steps=2, sample_every=2, sampler="euler"))
    assert isinstance(previews, SampleConfig) and previews.sample_every == 2
    _, (_, _, run_dir) = graph(N, host, previews=previews, quant={"transformer": "float8"})
    assert sorted(p.name for p in (Path(run_dir) / "samples").iterdir()) == [
        "wan22_lora_000002_00.mp4", "wan22_lora_000004_00.mp4"]
    # after the first preview, the progress preview is the rendered frame (32x32), before it the loss plot
    sizes = [p[1].size for _, _, p in host.progress]
    assert sizes[0] == (512, 256) and sizes[2:] == [(32, 32), (32, 32)]
    # each preview states the native ComfyUI recipe that reproduces it
    rendered = [t for _, t in host.texts if t.startswith("preview rendered at step")]
    assert len(rendered) == 2 and all("ComfyUI: ModelSamplingSD3" in t and "KSamplerAdvanced euler/" in t
                                      for t in rendered)
    # ... on the float8 experts it trains (the native graph loads them as they are), with the prompt as ComfyUI's
    # CLIPTextEncode must be given it (brackets escaped: unescaped it reads them as weights)
    assert all(t.endswith("rendered on float8 experts (native graph: weights as loaded)\nprompt 0 in ComfyUI's "
                          "CLIPTextEncode: a red \\(square\\) moving right") for t in rendered), rendered[0]
    meta = read_video_metadata(Path(run_dir) / "samples" / "wan22_lora_000002_00.mp4")
    assert meta["comfyui_prompt"] == "a red \\(square\\) moving right" and "float8 experts" in meta["native_recipe"]
    with pytest.raises(ConfigError, match="prompts is empty"):
        F.call(cls, **widgets(cls))


def test_cancel_during_a_training_preview_stops_there_with_a_resumable_state(N, host, clips):
    """Cancel is answered at the preview's next sampling step (minutes earlier at full size than after it), and the
    progress text says which preview renders."""
    cls = N["Wan22ConfigureTrainingPreviews"]
    (previews,) = F.call(cls, **widgets(cls, prompts="a red square moving right", width=32, height=32,
                                        num_frames=5, steps=3, sample_every=2, sampler="euler"))
    host.interrupt_after = 3  # checks: step 1, then the preview of step 2's sampling steps 1 and 2
    with pytest.raises(F.InterruptProcessingException):
        graph(N, host, previews=previews, steps=4, save={"save_every": 0})
    run = host.root / "output" / "wan22_lora" / "wan22_lora"
    assert sorted(p.name for p in run.glob("training_state_*")) == ["training_state_000002.safetensors"]
    assert not (run / "samples").exists() or list((run / "samples").iterdir()) == []  # the cut preview: no file
    assert ("5", "rendering the preview of step 2: 1/3 sampling steps") in host.texts


# ------------------------------------------------------------------------------------------------ rendering


def test_preview_sample_matches_the_core_sampler_with_the_saved_files(N, host, clips):
    bundle, (pair, _, _) = graph(N, host)
    cls = N["Wan22PreviewSample"]
    settings = dict(prompts="a red square moving right\n\na blue square moving up", width=32, height=32,
                    num_frames=5, steps=3, shift=5.0, sampler="euler", guidance_high=3.0, guidance_low=2.0,
                    seed=11, lora_strength_low=0.5, boundary=0.9)
    (frames,) = F.call(cls, experts=bundle, lora=pair, unique_id="9", **widgets(cls, **settings))
    # Reference: the core sampler on freshly loaded components with the LoRA files attached.
    ref = load_components(ModelConfig(source="tiny"))
    for expert in ("high", "low"):
        attach_lora_file(getattr(ref, expert), pair.files[expert], expert=expert)
    cfg = SampleConfig(prompts=["a red square moving right", "a blue square moving up"], width=32, height=32,
                       num_frames=5, steps=3, shift=5.0, sampler="euler", guidance_high=3.0, guidance_low=2.0,
                       seed=11, lora_strength_low=0.5)
    videos = sample_videos(ref.high, ref.low, ref.vae, encode_sample_prompts(ref.text_encoder, ref.tokenizer, cfg),
                           cfg, 0.9)
    assert frames.shape == (10, 32, 32, 3)
    torch.testing.assert_close(frames, torch.cat(videos), rtol=0, atol=1e-5)
    assert [v for v, _, _ in host.progress][-6:] == [1, 2, 3, 4, 5, 6]
    assert not getattr(bundle.loaded.high, "peft_config", None)  # adapter removed again
    # strength 0 on both experts renders the base model, the same as no LoRA at all
    base_settings = {**settings, "lora_strength_high": 0.0, "lora_strength_low": 0.0}
    (zero,) = F.call(cls, experts=bundle, lora=pair, **widgets(cls, **base_settings))
    (none,) = F.call(cls, experts=bundle, **widgets(cls, **base_settings))
    torch.testing.assert_close(zero, none, rtol=0, atol=1e-6)
    assert not torch.allclose(zero, frames, atol=1e-3)


def test_preview_sample_widgets_reach_the_sampler(N, host, monkeypatch):
    cls = N["Wan22PreviewSample"]
    seen = []  # the node imports the sampler when it runs
    monkeypatch.setattr(trainer_core.sample, "sample_videos", lambda h, lo, v, cache, cfg, boundary, on_step:
                        seen.append((cfg, boundary)) or [torch.zeros(1, 16, 16, 3)])
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    base = widgets(cls, prompts="a cat")
    F.call(cls, experts=bundle, **base)
    changes = {"negative_prompt": "blurry", "width": 64, "height": 96, "num_frames": 9, "steps": 20, "shift": 8.0,
               "sampler": "diffusers_unipc", "scheduler": "simple", "guidance_high": 2.0, "guidance_low": 1.0, "seed": 3, "walk_seeds": False,
               "vae_tiling": True, "lora_strength_high": 0.7, "lora_strength_low": 0.3}
    assert set(changes) | {"prompts", "boundary"} == set(widgets(cls))
    for k, v in changes.items():
        F.call(cls, experts=bundle, **{**base, k: v})
        assert getattr(seen[-1][0], k) == v != getattr(seen[0][0], k), k
    F.call(cls, experts=bundle, **{**base, "prompts": "a\nb", "boundary": 0.5})
    assert seen[-1][0].prompts == ["a", "b"] and seen[-1][1] == 0.5 and seen[0][1] == 0.875
    with pytest.raises(ConfigError, match="prompts is empty"):
        F.call(cls, experts=bundle, **widgets(cls))
    with pytest.raises(ConfigError, match="multiple of 16"):
        F.call(cls, experts=bundle, **{**base, "width": 50})


def test_preview_sample_refuses_a_render_that_cannot_work_when_queued(N):
    # ComfyUI calls VALIDATE_INPUTS when the prompt is queued, before anything upstream (a training) runs; it skips
    # its own range check for the inputs the function takes, so the function checks every rule of those.
    cls = N["Wan22PreviewSample"]
    early = inspect.getfullargspec(cls.VALIDATE_INPUTS).args[1:]
    good = {k: v for k, v in widgets(cls, prompts="a cat").items() if k in early}
    assert cls.VALIDATE_INPUTS(**good) is True
    for change, message in [({"shift": 0.0}, "shift"), ({"width": 50}, "multiple of 16"),
                            ({"num_frames": 6}, "4n\\+1|4 n \\+ 1|num_frames"), ({"prompts": " \n "}, "prompts is empty"),
                            ({"height": 99984}, "at most|maximum")]:
        result = cls.VALIDATE_INPUTS(**{**good, **change})
        assert isinstance(result, str) and re.search(message, result) and result.startswith("Preview Sample"), change
    assert cls.VALIDATE_INPUTS(**{**good, "width": None}) is True  # fed by a link: checked when the node runs


def test_apply_pair_patches_comfyui_models_with_mappable_keys(N, host, clips):
    _, (pair, _, _) = graph(N, host)
    cls = N["Wan22ApplyLoraPair"]
    # ComfyUI maps a LoRA key 'diffusion_model.<module>' to the model weight '<module>.weight' of its Wan model
    # (comfy.lora.model_lora_keys_unet); every module named in the pair must exist in the original layout.
    original = diffusers_state_dict_to_original(tiny_components().high.state_dict())
    high, low = F.comfy_model(original), F.comfy_model(original)
    out = F.call(cls, model_high=high, model_low=low, lora=pair, strength_high=0.8, strength_low=0.0)
    assert out[1] is low and out[0] == ("patched", high, 0.8)  # strength 0 leaves the model as it was
    assert host.patches[0][1] is pair.tensors["high"]
    modules = {k.removesuffix(".weight") for k in original if k.endswith(".weight")}
    for key in pair.tensors["high"]:
        module = key.removeprefix("diffusion_model.").rsplit(".", 2 if key.endswith("weight") else 1)[0]
        assert key.startswith("diffusion_model.") and module in modules, key


# ------------------------------------------------------------------------------------------------ loss plot


def test_loss_smoothing_and_plot(pack):
    plot = sys.modules[f"{F.PACK_NAME}.nodes.loss_plot"]
    vals = [1.0, 0.5, 0.8, 0.2, 0.4]
    w = 0.9
    ref = [sum(w ** (i - j) * (1 - w) * vals[j] for j in range(i + 1)) / (1 - w ** (i + 1)) for i in range(len(vals))]
    assert plot.smooth(vals, w) == pytest.approx(ref, rel=1e-12)
    losses = [(s, "high" if s <= 20 else "low", 2.0 - s / 40) for s in range(1, 41)]
    img = plot.loss_curve(losses, 400, 200)
    px = img.load()
    cols = {e: [x for x in range(img.width) for y in range(img.height) if px[x, y] == c] for e, c in plot.COLOURS.items()}
    assert cols["high"] and cols["low"] and min(cols["low"]) > min(cols["high"])  # low trained later: drawn to the right
    tensor = plot.to_image_tensor(img)
    assert tensor.shape == (1, 200, 400, 3) and tensor.dtype == torch.float32
    assert plot.to_image_tensor(plot.loss_curve([])).shape == (1, 384, 768, 3)


# ------------------------------------------------------------------------------------------------ several GPUs


@pytest.mark.slow
def test_gpus_trains_under_torchrun_and_returns_the_pair(N, host, clips):
    # Two gloo processes on the CPU stand in for two GPUs: the child loads the experts itself, streams each step.
    _, (pair, curve, run_dir) = graph(N, host, gpus=2, device="cpu", steps=4, save={"save_every": 0})
    assert pair.step == 4 and set(pair.tensors) == {"high", "low"}
    for name, path in pair.files.items():
        saved = load_file(str(path))
        assert saved.keys() == pair.tensors[name].keys()
        assert all(torch.equal(v.float(), pair.tensors[name][k].float()) for k, v in saved.items())
    assert [v for v, _, _ in host.progress][-4:] == [1, 2, 3, 4]
    assert any("done: 4 steps on 2 CPU processes" in t for _, t in host.texts)  # the CPU: no GPU is claimed
    assert Path(run_dir).name == "wan22_lora" and (Path(run_dir) / "run.json").is_file() and curve.shape[-1] == 3


def test_gpus_cancel_stops_the_child_and_raises_comfyuis_interrupt(N, host, clips, monkeypatch):
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    seen = {}

    def fake_run(cfg, gpus, on_event, should_stop, **kw):
        seen["gpus"] = gpus
        while not should_stop():
            on_event({"event": "step", "step": 1, "total": 4, "expert": "high", "loss": 0.5, "lr": 1e-4, "seconds": 0.1})
        raise mod.LaunchCancelled("cancelled")

    monkeypatch.setattr(mod, "run_torchrun", fake_run)
    host.interrupt_after = 2  # the second progress check sees the cancel
    with pytest.raises(F.InterruptProcessingException):
        graph(N, host, gpus=3, device="cpu")
    assert seen["gpus"] == 3
    assert any("cancelling" in t for _, t in host.texts) and any("training stopped" in t for _, t in host.texts)


def test_gpus_after_a_resume_returns_the_whole_runs_losses(N, host, clips, monkeypatch, tmp_path):
    """A resumed torchrun child streams only the steps it trains; the curve covers the run from step 1."""
    from trainer_core.train.runs import write_losses

    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    history = [(s, "high" if s % 2 else "low", 1.0 / s) for s in range(1, 7)]
    write_losses(run_dir, history, [])

    def resumed_child(cfg, gpus, on_event, should_stop, **kw):
        for step in (5, 6):  # the steps after the resumed state at 4
            on_event({"event": "step", "step": step, "total": 6, "expert": history[step - 1][1],
                      "loss": history[step - 1][2], "lr": 1e-4, "seconds": 0.1})
        return {"run_dir": str(run_dir), "step": 6}

    monkeypatch.setattr(mod, "run_torchrun", resumed_child)
    monkeypatch.setattr(trainer_core.api, "final_pair", lambda cfg, run, step: None)
    _, losses, _ = mod._train_torchrun(_job(N, host, clips), 2, mod.host.Progress(6, "1"))
    assert [(s, e) for s, e, _ in losses] == [(s, e) for s, e, _ in history]
    assert [v for _, _, v in losses] == pytest.approx([v for _, _, v in history])


def test_gpu_placement_expert_groups_needs_switch_every_1_and_an_even_gpu_count(N, host, clips, monkeypatch):
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    hw = N["Wan22ConfigureHardware"]
    # the GPU count a placement needs is Configure Hardware's own check (both widgets are on it), refused there
    for gpus, message in ((1, "needs gpus of 2 or more"), (3, "but gpus is 3 - use an even number")):
        with pytest.raises(ConfigError, match=f"^Configure Hardware: gpu_placement .*{message}"):
            F.call(hw, **widgets(hw, gpus=gpus, gpu_placement="expert groups"))
    # the rest is the job's: one message naming the widgets, on the nodes that have them
    with pytest.raises(ConfigError, match=r"gpu_placement 'expert groups' \(Configure Hardware\) cannot be combined "
                       r"with switch_every \(Configure MultiStage\): 10.* set gpu_placement \(Configure Hardware\) to 'data "
                       r"parallel'"):
        F.call(N["Wan22TrainLoRA"], **_tiny_inputs(N, gpus=2, gpu_placement="expert groups"))
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips",
                                                          num_frames=5, resolutions="32"))
    (sv,) = F.call(N["Wan22SaveCheckpoint"], **F.defaults(N["Wan22SaveCheckpoint"]))
    w = train_inputs(N, gpus=2, gpu_placement="expert groups", device="cpu")
    hardware = w.pop("hardware")
    cfg = mod.build_job(bundle, ds, w, multistage=MultiStageConfig(switch_every=1), save=sv, settings=[hardware])
    assert cfg.distributed.expert_groups and not cfg.distributed.shard_experts
    monkeypatch.setattr(mod, "run_torchrun", lambda *a, **k: pytest.fail("launched"))
    mod._preflight(cfg, 2)


def _tiny_inputs(N, **values: Any) -> dict[str, Any]:
    """Train LoRA's inputs on the tiny model and the clips folder (5 frames, 32 px), ``values`` on their nodes."""
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips",
                                                          num_frames=5, resolutions="32"))
    return {"experts": bundle, "dataset": ds, **train_inputs(N, **values)}


def test_gpus_beyond_the_machine_are_refused_before_loading(N, host, clips, monkeypatch):
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    monkeypatch.setattr(trainer_core.api, "resolve_device", lambda setting: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(mod, "run_torchrun", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ConfigError, match=r"gpus \(Configure Hardware\) is 2 but this machine has 1 CUDA GPU"):
        graph(N, host, gpus=2)


def test_dataset_digest_sees_symlinked_folders_once_and_survives_broken_links(N, host, tmp_path):
    """The scan follows symlinked sub-folders, so a change inside one re-runs the graph; a link back to an
    ancestor and a broken link neither loop nor fail."""
    ds_cls = N["Wan22BuildVideoDataset"]
    root = host.root / "linked"
    outside = tmp_path / "outside"
    make_synthetic_dataset(root, n_clips=1, num_frames=5, size=(32, 32), seed=1)
    make_synthetic_dataset(outside, n_clips=1, num_frames=5, size=(32, 32), seed=2)
    (root / "more").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "gone.mp4").symlink_to(tmp_path / "missing.mp4")
    before = ds_cls.IS_CHANGED(folder=str(root))
    shutil.copy(outside / "clip000.mp4", outside / "clip001.mp4")
    assert ds_cls.IS_CHANGED(folder=str(root)) != before


def test_train_warnings_name_widgets_and_are_shown_once(N, host, clips):
    """A job warning (valid, almost surely not meant) reads in widget terms under the node, once."""
    graph(N, host, steps=2)  # switch every 2: the low-noise expert gets none
    warnings = [t for _, t in host.texts if t.startswith("warning: the low-noise expert gets no step")]
    assert len(warnings) == 1
    assert "steps (2) is not above switch_every (Configure MultiStage) (2)" in warnings[0]
    assert "train_low_noise (Configure MultiStage): false" in warnings[0] and "multistage." not in warnings[0]


@pytest.mark.parametrize("transformer", ["auto", "none", "float8", "4bit_ara"])
def test_default_widgets_raise_no_job_warning(N, host, clips, transformer):
    """Widgets left at their defaults are never named as settings another one switches off (a node's default that
    differed from the setting's would warn on every queue)."""
    mod = sys.modules[N["Wan22TrainLoRA"].__module__]
    (bundle,) = F.call(N["Wan22LoadExperts"], **widgets(N["Wan22LoadExperts"], source="tiny"))
    (bundle,) = F.call(N["Wan22QuantizeARA"], experts=bundle, **widgets(N["Wan22QuantizeARA"], transformer=transformer))
    ds, _ = F.call(N["Wan22BuildVideoDataset"], **widgets(N["Wan22BuildVideoDataset"], folder="clips"))
    (sv,) = F.call(N["Wan22SaveCheckpoint"], **F.defaults(N["Wan22SaveCheckpoint"]))
    (ms,) = F.call(N["Wan22ConfigureMultiStage"], **widgets(N["Wan22ConfigureMultiStage"], train_high_noise=False))
    (pv,) = F.call(N["Wan22ConfigureTrainingPreviews"], **widgets(N["Wan22ConfigureTrainingPreviews"], prompts="a cat"))
    links = [F.call(N[node_id], **F.defaults(N[node_id]))[0] for node_id in SETTINGS.values()]
    cfg = mod.build_job(bundle, ds, {**F.defaults(N["Wan22TrainLoRA"]), "steps": 100}, multistage=ms, save=sv,
                        previews=pv, settings=links)
    assert trainer_core.api.job_warnings(cfg) == []
