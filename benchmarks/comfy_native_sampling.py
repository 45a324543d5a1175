"""The pack's preview sampler vs ComfyUI's own native Wan 2.2 graph (a numeric check against a real ComfyUI,
outside the test suite; CPU, no network).

Same tiny experts (tests/model_fixtures.py, saved in ComfyUI's single-file layout, float32, loaded by ComfyUI's
UNETLoader), same LoRA pair (the pack's ComfyUI-format files, loaded by LoraLoaderModelOnly), same text embeddings
(conditioning) and seed. ComfyUI runs ModelSamplingSD3 + EmptyHunyuanLatentVideo + two KSamplerAdvanced with the
settings parsed from the recipe the preview states (default preview settings) or read from example workflow 4
(whose preview side is workflow 1's training previews), each with CFG on and off and with and without the LoRA.
Printed per case: the final latents' relative L2 difference in ComfyUI's LATENT space (KSamplerAdvanced's output)
and in the sampling space, the recipe, how far the LoRA itself moves ComfyUI's output, and the worst case against a
1e-5 target.

ComfyUI is imported at run time from the folder given with --comfy (nothing of it is copied here); the pack is this
repository (found from this file's location), imported ahead of any installed copy. ComfyUI's python needs the
pack's requirements (`<ComfyUI's python> -m pip install -e <this repository>` installs them). All files are written
to a temporary folder; ComfyUI's own model folders are not touched.

With ``--unipc``: the default preview with ``sampler: diffusers_unipc`` (diffusers' UniPC, Wan's own solver) against
ComfyUI's graph with every native sampler/scheduler pair of ``--pairs`` at the same steps, split, shift and cfg,
with and without the LoRA; printed: each pair's relative difference, the closest pair, and the LoRA's own effect
(the README's "not reproducible natively" figure).

Run:  <ComfyUI's python> benchmarks/comfy_native_sampling.py --comfy /path/to/ComfyUI
      [--size 64x64x9 | --size native] [--only default|workflow4] [--lora both|on|off] [--cfg both|on|off]
      [--unipc [--pairs uni_pc/simple,euler/normal,...]]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time
from pathlib import Path

from comfy_boot import REPO, boot_comfy, load_module  # this folder's helper (the script's own path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--comfy", type=Path, default=Path.cwd(),
                     help="the ComfyUI folder (holding main.py and comfy/); default: the current folder")
    cli.add_argument("--size", default="64x64x9", help="WxHxF for every case, or 'native' for each case's own size")
    cli.add_argument("--only", choices=["default", "workflow4"], default=None)
    cli.add_argument("--lora", choices=["both", "on", "off"], default="both")
    cli.add_argument("--cfg", choices=["both", "on", "off"], default="both")
    cli.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    cli.add_argument("--unipc", action="store_true", help="diffusers' UniPC previews against native sampler pairs")
    cli.add_argument("--pairs", default=",".join(f"{a}/{b}" for a in ("uni_pc", "uni_pc_bh2", "euler", "dpmpp_2m")
                                                  for b in ("normal", "simple", "sgm_uniform", "beta")),
                     help="SAMPLER/SCHEDULER pairs for --unipc, comma-separated (default: uni_pc, uni_pc_bh2, "
                     "euler and dpmpp_2m, each with normal, simple, sgm_uniform and beta)")
    return cli.parse_args(argv)


def _import_comfy(comfy_dir: Path) -> None:
    """Imports ComfyUI (on the CPU) from comfy_dir, the pack and its test fixtures from this repository."""
    global comfy, torch, folder_paths, comfy_nodes, EmptyHunyuanLatentVideo, ModelSamplingSD3
    global LoraConfig, SampleConfig, attach_lora, lora_parameters, save_lora
    global attach_lora_file, encode_sample_prompts, native_recipe, sample_latents, fixtures, pack
    boot_comfy(comfy_dir)
    import comfy.latent_formats
    import comfy.model_detection
    import comfy.utils
    import folder_paths
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    import torch
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from trainer_core.config import LoraConfig, SampleConfig
    from trainer_core.lora import attach_lora, lora_parameters, save_lora
    from trainer_core.sample import attach_lora_file, encode_sample_prompts, native_recipe, sample_latents

    fixtures = load_module("pack_model_fixtures", REPO / "tests" / "model_fixtures.py")
    pack = load_module("wan22_pack_check", REPO / "__init__.py")  # the node pack as ComfyUI loads it


PROMPT = "sqz woman turns her head and smiles at the camera"
BOUNDARY = 0.875
RECIPE = re.compile(
    r"ModelSamplingSD3 (?P<shift>[\d.]+) · KSamplerAdvanced (?P<sampler>\w+)/(?P<scheduler>\w+) (?P<steps>\d+) · "
    r"high 0→(?P<split>\d+) cfg (?P<cfg_high>[\d.]+) · low (?P=split)→(?P=steps) cfg (?P<cfg_low>[\d.]+) · "
    r"seed (?P<seed>\d+) · EmptyHunyuanLatentVideo (?P<w>\d+)×(?P<h>\d+)×(?P<f>\d+) · "
    r"LoRA strength (?P<s_high>[-\d.]+) / (?P<s_low>[-\d.]+)"
)


def setup(root: Path):
    """Tiny experts as ComfyUI files, a random LoRA pair as the pack's ComfyUI-format files, folders registered."""
    comps = fixtures.tiny_components()
    (root / "diffusion_models").mkdir()
    (root / "loras").mkdir()
    for name in ("high", "low"):
        fixtures.save_comfy_transformer(getattr(comps, name), root / "diffusion_models" / f"tiny_{name}.safetensors",
                                        dtype=torch.float32)
        model = copy.deepcopy(getattr(comps, name))
        lcfg = LoraConfig(rank=4, alpha=4.0)
        attach_lora(model, lcfg)
        gen = torch.Generator().manual_seed({"high": 1, "low": 2}[name])
        with torch.no_grad():
            for p in lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        save_lora(root / "loras" / f"tiny_lora_{name}_noise.safetensors", model, lcfg, torch.float32,
                  {"expert": f"{name}_noise"})
    folder_paths.add_model_folder_path("diffusion_models", str(root / "diffusion_models"))
    folder_paths.add_model_folder_path("loras", str(root / "loras"))
    return comps


