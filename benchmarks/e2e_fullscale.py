"""The user's whole path at full size: ComfyUI files on disk -> headless training job -> trained pair -> rendered video.

    python benchmarks/e2e_fullscale.py --root /tmp/e2e                        # GPU (an H200): every phase
    python benchmarks/e2e_fullscale.py --root /tmp/e2e --phases files,job512  # some phases (files are reused)
    python benchmarks/e2e_fullscale.py --tiny --root /tmp/e2e_tiny            # CPU smoke run, tiny model
    python benchmarks/e2e_fullscale.py --root /tmp/e2e --phases files,comfy --comfy ComfyUI  # through a server

Phases (``--phases``, run in the order given; ``sample`` and ``perf`` use ``job512``'s results):

* ``files``: random-weight files of full size in ComfyUI's layouts (not the product's time): both experts as
  ``wan2.2_t2v_{high,low}_noise_14B_fp8_scaled.safetensors`` (float8_e4m3fn block weights, one ``scale_weight`` per
  layer, the ``scaled_fp8`` marker, keys behind ``model.diffusion_model.``), UMT5-XXL as
  ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` with its tokenizer as a ``spiece_model`` tensor (a small sentencepiece
  model trained here), the Wan 2.1 VAE as ``wan_2.1_vae.safetensors``; and synthetic h264 clips with captions
  (832x480 and 1024x1024, ``--clip-frames`` frames). The page cache is dropped afterwards where the OS allows
  (``dropped_caches`` in the JSON), so loading reads the disk as a user's first run does.
* ``job512``: ``python -m trainer_core train`` on those files: float8, both experts resident, switch every step,
  512x512x33, text cache, data workers, ``save_every``, previews of both experts at 832x480x33.
* ``sample``: ``python -m trainer_core sample`` with the trained pair (``job512``'s, else ``joblarge``'s).
* ``perf``: ``benchmarks/perf_bench.py``'s float8 fast-path step for the same settings (two experts, the job's two
  buckets 512x512x33 and 672x384x33 alternating), so the loop's own overhead is its steady s/step against this one;
  also the same step compiled with one graph per shape instead of torch's automatic dynamic shapes.
* ``joblarge``: the same job at ``--large`` (default 832x480x81), a few steps.
* ``tier24``: the 24 GB recipe (4bit_ara, Low VRAM, switch every 10) from the same files, with the process capped
  at ``--cap-gib`` (``torch.cuda.set_per_process_memory_fraction``, and the card's free memory reported as the cap so
  the planner plans for that card).
* ``comfy``: workflow 2 through a real ComfyUI server (``--comfy``: a checkout, fetched, not in this repository;
  started with ``--base-directory`` under ``--root`` holding this pack, the written files and the clips, and an
  empty frontend): its nodes as saved, the files above, float8 experts (a Quantize ARA node; its text encoder
  ``--comfy-text-encoder``), ``--comfy-args`` passed to ComfyUI's ``main.py``, ``--comfy-steps``
  steps at 512x33 and a render, queued with ``POST /prompt``; server start, prompt time, the server's host memory
  and the trainer's logged phases.
* ``comfy24``: workflow 1 (the 24 GB character recipe: Quantize ARA's 4bit_ara, Low VRAM, switch every 10, AdamW8bit,
  training previews, a render at 512x512x33) through a ComfyUI server whose process is capped at ``--cap-gib`` as
  ``tier24``'s (a small custom node of this script's applies the cap once ComfyUI has set up its allocator);
  ``--comfy24-steps`` steps.

Each job runs as its own process; the parent reads its progress events as they arrive (time to first step, s/step),
polls its peak resident host memory (``VmHWM``) and pinned/locked memory, and reads the phase times the trainer logs
(``loaded the high-noise expert: 41.2 s`` ...). Everything goes to ``--out`` as ``e2e_fullscale.json`` (rewritten
after every phase) and one log per process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import TINY, full_expert, proc_memory  # noqa: E402

GIB = 2**30
COMPONENTS = ("high", "low", "text_encoder", "vae")
PHASES = ("files", "job512", "sample", "perf", "joblarge", "tier24", "comfy", "comfy24")
PROMPT = "a red square slides across a white wall, camera still"
#: UMT5-XXL as Wan 2.2 uses it (google/umt5-xxl's encoder).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                use_cache=False)
TINY_UMT5 = dict(UMT5_XXL, vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
_TIMING = re.compile(r"^(?P<what>[^:]+(?:\([^)]*\))?[^:]*): (?P<s>[0-9.]+) s$")
_VAE = re.compile(r"VAE encoding: (?P<clips>\d+) clip\(s\) in (?P<s>[0-9.]+) s")
_GPU_PEAK = re.compile(r"GPU memory: peak (?P<peak>[0-9.]+) GiB allocated \(planned (?P<plan>[0-9.]+) GiB\), "
                       r"(?P<reserved>[0-9.]+) GiB reserved, (?P<retries>[0-9]+) allocator retries")


# ----------------------------------------------------------------------------------------------- files


def _fixtures():
    sys.path.insert(0, str(ROOT / "tests"))
    import model_fixtures  # the same writers the loading tests use for each ComfyUI layout

    return model_fixtures


def write_expert(path: Path, seed: int, device: str, tiny: bool) -> None:
    """A random-weight expert saved as ComfyUI's fp8_scaled file (block Linears float8 + per-layer scale)."""
    fx = _fixtures()
    from trainer_core.models.single_file import DIFFUSION_MODEL_PREFIX

    model = full_expert(device, torch.bfloat16, seed=seed, **(TINY if tiny else {}))
    tensors = fx.comfy_transformer_tensors(model, torch.bfloat16, prefix=True)
    del model
    tensors, _ = fx.quantize_fp8_scaled(tensors, fx.fp8_transformer_targets(tensors), "scale_weight",
                                        prefix=DIFFUSION_MODEL_PREFIX)
    fx._save({k: v.cpu() for k, v in tensors.items()}, path)


