"""ComfyUI widgets read from the job config: a setting's default, limits and tooltip are declared once, on its field
in ``trainer_core/config.py``, and every node that shows the setting takes them from there.

A setting is named by its path in :class:`JobConfig`: ``"optimizer.lr"``, ``"datasets.fps"`` (a field of each
dataset), ``"optimizer.betas.0"`` (one number of a pair). Its widget follows its type: ``bool`` -> BOOLEAN, ``int``
-> INT, ``float`` -> FLOAT, ``str`` -> STRING, a ``Literal`` -> a combo of its values (a list), a list -> STRING of values
separated by commas; an optional setting's widget writes ``none`` for unset ("" for text). The limits are pydantic's
own (``ge``, ``gt``, ``le``, ``lt``) or the field's :class:`trainer_core.config.Range` (an open bound becomes the
widget's end; the config then refuses that end value with its own message); ``step`` and ``widget_max`` come from the
field's ``json_schema_extra``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from trainer_core.config import JobConfig, range_of
from trainer_core.errors import ConfigError

_KINDS = {bool: "BOOLEAN", str: "STRING", int: "INT", float: "FLOAT"}


def setting(path: str) -> tuple[FieldInfo, Any, Any]:
    """The field of the setting at ``path``, its value type and its default (for ``"x.N"``: the pair's N-th)."""
    model: type[BaseModel] = JobConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields[part]
        annotation = field.annotation
        if get_origin(annotation) is list and _is_model(get_args(annotation)[0]):
            annotation = get_args(annotation)[0]  # "datasets.fps": the field of each dataset
        if _is_model(annotation):
            model = annotation
            continue
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined:  # a required setting (a dataset's folder): its widget starts empty
            default = None
        if i + 1 < len(parts):  # one number of a pair, e.g. optimizer.betas.0
            index = int(parts[i + 1])
            return field, get_args(annotation)[index], default[index]
        return field, annotation, default
    raise KeyError(f"{path} is a section, not a setting")


def widget(path: str, *, none: Any = "", **options: Any) -> tuple[Any, dict[str, Any]]:
    """The ComfyUI input spec ``(kind, options)`` of the setting at ``path``: default, min/max/step and tooltip from
    its field. ``none`` is the widget value that means unset for an optional setting (numbers must give one, e.g.
    ``none=0.0``); ``options`` add what only this widget needs (``multiline``, ``control_after_generate``) or, with a
    comment at the call, replace what the widget does differently from the config."""
    field, annotation, default = setting(path)
    kind = _kind(annotation)
    if default is None:
        default = none
    elif isinstance(default, list):
        default = ", ".join(map(str, default))
    elif kind == "STRING" and not isinstance(default, str):
        default = str(default)  # a number or a word (offload_blocks: 0 or 'auto') is typed as text
    spec: dict[str, Any] = {"default": default, "tooltip": field.description or ""}
    if _is_optional(annotation) and none != "":
        spec["tooltip"] += f" ({none:g} = unset)"
    if kind in ("INT", "FLOAT"):
        spec.update(_limits(field, kind, path))
    return (kind, {**spec, **options})


def inputs(fields: Mapping[str, str], ui: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple]:
    """``INPUT_TYPES`` entries of a node's widgets, in the order of ``fields`` (widget name -> setting path);
    ``ui[name]`` holds :func:`widget`'s extra arguments for that widget."""
    return {name: widget(path, **(ui or {}).get(name, {})) for name, path in fields.items()}


def limits_problem(spec: tuple[Any, dict[str, Any]], value: Any) -> str | None:
    """What is wrong with ``value`` against a number widget's ``spec`` min/max (ComfyUI's own check, which it skips
    for the inputs a VALIDATE_INPUTS takes), else None."""
    kind, opts = spec
    if kind not in ("INT", "FLOAT"):
        return None
    if value < opts["min"]:
        return f"{value} is below its minimum {opts['min']}"
    if value > opts["max"]:
        return f"{value} is above its maximum {opts['max']}"
    return None


def partial_config(
    fields: Mapping[str, str], values: Mapping[str, Any], ui: Mapping[str, Mapping[str, Any]] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Widget values as a partial job config: ``{"learning_rate": 1e-4}`` with ``fields`` ``{"learning_rate":
    "optimizer.lr"}`` -> ``{"optimizer": {"lr": 1e-4}}``. Text of a list setting is split at commas (numbers
    converted), an optional setting's ``none`` value (``ui[name]``, default "") becomes ``None``, and pair numbers
    (``optimizer.betas.0`` / ``.1``) join into a pair."""
    out: dict[str, Any] = {}
    for name, path in fields.items():
        _, annotation, _ = setting(path)
        value = values[name]
        none = (ui or {}).get(name, {}).get("none", "")
        if _is_optional(annotation) and (value.strip() if isinstance(value, str) else value) == none:
            value = None
        elif get_origin(annotation) is list and isinstance(value, str):
            value = _split(value, get_args(annotation)[0], name, source)
        *sections, key = path.split(".")
        place = out
        for part in sections:
            place = place.setdefault(part, {})
        place[key] = value
    return _pairs(out)


def _pairs(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"betas": {"0": a, "1": b}}`` -> ``{"betas": (a, b)}`` at any depth."""
    for key, value in tree.items():
        if isinstance(value, dict):
            tree[key] = tuple(value[k] for k in sorted(value)) if all(k.isdigit() for k in value) else _pairs(value)
    return tree


def _split(text: str, item: type, name: str, source: str) -> list[Any]:
    parts = [p for p in re.split(r"[,;\s]+", text) if p]
    try:
        return [item(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{source}: {name} {text!r} must be whole numbers separated by commas, e.g. '512, 768'"
                          ) from None


def _kind(annotation: Any) -> Any:
    """The ComfyUI widget kind of a setting's type."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))  # ComfyUI checks "Value not in list" only for a list, not a tuple
    if get_origin(annotation) in (Union, UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        # one type besides None (float | None) is that type's widget; mixed ones (int | 'auto') are typed as text
        return _kind(inner[0]) if len(inner) == 1 else "STRING"
    if get_origin(annotation) is list:
        return "STRING"
    return _KINDS[annotation]


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, UnionType) and type(None) in get_args(annotation)


def _limits(field: FieldInfo, kind: str, path: str) -> dict[str, Any]:
    """min/max (from pydantic's limits or the field's Range, else ``widget_max``) and step of a number widget."""
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, (at.Ge, at.Gt)):
            lo = m.ge if isinstance(m, at.Ge) else m.gt
        elif isinstance(m, (at.Le, at.Lt)):
            hi = m.le if isinstance(m, at.Le) else m.lt
    limits = range_of(field)
    if limits is not None:
        lo, hi = limits.lo, limits.hi
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    hi = extra.get("widget_max", hi)
    if lo is None or hi is None:
        raise KeyError(f"{path}: a number widget needs both limits - give the field a Range, ge/le or widget_max")
    cast = int if kind == "INT" else float
    out = {"min": cast(lo), "max": cast(hi)}
    if "step" in extra:
        out["step"] = extra["step"]
    return out


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