def pack_latent(comps, root: Path, cfg: SampleConfig, lora: bool) -> torch.Tensor:
    """The pack's preview sampler (what Preview Sample / training previews denoise), experts with the LoRA files."""
    high, low = copy.deepcopy(comps.high), copy.deepcopy(comps.low)
    if lora:
        for name, model in (("high", high), ("low", low)):
            attach_lora_file(model, root / "loras" / f"tiny_lora_{name}_noise.safetensors", expert=name)
    cache = encode_sample_prompts(comps.text_encoder, comps.tokenizer, cfg)
    return sample_latents(high, low, cache, cfg, BOUNDARY)[0], cache


def comfy_latent(s: dict, cache, lora: bool) -> torch.Tensor:
    """ComfyUI's own graph: UNETLoader → LoraLoaderModelOnly → ModelSamplingSD3 → KSamplerAdvanced ×2."""
    models = {}
    for name in ("high", "low"):
        m = comfy_nodes.UNETLoader().load_unet(f"tiny_{name}.safetensors", "default")[0]
        if lora:
            m = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
                m, f"tiny_lora_{name}_noise.safetensors", s[f"s_{name}"])[0]
        models[name] = ModelSamplingSD3().patch(m, s["shift"])[0]
    latent = EmptyHunyuanLatentVideo().generate(s["w"], s["h"], s["f"], 1)[0]
    pos, neg = [[cache.embeddings[0:1], {}]], [[cache.negative_embedding, {}]]
    ks = comfy_nodes.KSamplerAdvanced()
    mid = ks.sample(models["high"], "enable", s["seed"], s["steps"], s["cfg_high"], s["sampler"], s["scheduler"],
                    pos, neg, latent, 0, s["high_end"], "enable")[0]
    out = ks.sample(models["low"], "disable", s["seed"], s["steps"], s["cfg_low"], s["sampler"], s["scheduler"],
                    pos, neg, mid, s["low_start"], 10000, "disable")[0]
    return out["samples"]