def write_text_encoder(path: Path, device: str, tiny: bool) -> None:
    """A random-weight UMT5-XXL encoder as ComfyUI's umt5_xxl_fp8_e4m3fn_scaled file, with ``spiece_model``."""
    from transformers import UMT5Config, UMT5EncoderModel

    from trainer_core.models.tiny import tiny_spiece_model

    fx = _fixtures()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            te = UMT5EncoderModel(UMT5Config(**(TINY_UMT5 if tiny else UMT5_XXL))).eval()
    finally:
        torch.set_default_dtype(prev)
    fx.save_comfy_text_encoder(te, path, dtype=torch.bfloat16, spiece_model=tiny_spiece_model(), fp8="scale_weight")


def write_vae(path: Path, device: str, tiny: bool) -> None:
    """A random-weight Wan 2.1 VAE (full width 96, or the tiny preset's) as ComfyUI's wan_2.1_vae file."""
    from diffusers import AutoencoderKLWan

    from trainer_core.models.tiny import TINY_VAE_CONFIG

    fx = _fixtures()
    with torch.device(device):
        vae = AutoencoderKLWan(**(TINY_VAE_CONFIG if tiny else {}))
    fx.save_comfy_vae(vae, path, dtype=torch.bfloat16)


def drop_page_cache() -> bool:
    """Ask the OS to drop clean cached file pages (root only), so the next load reads the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def phase_files(args, res: dict) -> None:
    from trainer_core.data.synthetic import make_synthetic_dataset

    models, device = args.root / "models", "cpu" if args.tiny else "cuda"
    models.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}
    for name, write in (
        ("high", lambda p: write_expert(p, 0, device, args.tiny)),
        ("low", lambda p: write_expert(p, 1, device, args.tiny)),
        ("text_encoder", lambda p: write_text_encoder(p, device, args.tiny)),
        ("vae", lambda p: write_vae(p, device, args.tiny)),
    ):
        t0 = time.perf_counter()
        write(model_path(args.root, name))
        t[name] = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.empty_cache()
    sizes = {"a": (64, 48), "b": (48, 48)} if args.tiny else {"a": (832, 480), "b": (1024, 1024)}
    t0 = time.perf_counter()
    for sub, size in sizes.items():
        make_synthetic_dataset(args.root / f"clips_{sub}", n_clips=args.clips // 2, num_frames=args.clip_frames,
                               size=size, seed=ord(sub))
    t["clips"] = time.perf_counter() - t0
    res["files"] = {
        "write_s": t,
        "bytes": {n: model_path(args.root, n).stat().st_size for n in COMPONENTS},
        "dropped_caches": drop_page_cache(),
    }


def model_path(root: Path, name: str) -> Path:
    """Where the files phase writes component ``name`` (high, low, text_encoder, vae) under ``root``."""
    files = {
        "high": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        "low": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
        "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "vae": "wan_2.1_vae.safetensors",
    }
    return root / "models" / files[name]


# ----------------------------------------------------------------------------------------------- jobs


def job(args, name: str, size: tuple[int, int, int], steps: int, **over: Any) -> dict:
    """The headless job on the written files; ``over`` sections replace/merge into the base."""
    w, h, f = size
    gpu = not args.tiny
    base: dict[str, Any] = {
        "name": name,
        "model": {"high_noise": str(model_path(args.root, "high")), "low_noise": str(model_path(args.root, "low")),
                  "text_encoder": str(model_path(args.root, "text_encoder")), "vae": str(model_path(args.root, "vae")),
                  "dtype": "bf16" if gpu else "fp32", "text_encoder_dtype": "bf16" if gpu else "fp32",
                  "vae_dtype": "bf16" if gpu else "fp32"},
        "lora": {"rank": 16},
        "quant": {"transformer": "float8" if gpu else "none"},
        "multistage": {"train_low_noise": True, "switch_every": 1},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "train": {"steps": steps, "batch_size": 1, "seed": 0, "num_workers": 2,
                  "compute_dtype": "bf16" if gpu else "fp32", "device": "cuda" if gpu else "cpu"},
        "text_encoder": {"mode": "cache"},
        "save": {"output_dir": str(args.root / "runs"), "save_every": args.save_every, "keep_last": 2},
        "sample": {"prompts": [PROMPT], "width": 832 if gpu else 64, "height": 480 if gpu else 48,
                   "num_frames": 33 if gpu else 5, "steps": args.preview_steps, "sample_every": args.save_every},
        # a bucket's area is at most resolution**2: the smallest resolution whose bucket holds w x h
        # fixed uniform windows, no flips: each clip's latents are encoded once and cached, as such a user would set
        # (the steady steps then train without the VAE, like perf_bench's step)
        "datasets": [{"folder": str(args.root / f"clips_{s}"), "resolutions": [math.ceil(math.sqrt(w * h) / 16) * 16],
                      "num_frames": f, "cache_latents": True} for s in ("a", "b")],
    }
    for section, values in over.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return base


class HostMemory(threading.Thread):
    """Polls a process's peak resident memory (VmHWM), its pinned/locked memory, and a timeline of its resident
    memory split into anonymous, file-backed (mapped file) and shared pages (CUDA's page-locked host memory counts
    there, not in VmPin), until it exits."""

    KEYS = ("VmHWM", "VmRSS", "VmPin", "VmLck", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, pid: int, t0: float):
        super().__init__(daemon=True)
        self.pid, self.t0, self.peak = pid, t0, dict.fromkeys(self.KEYS, 0)
        self.timeline: list[tuple[float, ...]] = []  # (s since start, RssAnon, RssFile, RssShmem GiB)
        self.at_peak: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                now = {k: v for k, v in proc_memory(self.pid).items() if k in self.peak}
                for key, value in now.items():
                    self.peak[key] = max(self.peak[key], value)
                t = time.perf_counter() - self.t0
                kinds = {k: now.get(k, 0) / GIB for k in ("RssAnon", "RssFile", "RssShmem")}
                self.timeline.append((round(t, 1), *(round(v, 2) for v in kinds.values())))
                if now["VmRSS"] >= self.peak["VmRSS"]:
                    self.at_peak = {"t": t, **kinds}
            except (OSError, ValueError, IndexError, KeyError):
                pass
            self.done.wait(0.5)

    def gib(self) -> dict[str, Any]:
        """The peaks in GiB, where the resident peak fell, and the timeline thinned to at most 200 points."""
        thin = self.timeline[:: max(1, len(self.timeline) // 200)]
        return {**{k: v / GIB for k, v in self.peak.items()}, "at_rss_peak": self.at_peak, "timeline": thin}


def _copy_stderr(stream, log, t0: float, ends: dict[str, float]) -> None:
    """Copy a child's stderr to ``log``, noting when each ``<what>: <seconds> s`` line arrived (its phase's end)."""
    for line in stream:
        log.write(line)
        log.flush()
        if m := _TIMING.match(line.strip()):
            ends.setdefault(m["what"], round(time.perf_counter() - t0, 1))


def run_process(args, cmd: list[str], log_name: str, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; returns its exit code, wall time, arrival time of each ``@@wan22`` event, host memory peaks (and
    the phase that held the resident peak) and the stderr log's ``<what>: <seconds> s`` lines."""
    log_path = Path(args.out) / log_name
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
           **(env or {})}
    t0 = time.perf_counter()
    ends: dict[str, float] = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mem = HostMemory(proc.pid, t0)
        mem.start()
        copier = threading.Thread(target=_copy_stderr, args=(proc.stderr, log, t0, ends), daemon=True)
        copier.start()
        # past --deadline-s the process is killed: what it reported until then is kept (the call's time limit)
        killed = threading.Event()
        killer = threading.Timer(max(0.0, args.deadline - time.monotonic()), lambda: (killed.set(), proc.kill()))
        killer.start()
        events, stdout = [], []
        for line in proc.stdout:
            now = time.perf_counter() - t0
            if line.startswith("@@wan22 "):
                events.append({"t": now, **json.loads(line[len("@@wan22 "):])})
            else:
                stdout.append(line.rstrip("\n"))
        rc = proc.wait()
        killer.cancel()
        copier.join()
        mem.done.set()
        mem.join()
    host = mem.gib()
    if host["at_rss_peak"]:  # the first phase that ended after the peak held it
        t = host["at_rss_peak"]["t"]
        host["at_rss_peak"]["during"] = next((w for w, e in sorted(ends.items(), key=lambda kv: kv[1]) if e >= t),
                                             "after the last timed phase")  # fmt: skip
    text = log_path.read_text()
    out = {"cmd": " ".join(cmd[-4:]), "rc": rc, "killed_at_deadline": killed.is_set(),
           "wall_s": time.perf_counter() - t0, "host_gib": host, **parse_log(text), "phase_ends_s": ends,
           "stdout_tail": stdout[-5:]}
    if rc:
        out["stderr_tail"] = text.splitlines()[-15:]
    return out | {"events": events}


