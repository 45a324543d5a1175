"""The 24 GB tier in one call: float8 against 4-bit + ARA under a 22 GiB cap, both against bf16, and a peer
(kohya-ss/musubi-tuner's own Wan code) under the same cap.

    python benchmarks/tier24_bench.py                        # on the GPU (an H200 stands in for a 24 GB card)
    python benchmarks/tier24_bench.py --tiny --steps 2 --every 1 --fp8-offload 1    # CPU smoke run
    python benchmarks/tier24_bench.py --report tier24_bench.json                      # Markdown table of a result

Full-size Wan 2.2 A14B experts with random weights, built directly on the GPU. Every trainer section trains rank-16
LoRAs (the same seeded initialisation in every section, independent of the device and of the base layer's type) on
the same seeded stream of latents, noise, noise levels and text (``perf_bench.Bench.data``) with the trainer's real
step (``micro_batch_loss``: fp32 LoRA under bf16 autocast) and the same optimizer (``--optimizer``, default the
24 GB recipe's AdamW8bit). Sections, in this order; each one is isolated (an error is recorded and the next one
runs) and the JSON is rewritten after each:

* ``planner``: the VRAM planner's plans (CPU arithmetic) for a 24 GB card at 22 GiB (the cap) and 23.5 GiB free (a
  headless 24 GB card) and for 31 GiB (a 32 GB card): every transformer quantization with Low VRAM and
  ``offload_blocks: auto``, at the main size and the probe sizes, and what it suggests for the default bf16 job.
  The default job's advice is given for a card without fp8 matmuls (Ampere) and for one with them (Ada/Blackwell).
* ``reference_bf16``: both bf16 experts resident (no cap), the planner's split for the card, eager; ``--steps``
  steps switching expert every ``--every`` steps (the losses every other section is compared with).
* ``float8_low_vram``: both experts quantized to float8 (fp8 matmuls forward and backward), Low VRAM, capped with
  ``torch.cuda.set_per_process_memory_fraction`` at ``--cap-gib``; the planner's plan for a card with that much
  free memory, ``offload_blocks: auto`` (the fewest streamed blocks that fit, more where that makes every block
  ``selective``), the trainer's compile decision (``block_plan_for``: compiled on CUDA with Triton, streamed blocks
  too; ``--float8-blocks compiled`` compiles wherever the trainer would not, e.g. on the CPU). Same steps as the
  reference.
* ``peer_musubi``: musubi-tuner's WanModel (t2v-A14B config) with random bf16 weights turned into its
  ``--fp8_base --fp8_scaled`` weights by its own ``optimize_state_dict_with_fp8`` + ``apply_fp8_monkey_patch``
  (block-wise e4m3, dequantized per matmul), its ``networks.lora_wan`` network (rank 16 on every block Linear,
  its default targets), ``--blocks_to_swap N`` from ``--peer-swap`` (the first that runs under the cap), its
  per-block gradient checkpointing, bf16 autocast, torch AdamW, ``max_grad_norm`` 1.0 (its default), one expert
  at the main size. Swap modes (``--peer-modes``): ``classic`` (its default exchange swap) and ``h2d``
  (``--block_swap_h2d_only --use_pinned_memory_for_block_swap``, its fastest for LoRA). The code is imported from
  ``--peer`` (default ``.peer/musubi``, kept out of git); without it the section is skipped with the reason.
* ``nf4_ara_low_vram``: the recipe measured by ``fits_24gb.py`` (4bit_ara nf4, rank-16 adapters calibrated on
  ``--calibration`` batches, Low VRAM) under the same cap, same steps.
* ``float8_probes``: one float8 expert under the cap at each ``--probe`` size with that size's plan, a few steps;
  an out-of-memory error is a result, not a crash.
* ``float8_sweep``: one float8 expert under the cap at the main size for each ``--sweep`` variant
  ``OFFLOAD:eager|compiled[:PREFETCH]`` (that many streamed blocks, the planner's checkpointing split for them,
  blocks eager or all compiled, streamed ones too): s/step, peak, prefetch misses. It maps what streaming more blocks
  (to afford less recompute) and compiling buy under the cap, for the trainer's block-plan choice.
* ``low_vram_vs_resident`` (only with ``--resident-ratio``): ``perf_bench.run_low_vram`` with two float8 experts
  (H200 memory, compiled): Low VRAM switching every 10 against both resident. Off by default: measured 1.013x in
  ``results/perf_512x512x33_h200.json``. Without it the capped sections report ``switch_overhead``: their s/step
  with the switch step against without.

``summary`` gives the loss differences to bf16 (mean and max over the steps of |loss - bf16 loss| / bf16 loss;
``perf_bench.parity`` is the max), the s/step of each path and the peer ratio (peer s/step / this trainer's).

Device run (H200, torch 2.11): diffusers, peft, pydantic (+ pydantic-core, annotated-types, typing-inspection,
typing-extensions), av and bitsandbytes travel as wheels in ``.whl`` (bitsandbytes trimmed to its CPU and CUDA 13.0
libraries to fit the 64 MiB upload), the peer's files in ``.peer/musubi``; ``--deadline-s`` skips a section that
would end past that many seconds (``EXPECTED_S``). Expected on an H200 (from results/perf_512x512x33_h200.json and
fits_24gb_h100.json): planner ~10 s, reference ~50 s, float8 ~70 s, peer ~80 s, nf4 ~90 s, probes ~50 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import A14B_CONFIG, NO_SIDE_MODELS, TINY, full_expert, peak_gib, reset_peak, sync  # noqa: E402
from benchmarks.perf_bench import Bench, free_for_plan, timed  # noqa: E402
from benchmarks.quant_bench import calibration_batches  # noqa: E402
from trainer_core.config import JobConfig  # noqa: E402
from trainer_core.lora import attach_lora, lora_parameters  # noqa: E402
from trainer_core.memory import BlockPlan, ExpertMemory, install_block_plan  # noqa: E402
from trainer_core.memory.allocator import use_expandable_segments  # noqa: E402
from trainer_core.memory.planner import estimate_peak_vram  # noqa: E402
from trainer_core.quant import supports_fp8_matmul  # noqa: E402
from trainer_core.quant.apply import quantize_expert  # noqa: E402
from trainer_core.train.experts import block_plan_for  # noqa: E402
from trainer_core.train.optim import build_optimizer  # noqa: E402
from trainer_core.train.step import micro_batch_loss  # noqa: E402

GIB = 2**30
NAMES = ("high", "low")
SECTIONS = ("planner", "reference_bf16", "float8_low_vram", "peer_musubi", "nf4_ara_low_vram", "float8_probes",
            "float8_sweep", "low_vram_vs_resident")
#: Pessimistic seconds per section on an H200 at the defaults (estimated from results/perf_512x512x33_h200.json and
#: fits_24gb_h100.json): a section that would end after --deadline-s is skipped, with the reason, not started.
EXPECTED_S = {"planner": 15, "reference_bf16": 70, "float8_low_vram": 100, "peer_musubi": 120,
              "nf4_ara_low_vram": 120, "float8_probes": 70, "float8_sweep": 300, "low_vram_vs_resident": 120}


def parse_size(text: str) -> tuple[int, int, int]:
    w, h, f = (int(v) for v in text.lower().split("x"))
    return w, h, f


def job_config(quant: str, size: tuple[int, int, int], experts: int, optimizer: str, *, low_vram: bool,
               offload: int | str, every: int, calibration: int = 4) -> JobConfig:
    """The 24 GB recipe's settings (rank 16, Low VRAM, switch every ``every``) for one quantization and clip size."""
    w, h, f = size
    q: dict = {"transformer": quant}
    if quant == "4bit_ara":
        q.update(quantizer="nf4", ara_rank=16, ara_calibration_samples=calibration)
    return JobConfig.model_validate({
        "model": {"source": "bench"},
        "lora": {"rank": 16},
        "optimizer": {"name": optimizer, "lr": 1e-4},
        "quant": q,
        "multistage": {"train_low_noise": experts == 2, "switch_every": every},
        "datasets": [{"folder": "bench", "resolutions": [max(w, h)], "num_frames": f}],
        "memory": {"low_vram": low_vram, "headroom_gib": 0.5, "offload_blocks": offload},
    })


