"""Data-parallel training with torchrun on CPU (gloo): same global batch -> same training as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.train.loop import run_training
from trainer_core.train.runs import read_validation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp: Path, clips: Path, out: str, **train) -> dict:
    return {
        "name": "d",
        "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
        "lora": {"rank": 4},
        "multistage": {"switch_every": 2},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        # batch 3 over 4 clips: every epoch ends with a 1-sample batch, which leaves rank 1 without a sample.
        "train": {"steps": 4, "batch_size": 3, "gradient_checkpointing": "off", "compute_dtype": "fp32",
                  "device": "cpu", "seed": 5, "num_workers": 0, **train},
        "save": {"output_dir": str(tmp / out), "save_every": 2, "keep_last": 0, "dtype": "fp32"},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32], "caption_dropout": 0.0}],
    }


def _torchrun(tmp: Path, job: dict, world: int, ok: bool = True, **env_vars: str):
    """Train ``job`` with ``world`` torchrun processes; returns the checkpoint-writes log (or, with ``ok=False``, the
    failed run's completed process)."""
    path = tmp / f"job_{world}.yaml"
    path.write_text(yaml.safe_dump(job))
    writes = tmp / f"writes_{world}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WRITES_LOG": str(writes), "OMP_NUM_THREADS": "1", **env_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "tests" / "dist_worker.py"), "train", str(path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not ok:
        return out
    assert out.returncode == 0, out.stderr[-3000:]
    return writes


def _assert_lora_close(a: dict, b: dict, atol: float = 1e-4) -> None:
    # Summation order differs across ranks (~1e-7 relative); Adam divides by sqrt(v), which amplifies that for
    # near-zero gradients, so compare against the size of the updates (lr 2e-3 x 4 steps), not bit by bit.
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=atol)


def _losses(run_dir: Path) -> list[float]:
    return [float(line.split(",")[2]) for line in (run_dir / "losses.csv").read_text().splitlines()[1:]]


def _assert_trains_like(reference, run: Path, atol: float = 1e-4) -> None:
    """``run``'s losses.csv and its final (step 4) LoRA pair match the one-process ``reference`` result."""
    assert _losses(run) == pytest.approx([x[2] for x in reference.losses], rel=1e-5)
    for expert in ("high", "low"):
        _assert_lora_close(load_file(str(reference.lora_files[expert])),
                           load_file(str(run / f"d_000004_{expert}_noise.safetensors")), atol)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("clips"), n_clips=4, num_frames=5, size=(32, 32), seed=2)


def test_two_ranks_train_like_one_process_and_only_rank0_writes(tmp_path, clips):
    single = run_training(job_from_dict(_job(tmp_path, clips, "single")), progress_bar=False)
    writes = _torchrun(tmp_path, _job(tmp_path, clips, "ddp"), world=2)
    run = tmp_path / "ddp" / "d"
    _assert_trains_like(single, run)
    assert writes.read_text().split() == ["0", "0"]  # steps 2 and 4, rank 0 only


def test_lora_dropout_masks_do_not_depend_on_the_number_of_ranks(tmp_path, clips):
    # Each rank used to apply the masks of the global batch's first rows to its own rows (same seed everywhere).
    dropout = {"lora": {"rank": 4, "dropout": 0.3}}
    single = run_training(job_from_dict({**_job(tmp_path, clips, "single"), **dropout}), progress_bar=False)
    _torchrun(tmp_path, {**_job(tmp_path, clips, "ddp"), **dropout}, world=2)
    # dropped features leave more near-zero gradients for Adam to amplify (the old masks differed by 1e-2)
    _assert_trains_like(single, tmp_path / "ddp" / "d", atol=5e-4)


def test_ranks_that_found_different_data_refuse_to_train(tmp_path, clips):
    # rank 1 scans a folder with one clip fewer: as if a copy into the dataset folder was still running
    fewer = tmp_path / "fewer"
    make_synthetic_dataset(fewer, n_clips=3, num_frames=5, size=(32, 32), seed=2)
    out = _torchrun(tmp_path, _job(tmp_path, clips, "ddp"), world=2, ok=False, RANK1_DATASET=str(fewer))
    assert out.returncode != 0
    assert "the dataset changed while the 2 processes read it (rank 0: 4 item(s)" in out.stderr
    assert "rank 1: 3 item(s)" in out.stderr and "start again" in out.stderr
    assert not (tmp_path / "ddp" / "d").exists()  # refused before the run folder was claimed


