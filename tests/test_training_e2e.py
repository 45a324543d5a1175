"""End-to-end training on the tiny preset: learning, exact resume, NaN safety, saved files, early errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import trainer_core.train.loop as loop
from trainer_core.config import job_from_dict
from trainer_core.data import build_dataset, make_synthetic_dataset
from trainer_core.errors import ConfigError, DatasetError, LoraFileError, TrainingDiverged
from trainer_core.models import encode_video, load_components
from trainer_core.schedule import sample_sigmas
from trainer_core.flow import flow_matching_loss, noisy_latents, velocity_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(folder, n_clips=4, num_frames=5, size=(32, 32), seed=0)
    return folder


def _cfg(tmp_path: Path, clips: Path, **over) -> dict:
    cfg = {
        "name": "t",
        "trigger_word": "sqz",
        "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
        "lora": {"rank": 4, "alpha": 8},
        "multistage": {"switch_every": 3},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "train": {"steps": 12, "batch_size": 2, "gradient_checkpointing": "off", "compute_dtype": "fp32",
                  "device": "cpu", "seed": 3, "num_workers": 0},
        "save": {"output_dir": str(tmp_path / "out"), "save_every": 4, "keep_last": 0},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.25}],
    }
    for section, values in over.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _eval_loss(components, dataset, expert: str) -> float:
    """Loss of one expert on fixed samples, sigmas and noise (independent of the training RNG)."""
    model = components.high if expert == "high" else components.low
    gen = torch.Generator().manual_seed(1234)

    total = 0.0
    with torch.no_grad():
        for i in range(len(dataset)):
            s = dataset.load(i, 0)
            x0 = encode_video(components.vae, s.pixels[None])
            sig = sample_sigmas(4, expert=expert, boundary=0.875, timestep_type="linear",
                                timestep_bias="balanced", shift=1.0, generator=gen)
            x0 = x0.expand(4, *x0.shape[1:])
            noise = torch.randn(x0.shape, generator=gen)
            text = _EMB[s.caption].expand(4, -1, -1)
            pred = model(noisy_latents(x0, noise, sig), sig * 1000, text, return_dict=False)[0]
            total += flow_matching_loss(pred, velocity_target(x0, noise)).item()
    return total / len(dataset)


_EMB: dict[str, torch.Tensor] = {}


def test_loss_falls_for_both_experts(tmp_path, clips):
    raw = _cfg(tmp_path, clips, train={"steps": 30}, multistage={"switch_every": 5},
               datasets=[{"folder": str(clips), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.0}])
    cfg = job_from_dict(raw)
    components = load_components(cfg.model)
    dataset = build_dataset(cfg.datasets, cfg.trigger_word, cfg.train.seed)
    from trainer_core.models import encode_prompts

    caps = sorted(dataset.captions())
    _EMB.update(dict(zip(caps, encode_prompts(components.text_encoder, components.tokenizer, caps)[:, None])))
    before = {e: _eval_loss(components, dataset, e) for e in ("high", "low")}
    result = loop.run_training(cfg, components=components, dataset=dataset, progress_bar=False)
    after = {e: _eval_loss(components, dataset, e) for e in ("high", "low")}
    for e in ("high", "low"):
        assert after[e] < 0.9 * before[e], (e, before[e], after[e])
    assert [x[1] for x in result.losses[:10]] == ["high"] * 5 + ["low"] * 5
    assert set(result.lora_files) == {"high", "low"}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, clips, workers):
    over = dict(train={"steps": 10, "gradient_accumulation": 2, "num_workers": workers},
                save={"save_every": 0, "keep_last": 0})
    full = loop.run_training(job_from_dict(_cfg(tmp_path / "a", clips, **over)), progress_bar=False)

    class Stop(Exception):
        pass

    def stop_at_7(info):
        if info.step == 7:
            raise Stop

    cfg_b = job_from_dict(_cfg(tmp_path / "b", clips, **over))
    with pytest.raises(Stop):
        loop.run_training(cfg_b, on_step=stop_at_7, progress_bar=False)
    run_b = cfg_b.run_dir
    assert (run_b / "training_state_000007.safetensors").is_file()

    resumed_cfg = job_from_dict({**_cfg(tmp_path / "b", clips, **over), "resume": "latest"})
    resumed = loop.run_training(resumed_cfg, progress_bar=False)
    assert resumed.losses == full.losses  # bitwise-equal floats, every step, both experts
    for expert in ("high", "low"):
        with safe_open(str(full.lora_files[expert]), "pt") as a, safe_open(str(resumed.lora_files[expert]), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_nan_stops_training_and_keeps_good_checkpoints(tmp_path, clips, monkeypatch):
    cfg = job_from_dict(_cfg(tmp_path, clips, train={"steps": 8}, save={"save_every": 2, "keep_last": 0}))
    import trainer_core.train.objective as objective

    real = objective.flow_matching_loss
    calls = {"n": 0}

    def poisoned(pred, target, weights=None):
        calls["n"] += 1
        out = real(pred, target, weights)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(objective, "flow_matching_loss", poisoned)
    # the 5th step, numbered as the files and the progress bar number it; the state of step 4 holds the weights
    # that produced it, so it is set aside and step 2 is named as the last good one
    with pytest.raises(TrainingDiverged, match=r"at step 5 .*set aside.*last good state is step 2"):
        loop.run_training(cfg, progress_bar=False)
    files = sorted(p.name for p in cfg.run_dir.glob("*.safetensors"))
    assert files == ["t_000002_high_noise.safetensors", "t_000002_low_noise.safetensors",
                     "t_000004_high_noise.safetensors", "t_000004_low_noise.safetensors",
                     "training_state_000002.safetensors", "training_state_000004.diverged.safetensors"]
    with safe_open(str(cfg.run_dir / "t_000004_low_noise.safetensors"), "pt") as fh:
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())


def test_saved_files_names_metadata_and_keep_last(tmp_path, clips):
    cfg = job_from_dict(_cfg(tmp_path, clips, save={"save_every": 3, "keep_last": 2, "dtype": "fp16"},
                             train={"steps": 9}))
    result = loop.run_training(cfg, progress_bar=False)
    names = sorted(p.name for p in cfg.run_dir.glob("*.safetensors"))
    assert names == ["t_000006_high_noise.safetensors", "t_000006_low_noise.safetensors",
                     "t_000009_high_noise.safetensors", "t_000009_low_noise.safetensors",
                     "training_state_000006.safetensors", "training_state_000009.safetensors"]
    with safe_open(str(result.lora_files["low"]), "pt") as fh:
        meta = fh.metadata()
        key = "diffusion_model.blocks.0.self_attn.q.lora_down.weight"
        assert fh.get_tensor(key).dtype == torch.float16
    assert meta["step"] == "9" and meta["trigger_word"] == "sqz" and meta["expert"] == "low_noise"
    assert meta["base_model"] and '"rank":4' in meta["training_config"].replace(" ", "")
    assert (cfg.run_dir / "losses.csv").read_text().count("\n") == 10


def test_untrained_expert_is_never_loaded(tmp_path, clips, monkeypatch):
    loaded, events = [], []
    real_components, real_expert = loop.load_components, loop.load_expert

    def spy_components(model_cfg, **kw):
        events.append(("components", kw.get("high", True), kw.get("low", True)))
        return real_components(model_cfg, **kw)

    def spy_expert(model_cfg, part, components, device="cpu"):
        # The captions are cached and the text encoder freed before any expert is read: one big model at a time.
        events.append(("expert", part, components.text_encoder is None))
        loaded.append(part)
        return real_expert(model_cfg, part, components, device)

    monkeypatch.setattr(loop, "load_components", spy_components)
    monkeypatch.setattr(loop, "load_expert", spy_expert)
    cfg = job_from_dict(_cfg(tmp_path, clips, multistage={"train_low_noise": False}, train={"steps": 2}))
    result = loop.run_training(cfg, progress_bar=False)
    assert loaded == ["high"]
    assert events == [("components", False, False), ("expert", "high", True)]
    assert set(result.lora_files) == {"high"}


def test_bad_dataset_fails_before_models_load(tmp_path, clips, monkeypatch):
    monkeypatch.setattr(loop, "load_components", lambda *a, **k: pytest.fail("models loaded before data check"))
    raw = _cfg(tmp_path, clips)
    raw["datasets"][0]["folder"] = str(tmp_path / "missing")
    with pytest.raises(DatasetError, match="missing"):
        loop.run_training(job_from_dict(raw), progress_bar=False)


def test_resume_with_other_settings_or_foreign_lora_is_refused(tmp_path, clips):
    cfg = job_from_dict(_cfg(tmp_path, clips, train={"steps": 2}, save={"save_every": 0}))
    loop.run_training(cfg, progress_bar=False)
    other_rank = _cfg(tmp_path, clips, lora={"rank": 8}, train={"steps": 4})
    with pytest.raises(ConfigError, match="lora"):
        loop.run_training(job_from_dict({**other_rank, "resume": "latest"}), progress_bar=False)

    # A state whose LoRA tensors come from another architecture (wider model): refused by name.
    state = cfg.run_dir / "training_state_000002.safetensors"
    from trainer_core.train.state_io import load_state, save_state

    data, meta = load_state(state)
    for k, v in list(data["lora"]["high"].items()):
        if k.endswith("lora_down.weight"):
            data["lora"]["high"][k] = torch.zeros(v.shape[0], v.shape[1] * 2)
    save_state(state, data, meta)
    with pytest.raises(LoraFileError):
        loop.run_training(job_from_dict({**_cfg(tmp_path, clips, train={"steps": 4}), "resume": str(state)}),
                          progress_bar=False)
    with pytest.raises(ConfigError, match="not a training state of this trainer"):
        not_state = tmp_path / "x.safetensors"
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(not_state))
        loop.run_training(job_from_dict({**_cfg(tmp_path, clips), "resume": str(not_state)}), progress_bar=False)


def test_previews_during_training_do_not_disturb_it(tmp_path, clips):
    over = dict(train={"steps": 4}, lora={"rank": 4, "alpha": 8, "dropout": 0.1}, save={"save_every": 0})
    plain = loop.run_training(job_from_dict(_cfg(tmp_path / "plain", clips, **over)), progress_bar=False)

    sample = {"prompts": ["a red square moving right", "a blue square moving up"], "width": 32, "height": 32,
              "num_frames": 5, "steps": 3, "sample_every": 2, "sample_at_start": True, "sampler": "euler"}
    seen = []
    cfg = job_from_dict({**_cfg(tmp_path / "prev", clips, **over), "sample": sample})
    with_previews = loop.run_training(cfg, on_sample=lambda step, vids: seen.append((step, vids)), progress_bar=False)

    assert with_previews.losses == plain.losses  # same RNG stream, same training
    assert [s for s, _ in seen] == [0, 2, 4]
    assert all(v.shape == (5, 32, 32, 3) and 0 <= v.min() and v.max() <= 1 for _, vids in seen for v in vids)
    names = sorted(p.name for p in (cfg.run_dir / "samples").iterdir())
    assert names == [f"t_{s:06d}_{i:02d}.mp4" for s in (0, 2, 4) for i in (0, 1)]


def test_text_encoder_modes_give_identical_training(tmp_path, clips):
    over = dict(train={"steps": 3}, save={"save_every": 0})
    runs = {}
    for mode in ("cache", "live"):
        cfg = job_from_dict({**_cfg(tmp_path / mode, clips, **over), "text_encoder": {"mode": mode}})
        runs[mode] = loop.run_training(cfg, progress_bar=False).losses
    assert runs["cache"] == runs["live"]  # the cache restores the encoder's output exactly
    cached = list((tmp_path / "cache" / "out" / "text_cache").glob("*.safetensors"))
    assert len(cached) == 5  # four synthetic captions + "" for dropout


def test_unload_mode_trains_on_the_trigger_word_only(tmp_path, clips, monkeypatch):
    seen = []
    real = loop.Objective.backward

    def spy(self, model, micro):
        seen.extend(micro.captions)
        return real(self, model, micro)

    monkeypatch.setattr(loop.Objective, "backward", spy)
    cfg = job_from_dict({**_cfg(tmp_path, clips, train={"steps": 4}), "text_encoder": {"mode": "unload"}})
    loop.run_training(cfg, progress_bar=False)
    assert set(seen) <= {"sqz", ""} and "sqz" in seen


def test_dop_ema_guidance_run_resumes_exactly_and_saves_ema_files(tmp_path, clips):
    adv = {"dop": True, "dop_class": "shape", "ema": True, "ema_decay": 0.9, "diff_guidance": True,
           "diff_guidance_scale": 2.0}
    over = dict(train={"steps": 6}, save={"save_every": 0, "keep_last": 0})
    raw = {**_cfg(tmp_path / "a", clips, **over), "advanced": adv}
    for ds in raw["datasets"]:
        ds["prepend_trigger"] = True
    full = loop.run_training(job_from_dict(raw), progress_bar=False)
    plain = loop.run_training(job_from_dict({**raw, "advanced": {}, "name": "plain"}), progress_bar=False)
    assert [x[2] for x in full.losses] != [x[2] for x in plain.losses]

    class Stop(Exception):
        pass

    def stop_at_3(info):
        if info.step == 3:
            raise Stop

    raw_b = {**raw, "save": {**raw["save"], "output_dir": str(tmp_path / "b")}}
    with pytest.raises(Stop):
        loop.run_training(job_from_dict(raw_b), on_step=stop_at_3, progress_bar=False)
    resumed = loop.run_training(job_from_dict({**raw_b, "resume": "latest"}), progress_bar=False)
    assert resumed.losses == full.losses
    run = job_from_dict(raw_b).run_dir
    for expert in ("high", "low"):
        ema_a = job_from_dict(raw).run_dir / f"t_000006_ema_{expert}_noise.safetensors"
        ema_b = run / f"t_000006_ema_{expert}_noise.safetensors"
        with safe_open(str(ema_a), "pt") as a, safe_open(str(ema_b), "pt") as b:
            assert a.metadata()["ema_decay"] == "0.9"
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        with safe_open(str(ema_a), "pt") as a, safe_open(str(full.lora_files[expert]), "pt") as live:
            key = "diffusion_model.blocks.0.ffn.0.lora_up.weight"
            assert not torch.equal(a.get_tensor(key), live.get_tensor(key))  # the EMA lags the live weights


def test_keep_last_prunes_ema_files_too(tmp_path, clips):
    cfg = job_from_dict({**_cfg(tmp_path, clips, train={"steps": 4}, save={"save_every": 1, "keep_last": 1}),
                         "advanced": {"ema": True}})
    loop.run_training(cfg, progress_bar=False)
    names = sorted(p.name for p in cfg.run_dir.glob("*.safetensors"))
    assert names == ["t_000004_ema_high_noise.safetensors", "t_000004_ema_low_noise.safetensors",
                     "t_000004_high_noise.safetensors", "t_000004_low_noise.safetensors",
                     "training_state_000004.safetensors"]


@pytest.mark.parametrize("quant", [{"transformer": "float8", "text_encoder": "float8"},
                                   {"transformer": "4bit_ara", "ara_rank": 4, "ara_calibration_samples": 2}])
def test_quantized_training_saves_the_same_lora_format(tmp_path, clips, quant):
    over = dict(train={"steps": 4}, save={"save_every": 0})
    base = loop.run_training(job_from_dict(_cfg(tmp_path / "base", clips, **over)), progress_bar=False)
    raw = {**_cfg(tmp_path / "q", clips, **over), "quant": quant}
    q = loop.run_training(job_from_dict(raw), progress_bar=False)
    assert all(abs(a[2] - b[2]) < 0.5 * b[2] for a, b in zip(q.losses, base.losses))  # close, not identical
    assert [x[2] for x in q.losses] != [x[2] for x in base.losses]
    for expert in ("high", "low"):
        with safe_open(str(q.lora_files[expert]), "pt") as a, safe_open(str(base.lora_files[expert]), "pt") as b:
            assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}
    if quant["transformer"] == "4bit_ara":  # the computed adapters were cached for the next run
        assert list((tmp_path / "q" / "out" / "ara_cache").glob("*.safetensors"))


def test_low_vram_and_block_offloading_train_identically(tmp_path, clips):
    over = dict(train={"steps": 4, "gradient_checkpointing": "full"}, multistage={"switch_every": 1},
                save={"save_every": 0})
    resident = loop.run_training(job_from_dict(_cfg(tmp_path / "r", clips, **over)), progress_bar=False)
    raw = {**_cfg(tmp_path / "m", clips, **over), "memory": {"low_vram": True, "offload_blocks": 1}}
    managed = loop.run_training(job_from_dict(raw), progress_bar=False)
    assert managed.losses == resident.losses
    for expert in ("high", "low"):
        with safe_open(str(managed.lora_files[expert]), "pt") as a, safe_open(str(resident.lora_files[expert]), "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_planner_refuses_what_cannot_fit_before_loading(tmp_path, clips, monkeypatch):
    from trainer_core.memory import planner

    monkeypatch.setattr(loop, "load_components", lambda *a, **k: pytest.fail("models loaded before the plan"))
    monkeypatch.setattr(loop, "plan_job", lambda cfg, device, world=1: planner.check_plan(
        planner.estimate_peak_vram(cfg, planner.WAN22_A14B_ARCH, 8 * 2**30, device_type="cuda")))
    raw = _cfg(tmp_path, clips)
    raw["datasets"][0]["resolutions"] = [1024]
    with pytest.raises(ConfigError, match="memory.low_vram|quant.transformer|offload"):
        loop.run_training(job_from_dict(raw), progress_bar=False)


def test_regularization_data_is_trained_towards_the_base_model(tmp_path, clips, monkeypatch):
    # Only prior data: the target is the base model's own prediction, so a zero-initialised LoRA gets zero loss and
    # zero gradients and stays exactly the base model. The same clips as ordinary data do move the LoRA. (A job of
    # prior data only is refused for that reason; set after validation, past the dataset's refusal, to show it.)
    monkeypatch.setattr("trainer_core.data.scan.nothing_to_learn", lambda datasets: None)
    over = dict(train={"steps": 3}, save={"save_every": 0, "dtype": "fp32"}, optimizer={"weight_decay": 0.0})
    for reg in (True, False):
        cfg = job_from_dict(_cfg(tmp_path / str(reg), clips, **over))
        cfg.datasets[0].is_regularization = reg
        result = loop.run_training(cfg, progress_bar=False)
        ups = load_lora_ups(result.lora_files["high"]) + load_lora_ups(result.lora_files["low"])
        if reg:
            assert all(x[2] == 0.0 for x in result.losses)
            assert all(torch.count_nonzero(u) == 0 for u in ups)
        else:
            assert all(x[2] > 0 for x in result.losses) and any(torch.count_nonzero(u) for u in ups)


def load_lora_ups(path: Path) -> list[torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return [fh.get_tensor(k) for k in fh.keys() if k.endswith("lora_up.weight")]


def test_dop_with_regularization_data_is_refused_before_loading(tmp_path, clips, monkeypatch):
    monkeypatch.setattr(loop, "load_components", lambda *a, **k: pytest.fail("models loaded"))
    raw = {**_cfg(tmp_path, clips), "advanced": {"dop": True}}
    raw["datasets"][0]["is_regularization"] = True
    with pytest.raises(ConfigError, match="is_regularization"):
        loop.run_training(job_from_dict(raw), progress_bar=False)


def test_checkpointing_policies_and_compiled_blocks_train_alike(tmp_path, clips):
    # The policies change what is kept for backward, never a number; compiling the blocks changes float rounding.
    over = dict(train={"steps": 3}, multistage={"switch_every": 1}, save={"save_every": 0})
    runs = {}
    for policy, compile in (("off", "off"), ("selective", "off"), ("full", "off"), ("selective", "on")):
        raw = _cfg(tmp_path / f"{policy}_{compile}", clips, **over)
        raw["train"].update(gradient_checkpointing=policy, compile=compile)
        runs[policy, compile] = [x[2] for x in loop.run_training(job_from_dict(raw), progress_bar=False).losses]
    assert runs["off", "off"] == runs["selective", "off"] == runs["full", "off"]
    assert runs["selective", "on"] == pytest.approx(runs["off", "off"], rel=1e-4)


def test_quant_auto_resolves_for_the_device_before_the_run_starts(tmp_path, clips, caplog):
    # On the CPU auto means no quantization: the same losses as quant none.
    plain = loop.run_training(job_from_dict(_cfg(tmp_path / "none", clips, train={"steps": 3})), progress_bar=False)
    cfg = job_from_dict({**_cfg(tmp_path / "auto", clips, train={"steps": 3}), "quant": {"transformer": "auto"}})
    with caplog.at_level("INFO", logger="trainer_core.quant.choice"):
        auto = loop.run_training(cfg, progress_bar=False)
    assert "quant.transformer: auto -> none on cpu" in caplog.text
    assert auto.losses == plain.losses
