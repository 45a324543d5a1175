"""Run identity: one run, one folder of its own files; nothing a run does touches or returns another run's files.

Driven through the headless CLI as a user runs it (job YAML files, ``--resume latest``, the printed paths), plus the
core calls where the CLI cannot reach (a held lock, a killed process).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import trainer_core.train.loop as loop
from trainer_core.cli import main
from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.errors import ConfigError
from trainer_core.train.runs import LOCK_FILE, MANIFEST, job_runs

sys.path.insert(0, str(Path(__file__).parent))
from tiny_job import tiny_job  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("clips"), n_clips=4, num_frames=5, size=(32, 32), seed=4)


def _job(out: Path, clips: Path, steps: int, lr: float = 2e-3, **over) -> dict:
    over["optimizer"] = {"lr": lr, **over.get("optimizer", {})}
    return tiny_job(out, clips, steps, name="same", seed=5, switch_every=2, saving={"save_every": 2, "keep_last": 2},
                    **over)


def _cli(tmp_path: Path, job: dict, capsys, *extra: str) -> tuple[int, dict[str, Path], str]:
    """Run ``python -m trainer_core train`` in-process; return the exit code, the printed pair and stderr."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = main(["train", str(path), *extra])
    out = capsys.readouterr()
    pair = {line.split("-noise LoRA: ")[0]: Path(line.split(": ", 1)[1])
            for line in out.out.splitlines() if "-noise LoRA: " in line}
    return code, pair, out.err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_reusing_a_name_never_touches_the_earlier_run_or_foreign_files(tmp_path, clips, capsys):
    out = tmp_path / "out"
    code, a_pair, _ = _cli(tmp_path, _job(out, clips, 6), capsys)
    assert code == 0 and {p.parent.name for p in a_pair.values()} == {"same"}
    foreign = out / "same" / "same_000000099_high_noise.safetensors"  # ai-toolkit's naming, not ours
    foreign.write_bytes(b"another tool's checkpoint")
    before = {p: _sha(p) for p in [*a_pair.values(), foreign]}

    # B: same name, 4 steps, another lr, no resume -> a folder of its own; keep_last prunes only B's files
    code, b_pair, _ = _cli(tmp_path, _job(out, clips, 4, lr=1e-3), capsys)
    assert code == 0 and {p.parent.name for p in b_pair.values()} == {"same_run2"}
    assert all(p.is_file() and "_000004_" in p.name for p in b_pair.values())
    assert {p: _sha(p) for p in before} == before  # A's final pair and the foreign file, byte for byte
    b_ids = {_meta(p)["run_id"] for p in b_pair.values()}
    assert len(b_ids) == 1 and b_ids != {_meta(p)["run_id"] for p in a_pair.values()}

    # B again with resume latest: B's own newest state (step 4 = train.steps) -> B's pair, not A's step-6 pair
    code, again, err = _cli(tmp_path, {**_job(out, clips, 4, lr=1e-3), "resume": "latest"}, capsys)
    assert code == 0 and again == b_pair
    assert {p: _sha(p) for p in before} == before
    runs = [r.path.name for r in job_runs(job_from_dict(_job(out, clips, 4)))]
    assert runs == ["same_run2", "same"]  # newest first


def test_a_cancelled_rerun_resumes_itself_not_the_earlier_run(tmp_path, clips, monkeypatch):
    out = tmp_path / "out"
    loop.run_training(job_from_dict(_job(out, clips, 8, save={"save_every": 4})), progress_bar=False)

    def cancel_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    b = job_from_dict(_job(out, clips, 6, lr=1e-3, save={"save_every": 4}))
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(b, on_step=cancel_at_3, progress_bar=False)
    stopped = json.loads((out / "same_run2" / MANIFEST).read_text())
    assert stopped["status"] == "stopped" and 3 in map(int, stopped["checkpoints"])

    resumed = loop.run_training(job_from_dict({**_job(out, clips, 6, lr=1e-3, save={"save_every": 4}),
                                               "resume": "latest"}), progress_bar=False)
    assert resumed.run_dir.name == "same_run2" and resumed.step == 6
    assert [s for s, _, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    assert all(p.parent.name == "same_run2" for p in resumed.lora_files.values())
    assert json.loads((out / "same" / MANIFEST).read_text())["step"] == 8  # A untouched


def test_pruning_counts_only_the_runs_own_files(tmp_path, clips):
    out = tmp_path / "out"
    loop.run_training(job_from_dict(_job(out, clips, 4, save={"keep_last": 1})), progress_bar=False)
    run = out / "same"
    foreign = [run / "same_000000099_high_noise.safetensors", run / "same_000001_low_noise.safetensors",
               run / "notes.txt"]
    for f in foreign:
        f.write_bytes(b"not written by this run")
    leftover = run / ".same_000006_high_noise.safetensors.dead.tmp"  # a save that a SIGKILL cut short
    leftover.write_bytes(b"partial")
    inner = run / ".tmpuXSU8k"  # safetensors' own temporary of that save
    inner.write_bytes(b"partial")
    job = {**_job(out, clips, 8, save={"keep_last": 1}), "resume": "latest"}
    result = loop.run_training(job_from_dict(job), progress_bar=False)
    assert result.run_dir == run
    assert all(f.read_bytes() == b"not written by this run" for f in foreign)
    assert not leftover.exists() and not inner.exists()
    ours = sorted(p.name for p in run.glob("same_0000*.safetensors") if p not in foreign)
    assert ours == ["same_000008_high_noise.safetensors", "same_000008_low_noise.safetensors"]


def test_files_are_readable_by_others_under_the_usual_umask(tmp_path, clips):
    old = os.umask(0o022)
    try:
        result = loop.run_training(job_from_dict(_job(tmp_path / "out", clips, 2)), progress_bar=False)
    finally:
        os.umask(old)
    written = [*result.lora_files.values(), result.state_file, result.run_dir / "losses.csv",
               result.run_dir / MANIFEST, result.run_dir / "config.yaml"]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}


