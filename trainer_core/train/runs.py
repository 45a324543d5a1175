"""Run identity: every training run owns one folder, and nothing a run does touches another run's files.

A job's first run writes into ``<save.output_dir>/<name>``; a later fresh run of the same name (no ``resume``) gets
``<name>_run2``, ``<name>_run3``, ...; a resumed run continues in the folder of the state it resumes when that state
is its run's newest, and branches into a new folder otherwise. Each folder's ``run.json`` (the manifest) records the
run id, the job name, hashes of the resolved settings and of the dataset, the run's status and the files it wrote at
each checkpoint step. Pruning, ``resume: latest``, the final pair and the "unchanged job" lookup read only manifests,
so a file that another tool or another run put into a folder is never counted, pruned or returned.

A live run holds an OS lock on its folder (``.run.lock``, via ``filelock``): it dies with its process, so a crash or
SIGKILL never blocks the next run, and a second process that wants the folder is refused at once, naming the holder.

Why sibling folders rather than one shared folder: checkpoints are named by job name and step (ai-toolkit's pattern,
what ComfyUI users load), so two runs of one name in one folder would write the same file names; one folder per run
keeps those names and lets a user copy, archive or delete a run as a whole.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open

from ..config import JobConfig, inert_settings
from ..data import VideoDataset
from ..errors import ConfigError
from ..fileio import atomic_write, check_writable, is_temporary
from ..lora import lora_file_name
from ..names import EXPERTS
from ..regularizers import ema_lora_file_name
from .resume import check_resume_compatible

log = logging.getLogger(__name__)

MANIFEST = "run.json"
LOCK_FILE = ".run.lock"
RUN_SUFFIX = "_run"
STATE_PREFIX = "training_state_"
_STATE_RE = re.compile(rf"^{STATE_PREFIX}(\d+)\.safetensors$")
#: Files a run writes that are not checkpoints: a folder holding only these (and temporaries) lost no work.
_BOOKKEEPING = frozenset({MANIFEST, LOCK_FILE, "config.yaml"})


def state_file_name(step: int) -> str:
    """File name of the resumable training state written at ``step``."""
    return f"{STATE_PREFIX}{step:06d}.safetensors"


def write_run_config(run: RunFolder, cfg: JobConfig, step: int) -> None:
    """``config.yaml``: the settings the run trains with from ``step`` on. A resume that changes settings keeps the
    ones the earlier steps trained with as ``config_until_<step>.yaml``."""
    path = run.path / "config.yaml"
    current = cfg.model_dump(mode="json")
    if run.resume_path is not None and path.is_file():
        before = yaml.safe_load(path.read_text()) or {}
        if {k: v for k, v in before.items() if k != "resume"} != {k: v for k, v in current.items() if k != "resume"}:
            os.replace(path, run.path / f"config_until_{step:06d}.yaml")
    atomic_write(path, lambda p: p.write_text(yaml.safe_dump(current)))


def list_states(folder: Path) -> list[tuple[int, Path]]:
    """The ``training_state_<step>.safetensors`` files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_RE.match(p.name))]
    return sorted(found)


def _file_stamp(path: str | None) -> list[Any] | None:
    """A file's path, size and modification time (a file replaced in place is another input)."""
    if not path or not os.path.isfile(path):
        return None if not path else [path]
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


#: Settings that say how or where a run computes, or what it keeps besides its final pair, never what it learns
#: (checkpointing and memory placement change no number; compiling changes float rounding only): a finished run
#: with other values of these is the same result.
RESULT_NEUTRAL: tuple[tuple[str, str | None], ...] = (
    ("memory", None),
    ("save", "save_every"),
    ("save", "keep_last"),
    ("save", "save_training_state"),
    ("save", "tensorboard"),
    ("train", "gradient_checkpointing"),
    ("train", "compile"),
    ("quant", "ara_cache_dir"),
    ("text_encoder", "cache_dir"),
)


