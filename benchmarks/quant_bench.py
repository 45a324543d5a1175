"""GPU benchmark: quantizing one full-size Wan 2.2 A14B expert, and quantized Linear speed vs bf16.

Builds ONE expert (40 blocks, dim 5120, ffn 13824) with random bf16 weights directly on the GPU and times, per
mode, ``trainer_core.quant.quantize_expert`` (quantization + accuracy recovery adapters, calibration included), its
peak GPU memory and the expert's resident weight memory afterwards; then times one quantized Linear against bf16 at
9,216 tokens (512x512x33), forward and forward+input-gradient (what LoRA training runs). Random weights: the times
and memory are real, the error figures only show the method works (trained weights have more structure to recover).

    python benchmarks/quant_bench.py            # on the GPU
    python benchmarks/quant_bench.py --tiny     # CPU smoke run of the same code, tiny shapes (numbers meaningless)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import TINY, full_expert, latent_shape, median, peak_gib, reset_peak, sync, time_calls  # noqa: E402
from trainer_core.config import QuantConfig  # noqa: E402
from trainer_core.quant import Float8Linear, NF4Linear, UInt4Linear, quantize_expert, supports_fp8_matmul  # noqa: E402

MODES = {
    "4bit_ara nf4 calibrated": QuantConfig(transformer="4bit_ara", quantizer="nf4"),
    "4bit_ara nf4 residual-svd": QuantConfig(transformer="4bit_ara", quantizer="nf4", ara_calibration_samples=0),
    "4bit_ara uint4 calibrated": QuantConfig(transformer="4bit_ara", quantizer="uint4"),
    "float8": QuantConfig(transformer="float8"),
}


def calibration_batches(n: int, frames: int, size: int, text_dim: int, device: str, dtype: torch.dtype) -> list:
    """``n`` transformer forward kwargs like the training loop's (random latents and text)."""
    g = torch.Generator().manual_seed(0)
    return [
        dict(
            hidden_states=torch.randn(latent_shape(size, size, frames), generator=g).to(device, dtype),
            timestep=torch.tensor([900.0 - 50 * i], device=device),
            encoder_hidden_states=torch.randn(1, 512, text_dim, generator=g).to(device, dtype),
            return_dict=False,
        )
        for i in range(n)
    ]


def weight_gib(model: nn.Module) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def bench_quantization(args, device: str, overrides: dict) -> list[tuple]:
    rows = []
    for label, cfg in MODES.items():
        if args.modes and not set(args.modes) <= set(label.split()):
            continue
        # --from-cpu: the 24 GB-card path, where the bf16 expert waits in CPU memory and only its quantized
        # blocks accumulate on the GPU (peak GPU memory is then what matters).
        model = full_expert("cpu" if args.from_cpu else device, torch.bfloat16, **overrides)
        text_dim = model.config.text_dim
        bf16_gib = weight_gib(model)
        batches = calibration_batches(args.samples, args.frames, args.size, text_dim, device, torch.bfloat16)
        samples = min(cfg.ara_calibration_samples, args.samples)
        cfg = cfg.model_copy(update={"ara_rank": args.rank, "ara_calibration_samples": samples})
        reset_peak()
        sync()
        t0 = time.perf_counter()
        report = quantize_expert(model, cfg, expert="high", cache_key="bench", device=device, calibration=batches)
        sync()
        seconds = time.perf_counter() - t0
        errors = (report.mean_error, report.mean_error_with_adapter)
        rows.append((label, seconds, peak_gib(), bf16_gib, weight_gib(model), *errors))
        print(report.summary(), flush=True)
        del model, batches, report
        gc.collect()
        reset_peak()
    return rows


def bench_layers(args, device: str, shapes: list[tuple[int, int]], tokens: int) -> list[tuple]:
    rows = []
    warm, rep = (1, 3) if args.tiny else (5, 20)
    fp8 = supports_fp8_matmul(device)
    for in_f, out_f in shapes:
        linear = nn.Linear(in_f, out_f, device=device, dtype=torch.bfloat16).requires_grad_(False)
        variants = {"bf16": linear}
        for name, make in (("nf4+ara", NF4Linear), ("uint4+ara", UInt4Linear)):
            layer = make(linear, torch.bfloat16)
            layer.set_ara(torch.randn(args.rank, in_f) * 0.01, torch.randn(out_f, args.rank) * 0.01, torch.bfloat16)
            variants[name] = layer
        f8_name = "float8" + (" (fp8 mm)" if fp8 else " (dequant)")
        variants[f8_name] = Float8Linear(linear, torch.bfloat16, fp8_matmul=fp8)
        x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
        for name, layer in variants.items():
            xg = x.clone().requires_grad_(True)
            fwd = median(time_calls(lambda: layer(x), warm, rep))

            def fwd_bwd():
                layer(xg).sum().backward()
                xg.grad = None

            both = median(time_calls(fwd_bwd, warm, rep))
            rows.append((f"{in_f}->{out_f}", name, fwd * 1e3, both * 1e3))
        del variants, linear
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny preset's shapes")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (default 8, quant's default)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", nargs="*", help="only modes whose label has all these words (nf4, calibrated ...)")
    parser.add_argument("--skip-layers", action="store_true", help="only time the expert quantization")
    parser.add_argument("--from-cpu", action="store_true", help="build the expert in CPU memory (24 GB-card path)")
    args = parser.parse_args()
    if args.tiny:
        device, overrides, args.size, args.frames, tokens = "cpu", TINY, 64, 5, 256
        shapes = [(256, 256), (256, 512), (512, 256)]
        args.rank = min(args.rank, 8)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU visible; use --tiny for a CPU smoke run")
        device, overrides, args.size, args.frames, tokens = "cuda", {}, 512, 33, 9216
        shapes = [(5120, 5120), (5120, 13824), (13824, 5120)]
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

    rows = bench_quantization(args, device, overrides)
    where = "from CPU memory" if args.from_cpu else "resident on the device"
    clip = f"{args.size}x{args.size}x{args.frames}"
    print(f"\nExpert quantization, {where} ({args.samples} calibration samples of {clip}, rank {args.rank})")
    head = ("mode", "seconds", "peak GiB", "bf16 GiB", "after GiB", "err", "err+ARA")
    print(f"{head[0]:28s} {head[1]:>8s} {head[2]:>9s} {head[3]:>9s} {head[4]:>10s} {head[5]:>7s} {head[6]:>8s}")
    for label, sec, peak, before, after, err, err_ara in rows:
        ara = f"{err_ara:8.4f}" if err_ara is not None else f"{'-':>8s}"
        print(f"{label:28s} {sec:8.2f} {peak:9.2f} {before:9.2f} {after:10.2f} {err:7.4f} {ara}")
    if args.skip_layers:
        return
    layer_rows = bench_layers(args, device, shapes, tokens)
    print(f"\nOne Linear at {tokens} tokens (median ms)")
    print(f"{'shape':12s} {'variant':20s} {'forward':>9s} {'fwd+bwd(x)':>11s}")
    for shape, name, fwd, both in layer_rows:
        print(f"{shape:12s} {name:20s} {fwd:9.3f} {both:11.3f}")


if __name__ == "__main__":
    main()
