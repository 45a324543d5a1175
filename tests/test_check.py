"""``python -m trainer_core check``: a job's dry run. Exit 0 when it can train, 2 with one named reason per problem
(bad model file, missing dataset folder, [trigger] without a trigger word, a card too small, a bad LoRA init file,
a file that does not decode), the dataset report, VRAM plan and host-RAM estimate; no model weight is loaded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from diffusers import WanTransformer3DModel

from tests.model_fixtures import save_comfy_files, save_comfy_transformer, save_diffusers_folder, tiny_components
from trainer_core import cli
from trainer_core.check import decode_failures
from trainer_core.config import job_from_dict
from trainer_core.data import build_dataset, make_synthetic_dataset
from trainer_core.errors import DatasetError
from trainer_core.memory import WAN22_A14B_ARCH, estimate_host_memory, estimate_peak_vram
from trainer_core.memory import planner
from trainer_core.memory.planner import GIB
from trainer_core.models.tiny import TINY_TRANSFORMER_CONFIG

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Every loader of model weights fails the test if the check calls it."""
    from trainer_core.models import loading, single_file
    from trainer_core.quant import ara_files

    def refuse(*args, **kwargs):
        raise AssertionError("check loaded model weights")

    for module, name in ((loading, "_expert"), (loading, "_vae"), (loading, "_text_encoder"),
                         (single_file, "load_transformer_file"), (single_file, "load_vae_file"),
                         (single_file, "load_text_encoder_file"), (ara_files, "read_adapter_file")):
        monkeypatch.setattr(module, name, refuse)


def _job(tmp_path: Path, **sections) -> Path:
    """The demo job (tiny preset, 8 synthetic clips) with ``sections`` merged in, written as YAML."""
    job = cli.demo_config(tmp_path / "out", steps=40)
    make_synthetic_dataset(job["datasets"][0]["folder"], n_clips=8, num_frames=9, size=(64, 64), seed=0)
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _check(capsys, path: Path, *args: str) -> tuple[int, str, list[str]]:
    """Exit status, stdout and the ``error:`` lines of ``check``."""
    status = cli.main(["check", str(path), *args])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.startswith("error: ")]


def test_the_demo_job_can_train(tmp_path, capsys):
    status, out, errors = _check(capsys, _job(tmp_path))
    assert (status, errors) == (0, [])
    assert "the job can train" in out
    assert "8 item(s)" in out and "64x64x9: 8" in out  # the dataset report
    assert "VRAM plan: peak" in out and "train.device is cpu" in out
    assert "host RAM: about" in out


def test_a_missing_model_file_is_named(tmp_path, capsys):
    path = _job(tmp_path, model={"high_noise": str(tmp_path / "nope.safetensors")})
    status, out, errors = _check(capsys, path)
    assert status == 2 and len(errors) == 1
    assert "model.high_noise" in errors[0] and "nope.safetensors" in errors[0]
    assert "the job cannot train (1 reason(s))" in out


def test_a_missing_dataset_folder_is_named(tmp_path, capsys):
    path = _job(tmp_path)
    job = yaml.safe_load(path.read_text())
    job["datasets"][0]["folder"] = str(tmp_path / "no_such_clips")
    path.write_text(yaml.safe_dump(job))
    status, _, errors = _check(capsys, path)
    assert status == 2 and len(errors) == 1
    assert "datasets[0].folder" in errors[0] and "does not exist" in errors[0]


def test_trigger_in_a_caption_without_a_trigger_word(tmp_path, capsys):
    path = _job(tmp_path, trigger_word=None)
    (tmp_path / "out" / "demo_clips" / "clip003.txt").write_text("[trigger] moves right")
    status, _, errors = _check(capsys, path)
    assert status == 2 and len(errors) == 1
    assert "clip003.txt uses [trigger] but no trigger word is set" in errors[0]


def test_a_job_that_does_not_fit_the_card(tmp_path, capsys):
    path = _job(tmp_path, train={"device": "auto"})
    status, out, errors = _check(capsys, path, "--gpu-gib", "1")  # the tiny job + memory.headroom_gib's 1 GiB
    assert status == 2 and len(errors) == 1
    assert "GiB of GPU memory but only 1.0 GiB are free" in errors[0]
    assert "planned for a card with 1 GiB free" in out
    status, out, errors = _check(capsys, path, "--gpu-gib", "24")
    assert (status, errors) == (0, []) and ": fits" in out


