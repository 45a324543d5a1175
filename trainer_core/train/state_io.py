"""Serialize nested training state (optimizer/scheduler dicts, RNG states) into one safetensors file.

Every tensor becomes a safetensors entry; the surrounding structure (dicts, lists, numbers, strings) is kept as JSON
in the file's metadata. No pickle is involved, so a state file cannot execute code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..fileio import save_safetensors_atomic

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (bitsandbytes shares its quantization maps between params).
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        tensors[prefix] = t
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            # Optimizer states are keyed by parameter index; JSON keys must be strings.
            return {_INTKEYS: {str(k): _flatten(v, f"{prefix}.{k}", tensors, seen) for k, v in obj.items()}}
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state key types not supported at {prefix}: {[type(k) for k in obj]}")
        return {k: _flatten(v, f"{prefix}.{k}", tensors, seen) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{prefix}.{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialize {type(obj).__name__} at {prefix}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_INTKEYS}:
            return {int(k): _unflatten(v, tensors) for k, v in obj[_INTKEYS].items()}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors and plain values) atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors, set())
    meta = dict(metadata or {})
    meta["state_skeleton"] = json.dumps(skeleton)
    return save_safetensors_atomic(tensors, path, metadata=meta)


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a file written by :func:`save_state`; returns (state, metadata without the skeleton)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    skeleton = json.loads(meta.pop("state_skeleton"))
    return _unflatten(skeleton, tensors), meta
