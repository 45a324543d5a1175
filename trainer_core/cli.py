"""Headless entry point: ``python -m trainer_core train|check|sample|demo`` (see ``--help``)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import JobConfig, job_from_dict, job_warnings, load_yaml
from .errors import ConfigError, TrainerError, TrainingDiverged

log = logging.getLogger(__name__)


def load_job(path: str | Path, resume: str | None = None, *, continue_run: bool = False
             ) -> tuple[JobConfig, list[str]]:
    """:func:`read_job` without its message translator."""
    cfg, notes, _ = read_job(path, resume, continue_run=continue_run)
    return cfg, notes


def read_job(path: str | Path, resume: str | None = None, *, continue_run: bool = False
             ) -> tuple[JobConfig, list[str], Callable[[str], str]]:
    """Read a job YAML (this trainer's schema or ai-toolkit's Wan 2.2 job shape) into a validated JobConfig.

    ``resume`` (the command line's ``--resume``) replaces the file's. With ``continue_run`` (train, check), an
    ai-toolkit job given no ``resume`` continues from its newest training state, as ai-toolkit continues a job that
    is run again (:func:`~trainer_core.aitoolkit.continue_from_latest`); the log says so.

    Returns the config, the warnings (ai-toolkit keys that were not applied, and settings that are valid but almost
    surely not meant: :func:`~trainer_core.config.job_warnings`) and the function that words a later message in the
    file's own keys (:func:`~trainer_core.aitoolkit.aitoolkit_terms` for an ai-toolkit job; else unchanged).
    """
    from .aitoolkit import (
        aitoolkit_terms,
        continue_from_latest,
        is_aitoolkit_config,
        job_from_aitoolkit,
    )

    data = load_yaml(path)
    terms: Callable[[str], str] = str
    if is_aitoolkit_config(data):
        cfg, notes = job_from_aitoolkit(data, str(path))  # its errors name the keys of the file
        terms = aitoolkit_terms(data)
        if continue_run and resume is None and (line := continue_from_latest(cfg, data, str(path))) is not None:
            cfg.resume = "latest"
            log.info("%s", line)
    else:
        cfg, notes = job_from_dict(data, source=str(path)), []
    if resume is not None:
        cfg.resume = resume
    return cfg, notes + [terms(w) for w in job_warnings(cfg)], terms  # the mapper's notes name the file's keys


@contextmanager
def _in_job_terms(terms: Callable[[str], str]) -> Iterator[None]:
    """Re-raise a trainer error of the block worded by ``terms`` (the job file's own keys), same type."""
    try:
        yield
    except TrainerError as exc:
        exc.args = (terms(str(exc)),)
        raise


#: The demo's steps when ``--steps`` is not given.
DEMO_STEPS = 40


def demo_config(output_dir: str | Path, steps: int = DEMO_STEPS) -> dict[str, Any]:
    """The demo job: tiny preset, synthetic clips, both experts alternating every 5 steps."""
    out = Path(output_dir)
    return {
        "name": "demo",
        "trigger_word": "sqz",
        "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
        "lora": {"rank": 8},
        "multistage": {"switch_every": 5},
        "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
        "train": {
            "steps": steps,
            "batch_size": 2,
            "gradient_checkpointing": False,
            "compute_dtype": "fp32",
            "device": "cpu",
            "seed": 7,
            "num_workers": 0,
        },
        "save": {"output_dir": str(out), "save_every": max(steps // 2, 1), "keep_last": 2, "dtype": "bf16"},
        "datasets": [
            {
                "folder": str(out / "demo_clips"),
                "num_frames": 9,
                "resolutions": [64],
                "caption_dropout": 0.0,
            }
        ],
    }


def _cmd_train(args: argparse.Namespace) -> int:
    from .launch import emit, interrupt_on_sigterm
    from .train.loop import losses_summary, run_training

    if args.resume is not None and not args.resume.strip():  # e.g. an unset shell variable: never a fresh run
        raise ConfigError("--resume is empty - give latest, a run folder or a state file, or leave --resume out")
    cfg, notes, terms = read_job(args.config, args.resume, continue_run=True)
    for note in notes if _rank() == 0 else ():  # under torchrun every rank reads the same file: rank 0 says it
        print(f"warning: {note}", file=sys.stderr)
    interrupt_on_sigterm()  # a scheduler's or torchrun's SIGTERM leaves a resumable state, like Ctrl-C
    on_step = None
    if args.events:

        def on_step(info) -> None:
            emit("step", step=info.step, total=info.total_steps, expert=info.expert, loss=info.loss, lr=info.lr,
                 seconds=info.seconds)

    def on_run(run) -> None:
        if args.events:
            emit("run", run_dir=str(run.path))

    stop_file = Path(args.stop_file) if args.stop_file else None
    with _in_job_terms(terms):
        result = run_training(cfg, on_run=on_run, on_step=on_step, progress_bar=not args.events, stop_file=stop_file)
    if args.events:
        emit("done", step=result.step, run_dir=str(result.run_dir),
             lora_files={k: str(v) for k, v in result.lora_files.items()})
    if _rank() != 0:
        return 0
    print(losses_summary(result.losses))
    for expert, path in result.lora_files.items():
        print(f"{expert}-noise LoRA: {path}")
    return 0


#: Folders of at least this many files show a counter on stderr while they are scanned and decoded.
PROGRESS_FROM = 20


class _Counter:
    """``what: done/total`` on stderr while ``check`` scans and decodes a large dataset (one line rewritten on a
    terminal; every tenth otherwise, so logs stay short)."""

    def __call__(self, what: str, done: int, total: int) -> None:
        if total < PROGRESS_FROM:
            return
        if sys.stderr.isatty():
            print(f"\r{what}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{what}: {done}/{total}", file=sys.stderr, flush=True)


def _cmd_check(args: argparse.Namespace) -> int:
    """Dry-run a job (:func:`~trainer_core.check.check_job`): the report on stdout, each reason it cannot train as
    an ``error:`` line on stderr; exit status 2 when there is one."""
    from .check import check_job

    cfg, notes, terms = read_job(args.config, continue_run=True)
    if args.gpu_fp8 and args.gpu_gib is None:
        raise ConfigError("check: --gpu-fp8 describes the card of --gpu-gib - give --gpu-gib N too (a card here "
                          "is asked directly)")
    result = check_job(cfg, gpu_gib=args.gpu_gib, gpu_fp8=args.gpu_fp8, decode=not args.no_decode,
                       progress=_Counter())
    # the job file's warnings first, as `train` prints them; every line in the file's own keys
    result.warnings = [*notes, *map(terms, result.warnings)]
    result.reasons = [terms(r) for r in result.reasons]
    result.sections = [(title, terms(text)) for title, text in result.sections]
    print(f"checked {args.config} (job '{cfg.name}', {cfg.train.steps} steps)\n")
    print(result.report())
    for reason in result.reasons:
        print(f"error: {reason}", file=sys.stderr)
    return 0 if result.can_train else 2


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size in GiB (e.g. 24 for a 24 GB card)")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data.synthetic import make_synthetic_dataset
    from .fileio import check_writable
    from .train.loop import losses_summary, run_training

    if args.steps < 1:
        raise ConfigError(f"demo --steps is {args.steps}: the demo trains at least 1 step - use e.g. the default "
                          f"{DEMO_STEPS}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"demo --output: {out} is a file - give a folder (it is made if missing)")
    check_writable(out, "demo --output")  # before any clip is written
    cfg = job_from_dict(demo_config(out, args.steps), source="demo")
    make_synthetic_dataset(cfg.datasets[0].folder, n_clips=8, num_frames=9, size=(64, 64), seed=0)
    t0 = time.perf_counter()
    result = run_training(cfg)
    print(f"\ntrained {result.step} steps in {time.perf_counter() - t0:.1f} s; mean loss per expert:")
    print(losses_summary(result.losses))
    for expert, path in result.lora_files.items():
        print(f"{expert}-noise LoRA: {path}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    """Render the job's model with an optional LoRA pair (any common Wan LoRA format) to video files."""
    from .launch import interrupt_on_sigterm
    from .sample.render import render_job
    from .train.loop import resolve_device

    cfg, notes, terms = read_job(args.config)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    interrupt_on_sigterm()  # stops like Ctrl-C: the video being written is removed, not left as a temporary
    loras = {"high": args.lora_high, "low": args.lora_low}
    with _in_job_terms(terms):
        device = resolve_device(cfg.train.device)
        for path in render_job(cfg, loras, Path(args.out), args.prompt, device):
            print(f"video: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m trainer_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train from a YAML job file (this trainer's schema or ai-toolkit's)")
    p_train.add_argument("config", help="path to the job YAML")
    p_train.add_argument("--resume", help="training-state file, run folder, or 'latest'")
    p_train.add_argument("--events", action="store_true", help="print progress as '@@wan22 {json}' lines (rank 0)")
    p_train.add_argument("--stop-file", help="expert groups: when this file appears, stop at the end of the round "
                         "with a resumable state")
    p_train.set_defaults(func=_cmd_train)
    p_check = sub.add_parser("check", help="dry run: validate a job, scan and decode its dataset, plan its GPU and "
                             "host memory; loads no model weight, exit status 2 when it cannot train")
    p_check.add_argument("config", help="path to the job YAML (this trainer's schema or ai-toolkit's)")
    p_check.add_argument("--gpu-gib", type=_gib, help="plan for a card with this many GiB free (default: this "
                         "machine's GPU)")
    p_check.add_argument("--gpu-fp8", action="store_true", help="the --gpu-gib card multiplies in fp8 (RTX 40xx/50xx, "
                         "L40S, H100): decides quant.transformer auto (float8, else 4bit_ara) and the plan's advice")
    p_check.add_argument("--no-decode", action="store_true", help="skip decoding one sample of every file (the scan "
                         "still opens each file and decodes a few frames)")
    p_check.set_defaults(func=_cmd_check)
    p_sample = sub.add_parser("sample", help="render videos with the job's model, sample settings and any LoRA pair")
    p_sample.add_argument("config", help="job YAML: model, sample and multistage.boundary are used")
    p_sample.add_argument("--lora-high", help="high-noise expert's LoRA (.safetensors or .pt; ComfyUI, ComfyUI's "
                          "trainer, ai-toolkit, kohya/musubi or diffusers format); without it the base model renders")
    p_sample.add_argument("--lora-low", help="low-noise expert's LoRA; without it the base model renders")
    p_sample.add_argument("--prompt", action="append", help="prompt (repeat for several videos; default: "
                          "sample.prompts of the job)")
    p_sample.add_argument("--out", required=True, help="video file, *.mp4 or *.webm (several prompts: OUT_00.mp4, ...)")
    p_sample.set_defaults(func=_cmd_sample)
    p_demo = sub.add_parser("demo", help="train the tiny preset on synthetic clips (under a minute on 2 CPU cores)")
    p_demo.add_argument("--output", default="output", help="output folder (default: ./output)")
    p_demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})")
    p_demo.set_defaults(func=_cmd_demo)
    return parser


def _rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def _many() -> bool:
    """Whether this process is one of several (torchrun): each prints to the same terminal."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _new_line() -> str:
    """What a non-zero rank prints before its error: a line break, as rank 0's progress bar is mid-line."""
    return "" if _rank() == 0 else "\n"


def _rank0_speaks(exc: TrainerError) -> bool:
    """Whether rank 0's line already says it all for this (non-zero) rank's error: a NaN (every rank stops at the
    same step), another rank's failure (rank 0 names it, unless rank 0 is the one gone), an error before the ranks
    connected (the same job file and settings on every rank), the start-up checks the ranks agreed on
    (:class:`~trainer_core.train.distributed.RanksRefused`: rank 0's line holds every rank's error) or the same
    error on rank 0 (:func:`~trainer_core.train.distributed.failed_like_rank0`)."""
    if "torch.distributed" not in sys.modules:  # failed before training imported torch: nothing rank-specific yet
        return True
    import torch.distributed as dist

    from .train.distributed import PeerStopped, RanksRefused, failed_like_rank0, speaks_for_the_run

    if isinstance(exc, PeerStopped):
        return not speaks_for_the_run()
    if isinstance(exc, (TrainingDiverged, RanksRefused)) or not dist.is_initialized():
        return True
    return failed_like_rank0()


def _unexpected(exc: Exception) -> int:
    """One rank of several failed on an error that is not the trainer's own: its traceback, marked with the rank,
    then one line, which rank 0's line and the Train LoRA node point to."""
    rank = _rank()
    print(_new_line(), end="", file=sys.stderr)
    for line in traceback.format_exception(exc):
        print("".join(f"[rank{rank}]: {part}\n" for part in line.rstrip("\n").split("\n")), end="", file=sys.stderr)
    kept = "" if rank == 0 else "; rank 0's line says what is kept"
    print(f"error: rank {rank} stopped on {type(exc).__name__}: {exc} (the traceback above says where) - the other "
          f"processes stopped too{kept}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; trainer errors print one clear message and exit with status 2. Under torchrun, rank 0 speaks
    for every rank: the others log warnings only and print an error only when it is theirs alone."""
    args = build_parser().parse_args(argv)
    # The dataset report, the VRAM plan and quantization summaries are logged at INFO by the core.
    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING, format="%(message)s")
    # bitsandbytes logs a warning about an optional CPU kernel package at import; it changes nothing here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except TrainerError as exc:
        _quiet_exit()
        if _rank() == 0 or not _rank0_speaks(exc):
            print(f"{_new_line()}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _quiet_exit()
        if _rank() == 0:  # the loop has logged what it saved and how to resume; a traceback would only bury that line
            print("stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _many():
            raise
        _quiet_exit()
        return _unexpected(exc)
    finally:
        _quiet_exit()


def _quiet_exit() -> None:
    """Under torchrun the outcome is decided once main ends or fails: a later signal (torchrun's closing SIGTERM, a
    second Ctrl-C during exit) must not add a KeyboardInterrupt traceback."""
    if _many():
        from .train.stop import ignore_stop_signals

        ignore_stop_signals()