def test_resume_with_a_different_number_of_ranks(tmp_path, clips):
    full = run_training(job_from_dict(_job(tmp_path, clips, "full")), progress_bar=False)
    run_training(job_from_dict(_job(tmp_path, clips, "part", steps=2)), progress_bar=False)
    _torchrun(tmp_path, {**_job(tmp_path, clips, "part"), "resume": "latest"}, world=2)
    run = tmp_path / "part" / "d"
    _assert_trains_like(full, run)


def test_sharded_experts_train_like_one_process(tmp_path, clips):
    # FSDP2 shards the frozen weights over the two ranks; the 1-sample batches make rank 1 compute a stand-in with
    # weight 0 (its gathers are collectives). Full checkpointing exercises the re-gather in backward too.
    over = dict(gradient_checkpointing="full")
    single = run_training(job_from_dict(_job(tmp_path, clips, "single", **over)), progress_bar=False)
    job = {**_job(tmp_path, clips, "fsdp", **over), "distributed": {"shard_experts": True}}
    writes = _torchrun(tmp_path, job, world=2)
    shards = [line.split() for line in Path(f"{writes}.shards").read_text().splitlines()]
    assert sorted(r for r, _, _ in shards) == ["0", "0", "1", "1"]  # two experts on each rank
    for _, local, full in shards:  # each rank holds about half of every frozen block weight
        assert 0.45 * int(full) <= int(local) <= 0.55 * int(full)
    run = tmp_path / "fsdp" / "d"
    _assert_trains_like(single, run)
    assert writes.read_text().split() == ["0", "0"]


def test_sharded_run_resumes_in_one_process(tmp_path, clips):
    full = run_training(job_from_dict(_job(tmp_path, clips, "full")), progress_bar=False)
    part = {**_job(tmp_path, clips, "part", steps=2), "distributed": {"shard_experts": True}}
    _torchrun(tmp_path, part, world=2)
    resumed = run_training(job_from_dict({**_job(tmp_path, clips, "part"), "resume": "latest"}), progress_bar=False)
    assert [x[2] for x in resumed.losses] == pytest.approx([x[2] for x in full.losses], rel=1e-5)


def test_scaling_benchmark_runs_under_torchrun(tmp_path):
    bench = ROOT / "benchmarks" / "scaling_bench.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outs = []
    modes = ((1, []), (2, []), (2, ["--shard"]), (1, ["--experts", "2"]), (2, ["--expert-groups"]))
    for world, extra in modes:
        out = tmp_path / f"w{world}{''.join(extra)}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(bench), "--tiny", "--steps", "2", "--out", str(out), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(str(out))
    report = subprocess.run([sys.executable, str(bench), "--report", *outs], env=env, capture_output=True, text=True)
    rows = [line.split("|")[2:-1] for line in report.stdout.splitlines() if line.startswith("| 32x32x5, bf16 |")]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        ("1", "1", "—"), ("2", "1", "data parallel"), ("2", "1", "sharded"),
        ("1", "2", "—"), ("2", "2", "expert groups")]
    # each one-GPU run is its own baseline; the others are measured against the one with the same experts
    assert rows[0][5].strip() == rows[3][5].strip() == "100%"
    runs = {(r["world"], r["experts"], r["expert_groups"]): r for r in (json.loads(Path(p).read_text()) for p in outs)}
    groups, both = runs[(2, 2, True)], runs[(1, 2, False)]
    assert rows[4][5].strip() == f"{groups['samples_per_s'] / (2 * both['samples_per_s']):.0%}"


def _grouped(tmp: Path, clips: Path, out: str, **train) -> dict:
    """The job with both experts alternating every step (what expert groups compute), optionally grouped."""
    return {**_job(tmp, clips, out, **train), "multistage": {"switch_every": 1}}


def test_expert_groups_train_like_one_process(tmp_path, clips):
    # Two ranks: rank 0 holds and trains the high-noise expert, rank 1 the low-noise one, both in every round.
    single = run_training(job_from_dict(_grouped(tmp_path, clips, "single")), progress_bar=False)
    job = {**_grouped(tmp_path, clips, "groups"), "distributed": {"expert_groups": True}}
    writes = _torchrun(tmp_path, job, world=2)
    held = sorted(Path(f"{writes}.experts").read_text().splitlines())
    assert held == ["0 high", "1 low"]
    run = tmp_path / "groups" / "d"
    assert [line.split(",")[1] for line in (run / "losses.csv").read_text().splitlines()[1:]] == [
        "high", "low", "high", "low"]
    _assert_trains_like(single, run)
    assert writes.read_text().split() == ["0", "0"]  # rank 0 writes both experts (saves at steps 2 and 4)


