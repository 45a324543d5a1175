"""The example workflows: node types exist, links join matching types, widget values fit, thumbnails are small, the
recipes are the ones the titles promise; the pack's part of workflows 1-3 runs on the tiny preset through the node
classes as ComfyUI would run it, with the workflow's quantization, memory and regularizer settings reaching the core."""

from __future__ import annotations

import itertools
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import comfy_fakes as F  # noqa: E402

import trainer_core.bundle  # noqa: E402
from trainer_core.data import make_synthetic_dataset  # noqa: E402

WORKFLOWS = sorted((F.REPO / "example_workflows").glob("*.json"))
MODEL_FILE = "safetensors"  # file combos: any .safetensors name (the user's installation decides the list)

#: Core ComfyUI nodes the workflows may use (from ComfyUI's nodes.py / comfy_extras, Oct 2025):
#: name -> (inputs in widget order as (name, type, widget spec or None for links), output types).
CORE = {
    "UNETLoader": ([("unet_name", MODEL_FILE, {}), ("weight_dtype", ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast",
                                                                    "fp8_e5m2"], {})], ["MODEL"]),
    "LoraLoaderModelOnly": ([("model", "MODEL", None), ("lora_name", MODEL_FILE, {}),
                             ("strength_model", "FLOAT", {"min": -100.0, "max": 100.0})], ["MODEL"]),
    "ModelSamplingSD3": ([("model", "MODEL", None), ("shift", "FLOAT", {"min": 0.0, "max": 100.0})], ["MODEL"]),
    "CLIPLoader": ([("clip_name", MODEL_FILE, {}), ("type", ["stable_diffusion", "wan"], {}),
                    ("device", ["default", "cpu"], {})], ["CLIP"]),
    "CLIPTextEncode": ([("text", "STRING", {}), ("clip", "CLIP", None)], ["CONDITIONING"]),
    "EmptyHunyuanLatentVideo": ([("width", "INT", {"min": 16, "max": 16384}), ("height", "INT", {"min": 16, "max": 16384}),
                                 ("length", "INT", {"min": 1, "max": 16384}), ("batch_size", "INT", {"min": 1, "max": 4096})],
                                ["LATENT"]),
    "VAELoader": ([("vae_name", MODEL_FILE, {})], ["VAE"]),
    "KSamplerAdvanced": ([("model", "MODEL", None), ("add_noise", ["enable", "disable"], {}),
                          ("noise_seed", "INT", {"min": 0, "max": 2**64 - 1, "control_after_generate": True}),
                          ("steps", "INT", {"min": 1, "max": 10000}), ("cfg", "FLOAT", {"min": 0.0, "max": 100.0}),
                          ("sampler_name", ["euler", "uni_pc"], {}), ("scheduler", ["simple", "normal"], {}),
                          ("positive", "CONDITIONING", None), ("negative", "CONDITIONING", None),
                          ("latent_image", "LATENT", None), ("start_at_step", "INT", {"min": 0, "max": 10000}),
                          ("end_at_step", "INT", {"min": 0, "max": 10000}),
                          ("return_with_leftover_noise", ["disable", "enable"], {})], ["LATENT"]),
    "VAEDecode": ([("samples", "LATENT", None), ("vae", "VAE", None)], ["IMAGE"]),
    "CreateVideo": ([("images", "IMAGE", None), ("fps", "FLOAT", {"min": 1.0, "max": 120.0}), ("audio", "AUDIO", None)],
                    ["VIDEO"]),
    "SaveVideo": ([("video", "VIDEO", None), ("filename_prefix", "STRING", {}), ("format", ["auto", "mp4"], {}),
                   ("codec", ["auto", "h264"], {})], []),
    "PreviewImage": ([("images", "IMAGE", None)], []),
    "PreviewAny": ([("source", "*", None)], []),
}
OPTIONAL_LINKS = {("CreateVideo", "audio"), ("Wan22TrainLoRA", "multistage"), ("Wan22TrainLoRA", "save"),
                  ("Wan22TrainLoRA", "previews"), ("Wan22PreviewSample", "lora"), ("Wan22BuildVideoDataset", "dataset"),
                  ("Wan22TrainLoRA", "init_lora"), ("Wan22TrainLoRA", "optimizer_settings"),
                  ("Wan22TrainLoRA", "regularizers"), ("Wan22TrainLoRA", "hardware")}


