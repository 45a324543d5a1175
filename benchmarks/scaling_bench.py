"""Multi-GPU scaling: training steps on N GPUs against one GPU, launched with torchrun.

    torchrun --nproc_per_node=1 benchmarks/scaling_bench.py --size 512x512x33 --out w1.json
    torchrun --nproc_per_node=2 benchmarks/scaling_bench.py --size 512x512x33 --out w2.json [--shard]
    torchrun --nproc_per_node=1 benchmarks/scaling_bench.py --size 512x512x33 --experts 2 --out w1e2.json
    torchrun --nproc_per_node=2 benchmarks/scaling_bench.py --size 512x512x33 --expert-groups --out w2g.json
    python benchmarks/scaling_bench.py --report w1.json w2.json w1e2.json w2g.json
    torchrun --nproc_per_node=2 benchmarks/scaling_bench.py --tiny --out w2.json      # CPU (gloo) smoke run

Every rank builds the same full-size random-weight expert on its GPU (``--shard``: then FSDP2-shards its frozen
weights as ``distributed.shard_experts`` does), attaches the trainer's LoRA, uses the block plan the VRAM planner
picks for its card and trains with the trainer's step: one sample per rank per step (global batch = N), the LoRA
gradients summed with the trainer's coalesced all-reduce, AdamW, a host sync for the loss. ``--experts 2``: one GPU
holds both experts and alternates them every step (the resident H100/H200 recipe); ``--expert-groups``: half the
ranks hold the high-noise expert, half the low-noise one, each group data-parallel, both training at once with the
trainer's per-round exchange between the groups (``distributed.expert_groups``). Reported by rank 0: seconds per
step and samples per second; ``--report`` gives the scaling efficiency ``samples/s(N) / (N * samples/s(1))``
against the one-GPU run of the same size and precision with the same experts (rows grouped by size; a
``perf_bench.py`` result passed along serves as a missing one-GPU run, other files are skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import A14B_CONFIG, TINY, full_expert, peak_gib, reset_peak, sync  # noqa: E402
from benchmarks.perf_bench import Bench, quantize_float8  # noqa: E402
from trainer_core.config import LoraConfig, OptimizerConfig  # noqa: E402
from trainer_core.lora import attach_lora, lora_parameters  # noqa: E402
from trainer_core.memory import BlockPlan, install_block_plan  # noqa: E402
from trainer_core.memory.allocator import use_expandable_segments  # noqa: E402
from trainer_core.train.distributed import expert_groups, init_distributed, shard_frozen_weights  # noqa: E402
from trainer_core.train.optim import build_optimizer  # noqa: E402
from trainer_core.train.step import micro_batch_loss  # noqa: E402


def run(args) -> dict:
    """This rank's part of the benchmark; rank 0 returns (and writes) the figures."""
    device_setting = "cpu" if args.tiny else "cuda"
    ctx = init_distributed(device_setting)
    device = torch.device("cuda", ctx.local_rank) if device_setting == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        use_expandable_segments()
    overrides = dict(TINY) if args.tiny else {}
    arch = {**A14B_CONFIG, **overrides}
    w, h, f = (int(v) for v in args.size.split("x"))
    b = Bench(device.type, arch, (w, h, f))
    data_ctx = ctx
    if args.expert_groups:  # this rank holds one expert; its group shares the batches
        groups = expert_groups(ctx, ["high", "low"])
        data_ctx, held = groups.data, [("high", "low").index(groups.expert)]
    else:
        held = list(range(args.experts))
    models = [full_expert(str(device), seed=i, **overrides) for i in held]  # the same weights on every rank
    quant = "none"
    if args.fp8:
        quantize_float8(models)
        quant = "float8"
    if b.cuda:
        torch.cuda.empty_cache()  # the bf16 weights float8 replaced: free for the plan, as before loading
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device) if b.cuda else None
    plan = b.plan("auto", quant, len(models), free)  # (a sharded run keeps this plan: its weights take less)
    compiled = b.cuda and not args.shard and not args.no_compile
    optimizers = []
    for model in models:
        attach_lora(model, LoraConfig(rank=16))
        install_block_plan(model, BlockPlan(*plan.block_split, compile=compiled))
        if args.shard and ctx.active:
            shard_frozen_weights(model, ctx, device)
        model.train()
        optimizers.append(build_optimizer(lora_parameters(model), OptimizerConfig(name="adamw", lr=1e-4)))
    autocast = torch.bfloat16 if b.cuda else None

    def step(i: int) -> float:
        k = i % len(models)  # one GPU with both experts: they alternate, as with switch_every 1
        model, optimizer = models[k], optimizers[k]
        x0, noise, sig, text = b.data(i * data_ctx.world + data_ctx.rank)  # each rank of a group its own sample
        loss = micro_batch_loss(model, x0, noise, sig, text, "linear", autocast)
        (loss / data_ctx.world).backward()
        data_ctx.all_reduce_grads(lora_parameters(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logged = data_ctx.sum(loss.item() / data_ctx.world)
        if args.expert_groups:  # the trainer's per-round exchange between the groups (losses, lr, stop)
            shared = [0.0, 0.0, 0.0]
            if data_ctx.is_main:
                shared[held[0]] = logged
            high, low, _ = ctx.sums(shared)
            logged = (high + low) / 2  # the round's mean loss
        return logged

    for i in range(args.warmup):
        step(i)
    sync()
    ctx.barrier()
    reset_peak()
    t0 = time.perf_counter()
    losses = [step(args.warmup + i) for i in range(args.steps)]
    sync()
    ctx.barrier()
    seconds = (time.perf_counter() - t0) / args.steps
    result = {
        "world": ctx.world, "size": args.size, "shard": args.shard, "fp8": args.fp8, "compiled": compiled,
        "experts": 2 if args.expert_groups else args.experts, "expert_groups": args.expert_groups,
        "blocks": BlockPlan(*plan.block_split).describe(), "s_per_step": seconds,
        "samples_per_s": ctx.world / seconds, "peak_gib_rank0": peak_gib(), "losses": losses,
        "device": torch.cuda.get_device_name(device) if b.cuda else "cpu",
    }
    if ctx.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    if ctx.active:
        torch.distributed.destroy_process_group()
    return result


def _pixels(size: str) -> int:
    try:
        w, h, f = (int(v) for v in size.split("x"))
    except ValueError:
        return 0
    return w * h * f


def _perf_baselines(data: dict) -> list[dict]:
    """One-GPU rows from a ``perf_bench.py`` result: its trainer fast paths (``bf16 fast path``, ``fp8 fast path``)
    train ``args.experts`` experts on one GPU as this benchmark's one-GPU run does (both alternating for 2)."""
    experts = data.get("args", {}).get("experts", 1)
    rows = []
    for res in data.get("sizes", []):
        for label, fp8 in (("bf16 fast path", False), ("fp8 fast path", True)):
            r = res.get(label)
            if not isinstance(r, dict) or not r.get("s"):
                continue
            blocks = r.get("blocks", "")
            rows.append({"world": 1, "size": res["size"], "shard": False, "fp8": fp8,
                         "compiled": "compiled" in blocks and "not compiled" not in blocks,
                         "experts": experts, "expert_groups": False, "blocks": blocks, "s_per_step": r["s"],
                         "samples_per_s": 1.0 / r["s"], "peak_gib_rank0": r.get("peak_gib", float("nan")),
                         "source": "perf_bench.py"})
    return rows


def _key(r: dict) -> tuple:
    """What a run is measured against: the one-GPU run of the same size, precision and number of experts."""
    return r["size"], bool(r.get("fp8")), r.get("experts", 1)


def _order(r: dict) -> tuple:
    return (_pixels(r["size"]), r["size"], bool(r.get("fp8")), r.get("experts", 1), r["world"], r.get("shard", False),
            r.get("expert_groups", False))


def report(paths: list[str]) -> list[dict]:
    """Scaling efficiency of each run against the one-GPU run of the same size and precision with the same number of
    experts among ``paths``: ``samples/s(N) / (N * samples/s(1))`` (with expert groups the one-GPU run holds both
    experts, alternating). A ``perf_bench.py`` result serves as that one-GPU run where ``paths`` hold no
    ``scaling_bench.py`` one for it (its fast-path step time); any other file is skipped with a line saying so."""
    runs, borrowed = [], []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"skipped {p}: not readable as JSON ({e.__class__.__name__})")
            continue
        if isinstance(data, dict) and all(k in data for k in ("world", "size", "s_per_step", "samples_per_s")):
            runs.append(data)
        elif isinstance(data, dict) and "sizes" in data and _perf_baselines(data):
            borrowed.append((p, _perf_baselines(data)))
        else:
            print(f"skipped {p}: not a scaling_bench.py result")
    base = {_key(r): r for r in runs if r["world"] == 1}
    for p, rows in borrowed:
        used = [r for r in rows if _key(r) not in base]
        for r in used:
            base[_key(r)] = r
            runs.append(r)
        if used:
            names = ", ".join(f"{r['size']} {'float8' if r['fp8'] else 'bf16'} {r['experts']} expert(s)" for r in used)
            print(f"one-GPU baseline from {p} (perf_bench.py): {names}")
        else:
            print(f"skipped {p}: a perf_bench.py result whose runs have one-GPU scaling results already")
    rows = []
    print("| size | GPUs | experts | placement | s/step | samples/s | efficiency | peak GiB (rank 0) | blocks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=_order):
        experts, b = r.get("experts", 1), base.get(_key(r))
        eff = r["samples_per_s"] / (r["world"] * b["samples_per_s"]) if b is not None else float("nan")
        placement = ("expert groups" if r.get("expert_groups") else "sharded" if r.get("shard")
                     else "data parallel" if r["world"] > 1 else "—")
        if r.get("source"):
            placement += f" ({r['source']})"
        size = f"{r['size']}, {'float8' if r.get('fp8') else 'bf16'}"
        rows.append({**r, "efficiency": eff})
        print(f"| {size} | {r['world']} | {experts} | {placement} | {r['s_per_step']:.3f} | {r['samples_per_s']:.3f} "
              f"| {'no one-GPU run' if b is None else f'{eff:.0%}'} | {r['peak_gib_rank0']:.1f} | {r['blocks']} |")
    return rows


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="512x512x33")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shard", action="store_true", help="FSDP2-shard the frozen weights (distributed.shard_experts)")
    ap.add_argument("--fp8", action="store_true", help="float8 experts")
    ap.add_argument("--experts", type=int, choices=(1, 2), default=1,
                    help="experts on each GPU (2: both resident, alternating every step)")
    ap.add_argument("--expert-groups", action="store_true",
                    help="half the ranks train the high-noise expert, half the low-noise one (expert_groups)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU (gloo) smoke run with tiny shapes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="+", help="JSON files of the runs: print the scaling table")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.tiny:
        args.size = "32x32x5" if args.size == "512x512x33" else args.size
    if args.fp8 and args.shard:
        ap.error("--shard needs bf16 experts (quantized weights cannot be sharded)")
    if args.expert_groups and (args.shard or args.experts != 1):
        ap.error("--expert-groups holds one expert per rank: drop --shard / --experts")
    return run(args)


if __name__ == "__main__":
    main()