def test_expert_groups_of_two_ranks_split_each_batch(tmp_path, clips):
    # Four ranks: two per expert, each group data-parallel on its own (the 1-sample batches leave a rank idle).
    single = run_training(job_from_dict(_grouped(tmp_path, clips, "single")), progress_bar=False)
    job = {**_grouped(tmp_path, clips, "groups4"), "distributed": {"expert_groups": True}}
    writes = _torchrun(tmp_path, job, world=4)
    held = sorted(Path(f"{writes}.experts").read_text().splitlines())
    assert held == ["0 high", "1 high", "2 low", "3 low"]
    run = tmp_path / "groups4" / "d"
    _assert_trains_like(single, run)


def test_expert_group_states_resume_across_placements(tmp_path, clips):
    full = run_training(job_from_dict(_grouped(tmp_path, clips, "full", steps=5)), progress_bar=False)
    # one process stops after step 3 (a high-noise step); the groups resume with a round holding only step 4 (low)
    run_training(job_from_dict(_grouped(tmp_path, clips, "a", steps=3)), progress_bar=False)
    grouped = {"distributed": {"expert_groups": True}, "resume": "latest"}
    _torchrun(tmp_path, {**_grouped(tmp_path, clips, "a", steps=4), **grouped}, world=2)
    resumed = run_training(job_from_dict({**_grouped(tmp_path, clips, "a", steps=5), "resume": "latest"}),
                           progress_bar=False)
    assert [x[2] for x in resumed.losses] == pytest.approx([x[2] for x in full.losses], rel=1e-5)
    assert [x[1] for x in resumed.losses] == ["high", "low", "high", "low", "high"]
    for expert in ("high", "low"):
        _assert_lora_close(load_file(str(full.lora_files[expert])), load_file(str(resumed.lora_files[expert])))


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("held"), n_clips=2, num_frames=5, size=(32, 32), seed=3)


@pytest.mark.parametrize("placement", [{}, {"shard_experts": True}, {"expert_groups": True}],
                         ids=["data parallel", "sharded", "expert groups"])
def test_validation_losses_agree_across_placements(tmp_path, clips, held, placement):
    # Each clip's 4 noise levels in batches of 3: rank 1 gets no row of the second batch (sharded: a stand-in row
    # of weight 0); expert groups compute one expert each and exchange them.
    job = _grouped(tmp_path, clips, "single")
    job["datasets"].append({"folder": str(held), "num_frames": 5, "resolutions": [32], "validation": True})
    single = run_training(job_from_dict(job), progress_bar=False)
    _torchrun(tmp_path, {**job, "save": {**job["save"], "output_dir": str(tmp_path / "ranks")},
                         "distributed": placement}, world=2)  # fmt: skip
    got = read_validation(tmp_path / "ranks" / "d")
    assert [row[:2] for row in got] == [row[:2] for row in single.validation] and len(got) == 6  # steps 0, 2, 4
    assert [row[2] for row in got] == pytest.approx([row[2] for row in single.validation], rel=1e-5)


# --- failures: one clear line, from the rank that has something to say ---------------------------------------------


def _failing(tmp: Path, clips: Path, out: str) -> dict:
    """8 steps saved every 2, both experts every step (rank 1 runs a backward every second step: batches 3, 1)."""
    return _grouped(tmp, clips, out, steps=8)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_rank_that_fails_mid_run_leaves_rank0_one_line_naming_the_resumable_state(tmp_path, clips):
    # rank 1's 3rd backward (step 6) raises; rank 0's collective of step 6 then fails on the closed connection, and
    # rank 0 keeps the state of step 5, the last it completed
    out = _torchrun(tmp_path, _failing(tmp_path, clips, "crash"), world=2, ok=False,
                    FAULT="raise", FAULT_RANK="1", FAULT_CALL="3")  # fmt: skip
    assert out.returncode != 0
    assert "[rank0]: Traceback" not in out.stderr and "Connection closed by peer" not in out.stderr
    own, rank0 = _error_lines(out.stderr)  # rank 1's own error first, then rank 0's line pointing to it
    assert own.startswith("error: rank 1 stopped on OSError") and "Input/output error (injected)" in own
    assert rank0.startswith("error: training stopped: rank 1 failed (its own error is above); resumable state at "
                            "step 5: ") and "--resume latest" in rank0
    assert (tmp_path / "crash" / "d" / "training_state_000005.safetensors").is_file()


