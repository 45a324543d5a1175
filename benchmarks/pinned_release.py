"""Host memory a finished Low VRAM run leaves behind in a process that lives on, as a ComfyUI server does.

    python benchmarks/pinned_release.py --out $OUT     # CUDA: two experts of full width, --layers blocks each
    python benchmarks/pinned_release.py --tiny         # CPU smoke run of the same code (tests use it)

Each run, in a fresh process: two experts of Wan 2.2 A14B's width with ``--layers`` blocks (bf16 random weights
built on the GPU) are placed in ``ExpertMemory(low_vram=True)`` (their host copies page-locked), switched once,
closed, and moved to host memory as the ComfyUI bundle keeps them (``release_expert``). Run ``released`` is the
trainer as it is; run ``cached`` stubs out ``empty_pinned_cache``, which is what closing did before: the pinned copies
stayed in CUDA's caching host allocator. Reports per run the process's resident memory (``/proc/self/status``:
VmRSS, RssAnon, RssFile, RssShmem) after that, the pinned bytes the run took, and ``host_memory_stats``' bytes still
held. Results go to ``--out`` as ``pinned_release.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import proc_memory, run_child, write_result  # noqa: E402

GIB = 2**30
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def child(mode: str, layers: int, tiny: bool) -> dict[str, Any]:
    """One run (``released`` or ``cached``); its figures."""
    from benchmarks.common import TINY, full_expert
    from trainer_core.bundle import release_expert
    from trainer_core.memory import ExpertMemory, residency

    if mode == "cached":
        residency.empty_pinned_cache = lambda: None
    device = "cpu" if tiny else "cuda"
    shape = TINY if tiny else {"num_layers": layers}
    experts = {name: full_expert(device, seed=i, **shape) for i, name in enumerate(("high", "low"))}
    memory = ExpertMemory(device, low_vram=True, offload_blocks=0)
    for name, model in experts.items():
        memory.place(name, model)
    memory.activate("low", wait=True)
    pinned = memory.engine.arena.allocated_bytes
    memory.close()
    for model in experts.values():
        release_expert(model)
    held = None
    if device == "cuda":
        torch.cuda.empty_cache()
        held = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / GIB
    weights = sum(p.numel() * p.element_size() for m in experts.values() for p in m.parameters()) / GIB
    return {"mode": mode, "experts_gib": round(weights, 2), "pinned_gib": round(pinned / GIB, 2),
            "resident_gib": {k: round(v / GIB, 2) for k, v in proc_memory().items() if k in FIELDS},
            "pinned_cache_gib": held and round(held, 2)}


def main(argv: list[str] | None = None) -> dict:
    """Both runs, each in its own process; returns the figures written to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=10, help="blocks per expert (40 in the real model)")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.tiny)))
        return {}
    runs = [run_child([sys.executable, __file__, "--child", mode, "--layers", str(args.layers),
                       *(["--tiny"] * args.tiny)], f"the {mode} run", cwd=ROOT) for mode in ("cached", "released")]
    res = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}
    write_result(args.out, "pinned_release.json", res)
    return res


if __name__ == "__main__":
    main()
