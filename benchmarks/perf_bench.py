"""Training speed on the GPU: the plain diffusers + peft loop against the trainer's fast path, in the same run.

    python benchmarks/perf_bench.py --size 512x512x33 --levers --parity 20 --low-vram --dop   # one call
    python benchmarks/perf_bench.py --size 768x768x41 --eager-full --steps 3
    python benchmarks/perf_bench.py --size 1024x1024x81 --experts 2 --fp8-first --no-bf16 --steps 2 --plain-steps 1
    python benchmarks/perf_bench.py --size 1024x1024x81 --experts 2 --no-fp8 --steps 2 --plain-steps 0
    python benchmarks/perf_bench.py --experts 2 --no-bf16 --mix 672x384x33 --compile-dynamic both  # two buckets
    python benchmarks/perf_bench.py --tiny                                                    # CPU smoke run

Each call should fit the GPU tool's 10-minute limit: at 1024x1024x81 a plain step takes about 64 s (H200), a float8
fast step 41-43 s and a bf16 one 56 s, plus 30-40 s of compilation: run float8 and bf16 in separate calls (about
6 minutes each; on a 2-GPU machine side by side, one per GPU).

Full-size Wan 2.2 A14B experts with random bf16 weights are built directly on the GPU (times and memory are real,
image quality is not). Every run trains rank-16 LoRAs on the default targets with AdamW (lr 1e-4, no clipping) on
the same seeded stream of latents, noise, noise levels and text embeddings:

* ``plain``: what a user writes (and ai-toolkit's Wan path amounts to): diffusers ``WanTransformer3DModel`` bf16,
  peft LoRA in bf16, ``enable_gradient_checkpointing()``, default SDPA, torch AdamW, one expert;
* the trainer's own step (``trainer_core.train.step.train_step``, the function the training loop runs: the job's
  objective with fp32 LoRA under bf16 autocast and peft's input cast off, the loss's host sync, the gradient norm
  and the finite-gradient check before the optimizer step), with the block plan the VRAM planner picks for the card
  (``gradient_checkpointing: auto``) and ``torch.compile``; ``bf16`` keeps the weights, ``fp8`` quantizes them to
  float8 (``quant.transformer: float8``: fp8 matmuls forward and, with ``fp8_backward``, backward).

With ``--levers`` the trainer's step is also timed with one lever added at a time (eager full checkpointing,
selective, the planner's split, compile, fp8 forward, fp8 backward). ``--parity N``: the first N losses of the fast
paths against the plain loop (same data, same LoRA initialisation). ``--experts 2``: the fast paths train both
experts resident, switching every step. ``--low-vram``: 20 steps with both experts and low VRAM (switch every 10)
against 20 resident steps. ``--dop``: a step with Differential Output Preservation against one without.
``--mix WxHxF``: the fast paths' steps alternate between ``--size`` and this second bucket, as a job whose clips
fall into two buckets does (each expert sees both shapes before the timing starts); ``--compile-dynamic`` then picks
torch.compile's handling of the second shape: ``auto`` (torch's automatic dynamic shapes, as the trainer compiles:
one graph with symbolic sizes from the second shape on), ``static`` (one graph per shape) or ``both``.

MFU counts model FLOPs (forward + activation-gradient backward of the linears and attention, recompute not counted)
against the bf16 matmul rate measured at the start of the run.
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
    A14B_CONFIG,
    NO_SIDE_MODELS,
    TINY,
    full_expert,
    latent_shape,
    matmul_ceiling_tflops,
    peak_gib,
    reset_peak,
    sync,
    tokens,
)
from trainer_core.config import JobConfig, LoraConfig, QuantConfig  # noqa: E402
from trainer_core.lora import attach_lora, detach_lora, lora_parameters  # noqa: E402
from trainer_core.memory import BlockPlan, ExpertMemory, install_block_plan  # noqa: E402
from trainer_core.memory.allocator import use_expandable_segments  # noqa: E402
from trainer_core.memory.planner import estimate_peak_vram  # noqa: E402
from trainer_core.quant.apply import quantize_expert  # noqa: E402
from trainer_core.train.distributed import DistContext  # noqa: E402
from trainer_core.train.experts import Expert  # noqa: E402
from trainer_core.train.objective import MicroBatch, Objective  # noqa: E402
from trainer_core.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from trainer_core.train.placement import Placement  # noqa: E402
from trainer_core.train.step import train_step  # noqa: E402

GIB = 2**30
TEXT_TOKENS = 512
#: ``--compile-dynamic``: the float8 fast path's runs as (label suffix, ``BlockPlan.compile_dynamic``)
DYNAMIC = {"auto": [("", None)], "static": [(", static shapes", False)],
           "both": [("", None), (", static shapes", False)]}
PLAIN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]


class Bench:
    """Device, model shape and the seeded data stream shared by every run."""

    def __init__(self, device: str, arch: dict, size: tuple[int, int, int], mix: tuple[int, int, int] | None = None):
        self.device, self.arch, self.size = device, arch, size
        self.shapes = [latent_shape(*s) for s in (size, mix) if s is not None]
        self.tokens = tokens(*size)
        self.cuda = device == "cuda"

    def data(self, i: int) -> tuple[torch.Tensor, ...]:
        """Step ``i``'s clean latents, noise, noise level and text embedding (identical for every run). With a second
        bucket, steps 2k and 2k+1 (one per expert when both train) take shape ``k % 2``."""
        gen = torch.Generator(self.device).manual_seed(1000 + i)
        shape = self.shapes[(i // 2) % len(self.shapes)]
        x0 = torch.randn(shape, generator=gen, device=self.device)
        noise = torch.randn(shape, generator=gen, device=self.device)
        sigma = torch.rand(1, generator=gen, device=self.device) * 0.9 + 0.05
        text = torch.randn(1, TEXT_TOKENS, self.arch["text_dim"], generator=gen, device=self.device)
        return x0, noise, sigma, text.to(torch.bfloat16)

    def model_flops(self, model: torch.nn.Module) -> float:
        """Forward + activation-gradient backward FLOPs of one step (3x the forward's)."""
        n = self.tokens
        linear = sum(m.in_features * m.out_features for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
        dim = self.arch["num_attention_heads"] * self.arch["attention_head_dim"]
        attn = (4 * n * n * dim + 4 * n * TEXT_TOKENS * dim) * self.arch["num_layers"]
        return 3 * (2 * linear * n + attn)

    def plan(self, policy: str, quant: str, experts: int, free: int | None, dop: bool = False, low_vram: bool = False):
        """The VRAM planner's plan for this run's settings (no VAE or text encoder in this benchmark)."""
        cfg = self.job(policy, quant, experts, dop, low_vram)
        return estimate_peak_vram(cfg, self.arch, free, device_type=self.device, side_models=NO_SIDE_MODELS)

    def job(self, policy: str, quant: str, experts: int, dop: bool = False, low_vram: bool = False) -> JobConfig:
        """The job these settings stand for: rank-16 LoRA, AdamW at lr 1e-4 without clipping, linear timesteps."""
        w, h, f = self.size
        return JobConfig.model_validate(
            {
                "model": {"source": "bench"},
                "lora": {"rank": 16},
                "optimizer": {"name": "adamw", "lr": 1e-4, "max_grad_norm": 0},
                "train": {"gradient_checkpointing": policy, "timestep_type": "linear"},
                "quant": {"transformer": quant},
                "multistage": {"train_low_noise": experts == 2},
                "datasets": [{"folder": "bench", "resolutions": [max(w, h)], "num_frames": f}],
                "memory": {"headroom_gib": 1.0, "low_vram": low_vram},
                "advanced": {"dop": dop},
                "trigger_word": "sks" if dop else None,
            }
        )

    def step_fn(self, cfg: JobConfig, experts: list[Expert]):
        """``step(i)``: the trainer's :func:`train_step` on step ``i``'s data for expert ``i % len(experts)``, as the
        training loop calls it (one process, one micro-batch of the caption ``sks``; with DOP its preservation prompt,
        the class word, gets an embedding of its own)."""
        texts: dict[str, torch.Tensor] = {}
        objective = Objective(cfg, torch.bfloat16 if self.cuda else None, lambda captions: torch.cat(
            [texts[c] for c in captions]), collective=False)
        placement = Placement(cfg, DistContext())

        def step(i: int) -> float:
            x0, noise, sig, text = self.data(i)
            texts.setdefault(cfg.advanced.dop_class, torch.randn_like(text))
            texts["sks"] = text
            micro = MicroBatch(x0, noise, sig, ["sks"])
            return train_step(experts[i % len(experts)], [micro], objective, placement, cfg.optimizer.max_grad_norm)

        return step


def _on_device_bytes(models: list[torch.nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers()) if t.is_cuda)


def free_for_plan(b: Bench, models: list[torch.nn.Module]) -> int | None:
    """Free memory as the planner would see it before these experts were loaded."""
    if not b.cuda:
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0] + _on_device_bytes(models)


def timed(n: int, warmup: int, step) -> dict:
    """Run ``step(i)`` for i < n; seconds per step after ``warmup`` steps, the losses, and the first step's time."""
    losses, times = [], []
    for i in range(n):
        sync()
        t0 = time.perf_counter()
        losses.append(step(i))
        sync()
        times.append(time.perf_counter() - t0)
    measured = times[warmup:] or times
    return {"s": sum(measured) / len(measured), "first_s": times[0], "losses": losses, "steps_timed": len(measured)}


def run_plain(b: Bench, model: torch.nn.Module, n: int, warmup: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The plain diffusers + peft loop; also returns its initial lora_A weights (under the trainer's names)."""
    from peft import LoraConfig as PeftLoraConfig

    model.add_adapter(PeftLoraConfig(r=16, lora_alpha=16, target_modules=PLAIN_TARGETS), "plain")
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    init = {name.replace(".plain.", ".default."): p.detach().clone() for name, p in model.named_parameters()
            if ".lora_A.plain." in name}
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(i: int) -> float:
        x0, noise, sig, text = b.data(i)
        pred = model(hidden_states=((1 - sig) * x0 + sig * noise).bfloat16(), timestep=sig * 1000,
                     encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    reset_peak()
    out = timed(n, warmup, step)
    out["peak_gib"] = peak_gib()
    strip(model)
    return out, init


def run_trainer(
    b: Bench,
    models: list[torch.nn.Module],
    *,
    quant: str,
    policy: str,
    compile: bool,
    n: int,
    warmup: int,
    init: dict[str, torch.Tensor] | None = None,
    dop: bool = False,
    dynamic: bool | None = None,
) -> dict:
    """The trainer's step on ``models`` (switching every step), with the planner's block plan for ``policy``."""
    free = free_for_plan(b, models)
    plan = b.plan("auto" if policy == "mixed" else policy, quant, len(models), free, dop=dop)
    off, selective, full = plan.block_split
    if policy == "mixed":  # a quick check of both fast policies in one model
        layers = len(models[0].blocks)
        off, selective, full = layers // 2, layers - layers // 2, 0
    blocks = BlockPlan(off=off, selective=selective, full=full, compile=compile, compile_dynamic=dynamic)
    cfg = b.job(policy, quant, len(models), dop)
    experts = []
    for name, model in zip(("high", "low"), models):
        attach_lora(model, LoraConfig(rank=16))
        if init is not None:
            for pname, p in model.named_parameters():
                if pname in init:
                    p.data.copy_(init[pname].float())
        install_block_plan(model, blocks)
        model.train()
        experts.append(_expert(name, model, cfg, n))

    reset_peak()
    out = timed(n, warmup, b.step_fn(cfg, experts))
    out.update(peak_gib=peak_gib(), planned_gib=plan.phases["training"] / GIB, blocks=blocks.describe(),
               planner_free_gib=(free or 0) / GIB)
    for model in models:
        strip(model)
    return out


def _expert(name: str, model: torch.nn.Module, cfg: JobConfig, steps: int) -> Expert:
    """``model`` as the trainer holds an expert: its LoRA's optimizer and LR schedule from ``cfg``."""
    optimizer = build_optimizer(lora_parameters(model), cfg.optimizer)
    return Expert(name, model, optimizer, build_lr_scheduler(optimizer, cfg.optimizer, steps))


def strip(model: torch.nn.Module) -> None:
    """Remove the LoRA layers (back to the bare, possibly quantized, Linears) and the block plan."""
    detach_lora(model)
    model.disable_gradient_checkpointing()


def quantize_float8(models: list[torch.nn.Module], fp8_backward: bool = True) -> float:
    """Quantize every expert's block Linears to float8 in place; seconds per expert."""
    t0 = time.perf_counter()
    for i, model in enumerate(models):
        quantize_expert(model, QuantConfig(transformer="float8", fp8_backward=fp8_backward),
                        expert=("high", "low")[i], cache_key="bench", device=model.device)
    return (time.perf_counter() - t0) / len(models)


def set_fp8_backward(models: list[torch.nn.Module], on: bool) -> None:
    for model in models:
        for m in model.modules():
            if hasattr(m, "fp8_backward"):
                m.fp8_backward = on


def run_low_vram(b: Bench, models: list[torch.nn.Module], compile: bool, steps: int = 20, every: int = 10) -> dict:
    """Both experts, switching every ``every`` steps: low VRAM (one expert on the GPU) against both resident."""
    out = {}
    for low_vram in (False, True):
        free = free_for_plan(b, models)
        plan = b.plan("auto", "float8", 2, free, low_vram=low_vram)
        blocks = BlockPlan(*plan.block_split, compile=compile)
        memory = ExpertMemory(b.device, low_vram=low_vram, offload_blocks=0)
        cfg = b.job("auto", "float8", 2, low_vram=low_vram)
        experts = {}
        for name, model in zip(("high", "low"), models):
            attach_lora(model, LoraConfig(rank=16))
            install_block_plan(model, blocks)
            model.train()
            memory.place(name, model)
            experts[name] = _expert(name, model, cfg, steps + 2)
        train = {name: b.step_fn(cfg, [ex]) for name, ex in experts.items()}
        if low_vram:
            memory.offload("low")
        switches = []

        def step(i: int) -> float:
            name = ("high", "low")[(i // every) % 2]
            record = memory.activate(name)
            if record is not None:
                switches.append(record)
            upcoming = ("high", "low")[((i + 1) // every) % 2]
            if upcoming != name and low_vram:
                memory.prefetch(upcoming)
            experts[name].model = memory.model(name)
            return train[name](i)

        timed(2, 0, step)  # warm-up: compiled graphs (shared by both experts), optimizer state
        switches.clear()
        reset_peak()
        r = timed(steps, 0, step)
        key = "low_vram" if low_vram else "resident"
        out[key] = {"s": r["s"], "peak_gib": peak_gib(), "planned_gib": plan.phases["training"] / GIB,
                    "blocks": blocks.describe(),
                    "switch_copy_s": [s.copy_seconds() for s in switches]}
        memory.close()
        for model in models:
            strip(model)
    out["ratio"] = out["low_vram"]["s"] / out["resident"]["s"]
    return out


def parity(reference: list[float], losses: list[float]) -> float:
    """Largest relative difference of the losses over the steps both runs have."""
    return max(abs(a - r) / abs(r) for a, r in zip(losses, reference))


def _report(res: dict, label: str, r: dict, save) -> None:
    res[label] = r
    planned = f" (planned {r['planned_gib']:.1f})" if "planned_gib" in r else ""
    print(f"[{res['size']}] {label}: {r['s']:.3f} s/step, peak {r['peak_gib']:.1f} GiB{planned}, "
          f"{r.get('blocks', '')}", flush=True)
    save(res)


def bench_size(b: Bench, args, ceiling: float, save) -> dict:
    """Every run at one size; ``save(res)`` is called after each (partial results survive a time limit)."""
    res: dict = {"size": "x".join(map(str, b.size)), "tokens": b.tokens}
    experts = lambda: [full_expert(b.device, seed=i, **args.overrides) for i in range(args.experts)]  # noqa: E731
    models = experts()
    high = models[0]
    flops = b.model_flops(high)
    res["model_tflop_per_step"] = flops / 1e12
    n_plain = max(args.parity, (args.steps if args.plain_steps is None else args.plain_steps) + 1)
    plain, init = run_plain(b, high, n_plain, warmup=1)
    _report(res, "plain", plain, save)
    # with a second bucket the timing starts once every expert has run both shapes (their compiles done)
    warmup = 2 * len(b.shapes) if len(b.shapes) > 1 else 1
    n_fast = max(args.parity, args.steps + warmup)
    fast = dict(policy=args.fast_policy, compile=args.compile, warmup=warmup, init=init if len(models) == 1 else None)

    def bf16_runs() -> None:
        runs: list[tuple[str, dict]] = []
        if args.levers or args.eager_full:
            runs.append(("eager, full checkpointing", dict(policy="full", compile=False)))
        if args.levers:
            runs.append(("eager, selective checkpointing", dict(policy="selective", compile=False)))
            runs.append(("eager, planner's split", dict(policy="auto", compile=False)))
        for label, kw in runs:
            r = run_trainer(b, [high], quant="none", n=args.steps + 1, warmup=1, init=init, **kw)
            _report(res, label, r, save)
        _report(res, "bf16 fast path", run_trainer(b, models, quant="none", n=n_fast, **fast), save)

    def fp8_runs() -> None:
        res["float8_quantize_s_per_expert"] = quantize_float8(models)
        if args.levers:
            set_fp8_backward(models, False)
            r = run_trainer(b, [high], quant="float8", n=args.steps + 1, **{**fast, "init": init})
            _report(res, "fp8 forward only", r, save)
            set_fp8_backward(models, True)
        for label, dynamic in DYNAMIC[args.compile_dynamic]:
            r = run_trainer(b, models, quant="float8", n=n_fast, dynamic=dynamic, **fast)
            _report(res, f"fp8 fast path{label}", r, save)

    if args.fp8_first:  # the float8 runs first; then fresh bf16 experts (same seeds)
        if args.fp8:
            fp8_runs()
        if args.bf16:
            models.clear()
            reset_peak()
            models.extend(experts())
            high = models[0]
            bf16_runs()
    else:
        if args.bf16:
            bf16_runs()
        if args.fp8:
            fp8_runs()
    for key, r in res.items():
        if isinstance(r, dict) and "s" in r:
            r["speedup"] = plain["s"] / r["s"]
            r["mfu"] = flops / r["s"] / 1e12 / ceiling
            if key != "plain" and (len(models) == 1 or key.startswith("eager")):
                r["loss_rel_diff_vs_plain"] = parity(plain["losses"], r["losses"])
    save(res)
    if args.dop:
        base = run_trainer(b, [high], quant="float8", n=args.steps + 2, **{**fast, "init": None, "warmup": 2})
        with_dop = run_trainer(b, [high], quant="float8", n=args.steps + 2, dop=True,
                               **{**fast, "init": None, "warmup": 2})
        res["dop"] = {"off_s": base["s"], "on_s": with_dop["s"], "overhead": with_dop["s"] / base["s"],
                      "peak_gib": with_dop["peak_gib"], "planned_gib": with_dop["planned_gib"],
                      "blocks": with_dop["blocks"]}
        print(f"[{res['size']}] DOP {res['dop']}", flush=True)
        save(res)
    if args.low_vram:
        if len(models) == 1:
            models.append(full_expert(b.device, seed=1, **args.overrides))
            quantize_float8(models[1:])
        res["low_vram"] = run_low_vram(b, models, args.compile)
        print(f"[{res['size']}] low VRAM {res['low_vram']}", flush=True)
        save(res)
    models.clear()  # frees the experts before the next size
    reset_peak()
    return res


def table(results: dict) -> str:
    lines = ["| size | run | s/step | speedup vs plain | MFU | peak GiB (planned) | max loss diff vs plain | blocks |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results["sizes"]:
        for key, r in res.items():
            if not (isinstance(r, dict) and "s" in r):
                continue
            planned = f" ({r['planned_gib']:.1f})" if "planned_gib" in r else ""
            diff = f"{r['loss_rel_diff_vs_plain']:.2e}" if "loss_rel_diff_vs_plain" in r else ""
            lines.append(f"| {res['size']} | {key} | {r['s']:.3f} | {r['speedup']:.2f}x | {r['mfu']:.0%} | "
                         f"{r['peak_gib']:.1f}{planned} | {diff} | {r.get('blocks', 'full (diffusers)')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", action="append", help="WxHxF, repeatable (default 512x512x33)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--plain-steps", type=int, help="timed steps of the plain loop (default --steps)")
    ap.add_argument("--parity", type=int, default=0, help="steps whose losses are compared with the plain loop")
    ap.add_argument("--experts", type=int, choices=(1, 2), default=1)
    ap.add_argument("--levers", action="store_true")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 fast path")
    ap.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the float8 fast path")
    ap.add_argument("--fp8-first", action="store_true", help="float8 runs before the bf16 ones (rebuilds the experts)")
    ap.add_argument("--eager-full", action="store_true", help="also the trainer's eager step, full checkpointing")
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--dop", action="store_true")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--fast-policy", default="auto", choices=("auto", "off", "selective", "full", "mixed"),
                    help="checkpointing of the fast paths: the planner's choice (default) or forced")
    ap.add_argument("--mix", help="WxHxF: a second bucket the fast paths' steps alternate with")
    ap.add_argument("--compile-dynamic", choices=tuple(DYNAMIC), default="auto",
                    help="the float8 fast path's torch.compile shapes with --mix: auto (as the trainer), static or both")
    ap.add_argument("--layers", type=int, help="fewer transformer blocks (quick checks; numbers not comparable)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    args.overrides = dict(TINY) if args.tiny else {}
    if args.layers:
        args.overrides["num_layers"] = args.layers
    sizes = args.size or (["32x32x5"] if args.tiny else ["512x512x33"])
    arch = {**A14B_CONFIG, **args.overrides}
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "args": {k: v for k, v in vars(args).items() if k != "overrides"}, "sizes": []}
    if device == "cuda":
        use_expandable_segments()  # as the trainer does
    ceiling = matmul_ceiling_tflops() if device == "cuda" else 1.0
    results["bf16_matmul_tflops"] = ceiling
    print(f"{results['device']}: bf16 matmul {ceiling:.0f} TFLOP/s", flush=True)
    for size in sizes:
        w, h, f = (int(v) for v in size.split("x"))
        name = f"perf_{size}{'_2experts' if args.experts == 2 else ''}.json"

        def save(res: dict, name: str = name) -> None:
            Path(args.out, name).write_text(json.dumps(results | {"sizes": [res]}, indent=2))

        mix = tuple(int(v) for v in args.mix.split("x")) if args.mix else None
        results["sizes"].append(bench_size(Bench(device, arch, (w, h, f), mix), args, ceiling, save))
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
