"""Issue #15: every bad input gets one clear line before any work is spent.

Job files that are not UTF-8 YAML text (or are folders), non-finite or absurd numbers, misspelled keys (this trainer's
schema and ai-toolkit's), and a Hugging Face repo id that cannot be reached and is not in the local cache.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import typing

import pytest
import yaml
from huggingface_hub import constants as hf_constants
from pydantic import BaseModel

from tests.model_fixtures import (
    FAKE_REPO_ID,
    make_fake_hf_cache,
    save_diffusers_folder,
    tiny_components,
)
from trainer_core import aitoolkit
from trainer_core.aitoolkit import from_aitoolkit
from trainer_core.cli import main
from trainer_core.config import JobConfig, ModelConfig, job_from_dict, load_yaml
from trainer_core.errors import ConfigError, ModelLoadError
from trainer_core.models import load_components, loading

P = "config.process[0]"
REPO = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


def _job(**sections):
    base = {"model": {"source": "tiny"}, "datasets": [{"folder": "clips"}]}
    return {**base, **sections}


def _refused(data, source="job.yaml") -> str:
    with pytest.raises(ConfigError) as exc:
        job_from_dict(data, source=source)
    return str(exc.value)


# ------------------------------------------------------------------------------------------------ the job file


def test_latin1_job_file_must_be_saved_as_utf8(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes("name: café\nmodel:\n  source: tiny\n".encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_yaml(path)
    msg = str(exc.value)
    assert str(path) in msg and "not UTF-8" in msg and "save it as UTF-8" in msg and "line 1" in msg
    assert "\n" not in msg


def _safetensors_bytes() -> bytes:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    return struct.pack("<Q", len(header)) + header + b"\x00\x00\x80?"


@pytest.mark.parametrize(
    "name, content, kind",
    [
        ("preview.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10", "PNG image"),
        ("lora.safetensors", _safetensors_bytes(), "safetensors file"),
        ("job.yaml", b"model:\x00\x01\x02 binary", "binary data"),
    ],
)
def test_binary_file_is_not_a_yaml_text_file(tmp_path, name, content, kind):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_yaml(path)
    msg = str(exc.value)
    assert str(path) in msg and "is not a YAML text file" in msg and kind in msg and "job .yaml" in msg


def test_folder_given_as_job_file(tmp_path):
    (tmp_path / "wan_job.yaml").write_text("model: {source: tiny}\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "is a folder" in msg and "job YAML file inside it" in msg
    assert "wan_job.yaml" in msg and "does not exist" not in msg


def _cli_error(capsys, path) -> str:
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "gemm_4bit" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_refuses_bad_job_files_in_one_line(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))
    line = _cli_error(capsys, latin)
    assert str(latin) in line and "save it as UTF-8" in line
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert "not a YAML text file" in _cli_error(capsys, png)
    assert "is a folder" in _cli_error(capsys, tmp_path)


def test_cli_refuses_infinite_learning_rate_in_one_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: {source: tiny}\ndatasets: [{folder: clips}]\noptimizer: {lr: .inf}\n")
    line = _cli_error(capsys, job)
    assert str(job) in line and "'optimizer.lr'" in line and "finite number" in line


# ------------------------------------------------------------------------------------------------ numbers


def _float_fields() -> list[tuple[str, str, bool]]:
    """(section, field, is a pair) for every float setting of every section."""
    out = []
    for section, info in JobConfig.model_fields.items():
        model = next((a for a in (info.annotation, *typing.get_args(info.annotation)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
        if model is None:
            continue
        for name, field in model.model_fields.items():
            ann = field.annotation
            args = typing.get_args(ann)
            if ann is float or float in args:
                out.append((section, name, len(args) == 2 and args == (float, float)))
    return out


def test_every_float_setting_refuses_inf_and_nan():
    fields = _float_fields()
    assert ("optimizer", "lr", False) in fields and ("optimizer", "betas", True) in fields
    assert len(fields) >= 20  # every section's floats, not a hand-picked few
    for section, name, pair in fields:
        for bad in (float("inf"), float("-inf"), float("nan")):
            value = (0.9, bad) if pair else bad
            data = _job()
            if section == "datasets":
                data["datasets"] = [{"folder": "clips", name: value}]
                where = f"datasets.0.{name}"
            else:
                data[section] = {name: value}
                where = f"{section}.{name}.1" if pair else f"{section}.{name}"
            msg = _refused(data)
            assert f"'{where}'" in msg and "finite number" in msg, (section, name, msg)


def test_yaml_inf_nan_and_overflowing_numbers_are_refused(tmp_path):
    for text, where in [
        ("optimizer: {lr: .inf}", "optimizer.lr"),
        ("optimizer: {lr: .NaN}", "optimizer.lr"),
        ("optimizer: {lr: 1e400}", "optimizer.lr"),  # PyYAML reads it as a string; as a float it overflows
        ("lora: {alpha: -.inf}", "lora.alpha"),
        ("train: {timestep_shift: .nan}", "train.timestep_shift"),
    ]:
        path = tmp_path / "job.yaml"
        path.write_text(f"model: {{source: tiny}}\n{text}\n")
        msg = _refused(load_yaml(path), source=str(path))
        assert msg.startswith(str(path)) and f"'{where}'" in msg and "finite number" in msg, msg


@pytest.mark.parametrize(
    "section, values, where, needles",
    [
        ("optimizer", {"lr": 1e39}, "optimizer.lr", ["(0, 1]", "1e-5 to 1e-3"]),
        ("optimizer", {"lr": "1e39"}, "optimizer.lr", ["(0, 1]"]),  # how PyYAML reads `lr: 1e39`
        ("optimizer", {"lr": 1.5}, "optimizer.lr", ["(0, 1]"]),
        ("optimizer", {"lr": 0}, "optimizer.lr", ["(0, 1]"]),
        ("optimizer", {"betas": (1.0, 0.999)}, "optimizer.betas", ["betas[0]", "[0, 1)", "(0.9, 0.999)"]),
        ("optimizer", {"betas": (0.9, -0.1)}, "optimizer.betas", ["betas[1]", "[0, 1)"]),
        ("optimizer", {"eps": 1.0}, "optimizer.eps", ["(0, 0.01]", "1e-8 to 1e-6"]),
        ("optimizer", {"weight_decay": 5}, "optimizer.weight_decay", ["[0, 1]", "0 to 0.1"]),
        ("train", {"timestep_shift": 1000}, "train.timestep_shift", ["(0, 100]", "1 to 12"]),
        ("sample", {"shift": 500}, "sample.shift", ["(0, 100]"]),
        ("sample", {"guidance_high": 100}, "sample.guidance_high", ["[1, 30]", "3 to 5"]),
        ("sample", {"lora_strength_low": 50}, "sample.lora_strength_low", ["[-10, 10]"]),
        ("memory", {"headroom_gib": 1e6}, "memory.headroom_gib", ["1024"]),
        ("datasets", {"fps": 1000}, "datasets.0.fps", ["(0, 240]", "16 frames per second"]),
    ],
)
def test_absurd_values_are_refused_with_the_usual_range(section, values, where, needles):
    data = _job()
    if section == "datasets":
        data["datasets"] = [{"folder": "clips", **values}]
    else:
        data[section] = values
    msg = _refused(data)
    assert f"'{where}'" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_values_at_the_edges_of_the_ranges_are_accepted():
    cfg = job_from_dict(
        _job(
            optimizer={"lr": 1.0, "betas": (0.0, 0.9999), "eps": 0.01, "weight_decay": 1.0, "max_grad_norm": 1e9},
            train={"timestep_shift": 100},
            sample={"shift": 0.5, "guidance_high": 30, "guidance_low": 1, "lora_strength_high": -10},
        )
    )
    assert cfg.optimizer.lr == 1.0 and cfg.sample.lora_strength_high == -10
    with pytest.raises(ConfigError, match="'optimizer.lr'"):
        job_from_dict(_job(optimizer={"lr": 1.0 + 1e-9}))


# ------------------------------------------------------------------------------------------------ misspelled keys


@pytest.mark.parametrize(
    "data, needle",
    [
        (_job(optimizer={"learning_rate": 1e-4}), "setting 'optimizer.learning_rate' - did you mean 'optimizer.lr'?"),
        (_job(train={"stepz": 10}), "unknown setting 'train.stepz' - did you mean 'train.steps'?"),
        (_job(lora={"Rank": 8}), "did you mean 'lora.rank'?"),
        (_job(datasets=[{"folder": "a", "num_frame": 9}]), "did you mean 'datasets.0.num_frames'?"),
        (_job(train={"lr": 1e-4}), "'train.lr' - did you mean 'optimizer.lr'? Move it to the 'optimizer' section"),
        (_job(train={"learning_rate": 1e-4}), "did you mean 'optimizer.lr'?"),
        (_job(datasets=[{"folder": "a", "path": "b"}]), "did you mean 'datasets.0.folder'?"),
    ],
)
def test_unknown_key_of_this_schema_suggests_the_closest_valid_key(data, needle):
    assert needle in _refused(data)


def _aitk(**train):
    process = {
        "type": "sd_trainer",
        "training_folder": "out",
        "network": {"type": "lora"},
        "datasets": [{"folder_path": "clips"}],
        "model": {"name_or_path": REPO, "arch": "wan22_14b"},
        "train": train,
    }
    return {"job": "extension", "config": {"name": "run1", "process": [process]}}


@pytest.mark.parametrize(
    "train, key, meant",
    [
        ({"learning_rate": 1e-4}, "train.learning_rate", "lr"),
        ({"LR": 1e-4}, "train.LR", "lr"),
        ({"stpes": 500}, "train.stpes", "steps"),
        ({"optimizer_params": {"weight_decy": 0.1}}, "train.optimizer_params.weight_decy", "weight_decay"),
    ],
)
def test_aitoolkit_typo_of_an_applied_key_is_an_error(train, key, meant):
    with pytest.raises(ConfigError) as exc:
        from_aitoolkit(_aitk(**train))
    msg = str(exc.value)
    assert msg.startswith(f"{P}.{key} is not an ai-toolkit setting - did you mean '{meant}'?"), msg
    assert f"rename the key to '{meant}'" in msg and "default" in msg


def test_aitoolkit_typos_in_other_sections_are_errors():
    data = _aitk()
    data["config"]["process"][0]["model"]["model_kwargs"] = {"train_high_nose": False}
    with pytest.raises(ConfigError, match=r"model\.model_kwargs\.train_high_nose .*did you mean 'train_high_noise'"):
        from_aitoolkit(data)
    data = _aitk()
    data["config"]["process"][0]["datasets"] = [{"folder_path": "clips", "num_repats": 3}]
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.num_repats .*did you mean 'num_repeats'"):
        from_aitoolkit(data)
    data = _aitk()
    data["config"]["process"][0]["network"] = {"type": "lora", "network_dim": 32}
    with pytest.raises(ConfigError, match=r"network\.network_dim .*did you mean 'linear'"):
        from_aitoolkit(data)


def test_aitoolkit_unknown_keys_that_are_not_typos_of_applied_keys_stay_warnings():
    # A valid ai-toolkit key this trainer does not apply: warned as before.
    _, notes = from_aitoolkit(_aitk(noise_offset=0.1))
    assert notes == [f"{P}.train.noise_offset is ignored: {aitoolkit._GENERIC}"]
    # A typo of a valid key this trainer does not apply anyway: a warning with the suggestion.
    _, notes = from_aitoolkit(_aitk(noise_ofset=0.1))
    assert len(notes) == 1 and notes[0].startswith(f"{P}.train.noise_ofset is ignored: ")
    assert "did you mean 'noise_offset'?" in notes[0]
    # The alias next to the real key: the real key is applied, the alias warned about.
    cfg, notes = from_aitoolkit(_aitk(lr=2e-4, learning_rate=1e-3))
    assert cfg["optimizer"]["lr"] == 2e-4
    assert len(notes) == 1 and "did you mean 'lr'? it is given too" in notes[0]
    # Nothing close: ai-toolkit has no such key either.
    _, notes = from_aitoolkit(_aitk(made_up_setting=3))
    assert "ai-toolkit has no such setting either" in notes[0]


def test_aitoolkit_key_tables_are_consistent():
    for kind, applied in aitoolkit._APPLIED_KEYS.items():
        assert applied <= aitoolkit._AITOOLKIT_KEYS[kind], (kind, applied - aitoolkit._AITOOLKIT_KEYS[kind])
    for kind, aliases in aitoolkit._ALIASES.items():
        for alias, key in aliases.items():
            assert alias not in aitoolkit._AITOOLKIT_KEYS[kind] and key in aitoolkit._AITOOLKIT_KEYS[kind]
    for name in [*aitoolkit._REASONS, *aitoolkit._NO_EFFECT, *aitoolkit._ONLY_WITH, *aitoolkit._DEFAULTS]:
        kind, _, key = name.rpartition(".")
        if kind in aitoolkit._AITOOLKIT_KEYS:
            assert key in aitoolkit._AITOOLKIT_KEYS[kind], name


def test_aitoolkit_non_finite_numbers_are_refused_by_key():
    with pytest.raises(ConfigError, match=re.escape(f"{P}.train.lr must be a finite number")):
        from_aitoolkit(_aitk(lr=float("inf")))
    raw = yaml.safe_load("lr: .nan")["lr"]
    with pytest.raises(ConfigError, match="finite number"):
        from_aitoolkit(_aitk(max_grad_norm=raw))


# ------------------------------------------------------------------------------------------------ Hugging Face repo id


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and from_pretrained made to fail: nothing may load before the refusal."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the repo id was refused")

    for cls in (loading.WanTransformer3DModel, loading.AutoencoderKLWan, loading.UMT5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


class _FakeHub:
    """A local endpoint that counts connections and then closes them (``hang``: holds them open, never answers)."""

    def __init__(self, hang: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.hang, self.connections, self.held = hang, 0, []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.hang:
                self.held.append(conn)
            else:
                conn.close()

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def online(monkeypatch):
    """Not offline by environment: a network look-up is attempted (against a fake local endpoint)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    hubs = []

    def start(hang: bool = False) -> _FakeHub:
        hub = _FakeHub(hang)
        hubs.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        return hub

    yield start
    for hub in hubs:
        hub.close()