def test_a_bad_lora_init_file_is_named(tmp_path, capsys):
    bad = tmp_path / "init_high.safetensors"
    bad.write_bytes(b"not a safetensors file")
    status, _, errors = _check(capsys, _job(tmp_path, lora={"init_high": str(bad)}))
    assert status == 2 and len(errors) == 1
    assert "lora.init_high" in errors[0] and str(bad) in errors[0]


def test_every_stage_reports_its_reason(tmp_path, capsys):
    """Independent problems are listed together, one line each: fix them all before the next check."""
    path = _job(tmp_path, model={"vae": str(tmp_path / "vae.safetensors")}, train={"device": "auto"})
    job = yaml.safe_load(path.read_text())
    job["datasets"][0]["folder"] = str(tmp_path / "gone")
    path.write_text(yaml.safe_dump(job))
    status, out, errors = _check(capsys, path, "--gpu-gib", "1")
    assert status == 2 and len(errors) == 3
    assert ["model.vae" in errors[0], "datasets[0].folder" in errors[1], "GPU memory" in errors[2]] == [True] * 3
    assert all("\n" not in e for e in errors) and "Traceback" not in out


def test_a_bad_job_file_exits_2_with_the_setting(tmp_path, capsys):
    path = _job(tmp_path, multistage={"boundary": 1.5})
    status, _, errors = _check(capsys, path)
    assert status == 2 and "multistage.boundary" in errors[0]


def test_short_fps_windows_and_uncaptioned_files_are_reported(tmp_path, capsys):
    path = _job(tmp_path)
    job = yaml.safe_load(path.read_text())
    job["datasets"][0].update(frame_sampling="fps", fps=16.0, num_frames=33, default_caption="a square")
    path.write_text(yaml.safe_dump(job))
    (tmp_path / "out" / "demo_clips" / "clip005.txt").unlink()
    status, out, errors = _check(capsys, path)
    assert (status, errors) == (0, [])  # padded, as short_clip: pad says
    assert "8 short clip(s) padded" in out and "the 33-frame window at 16 fps needs 2.00 s" in out
    assert "1 of 8 usable file(s) have no .txt file" in out and "clip005.mp4" in out


def test_a_file_that_does_not_decode_is_a_reason(tmp_path, monkeypatch):
    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=3, num_frames=5, size=(32, 32), seed=0)
    cfg = job_from_dict({"model": {"source": "tiny"}, "datasets": [{"folder": str(clips), "num_frames": 5,
                                                                     "resolutions": [32, 48]}]})  # fmt: skip
    dataset = build_dataset(cfg.datasets, None, 0)
    original = dataset.frames
    decoded = []

    def frames(plan):
        decoded.append(plan.source.name)
        if plan.source.name == "clip001.mp4":
            raise DatasetError(f"cannot read media file {plan.source}: broken - re-encode it")
        return original(plan)

    monkeypatch.setattr(dataset, "frames", frames)
    failures = decode_failures(dataset)
    assert sorted(decoded) == ["clip000.mp4", "clip001.mp4", "clip002.mp4"]  # once per file, not per resolution
    assert len(failures) == 1 and "clip001.mp4" in failures[0] and "training would stop" in failures[0]


def test_progress_on_a_large_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "PROGRESS_FROM", 8)
    status, _, _ = _check(capsys, _job(tmp_path))
    assert status == 0
    # _check consumed the output: run again for stderr
    cli.main(["check", str(tmp_path / "job.yaml")])
    err = capsys.readouterr().err
    assert "scanning datasets[0]: 16/16" in err  # 8 clips + 8 captions
    assert "decoding one sample per file: 8/8" in err