def node_spec(pack, kind):
    """(inputs as (name, type, widget options or None), output types) for a pack node or a listed core node."""
    cls = pack.NODE_CLASS_MAPPINGS.get(kind)
    if cls is None:
        assert kind in CORE, f"unknown node type {kind}"
        return CORE[kind]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (t, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            widget = isinstance(t, (list, tuple)) or t in ("INT", "FLOAT", "STRING", "BOOLEAN")
            inputs.append((name, list(t) if isinstance(t, tuple) else t, opts if widget else None))
    return inputs, list(cls.RETURN_TYPES)


def to_api(pack, workflow):
    """UI format -> API format (ComfyUI's prompt): widget values by input name, links as [node id, slot]."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        inputs, _ = node_spec(pack, node["type"])
        values = list(node["widgets_values"])
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i["link"] is not None}
        prompt = {}
        for name, t, opts in inputs:
            if opts is not None:
                prompt[name] = values.pop(0)
                if opts.get("control_after_generate"):
                    assert values.pop(0) in ("fixed", "randomize", "increment", "decrement"), name
            if name in linked:
                prompt[name] = [linked[name][1], linked[name][2]]
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        api[node["id"]] = {"class_type": node["type"], "inputs": prompt}
    return api


@pytest.fixture
def pack(monkeypatch, tmp_path):
    host = F.install(monkeypatch, tmp_path)
    for kind, name in (("diffusion_models", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
                       ("diffusion_models", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
                       ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"), ("vae", "wan_2.1_vae.safetensors")):
        (host.folder(kind) / name).write_bytes(b"")
    pack = F.load_pack()
    monkeypatch.setattr(trainer_core.bundle, "_STORES", weakref.WeakValueDictionary())
    pack.host = host
    return pack


def test_the_expected_workflows_and_thumbnails_exist():
    names = [p.stem for p in WORKFLOWS]
    assert names == ["wan22_1_character_lora_24gb", "wan22_2_motion_lora_h100", "wan22_3_style_lora_dop",
                     "wan22_4_render_trained_pair_native"]
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file() and thumb.stat().st_size < 30_000 and thumb.read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_well_formed(pack, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out_types = node_spec(pack, nodes[src]["type"])[1]
        dst_inputs = [(n, t) for n, t, _ in node_spec(pack, nodes[dst]["type"])[0]]
        name = nodes[dst]["inputs"][dst_slot]["name"]
        declared = dict(dst_inputs)[name]
        assert out_types[src_slot] == kind == nodes[src]["outputs"][src_slot]["type"], link_id
        assert declared in (kind, "*"), f"link {link_id}: {kind} into {nodes[dst]['type']}.{name} ({declared})"
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and link_id in nodes[src]["outputs"][src_slot]["links"]
    api = to_api(pack, wf)
    for node_id, node in api.items():
        inputs, _ = node_spec(pack, node["class_type"])
        for name, t, opts in inputs:
            if opts is None:
                assert name in node["inputs"] or (node["class_type"], name) in OPTIONAL_LINKS, (node_id, name)
                continue
            value = node["inputs"][name]
            if isinstance(value, list):  # a widget fed by a link (workflow 4's split step): the link was checked
                continue
            if t == MODEL_FILE:
                assert value.endswith(".safetensors"), (node_id, name, value)
            elif isinstance(t, list):
                assert value in t, (node_id, name, value)
            elif t in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (node_id, name)
                assert opts.get("min", value) <= value <= opts.get("max", value), (node_id, name, value)
            else:
                assert isinstance(value, {"STRING": str, "BOOLEAN": bool}[t]), (node_id, name, value)
    # every pack node's widget values are accepted by the node itself (validated settings)
    if any(n["class_type"] == "Wan22TrainLoRA" for n in api.values()):
        train = next(n for n in api.values() if n["class_type"] == "Wan22TrainLoRA")["inputs"]
        assert train["job_name"] and train["steps"] >= 1000


#: LiteGraph's NODE_TITLE_HEIGHT: a node's title bar is drawn above its ``pos``; ``size`` is the body below it.
TITLE_HEIGHT = 30


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_nodes_do_not_overlap(path):
    """No node's rectangle, title bar included, overlaps another's as the ComfyUI canvas draws them."""
    nodes = json.loads(path.read_text(encoding="utf-8"))["nodes"]
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes}  # fmt: skip
    for a, b in itertools.combinations(boxes, 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
        assert not (ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1), f"nodes {a} and {b} overlap"


def _run_pack_part(pack, api, patches):
    """Execute the pack's nodes in dependency order as ComfyUI does (outputs of linked nodes as inputs)."""
    outputs, order = {}, []

    def visit(node_id):
        if node_id in outputs or not api[node_id]["class_type"].startswith("Wan22"):
            return
        for v in api[node_id]["inputs"].values():
            if isinstance(v, list):
                visit(v[0])
        cls = pack.NODE_CLASS_MAPPINGS[api[node_id]["class_type"]]
        kwargs = {k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in api[node_id]["inputs"].items()}
        kwargs.update(patches.get(api[node_id]["class_type"], {}))
        if "unique_id" in cls.INPUT_TYPES().get("hidden", {}):
            kwargs["unique_id"] = str(node_id)
        outputs[node_id] = F.call(cls, **kwargs)
        order.append(api[node_id]["class_type"])

    for node_id in api:
        visit(node_id)
    return outputs, order


def _inputs(api, class_type):
    return next(n["inputs"] for n in api.values() if n["class_type"] == class_type)


def _settings(pack, api, class_type):
    """A settings node's inputs, or its defaults where the workflow leaves it out (Train LoRA then uses them)."""
    if any(n["class_type"] == class_type for n in api.values()):
        return _inputs(api, class_type)
    return F.defaults(pack.NODE_CLASS_MAPPINGS[class_type])


#: What each training workflow promises (its title), as settings of its nodes: {class_type: {input: value}}.
RECIPES = {
    "wan22_1_character_lora_24gb": {
        "Wan22QuantizeARA": {"transformer": "auto", "adapter": "compute", "text_encoder": "float8"},
        "Wan22LoadExperts": {"low_vram": True, "offload_blocks": "auto"},
        "Wan22TrainLoRA": {"text_encoder_mode": "cache"},
        "Wan22ConfigureRegularizers": {"dop": False},
        "Wan22ConfigureMultiStage": {"switch_every": 10},
        "Wan22ConfigureTrainingPreviews": {"sample_every": 250},
        "Wan22BuildVideoDataset": {"resolutions": "512", "num_frames": 33},
    },
    "wan22_2_motion_lora_h100": {
        "Wan22LoadExperts": {"low_vram": False, "offload_blocks": "0"},
        "Wan22ConfigureMultiStage": {"switch_every": 1},
        "Wan22BuildVideoDataset": {"num_frames": 81, "frame_sampling": "fps"},
        "Wan22ConfigureRegularizers": {"dop": False},
    },
    "wan22_3_style_lora_dop": {
        "Wan22TrainLoRA": {"timestep_bias": "high_noise"},
        "Wan22ConfigureRegularizers": {"dop": True, "dop_class": "scene", "ema": True},
        "Wan22BuildVideoDataset": {"prepend_trigger": True},
    },
}


@pytest.mark.parametrize("path", WORKFLOWS[:3], ids=lambda p: p.stem)
def test_workflow_follows_its_recipe(pack, path):
    api = to_api(pack, json.loads(path.read_text(encoding="utf-8")))
    for class_type, expected in RECIPES[path.stem].items():
        inputs = _settings(pack, api, class_type)
        assert {k: inputs[k] for k in expected} == expected, class_type
    train = _inputs(api, "Wan22TrainLoRA")
    assert not _settings(pack, api, "Wan22ConfigureRegularizers")["dop"] or train["trigger_word"]  # DOP needs one
    has_quant = any(n["class_type"] == "Wan22QuantizeARA" for n in api.values())
    assert has_quant == (path.stem != "wan22_2_motion_lora_h100")
    if has_quant:  # Train LoRA and Preview Sample both take the quantized bundle
        quant_id = next(i for i, n in api.items() if n["class_type"] == "Wan22QuantizeARA")
        for class_type in ("Wan22TrainLoRA", "Wan22PreviewSample"):
            assert _inputs(api, class_type)["experts"] == [quant_id, 0], class_type


@pytest.mark.parametrize("path", WORKFLOWS[:3], ids=lambda p: p.stem)
def test_pack_part_runs_on_the_tiny_preset(pack, path, monkeypatch):
    # quant.transformer auto resolves as on a card without fp8 matmuls (an RTX 3090): 4bit_ara, not the CPU's none
    monkeypatch.setattr("trainer_core.quant.choice.auto_transformer_quant", lambda device_type, fp8: "4bit_ara")
    host = pack.host
    make_synthetic_dataset(host.root / "input" / "clips", n_clips=4, num_frames=5, size=(32, 32), seed=0)
    api = to_api(pack, json.loads(path.read_text(encoding="utf-8")))
    small = {"width": 32, "height": 32, "num_frames": 5, "steps": 2}
    patches = {
        "Wan22LoadExperts": {"source": "tiny", "high_noise_model": "none", "low_noise_model": "none",
                             "text_encoder": "none", "vae": "none"},
        "Wan22BuildVideoDataset": {"folder": "clips", "num_frames": 5, "resolutions": "32"},
        "Wan22ConfigureTrainingPreviews": {**small, "sample_every": 2},
        "Wan22TrainLoRA": {"steps": 4, "optimizer": "adamw"},
        "Wan22ConfigureHardware": {"gradient_checkpointing": "off"},  # where a workflow has one
        "Wan22PreviewSample": small,
    }
    outputs, order = _run_pack_part(pack, api, patches)
    assert order[-1] == "Wan22PreviewSample" and "Wan22TrainLoRA" in order
    # what the core nodes downstream receive: IMAGE batches [B, H, W, 3] in 0..1
    for node in api.values():
        if node["class_type"] in ("CreateVideo", "PreviewImage"):
            src, slot = node["inputs"]["images"]
            image = outputs[src][slot]
            assert image.ndim == 4 and image.shape[-1] == 3 and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
    frames = next(outputs[i][0] for i, n in api.items() if n["class_type"] == "Wan22PreviewSample")
    assert frames.shape == (5, 32, 32, 3)
    lora_names = sorted(p.name for p in host.folder("loras").iterdir())
    assert len(lora_names) == 2 and all(n.endswith(("_high_noise.safetensors", "_low_noise.safetensors"))
                                        for n in lora_names)
    # the workflow's quantization, memory, text-encoder and regularizer settings are what the core ran with
    run_dir = next(outputs[i][2] for i, n in api.items() if n["class_type"] == "Wan22TrainLoRA")
    ran = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    train = _inputs(api, "Wan22TrainLoRA")
    quant_id = next((i for i, n in api.items() if n["class_type"] == "Wan22QuantizeARA"), None)
    chosen = api[quant_id]["inputs"]["transformer"] if quant_id else "none"
    assert ran["quant"]["transformer"] == ("4bit_ara" if chosen == "auto" else chosen)
    assert ran["memory"]["low_vram"] == _inputs(api, "Wan22LoadExperts")["low_vram"]
    assert ran["text_encoder"]["mode"] == train["text_encoder_mode"]
    regularizers = _settings(pack, api, "Wan22ConfigureRegularizers")
    assert (ran["advanced"]["dop"], ran["advanced"]["ema"]) == (regularizers["dop"], regularizers["ema"])
    if quant_id:  # the experts the pair was trained on (and Preview Sample rendered with) are quantized
        layers = {type(m).__name__ for m in outputs[quant_id][0].loaded.high.modules()}
        assert layers & {"NF4Linear", "Float8Linear"}


def test_native_render_uses_the_files_save_checkpoint_writes(pack):
    """Workflow 4 loads the pair by the names Save Checkpoint gives it in models/loras (workflow 1's lora_name)."""
    wf1, wf4 = (to_api(pack, json.loads(p.read_text(encoding="utf-8"))) for p in (WORKFLOWS[0], WORKFLOWS[3]))
    name = next(n for n in wf1.values() if n["class_type"] == "Wan22SaveCheckpoint")["inputs"]["lora_name"]
    loras = sorted(n["inputs"]["lora_name"] for n in wf4.values() if n["class_type"] == "LoraLoaderModelOnly")
    assert loras == [f"{name}_high_noise.safetensors", f"{name}_low_noise.safetensors"]


def _unlinked(workflow: dict) -> dict:
    """The workflow with every link dropped: to_api then gives the widget values stored for linked widgets too."""
    copy = json.loads(json.dumps(workflow))
    for node in copy["nodes"]:
        node["inputs"] = [i for i in node["inputs"] if "widget" not in i]
    return copy


def test_native_render_renders_what_workflow_1s_previews_show(pack):
    """Workflow 4 is the native recipe of workflow 1's training previews, its split from Wan22 Split Step."""
    from trainer_core.sample import native_recipe

    raw1, raw4 = (json.loads(p.read_text(encoding="utf-8")) for p in (WORKFLOWS[0], WORKFLOWS[3]))
    wf1, wf4, stored = to_api(pack, raw1), to_api(pack, raw4), to_api(pack, _unlinked(raw4))
    (cfg,) = F.call(pack.NODE_CLASS_MAPPINGS["Wan22ConfigureTrainingPreviews"],
                    **_inputs(wf1, "Wan22ConfigureTrainingPreviews"))  # fmt: skip
    boundary = _inputs(wf1, "Wan22ConfigureMultiStage")["boundary"]
    split_id, split_in = next((i, n["inputs"]) for i, n in wf4.items() if n["class_type"] == "Wan22SplitStep")
    assert split_in == {"steps": cfg.steps, "shift": cfg.shift, "scheduler": cfg.scheduler, "boundary": boundary}
    split, _, _, _ = F.call(pack.NODE_CLASS_MAPPINGS["Wan22SplitStep"], **split_in)
    assert f"high 0→{split} cfg" in native_recipe(cfg, boundary)

    k_ids = sorted((i for i, n in wf4.items() if n["class_type"] == "KSamplerAdvanced"),
                   key=lambda i: wf4[i]["inputs"]["add_noise"] == "disable")  # fmt: skip
    expected = [
        {"add_noise": "enable", "steps": [split_id, 2], "end_at_step": [split_id, 0], "start_at_step": 0,
         "return_with_leftover_noise": "enable", "cfg": cfg.guidance_high},
        {"add_noise": "disable", "steps": [split_id, 2], "start_at_step": [split_id, 1], "end_at_step": 10000,
         "return_with_leftover_noise": "disable", "cfg": cfg.guidance_low},
    ]  # fmt: skip
    for k, want in zip(k_ids, expected):
        got = wf4[k]["inputs"]
        assert {key: got[key] for key in want} == want
        assert (got["sampler_name"], got["scheduler"], got["noise_seed"]) == (cfg.sampler, cfg.scheduler, cfg.seed)
        # the values stored in the linked widgets agree, for anyone reading the file without the links
        assert (stored[k]["inputs"]["steps"], stored[k]["inputs"]["end_at_step" if want["add_noise"] == "enable"
                else "start_at_step"]) == (cfg.steps, split)  # fmt: skip
    assert all(n["inputs"]["shift"] == [split_id, 3] for n in wf4.values() if n["class_type"] == "ModelSamplingSD3")
    assert all(n["inputs"]["shift"] == cfg.shift for n in stored.values() if n["class_type"] == "ModelSamplingSD3")
    latent = _inputs(wf4, "EmptyHunyuanLatentVideo")
    assert (latent["width"], latent["height"], latent["length"], latent["batch_size"]) == (
        cfg.width, cfg.height, cfg.num_frames, 1)
    texts = sorted(n["inputs"]["text"] for n in wf4.values() if n["class_type"] == "CLIPTextEncode")
    assert texts == sorted([cfg.prompts[0], cfg.negative_prompt]) and len(cfg.prompts) == 1
    strengths = {n["inputs"]["lora_name"].split("_")[-2]: n["inputs"]["strength_model"]
                 for n in wf4.values() if n["class_type"] == "LoraLoaderModelOnly"}  # fmt: skip
    assert strengths == {"high": cfg.lora_strength_high, "low": cfg.lora_strength_low}
    assert _inputs(wf4, "CreateVideo")["fps"] == cfg.fps