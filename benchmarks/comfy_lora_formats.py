"""LoRA files of every format the pack reads, applied by the pack vs by ComfyUI's own UNETLoader +
LoraLoaderModelOnly (a numeric check against a real ComfyUI, outside the test suite; CPU, no network).

The tiny high-noise expert (tests/model_fixtures.py) is saved as a ComfyUI diffusion-model file (float32) and loaded
by UNETLoader; each format's file (tests/lora_fixtures.py: the same random LoRA in ComfyUI, no-alpha, ai-toolkit
lora_A/lora_B, diffusers, kohya/musubi and per-module-rank layouts) goes through LoraLoaderModelOnly at strengths 1
and 0.7, and ComfyUI's patched weights (ModelPatcher.patch_model) are compared with what the pack applies
(attach_lora_file: W + scaling * B @ A of the peft adapter, float64). Printed per format and strength: the largest
relative difference over the adapted weights, relative to the weight (|pack - comfy| / |comfy|) and to the LoRA's
patch (|pack - comfy| / |comfy - W|), and how many keys ComfyUI left unloaded.

ComfyUI maps no diffusers-named Wan key (only diffusion_model.<module> and lora_unet_<module>), so the diffusers
file is compared with ComfyUI's result for the same tensors under ComfyUI's lora_A/lora_B naming, and ComfyUI's own
result on the diffusers file is reported as its count of unloaded keys.

ComfyUI is imported at run time from the folder given with --comfy (nothing of it is copied here); the pack is this
repository (found from this file's location), imported ahead of any installed copy. ComfyUI's python needs the
pack's requirements (`<ComfyUI's python> -m pip install -e <this repository>` installs them). All files are written
to a temporary folder; ComfyUI's own model folders are not touched.

Run:  <ComfyUI's python> benchmarks/comfy_lora_formats.py --comfy /path/to/ComfyUI
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from pathlib import Path

from comfy_boot import REPO, boot_comfy, load_module  # this folder's helper (the script's own path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--comfy", type=Path, default=Path.cwd(),
                     help="the ComfyUI folder (holding main.py and comfy/); default: the current folder")
    cli.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return cli.parse_args(argv)


def _import_comfy(comfy_dir: Path) -> None:
    """Imports ComfyUI (on the CPU) from comfy_dir, the pack from this repository, and the pack's test fixtures."""
    global comfy, torch, folder_paths, comfy_nodes, LoraLayer, load_file, save_file
    global diffusers_module_to_original, attach_lora_file, model_fixtures, lora_fixtures
    boot_comfy(comfy_dir)
    import comfy.model_detection
    import folder_paths
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    from trainer_core.keys import diffusers_module_to_original
    from trainer_core.sample import attach_lora_file

    model_fixtures = load_module("pack_model_fixtures", REPO / "tests" / "model_fixtures.py")
    lora_fixtures = load_module("pack_lora_fixtures", REPO / "tests" / "lora_fixtures.py")


class _Unloaded(logging.Handler):
    """Counts ComfyUI's 'lora key not loaded' warnings."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record):
        if record.getMessage().startswith("lora key not loaded"):
            self.keys.append(record.getMessage())


def comfy_patched(file_name: str, strength: float, unloaded: _Unloaded) -> dict[str, torch.Tensor]:
    """ComfyUI's patched weights: UNETLoader -> LoraLoaderModelOnly -> ModelPatcher.patch_model()."""
    model = comfy_nodes.UNETLoader().load_unet("tiny_high.safetensors", "default")[0]
    unloaded.keys.clear()
    patched = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, file_name, strength)[0]
    patched.patch_model()
    sd = {k.removeprefix("diffusion_model."): v.detach().clone() for k, v in patched.model.diffusion_model.state_dict(
        prefix="diffusion_model.").items()}
    patched.unpatch_model()
    return sd


def pack_patched(base, path: Path, strength: float) -> dict[str, torch.Tensor]:
    """The pack's application (what Preview Sample, the sample CLI and training init use), as float64 weights."""
    model = copy.deepcopy(base)
    attach_lora_file(model, path, expert="high")
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
            w = layer.get_base_layer().weight.double()
            out[diffusers_module_to_original(name) + ".weight"] = w + strength * layer.scaling["default"] * (b @ a)
    return out


def compare(pack: dict, comfy: dict, base: dict) -> tuple[float, float]:
    to_weight = to_patch = 0.0
    for key, p in pack.items():
        c, w = comfy[key].double(), base[key].double()
        to_weight = max(to_weight, float((p - c).norm() / c.norm()))
        patch = (c - w).norm()
        if patch > 0:
            to_patch = max(to_patch, float((p - c).norm() / patch))
    return to_weight, to_patch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _import_comfy(args.comfy)
    torch.set_num_threads(args.threads)
    unloaded = _Unloaded()
    logging.getLogger().addHandler(unloaded)
    base = model_fixtures.tiny_components().high
    arch = dict(base.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("diffusion_models", "loras"):
            (root / sub).mkdir()
            folder_paths.add_model_folder_path(sub, str(root / sub))
        model_fixtures.save_comfy_transformer(base, root / "diffusion_models" / "tiny_high.safetensors",
                                              dtype=torch.float32)
        base_sd = {k: v for k, v in load_file(str(root / "diffusion_models" / "tiny_high.safetensors")).items()}
        for fmt in lora_fixtures.FORMATS:
            path = root / "loras" / f"{fmt}.safetensors"
            lora_fixtures.write_lora(fmt, path, arch, seed=7)
            comfy_name = path.name
            if fmt == "diffusers":  # ComfyUI's result for the same tensors under a naming it maps
                same = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in load_file(str(path)).items()}
                same = {_to_original(k): v for k, v in same.items()}
                save_file(same, str(root / "loras" / "diffusers_as_comfy.safetensors"))
                comfy_patched(path.name, 1.0, unloaded)
                rows.append((f"{fmt} (ComfyUI itself)", "-", "-", len(unloaded.keys)))
                comfy_name = "diffusers_as_comfy.safetensors"
            for strength in (1.0, 0.7):
                comfy_sd = comfy_patched(comfy_name, strength, unloaded)
                to_weight, to_patch = compare(pack_patched(base, path, strength), comfy_sd, base_sd)
                rows.append((f"{fmt} @ {strength}", f"{to_weight:.2e}", f"{to_patch:.2e}", len(unloaded.keys)))
    print(f"{'format':32} {'rel. to weight':>15} {'rel. to patch':>14} {'keys ComfyUI did not load':>26}")
    for name, a, b, n in rows:
        print(f"{name:32} {a:>15} {b:>14} {n:>26}")


def _to_original(key: str) -> str:
    """diffusion_model.blocks.N.<diffusers module>.lora_X.weight -> the original module name (ComfyUI's naming)."""
    prefix, rest = "diffusion_model.", key[len("diffusion_model."):]
    module, suffix = rest.rsplit(".lora_", 1)
    return f"{prefix}{diffusers_module_to_original(module)}.lora_{suffix}"


if __name__ == "__main__":
    main()
