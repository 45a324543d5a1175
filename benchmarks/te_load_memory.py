"""Host memory of reading ComfyUI's UMT5-XXL file to host memory against reading it straight to the GPU.

    python benchmarks/te_load_memory.py --root /tmp/te --out $OUT      # GPU: a full-size fp8_scaled file
    python benchmarks/te_load_memory.py --root /tmp/te_tiny --tiny      # CPU smoke run, tiny encoder

Writes a random-weight ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (as ``e2e_fullscale.py``'s files phase) unless
there, then, each in a fresh process, loads it with ``load_components(..., text_encoder_device=D)`` for D = cpu and
(with a GPU) cuda, quantizes it to float8 on the GPU and stores it in host memory as the ComfyUI bundle does, and
encodes one prompt. Reports per device the load time, the process's peak resident host memory (``VmHWM``) and GPU
peak, and whether both give the same embeddings (they must: the same weights, quantized on the same card).
Results go to ``--out`` as ``te_load_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
PROMPT = "a red square slides across a white wall, camera still"


def child(path: Path, load_on: str, emb_out: Path) -> dict[str, Any]:
    """Load, quantize (float8, on the GPU if there is one), keep in host memory, encode; figures of this process."""
    from benchmarks.common import proc_memory
    from trainer_core.config import ModelConfig, QuantConfig
    from trainer_core.models import encode_prompts, load_components
    from trainer_core.quant import quantize_text_encoder

    compute = "cuda" if torch.cuda.is_available() else "cpu"
    before = proc_memory()["VmRSS"] / 2**30
    t0 = time.perf_counter()
    cfg = ModelConfig(source="tiny", text_encoder=str(path), text_encoder_dtype="bf16")
    comps = load_components(cfg, high=False, low=False, vae=False, text_encoder_device=load_on)
    load_s = time.perf_counter() - t0
    te = comps.text_encoder
    quantize_text_encoder(te, QuantConfig(text_encoder="float8"), compute)
    te.to("cpu")  # where the bundle keeps it between nodes
    kept = proc_memory()["VmRSS"] / 2**30
    with torch.no_grad():
        emb = encode_prompts(te.to(compute), comps.tokenizer, [PROMPT], device=torch.device(compute))
    torch.save(emb.float().cpu(), emb_out)
    gpu = torch.cuda.max_memory_allocated() / 2**30 if compute == "cuda" else None
    return {"load_on": load_on, "load_s": round(load_s, 2), "rss_before_gib": round(before, 2),
            "host_peak_gib": round(proc_memory()["VmHWM"] / 2**30, 2), "host_kept_float8_gib": round(kept, 2),
            "gpu_peak_gib": gpu and round(gpu, 2)}


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison (or, with ``--child``, one load); returns the figures written to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "DEVICE", "EMB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], Path(args.child[2]))))
        return {}
    from benchmarks.common import run_child, write_result
    from benchmarks.e2e_fullscale import write_text_encoder

    path = args.root / FILE
    args.root.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_text_encoder(path, "cpu" if args.tiny else "cuda", args.tiny)
        torch.cuda.empty_cache()
    res: dict[str, Any] = {"file_gib": round(path.stat().st_size / 2**30, 2), "runs": []}
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        emb = args.root / f"emb_{device}.pt"
        res["runs"].append(run_child([sys.executable, __file__, "--root", str(args.root), "--child", str(path),
                                      device, str(emb)], f"the load to {device}"))
    if len(devices) == 2:
        a, b = (torch.load(args.root / f"emb_{d}.pt") for d in devices)
        res["same_embeddings"] = bool(torch.equal(a, b))
    write_result(args.out, "te_load_memory.json", res)
    return res


if __name__ == "__main__":
    main()