def parse_log(text: str) -> dict:
    """The trainer's logged phase times (``<what>: <seconds> s``, summed per phase), its VAE encoding total and its
    end-of-run GPU memory line."""
    timings: dict[str, float] = {}
    for line in text.splitlines():
        if m := _TIMING.match(line.strip()):
            timings[m["what"]] = timings.get(m["what"], 0.0) + float(m["s"])
    out: dict[str, Any] = {"phases_s": timings}
    if m := _VAE.search(text):
        out["vae_encoding"] = {"clips": int(m["clips"]), "s": float(m["s"])}
    if m := _GPU_PEAK.search(text):
        out["gpu_peak_gib"], out["gpu_planned_gib"] = float(m["peak"]), float(m["plan"])
        out["gpu_reserved_gib"], out["gpu_alloc_retries"] = float(m["reserved"]), int(m["retries"])
    return out


def step_figures(r: dict, epoch_steps: int, noisy: set[int]) -> dict:
    """Time to first step and the steady s/step: arrival gaps between consecutive step events after the first epoch
    (every clip's latents then come from the cache), leaving out steps that also wrote a checkpoint or a preview."""
    steps = [e for e in r["events"] if e.get("event") == "step"]
    if not steps:
        return {}
    gaps = {b["step"]: b["t"] - a["t"] for a, b in zip(steps, steps[1:])}
    steady = [g for s, g in gaps.items() if s > epoch_steps + 1 and s not in noisy and s - 1 not in noisy]
    return {"time_to_first_step_s": steps[0]["t"], "steps": len(steps), "step_gaps_s": list(gaps.values()),
            "step_seconds": [e.get("seconds") for e in steps],
            "s_per_step_all": statistics.median(gaps.values()) if gaps else None,
            "s_per_step_steady": statistics.median(steady) if steady else None,
            "steady_steps": len(steady), "losses": [e["loss"] for e in steps]}


