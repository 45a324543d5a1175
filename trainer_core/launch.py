"""Run a job on several GPUs from a single-process host (ComfyUI): ``torchrun`` as a child process whose rank 0
streams progress events back, and which can be cancelled into a resumable state.

The child is ``python -m torch.distributed.run --standalone --nproc_per_node=N -m trainer_core train JOB --events``.
With ``--events`` rank 0 prints one line per event, ``@@wan22 {json}``: ``run`` when it has claimed its run
folder, ``step`` after each optimizer step and ``done`` at the end (LoRA files, run folder). Cancelling sends
SIGTERM to torchrun, which forwards it to its workers; the CLI turns the first SIGTERM into ``KeyboardInterrupt``,
so the training loop writes the resumable state of the last completed step, exactly as a Ctrl-C would. With
``distributed.expert_groups`` the workers must instead finish the round of steps in flight and write the state
together, which can take longer than torchrun waits after a SIGTERM (30 s before torch 2.12): a cancel then creates
the stop file (``--stop-file``, in the launch's own folder) and sends no signal; SIGTERM and SIGKILL follow only if
the workers outlast the grace period.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import JobConfig
from .errors import TrainerError
from .fileio import atomic_write

EVENT_PREFIX = "@@wan22 "
#: Seconds the workers get to write their resumable state after a cancel before they are killed (expert groups
#: first finish the round in flight: about 45 s at 1024x1024x81 on an H200).
CANCEL_GRACE_S = 300.0


class LaunchCancelled(TrainerError):
    """The multi-GPU run was cancelled; a resumable state of its last completed step was written (if any)."""


def emit(event: str, **fields: Any) -> None:
    """Print one progress event for the launching process (rank 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def interrupt_on_sigterm() -> None:
    """Turn the first SIGTERM into ``KeyboardInterrupt`` (torchrun forwards a cancel as SIGTERM); later ones are
    ignored so that writing the resumable state is not cut short."""
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt("cancelled (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)


STOP_FILE = ".stop_requested"


def torchrun_command(job_file: Path, gpus: int) -> list[str]:
    """The child's command line."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "trainer_core", "train", str(job_file), "--events", "--stop-file", str(job_file.parent / STOP_FILE)]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, signal_first: bool = True) -> None:
    """SIGTERM to torchrun (the workers write their resumable state; without ``signal_first`` they were asked
    through the stop file), then, after the grace period, SIGKILL."""
    if proc.poll() is None:
        if signal_first:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)
    proc.wait()


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """This environment plus ``extra``, with this package importable in the child (a ComfyUI custom-node folder is
    on the host's ``sys.path``, not necessarily on ``PYTHONPATH``)."""
    env = {**os.environ, **(extra or {})}
    # torchrun's own wait for its workers after forwarding a SIGTERM (default 30 s): as long as ours
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(CANCEL_GRACE_S)))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_torchrun(
    cfg: JobConfig,
    gpus: int,
    on_event: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    env: dict[str, str] | None = None,
    poll_s: float = 0.2,
) -> dict[str, Any]:
    """Train ``cfg`` on ``gpus`` processes under torchrun; return the ``done`` event.

    ``on_event`` receives every other event (``run`` with the run folder the child claimed, ``step``);
    ``should_stop`` is polled while the child runs and, once true, cancels it (:class:`LaunchCancelled` is raised
    after the workers wrote their state). A failed child raises :class:`TrainerError` with the end of its output.
    """
    if gpus < 2:
        raise ValueError("run_torchrun is for 2 or more processes; train in-process otherwise")
    # The job file and stop file live in a folder of this launch's own: the child claims its run folder itself.
    launch_dir = Path(cfg.save.output_dir) / ".launch" / f"{cfg.name}.{os.getpid()}.{secrets.token_hex(4)}"
    job_file = atomic_write(
        launch_dir / "job.yaml", lambda p: p.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    )
    try:
        return _supervise(cfg, gpus, job_file, on_event, should_stop, env, poll_s)
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)


def _supervise(
    cfg: JobConfig,
    gpus: int,
    job_file: Path,
    on_event: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    env: dict[str, str] | None,
    poll_s: float,
) -> dict[str, Any]:
    """Start torchrun on ``job_file``, relay its events, stop it when asked; return its ``done`` event."""
    stop_file = job_file.parent / STOP_FILE
    proc = subprocess.Popen(
        torchrun_command(job_file, gpus), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=_child_env(env), start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    tail: deque[str] = deque(maxlen=15)
    # the CLI's "error: ..." lines, each once: rank 0's, and a rank's own error before rank 0's line that names it
    errors: dict[str, None] = {}
    done, cancelled_at, killed = None, None, False
    try:
        while True:
            if cancelled_at is None and should_stop():
                cancelled_at = time.monotonic()
                if cfg.distributed.expert_groups:
                    stop_file.touch()  # the groups stop together at the round's end
                else:
                    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
            waited = time.monotonic() - cancelled_at if cancelled_at is not None else 0.0
            if not killed and waited > CANCEL_GRACE_S:
                killed = True
                _kill_group(proc)
            try:
                line = lines.get(timeout=poll_s)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith(EVENT_PREFIX):
                event = json.loads(line[len(EVENT_PREFIX):])
                if event["event"] == "done":
                    done = event
                else:
                    on_event(event)
            else:
                tail.append(line.rstrip())
                if line.startswith("error: "):
                    errors[line.rstrip()] = None
    except BaseException:
        # on_event or should_stop raised (e.g. the host's own interrupt): stop the child as a cancel does
        if cfg.distributed.expert_groups:
            stop_file.touch()
        _stop(proc, signal_first=not cfg.distributed.expert_groups)
        raise
    code = proc.wait()
    _kill_group(proc)  # any worker torchrun left behind
    if cancelled_at is not None:
        raise LaunchCancelled(f"multi-GPU training cancelled (torchrun exit status {code})")
    if code != 0 or done is None:
        cause = "\n".join(errors) or "\n".join(tail)
        raise TrainerError(f"multi-GPU training failed (torchrun exit status {code}):\n{cause}")
    return done
