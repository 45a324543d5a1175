"""Regenerate the example workflows (UI format) and their .jpg thumbnails from the pack's node definitions.

Run from the repository root: ``python scripts/make_workflows.py``. Widget values are written in the order
of each node's INPUT_TYPES, so the files stay in step with the nodes. Core ComfyUI nodes are described in ``CORE``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

from PIL import Image, ImageDraw

from trainer_core.config import SampleConfig
from trainer_core.sample import split_step

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "example_workflows"

HIGH, LOW = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
TE, VAE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"
#: LiteGraph draws a node's title bar above its ``pos`` (NODE_TITLE_HEIGHT): a node placed right below another must
#: leave this much room for its own title, plus a gap.
TITLE_HEIGHT, GAP = 30, 10

#: Core nodes used here: link inputs, outputs, widget names (a seed's control value follows it in widgets_values).
CORE = {
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "LoraLoaderModelOnly": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "ModelSamplingSD3": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyHunyuanLatentVideo": ([], [("LATENT", "LATENT")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "KSamplerAdvanced": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        [("LATENT", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO")], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
}


def load_pack():
    """Import the pack as ComfyUI does, with a minimal folder_paths listing the template's file names."""
    fp = types.ModuleType("folder_paths")
    files = {"diffusion_models": [HIGH, LOW], "text_encoders": [TE], "vae": [VAE]}
    fp.get_filename_list = lambda kind: files.get(kind, [])
    sys.modules.setdefault("folder_paths", fp)
    spec = importlib.util.spec_from_file_location("wan22_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["wan22_pack"] = module
    spec.loader.exec_module(module)
    return module


class Workflow:
    """Builds a UI-format graph: nodes with typed slots, links, widget values in input order."""

    def __init__(self, pack):
        self.pack, self.nodes, self.links = pack, [], []

    def _spec(self, kind: str):
        cls = self.pack.NODE_CLASS_MAPPINGS.get(kind)
        if cls is None:
            return CORE[kind]
        spec = cls.INPUT_TYPES()
        inputs = [(n, t) for s in ("required", "optional") for n, (t, *_) in spec.get(s, {}).items()
                  if isinstance(t, str) and t not in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        return inputs, list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))

    def widgets(self, kind: str, **values) -> list:
        """The pack node's widget values in input order (defaults where not given)."""
        spec = self.pack.NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()
        out, unknown = [], set(values)
        for section in ("required", "optional"):
            for name, (t, *rest) in spec.get(section, {}).items():
                opts = rest[0] if rest else {}
                if isinstance(t, str) and t not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    continue
                out.append(values.get(name, opts.get("default", t[0] if isinstance(t, tuple) else None)))
                unknown.discard(name)
                if opts.get("control_after_generate"):
                    out.append("fixed")
        assert not unknown, f"{kind}: no widgets {unknown}"
        return out

    def add(self, kind: str, pos: tuple[int, int], widgets: list, size=(320, 120), title: str | None = None) -> int:
        inputs, outputs = self._spec(kind)
        node = {
            "id": len(self.nodes) + 1,
            "type": kind,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": kind},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def below(self, node_id: int) -> int:
        """The ``y`` of a node placed under ``node_id``: its title bar clears the other node's body."""
        node = self.nodes[node_id - 1]
        return node["pos"][1] + node["size"][1] + TITLE_HEIGHT + GAP

    def connect_widget(self, src: int, slot: int, dst: int, widget: str, kind: str) -> None:
        """Feed widget ``widget`` of node ``dst`` from an output (the UI's widget-to-input socket)."""
        self.nodes[dst - 1]["inputs"].append({"name": widget, "type": kind, "widget": {"name": widget}, "link": None})
        self.connect(src, slot, dst, widget)

    def connect(self, src: int, slot: int, dst: int, input_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        k = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        link_id = len(self.links) + 1
        kind = s["outputs"][slot]["type"]
        self.links.append([link_id, src, slot, dst, k, kind])
        s["outputs"][slot]["links"].append(link_id)
        d["inputs"][k]["link"] = link_id

    def dump(self, name: str, title: str, notes: str) -> None:
        graph = {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"title": title, "notes": notes},
            "version": 0.4,
        }
        (HERE / f"{name}.json").write_text(json.dumps(graph, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        thumbnail(self, title).save(HERE / f"{name}.jpg", quality=70, optimize=True)


def thumbnail(wf: Workflow, title: str) -> Image.Image:
    """A small diagram of the graph: one box per node at its position, links as lines."""
    xs = [n["pos"][0] for n in wf.nodes] + [n["pos"][0] + n["size"][0] for n in wf.nodes]
    ys = [n["pos"][1] for n in wf.nodes] + [n["pos"][1] + n["size"][1] for n in wf.nodes]
    x0, y0 = min(xs), min(ys)
    w, h, pad = 480, 300, 16
    scale = min((w - 2 * pad) / (max(xs) - x0), (h - 28 - pad) / (max(ys) - y0))  # the whole graph fits

    def p(x, y):
        return pad + (x - x0) * scale, 28 + (y - y0) * scale

    img = Image.new("RGB", (w, h), (32, 34, 40))
    draw = ImageDraw.Draw(img)
    draw.text((pad, 8), title, fill=(235, 235, 235))
    for _, src, _, dst, _, _ in wf.links:
        a, b = wf.nodes[src - 1], wf.nodes[dst - 1]
        draw.line([p(a["pos"][0] + a["size"][0], a["pos"][1] + 20), p(b["pos"][0], b["pos"][1] + 20)],
                  fill=(120, 160, 220), width=1)
    for n in wf.nodes:
        mine = n["type"].startswith("Wan22")
        box = [*p(*n["pos"]), *p(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])]
        draw.rectangle(box, fill=(70, 90, 60) if mine else (60, 62, 70), outline=(200, 200, 200))
        label = wf.pack.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"])
        draw.text((box[0] + 3, box[1] + 2), label[: max(4, int((box[2] - box[0]) / 6))], fill=(240, 240, 240))
    return img


#: Train LoRA's settings nodes: the input each feeds and the node's size.
SETTINGS_NODES = {
    "Wan22ConfigureOptimizer": ("optimizer_settings", (360, 150)),
    "Wan22ConfigureRegularizers": ("regularizers", (360, 200)),
    "Wan22ConfigureHardware": ("hardware", (360, 220)),
}


def training_graph(pack, *, experts: dict, quant: dict | None, dataset: dict, multistage: dict, save: dict,
                   train: dict, previews: dict | None, render: dict, settings: dict | None = None) -> Workflow:
    """Experts (+ Quantize ARA) + dataset (+ report) + multistage + save (+ previews) (+ the settings nodes in
    ``settings``: node type -> widget values, for a workflow that changes their defaults) -> Train LoRA -> loss
    plot, and a render with the trained pair."""
    wf = Workflow(pack)
    loader = wf.add("Wan22LoadExperts", (0, 0), wf.widgets(
        "Wan22LoadExperts", high_noise_model=HIGH, low_noise_model=LOW, text_encoder=TE, vae=VAE, **experts),
        (340, 420))
    model = loader
    if quant is not None:
        model = wf.add("Wan22QuantizeARA", (0, wf.below(loader)), wf.widgets("Wan22QuantizeARA", **quant), (340, 320))
        wf.connect(loader, 0, model, "experts")
    ds = wf.add("Wan22BuildVideoDataset", (0, wf.below(model)), wf.widgets("Wan22BuildVideoDataset", **dataset),
                (340, 560))
    report = wf.add("PreviewAny", (0, wf.below(ds)), [], (340, 200), title="Dataset report")
    ms = wf.add("Wan22ConfigureMultiStage", (380, 0), wf.widgets("Wan22ConfigureMultiStage", **multistage), (300, 150))
    sv = wf.add("Wan22SaveCheckpoint", (380, wf.below(ms)), wf.widgets("Wan22SaveCheckpoint", **save), (300, 230))
    tr = wf.add("Wan22TrainLoRA", (720, 0), wf.widgets("Wan22TrainLoRA", **train), (360, 690))
    wf.connect(ds, 1, report, "source")
    wf.connect(model, 0, tr, "experts")
    wf.connect(ds, 0, tr, "dataset")
    wf.connect(ms, 0, tr, "multistage")
    wf.connect(sv, 0, tr, "save")
    if previews is not None:
        pv = wf.add("Wan22ConfigureTrainingPreviews", (380, wf.below(sv)),
                    wf.widgets("Wan22ConfigureTrainingPreviews", **previews), (300, 480))
        wf.connect(pv, 0, tr, "previews")
    above = tr
    for kind, values in (settings or {}).items():
        link, size = SETTINGS_NODES[kind]
        above = wf.add(kind, (720, wf.below(above)), wf.widgets(kind, **values), size)
        wf.connect(above, 0, tr, link)
    loss = wf.add("PreviewImage", (1120, 0), [], (400, 260), title="Loss curve")
    wf.connect(tr, 1, loss, "images")
    sample = wf.add("Wan22PreviewSample", (1120, wf.below(loss)), wf.widgets("Wan22PreviewSample", **render),
                    (360, 560))
    wf.connect(model, 0, sample, "experts")
    wf.connect(tr, 0, sample, "lora")
    video = wf.add("CreateVideo", (1520, wf.below(loss)), [16], (220, 80))
    wf.connect(sample, 0, video, "images")
    save_video = wf.add("SaveVideo", (1520, wf.below(video)), ["video/wan22_lora_preview", "auto", "auto"], (260, 120))
    wf.connect(video, 0, save_video, "video")
    return wf


def native_render(pack, previews: dict, boundary: float) -> Workflow:
    """ComfyUI's own Wan 2.2 graph with the trained pair from models/loras (what Save Checkpoint copies there),
    rendering exactly what the training previews configured by ``previews`` show (the pack's native recipe)."""
    cfg = SampleConfig(prompts=[previews["prompts"]], **{k: v for k, v in previews.items()
                                                         if k in SampleConfig.model_fields and k != "prompts"})
    split = split_step(cfg.steps, cfg.shift, cfg.scheduler, boundary)
    wf = Workflow(pack)
    hi = wf.add("UNETLoader", (0, 0), [HIGH, "default"], (340, 90), title="High-noise expert")
    lo = wf.add("UNETLoader", (0, 130), [LOW, "default"], (340, 90), title="Low-noise expert")
    lh = wf.add("LoraLoaderModelOnly", (380, 0), ["my_character_high_noise.safetensors", cfg.lora_strength_high],
                (320, 90))
    ll = wf.add("LoraLoaderModelOnly", (380, 130), ["my_character_low_noise.safetensors", cfg.lora_strength_low],
                (320, 90))
    sh = wf.add("ModelSamplingSD3", (740, 0), [cfg.shift], (220, 60))
    sl = wf.add("ModelSamplingSD3", (740, 130), [cfg.shift], (220, 60))
    split_node = wf.add("Wan22SplitStep", (380, 620), wf.widgets(
        "Wan22SplitStep", steps=cfg.steps, shift=cfg.shift, scheduler=cfg.scheduler, boundary=boundary), (300, 170))
    clip = wf.add("CLIPLoader", (0, 260), [TE, "wan", "default"], (340, 110))
    pos = wf.add("CLIPTextEncode", (380, 260), [cfg.prompts[0]], (320, 140),
                 title="Positive (workflow 1's preview prompt)")
    neg = wf.add("CLIPTextEncode", (380, 440), [cfg.negative_prompt], (320, 140), title="Negative")
    latent = wf.add("EmptyHunyuanLatentVideo", (0, 420), [cfg.width, cfg.height, cfg.num_frames, 1], (300, 130))
    vae = wf.add("VAELoader", (0, 590), [VAE], (300, 60))
    k1 = wf.add("KSamplerAdvanced", (1000, 0), ["enable", cfg.seed, "fixed", cfg.steps, cfg.guidance_high,
                                                cfg.sampler, cfg.scheduler, 0, split, "enable"],
                (300, 330), title=f"High noise: steps 0-{split} (from Wan22 Split Step)")
    k2 = wf.add("KSamplerAdvanced", (1000, 370), ["disable", cfg.seed, "fixed", cfg.steps, cfg.guidance_low,
                                                  cfg.sampler, cfg.scheduler, split, 10000, "disable"],
                (300, 330), title=f"Low noise: steps {split}-end (from Wan22 Split Step)")
    dec = wf.add("VAEDecode", (1340, 0), [], (200, 50))
    video = wf.add("CreateVideo", (1340, 90), [cfg.fps], (220, 80))
    out = wf.add("SaveVideo", (1340, 210), ["video/wan22_lora", "auto", "auto"], (260, 120))
    for a, b, name in ((hi, lh, "model"), (lo, ll, "model"), (lh, sh, "model"), (ll, sl, "model"),
                       (sh, k1, "model"), (sl, k2, "model"), (k1, k2, "latent_image"), (latent, k1, "latent_image"),
                       (k2, dec, "samples"), (vae, dec, "vae"), (dec, video, "images"), (video, out, "video"),
                       (clip, pos, "clip"), (clip, neg, "clip")):
        wf.connect(a, 0, b, name)
    for k in (k1, k2):
        wf.connect(pos, 0, k, "positive")
        wf.connect(neg, 0, k, "negative")
    # The split node drives the switch step, both samplers' steps and both shifts: one place to change them.
    for slot, dst, name, kind in ((0, k1, "end_at_step", "INT"), (1, k2, "start_at_step", "INT"),
                                  (2, k1, "steps", "INT"), (2, k2, "steps", "INT"),
                                  (3, sh, "shift", "FLOAT"), (3, sl, "shift", "FLOAT")):
        wf.connect_widget(split_node, slot, dst, name, kind)
    return wf


#: Workflow 1's training previews; workflow 4 renders the same video natively.
CHARACTER_PREVIEWS = dict(prompts="sqz woman turns her head and smiles at the camera", width=512, height=512,
                          num_frames=33, steps=30, sample_every=250)
CHARACTER_BOUNDARY = 0.875  # Configure MultiStage's default in workflow 1


def main() -> None:
    pack = load_pack()
    character = training_graph(
        pack,
        experts=dict(low_vram=True, offload_blocks="auto"),
        quant=dict(transformer="auto", quantizer="nf4", adapter="compute", ara_rank=16, calibration_samples=8,
                   text_encoder="float8"),
        dataset=dict(folder="my_character", num_frames=33, resolutions="512", caption_dropout=0.05),
        multistage=dict(switch_every=10, boundary=CHARACTER_BOUNDARY),
        save=dict(save_every=250, keep_last=4, lora_name="my_character"),
        train=dict(job_name="my_character", trigger_word="sqz", rank=16, steps=2500, learning_rate=1e-4,
                   timestep_type="sigmoid", text_encoder_mode="cache"),
        previews=CHARACTER_PREVIEWS,
        render=dict(prompts="sqz woman walks through a park at sunset, camera tracking", width=512, height=512,
                    num_frames=33, steps=40),
    )
    character.dump("wan22_1_character_lora_24gb",
                   "1 Character LoRA, 24 GB: float8 or 4-bit ARA, Low VRAM, 512 px, 33 frames, switch every 10",
                   "Put 10-30 captioned clips in ComfyUI/input/my_character (use the trigger word sqz in the captions "
                   "or [trigger]). The 24 GB recipe: experts in float8 on cards with fp8 matmuls (RTX 40xx/50xx), "
                   "else in 4 bits with accuracy recovery adapters (RTX 30xx, A6000: computed on the first run from "
                   "your clips, cached beside the model files), float8 text encoder, captions encoded once and "
                   "cached, only the expert being trained on the GPU, and as few blocks streamed from host memory as "
                   "the card needs. DOP (class person) is worth a try for characters: see workflow 3.")
    motion = training_graph(
        pack,
        experts={},
        quant=None,
        dataset=dict(folder="my_motion", num_frames=81, frame_sampling="fps", resolutions="768, 1024",
                     caption_dropout=0.05),
        multistage=dict(switch_every=1),
        save=dict(save_every=500, keep_last=6, lora_name="my_motion"),
        train=dict(job_name="my_motion", trigger_word="", rank=32, steps=2000, learning_rate=1e-4,
                   timestep_type="linear", timestep_bias="balanced"),
        previews=None,
        render=dict(prompts="a drone shot circling a lighthouse, waves crashing", width=832, height=480,
                    num_frames=81, steps=40),
    )
    motion.dump("wan22_2_motion_lora_h100", "2 Motion LoRA, H100/H200: 768-1024 px, 81 frames, switch every 1",
                "Both experts stay resident; frames sampled at 16 fps so motion trains at real speed.")
    style = training_graph(
        pack,
        experts={},
        quant=dict(transformer="float8", text_encoder="float8"),
        dataset=dict(folder="my_style", num_frames=41, resolutions="768", caption_dropout=0.05, prepend_trigger=True),
        multistage=dict(switch_every=1),
        save=dict(save_every=250, keep_last=6, lora_name="my_style"),
        train=dict(job_name="my_style", trigger_word="zxqstyle", rank=16, steps=3000, learning_rate=1e-4,
                   timestep_type="linear", timestep_bias="high_noise"),
        settings={"Wan22ConfigureRegularizers": dict(dop=True, dop_multiplier=1.0, dop_class="scene", ema=True,
                                                     ema_decay=0.999)},
        previews=dict(prompts="zxqstyle, a lighthouse on a cliff at dusk, waves crashing", width=768, height=768,
                      num_frames=41, steps=30, sample_every=250),
        render=dict(prompts="zxqstyle, a busy market street in the rain, people with umbrellas", width=832,
                    height=480, num_frames=81, steps=40),
    )
    style.dump("wan22_3_style_lora_dop",
               "3 Style LoRA with DOP, H100/H200: float8 experts, 768 px, 41 frames, favor high noise, EMA",
               "Put 10-40 clips or stills of the style in ComfyUI/input/my_style; the trigger word zxqstyle is put "
               "in front of every caption. DOP (class 'scene', on Configure Regularizers) keeps prompts without the "
               "trigger in the base model's look; it costs about three passes per step. The output pair is the EMA "
               "of the LoRA.")
    native_render(pack, CHARACTER_PREVIEWS, CHARACTER_BOUNDARY).dump(
        "wan22_4_render_trained_pair_native", "4 Render a trained pair, native Wan 2.2 graph",
        "Renders exactly what workflow 1's training previews show, with the pair Save Checkpoint copied into "
        "models/loras (my_character_*_noise): same prompt, negative prompt, seed, size, frames, steps, shift, "
        "sampler/scheduler and CFG per expert. Wan22 Split Step computes the expert switch step from steps, shift, "
        "scheduler and boundary and feeds both KSamplerAdvanced nodes and both ModelSamplingSD3 nodes; to keep this "
        "graph in step with the previews, set the same steps, shift, scheduler and boundary there as in Configure "
        "Training Previews / Configure MultiStage, and the same CFG, seed, size and prompts (the preview video's "
        "metadata and the Train LoRA node text state the recipe).")


if __name__ == "__main__":
    main()