def config_key(cfg: JobConfig) -> str:
    """Hash of the resolved settings that decide what a run learns: all but ``resume`` (where to start, not what to
    train), :data:`RESULT_NEUTRAL` and the settings this job switches off (:func:`~trainer_core.config.inert_settings`),
    with the starting LoRA files stamped by size and modification time."""
    data = cfg.model_dump(mode="json")
    data["resume"] = None
    for section, key in RESULT_NEUTRAL:
        if key is None:
            data[section] = None
        else:
            data[section][key] = None
    for path in inert_settings(cfg):
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = None
    for key in ("init_high", "init_low"):
        data["lora"][key] = _file_stamp(data["lora"].get(key))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def dataset_key(dataset: VideoDataset) -> str:
    """Hash of the dataset's sample plan plus each media file's size and modification time (a clip replaced by
    another of the same name and length is a different dataset), held-out clips included (their validation losses
    are part of a finished run's result)."""
    held = dataset.validation.items if dataset.validation is not None else ()
    stats = []
    for path in sorted({str(it.media.path) for it in (*dataset.items, *held)}):
        st = os.stat(path)
        stats.append([path, st.st_size, st.st_mtime_ns])
    blob = json.dumps([dataset.fingerprint(), stats])
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Manifest:
    """What ``run.json`` records about one run."""

    run_id: str
    name: str
    created: float
    config_key: str = ""
    dataset_key: str = ""
    status: str = "running"  # running | finished | stopped | diverged
    steps: int = 0  # train.steps of the latest start
    step: int = 0  # newest checkpoint step
    checkpoints: dict[int, list[str]] = field(default_factory=dict)  # step -> file names this run wrote
    pid: int = 0
    host: str = ""
    resumed_from: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        """The folder's manifest, or None when it has none (or one that does not read)."""
        try:
            data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            data["checkpoints"] = {int(k): list(v) for k, v in data.get("checkpoints", {}).items()}
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError, AttributeError):
            return None


def _new_manifest(cfg: JobConfig, keys: tuple[str, str]) -> Manifest:
    return Manifest(
        run_id=uuid.uuid4().hex, name=cfg.name, created=time.time(), config_key=keys[0], dataset_key=keys[1],
        steps=cfg.train.steps, pid=os.getpid(), host=socket.gethostname(),
    )


@dataclass
class RunFolder:
    """One run's folder, its manifest and (in the process that writes it) the folder's lock."""

    path: Path
    manifest: Manifest
    lock: FileLock | None = None
    resume_path: Path | None = None
    status: str = "stopped"  # what close() records unless the run says otherwise

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def write_manifest(self) -> None:
        """Write ``run.json`` atomically (only the process holding the lock writes)."""
        if self.lock is not None:
            text = json.dumps(dataclasses.asdict(self.manifest), indent=1, sort_keys=True)
            atomic_write(self.path / MANIFEST, lambda p: p.write_text(text + "\n", encoding="utf-8"))

    def record_checkpoint(self, step: int, files: list[Path], keep_last: int) -> list[Path]:
        """Note the files written at ``step`` and delete this run's checkpoints beyond the newest ``keep_last``
        (0 keeps all); returns the deleted files. Only files this run recorded are ever deleted."""
        m = self.manifest
        m.checkpoints[step] = sorted({*m.checkpoints.get(step, []), *(p.name for p in files)})
        m.step = step
        removed = []
        if keep_last > 0:
            for old in sorted(m.checkpoints)[:-keep_last]:
                for name in m.checkpoints.pop(old):
                    (self.path / name).unlink(missing_ok=True)
                    removed.append(self.path / name)
        self.write_manifest()
        return removed

    def pair(self, step: int, ema: bool = False) -> dict[str, Path]:
        """This run's LoRA files of ``step`` (EMA ones with ``ema``) that exist, by expert."""
        recorded = self.manifest.checkpoints.get(step)
        namer = ema_lora_file_name if ema else lora_file_name
        paths = {n: self.path / namer(self.manifest.name, step, n) for n in EXPERTS}
        return {n: p for n, p in paths.items() if p.is_file() and (recorded is None or p.name in recorded)}

    def states(self) -> list[tuple[int, Path]]:
        """This run's training states that exist, oldest first."""
        return [(s, self.path / state_file_name(s)) for s in sorted(self.manifest.checkpoints)
                if (self.path / state_file_name(s)).is_file()]

    def set_aside_states(self, first: int) -> list[Path]:
        """Rename this run's states of step ``first`` and later to ``training_state_<step>.diverged.safetensors``
        (out of reach of ``resume: latest``: their weights lead to a NaN); returns the new paths."""
        moved = []
        for step, src in self.states():
            if step < first:
                continue
            dst = src.with_name(f"{STATE_PREFIX}{step:06d}.diverged.safetensors")
            os.replace(src, dst)
            self.manifest.checkpoints[step] = sorted({*(f for f in self.manifest.checkpoints[step] if f != src.name),
                                                      dst.name})
            moved.append(dst)
        self.write_manifest()
        return moved

    def stop_message(self) -> str:
        """One line on what a stopped run left: the state to resume from, or the LoRA pair, or nothing."""
        states = self.states()
        if states:
            step, path = states[-1]
            return (f"resumable state at step {step}: {path} - continue with resume = latest (CLI: --resume "
                    "latest) under the same job name")
        if self.manifest.checkpoints:
            step = max(self.manifest.checkpoints)
            return (f"no training state (save.save_training_state is off); the LoRA pair of step {step} is in "
                    f"{self.path}")
        return f"nothing was saved in {self.path} (no step finished)"

    def close(self) -> None:
        """Record the run's status and release the folder."""
        if self.lock is not None:
            self.manifest.status = self.status
            self.write_manifest()
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