def test_an_aitoolkit_job_file(tmp_path, capsys):
    job = yaml.safe_load((ROOT / "tests/data/aitoolkit/train_lora_wan22_14b_24gb.yaml").read_text())
    proc = job["config"]["process"][0]
    proc["training_folder"] = str(tmp_path / "out")
    proc["device"] = "cpu"
    proc["model"]["name_or_path"] = "tiny"
    clips = make_synthetic_dataset(tmp_path / "clips", n_clips=2, num_frames=5, size=(32, 32), seed=1)
    proc["datasets"][0].update(folder_path=str(clips), num_frames=5, resolution=[32])
    path = tmp_path / "ait.yaml"
    path.write_text(yaml.safe_dump(job))
    status, out, errors = _check(capsys, path)
    assert (status, errors) == (0, [])
    assert "warning: config.process[0].model.qtype is changed" in out


# ------------------------------------------------------------------------------------------- host-RAM estimate


def _a14b(**sections):
    job = {"model": {"high_noise": "high.safetensors", "low_noise": "low.safetensors"},
           "datasets": [{"folder": "clips", "num_frames": 33, "resolutions": [512]}]}  # fmt: skip
    job.update(sections)
    return job_from_dict(job)


def test_host_ram_of_the_24gb_recipe():
    """Low VRAM, 4-bit experts: the second bf16 expert loads beside the first one's pinned 4-bit copy."""
    cfg = _a14b(quant={"transformer": "4bit_ara"}, memory={"low_vram": True})
    plan = estimate_peak_vram(cfg, WAN22_A14B_ARCH, 24 * GIB)
    host = estimate_host_memory(cfg, plan)
    expert_bf16 = 26.6 * GIB  # FACTS.md: one expert's bf16 weights
    assert host.phase == "loading the experts"
    assert host.peak_bytes == pytest.approx(plan.host_bytes / 2 + expert_bf16, rel=0.01)
    assert sum(i.nbytes for i in host.phases["training"]) == plan.host_bytes > 0


def test_host_ram_when_the_experts_load_straight_to_the_gpu():
    """The trained expert stays whole on a big card: its ComfyUI file is read to it, and the text encoder is the
    largest host load."""
    cfg = _a14b(quant={"transformer": "float8"}, multistage={"train_low_noise": False})
    plan = estimate_peak_vram(cfg, WAN22_A14B_ARCH, 139 * GIB)
    host = estimate_host_memory(cfg, plan)
    assert "loading the experts" not in host.phases and plan.host_bytes == 0
    assert host.phase == "caption encoding"
    assert host.peak_bytes == pytest.approx((10.6 + 0.47) * GIB, rel=0.02)  # UMT5-XXL in bf16, the VAE in fp32


@pytest.mark.parametrize("ram_gib, warned", [(None, False), (1e-6, True), (64.0, False)])
def test_a_job_needing_more_host_ram_than_the_machine_has_is_warned(tmp_path, capsys, monkeypatch, ram_gib, warned):
    """The demo job's host peak against this machine's RAM (None: the OS does not say): a warning, not a reason."""
    monkeypatch.setattr(planner, "physical_memory", lambda: ram_gib and int(ram_gib * GIB))
    status, out, errors = _check(capsys, _job(tmp_path))
    assert (status, errors) == (0, [])
    line = re.search(r"warning: the job needs about (\S+) GiB of host RAM \((.+)\) but this machine has (\S+) GiB - "
                     r"expect swapping or an out-of-memory kill; see 'host RAM'", out)
    assert bool(line) == warned
    if warned:
        peak = re.search(r"host RAM: about (\S+) GiB at the peak, (.+)", out)
        assert line.group(1, 2) == peak.group(1, 2) and line[3] == "0.0"
    # planned for another card (--gpu-gib), the machine the job will run on is not this one: no RAM verdict
    status, out, _ = _check(capsys, _job(tmp_path / "other"), "--gpu-gib", "24")
    assert "of host RAM" not in out


