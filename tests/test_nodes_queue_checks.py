"""Widget values checked as a real ComfyUI server checks them when a prompt is queued (``comfy_fakes.validate``
follows execution.py's ``validate_inputs``), and the refusals and messages of the pack's nodes for values that would
otherwise go silently wrong (audit F: combos as lists, paths leaving ComfyUI's folders, an unused source, LoRA names,
messages in widget terms)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import comfy_fakes as F  # noqa: E402
from test_nodes import N, clips, host, pack, widgets  # noqa: E402, F401  (fixtures)

from trainer_core.config import DatasetConfig  # noqa: E402
from trainer_core.data import build_dataset, make_synthetic_dataset  # noqa: E402
from trainer_core.data.captions import TRIGGER_TOKEN  # noqa: E402
from trainer_core.errors import ConfigError, TrainerError  # noqa: E402


def test_every_fixed_choice_widget_is_a_list_so_comfyui_checks_it_when_queued(N):
    # ComfyUI checks "Value not in list" only for isinstance(input_type, list): a tuple combo passes any value
    for node_id, cls in N.items():
        spec = cls.INPUT_TYPES()
        for name, (kind, *_) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            assert not isinstance(kind, tuple), f"{node_id}.{name} is a tuple combo"
    hw, ps = N["Wan22ConfigureHardware"], N["Wan22PreviewSample"]
    assert F.validate(hw, widgets(hw, gpu_placement="pipeline")) == [
        ("gpu_placement", "Value not in list: gpu_placement: 'pipeline' not in "
                          "['data parallel', 'expert groups', 'shard experts']")]
    errors = F.validate(ps, widgets(ps, prompts="a cat", sampler="dpmpp_2m", experts=["1", 0]))
    assert [name for name, _ in errors] == ["sampler"]  # at queue time, before a training upstream runs
    split = N["Wan22SplitStep"]
    assert [n for n, _ in F.validate(split, widgets(split, scheduler="karras"))] == ["scheduler"]
    # the boundaries Preview Sample renders (strictly between 0 and 1, steps of 0.001) queue here too
    for boundary in (0.001, 0.995, 0.999):
        assert F.validate(split, widgets(split, boundary=boundary)) == []
        assert F.validate(ps, widgets(ps, prompts="a cat", boundary=boundary, experts=["1", 0])) == []


def test_a_missing_model_file_is_refused_when_queued_except_with_source_tiny(N, host):
    """Load Experts checks its file combos itself (ComfyUI skips "Value not in list" for them): a workflow saved with
    file names this installation lacks still queues with source tiny, which reads no file."""
    ex = N["Wan22LoadExperts"]
    missing = widgets(ex, source="comfy files", high_noise_model="nonexistent.safetensors")
    errors = F.validate(ex, missing)
    assert errors and all("high_noise_model 'nonexistent.safetensors' is not in ComfyUI's models/diffusion_models"
                          in m for _, m in errors)
    assert F.validate(ex, {**missing, "source": "tiny"}) == []


def test_preview_sample_checks_its_boundary_when_queued_naming_its_own_widget(N):
    ps = N["Wan22PreviewSample"]
    good = widgets(ps, prompts="a cat", experts=["1", 0])
    assert F.validate(ps, good) == []
    for boundary in (0.0, 1.0):
        errors = F.validate(ps, {**good, "boundary": boundary})
        # attached to the inputs VALIDATE_INPUTS takes only (ComfyUI attaches its message to each of them)
        assert {n for n, _ in errors} == set(ps.CHECKED_EARLY) and len({m.split(" - ", 1)[1] for _, m in errors}) == 1
        message = errors[0][1].split(" - ", 1)[1]
        assert message.startswith("Preview Sample: 'boundary': boundary must lie strictly between 0 and 1")
        assert "Configure MultiStage" not in message
    # widgets it does not take keep ComfyUI's own limits, each on its own widget
    assert F.validate(ps, {**good, "steps": 0}) == [("steps", "Value 0 smaller than min of 1")]
    # and those it takes are checked against their widget limits there
    assert "width 99984 is above its maximum" in F.validate(ps, {**good, "width": 99984})[0][1]


def test_preview_sample_boundary_fed_at_run_time_names_its_own_widget(N):
    ps = N["Wan22PreviewSample"]
    with pytest.raises(ConfigError, match=r"^Preview Sample: 'boundary': boundary must lie strictly") as exc:
        F.call(ps, experts=None, **widgets(ps, prompts="a cat", boundary=1.0))
    assert "Configure MultiStage" not in str(exc.value)


@pytest.mark.parametrize("node_id, widget, value, folder", [
    ("Wan22BuildVideoDataset", "folder", "..", "input"),
    ("Wan22SaveCheckpoint", "output_dir", "../escape", "output"),
    ("Wan22ConfigureHardware", "text_cache_dir", "../../escape_tc", "output"),
])
def test_a_relative_path_may_not_leave_its_comfyui_folder(N, host, node_id, widget, value, folder):
    cls = N[node_id]
    with pytest.raises(ConfigError, match=rf"^{cls.__name__[:0]}.*{widget} '{value}' leads out of ComfyUI's "
                                          rf"{folder} folder"):
        F.call(cls, **widgets(cls, **{widget: value}))


def test_quantize_cache_dir_and_diffusers_folder_stay_inside_models(N, host):
    q, ex = N["Wan22QuantizeARA"], N["Wan22LoadExperts"]
    (bundle,) = F.call(ex, **widgets(ex, source="tiny"))
    with pytest.raises(ConfigError, match=r"^Quantize ARA: adapter_cache_dir '../../escape_ara' leads out of "
                                          r"ComfyUI's models folder - give a folder inside it, or an absolute path$"):
        F.call(q, experts=bundle, **widgets(q, transformer="4bit_ara", adapter_cache_dir="../../escape_ara"))
    inside = F.call(q, experts=bundle, **widgets(q, transformer="4bit_ara", adapter_cache_dir="a/../cache"))[0]
    assert inside.quant.ara_cache_dir == str(host.root / "models" / "a" / ".." / "cache")
    with pytest.raises(ConfigError, match=r"folder_or_repo '../../x' leads out of ComfyUI's models/diffusers"):
        F.call(ex, **widgets(ex, source="diffusers folder", folder_or_repo="../../x"))
    assert N["Wan22BuildVideoDataset"].IS_CHANGED(folder="..") == ".."  # nothing walked; build() refuses it


def test_a_source_that_leaves_a_setting_unused_is_refused(N, host):
    ex = N["Wan22LoadExperts"]
    files = {"high_noise_model": "h.safetensors", "low_noise_model": "l.safetensors",
             "text_encoder": "t.safetensors", "vae": "v.safetensors"}  # fmt: skip
    for name, kind in (("h", "diffusion_models"), ("l", "diffusion_models"), ("t", "text_encoders"), ("v", "vae")):
        (host.folder(kind) / f"{name}.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^Load Wan22 Experts: source 'HF repo id' reads nothing from "
                                          r"folder_or_repo when all four files are picked"):
        F.call(ex, **widgets(ex, source="HF repo id", folder_or_repo="nobody/nothing", **files))
    with pytest.raises(ConfigError, match=r"folder_or_repo 'Wan-AI/x' is not read with source 'comfy files'"):
        F.call(ex, **widgets(ex, source="comfy files", folder_or_repo="Wan-AI/x", **files))
    # one file from the repo: the repo is used
    (bundle,) = F.call(ex, **widgets(ex, source="HF repo id", folder_or_repo="nobody/nothing",
                                     **{**files, "vae": "none"}))
    assert bundle.model.source == "nobody/nothing" and bundle.model.vae is None


@pytest.mark.parametrize("given, used", [("x.safetensors", "x"), ("sub/x.SAFETENSORS", "sub/x"), ("x", "x")])
def test_lora_name_drops_the_file_extension(N, host, given, used):
    sv = N["Wan22SaveCheckpoint"]
    assert F.call(sv, **widgets(sv, lora_name=given))[0].lora_name == used


@pytest.mark.parametrize("given", ["x_high_noise", "x_low_noise.safetensors"])
def test_lora_name_with_a_suffix_of_the_pair_is_refused(N, host, given):
    sv = N["Wan22SaveCheckpoint"]
    with pytest.raises(ConfigError, match=r"^Save Checkpoint: lora_name .* ends in a suffix of the pair - give the "
                                          r"name without it: _high_noise / _low_noise.safetensors are added to it$"):
        F.call(sv, **widgets(sv, lora_name=given))


def test_settings_node_messages_name_widgets_without_section_tags(N, host):
    opt, reg, hw = N["Wan22ConfigureOptimizer"], N["Wan22ConfigureRegularizers"], N["Wan22ConfigureHardware"]
    with pytest.raises(ConfigError, match=r"^Configure Optimizer: adam_beta1 must lie in \[0, 1\)"):
        F.call(opt, **widgets(opt, adam_beta1=1.0))
    with pytest.raises(ConfigError, match=r"^Configure Optimizer: adam_beta2 must lie"):
        F.call(opt, **widgets(opt, adam_beta2=1.0))
    with pytest.raises(ConfigError, match=r"^Configure Regularizers: 'ema_decay'"):
        F.call(reg, **widgets(reg, ema_decay=1.0))
    with pytest.raises(ConfigError, match=r"^Configure Hardware: 'device'"):
        F.call(hw, **widgets(hw, device="mps"))


def test_quantize_messages_name_its_adapter_widgets_and_show_a_value_once(N, host, tmp_path):
    q, ex = N["Wan22QuantizeARA"], N["Wan22LoadExperts"]
    (bundle,) = F.call(ex, **widgets(ex, source="tiny"))
    with pytest.raises(ConfigError) as exc:
        F.call(q, experts=bundle, **widgets(q, adapter_path="/etc/passwd"))
    assert str(exc.value) == ("Quantize ARA: adapter / adapter_path must be 'compute' or a .safetensors adapter "
                              "file, got '/etc/passwd'")
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    with pytest.raises(TrainerError) as exc:
        F.call(q, experts=bundle, **widgets(q, transformer="none", adapter_path=str(adapter)))
    assert "ara_source" not in str(exc.value) and "set adapter to compute" in str(exc.value)


def test_dataset_messages_name_build_video_dataset_widgets(N, host, clips):
    ds = N["Wan22BuildVideoDataset"]
    with pytest.raises(ConfigError) as exc:
        F.call(ds, **widgets(ds, folder="clips", is_regularization=True, num_frames=5, resolutions="32"))
    assert "datasets[" not in str(exc.value) and "(is_regularization: true)" in str(exc.value)
    with pytest.raises(TrainerError) as exc:
        F.call(ds, **widgets(ds, folder="clips", num_frames=13, short_clip="skip", frame_sampling="uniform",
                             resolutions="32"))
    text = str(exc.value)
    assert text.startswith("Build Video Dataset #1: no usable clip") and "datasets[" not in text
    assert "frame_sampling=uniform" not in text and "set short_clip=pad or stretch" in text


def test_dataset_report_speaks_of_frames_in_words(host, clips):
    def report(**settings):
        cfg = DatasetConfig(folder=str(clips), resolutions=[32], **settings)
        return build_dataset([cfg], TRIGGER_TOKEN, seed=0).report()

    assert "every frame" in report(num_frames=5, frame_sampling="stride", fps=16) and "1th" not in report(
        num_frames=5, frame_sampling="stride", fps=16)
    long = make_synthetic_dataset(host.root / "input" / "long", n_clips=1, num_frames=33, size=(32, 32), seed=0)
    cfg = DatasetConfig(folder=str(long), resolutions=[32], num_frames=5, frame_sampling="aitoolkit_uniform")
    assert "aitoolkit_uniform sampling plays 1 clip(s)" in build_dataset([cfg], TRIGGER_TOKEN, seed=0).report()
    with pytest.raises(TrainerError, match="use frame_sampling=uniform, or set short_clip=pad or stretch"):
        report(num_frames=9, frame_sampling="stride", short_clip="skip", fps=16)