LOSSES = "losses.csv"


def write_losses(folder: Path, losses: list[tuple[int, str, float]], validation: list[tuple[int, str, float]]) -> None:
    """Write ``losses.csv``: one row per (step, expert) with the step's training ``loss`` and, at a validation
    point, the expert's ``validation`` loss; a figure not measured there is left empty (the expert that did not
    train at a validation point's step has a row with only its validation loss)."""
    rows: dict[tuple[int, int], list[str]] = {}
    for column, entries in enumerate((losses, validation)):
        for step, expert, value in entries:
            rows.setdefault((step, EXPERTS.index(expert)), ["", ""])[column] = f"{value:.8g}"
    lines = ["step,expert,loss,validation"]
    lines += [f"{step},{EXPERTS[e]},{loss},{val}" for (step, e), (loss, val) in sorted(rows.items())]
    atomic_write(folder / LOSSES, lambda p: p.write_text("\n".join(lines) + "\n"))


def _read_column(folder: Path, column: str) -> list[tuple[int, str, float]]:
    """The (step, expert, value) rows of ``losses.csv`` that hold a ``column`` figure (empty when there is none;
    files written before the validation column hold training losses only)."""
    try:
        with open(folder / LOSSES, newline="", encoding="utf-8") as fh:
            return [(int(r["step"]), r["expert"], float(r[column])) for r in csv.DictReader(fh) if r.get(column)]
    except (OSError, KeyError, ValueError):
        return []


def read_losses(folder: Path) -> list[tuple[int, str, float]]:
    """The (step, expert, training loss) rows of a run folder's ``losses.csv``."""
    return _read_column(folder, "loss")


def read_validation(folder: Path) -> list[tuple[int, str, float]]:
    """The (step, expert, validation loss) rows of a run folder's ``losses.csv``."""
    return _read_column(folder, "validation")


# --- finding a job's runs -------------------------------------------------------------------------------------------


def _candidate_folders(cfg: JobConfig) -> list[Path]:
    out = Path(cfg.save.output_dir)
    if not out.is_dir():
        return []
    prefix = f"{cfg.name}{RUN_SUFFIX}"
    return [p for p in out.iterdir()
            if p.is_dir() and (p.name == cfg.name or (p.name.startswith(prefix) and p.name[len(prefix):].isdigit()))]


def job_runs(cfg: JobConfig) -> list[RunFolder]:
    """This job's runs (folders whose manifest names the job, and a first folder from before manifests existed),
    newest first. They are read-only views: none holds the lock."""
    runs = []
    for folder in _candidate_folders(cfg):
        manifest = Manifest.read(folder)
        if manifest is None:
            manifest = _legacy_manifest(folder, cfg)
        if manifest is not None and manifest.name == cfg.name:
            runs.append(RunFolder(folder, manifest))
    return sorted(runs, key=lambda r: r.manifest.created, reverse=True)


def _legacy_manifest(folder: Path, cfg: JobConfig) -> Manifest | None:
    """A folder of this job's name written before run manifests: its states count as one run of the job."""
    if folder.name != cfg.name:
        return None
    states = [s for s, _ in list_states(folder)]
    if not states:
        return None
    created = min((folder / state_file_name(s)).stat().st_mtime for s in states)
    names = {s: [state_file_name(s)] + [namer(cfg.name, s, n) for namer in (lora_file_name, ema_lora_file_name)
                                        for n in EXPERTS] for s in states}
    return Manifest(run_id="", name=cfg.name, created=created, checkpoints=names)