def train_job(args, res: dict, key: str, cfg: dict, prefix: list[str] | None = None) -> dict:
    path = args.root / f"{key}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [*(prefix or [sys.executable, "-m", "trainer_core"]), "train", str(path), "--events"]
    r = run_process(args, cmd, f"{key}.log", env={"TORCH_LOGS": "recompiles"})  # each recompile's reason, logged
    every = cfg["save"]["save_every"]
    noisy = {s for s in range(1, cfg["train"]["steps"] + 1) if every and s % every == 0}
    r.update(step_figures(r, args.clips, noisy))
    done = [e for e in r.pop("events") if e.get("event") == "done"]
    if done:
        r["lora_files"] = done[-1]["lora_files"]
    r["files_gib"] = sum(model_path(args.root, n).stat().st_size for n in COMPONENTS) / GIB
    res[key] = r
    return r


def phase_job512(args, res: dict) -> None:
    size = (64, 64, 5) if args.tiny else (512, 512, 33)
    train_job(args, res, "job512", job(args, "e2e512", size, args.steps))


def phase_sample(args, res: dict) -> None:
    lora = res.get("job512", {}).get("lora_files") or res.get("joblarge", {}).get("lora_files") or {}
    cfg = job(args, "e2e512", (64, 64, 5) if args.tiny else (512, 512, 33), args.steps)
    cfg["sample"]["steps"] = args.sample_steps
    path = args.root / "sample.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "trainer_core", "sample", str(path), "--prompt", PROMPT,
           "--out", str(args.root / "sample.mp4")]
    for n in ("high", "low"):
        if n in lora:
            cmd += [f"--lora-{n}", lora[n]]
    r = run_process(args, cmd, "sample.log")
    r.pop("events")
    r["video_bytes"] = (args.root / "sample.mp4").stat().st_size if (args.root / "sample.mp4").is_file() else 0
    res["sample"] = r


