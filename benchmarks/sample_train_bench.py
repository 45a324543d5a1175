"""GPU benchmark: sampler s/step vs diffusers' WanPipeline, and the trainer's step vs the plain diffusers+peft loop.

Full-size Wan 2.2 A14B experts with random bf16 weights, built directly on the GPU (times and memory are real,
image quality is not). Run on the device:  python benchmarks/sample_train_bench.py [--only sample|train] [--quick]
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
    full_expert,
    latent_shape,
    matmul_ceiling_tflops,
    median,
    peak_gib,
    reset_peak,
    sync,
    time_calls,
    tokens,
)
from trainer_core.config import LoraConfig, OptimizerConfig, SampleConfig  # noqa: E402
from trainer_core.lora import attach_lora, lora_parameters  # noqa: E402
from trainer_core.regularizers import dop_step_loss  # noqa: E402
from trainer_core.sample.sampler import _predict, make_scheduler  # noqa: E402
from trainer_core.train.optim import build_optimizer  # noqa: E402
from trainer_core.train.step import micro_batch_loss  # noqa: E402

SAMPLE_SIZES = [(832, 480, 81), (1024, 1024, 81)]
TRAIN_SIZES = [(512, 512, 33)]
DEVICE = "cuda"
TEXT_DIM = 4096
# --tiny: a CPU smoke run of the same code with the tiny preset's shapes (numbers meaningless).
TINY = dict(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64)


def bench_sampler(high, low, width: int, height: int, frames: int, steps: int) -> dict:
    """Seconds per denoising step (CFG: two passes) of our sampler's step and of WanPipeline, same experts."""
    from diffusers import WanPipeline

    shape = latent_shape(width, height, frames)
    cond = torch.randn(1, 512, TEXT_DIM, device=DEVICE, dtype=torch.bfloat16)
    uncond = torch.randn(1, 512, TEXT_DIM, device=DEVICE, dtype=torch.bfloat16)
    cfg = SampleConfig(prompts=["x"], width=width, height=height, num_frames=frames, steps=steps, sampler="unipc")

    # Ours: the exact per-step work of trainer_core.sample.sample_videos (guided prediction + scheduler step).
    sched = make_scheduler(cfg)
    sched.set_timesteps(steps, device=DEVICE)
    latents = torch.randn(shape, device=DEVICE)
    ts = iter(list(sched.timesteps) * 4)

    def ours_step():
        nonlocal latents
        t = next(ts)
        model = high if float(t) >= 875 else low
        pred = _predict(model, latents, t, cond, uncond, 4.0)
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


