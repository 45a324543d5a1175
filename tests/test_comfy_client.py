"""The e2e benchmark's ComfyUI client turns saved workflows into the prompts the workflow tests' converter gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_workflows as W  # noqa: E402

from benchmarks.comfy_client import node_defaults, to_api  # noqa: E402
from benchmarks.e2e_fullscale import comfy_prompt  # noqa: E402

pack = W.pack  # the workflow tests' fixture: this pack loaded against ComfyUI fakes


def _object_info(pack, kinds) -> dict:
    """``/object_info`` as a server with this pack and the listed core nodes answers it (inputs only)."""
    info = {}
    for kind in kinds:
        inputs, _ = W.node_spec(pack, kind)
        combo = lambda t: [] if t == W.MODEL_FILE else t  # noqa: E731 - a model-file list is a combo of names
        required = {name: [t] if opts is None else [combo(t), opts] for name, t, opts in inputs}
        info[kind] = {"input": {"required": required}}
    return info


@pytest.mark.parametrize("path", W.WORKFLOWS, ids=lambda p: p.stem)
def test_saved_workflows_become_the_same_prompts(pack, path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    info = _object_info(pack, {n["type"] for n in workflow["nodes"]})
    reference = {str(k): {**v, "inputs": {n: [str(x[0]), x[1]] if isinstance(x, list) and len(x) == 2
                                          and isinstance(x[0], int) else x for n, x in v["inputs"].items()}}
                 for k, v in W.to_api(pack, workflow).items()}  # fmt: skip
    assert to_api(workflow, info, {}) == reference


def test_the_comfy_phase_prompt_is_workflow_2_with_float8_experts(pack, tmp_path):
    workflow = json.loads(W.WORKFLOWS[1].read_text(encoding="utf-8"))
    info = _object_info(pack, {n["type"] for n in workflow["nodes"]} | {"Wan22QuantizeARA"})
    args = type("Args", (), {"tiny": False, "root": tmp_path, "comfy_steps": 8, "preview_steps": 4,
                             "comfy_text_encoder": "float8"})()
    prompt = comfy_prompt(args, info)
    quant = prompt["quant"]["inputs"]
    assert prompt["quant"]["class_type"] == "Wan22QuantizeARA" and quant["transformer"] == "float8"
    assert quant["text_encoder"] == node_defaults(info, "Wan22QuantizeARA")["text_encoder"] == "float8"
    assert node_defaults(info, "Wan22QuantizeARA")["quantizer"] == quant["quantizer"] == "nf4"
    loader = next(i for i, n in prompt.items() if n["class_type"] == "Wan22LoadExperts")
    assert quant["experts"] == [loader, 0]
    users = [n for n in prompt.values() if n["class_type"] in ("Wan22TrainLoRA", "Wan22PreviewSample")]
    assert len(users) == 2 and all(n["inputs"]["experts"] == ["quant", 0] for n in users)
    train = next(n["inputs"] for n in users if n["class_type"] == "Wan22TrainLoRA")
    assert (train["steps"], train["rank"], train["optimizer"]) == (8, 16, "adamw")
    data = next(n["inputs"] for n in prompt.values() if n["class_type"] == "Wan22BuildVideoDataset")
    assert (data["folder"], data["num_frames"], data["resolutions"], data["cache_latents"]) == ("clips_a", 33, "512",
                                                                                                 True)
    assert next(n["inputs"] for n in prompt.values() if n["class_type"] == "Wan22LoadExperts")["high_noise_model"] \
        == "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"


def test_comfy_server_passes_extra_arguments_to_main_py(tmp_path):
    """``--comfy-args`` of e2e_fullscale's comfy phase (e.g. --disable-cuda-malloc) reach ComfyUI's command line."""
    import sys

    from benchmarks.comfy_client import ComfyServer

    comfy = tmp_path / "comfy"
    comfy.mkdir()
    (comfy / "main.py").write_text("import sys; print(sys.argv[1:])")
    server = ComfyServer(comfy, tmp_path / "base", sys.executable, tmp_path / "comfy.log", cpu=True, env={},
                         extra=("--disable-cuda-malloc",))
    assert server.proc.wait(60) == 0
    server.stop()
    argv = (tmp_path / "comfy.log").read_text()
    assert argv.rstrip().endswith("'--cpu', '--disable-cuda-malloc']") and "'--base-directory'" in argv
