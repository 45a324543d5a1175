"""Shared helpers for the GPU benchmarks: full-size random-weight Wan 2.2 experts, timing, memory, ceilings."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import WanTransformer3DModel

from trainer_core.memory.planner import WAN22_A14B_ARCH, SideModels

#: Wan 2.2 T2V A14B expert (identical for both experts); see shared FACTS.
A14B_CONFIG = WAN22_A14B_ARCH
#: Overrides of A14B_CONFIG for the CPU smoke runs (--tiny): same code paths, small shapes.
TINY = dict(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64)
#: The planner's side models when the benchmark loads no VAE and no text encoder.
NO_SIDE_MODELS = SideModels(vae_params=0, text_encoder_params=0, text_encoder_linear_params=0,
                            text_encoder_linear_rows=0)


def full_expert(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides
) -> WanTransformer3DModel:
    """A full-size expert with random weights built directly on ``device`` in ``dtype`` (no CPU copy)."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**{**A14B_CONFIG, **overrides})
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def latent_shape(width: int, height: int, frames: int, batch: int = 1) -> tuple[int, ...]:
    """Latent tensor shape for a clip (Wan 2.1 VAE: 4x temporal, 8x spatial, 16 channels)."""
    return (batch, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def tokens(width: int, height: int, frames: int) -> int:
    """Transformer tokens per sample: latent frames x (H/16) x (W/16)."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` calls, synchronizing the GPU around each."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """A process's memory fields of ``/proc/PID/status`` (VmRSS, VmHWM, RssAnon, RssShmem, ...) in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        number, _, unit = value.strip().partition(" ")
        if unit == "kB":
            out[key] = int(number) * 1024
    return out


def run_child(cmd: list[str], what: str, **kwargs: Any) -> dict:
    """Run ``cmd`` (a benchmark's own child mode, one measurement in a fresh process) and return the JSON object
    its stdout ends with; when it fails, exit naming ``what`` with the tail of its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_result(out: Path, name: str, res: dict) -> None:
    """Write ``res`` as ``out/name`` (the folder made if needed) and print it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_ceiling_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate on random data (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    times = time_calls(lambda: a @ b, warmup=3, repeat=10)
    return 2 * n**3 / median(times) / 1e12
