"""Per-expert training objects: the transformer with its own LoRA, optimizer and LR schedule."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import WanTransformer3DModel

from ..config import JobConfig
from ..lora import attach_lora, init_expert_lora, lora_parameters
from ..memory import BlockPlan, ExpertMemory, Plan, install_block_plan
from ..regularizers import LoraEMA
from .optim import build_lr_scheduler, build_optimizer


@dataclass
class Expert:
    """One trained expert: its transformer (base frozen, LoRA trainable), optimizer, LR schedule and optional EMA."""

    name: str
    model: WanTransformer3DModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: LoraEMA | None = None
    steps_done: int = 0

    def optimizer_step(self, max_grad_norm: float) -> bool:
        """Clip, step the optimizer and the LR schedule, clear gradients and update the EMA. Returns False, and
        changes nothing, when the gradient holds a NaN/Inf (a finite loss can still overflow in the backward pass;
        stepping would poison the weights and the optimizer's moments)."""
        # max_norm inf computes the norm without clipping (scaling by exactly 1.0 leaves the gradients as they are)
        norm = torch.nn.utils.clip_grad_norm_(lora_parameters(self.model), max_grad_norm or math.inf)
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.steps_done += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule, EMA and step count (the LoRA weights are saved separately, in ComfyUI naming)."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; call after the LoRA weights were restored."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on at resume: start it from the resumed weights
                self.ema = LoraEMA(self.model, self.ema.decay)


def block_plan_for(cfg: JobConfig, plan: Plan, device: torch.device, sharded: bool = False) -> BlockPlan:
    """The checkpointing split the VRAM planner chose and whether to compile the blocks (``train.compile``).

    ``auto`` compiles on CUDA when Triton is installed (torch.compile's GPU code generator; missing e.g. on
    Windows) unless the base is 4-bit (bitsandbytes' kernels break the graph into pieces) or the weights are sharded
    across GPUs (``sharded``; FSDP's gathers around compiled blocks are not benchmarked yet). Streamed blocks compile
    too: their load hooks run around the compiled block (:func:`..memory.blocks.install_block_plan`); float8 + Low
    VRAM under a 22 GiB cap ran 1.507 s/step compiled against 2.442 eager (H200, benchmarks/tier24_bench.py).
    """
    if cfg.train.compile == "auto":
        compiled = (
            device.type == "cuda"
            and importlib.util.find_spec("triton") is not None
            and not sharded
            and cfg.quant.transformer != "4bit_ara"
        )
    else:
        compiled = cfg.train.compile == "on"
    off, selective, full = plan.block_split
    return BlockPlan(
        off=off, selective=selective, full=full, compile=compiled, fallback=cfg.train.compile == "auto",
        compile_full=not (cfg.quant.transformer == "4bit_ara" and cfg.quant.quantizer == "nf4"),
    )


def prepare_expert(
    name: str,
    model: WanTransformer3DModel,
    cfg: JobConfig,
    expert_steps: int,
    memory: ExpertMemory,
    blocks: BlockPlan,
    shard: Callable[[WanTransformer3DModel], None] | None = None,
) -> Expert:
    """Freeze the base, attach a LoRA, set how the blocks run (``blocks``), shard the frozen weights across GPUs
    (``shard``, before anything moves to the device), hand the model to ``memory`` (device placement, offloading,
    low-VRAM swapping) and build this expert's optimizer, schedule and EMA."""
    model.requires_grad_(False)
    attach_lora(model, cfg.lora)
    init_expert_lora(model, name, cfg)  # lora.init_high / init_low: start from an existing LoRA file
    install_block_plan(model, blocks)
    if shard is not None:
        shard(model)
    memory.place(name, model)
    model.train()
    optimizer = build_optimizer(lora_parameters(model), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer, expert_steps)
    ema = LoraEMA(model, cfg.advanced.ema_decay) if cfg.advanced.ema else None
    return Expert(name=name, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