def from_recipe(recipe: str) -> dict:
    m = RECIPE.match(recipe)
    assert m, recipe
    g = m.groupdict()
    ints = {k: int(g[k]) for k in ("steps", "split", "seed", "w", "h", "f")}
    floats = {k: float(g[k]) for k in ("shift", "cfg_high", "cfg_low", "s_high", "s_low")}
    return {**g, **ints, **floats, "high_end": ints["split"], "low_start": ints["split"]}


def widgets_by_name(node_cls, values: list) -> dict:
    """A pack node's widgets_values as {name: value} (an extra control value follows a seed with a control)."""
    values, out = list(values), {}
    spec = node_cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            o = rest[0] if rest else {}
            if isinstance(kind, str) and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                continue
            out[name] = values.pop(0)
            if o.get("control_after_generate"):
                values.pop(0)
    return out


def workflow4_settings() -> tuple[SampleConfig, dict]:
    """(workflow 1's training-preview config, workflow 4's native settings read from its nodes)."""
    wf1 = json.loads((REPO / "example_workflows" / "wan22_1_character_lora_24gb.json").read_text())
    wf4 = json.loads((REPO / "example_workflows" / "wan22_4_render_trained_pair_native.json").read_text())
    previews = next(n for n in wf1["nodes"] if n["type"] == "Wan22ConfigureTrainingPreviews")
    cls = pack.NODE_CLASS_MAPPINGS["Wan22ConfigureTrainingPreviews"]
    cfg = cls().configure(**widgets_by_name(cls, previews["widgets_values"]))[0]
    by_type = {}
    for n in wf4["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    split_cls = pack.NODE_CLASS_MAPPINGS["Wan22SplitStep"]
    split_in = widgets_by_name(split_cls, by_type["Wan22SplitStep"][0]["widgets_values"])
    high_end, low_start, steps, shift = split_cls().split(**split_in)  # the node feeds these into the graph
    k_high, k_low = sorted(by_type["KSamplerAdvanced"], key=lambda n: n["widgets_values"][0] == "disable")
    w, h, f, _ = by_type["EmptyHunyuanLatentVideo"][0]["widgets_values"]
    loras = {n["widgets_values"][0].split("_")[-2]: n["widgets_values"][1] for n in by_type["LoraLoaderModelOnly"]}
    kv = k_high["widgets_values"]
    native = dict(shift=shift, steps=steps, high_end=high_end, low_start=low_start, seed=kv[1], cfg_high=kv[4],
                  cfg_low=k_low["widgets_values"][4], sampler=kv[5], scheduler=kv[6], w=w, h=h, f=f,
                  s_high=loras["high"], s_low=loras["low"])
    return cfg, native


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unipc_gap(opts: argparse.Namespace, size: tuple[int, int, int] | None) -> None:
    """diffusers' UniPC previews against ComfyUI's graph with each native sampler/scheduler pair (same steps, split,
    shift, cfg), with and without the LoRA; the closest pair beside the LoRA's own effect."""
    pairs = [tuple(p.split("/")) for p in opts.pairs.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        comps = setup(root)
        upd = dict(width=size[0], height=size[1], num_frames=size[2]) if size else {}
        euler = SampleConfig(prompts=[PROMPT], **upd)
        s = from_recipe(native_recipe(euler, BOUNDARY, 0))  # the same steps, split, shift, cfg and seed
        cfg = euler.model_copy(update={"sampler": "diffusers_unipc"})
        print(native_recipe(cfg, BOUNDARY, 0), flush=True)
        best = {}
        for lora in (False, True):
            ours, cache = pack_latent(comps, root, cfg, lora)
            for sampler, scheduler in pairs:
                theirs = comfy_latent({**s, "sampler": sampler, "scheduler": scheduler}, cache, lora)
                r = rel(comfy.latent_formats.Wan21().process_out(ours.clone()), theirs)
                print(f"{'lora' if lora else 'base':4s} {sampler}/{scheduler}: rel(LATENT) {r:.2e}", flush=True)
                if r < best.get(lora, (float("inf"),))[0]:
                    best[lora] = (r, f"{sampler}/{scheduler}", theirs)
        effect = rel(best[True][2], best[False][2])
        for lora in (False, True):
            print(f"closest native pair, {'with' if lora else 'without'} the LoRA: {best[lora][1]}, "
                  f"rel(LATENT) {best[lora][0]:.2e}")
        print(f"the LoRA's own effect on ComfyUI's output ({best[True][1]} / {best[False][1]}): {effect:.2e}")


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    _import_comfy(opts.comfy)
    torch.set_num_threads(opts.threads)
    comfy.utils.PROGRESS_BAR_ENABLED = False  # KSamplerAdvanced's tqdm bars
    size = None if opts.size == "native" else tuple(int(v) for v in opts.size.split("x"))
    if opts.unipc:
        unipc_gap(opts, size)
        return
    fmt = comfy.latent_formats.Wan21()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        comps = setup(root)
        cases = []
        if opts.only in (None, "default"):
            cases.append(("default preview", SampleConfig(prompts=[PROMPT]), None))
        if opts.only in (None, "workflow4"):
            cfg1, native4 = workflow4_settings()
            cases.append(("workflow 4 / wf1 previews", cfg1, native4))
        loras = {"both": (False, True), "on": (True,), "off": (False,)}[opts.lora]
        cfgs = {"both": (True, False), "on": (True,), "off": (False,)}[opts.cfg]
        for label, base, native in cases:
            for guided in cfgs:
                for lora in loras:
                    upd = {} if guided else {"guidance_high": 1.0, "guidance_low": 1.0}
                    if size:
                        upd |= dict(width=size[0], height=size[1], num_frames=size[2])
                    cfg = base.model_copy(update=upd)
                    recipe = native_recipe(cfg, BOUNDARY, 0)
                    s = from_recipe(recipe)
                    if native is not None:  # workflow 4's own nodes must state the same recipe
                        want = {**native, **({} if guided else {"cfg_high": 1.0, "cfg_low": 1.0})}
                        if size:
                            want |= dict(w=size[0], h=size[1], f=size[2])
                        assert all(s[k] == want[k] for k in want), (s, want)
                        s = {**s, **want}
                    t0 = time.time()
                    ours, cache = pack_latent(comps, root, cfg, lora)
                    t1 = time.time()
                    theirs = comfy_latent(s, cache, lora)
                    t2 = time.time()
                    r_latent = rel(fmt.process_out(ours.clone()), theirs)
                    r_sampling = rel(ours, fmt.process_in(theirs.clone()))
                    rows.append((label, "cfg" if guided else "no cfg", "lora" if lora else "base", recipe,
                                 r_latent, r_sampling, theirs))
                    print(f"{label:26s} {rows[-1][1]:6s} {rows[-1][2]:4s} rel(LATENT) {r_latent:.2e} "
                          f"rel(sampling) {r_sampling:.2e}  [{t1 - t0:.0f}+{t2 - t1:.0f} s]\n    {recipe}", flush=True)
    # the table: each case, and what the LoRA itself changes in ComfyUI's output (the scale to judge them by)
    print(f"\n{'case':26s} {'cfg':6s} {'LoRA':4s} {'rel(LATENT)':>12s} {'rel(sampling)':>14s} {'LoRA effect':>12s}")
    for row in rows:
        effect = "-"
        if row[2] == "lora":
            base = next((r for r in rows if r[:2] == row[:2] and r[2] == "base"), None)
            if base is not None:
                effect = f"{rel(row[6], base[6]):.2e}"
        print(f"{row[0]:26s} {row[1]:6s} {row[2]:4s} {row[4]:12.2e} {row[5]:14.2e} {effect:>12s}")
    worst = max(r[4] for r in rows)
    print(f"worst rel(LATENT) {worst:.2e} -> {'PASS' if worst <= 1e-5 else 'FAIL'} (target 1e-5)")


if __name__ == "__main__":
    main()
