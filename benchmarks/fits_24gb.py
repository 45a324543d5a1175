"""Proof that the 24 GB recipe fits a 24 GB card: both Wan 2.2 A14B experts trained at 512x512x33 with 4-bit + ARA
and Low VRAM, switching every 10 steps, under a hard cap of 22 GiB of GPU memory.

    python benchmarks/fits_24gb.py [--steps 30] [--cap-gib 22]      # CUDA (an H100/H200 stands in for the card)
    python benchmarks/fits_24gb.py --tiny                             # CPU smoke run

Each expert is built with random bf16 weights on the GPU, quantized there (NF4, rank-16 accuracy recovery adapter
calibrated on ``--calibration`` random batches), given its LoRA and sent to pinned host memory (Low VRAM), so the
bf16 copy never coexists with training. Then ``torch.cuda.set_per_process_memory_fraction`` caps the process at
``--cap-gib``: any allocation beyond it raises an out-of-memory error, so finishing the run proves the fit. The block
plan is the VRAM planner's for a card with that much free memory. Reported: quantization time per expert, s/step,
the switch copy times, peak allocated memory and the planner's estimate.
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

from benchmarks.common import A14B_CONFIG, NO_SIDE_MODELS, TINY, full_expert, latent_shape  # noqa: E402
from benchmarks.quant_bench import calibration_batches  # noqa: E402
from trainer_core.config import JobConfig  # noqa: E402
from trainer_core.lora import attach_lora, lora_parameters  # noqa: E402
from trainer_core.memory import BlockPlan, ExpertMemory, install_block_plan  # noqa: E402
from trainer_core.memory.planner import estimate_peak_vram  # noqa: E402
from trainer_core.quant.apply import quantize_expert  # noqa: E402
from trainer_core.train.optim import build_optimizer  # noqa: E402
from trainer_core.train.step import micro_batch_loss  # noqa: E402

GIB = 2**30


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10, help="switch experts every N steps")
    ap.add_argument("--cap-gib", type=float, default=22.0)
    ap.add_argument("--calibration", type=int, default=4, help="random batches calibrating the adapters")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    overrides = TINY if args.tiny else {}
    arch = {**A14B_CONFIG, **overrides}
    size, frames = (32, 5) if args.tiny else (512, 33)
    cfg = JobConfig.model_validate({
        "model": {"source": "bench"},
        "lora": {"rank": 16},
        "optimizer": {"name": "adamw8bit", "lr": 1e-4},
        "quant": {"transformer": "4bit_ara", "quantizer": "nf4", "ara_rank": 16,
                  "ara_calibration_samples": args.calibration},
        "multistage": {"train_low_noise": True, "switch_every": args.every},
        "datasets": [{"folder": "bench", "resolutions": [size], "num_frames": frames}],
        "memory": {"low_vram": True, "headroom_gib": 0.5},
    })
    cap = int(args.cap_gib * GIB)
    plan = estimate_peak_vram(cfg, arch, cap if device == "cuda" else None, device_type=device,
                              side_models=NO_SIDE_MODELS)
    print(plan.summary(), flush=True)
    blocks = BlockPlan(*plan.block_split)  # no compile with a 4-bit base (train.compile: auto)
    memory = ExpertMemory(device, low_vram=True, offload_blocks=0)
    models, optimizers, quant_s, reports = {}, {}, {}, {}
    batches = calibration_batches(args.calibration, frames, size, arch["text_dim"], device, torch.bfloat16)
    for seed, name in enumerate(("high", "low")):
        model = full_expert(device, seed=seed, **overrides)
        t0 = time.perf_counter()
        report = quantize_expert(model, cfg.quant, expert=name, cache_key="bench", device=device, calibration=batches)
        if device == "cuda":
            torch.cuda.synchronize()
        quant_s[name] = time.perf_counter() - t0
        reports[name] = report.summary()
        print(report.summary(), flush=True)
        attach_lora(model, cfg.lora)
        install_block_plan(model, blocks)
        model.train()
        memory.place(name, model)
        memory.offload(name)  # to pinned host memory before the next expert is built
        models[name] = model
        optimizers[name] = build_optimizer(lora_parameters(model), cfg.optimizer)
    del batches
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "quantize_s": quant_s, "adapters": reports, "blocks": blocks.describe(),
                     "planned_gib": plan.phases["training"] / GIB, "cap_gib": args.cap_gib}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device).manual_seed(0)
    shape = latent_shape(size, size, frames)
    times, losses, switches = [], [], []
    for i in range(args.steps):
        name = ("high", "low")[(i // args.every) % 2]
        t0 = time.perf_counter()
        record = memory.activate(name)
        if record is not None:
            switches.append(record)
        x0 = torch.randn(shape, generator=gen, device=device)
        noise = torch.randn(shape, generator=gen, device=device)
        sigma = torch.rand(1, generator=gen, device=device) * 0.9 + 0.05
        text = torch.randn(1, 512, arch["text_dim"], generator=gen, device=device, dtype=torch.bfloat16)
        loss = micro_batch_loss(memory.model(name), x0, noise, sigma, text, "linear",
                                torch.bfloat16 if device == "cuda" else None)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    steady = [t for i, t in enumerate(times) if i % args.every != 0]  # steps without a switch
    results.update(
        steps=args.steps,
        s_per_step=sum(times[1:]) / (len(times) - 1),
        s_per_step_without_switch=sum(steady[1:]) / max(1, len(steady) - 1),
        switch_copy_s=[r.copy_seconds() for r in switches],
        switch_step_s=[times[i] for i in range(args.every, args.steps, args.every)],
        peak_gib=torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan"),
        losses=losses,
    )
    memory.close()
    print(json.dumps({k: v for k, v in results.items() if k != "losses"}, indent=1), flush=True)
    Path(args.out, "fits_24gb.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