def find_finished_run(cfg: JobConfig, dataset: VideoDataset) -> RunFolder | None:
    """The newest finished run of this job with the same settings and dataset whose final pair still exists."""
    keys = (config_key(cfg), dataset_key(dataset))
    for run in job_runs(cfg):
        m = run.manifest
        if (m.status == "finished" and (m.config_key, m.dataset_key) == keys and m.step == cfg.train.steps
                and len(run.pair(m.step, cfg.advanced.ema)) == len(cfg.multistage.stages)):
            return run
    return None


# --- resume -----------------------------------------------------------------------------------------------------------


def state_unreadable(path: Path) -> str | None:
    """Why ``path`` is not a readable training state of this trainer, or None if it is one."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        return f"it does not read as safetensors ({exc})"
    if "state_skeleton" not in meta or "training_config" not in meta:
        return f"it is not a training state of this trainer (point at a {STATE_PREFIX}*.safetensors file)"
    return None


def state_config(path: Path) -> dict[str, Any]:
    """The job settings a training state was saved with (from its metadata)."""
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {})["training_config"])


def _newest_readable(states: list[tuple[int, Path]], where: str) -> tuple[int, Path] | None:
    for step, path in reversed(states):
        why = state_unreadable(path)
        if why is None:
            return step, path
        log.warning("resume: skipping %s in %s: %s", path.name, where, why)
    return None


def resolve_resume(cfg: JobConfig) -> tuple[int, Path]:
    """The (step, state file) ``cfg.resume`` names: 'latest' (the newest readable state of this job's newest run
    that has one; an unreadable newer one is skipped with a warning), a run folder (its newest readable state) or a
    state file (which must read)."""
    if cfg.resume == "latest":
        for run in job_runs(cfg):
            found = _newest_readable(run.states(), str(run.path))
            if found is not None:
                return found
        raise ConfigError(
            f"resume: 'latest' found no readable {STATE_PREFIX}*.safetensors of job '{cfg.name}' in "
            f"{cfg.save.output_dir} - train once with save.save_training_state on, or give the path of a state file"
        )
    path = Path(cfg.resume)
    if path.is_dir():
        found = _newest_readable(list_states(path), str(path))
        if found is None:
            raise ConfigError(f"resume: folder {path} holds no readable {STATE_PREFIX}*.safetensors - point at a "
                              "state file")
        return found
    if not path.is_file():
        raise ConfigError(f"resume: {path} does not exist - give a {STATE_PREFIX}*.safetensors file or 'latest'")
    why = state_unreadable(path)
    if why is not None:
        raise ConfigError(f"resume: cannot use {path}: {why} - give another state file or 'latest'")
    with safe_open(str(path), framework="pt") as fh:
        return int((fh.metadata() or {}).get("step", "0")), path


# --- opening a run ------------------------------------------------------------------------------------------------


def _try_lock(folder: Path) -> FileLock | None:
    lock = FileLock(str(folder / LOCK_FILE), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def _holder(folder: Path) -> str:
    m = Manifest.read(folder)
    if m is None or not m.pid:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
    return f"process {m.pid} on {m.host or 'this machine'} (started {started})"


def _reclaimable(folder: Path) -> bool:
    """A folder that holds no checkpoint (only a run's bookkeeping, temporaries, or nothing) lost no work."""
    names = {p.name for p in folder.iterdir()}
    if any(n not in _BOOKKEEPING and not is_temporary(n) for n in names):
        return False
    m = Manifest.read(folder)
    return m is None or not m.checkpoints


def _remove_temporaries(folder: Path) -> None:
    """Temporaries a killed process left mid-write (the folder is locked, so none is being written now)."""
    for p in folder.iterdir():
        if is_temporary(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def claim_new_run(cfg: JobConfig, keys: tuple[str, str]) -> RunFolder:
    """A folder of its own for a fresh run: ``<name>``, else ``<name>_run2``, ... (the first that does not exist,
    or that exists but holds no work and no live run)."""
    out = Path(cfg.save.output_dir)
    for k in count(1):
        folder = out / (cfg.name if k == 1 else f"{cfg.name}{RUN_SUFFIX}{k}")
        try:
            folder.mkdir(parents=True)
            fresh = True
        except FileExistsError:
            fresh = False
        except OSError as exc:
            raise ConfigError(f"save.output_dir: cannot create {folder} ({exc.strerror or exc}) - choose a "
                              "writable folder") from None
        if not folder.is_dir() or (not fresh and not _reclaimable(folder)):
            continue
        lock = _try_lock(folder)
        if lock is None:
            continue
        if not fresh and not _reclaimable(folder):  # claimed and used by another process meanwhile
            lock.release()
            continue
        for leftover in ("config.yaml", MANIFEST):
            (folder / leftover).unlink(missing_ok=True)
        _remove_temporaries(folder)
        run = RunFolder(folder, _new_manifest(cfg, keys), lock)
        run.write_manifest()
        return run
    raise AssertionError("unreachable")


def _continue_run(cfg: JobConfig, keys: tuple[str, str], step: int, state: Path) -> RunFolder:
    """The run a resume writes into: the state's own run when the state is that run's newest and the run is this
    job's, else a new folder (a branch, so the original run's later checkpoints stay as they are)."""
    folder = state.parent
    manifest = Manifest.read(folder) or _legacy_manifest(folder, cfg)
    newest = manifest is not None and step == max(manifest.checkpoints, default=step)
    if manifest is None or manifest.name != cfg.name or not newest:
        run = claim_new_run(cfg, keys)
        log.info("resume: %s continues in a new run folder %s (it is not the newest state of a run of job '%s')",
                 state, run.path, cfg.name)
    else:
        lock = _try_lock(folder)
        if lock is None:
            raise ConfigError(
                f"resume: run folder {folder} is in use by {_holder(folder)} - wait for that run to end (or stop "
                "it), or start a new run without resume"
            )
        _remove_temporaries(folder)
        if not manifest.run_id:  # a folder from before run manifests: it gets one; its older files stay untouched
            manifest = dataclasses.replace(manifest, run_id=uuid.uuid4().hex, checkpoints={})
        run = RunFolder(folder, manifest, lock)
    m = run.manifest
    m.config_key, m.dataset_key, m.steps, m.status = *keys, cfg.train.steps, "running"
    m.pid, m.host = os.getpid(), socket.gethostname()
    m.resumed_from.append(str(state))
    run.resume_path = state
    run.write_manifest()
    return run


def check_resume(cfg: JobConfig) -> None:
    """Refuse a ``resume`` this job cannot continue (no readable state, settings the state cannot go on with) from
    the state's header alone, before any model or data loads. When 'latest' (the job's newest run) cannot go on
    but an older run of the job can, the refusal names it."""
    if not cfg.resume:
        return
    step, state = resolve_resume(cfg)
    try:
        check_resume_compatible(state_config(state), step, cfg, str(state))
    except ConfigError as exc:
        older = _continuable_run(cfg, skip=state.parent) if cfg.resume == "latest" else None
        if older is None:
            raise
        raise ConfigError(f"{exc}; the older run {older[0]} (step {older[1]}) has settings this job can continue - "
                          f"resume: {older[0]}") from None


def _continuable_run(cfg: JobConfig, skip: Path) -> tuple[Path, int] | None:
    """The newest run of this job other than ``skip`` whose newest readable state this job can continue."""
    for run in job_runs(cfg):
        if run.path == skip or (found := _newest_readable(run.states(), str(run.path))) is None:
            continue
        step, state = found
        try:
            check_resume_compatible(state_config(state), step, cfg, str(state))
        except ConfigError:
            continue
        return run.path, step
    return None


def open_run(cfg: JobConfig, dataset: VideoDataset) -> RunFolder:
    """Claim this run's folder (checks that it can be written, before any model loads): a new one, or with
    ``resume`` the resumed run's (the state is checked against this job's settings first)."""
    check_writable(cfg.save.output_dir, "save.output_dir")
    keys = (config_key(cfg), dataset_key(dataset))
    if not cfg.resume:
        return claim_new_run(cfg, keys)
    step, state = resolve_resume(cfg)
    log.info("resume: from %s, step %d of %d", state, step, cfg.train.steps)
    for change in check_resume_compatible(state_config(state), step, cfg, str(state)):
        log.info("resume: %s (applied from step %d on)", change, step)
    return _continue_run(cfg, keys, step, state)