def bench_train(model, width: int, height: int, frames: int, steps: int, ceiling: float) -> dict:
    """s/step of the trainer's step (fp32 LoRA r16, AdamW8bit, checkpointing) vs the plain diffusers+peft loop."""
    from peft import LoraConfig as PeftLoraConfig

    shape = latent_shape(width, height, frames)
    x0 = torch.randn(shape, device=DEVICE)
    noise = torch.randn(shape, device=DEVICE)
    text = torch.randn(1, 512, TEXT_DIM, device=DEVICE, dtype=torch.bfloat16)
    sig = torch.full((1,), 0.6, device=DEVICE)
    n_tok = tokens(width, height, frames)
    # model FLOPs per step: forward + activation-gradient backward of the linears (2x) and attention.
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    attn = 4 * n_tok * n_tok * dim * model.config.num_layers + 4 * n_tok * 512 * dim * model.config.num_layers
    flops = 3 * (2 * linear_params * n_tok + attn)
    out = {"size": f"{width}x{height}x{frames}", "tokens": n_tok}

    # Plain loop: peft's LoRA (bf16 like the base), default SDPA, gradient checkpointing, torch AdamW.
    model.add_adapter(PeftLoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                         "net.0.proj", "net.2"]), "plain")
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def plain_step():
        pred = model(hidden_states=((1 - sig) * x0 + sig * noise).bfloat16(), timestep=sig * 1000,
                     encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    t = median(time_calls(plain_step, warmup=2, repeat=steps))
    out.update(plain_s=t, plain_peak_gib=peak_gib(), plain_mfu=flops / t / 1e12 / ceiling)
    model.delete_adapters("plain")
    del opt, params

    # Ours: trainer_core's LoRA wiring (fp32 LoRA), AdamW8bit, and the loop's micro-batch loss.
    cfg = LoraConfig(rank=16)
    attach_lora(model, cfg)
    opt = build_optimizer(lora_parameters(model), OptimizerConfig(name="adamw8bit", lr=1e-4))

    def our_step():
        loss = micro_batch_loss(model, x0, noise, sig, text, "linear", torch.bfloat16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    t = median(time_calls(our_step, warmup=2, repeat=steps))
    out.update(ours_s=t, ours_peak_gib=peak_gib(), ours_mfu=flops / t / 1e12 / ceiling)

    # The same step with Differential Output Preservation (batched LoRA-on passes, no-grad prior): its overhead.
    text_pres = torch.randn_like(text)

    def dop_step():
        loss, _ = dop_step_loss(model, x0, noise, sig, text, text_pres, "linear", torch.bfloat16, 1.0, batched=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    t_dop = median(time_calls(dop_step, warmup=1, repeat=steps))
    out.update(dop_s=t_dop, dop_peak_gib=peak_gib(), dop_overhead=t_dop / t)
    model.delete_adapters("default")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["sample", "train"])
    ap.add_argument("--quick", action="store_true", help="smallest sample size only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    args = ap.parse_args()
    global DEVICE, TEXT_DIM, SAMPLE_SIZES, TRAIN_SIZES
    overrides = {}
    if args.tiny:
        DEVICE, TEXT_DIM, overrides = "cpu", TINY["text_dim"], TINY
        SAMPLE_SIZES, TRAIN_SIZES = [(32, 32, 5)], [(32, 32, 5)]
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    results["bf16_matmul_tflops"] = ceiling = matmul_ceiling_tflops() if DEVICE == "cuda" else 1.0
    print(f"{results['device']}  bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)

    high = full_expert(DEVICE, seed=0, **overrides)
    if args.only != "train":
        low = full_expert(DEVICE, seed=1, **overrides)
        results["sample"] = []
        for w, h, f in SAMPLE_SIZES[:1] if args.quick else SAMPLE_SIZES:
            r = bench_sampler(high, low, w, h, f, steps=4)
            results["sample"].append(r)
            print(json.dumps(r), flush=True)
        del low
        reset_peak()
    if args.only != "sample":
        results["train"] = []
        for w, h, f in TRAIN_SIZES:
            r = bench_train(high, w, h, f, steps=5, ceiling=ceiling)
            results["train"].append(r)
            print(json.dumps(r), flush=True)

    Path(args.out, "sample_train_bench.json").write_text(json.dumps(results, indent=2))
    print("\n| what | size | ours | diffusers/plain | ratio | peak GiB (ours/ref) |")
    print("|---|---|---|---|---|---|")
    for r in results.get("sample", []):
        print(f"| sampler s/step | {r['size']} | {r['ours_s_per_step']:.2f} | {r['diffusers_s_per_step']:.2f} | "
              f"{r['diffusers_s_per_step'] / r['ours_s_per_step']:.2f}x | "
              f"{r['ours_peak_gib']:.1f} / {r['diffusers_peak_gib']:.1f} |")
    for r in results.get("train", []):
        print(f"| train s/step | {r['size']} | {r['ours_s']:.2f} (MFU {r['ours_mfu']:.0%}) | {r['plain_s']:.2f} "
              f"(MFU {r['plain_mfu']:.0%}) | {r['plain_s'] / r['ours_s']:.2f}x | "
              f"{r['ours_peak_gib']:.1f} / {r['plain_peak_gib']:.1f} |")
        print(f"| train s/step with DOP | {r['size']} | {r['dop_s']:.2f} | ours without DOP {r['ours_s']:.2f} | "
              f"{r['dop_overhead']:.2f}x cost | {r['dop_peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
