"""Memory benchmark: block offloading, low-VRAM expert swapping and the VRAM planner on full-size Wan 2.2 experts.

    python benchmarks/memory_bench.py            # CUDA: full-size random-weight A14B experts in bf16 (an H200)
    python benchmarks/memory_bench.py --tiny     # CPU smoke run of every code path on a small model (tests use it)

Experts are built directly on the GPU in bf16 with random weights (no download), a rank-16 fp32 LoRA on the default
targets, gradient checkpointing, bf16 autocast and AdamW: the trainer's own setup. Measured at 512x512x33 (9,216
tokens, 512 text tokens):

* one expert resident, then with ``offload_blocks`` 20 and 30 (prefetch 1): seconds per step and peak allocated
  memory, each beside the planner's estimate for the same settings (no VAE and text encoder in this run);
* low VRAM with both experts: the expert switch's copy time and throughput, once waited for (no overlap) and once
  overlapped with the next step (the time the step really loses), beside an ordinary step; peak vs the planner.

Results are printed as a table and written as JSON (``--out``).

Results on an NVIDIA H200 (torch 2.11.0+cu130, 2026-11-26), 512x512x33, bf16, LoRA r16, checkpointing, AdamW:

| run | s/step | peak GiB | planner GiB | notes |
|---|---|---|---|---|
| one expert resident | 2.567 | 35.06 | 34.95 | |
| offload_blocks 20 | 2.629 | 23.25 | 23.17 | no stalls; first placement 11.6 s (pinning 28 GiB) |
| offload_blocks 30 | 2.576 | 16.68 | 16.62 | no stalls |
| low VRAM, both experts | 2.570 | 35.92 | 35.81 | switch copies 26.7 GiB in 0.520 s (51.3 GiB/s) |

An expert switch costs the step 0.517 s when waited for and 0.041 s when overlapped (the default). A calibration
run on the same card also measured 47.94 GiB at 768x768x41 (planner 47.40) and 126.58 GiB without gradient
checkpointing at 512x33 (planner 126.51).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core.config import JobConfig, LoraConfig  # noqa: E402
from trainer_core.lora import attach_lora, lora_parameters  # noqa: E402
from trainer_core.memory import BlockPlan, ExpertMemory, install_block_plan  # noqa: E402
from trainer_core.memory.planner import WAN22_A14B_ARCH, SideModels, estimate_peak_vram  # noqa: E402
from trainer_core.models.single_file import cast_keeping_fp32  # noqa: E402
from trainer_core.flow import predict_velocity  # noqa: E402

GIB = 2**30
FULL = {"arch": WAN22_A14B_ARCH, "frames": 33, "size": 512, "text": (512, 4096), "offloads": (20, 30), "steps": 3}
TINY = {
    "arch": {**WAN22_A14B_ARCH, "num_attention_heads": 1, "ffn_dim": 256, "num_layers": 3, "text_dim": 32},
    "frames": 1,
    "size": 32,
    "text": (8, 32),
    "offloads": (1, 3),
    "steps": 1,
}


class Bench:
    """One device, one set of inputs, and helpers to build experts and time training steps on them."""

    def __init__(self, spec: dict, device: torch.device):
        self.spec, self.device = spec, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        latent = (1, 16, (spec["frames"] - 1) // 4 + 1, spec["size"] // 8, spec["size"] // 8)
        self.x = torch.randn(latent, generator=gen).to(device, self.dtype)
        self.text = torch.randn((1, *spec["text"]), generator=gen).to(device, self.dtype)
        self.t = torch.tensor([600.0], device=device)

    def expert(self, seed: int, device: torch.device | str) -> WanTransformer3DModel:
        """A random-weight expert built directly on ``device`` with its LoRA, ready to train."""
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(device):
                model = WanTransformer3DModel(**self.spec["arch"])
        finally:
            torch.set_default_dtype(default)
        cast_keeping_fp32(model, self.dtype).requires_grad_(False)
        attach_lora(model, LoraConfig(rank=16))
        install_block_plan(model, BlockPlan.uniform("full", len(model.blocks)))
        return model.train()

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """One training step (forward, backward, AdamW); returns the loss."""
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        pred = predict_velocity(model, self.x, self.t / 1000.0, self.text, autocast)
        loss = (pred.float() - 0.5).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_steps(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Seconds per step (after one warm-up step that also creates the optimizer state) and peak memory."""
        self.step(model, optimizer)
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        losses = [self.step(model, optimizer) for _ in range(self.spec["steps"])]
        self.sync()
        out = {"s_per_step": (time.perf_counter() - t0) / self.spec["steps"], "last_loss": losses[-1]}
        if self.device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
        return out

    def planned_gib(self, **memory) -> float:
        """The planner's training-phase estimate for this run's settings (no VAE or text encoder loaded here)."""
        res, frames = self.spec["size"], self.spec["frames"]
        cfg = JobConfig.model_validate(
            {
                "model": {"source": "bench"},
                "lora": {"rank": 16},
                "optimizer": {"name": "adamw"},
                "multistage": {"train_low_noise": memory.pop("two_experts", False)},
                "datasets": [{"folder": "bench", "resolutions": [res], "num_frames": frames}],
                "memory": memory,
            }
        )
        no_vae = SideModels(vae_params=0)
        plan = estimate_peak_vram(cfg, self.spec["arch"], None, device_type=self.device.type, side_models=no_vae)
        return plan.phases["training"] / GIB