def phase_perf(args, res: dict) -> None:
    size = "32x32x5" if args.tiny else "512x512x33"
    perf_out = args.root / "perf"
    perf_out.mkdir(exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "perf_bench.py"), "--size", size, "--experts", "2",
           "--no-bf16", "--steps", str(args.perf_steps), "--plain-steps", "0", "--out", str(perf_out),
           "--mix", "48x32x5" if args.tiny else "672x384x33", "--compile-dynamic", "both"]  # job512's two buckets
    if args.tiny:
        cmd += ["--tiny", "--no-fp8"]
    r = run_process(args, cmd, "perf.log")
    r.pop("events")
    files = sorted(perf_out.glob("perf_*.json"))
    if files:
        sizes = json.loads(files[-1].read_text())["sizes"][0]
        fast = sizes.get("fp8 fast path") or sizes.get("plain")  # compiled as the trainer compiles
        r["bench_s_per_step"], r["bench_peak_gib"] = fast["s"], fast.get("peak_gib")
        r["bench_planned_gib"] = fast.get("planned_gib")
        static = sizes.get("fp8 fast path, static shapes")
        if static:
            r["bench_static_shapes_s_per_step"] = static["s"]
    loop = res.get("job512", {}).get("s_per_step_steady")
    if loop and r.get("bench_s_per_step"):
        r["loop_overhead"] = loop / r["bench_s_per_step"] - 1
    res["perf"] = r


def phase_joblarge(args, res: dict) -> None:
    w, h, f = (64, 48, 9) if args.tiny else tuple(int(v) for v in args.large.split("x"))
    cfg = job(args, "e2elarge", (w, h, f), args.large_steps,
              save={"save_every": 0}, sample={"prompts": [], "sample_every": 0})
    cfg["datasets"] = cfg["datasets"][:1]  # the 832x480 clips
    train_job(args, res, "joblarge", cfg)


def gpu_cap_code(cap: str) -> str:
    """Python lines (``torch`` imported) that make this process's GPU a card of ``cap`` bytes (an expression; 0: no
    cap): the process may not allocate more, and ``torch.cuda.mem_get_info`` reports that much memory, less what it
    holds, to the planner."""
    return (f"cap = {cap}\n"
            "if cap and torch.cuda.is_available():\n"
            "    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)\n"
            "    torch.cuda.mem_get_info = lambda device=None: (cap - torch.cuda.memory_reserved(), cap)\n")


