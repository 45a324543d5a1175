"""GPU benchmark: the sampler's s/step against diffusers' WanPipeline with the same two experts.

Full-size Wan 2.2 A14B experts with random bf16 weights, built directly on the GPU (times and memory are real,
image quality is not). Run on the device:  python benchmarks/sample_bench.py [--quick]   (training speed:
benchmarks/perf_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    TINY,
    full_expert,
    latent_shape,
    median,
    peak_gib,
    reset_peak,
    sync,
    time_calls,
    tokens,
)
from trainer_core.config import SampleConfig  # noqa: E402
from trainer_core.sample.sampler import _guided, make_scheduler  # noqa: E402

SAMPLE_SIZES = [(832, 480, 81), (1024, 1024, 81)]
DEVICE = "cuda"
TEXT_DIM = 4096


def bench_sampler(high, low, width: int, height: int, frames: int, steps: int) -> dict:
    """Seconds per denoising step (CFG: two passes) of our sampler's step and of WanPipeline, same experts."""
    from diffusers import WanPipeline

    shape = latent_shape(width, height, frames)
    cond = torch.randn(1, 512, TEXT_DIM, device=DEVICE, dtype=torch.bfloat16)
    uncond = torch.randn(1, 512, TEXT_DIM, device=DEVICE, dtype=torch.bfloat16)
    cfg = SampleConfig(prompts=["x"], width=width, height=height, num_frames=frames, steps=steps,
                       sampler="diffusers_unipc")

    # Ours: the exact per-step work of trainer_core.sample.sample_videos (guided prediction + scheduler step).
    sched = make_scheduler(cfg)
    sched.set_timesteps(steps, device=DEVICE)
    latents = torch.randn(shape, device=DEVICE)
    ts = iter(list(sched.timesteps) * 4)
    predict = _guided({"high": high, "low": low}, {"high": 4.0, "low": 4.0}, cond, uncond)

    def ours_step():
        nonlocal latents
        t = next(ts)
        pred = predict("high" if float(t) >= 875 else "low", latents, t)
        latents = sched.step(pred, t, latents, return_dict=False)[0]

    reset_peak()
    ours = time_calls(ours_step, warmup=1, repeat=steps - 1)
    ours_peak = peak_gib()

    # diffusers' WanPipeline with the same two experts, timing its own step callback.
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=make_scheduler(cfg),
                       transformer=high, transformer_2=low, boundary_ratio=0.875)
    stamps = []

    def cb(_pipe, _i, _t, kw):
        sync()
        stamps.append(time.perf_counter())
        return kw

    reset_peak()
    sync()
    t0 = time.perf_counter()
    pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width, num_frames=frames,
         num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0, output_type="latent",
         callback_on_step_end=cb)
    stamps.insert(0, t0)
    pipe_steps = [b - a for a, b in zip(stamps[1:-1], stamps[2:])] or [stamps[-1] - stamps[0]]
    return {
        "size": f"{width}x{height}x{frames}",
        "tokens": tokens(width, height, frames),
        "ours_s_per_step": median(ours),
        "diffusers_s_per_step": median(pipe_steps),
        "ours_peak_gib": ours_peak,
        "diffusers_peak_gib": peak_gib(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smallest sample size only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    args = ap.parse_args()
    global DEVICE, TEXT_DIM, SAMPLE_SIZES
    overrides = {}
    if args.tiny:
        DEVICE, TEXT_DIM, overrides = "cpu", TINY["text_dim"], TINY
        SAMPLE_SIZES = [(32, 32, 5)]
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    high = full_expert(DEVICE, seed=0, **overrides)
    low = full_expert(DEVICE, seed=1, **overrides)
    results["sample"] = []
    for w, h, f in SAMPLE_SIZES[:1] if args.quick else SAMPLE_SIZES:
        r = bench_sampler(high, low, w, h, f, steps=4)
        results["sample"].append(r)
        print(json.dumps(r), flush=True)

    Path(args.out, "sample_bench.json").write_text(json.dumps(results, indent=2))
    print("\n| what | size | ours | diffusers | ratio | peak GiB (ours/ref) |")
    print("|---|---|---|---|---|---|")
    for r in results["sample"]:
        print(f"| sampler s/step | {r['size']} | {r['ours_s_per_step']:.2f} | {r['diffusers_s_per_step']:.2f} | "
              f"{r['diffusers_s_per_step'] / r['ours_s_per_step']:.2f}x | "
              f"{r['ours_peak_gib']:.1f} / {r['diffusers_peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