def bench_offload(b: Bench) -> dict:
    """Resident vs offloaded blocks on one expert (the expert is re-placed for each setting)."""
    results = {}
    model = b.expert(1, b.device)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-5)
    results["resident"] = {**b.timed_steps(model, optimizer), "planned_gib": b.planned_gib(), "offload_blocks": 0}
    for blocks in b.spec["offloads"]:
        memory = ExpertMemory(b.device, low_vram=False, offload_blocks=blocks, prefetch=1)
        t0 = time.perf_counter()
        memory.place("high", model)
        place = time.perf_counter() - t0
        r = b.timed_steps(model, optimizer)
        expert = memory.experts["high"]
        r.update(
            planned_gib=b.planned_gib(offload_blocks=blocks),
            offload_blocks=blocks,
            place_seconds=place,
            misses=expert.misses(),
            host_gib=memory.engine.arena.allocated_bytes / GIB,
        )
        results[f"offload_{blocks}"] = r
        memory.close()
    del model, optimizer
    return results


def bench_swap(b: Bench) -> dict:
    """Low VRAM with two experts: switches waited for vs overlapped with the next step."""
    memory = ExpertMemory(b.device, low_vram=True, offload_blocks=0)
    optimizers = {}
    for seed, name in ((2, "high"), (3, "low")):
        model = b.expert(seed, b.device)  # built on the GPU, then moved to pinned host memory unless active
        memory.place(name, model)
        optimizers[name] = torch.optim.AdamW(lora_parameters(model), lr=1e-5)
    for name in ("high", "low", "high"):  # warm up both (optimizer states, kernels)
        memory.activate(name)
        b.step(memory.model(name), optimizers[name])
    b.sync()
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(b.device)
    waited, overlapped, plain = [], [], []
    for name in ("low", "high"):
        b.sync()
        t0 = time.perf_counter()
        record = memory.activate(name, wait=True)
        b.step(memory.model(name), optimizers[name])
        b.sync()
        elapsed = time.perf_counter() - t0
        speed = record.gib_per_second()
        waited.append({"copy_s": record.copy_seconds(), "gib_s": speed, "switch_plus_step_s": elapsed})
    for name in ("low", "high"):
        b.sync()
        t0 = time.perf_counter()
        record = memory.activate(name)
        blocking = record.blocking_seconds
        b.step(memory.model(name), optimizers[name])
        b.sync()
        elapsed = time.perf_counter() - t0
        overlapped.append({"copy_s": record.copy_seconds(), "blocking_s": blocking, "switch_plus_step_s": elapsed})
    for _ in range(2):
        b.sync()
        t0 = time.perf_counter()
        b.step(memory.model("high"), optimizers["high"])
        b.sync()
        plain.append(time.perf_counter() - t0)
    step = sum(plain) / len(plain)
    out = {
        "expert_gib": record.nbytes / GIB,
        "plain_step_s": step,
        "waited": waited,
        "overlapped": overlapped,
        "exposed_switch_s_waited": sum(w["switch_plus_step_s"] for w in waited) / len(waited) - step,
        "exposed_switch_s_overlapped": sum(o["switch_plus_step_s"] for o in overlapped) / len(overlapped) - step,
        "planned_gib": b.planned_gib(low_vram=True, two_experts=True),
    }
    if b.device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(b.device) / GIB
    memory.close()
    return out


def table(results: dict) -> str:
    """The figures as a Markdown table."""
    rows = ["| run | s/step | peak GiB | planned GiB | notes |", "|---|---|---|---|---|"]
    for key, r in results.get("offload", {}).items():
        note = f"misses {r['misses']}, placing {r['place_seconds']:.1f} s" if "misses" in r else ""
        peak = r.get("peak_gib", float("nan"))
        rows.append(f"| {key} | {r['s_per_step']:.3f} | {peak:.2f} | {r['planned_gib']:.2f} | {note} |")
    if "swap" in results:
        s = results["swap"]
        note = (
            f"switch copies {s['expert_gib']:.1f} GiB in {s['waited'][0]['copy_s']:.3f} s "
            f"({s['waited'][0]['gib_s']:.1f} GiB/s); exposed per switch: waited {s['exposed_switch_s_waited']:.3f} s, "
            f"overlapped {s['exposed_switch_s_overlapped']:.3f} s"
        )
        peak = s.get("peak_gib", float("nan"))
        rows.append(f"| low VRAM, 2 experts | {s['plain_step_s']:.3f} | {peak:.2f} | {s['planned_gib']:.2f} | {note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results (also printed and written to ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (smoke test of every path)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--only", choices=("offload", "swap"), help="run one part")
    args = parser.parse_args(argv)
    if args.tiny:
        spec, device = TINY, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            parser.error("the full-size benchmark needs a CUDA GPU (about 60 GiB free); use --tiny on the CPU")
        spec, device = FULL, torch.device("cuda")
    b = Bench(spec, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__}
    if args.only != "swap":
        results["offload"] = bench_offload(b)
    if args.only != "offload":
        results["swap"] = bench_swap(b)
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