def test_offline_repo_id_not_in_cache_is_refused_at_once(monkeypatch, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "_hub_unreachable", lambda *a: pytest.fail("no network look-up when offline"))
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(source=REPO))
    msg = str(exc.value)
    assert msg.startswith(f"model.source: {REPO} is a Hugging Face repo id")
    assert "no network (HF_HUB_OFFLINE is set)" in msg and "not in the local Hugging Face cache" in msg
    assert "set model.source to that folder" in msg and "model.high_noise / model.low_noise" in msg
    assert "\n" not in msg and "config.json" not in msg


def test_unreachable_hub_is_tried_once_then_refused(online, no_loading):
    hub = online()
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(source=REPO, revision="v1"), low=False, vae=False, text_encoder=False)
    msg = str(exc.value)
    assert f"model.source: {REPO}@v1 is a Hugging Face repo id, but there is no network" in msg
    assert "could not be reached" in msg and "not in the local Hugging Face cache" in msg
    assert "model.high_noise" in msg
    assert hub.connections == 1  # one look-up, no retries


def test_hub_that_never_answers_times_out_once(online, no_loading, monkeypatch):
    hub = online(hang=True)
    monkeypatch.setattr(loading, "HUB_TIMEOUT_S", 0.3)
    with pytest.raises(ModelLoadError, match="could not be reached"):
        load_components(ModelConfig(source=REPO), low=False, vae=False, text_encoder=False)
    assert hub.connections == 1


def test_tokenizer_repo_id_offline_is_refused(monkeypatch, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(source="tiny", tokenizer="google/umt5-xxl"), high=False, low=False, vae=False)
    msg = str(exc.value)
    assert msg.startswith("model.tokenizer: google/umt5-xxl is a Hugging Face repo id") and "no network" in msg
    assert "set model.tokenizer to that folder" in msg


def test_unreachable_hub_falls_back_to_the_local_cache(online, monkeypatch, tmp_path):
    folder = save_diffusers_folder(tiny_components(), tmp_path / "tiny")
    make_fake_hf_cache(folder, tmp_path / "hub")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = online()
    c = load_components(ModelConfig(source=FAKE_REPO_ID, dtype="fp32", text_encoder_dtype="fp32"))
    assert c.high is not None and c.low is not None and c.vae is not None and c.tokenizer is not None
    assert hub.connections == 1  # the one look-up; everything then came from the cache without retries