_HOLDER = """
import sys
from trainer_core.config import job_from_dict
from trainer_core.data import build_dataset
from trainer_core.train.runs import open_run
import json
cfg = job_from_dict(json.loads(sys.argv[1]))
run = open_run(cfg, build_dataset(cfg.datasets, cfg.trigger_word, cfg.train.seed))
print(run.path, flush=True)
sys.stdin.read()  # hold the run folder until killed
"""


def test_a_live_run_holds_its_folder_and_a_killed_one_does_not(tmp_path, clips):
    out = tmp_path / "out"
    loop.run_training(job_from_dict(_job(out, clips, 2)), progress_bar=False)
    resume = {**_job(out, clips, 4), "resume": str(out / "same")}  # the run folder (its newest state)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, json.dumps(resume)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == str(out / "same")  # it holds the folder now
        with pytest.raises(ConfigError, match=rf"run folder {out / 'same'} is in use by process {holder.pid}"):
            loop.run_training(job_from_dict(resume), progress_bar=False)
        # a fresh run started meanwhile writes into a folder of its own
        fresh = loop.run_training(job_from_dict(_job(out, clips, 2)), progress_bar=False)
        assert fresh.run_dir.name == "same_run2"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / "same" / LOCK_FILE).exists()  # the lock file stays; its lock died with the process
    resumed = loop.run_training(job_from_dict(resume), progress_bar=False)
    assert resumed.run_dir == out / "same" and resumed.step == 4