def plan_row(plan) -> dict:
    return {"fits": plan.fits, "planned_gib": round(plan.phases["training"] / GIB, 2),
            "required_gib": round(plan.required_bytes / GIB, 2), "offload_blocks": plan.offload_blocks,
            "block_split": list(plan.block_split)}


def seeded_lora_init(model: torch.nn.Module, seed: int) -> int:
    """Overwrite the LoRA weights with a seeded init (lora_A ~ U(+-1/sqrt(in)) as peft's Kaiming default, lora_B = 0)
    drawn on the CPU in name order: the same numbers whatever the device and the base layers' type. Returns the
    number of LoRA tensors set."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    count = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in name and name.endswith(".weight"):
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))
                count += 1
            elif ".lora_B." in name and name.endswith(".weight"):
                p.zero_()
                count += 1
    return count


def reserved_peak_gib() -> float:
    """Peak memory the caching allocator held (what the cap limits), GiB."""
    return torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else float("nan")


def set_cap(gib: float | None) -> None:
    """Cap this process's CUDA allocations at ``gib`` (None lifts the cap)."""
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total))


def cleanup() -> None:
    set_cap(None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


def parity(reference: list[float], losses: list[float]) -> dict:
    """Relative loss differences over the steps both runs have: mean and max of |loss - ref| / |ref|."""
    diffs = [abs(a - r) / abs(r) for a, r in zip(losses, reference, strict=False)]
    if not diffs:
        return {}
    return {"loss_rel_diff_mean": sum(diffs) / len(diffs), "loss_rel_diff_max": max(diffs), "steps": len(diffs)}


def train_steps(b: Bench, model_of, optimizers: dict, names: tuple[str, ...], steps: int, every: int,
                memory: ExpertMemory | None) -> dict:
    """``steps`` training steps of the trainer, expert ``names[(i // every) % len(names)]`` at step i."""
    autocast = torch.bfloat16 if b.cuda else None
    times, losses, switches, error = [], [], [], None
    for i in range(steps):
        name = names[(i // every) % len(names)]
        sync()
        t0 = time.perf_counter()
        try:
            if memory is not None:
                record = memory.activate(name)
                if record is not None:
                    switches.append(record)
            x0, noise, sig, text = b.data(i)
            loss = micro_batch_loss(model_of(name), x0, noise, sig, text, "linear", autocast)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            losses.append(loss.item())
        except torch.OutOfMemoryError as exc:  # under the cap this is a result: what ran stays recorded
            error = f"OutOfMemoryError at step {i}: {str(exc)[:600]}"
            optimizers[name].zero_grad(set_to_none=True)
            break
        sync()
        times.append(time.perf_counter() - t0)
        print(f"  step {i} ({name}): {times[-1]:.3f} s, loss {losses[-1]:.5f}", flush=True)
    if not times:
        return {"error": error, "peak_gib": peak_gib(), "reserved_peak_gib": reserved_peak_gib(), "losses": []}
    later = times[1:] or times
    steady = [t for i, t in enumerate(times) if i > 0 and i % every != 0] or later
    out = {
        "steps": steps,
        "s_per_step": sum(later) / len(later),
        "s_per_step_without_switch": sum(steady) / len(steady),
        "first_step_s": times[0],
        "steps_done": len(times),
        "switch_step_s": [times[i] for i in range(every, len(times), every)] if len(names) > 1 else [],
        "switch_copy_s": [r.copy_seconds() for r in switches],
        "peak_gib": peak_gib(),
        "reserved_peak_gib": reserved_peak_gib(),
        "losses": losses,
        "step_s": times,
    }
    out["switch_overhead"] = out["s_per_step"] / out["s_per_step_without_switch"]
    if error:
        out["error"] = error
    return out


# --- sections ---------------------------------------------------------------------------------------------------


def section_planner(args) -> dict:
    """What the VRAM planner plans and suggests for 24 / 32 GB cards (full-size A14B shapes; CPU arithmetic)."""
    sizes = [args.size, *args.probes]
    rows, suggestions = [], {}
    for free in args.planner_free:
        for quant in ("none", "float8", "4bit_ara"):
            for size in sizes:
                cfg = job_config(quant, size, args.experts, args.optimizer, low_vram=True, offload="auto",
                                 every=args.every, calibration=args.calibration)
                plan = estimate_peak_vram(cfg, A14B_CONFIG, int(free * GIB), device_type="cuda",
                                          side_models=NO_SIDE_MODELS)
                rows.append({"free_gib": free, "quant": quant, "size": "x".join(map(str, size)), **plan_row(plan)})
        key = f"{free:g}"
        default = job_config("none", args.size, args.experts, args.optimizer, low_vram=False, offload=0,
                             every=args.every)
        plan = estimate_peak_vram(default, A14B_CONFIG, int(free * GIB), device_type="cuda",
                                  side_models=NO_SIDE_MODELS)
        ada = estimate_peak_vram(default, A14B_CONFIG, int(free * GIB), device_type="cuda",
                                 side_models=NO_SIDE_MODELS, fp8_matmul=True)
        fp8 = job_config("float8", args.size, args.experts, args.optimizer, low_vram=True, offload=0,
                         every=args.every)
        fp8_plan = estimate_peak_vram(fp8, A14B_CONFIG, int(free * GIB), device_type="cuda",
                                      side_models=NO_SIDE_MODELS)
        suggestions[key] = {"default bf16 job": plan.suggestions,
                            "default bf16 job, card with fp8 matmuls (compute capability >= 8.9)": ada.suggestions,
                            "float8 + low_vram, offload_blocks 0": {**plan_row(fp8_plan),
                                                                    "suggestions": fp8_plan.suggestions}}
    return {
        "note": ("estimate_peak_vram(fp8_matmul=...) (plan_job passes supports_fp8_matmul(device)): on a card with fp8 "
                 "matmuls its advice leads with float8 + Low VRAM (+ the fewest streamed blocks that fit); without, "
                 "combined changes take 4bit_ara ('saves more') and float8 appears only as a single change."),
        "rows": rows,
        "suggestions": suggestions,
    }


def section_reference(b: Bench, args) -> dict:
    """bf16 experts resident, the planner's split for the whole card, eager: the losses everyone is compared with."""
    names = NAMES[: args.experts]
    models = {name: full_expert(b.device, seed=i, **args.overrides) for i, name in enumerate(names)}
    cfg = job_config("none", b.size, args.experts, args.optimizer, low_vram=False, offload=0, every=args.every)
    free = free_for_plan(b, list(models.values()))
    plan = estimate_peak_vram(cfg, b.arch, free, device_type=b.device, side_models=NO_SIDE_MODELS)
    blocks = BlockPlan(*plan.block_split, compile=False)
    optimizers, inits = {}, {}
    for i, (name, model) in enumerate(models.items()):
        attach_lora(model, cfg.lora)
        inits[name] = seeded_lora_init(model, i)
        install_block_plan(model, blocks)
        model.train()
        optimizers[name] = build_optimizer(lora_parameters(model), cfg.optimizer)
    reset_peak()
    out = train_steps(b, models.__getitem__, optimizers, names, args.steps, args.every, None)
    out.update(blocks=blocks.describe(), planned_gib=plan.phases["training"] / GIB,
               planner_free_gib=(free or 0) / GIB, lora_tensors=inits)
    return out


def build_capped_experts(b: Bench, args, cfg: JobConfig, blocks: BlockPlan, memory: ExpertMemory, names,
                         calibration=None) -> tuple[dict, dict, dict]:
    """Build, quantize, LoRA and park each expert in host memory (Low VRAM) before the next is built."""
    models, optimizers, info = {}, {}, {"quantize_s": {}, "adapters": {}, "lora_tensors": {}}
    for seed, name in enumerate(names):
        model = full_expert(b.device, seed=seed, **args.overrides)
        t0 = time.perf_counter()
        report = quantize_expert(model, cfg.quant, expert=name, cache_key="bench", device=b.device,
                                 calibration=calibration)
        sync()
        info["quantize_s"][name] = time.perf_counter() - t0
        info["adapters"][name] = report.summary()
        print(report.summary(), flush=True)
        attach_lora(model, cfg.lora)
        info["lora_tensors"][name] = seeded_lora_init(model, seed)
        install_block_plan(model, blocks)
        model.train()
        memory.place(name, model)
        memory.offload(name)  # to pinned host memory before the next expert is built
        models[name] = model
        optimizers[name] = build_optimizer(lora_parameters(model), cfg.optimizer)
    return models, optimizers, info


def capped_run(b: Bench, args, quant: str) -> dict:
    """Both experts quantized with ``quant``, Low VRAM, the planner's plan for ``--cap-gib`` free, under the cap."""
    names = NAMES[: args.experts]
    offload = args.fp8_offload if quant == "float8" else "auto"
    cfg = job_config(quant, b.size, args.experts, args.optimizer, low_vram=True, offload=offload, every=args.every,
                     calibration=args.calibration)
    cap = int(args.cap_gib * GIB) if b.cuda else None
    plan = estimate_peak_vram(cfg, b.arch, cap, device_type=b.device, side_models=NO_SIDE_MODELS)
    print(plan.summary(), flush=True)
    blocks = block_plan_for(cfg, plan, torch.device(b.device))
    if quant == "float8" and args.float8_blocks == "compiled":  # also where the trainer would not (the CPU)
        blocks = dataclasses.replace(blocks, compile=True, fallback=False)
    memory = ExpertMemory.for_plan(cfg.memory, plan, b.device)
    calibration = None
    if quant == "4bit_ara":
        calibration = calibration_batches(args.calibration, b.size[2], b.size[0], b.arch["text_dim"], b.device,
                                          torch.bfloat16)
    models, optimizers, info = build_capped_experts(b, args, cfg, blocks, memory, names, calibration)
    del calibration
    set_cap(args.cap_gib if b.cuda else None)
    reset_peak()
    try:
        out = train_steps(b, memory.model, optimizers, names, args.steps, args.every, memory)
    finally:
        set_cap(None)
    out.update(info, blocks=blocks.describe(), offload_blocks=plan.offload_blocks,
               planned_gib=plan.phases["training"] / GIB, plan_fits=plan.fits, cap_gib=args.cap_gib,
               host_gib=plan.host_bytes / GIB)
    return out


def _float8_expert(b: Bench, args, cfg: JobConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """One float8 expert (the high-noise seed) with the seeded LoRA, in training mode, and its optimizer."""
    model = full_expert(b.device, seed=0, **args.overrides)
    quantize_expert(model, cfg.quant, expert="high", cache_key="bench", device=b.device)
    attach_lora(model, cfg.lora)
    seeded_lora_init(model, 0)
    model.train()
    return model, build_optimizer(lora_parameters(model), cfg.optimizer)


def _capped_steps(pb: Bench, args, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: JobConfig,
                  plan, blocks: BlockPlan, steps: int, catch: type[BaseException]) -> dict:
    """``steps`` timed steps (the first untimed) of ``model`` on ``pb``'s data, placed as ``plan`` says and run as
    ``blocks`` say, under the cap: the timings, peaks and prefetch misses, or an error of type ``catch`` (a result,
    not a crash). The model is an ordinary model again afterwards (in host memory after Low VRAM, where the next
    placement takes it from)."""
    install_block_plan(model, blocks)
    memory = ExpertMemory.for_plan(cfg.memory, plan, pb.device)
    memory.place("high", model)

    def step(i: int) -> float:
        x0, noise, sig, text = pb.data(i)
        loss = micro_batch_loss(memory.model("high"), x0, noise, sig, text, "linear",
                                torch.bfloat16 if pb.cuda else None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    row: dict = {}
    set_cap(args.cap_gib if pb.cuda else None)
    reset_peak()
    try:
        row.update(timed(steps, 1, step))
    except catch as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    row.update(peak_gib=peak_gib(), reserved_peak_gib=reserved_peak_gib(),
               prefetch_misses=memory.experts["high"].misses() if memory.managed else 0)
    set_cap(None)
    optimizer.zero_grad(set_to_none=True)
    memory.close()
    gc.collect()
    return row


def section_probes(b: Bench, args) -> dict:
    """One float8 expert under the cap at each probe size, with that size's plan; OOM is recorded."""
    out: dict = {}
    base = job_config("float8", b.size, args.experts, args.optimizer, low_vram=True, offload="auto", every=args.every)
    model, optimizer = _float8_expert(b, args, base)
    for size in args.probes:
        key = "x".join(map(str, size))
        cfg = job_config("float8", size, args.experts, args.optimizer, low_vram=True, offload=args.fp8_offload,
                         every=args.every)
        plan = estimate_peak_vram(cfg, b.arch, int(args.cap_gib * GIB) if b.cuda else None, device_type=b.device,
                                  side_models=NO_SIDE_MODELS)
        blocks = block_plan_for(cfg, plan, torch.device(b.device))
        print(f"[probe {key}] {plan.summary()}", flush=True)
        row = {"plan": plan_row(plan), "blocks": blocks.describe(),
               **_capped_steps(Bench(b.device, b.arch, size), args, model, optimizer, cfg, plan, blocks,
                               args.probe_steps, torch.OutOfMemoryError)}
        out[key] = row
        print(f"[probe {key}] {({k: v for k, v in row.items() if k != 'losses'})}", flush=True)
    return out


def parse_variant(text: str) -> tuple[int, str, int]:
    """``'N:MODE[:P]'`` -> (offload_blocks N, ``eager`` or ``compiled``, prefetch P, default 1)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("eager", "compiled") or not parts[0].isdigit():
        raise ValueError(f"--sweep variant {text!r}: write OFFLOAD:eager|compiled[:PREFETCH], e.g. 12:compiled")
    return int(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else 1


def section_sweep(b: Bench, args) -> dict:
    """One float8 expert under the cap at the main size for each ``--sweep`` variant: that many streamed blocks
    (the planner picks the checkpointing split that fits them), blocks eager or compiled (streamed ones too), that
    prefetch depth. Maps speed against streaming and recompute for the block-plan choice; OOM is a result."""
    out: dict = {}
    base = job_config("float8", b.size, args.experts, args.optimizer, low_vram=True, offload=0, every=args.every)
    model, optimizer = _float8_expert(b, args, base)
    for text in args.sweep:
        offload, mode, prefetch = parse_variant(text)
        cfg = base.model_copy(update={"memory": base.memory.model_copy(update={"offload_blocks": offload,
                                                                                "prefetch": prefetch})})
        plan = estimate_peak_vram(cfg, b.arch, int(args.cap_gib * GIB) if b.cuda else None, device_type=b.device,
                                  side_models=NO_SIDE_MODELS)
        blocks = dataclasses.replace(block_plan_for(cfg, plan, torch.device(b.device)), compile=mode == "compiled",
                                     fallback=False)
        print(f"[sweep {text}] {plan.summary()}", flush=True)
        # any failure of a variant (OOM, a compile or recompute check) is a result: the next one runs
        row = {"plan": plan_row(plan), "blocks": blocks.describe(), "prefetch": prefetch,
               **_capped_steps(b, args, model, optimizer, cfg, plan, blocks, args.sweep_steps, Exception)}
        out[text] = row
        print(f"[sweep {text}] {({k: v for k, v in row.items() if k != 'losses'})}", flush=True)
    return {"variants": out}


def section_resident_ratio(b: Bench, args) -> dict:
    """perf_bench.run_low_vram: two float8 experts, Low VRAM switching every 10 against both resident (no cap)."""
    from benchmarks.perf_bench import quantize_float8, run_low_vram

    models = []
    for i in range(2):
        models.append(full_expert(b.device, seed=i, **args.overrides))
        quantize_float8(models[-1:])
    return run_low_vram(b, models, compile=b.cuda)


# --- the peer: kohya-ss/musubi-tuner ----------------------------------------------------------------------------


def _import_peer(path: Path):
    root = str(path.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    from accelerate import init_empty_weights
    from musubi_tuner.modules import fp8_optimization_utils as fp8u
    from musubi_tuner.modules.custom_offloading_utils import BlockSwapConfig
    from musubi_tuner.networks import lora_wan
    from musubi_tuner.wan.modules import model as wan_model

    return init_empty_weights, fp8u, BlockSwapConfig, lora_wan, wan_model


def _peer_dims(b: Bench) -> dict:
    """musubi's WanModel arguments for the bench's architecture (its t2v-A14B config at full size)."""
    a = b.arch
    return dict(model_type="t2v", model_version="2.2", patch_size=tuple(a["patch_size"]), text_len=512,
                in_dim=a["in_channels"], dim=a["num_attention_heads"] * a["attention_head_dim"], ffn_dim=a["ffn_dim"],
                freq_dim=a["freq_dim"], text_dim=a["text_dim"], out_dim=a["out_channels"],
                num_heads=a["num_attention_heads"], num_layers=a["num_layers"], window_size=(-1, -1), qk_norm=True,
                cross_attn_norm=a["cross_attn_norm"], eps=a["eps"], attn_mode="torch", split_attn=False)


def _peer_weights(b: Bench, peer, dims: dict) -> dict:
    """Random bf16 weights (as a bf16 checkpoint file holds them), built on the GPU, then musubi's own fp8 path;
    returned on the CPU, where musubi loads them when blocks are swapped. On the CPU (smoke run) the weights are
    fp32: its time embedding runs under autocast(float32), which the CPU does not support, so bf16 weights would
    meet fp32 inputs there."""
    _, fp8u, _, _, wan_model = peer
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if b.cuda else torch.float32)
    try:
        with torch.device(b.device):
            model = wan_model.WanModel(**dims)
    finally:
        torch.set_default_dtype(prev)
    sd = model.state_dict()
    del model
    clean = fp8u.clean_memory_on_device
    fp8u.clean_memory_on_device = lambda device: None  # gc + empty_cache per layer: setup time only
    try:
        fp8u.optimize_state_dict_with_fp8(sd, b.device, wan_model.FP8_OPTIMIZATION_TARGET_KEYS,
                                          wan_model.FP8_OPTIMIZATION_EXCLUDE_KEYS, move_to_device=True)
    finally:
        fp8u.clean_memory_on_device = clean
    for k in list(sd):
        sd[k] = sd[k].to("cpu")
    cleanup()
    return sd


def _peer_network(b: Bench, peer, dims: dict, sd: dict, mode: str, n_swap: int):
    """musubi's model on the fp8 weights with ``n_swap`` swapped blocks, its LoRA network and AdamW, set up as its
    training script does. Returns (model, network, optimizer)."""
    init_empty_weights, fp8u, BlockSwapConfig, lora_wan, wan_model = peer
    device = torch.device(b.device)
    with init_empty_weights():
        model = wan_model.WanModel(**dims)
    fp8u.apply_fp8_monkey_patch(model, sd, use_scaled_mm=False)
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    model.requires_grad_(False)
    if n_swap:
        config = BlockSwapConfig(device=device, supports_backward=True, use_pinned_memory=mode == "h2d",
                                 h2d_only=mode == "h2d", ring_size=2)
        model.enable_block_swap(n_swap, config)
        model.move_to_device_except_swap_blocks(device)
    else:
        model.to(device)
    network = lora_wan.create_arch_network(1.0, 16, 16.0, None, None, model)
    network.prepare_network(None)
    network.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    model.enable_gradient_checkpointing(False)
    network.enable_gradient_checkpointing()
    params, _ = network.prepare_optimizer_params(unet_lr=1e-4)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if n_swap:
        model.move_to_device_except_swap_blocks(device)
        model.prepare_block_swap_before_forward()
    network.to(device)
    model.train()
    network.prepare_grad_etc(model)
    network.on_epoch_start(model)
    return model, network, optimizer


def _peer_attempt(b: Bench, args, peer, dims: dict, sd: dict, mode: str, n_swap: int) -> dict:
    """Time musubi's training step under the cap with ``n_swap`` swapped blocks (an OOM propagates)."""
    t_setup = time.perf_counter()
    model, network, optimizer = _peer_network(b, peer, dims, sd, mode, n_swap)
    row: dict = {"mode": mode, "blocks_to_swap": n_swap, "lora_modules": len(network.unet_loras),
                 "setup_s": time.perf_counter() - t_setup}
    device = torch.device(b.device)

    def step(i: int) -> float:
        x0, noise, sig, text = b.data(i)
        noisy = ((1 - sig) * x0 + sig * noise).requires_grad_(True)  # network_dtype fp32, as musubi passes it
        context = [text[0].float().requires_grad_(True)]
        with torch.autocast(device.type, dtype=torch.bfloat16):  # accelerator.autocast(), mixed_precision bf16
            pred = model(noisy, t=sig * 1000.0, context=context, clip_fea=None, seq_len=b.tokens, y=None)
        pred = torch.stack(pred, dim=0)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)  # its default max_grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    set_cap(args.cap_gib if b.cuda else None)
    row["setup_gib"] = torch.cuda.memory_allocated() / GIB if b.cuda else float("nan")
    reset_peak()
    try:
        row.update(timed(args.peer_steps, 1, step))
        row.update(peak_gib=peak_gib(), reserved_peak_gib=reserved_peak_gib())
        print(f"[peer {mode}, blocks_to_swap {n_swap}] {row['s']:.3f} s/step, peak {row['peak_gib']:.2f} GiB",
              flush=True)
    finally:
        set_cap(None)
        offloader = getattr(model, "offloader", None)
        if offloader is not None:
            try:  # drain the copies in flight (after an OOM one may have failed: the OOM is what counts)
                offloader.set_forward_only(offloader.forward_only)
            except Exception as exc:  # noqa: BLE001
                row["drain_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        sync()
    return row


def section_peer(b: Bench, args) -> dict:
    """musubi-tuner's own Wan step with --fp8_base --fp8_scaled and block swap, under the same cap."""
    path = Path(args.peer)
    if not (path / "musubi_tuner" / "wan" / "modules" / "model.py").is_file():
        return {"skipped": f"no musubi-tuner copy under {path} (see the module docstring: fetch kohya-ss/musubi-tuner "
                           "and copy its src/musubi_tuner files there)"}
    peer = _import_peer(path)
    dims = _peer_dims(b)
    out: dict = {"provenance": (path / "PROVENANCE.txt").read_text().strip() if (path / "PROVENANCE.txt").is_file()
                 else None, "config": {k: v for k, v in dims.items() if k != "patch_size"},
                 "weight_dtype": str(torch.bfloat16 if b.cuda else torch.float32)}
    t0 = time.perf_counter()
    sd = _peer_weights(b, peer, dims)
    out["weights_s"] = time.perf_counter() - t0
    out["fp8_tensors"] = sum(1 for v in sd.values() if v.dtype == torch.float8_e4m3fn)
    modes = args.peer_modes if b.cuda else ["none"]
    for mode in modes:
        attempts = []
        for n_swap in (args.peer_swap if b.cuda else [0]):
            try:
                attempts.append(_peer_attempt(b, args, peer, dims, sd, mode, n_swap))
                break
            except torch.OutOfMemoryError as exc:
                attempts.append({"mode": mode, "blocks_to_swap": n_swap, "peak_gib": peak_gib(),
                                 "error": f"OutOfMemoryError: {str(exc)[:400]}"})
                print(f"[peer {mode}, blocks_to_swap {n_swap}] out of memory under the cap", flush=True)
            finally:
                cleanup()
        out[mode] = attempts
    done = [r for m in modes for r in out[m] if "s" in r]
    if done:
        best = min(done, key=lambda r: r["s"])
        out["best"] = {k: best[k] for k in ("mode", "blocks_to_swap", "s", "peak_gib")}
    return out


# --- driver -----------------------------------------------------------------------------------------------------


def summarize(results: dict) -> dict:
    s = results["sections"]
    ref = s.get("reference_bf16", {})
    summary: dict = {}
    for key in ("float8_low_vram", "nf4_ara_low_vram"):
        r = s.get(key, {})
        if r.get("losses") and "s_per_step" in r:
            summary[key] = {"s_per_step": r["s_per_step"], "s_per_step_without_switch": r["s_per_step_without_switch"],
                            "switch_overhead": r["switch_overhead"], "peak_gib": r["peak_gib"], "blocks": r["blocks"],
                            "offload_blocks": r["offload_blocks"], **parity(ref.get("losses", []), r["losses"])}
    if ref.get("losses") and "s_per_step" in ref:
        summary["reference_bf16"] = {"s_per_step": ref["s_per_step"], "peak_gib": ref["peak_gib"],
                                     "blocks": ref["blocks"]}
    f8, nf4 = summary.get("float8_low_vram"), summary.get("nf4_ara_low_vram")
    if f8 and nf4:
        summary["float8_speedup_vs_nf4"] = nf4["s_per_step_without_switch"] / f8["s_per_step_without_switch"]
    best = s.get("peer_musubi", {}).get("best")
    if best:
        summary["peer_best"] = best
        for key, r in (("float8", f8), ("nf4_ara", nf4)):
            if r:
                summary[f"peer_s_over_{key}_s"] = best["s"] / r["s_per_step_without_switch"]
    return summary


def table(results: dict) -> str:
    """A Markdown table of one result file (for the README)."""
    s = results["sections"]
    cap = results["args"]["cap_gib"]
    lines = ["| path (512²×33 unless noted) | s/step | without switch | peak GiB | blocks "
             "| loss vs bf16 (mean / max) |", "|---|---|---|---|---|---|"]
    labels = {"reference_bf16": "bf16, both experts resident (no cap)",
              "float8_low_vram": f"float8 + Low VRAM, cap {cap:g} GiB",
              "nf4_ara_low_vram": f"4bit_ara nf4 + Low VRAM, cap {cap:g} GiB"}
    ref = s.get("reference_bf16", {}).get("losses", [])
    for key, label in labels.items():
        r = s.get(key, {})
        if "s_per_step" not in r:
            continue
        p = parity(ref, r["losses"]) if key != "reference_bf16" else {}
        diff = f"{p['loss_rel_diff_mean']:.1e} / {p['loss_rel_diff_max']:.1e}" if p else ""
        blocks = r["blocks"] + (f", {r['offload_blocks']} offloaded" if r.get("offload_blocks") else "")
        lines.append(f"| {label} | {r['s_per_step']:.3f} | {r['s_per_step_without_switch']:.3f} | "
                     f"{r['peak_gib']:.2f} | {blocks} | {diff} |")
    for size, r in s.get("float8_probes", {}).items():
        if isinstance(r, dict) and ("s" in r or "error" in r):
            t = f"{r['s']:.3f}" if "s" in r else "out of memory"
            lines.append(f"| float8 + Low VRAM at {size}, cap {cap:g} GiB | {t} | | {r.get('peak_gib', 0):.2f} | "
                         f"{r['blocks']}, {r['plan']['offload_blocks']} offloaded | |")
    for variant, r in s.get("float8_sweep", {}).get("variants", {}).items():
        if isinstance(r, dict) and ("s" in r or "error" in r):
            t = f"{r['s']:.3f}" if "s" in r else r["error"].split(":")[0]
            lines.append(f"| float8 sweep {variant} (one expert), cap {cap:g} GiB | {t} | | {r.get('peak_gib', 0):.2f} | "
                         f"{r['blocks']}, {r['plan']['offload_blocks']} offloaded, prefetch {r['prefetch']}, "
                         f"{r.get('prefetch_misses', 0)} misses | |")
    peer = s.get("peer_musubi", {})
    for mode in ("classic", "h2d"):
        for r in peer.get(mode, []):
            if "s" in r:
                lines.append(f"| musubi-tuner fp8_scaled, {mode} block swap {r['blocks_to_swap']}, one expert, cap "
                             f"{cap:g} GiB | {r['s']:.3f} | | {r['peak_gib']:.2f} | per-block checkpointing | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with lists and sizes parsed; a malformed value is an argparse error (exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default=None, help="WxHxF of the main runs (default 512x512x33)")
    ap.add_argument("--steps", type=int, default=20, help="steps of the reference, float8 and nf4 runs")
    ap.add_argument("--every", type=int, default=10, help="switch experts every N steps")
    ap.add_argument("--experts", type=int, choices=(1, 2), default=2)
    ap.add_argument("--optimizer", default="adamw8bit", choices=("adamw", "adamw8bit"))
    ap.add_argument("--cap-gib", type=float, default=22.0)
    ap.add_argument("--calibration", type=int, default=4, help="calibration batches of the 4-bit adapters")
    ap.add_argument("--fp8-offload", default="auto", help="float8 offload_blocks: 'auto' (the planner) or a count")
    ap.add_argument("--float8-blocks", choices=("planner", "compiled"), default="planner",
                    help="float8 sections' blocks as the trainer runs them, or compiled even where the trainer "
                    "would not (the CPU)")
    ap.add_argument("--probe", action="append", help="WxHxF float8 probe size, repeatable "
                    "(default 768x768x33 and 512x512x81; 'none' for no probe)")
    ap.add_argument("--probe-steps", type=int, default=3, help="steps per probe (the first is not timed)")
    ap.add_argument("--sweep", default=None,
                    help="float8_sweep variants OFFLOAD:eager|compiled[:PREFETCH], comma-separated (default "
                    "7:eager,7:compiled,12:compiled,16:compiled,16:compiled:2,24:compiled; tiny 1:eager,1:compiled,0:compiled)")
    ap.add_argument("--sweep-steps", type=int, default=4, help="steps per sweep variant (the first is not timed)")
    ap.add_argument("--peer", default=".peer/musubi", help="folder holding musubi_tuner/ (kohya-ss/musubi-tuner)")
    ap.add_argument("--peer-swap", default="12,16,20,26",
                    help="blocks_to_swap values to try in order; the first that runs under the cap counts")
    ap.add_argument("--peer-modes", default="classic,h2d", help="musubi block-swap modes: classic, h2d")
    ap.add_argument("--peer-steps", type=int, default=4, help="peer steps per attempt (the first is not timed)")
    ap.add_argument("--planner-free", default="22,23.5,31", help="free GiB the planner section plans for")
    ap.add_argument("--only", help="comma-separated sections to run (default all but low_vram_vs_resident)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--resident-ratio", action="store_true", help="also run low_vram_vs_resident (about 90 s)")
    ap.add_argument("--deadline-s", type=float, default=530.0,
                    help="skip a section expected to end after this many seconds from the start (0: never skip)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    ap.add_argument("--report", help="print the Markdown table of a result JSON and exit")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.report:
        return args
    args.overrides = dict(TINY) if args.tiny else {}
    args.size = parse_size(args.size or ("32x32x5" if args.tiny else "512x512x33"))
    probes = args.probe or (["48x48x5"] if args.tiny else ["768x768x33", "512x512x81"])
    args.probes = [parse_size(p) for p in probes if p != "none"]
    sweep = args.sweep or ("1:eager,1:compiled,0:compiled" if args.tiny else
                           "7:eager,7:compiled,12:compiled,16:compiled,16:compiled:2,24:compiled")
    args.sweep = [v for v in sweep.split(",") if v]
    for variant in args.sweep:
        try:
            parse_variant(variant)
        except ValueError as exc:
            ap.error(str(exc))
    args.fp8_offload = args.fp8_offload if args.fp8_offload == "auto" else int(args.fp8_offload)
    args.peer_swap = [int(v) for v in args.peer_swap.split(",") if v]
    args.peer_modes = [m for m in args.peer_modes.split(",") if m]
    args.planner_free = [float(v) for v in args.planner_free.split(",") if v]
    wanted = args.only.split(",") if args.only else [s for s in SECTIONS if s != "low_vram_vs_resident"]
    if args.resident_ratio and "low_vram_vs_resident" not in wanted:
        wanted.append("low_vram_vs_resident")
    wanted = [s for s in wanted if s not in args.skip.split(",")]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)} - use {', '.join(SECTIONS)}")
    args.wanted = wanted
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        text = table(json.loads(Path(args.report).read_text()))
        print(text)
        return {"table": text}
    start = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    wanted = args.wanted
    arch = {**A14B_CONFIG, **args.overrides}
    b = Bench(device, arch, args.size)
    cuda = device == "cuda"
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "fp8_matmul": supports_fp8_matmul(device),
        "torch": torch.__version__,
        "triton": importlib.util.find_spec("triton") is not None,
        "args": {k: v for k, v in vars(args).items() if k not in ("overrides", "report", "wanted")},
        "size": "x".join(map(str, args.size)),
        "tokens": b.tokens,
        "sections": {},
    }
    if cuda:
        results["expandable_segments"] = use_expandable_segments()  # as the trainer does
    out_path = Path(args.out, "tier24_bench.json")

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - start
        results["summary"] = summarize(results)
        out_path.write_text(json.dumps(results, indent=1, default=str))

    runners = {
        "planner": lambda: section_planner(args),
        "reference_bf16": lambda: section_reference(b, args),
        "float8_low_vram": lambda: capped_run(b, args, "float8"),
        "peer_musubi": lambda: section_peer(b, args),
        "nf4_ara_low_vram": lambda: capped_run(b, args, "4bit_ara"),
        "float8_probes": lambda: section_probes(b, args),
        "float8_sweep": lambda: section_sweep(b, args),
        "low_vram_vs_resident": lambda: section_resident_ratio(b, args),
    }
    print(f"{results['device']} (capability {results['capability']}, fp8 matmul {results['fp8_matmul']}), "
          f"torch {torch.__version__}, sections {wanted}", flush=True)
    for name in SECTIONS:
        if name not in wanted:
            continue
        elapsed = time.perf_counter() - start
        expected = 0 if args.tiny else EXPECTED_S[name]
        if args.deadline_s and elapsed + expected > args.deadline_s:
            results["sections"][name] = {"skipped": f"time: at {elapsed:.0f} s, expected to take {expected} s, "
                                                    f"past --deadline-s {args.deadline_s:g}"}
            save()
            continue
        print(f"=== {name} (at {elapsed:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            section = runners[name]()
        except Exception as exc:  # one failing section must not cost the others
            section = {"error": f"{type(exc).__name__}: {str(exc)[:1500]}", "traceback": traceback.format_exc()[-4000:]}
            print(section["traceback"], flush=True)
        section["section_s"] = time.perf_counter() - t0
        results["sections"][name] = section
        cleanup()
        save()
        brief = {k: v for k, v in section.items() if k not in ("losses", "step_s", "rows", "traceback")}
        print(f"=== {name} done in {section['section_s']:.1f} s: {json.dumps(brief, default=str)[:1500]}", flush=True)
    save()
    print(json.dumps(results["summary"], indent=1), flush=True)
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
