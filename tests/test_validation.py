"""The validation loss: settings, held-out clips, the fixed grid and noise, losses.csv, resume, and what the curve
shows on the tiny model (falls while a concept is learned, rises as the LoRA overfits one clip)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainer_core.train.loop as loop
from trainer_core.config import DatasetConfig, job_from_dict, job_warnings
from trainer_core.data import build_dataset, make_synthetic_dataset
from trainer_core.data.media import write_video
from trainer_core.errors import ConfigError, DatasetError
from trainer_core.schedule import expert_for_timestep, expert_sigma_range
from trainer_core.train.runs import read_losses, read_validation, write_losses
from trainer_core.train.validation import GRID_POINTS, Validator, validation_noise, validation_sigmas

sys.path.insert(0, str(Path(__file__).parent))
from tiny_job import tiny_job  # noqa: E402


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    return make_synthetic_dataset(folder, n_clips=5, num_frames=5, size=(32, 32), seed=0)


@pytest.fixture(scope="module")
def held_clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("held")
    return make_synthetic_dataset(folder, n_clips=2, num_frames=5, size=(32, 32), seed=1)


def _job(**datasets_and_more) -> dict:
    return {"model": {"source": "tiny"}, "datasets": [{"folder": "a"}], **datasets_and_more}


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job, words", [
    (_job(datasets=[{"folder": "a", "validation": True}]), "nothing to train on"),
    (_job(datasets=[{"folder": "r", "is_regularization": True}, {"folder": "v", "validation": True}]),
     "every training dataset is regularization data"),  # its target is the base model: the LoRA would stay zero
    (_job(datasets=[{"folder": "a"}, {"folder": "v", "validation": True, "share": 0.5}]), "validation cannot be "
     "combined with share"),
    (_job(datasets=[{"folder": "a"}, {"folder": "v", "validation": True, "validation_split": 0.2}]),
     "validation cannot be combined with validation_split"),
    (_job(datasets=[{"folder": "a"}, {"folder": "v", "validation": True, "is_regularization": True}]),
     "validation cannot be combined with is_regularization"),
    (_job(datasets=[{"folder": "a", "validation_split": 0.2, "is_regularization": True}]),
     "validation_split cannot be combined with is_regularization"),
    (_job(datasets=[{"folder": "a", "validation_split": 1.0}]), "validation_split must lie in [0, 1)"),
    (_job(train={"validate_every": -5}), "'train.validate_every' must be >= 0"),
    (_job(save={"tensorboard": "maybe"}), "'save.tensorboard'"),
])  # fmt: skip
def test_bad_validation_settings_are_refused_in_one_line(job, words):
    with pytest.raises(ConfigError) as err:
        job_from_dict(job)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_validation_settings_that_hold():
    cfg = job_from_dict(_job(datasets=[{"folder": "a", "share": 1.0}, {"folder": "v", "validation": True}],
                             save={"tensorboard": True}))  # fmt: skip
    assert cfg.save.tensorboard == "on"  # YAML's bare on/true
    assert job_from_dict(_job()).train.validate_every is None  # default: at every save
    warnings = job_warnings(job_from_dict(_job(train={"validate_every": 10})))
    assert any("validate_every is 10 but no clip is held out" in w for w in warnings)


# --- held-out clips ---------------------------------------------------------------------------------------------


def _files(dataset) -> set[str]:
    return {it.media.path.name for it in dataset.items}


def test_validation_split_holds_out_whole_files_chosen_by_the_seed(clips):
    split = DatasetConfig(folder=str(clips), num_frames=5, resolutions=[32, 48], validation_split=0.3,
                          caption_dropout=0.5, flip_x=True)  # fmt: skip
    a, b, other = (build_dataset([split], None, seed) for seed in (7, 7, 8))
    held = _files(a.validation)
    assert len(held) == 2  # round(0.3 * 5) files, each at both resolutions
    assert len(a.validation) == 4 and held == _files(b.validation)
    assert not held & _files(a) and len(_files(a)) == 3  # never trained on
    assert any(_files(s.validation) != held for s in [other, *(build_dataset([split], None, s) for s in (9, 10))])
    plan = a.validation.plan(0, 0)
    assert plan.caption and not plan.flip_x  # read plainly: no caption dropout, no flips
    assert "held out for validation" in a.report() and "validation (held out" in a.report()


def test_validation_split_leaving_nothing_to_train_is_refused(tmp_path):
    one = make_synthetic_dataset(tmp_path / "one", n_clips=1, num_frames=5, size=(32, 32), seed=0)
    with pytest.raises(DatasetError) as err:
        build_dataset([DatasetConfig(folder=str(one), num_frames=5, resolutions=[32], validation_split=0.1)], None, 0)
    assert "leaving none to train on" in str(err.value) and "\n" not in str(err.value)


def test_validation_folder_inside_a_training_folder_is_refused(clips, tmp_path):
    inner = make_synthetic_dataset(clips / "inner", n_clips=1, num_frames=5, size=(32, 32), seed=3)
    try:
        with pytest.raises(DatasetError, match=r"datasets\[1\] is a validation folder, but 1 of its file"):
            build_dataset([DatasetConfig(folder=str(clips), num_frames=5, resolutions=[32]),
                           DatasetConfig(folder=str(inner), num_frames=5, resolutions=[32], validation=True)], None, 0)
    finally:
        for p in inner.iterdir():
            p.unlink()
        inner.rmdir()


def test_grid_stays_inside_each_expert_and_noise_is_fixed():
    for expert in ("high", "low"):
        sig = validation_sigmas(expert, 0.875)
        lo, hi = expert_sigma_range(expert, 0.875)
        assert len(sig) == GRID_POINTS and torch.all((sig >= lo) & (sig < hi))
        assert all(expert_for_timestep(float(t), 0.875) == expert for t in sig * 1000.0)
    shape = torch.Size([16, 2, 4, 4])
    a = validation_noise(3, "high", 1, 2, shape)
    assert torch.equal(a, validation_noise(3, "high", 1, 2, shape))
    assert not torch.equal(a, validation_noise(3, "high", 1, 3, shape))
    assert not torch.equal(a, validation_noise(3, "low", 1, 2, shape))


def test_validation_points():
    cfg = job_from_dict(_job(train={"steps": 100}, save={"save_every": 30}))
    v = Validator.__new__(Validator)
    v.cfg = cfg
    due = [s for s in range(1, 101) if v.due(s - 1, s)]
    assert due == [30, 60, 90, 100]  # every save, and the end
    v.cfg = job_from_dict(_job(train={"steps": 100, "validate_every": 25}, save={"save_every": 30}))
    assert [s for s in range(1, 101) if v.due(s - 1, s)] == [25, 50, 75, 100]
    assert v.due(20, 30)  # a round of several steps that passes a validation point


# --- losses.csv ---------------------------------------------------------------------------------------------------


def test_losses_csv_keeps_both_columns_and_old_files_read(tmp_path):
    losses = [(1, "high", 0.5), (2, "low", 0.25), (3, "low", 0.125)]
    validation = [(0, "high", 1.5), (0, "low", 1.25), (2, "high", 0.75), (2, "low", 0.625)]
    write_losses(tmp_path, losses, validation)
    rows = list(csv.DictReader((tmp_path / "losses.csv").open()))
    assert list(rows[0]) == ["step", "expert", "loss", "validation"]
    assert [(r["step"], r["expert"], r["loss"], r["validation"]) for r in rows] == [
        ("0", "high", "", "1.5"), ("0", "low", "", "1.25"), ("1", "high", "0.5", ""), ("2", "high", "", "0.75"),
        ("2", "low", "0.25", "0.625"), ("3", "low", "0.125", "")]  # fmt: skip
    assert read_losses(tmp_path) == losses and read_validation(tmp_path) == validation
    (tmp_path / "losses.csv").write_text("step,expert,loss\n1,high,0.5\n2,low,0.25\n")  # before validation losses
    assert read_losses(tmp_path) == losses[:2] and read_validation(tmp_path) == []


# --- training -----------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Two threads on the two shared cores of CI machines make these small runs ten times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_keeps_the_validation_history(tmp_path, clips, held_clips, one_thread):
    def job(out: Path, **over) -> dict:
        return tiny_job(out, clips, 8, name="v", seed=1, switch_every=2, saving={"save_every": 4, "keep_last": 0},
                        datasets=[{"folder": str(clips), "num_frames": 5, "resolutions": [32]},
                                  {"folder": str(held_clips), "num_frames": 5, "resolutions": [32],
                                   "validation": True}], **over)  # fmt: skip

    full = loop.run_training(job_from_dict(job(tmp_path / "a")), progress_bar=False)
    assert [(s, e) for s, e, _ in full.validation] == [(s, e) for s in (0, 4, 8) for e in ("high", "low")]
    assert all(math.isfinite(v) for _, _, v in full.validation)
    plain = tiny_job(tmp_path / "p", clips, 8, name="v", seed=1, switch_every=2, saving={"save_every": 4},
                     datasets=[{"folder": str(clips), "num_frames": 5, "resolutions": [32]}])  # fmt: skip
    assert loop.run_training(job_from_dict(plain), progress_bar=False).losses == full.losses  # validation draws
    # nothing from the training's random streams

    class Stop(Exception):
        pass

    def stop_at_6(info):
        if info.step == 6:
            raise Stop

    with pytest.raises(Stop):
        loop.run_training(job_from_dict(job(tmp_path / "b")), on_step=stop_at_6, progress_bar=False)
    resumed = loop.run_training(job_from_dict({**job(tmp_path / "b"), "resume": "latest"}), progress_bar=False)
    assert resumed.validation == full.validation  # the history before the stop kept; step 8 bitwise the same
    on_disk = read_validation(resumed.run_dir)  # losses.csv keeps 8 significant digits
    assert [row[:2] for row in on_disk] == [row[:2] for row in full.validation]
    assert [v for *_, v in on_disk] == pytest.approx([v for *_, v in full.validation], rel=1e-7)


def _fields(folder: Path, fills: list[tuple[tuple[int, int, int], str]]) -> Path:
    """Clips of one colour over the whole frame, each with its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (rgb, caption) in enumerate(fills):
        frames = np.empty((5, 32, 32, 3), np.uint8)
        frames[:] = rgb
        write_video(folder / f"c{i}.mp4", frames, 16)
        (folder / f"c{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def _pixel_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in for the tiny preset's VAE, which is random: it maps every clip to nearly the same latent (black and
    white frames differ by 5% of the latent's mean square), so nothing a LoRA could learn of one clip would show. This
    one keeps the picture: pixels pooled to the latent grid (4x in time, 8x in space) and spread over 16 channels."""
    b, _, f, h, w = pixels.shape
    pooled = F.interpolate(pixels.float(), size=(1 + (f - 1) // 4, h // 8, w // 8), mode="area")
    mix = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    return torch.einsum("bcfhw,kc->bkfhw", pooled, mix)


@pytest.mark.slow
def test_validation_loss_falls_while_learning_and_rises_when_overfitting(tmp_path, monkeypatch, one_thread):
    """One red clip, trained hard (lr 1e-2, 60 steps): the validation loss on another red clip (the same concept)
    falls to a third; on a blue clip, which the LoRA should leave alone, it doubles as the LoRA overfits the red one.
    The training runs are the same (the validation draws nothing from the training generators)."""
    monkeypatch.setattr(loop, "encode_video", _pixel_latents)
    train = _fields(tmp_path / "train", [((220, 40, 40), "a red scene")])
    curves = {}
    for name, held in (("same", ((190, 30, 50), "a red scene")), ("other", ((40, 60, 220), "a blue scene"))):
        job = tiny_job(tmp_path / "out", train, 60, name=name, seed=1, switch_every=5, saving={"save_every": 0},
                       optimizer={"lr": 1e-2}, lora={"rank": 8}, train={"validate_every": 10, "batch_size": 1},
                       datasets=[{"folder": str(train), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.0},
                                 {"folder": str(_fields(tmp_path / name, [held])), "num_frames": 5,
                                  "resolutions": [32], "validation": True}])  # fmt: skip
        result = loop.run_training(job_from_dict(job), progress_bar=False)
        curves[name] = {e: [v for _, x, v in result.validation if x == e] for e in ("high", "low")}
    for expert in ("high", "low"):
        same, other = curves["same"][expert], curves["other"][expert]
        assert len(same) == len(other) == 7  # steps 0, 10, ..., 60
        assert same[-1] < 0.6 * same[0] and min(same[1:]) < same[0], (expert, same)
        assert other[-1] > 1.5 * other[0], (expert, other)


def test_loss_curve_draws_the_validation_losses_beside_the_training_loss():
    import importlib.util

    spec = importlib.util.spec_from_file_location("loss_plot", Path(__file__).parents[1] / "nodes" / "loss_plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)  # the module alone: the node package needs ComfyUI
    losses = [(s, "high" if s <= 20 else "low", 2.0 - s / 40) for s in range(1, 41)]
    validation = [(s, e, 2.5 - s / 50) for s in (0, 20, 40) for e in ("high", "low")] + [(30, "low", math.nan)]
    img = plot.loss_curve(losses, 400, 200, validation=validation)
    px = img.load()
    dots = {e: [x for x in range(img.width) for y in range(img.height) if px[x, y] == c]
            for e, c in plot.VALIDATION_COLOURS.items()}  # fmt: skip
    assert dots["high"] and dots["low"] and min(dots["low"]) < 70 and max(dots["low"]) > 380  # steps 0 to 40
    assert plot.loss_curve(losses, 400, 200).tobytes() != img.tobytes()
    first = plot.loss_curve([], 400, 200, validation=[(0, "high", 1.0)])  # a fresh run's starting point alone
    assert bytes(plot.VALIDATION_COLOURS["high"]) in first.tobytes()