def phase_tier24(args, res: dict) -> None:
    cfg = job(args, "e2e24", (64, 64, 5) if args.tiny else (512, 512, 33), args.tier24_steps,
              quant={"transformer": "4bit_ara" if not args.tiny else "none"},
              multistage={"switch_every": 10}, memory={"low_vram": True},
              optimizer={"name": "adamw"}, save={"save_every": 0}, sample={"prompts": [], "sample_every": 0})
    prefix = [sys.executable, "-c", f"import sys, torch\n{gpu_cap_code(str(int(args.cap_gib * GIB)))}"
                                    "from trainer_core.cli import main\nsys.exit(main(sys.argv[1:]))\n"]
    r = train_job(args, res, "tier24", cfg, prefix=prefix)
    r["cap_gib"] = args.cap_gib


def _comfy_base(args) -> Path:
    """ComfyUI's folders for the comfy phase under ``--root``: this pack as its custom node, the written files as
    its models, the 832x480 clips as its input."""
    base = args.root / "comfy_base"
    links = {base / "custom_nodes" / "wan22-lora-trainer": ROOT, base / "input" / "clips_a": args.root / "clips_a"}
    # caps the GPU only where E2E_GPU_CAP_GIB is set; loaded with the custom nodes, after ComfyUI chose its allocator
    cap = base / "custom_nodes" / "e2e_gpu_cap" / "__init__.py"
    cap.parent.mkdir(parents=True, exist_ok=True)
    cap.write_text("import os\nimport torch\n\nNODE_CLASS_MAPPINGS = {}\n"
                   + gpu_cap_code("int(float(os.environ.get('E2E_GPU_CAP_GIB', 0)) * 2**30)"))
    kinds = {"high": "diffusion_models", "low": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
    for name, kind in kinds.items():
        links[base / "models" / kind / model_path(args.root, name).name] = model_path(args.root, name)
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(target, target_is_directory=target.is_dir())
    return base


def _comfy_loader(args) -> dict[str, Any]:
    """Load Wan22 Experts' widgets for the written files (fp32 on the tiny model, which runs on the CPU)."""
    files = {k: model_path(args.root, n).name for k, n in (("high_noise_model", "high"), ("low_noise_model", "low"),
                                                            ("text_encoder", "text_encoder"), ("vae", "vae"))}
    dtypes = {"dtype": "fp32", "text_encoder_dtype": "fp32", "vae_dtype": "fp32"} if args.tiny else {}
    return {"source": "comfy files", **files, **dtypes}


def comfy_prompt(args, info: dict) -> dict:
    """Workflow 2 (the H100/H200 motion recipe) as a prompt for this run: the written files, the 832x480 clips at
    the 512 bucket x 33 frames (latents cached), ``--comfy-steps`` rank-16 steps with AdamW, a render at 832x480x33
    after training, and a Quantize ARA node (float8 experts, as job512) between Load Wan22 Experts and its users."""
    from benchmarks.comfy_client import node_defaults, to_api

    w, h, f = (64, 48, 5) if args.tiny else (832, 480, 33)
    overrides = {
        "Wan22LoadExperts": _comfy_loader(args),
        "Wan22BuildVideoDataset": {"folder": "clips_a", "num_frames": f, "frame_sampling": "uniform",
                                   "resolutions": "64" if args.tiny else "512", "cache_latents": True},
        "Wan22TrainLoRA": {"job_name": "e2e_comfy", "rank": 16, "steps": args.comfy_steps, "optimizer": "adamw"},
        "Wan22SaveCheckpoint": {"save_every": args.comfy_steps, "copy_to_loras": False},
        "Wan22PreviewSample": {"width": w, "height": h, "num_frames": f, "steps": args.preview_steps},
    }
    workflow = json.loads((ROOT / "example_workflows" / "wan22_2_motion_lora_h100.json").read_text())
    prompt = to_api(workflow, info, overrides)
    loader = next(i for i, n in prompt.items() if n["class_type"] == "Wan22LoadExperts")
    quant = {**node_defaults(info, "Wan22QuantizeARA"), "transformer": "none" if args.tiny else "float8",
             "text_encoder": "bf16" if args.tiny else args.comfy_text_encoder, "adapter": "compute", "adapter_path": "",
             "experts": [loader, 0]}
    for node in prompt.values():
        if node["inputs"].get("experts") == [loader, 0]:
            node["inputs"]["experts"] = ["quant", 0]
    return prompt | {"quant": {"class_type": "Wan22QuantizeARA", "inputs": quant}}


def comfy24_prompt(args, info: dict) -> dict:
    """Workflow 1 (the 24 GB character recipe) as saved, on this run's files and 832x480 clips: Quantize ARA's
    4bit_ara experts, Low VRAM, switch every 10, AdamW8bit, ``--comfy24-steps`` steps, one training preview and one
    checkpoint at the end, previews and the render at ``--preview-steps`` denoising steps."""
    from benchmarks.comfy_client import to_api

    size = {"width": 64, "height": 64, "num_frames": 5} if args.tiny else {}
    steps = args.comfy24_steps
    overrides = {
        "Wan22LoadExperts": _comfy_loader(args),
        # the tiny model runs on the CPU, where there are neither 4-bit kernels nor 8-bit optimizers
        "Wan22QuantizeARA": {"transformer": "none" if args.tiny else "4bit_ara",
                             "text_encoder": "bf16" if args.tiny else "float8"},
        "Wan22BuildVideoDataset": {"folder": "clips_a",
                                   **({"num_frames": 5, "resolutions": "64"} if args.tiny else {})},
        "Wan22TrainLoRA": {"job_name": "e2e_comfy24", "steps": steps, **({"optimizer": "adamw"} if args.tiny else {})},
        "Wan22SaveCheckpoint": {"save_every": steps, "copy_to_loras": False},
        "Wan22ConfigureTrainingPreviews": {"sample_every": steps, "steps": args.preview_steps, **size},
        "Wan22PreviewSample": {"steps": args.preview_steps, **size},
    }
    workflow = json.loads((ROOT / "example_workflows" / "wan22_1_character_lora_24gb.json").read_text())
    return to_api(workflow, info, overrides)


def phase_comfy(args, res: dict) -> None:
    _run_comfy(args, res, "comfy", comfy_prompt, {})


def phase_comfy24(args, res: dict) -> None:
    _run_comfy(args, res, "comfy24", comfy24_prompt, {"E2E_GPU_CAP_GIB": str(args.cap_gib)})
    res["comfy24"]["cap_gib"] = args.cap_gib


def _run_comfy(args, res: dict, name: str, make_prompt, env: dict[str, str]) -> None:
    """Start a ComfyUI server (``env`` added to its environment), queue ``make_prompt(args, object_info)``, and
    record the server's host memory and the trainer's logged phases as ``res[name]`` (the log: ``name.log``)."""
    from benchmarks.comfy_client import ComfyServer

    if not args.comfy:
        raise RuntimeError("--comfy: give the folder of a ComfyUI checkout (fetched, not part of this repository)")
    t0 = time.perf_counter()
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env}
    log = Path(args.out) / f"{name}.log"
    server = ComfyServer(Path(args.comfy), _comfy_base(args), args.comfy_python, log,
                         cpu=args.tiny, env=env, extra=tuple(args.comfy_args.split()))
    mem = HostMemory(server.proc.pid, t0)
    mem.start()
    out: dict[str, Any] = {}
    try:
        out["server_ready_s"] = server.wait_ready(args.deadline)
        history = server.run(make_prompt(args, server.get("/object_info")), args.deadline)
        out["status"] = history["status"].get("status_str")
        out["prompt_s"] = time.perf_counter() - t0 - out["server_ready_s"]
        out["outputs"] = sorted(history.get("outputs", {}))
        if out["status"] != "success":
            out["messages"] = str(history["status"].get("messages"))[-3000:]
    finally:
        server.stop()
        mem.done.set()
        mem.join()
        out["host_gib"] = mem.gib()
        out.update(parse_log(log.read_text()))
        res[name] = out