def test_when_rank0_is_gone_the_next_rank_says_what_is_kept(tmp_path, clips):
    # rank 0 ends at once in step 5 (its 5th backward), as kill -9 would: rank 1 is the one left to say it
    out = _torchrun(tmp_path, _failing(tmp_path, clips, "gone"), world=2, ok=False,
                    FAULT="exit", FAULT_RANK="0", FAULT_CALL="5")  # fmt: skip
    assert out.returncode != 0 and "[rank1]: Traceback" not in out.stderr
    (line,) = _error_lines(out.stderr)
    assert line.startswith("error: training stopped: another process of this run ended") and (
        "resumable state at step 4: " in line)


def test_a_nan_on_one_rank_prints_one_diverged_line(tmp_path, clips):
    out = _torchrun(tmp_path, _failing(tmp_path, clips, "nan"), world=2, ok=False,
                    FAULT="nan_loss", FAULT_RANK="1", FAULT_CALL="3")  # fmt: skip
    assert out.returncode != 0
    # rank 0's line, with the last good state; rank 1 had none to name (its line was glued to rank 0's progress bar)
    assert out.stderr.count("became nan") == 1
    (line,) = _error_lines(out.stderr)
    # step 6 (low) diverged: the state of step 4 holds the low expert's weights that led to it and is set aside
    assert "became nan at step 6" in line and "the last good state is step 2" in line


def test_an_error_every_rank_hits_is_printed_once(tmp_path, clips):
    # raised after the ranks connected (preflight's resume check): rank 1 finds rank 0 failed alike and stays quiet
    job = {**_job(tmp_path, clips, "bad"), "resume": str(tmp_path / "no_such_state.safetensors")}
    out = _torchrun(tmp_path, job, world=2, ok=False)
    assert out.returncode != 0
    (line,) = _error_lines(out.stderr)
    assert "no_such_state" in line


def test_expert_groups_that_cannot_form_are_refused_before_the_run_folder_is_claimed(tmp_path, clips, monkeypatch):
    # as rank 0 of 3 processes: the refusal comes before any collective and before open_run, so no run folder
    import trainer_core.train.loop as loop
    from trainer_core.errors import TrainerError
    from trainer_core.train.distributed import DistContext

    monkeypatch.setattr(loop, "init_distributed", lambda device: DistContext(rank=0, world=3))
    # the three ranks agree on their start-up checks: each met the same refusal
    monkeypatch.setattr(DistContext, "all_gather_object", lambda self, obj: [obj] * self.world)
    # this pytest process keeps its Ctrl-C (raising=False: the test must fail on the order, not on a missing name)
    monkeypatch.setattr(loop, "ignore_stop_signals", lambda: None, raising=False)
    job = {**_grouped(tmp_path, clips, "g3"), "distributed": {"expert_groups": True}}
    with pytest.raises(TrainerError, match="^distributed.expert_groups needs both experts and an even number of GPUs, "
                       "got 3 process"):
        run_training(job_from_dict(job), progress_bar=False)
    assert not (tmp_path / "g3" / "d").exists()


def test_start_up_refusals_are_agreed_on_by_every_rank():
    """Errors of the start-up checks are gathered, not raced: one message when all ranks met it, else each distinct
    one with its ranks; the ranks that passed refuse too (no rank goes on to train alone)."""
    from trainer_core.errors import ConfigError, TrainerError
    from trainer_core.train.distributed import DistContext, RanksRefused, on_every_rank

    class Gathered(DistContext):
        def all_gather_object(self, obj):
            return self.errors  # what every rank's check raised (None: it passed)

    def gathered(errors):
        ctx = Gathered(rank=1, world=len(errors))
        object.__setattr__(ctx, "errors", errors)
        return ctx

    def fails():
        raise ConfigError("lora.rank was 8")

    with pytest.raises(RanksRefused, match=r"^lora.rank was 8$"):
        on_every_rank(gathered(["lora.rank was 8", "lora.rank was 8"]), fails)
    with pytest.raises(RanksRefused, match=r"^rank 0: missing clip$"):
        on_every_rank(gathered(["missing clip", None]), lambda: 1)
    with pytest.raises(RanksRefused, match=r"^rank 0, 2: a; rank 1: b$"):
        on_every_rank(gathered(["a", "b", "a"]), fails)
    assert on_every_rank(gathered([None, None]), lambda: 7) == 7
    assert issubclass(RanksRefused, TrainerError)