def test_two_fresh_runs_at_once_get_two_folders(tmp_path, clips):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    jobs = []
    for i in range(2):
        path = tmp_path / f"job{i}.yaml"
        path.write_text(yaml.safe_dump(_job(out, clips, 2)))
        jobs.append(subprocess.Popen([sys.executable, "-m", "trainer_core", "train", str(path)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    printed = []
    for proc in jobs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        printed.append({line.split(": ", 1)[1] for line in stdout.splitlines() if "-noise LoRA: " in line})
    assert printed[0].isdisjoint(printed[1])
    assert {Path(p).parent.name for paths in printed for p in paths} == {"same", "same_run2"}
    assert all(Path(p).is_file() for paths in printed for p in paths)


def test_the_unchanged_job_key_sees_a_starting_lora_replaced_in_place(tmp_path, clips):
    from trainer_core.train.runs import config_key

    init = tmp_path / "start_high.safetensors"
    init.write_bytes(b"first version")
    job = job_from_dict(_job(tmp_path / "out", clips, 2, lora={"init_high": str(init)}))
    before = config_key(job)
    assert config_key(job) == before
    init.write_bytes(b"another version, longer")
    assert config_key(job) != before


@pytest.mark.parametrize("change, same", [
    ({"memory": {"low_vram": True, "offload_blocks": 3, "headroom_gib": 4.0, "check_vram": False}}, True),
    ({"save": {"save_every": 1, "keep_last": 0, "save_training_state": False, "tensorboard": "off"}}, True),
    ({"train": {"gradient_checkpointing": "full", "compile": "off"}}, True),
    ({"quant": {"ara_cache_dir": "/elsewhere"}, "text_encoder": {"cache_dir": "/elsewhere"}}, True),
    ({"train": {"timestep_shift": 8.0}}, True),  # timestep_type linear does not use it
    ({"train": {"timestep_type": "shift", "timestep_shift": 8.0}}, False),
    ({"optimizer": {"lr": 2e-4}}, False),
    ({"save": {"dtype": "fp32"}}, False),
    ({"sample": {"prompts": ["a cat"], "sample_every": 1}}, False),  # previews are part of what a run shows
    # settings another one switches off: editing them in a widget must not retrain a finished run
    ({"sample": {"prompts": ["a cat"], "steps": 7, "sample_every": 0}}, True),  # no preview renders
    ({"advanced": {"ema_decay": 0.9}}, True),
    ({"advanced": {"ema": True, "ema_decay": 0.9}}, False),
    ({"advanced": {"dop_multiplier": 3.0, "dop_class": "woman", "diff_guidance_scale": 5.0}}, True),
    ({"quant": {"quantizer": "uint4", "ara_rank": 8, "ara_calibration_samples": 0, "fp8_backward": False}}, True),
    ({"quant": {"transformer": "float8", "fp8_backward": False}}, False),
    ({"multistage": {"train_high_noise": False, "switch_every": 7}}, "one stage"),
    ({"train": {"validate_every": 5}}, True),  # no clip is held out
    ({"datasets": [{"trigger_separator": " ", "trigger_match": "substring", "window_start": "start", "fps": 24}]},
     True),  # no prepended trigger; uniform sampling has no window and no rate
    ({"datasets": [{"frame_sampling": "fps", "fps": 24}]}, False),
])
def test_the_unchanged_job_key_ignores_only_what_cannot_change_the_result(tmp_path, clips, change, same):
    from trainer_core.train.runs import config_key

    base = _job(tmp_path / "out", clips, 2)
    if same == "one stage":  # the same single stage on both sides, another switch_every
        base["multistage"]["train_high_noise"] = False
        same = True
    changed = {k: {**base.get(k, {}), **v} if isinstance(v, dict) else v for k, v in change.items()}
    if "datasets" in change:
        changed["datasets"] = [{**base["datasets"][0], **change["datasets"][0]}]
    if "timestep_type" not in change.get("train", {}):
        assert job_from_dict(base).train.timestep_type == "linear"
    assert (config_key(job_from_dict({**base, **changed})) == config_key(job_from_dict(base))) is same


def test_a_resume_may_drop_or_change_the_starting_pair(clips, tmp_path):
    from trainer_core.train.resume import resume_changes

    saved = job_from_dict(_job(tmp_path, clips, 2, lora={"init_high": "/somewhere/a.safetensors"}))
    now = job_from_dict(_job(tmp_path, clips, 4))
    refused, applied = resume_changes(saved.model_dump(mode="json"), now)
    assert refused == [] and applied == ["train.steps: 2 -> 4"]
    other_rank = job_from_dict(_job(tmp_path, clips, 4, lora={"rank": 8}))
    refused, _ = resume_changes(saved.model_dump(mode="json"), other_rank)
    assert refused == ["lora.rank was 4 in the state, now 8 (the saved LoRA has that shape)"]


def test_a_resume_ignores_settings_the_job_switches_off_but_refuses_them_when_used(clips, tmp_path):
    from trainer_core.train.resume import resume_changes

    one = {"train_high_noise": False}
    saved = job_from_dict(_job(tmp_path, clips, 2, multistage=one)).model_dump(mode="json")
    now = job_from_dict(_job(tmp_path, clips, 4, multistage={**one, "switch_every": 9}, advanced={"ema_decay": 0.5}))
    assert resume_changes(saved, now) == ([], ["train.steps: 2 -> 4"])
    both = job_from_dict(_job(tmp_path, clips, 2)).model_dump(mode="json")
    refused, _ = resume_changes(both, job_from_dict(_job(tmp_path, clips, 4, multistage={"switch_every": 9})))
    assert refused == ["multistage.switch_every was 2 in the state, now 9 (the saved per-expert progress assumes it)"]


def test_a_folder_left_with_only_a_killed_saves_temporaries_is_reclaimed(tmp_path, clips):
    """A run killed during its first save leaves no work: only temporaries (safetensors' own ``.tmpXXXXXX`` too).
    The next run takes that folder again, rather than moving to ``_run2`` and leaving gigabytes behind."""
    out = tmp_path / "out"
    run = out / "same"
    run.mkdir(parents=True)
    leftovers = [run / ".tmpuXSU8k", run / ".same_000002_high_noise.safetensors.1a2b3c4d.tmp"]
    for f in leftovers:
        f.write_bytes(b"partial")
    result = loop.run_training(job_from_dict(_job(out, clips, 2)), progress_bar=False)
    assert result.run_dir == run
    assert not any(f.exists() for f in leftovers)


def test_resume_latest_that_cannot_continue_names_the_older_run_that_can(tmp_path, clips, capsys):
    out = tmp_path / "out"
    assert _cli(tmp_path, _job(out, clips, 2), capsys)[0] == 0  # rank 4 -> same
    assert _cli(tmp_path, _job(out, clips, 2, lora={"rank": 8}), capsys)[0] == 0  # rank 8, newer -> same_run2
    code, _, err = _cli(tmp_path, {**_job(out, clips, 4), "resume": "latest"}, capsys)  # rank 4 again
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1
    assert "same_run2" in lines[0] and "lora.rank" in lines[0]
    assert f"the older run {out / 'same'} (step 2) has settings this job can continue - resume: {out / 'same'}" \
        in lines[0]
    # with no run it could continue, the refusal stays as it was
    code, _, err = _cli(tmp_path, {**_job(out, clips, 4, lora={"rank": 16}), "resume": "latest"}, capsys)
    assert code == 2 and "the older run" not in err