def summary(res: dict) -> dict:
    """The issue's goals against this run's figures."""
    out: dict[str, Any] = {}
    j = res.get("job512", {})
    if "time_to_first_step_s" in j:
        out["time_to_first_step_s"] = j["time_to_first_step_s"]
        out["time_to_first_step_goal_met"] = j["time_to_first_step_s"] <= 180
    if "loop_overhead" in res.get("perf", {}):
        out["loop_overhead"] = res["perf"]["loop_overhead"]
        out["loop_overhead_goal_met"] = res["perf"]["loop_overhead"] <= 0.05
        vae = j.get("vae_encoding", {})
        if vae.get("clips", 0) >= j.get("steps", 1 << 30):  # latents not cached: every step also VAE-encoded its clip
            loop = j["s_per_step_steady"] - vae["s"] / vae["clips"]
            out["vae_s_per_step"] = vae["s"] / vae["clips"]
            out["loop_overhead_without_vae"] = loop / res["perf"]["bench_s_per_step"] - 1
    if "host_gib" in j and j.get("files_gib"):
        out["host_peak_over_files"] = j["host_gib"]["VmHWM"] / j["files_gib"]
        out["host_goal_met"] = out["host_peak_over_files"] <= 1.2
    if "gpu_peak_gib" in j:
        out["gpu_peak_over_plan"] = j["gpu_peak_gib"] / j["gpu_planned_gib"]
        out["gpu_goal_met"] = abs(out["gpu_peak_over_plan"] - 1) <= 0.10
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="folder for the files, clips and runs (~36 GB)")
    ap.add_argument("--phases", help=f"comma-separated subset of {','.join(PHASES)}, run in the order given "
                                     "(default: all; comfy and comfy24 only with --comfy)")
    ap.add_argument("--steps", type=int, default=24, help="steps of the 512x512x33 job")
    ap.add_argument("--save-every", type=int, default=12, help="checkpoint and preview every N steps")
    ap.add_argument("--preview-steps", type=int, default=8, help="denoising steps of the previews")
    ap.add_argument("--sample-steps", type=int, default=20, help="denoising steps of the sample phase")
    ap.add_argument("--clips", type=int, default=8, help="clips (half 832x480, half 1024x1024)")
    ap.add_argument("--clip-frames", type=int, default=85)
    ap.add_argument("--perf-steps", type=int, default=6)
    ap.add_argument("--large", default="832x480x81", help="WxHxF of the joblarge phase")
    ap.add_argument("--large-steps", type=int, default=4)
    ap.add_argument("--tier24-steps", type=int, default=12)
    ap.add_argument("--cap-gib", type=float, default=22.0)
    ap.add_argument("--comfy", help="a ComfyUI checkout for the comfy phase (fetched, not in this repository)")
    ap.add_argument("--comfy-python", default=sys.executable, help="the Python that runs ComfyUI (its dependencies)")
    ap.add_argument("--comfy-args", default="", help="extra arguments of ComfyUI's main.py, e.g. "
                                                     "'--disable-cuda-malloc' (the README's advice for training)")
    ap.add_argument("--comfy-text-encoder", default="float8",
                    help="Quantize ARA's text_encoder in the comfy phase (default: the node's own, float8)")
    ap.add_argument("--comfy-steps", type=int, default=8, help="training steps of the comfy phase")
    ap.add_argument("--comfy24-steps", type=int, default=12, help="training steps of the comfy24 phase")
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="kill a phase's process this many seconds after the start (keeps what it reported)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    args.deadline = time.monotonic() + args.deadline_s
    if args.tiny:
        args.clip_frames, args.clips = min(args.clip_frames, 9), min(args.clips, 4)
    default = [p for p in PHASES if not p.startswith("comfy") or args.comfy]
    phases = [p for p in args.phases.split(",") if p] if args.phases else default
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        ap.error(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    args.root.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out) / "e2e_fullscale.json"
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    # phases run in an earlier call on the same machine (files reused) keep their figures; --root keeps a copy for
    # a next call whose --out starts empty
    earlier = next((p for p in (out_json, args.root / out_json.name) if p.is_file()), None)
    if earlier is not None:
        res = {**json.loads(earlier.read_text()), **{k: v for k, v in res.items() if k != "args"}}
    runners = {"files": phase_files, "job512": phase_job512, "sample": phase_sample, "perf": phase_perf,
               "joblarge": phase_joblarge, "tier24": phase_tier24, "comfy": phase_comfy,
               "comfy24": phase_comfy24}
    for name in phases:  # in the order given: the most wanted first, in case the call runs out of time
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            runners[name](args, res)
        except Exception as exc:  # one broken phase must not lose the others' figures
            res[name] = {**res.get(name, {}), "error": f"{type(exc).__name__}: {exc}"}
        res.setdefault(name, {})["phase_wall_s"] = time.perf_counter() - t0
        res["summary"] = summary(res)
        for path in (out_json, args.root / out_json.name):
            path.write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps({k: v for k, v in res[name].items() if k not in ("losses", "stdout_tail")}, default=str),
              flush=True)
    print(json.dumps(res["summary"], indent=1), flush=True)
    return res


if __name__ == "__main__":
    main()