def test_quant_auto_is_planned_for_the_card_checked(tmp_path, capsys):
    path = _job(tmp_path, train={"device": "auto"})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "quant": {"transformer": "auto"}}))
    status, out, errors = _check(capsys, path, "--gpu-gib", "24")
    assert (status, errors) == (0, []) and "quant.transformer: auto -> 4bit_ara on a card with 24 GiB free" in out
    status, out, errors = _check(capsys, path, "--gpu-gib", "24", "--gpu-fp8")
    assert (status, errors) == (0, []) and "auto -> float8 on a card with 24 GiB free (--gpu-gib) with fp8" in out
    status, _, errors = _check(capsys, path, "--gpu-fp8")
    assert status == 2 and errors == ["error: check: --gpu-fp8 describes the card of --gpu-gib - give --gpu-gib N "
                                      "too (a card here is asked directly)"]


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_check_creates_no_folder_or_file(tmp_path, capsys):
    """A dry run leaves the disk as it found it: the output and cache folders the run would create are probed in
    the nearest folder that exists, and nothing is left there."""
    out = tmp_path / "new" / "deeper"
    path = _job(tmp_path, save={"output_dir": str(out)},
                text_encoder={"cache_dir": str(tmp_path / "te_cache")})
    before = _tree(tmp_path)
    status, _, errors = _check(capsys, path)
    assert (status, errors) == (0, [])
    assert _tree(tmp_path) == before


def test_check_refuses_an_output_folder_below_a_file_without_creating_anything(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = _job(tmp_path, save={"output_dir": str(tmp_path / "afile" / "runs")})
    before = _tree(tmp_path)
    status, _, errors = _check(capsys, path)
    assert status == 2 and len(errors) == 1
    assert f"save.output_dir: cannot write to {tmp_path / 'afile' / 'runs'}: {tmp_path / 'afile'} is a file, not a " \
        "folder - choose a folder" in errors[0]
    assert _tree(tmp_path) == before


def test_a_job_without_datasets_is_one_reason(tmp_path, capsys):
    path = _job(tmp_path, datasets=[])
    status, _, errors = _check(capsys, path)
    assert status == 2 and errors == ["error: datasets: no dataset configured - add at least one folder under "
                                      "'datasets'"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset's ComfyUI files and diffusers folder (built before the test's loaders are refused)."""
    root, src = tmp_path_factory.mktemp("models"), tiny_components()
    files = save_comfy_files(src, root / "comfy")
    ti2v = WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "in_channels": 48, "out_channels": 48})
    return {**files, "ti2v": save_comfy_transformer(ti2v, root / "wan2.2_ti2v_5B.safetensors"),
            "folder": save_diffusers_folder(src, root / "diffusers")}


def test_experts_that_do_not_fit_the_vae_cannot_train(tmp_path, capsys, tiny_models):
    """A TI2V-5B expert beside the Wan 2.1 VAE is refused from its header (train's pre-flight runs the same check)."""
    files = {"high_noise": tiny_models["high"], "low_noise": tiny_models["ti2v"],
             "text_encoder": tiny_models["text_encoder"], "vae": tiny_models["vae"]}
    path = _job(tmp_path, model={"source": None, **{k: str(v) for k, v in files.items()}})
    status, _, errors = _check(capsys, path, "--no-decode")
    assert status == 2 and len(errors) == 1
    assert errors[0].startswith("error: model.low_noise: wan2.2_ti2v_5B.safetensors") and "TI2V-5B" in errors[0]


def test_a_folder_without_the_high_experts_config_is_named_and_not_planned_as_a14b(tmp_path, capsys, tiny_models):
    """The plan reads the low-noise expert's config.json instead of assuming the 14B model (53 GiB of host RAM for a
    tiny folder, and LoRAs of the folder's size blamed for not fitting 14B experts)."""
    folder = shutil.copytree(tiny_models["folder"], tmp_path / "diffusers")
    (folder / "transformer" / "config.json").unlink()
    path = _job(tmp_path, model={"source": str(folder)})
    status, out, errors = _check(capsys, path, "--no-decode")
    assert status == 2 and errors == [
        f"error: model.source: {folder}/transformer/config.json is missing (the high-noise expert's settings): the "
        "folder is incomplete - download it again (e.g. hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers --local-dir "
        "<folder>)"]
    split = re.search(r"checkpointing off/selective/full (\d+)/(\d+)/(\d+) blocks", out)
    assert sum(map(int, split.groups())) == 2  # the tiny experts' 2 blocks, not the A14B's 40
